package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/rwf"
)

// bufferAlign is the least alignment of every I/O buffer: O_DIRECT needs the
// device's logical block size, and 4096 covers every device in use.
const bufferAlign = 4096

// alignedBuffer returns n bytes starting on a multiple of align, a power of
// two. The Go heap does not move objects, so slicing an over-allocation is
// enough.
func alignedBuffer(n, align int) []byte {
	b := make([]byte, n+align)
	skip := 0
	if r := int(uintptr(unsafe.Pointer(&b[0])) & uintptr(align-1)); r != 0 {
		skip = align - r
	}
	return b[skip : skip+n : skip+n]
}

// ErrDeviceBusy is returned (wrapped in a *DeviceBusyError) when a write mode
// finds its block device in use: it cannot be opened exclusively (mounted, a
// member of an md array or a device-mapper table (LVM), swap, or held
// exclusively by another program), or another program has it open (lvnbd
// serve exporting it, qemu), or it is a Xen guest's disk. --force does not
// override it.
var ErrDeviceBusy = errors.New("block device in use")

// DeviceBusyError names a block device a write run refused because it is in
// use, and what uses it where that can be found.
type DeviceBusyError struct {
	Device string // the path given, with the device it resolves to
	Uses   string // "mounted on /mnt", "held by md0", or a list of what it may be
	Err    error  // the open's error, EBUSY
}

func (e *DeviceBusyError) Error() string {
	return fmt.Sprintf("block device %s is in use (%s): unmount or stop it first; --force does not override this", e.Device, e.Uses)
}

// Unwrap makes errors.Is true for ErrDeviceBusy and the open's error.
func (e *DeviceBusyError) Unwrap() []error { return []error{ErrDeviceBusy, e.Err} }

// File is a regular file or block device target.
type File struct {
	f        *os.File
	fd       int
	path     string
	resolved string // the device node path leads to, for messages
	device   bool
	direct   bool
	align    int   // offsets and lengths, with O_DIRECT
	memAlign int   // buffer addresses, with O_DIRECT
	size     int64 // the region in use
	created  bool  // this run made the file
	existing int64 // bytes of earlier data a forced write run may overwrite
	ino      unix.Stat_t
	dsync    bool // the kernel takes RWF_DSYNC here (rwf.Supported, asked at open)
}

// OpenFile opens path as a target: a block device (size from BLKGETSIZE64)
// or a regular file. In write modes a missing file is created with o.Size;
// an existing device or non-empty file is written only with o.Force, and a
// device only if no one else uses it (O_EXCL: not mounted, not in an array).
//
// The target is opened read-only first and only reopened for writing once
// the run is allowed to write, so a refused run never holds it writable.
func OpenFile(path string, o OpenOptions) (*File, error) {
	return openFile(path, o, nil)
}

// openFile is OpenFile with beforeReopen, if set, called between the
// read-only look and the reopen for writing: tests swap the file there.
func openFile(path string, o OpenOptions, beforeReopen func()) (*File, error) {
	// A path-based look first only so that a FIFO or character device is
	// refused without being opened (opening a tape rewinds it); what
	// counts is the fstat of the descriptor below.
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return createFile(path, o)
	case err != nil:
		return nil, err
	case !st.Mode().IsRegular() && !isBlockDevice(st.Mode()):
		return nil, fmt.Errorf("%s is neither a regular file nor a block device (mode %v)", path, st.Mode())
	}
	// O_NONBLOCK: should path have become a FIFO since the stat, the open
	// must not wait for a writer.
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	t := &File{fd: fd, path: path, direct: o.Direct, align: 1, memAlign: 1}
	ok := false
	defer func() {
		if !ok {
			unix.Close(t.fd)
		}
	}()
	if err := unix.Fstat(fd, &t.ino); err != nil {
		return nil, fmt.Errorf("fstat %s: %w", path, err)
	}
	switch t.ino.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		t.device = true
		t.resolved = path
		if r, err := filepath.EvalSymlinks(path); err == nil {
			t.resolved = r
		}
	case unix.S_IFREG:
	default:
		return nil, fmt.Errorf("%s is neither a regular file nor a block device (mode %#o)", path, t.ino.Mode)
	}
	if err := t.setFlags(); err != nil {
		return nil, err
	}
	size, err := t.measure()
	if err != nil {
		return nil, err
	}
	if o.Write && t.device {
		// Before the --force check: a device in use must not be
		// offered to --force, which cannot write it.
		if err := t.checkNotInUse(); err != nil {
			return nil, err
		}
	}
	if o.Write && !o.Force && size > 0 {
		kind := "non-empty file"
		if t.device {
			kind = "block device"
		}
		return nil, &OverwriteError{Path: path, Resolved: t.resolved, Kind: kind, Size: size, Range: min(o.Size, size)}
	}
	region, grow, err := t.region(size, o)
	if err != nil {
		return nil, err
	}
	if o.Validate != nil {
		if err := o.Validate(region, t.align); err != nil {
			return nil, err
		}
	}
	if o.Write {
		if beforeReopen != nil {
			beforeReopen()
		}
		if err := t.reopenForWriting(); err != nil {
			return nil, err
		}
		if size > 0 {
			t.existing = region
		}
	}
	if grow {
		if err := unix.Ftruncate(t.fd, region); err != nil {
			return nil, fmt.Errorf("extending %s to %d bytes: %w", path, region, err)
		}
	}
	t.size = region
	t.dsync = rwf.Supported(t.fd, max(size, region), unix.RWF_DSYNC)
	t.f = os.NewFile(uintptr(t.fd), path)
	ok = true
	return t, nil
}

// createFile makes the missing file a write run asked for. It is removed
// again if the run's settings turn out not to fit it (an unaligned --size
// with O_DIRECT), so a refused run leaves nothing that the next one would
// need --force to write over.
func createFile(path string, o OpenOptions) (*File, error) {
	if !o.Write {
		return nil, fmt.Errorf("%s does not exist (a read mode never creates it; write it first with --mode write)", path)
	}
	if o.Size <= 0 {
		return nil, fmt.Errorf("%s does not exist: give --size to create it", path)
	}
	// Without O_DIRECT: on a file system without direct I/O the open
	// would fail after creating the file. setFlags adds it.
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("creating %s: %w", path, err)
	}
	t := &File{fd: fd, path: path, direct: o.Direct, align: 1, memAlign: 1, created: true}
	ok := false
	defer func() {
		if !ok {
			unix.Close(fd)
			os.Remove(path)
		}
	}()
	if err := unix.Fstat(fd, &t.ino); err != nil {
		return nil, fmt.Errorf("fstat %s: %w", path, err)
	}
	if err := t.setFlags(); err != nil {
		return nil, err
	}
	if _, err := t.measure(); err != nil {
		return nil, err
	}
	if o.Validate != nil {
		if err := o.Validate(o.Size, t.align); err != nil {
			return nil, err
		}
	}
	if err := unix.Ftruncate(fd, o.Size); err != nil {
		return nil, fmt.Errorf("sizing %s to %d bytes: %w", path, o.Size, err)
	}
	t.size = o.Size
	t.dsync = rwf.Supported(fd, o.Size, unix.RWF_DSYNC)
	t.f = os.NewFile(uintptr(fd), path)
	ok = true
	return t, nil
}

func isBlockDevice(m os.FileMode) bool {
	return m&os.ModeDevice != 0 && m&os.ModeCharDevice == 0
}

// setFlags clears the O_NONBLOCK of the first open and sets O_DIRECT if
// asked for. fcntl, not open, sets O_DIRECT so that a file system without
// direct I/O is found before anything is created or written.
func (t *File) setFlags() error {
	fl, err := unix.FcntlInt(uintptr(t.fd), unix.F_GETFL, 0)
	if err != nil {
		return fmt.Errorf("fcntl F_GETFL on %s: %w", t.path, err)
	}
	fl &^= unix.O_NONBLOCK
	if t.direct {
		fl |= unix.O_DIRECT
	}
	_, err = unix.FcntlInt(uintptr(t.fd), unix.F_SETFL, fl)
	if errors.Is(err, unix.EINVAL) && t.direct {
		return fmt.Errorf("opening %s with O_DIRECT: %w (its file system does not support direct I/O; use --direct=false)", t.path, err)
	}
	if err != nil {
		return fmt.Errorf("fcntl F_SETFL on %s: %w", t.path, err)
	}
	return nil
}

// measure returns the size of the file or device behind the descriptor and
// sets the alignment direct I/O needs.
func (t *File) measure() (int64, error) {
	if t.device {
		var s uint64
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(t.fd), uintptr(unix.BLKGETSIZE64), uintptr(unsafe.Pointer(&s))); errno != 0 {
			return 0, fmt.Errorf("BLKGETSIZE64 on %s: %w", t.path, errno)
		}
		if t.direct {
			lbs, err := unix.IoctlGetInt(t.fd, unix.BLKSSZGET)
			if err != nil {
				return 0, fmt.Errorf("BLKSSZGET on %s: %w", t.path, err)
			}
			t.align, t.memAlign = lbs, bufferAlign
		}
		return int64(s), nil
	}
	if t.direct {
		var stx unix.Statx_t
		err := unix.Statx(t.fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &stx)
		offset, mem, ok := dioAlign(&stx, err)
		if !ok {
			return 0, fmt.Errorf("opening %s with O_DIRECT: its file system does not support direct I/O on it (statx reports no alignment); use --direct=false", t.path)
		}
		t.align, t.memAlign = offset, mem
	}
	return t.ino.Size, nil
}

// dioAlign reads the alignment direct I/O on a regular file needs from
// statx(STATX_DIOALIGN): the file system knows it (4096 on a 4Kn disk,
// where 512-byte requests fail with EINVAL mid-run). Kernels before 6.1
// and file systems that do not report it get 512 and 4096, which held on
// every disk before 4Kn ones. ok is false where direct I/O is reported
// unsupported on this file.
func dioAlign(stx *unix.Statx_t, statxErr error) (offset, mem int, ok bool) {
	if statxErr != nil || stx.Mask&unix.STATX_DIOALIGN == 0 {
		return 512, bufferAlign, true
	}
	if stx.Dio_offset_align == 0 {
		return 0, 0, false
	}
	return int(stx.Dio_offset_align), max(bufferAlign, int(stx.Dio_mem_align)), true
}

// region decides the bytes the run uses from offset 0, and whether a file
// must grow to hold them.
func (t *File) region(size int64, o OpenOptions) (region int64, grow bool, err error) {
	switch {
	case o.Size == 0 && size == 0:
		return 0, false, fmt.Errorf("%s is empty: give --size (in a write mode) to use it", t.path)
	case o.Size == 0:
		return size, false, nil
	case o.Size <= size:
		return o.Size, false, nil
	case t.device:
		return 0, false, fmt.Errorf("--size %s is larger than block device %s (%s)", formatIBytes(o.Size), t.name(), formatIBytes(size))
	case !o.Write:
		return 0, false, fmt.Errorf("--size %s is larger than file %s (%s); a read mode never extends it", formatIBytes(o.Size), t.path, formatIBytes(size))
	default:
		return o.Size, true, nil
	}
}

// reopenForWriting replaces the read-only descriptor with a read-write one
// of the same file, now that the run may write. A device is opened with
// O_EXCL: the kernel then refuses it while it is mounted or part of an md
// array or device-mapper table, which a benchmark must never write over,
// forced or not.
func (t *File) reopenForWriting() error {
	flags := unix.O_RDWR | unix.O_CLOEXEC
	if t.device {
		flags |= unix.O_EXCL
	}
	fd, err := unix.Open(t.path, flags, 0)
	if errors.Is(err, unix.EBUSY) && t.device {
		return &DeviceBusyError{Device: t.name(), Uses: deviceUses(t.ino.Rdev, t.resolved), Err: err}
	}
	if err != nil {
		return fmt.Errorf("opening %s for writing: %w", t.path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return fmt.Errorf("fstat %s: %w", t.path, err)
	}
	if !sameFile(&t.ino, &st) {
		unix.Close(fd)
		return fmt.Errorf("%s was replaced while it was being opened (now another file or device): run again", t.path)
	}
	unix.Close(t.fd)
	t.fd = fd
	return t.setFlags()
}

// checkNotInUse returns a *DeviceBusyError if the device cannot be opened
// exclusively, or if another program or a Xen guest has it open: lvnbd serve
// exporting it, qemu, and blkback open a device without claiming it, so an
// exclusive open alone would not see them. The exclusive open is read-only
// and closed at once: the one that counts is reopenForWriting's.
func (t *File) checkNotInUse() error {
	fd, err := unix.Open(t.path, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.EBUSY) {
		return &DeviceBusyError{Device: t.name(), Uses: deviceUses(t.ino.Rdev, t.resolved), Err: err}
	}
	if err != nil {
		return fmt.Errorf("opening %s exclusively: %w", t.path, err)
	}
	unix.Close(fd)
	if uses := sharedUses("/proc", "/sys", devicesOf(t.ino.Rdev, t.resolved), os.Getpid()); len(uses) > 0 {
		return &DeviceBusyError{Device: t.name(), Uses: strings.Join(uses, "; "), Err: unix.EBUSY}
	}
	return nil
}

// sameFile reports whether a and b are the same file, or device node of the
// same device.
func sameFile(a, b *unix.Stat_t) bool {
	if a.Mode&unix.S_IFMT != b.Mode&unix.S_IFMT {
		return false
	}
	if a.Mode&unix.S_IFMT == unix.S_IFBLK {
		return a.Rdev == b.Rdev
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

// name is the path, with the device it leads to when that differs
// (/dev/disk/by-id/…, /dev/vg0/lv).
func (t *File) name() string {
	if t.resolved != "" && t.resolved != t.path {
		return fmt.Sprintf("%s (%s)", t.path, t.resolved)
	}
	return t.path
}

// Size is the region of the file or device in use.
func (t *File) Size() int64 { return t.size }

// Alignment is the multiple that offsets and lengths must be with O_DIRECT.
func (t *File) Alignment() int { return t.align }

// MemoryAlignment is the multiple that buffer addresses must be with
// O_DIRECT.
func (t *File) MemoryAlignment() int { return t.memAlign }

// Describe says what the target is.
func (t *File) Describe() string {
	kind := "file"
	if t.device {
		kind = "block device"
	}
	if t.direct {
		return kind + ", O_DIRECT"
	}
	return kind + ", page cache"
}

// Overwrites names the device or file whose earlier data a forced write run
// writes over, or "" when there was none (a new or empty file).
func (t *File) Overwrites() string {
	switch {
	case t.existing == 0:
		return ""
	case t.device:
		return "block device " + t.name()
	default:
		return "file " + t.path
	}
}

// Created reports whether this run made the file.
func (t *File) Created() bool { return t.created }

// RemoveCreated removes the file if this run made it and it is still the
// file at its path; a run that fails before writing anything leaves no file
// behind for the next run to need --force over.
func (t *File) RemoveCreated() error {
	if !t.created {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Stat(t.path, &st); err != nil || !sameFile(&t.ino, &st) {
		return nil // gone or replaced: not ours to remove
	}
	if err := os.Remove(t.path); err != nil {
		return fmt.Errorf("removing %s, which the failed run created: %w", t.path, err)
	}
	return nil
}

// ReadAt fills p from offset off.
func (t *File) ReadAt(_ context.Context, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pread(t.fd, p, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("pread %s at %d: %w", t.path, off, err)
		}
		if n == 0 {
			return fmt.Errorf("pread %s at %d: unexpected end of file", t.path, off)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// WriteAt writes p at offset off; durable writes use RWF_DSYNC, or a write
// and fdatasync where the kernel lacks it. A failed RWF_DSYNC write is the
// write's failure, never a reason to retry without the flag: its sync may
// have consumed a failed write-back that the retry's sync would not see
// (see rwf.Supported).
func (t *File) WriteAt(_ context.Context, p []byte, off int64, durable bool) error {
	dsync := durable && t.dsync
	for len(p) > 0 {
		var n int
		var err error
		if dsync {
			n, err = unix.Pwritev2(t.fd, [][]byte{p}, off, unix.RWF_DSYNC)
		} else {
			n, err = unix.Pwrite(t.fd, p, off)
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("pwrite %s at %d: %w", t.path, off, err)
		}
		p, off = p[n:], off+int64(n)
	}
	if durable && !dsync {
		return t.Flush(context.Background())
	}
	return nil
}

// Flush is fdatasync (or fsync: conv=fsync).
func (t *File) Flush(context.Context) error {
	if err := unix.Fdatasync(t.fd); err != nil {
		return fmt.Errorf("fdatasync %s: %w", t.path, err)
	}
	return nil
}

// DropCache drops the cached pages of a target read through the page cache
// (--direct=false), so that the reads after it come from storage: a verify
// that read what the run had just left in memory would pass even if the
// writes never reached the disk. The data must have been flushed: only
// clean pages are dropped.
func (t *File) DropCache() error {
	if t.direct {
		return nil
	}
	if t.device {
		// BLKFLSBUF invalidates the whole device's cache; it needs
		// CAP_SYS_ADMIN, and fadvise below does the same for clean
		// pages without.
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(t.fd), uintptr(unix.BLKFLSBUF), 0)
		if errno == 0 {
			return nil
		}
		if errno != unix.EACCES && errno != unix.EPERM {
			return fmt.Errorf("BLKFLSBUF on %s: %w", t.path, errno)
		}
	}
	if err := unix.Fadvise(t.fd, 0, 0, unix.FADV_DONTNEED); err != nil {
		return fmt.Errorf("dropping the page cache of %s (fadvise DONTNEED): %w", t.path, err)
	}
	return nil
}

// Close closes the file or device.
func (t *File) Close() error { return t.f.Close() }
