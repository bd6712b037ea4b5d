// Package backend does the I/O behind an export: positional reads and writes,
// durable writes, flush, discard, zeroing and allocation maps, on a regular
// file or a block device, with the Linux system calls that make each cheap.
package backend

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/rwf"
)

// ErrNotFast is returned by Zero when asked to be fast and it cannot zero the
// range any faster than writing zeroes would (NBD_CMD_FLAG_FAST_ZERO).
var ErrNotFast = errors.New("zeroing this range is not faster than writing")

// ErrWouldBlock is returned by ReadAtNoWait and WriteAtNoWait when the I/O
// would have waited: for a disk, for dirty pages to be written back, or for
// another write to the same file. Nothing was read or written; ReadAt or
// WriteAt will do it.
var ErrWouldBlock = errors.New("the I/O would wait")

// Extent is a run of the export with one allocation state.
type Extent struct {
	Length int64
	Hole   bool // not allocated: reads as zeroes and holds no space
	Zero   bool // reads as zeroes
}

// File is an export's storage: a regular file or a block device, opened once
// and shared by every connection to the export. Sharing one descriptor is what
// makes a flush on any connection cover writes made on all of them.
type File struct {
	f         *os.File
	fd        int
	path      string
	device    bool
	rdev      uint64 // a device's number
	readOnly  bool
	size      atomic.Int64
	dsync     bool         // the kernel takes RWF_DSYNC, as asked at Open (see rwf.Supported)
	syncs     *syncTracker // every fdatasync, RWF_DSYNC write and writeBack, and their first failure
	blockSize int64        // a device's logical block size: fallocate's unit

	// writeDSync writes with RWF_DSYNC. Tests replace it, to fail as a
	// write does whose sync met an earlier failed write-back.
	writeDSync func(p []byte, off int64) error

	// zeroOffload: the device zeroes a range without being sent the
	// zeroes (its write_zeroes_max_bytes was above 0 at Open), and has
	// not refused to since.
	zeroOffload atomic.Bool

	// inMemory: the file is on tmpfs or ramfs, whose reads and writes
	// never wait for a disk (but for swap, which the server cannot tell).
	// Elsewhere RWF_NOWAIT tells, where the kernel offers it; noWaitRead
	// and noWaitWrite record that it refused.
	inMemory                bool
	noWaitRead, noWaitWrite atomic.Bool

	// writeMu serializes buffered writes to a regular file. The kernel
	// does already (ext4, xfs and tmpfs hold the inode lock exclusively
	// for a buffered write), but there the waiters spin on the lock's
	// owner: measured, 20% of the server's CPU in rwsem_spin_on_owner in
	// a sequential write with 4 connections, CPU the client needed. Here
	// a waiting worker parks instead. Durable (FUA) writes stay
	// concurrent, as their sync runs after the kernel drops its lock, and
	// block devices take no such lock.
	writeMu sync.Mutex
}

// Open opens path, a regular file or a block device, for an export.
func Open(path string, readOnly bool) (*File, error) {
	flags := os.O_RDWR
	if readOnly {
		flags = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening export backing %s: %w", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat %s: %w", path, err)
	}
	b := &File{f: f, fd: int(f.Fd()), path: path, readOnly: readOnly, syncs: newSyncTracker(path)}
	b.writeDSync = func(p []byte, off int64) error { return b.pwritev2(p, off, unix.RWF_DSYNC) }
	switch {
	case st.Mode().IsRegular():
	case st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0:
		b.device = true
		bs, err := unix.IoctlGetInt(b.fd, unix.BLKSSZGET)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("BLKSSZGET on %s: %w", path, err)
		}
		b.blockSize = int64(bs)
		var dst unix.Stat_t
		if err := unix.Fstat(b.fd, &dst); err != nil {
			f.Close()
			return nil, fmt.Errorf("fstat %s: %w", path, err)
		}
		// Unknown (no sysfs) counts as none: a fast zeroing is then
		// refused, which the client can always cope with.
		b.rdev = dst.Rdev
		n, err := writeZeroesMaxBytes("/sys", dst.Rdev)
		b.zeroOffload.Store(err == nil && n > 0)
	default:
		f.Close()
		return nil, fmt.Errorf("%s is neither a regular file nor a block device (mode %v)", path, st.Mode())
	}
	if _, err := b.Refresh(); err != nil {
		f.Close()
		return nil, err
	}
	b.dsync = rwf.Supported(b.fd, b.Size(), unix.RWF_DSYNC)
	var fs unix.Statfs_t
	if !b.device && unix.Fstatfs(b.fd, &fs) == nil {
		b.inMemory = fs.Type == unix.TMPFS_MAGIC || fs.Type == unix.RAMFS_MAGIC
	}
	return b, nil
}

// writeZeroesMaxBytes reads, from sysfs mounted at sys, the largest range
// the block device rdev zeroes without being sent the zeroes: 0 when it
// cannot (LVs on SATA disks, where libata turns WRITE SAME off, and thin
// LVs). A partition has its disk's queue.
func writeZeroesMaxBytes(sys string, rdev uint64) (int64, error) {
	dir, err := filepath.EvalSymlinks(filepath.Join(sys, "dev", "block", fmt.Sprintf("%d:%d", unix.Major(rdev), unix.Minor(rdev))))
	if err != nil {
		return 0, err
	}
	if _, err := os.Stat(filepath.Join(dir, "partition")); err == nil {
		dir = filepath.Dir(dir)
	}
	path := filepath.Join(dir, "queue", "write_zeroes_max_bytes")
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return n, nil
}

// Path is the file or device this backend was opened from.
func (b *File) Path() string { return b.path }

// IsDevice reports whether the backend is a block device.
func (b *File) IsDevice() bool { return b.device }

// Dev is the device number of a block device, as in its uevents; false for
// a file.
func (b *File) Dev() (uint64, bool) { return b.rdev, b.device }

// SameFile reports whether path still names the file or device this backend
// has open: the same inode of the same filesystem for a file, the same
// device number for a block device (whose node may be made anew, as udev
// does for an LV). False means the file was replaced or the name now leads
// elsewhere, and writes here no longer reach what path names.
func (b *File) SameFile(path string) (bool, error) {
	var open, named unix.Stat_t
	if err := unix.Fstat(b.fd, &open); err != nil {
		return false, fmt.Errorf("fstat %s: %w", b.path, err)
	}
	if err := unix.Stat(path, &named); err != nil {
		return false, fmt.Errorf("stat %s: %w", path, err)
	}
	if b.device {
		return named.Mode&unix.S_IFMT == unix.S_IFBLK && named.Rdev == open.Rdev, nil
	}
	return named.Mode&unix.S_IFMT == unix.S_IFREG && named.Dev == open.Dev && named.Ino == open.Ino, nil
}

// ReadOnly reports whether the backend was opened read-only.
func (b *File) ReadOnly() bool { return b.readOnly }

// Size is the export size as of the last Refresh.
func (b *File) Size() int64 { return b.size.Load() }

// Refresh re-reads the size of the file or device (after an LV or file grew)
// and returns it.
func (b *File) Refresh() (int64, error) {
	// Through the *os.File, not the raw descriptor: a handshake may hold
	// an export that was withdrawn and closed meanwhile, whose number may
	// be another file's by now. The *os.File fails cleanly once closed.
	rc, err := b.f.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("re-reading the size of %s: %w", b.path, err)
	}
	var size int64
	var opErr error
	err = rc.Control(func(fd uintptr) { size, opErr = b.sizeOf(int(fd)) })
	if err != nil {
		return 0, fmt.Errorf("re-reading the size of %s: %w", b.path, err)
	}
	if opErr != nil {
		return 0, opErr
	}
	b.size.Store(size)
	return size, nil
}

// sizeOf reads the size of the file or device open as fd, now.
func (b *File) sizeOf(fd int) (int64, error) {
	if b.device {
		var s uint64
		if err := ioctlPtr(fd, unix.BLKGETSIZE64, unsafe.Pointer(&s)); err != nil {
			return 0, fmt.Errorf("BLKGETSIZE64 on %s: %w", b.path, err)
		}
		return int64(s), nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, fmt.Errorf("fstat %s: %w", b.path, err)
	}
	return st.Size, nil
}

// checkEnd fails a request on [off, off+length) with ENOSPC, as the NBD
// spec asks of a request past the end, if the file or device now ends
// before off+length: it shrank behind the server, whose size (Size) is
// that of the last Refresh until a rescan or handshake sees it. Where the
// kernel itself does not tell, the request would be acknowledged for
// blocks that do not exist: a zeroing with FALLOC_FL_KEEP_SIZE stops at a
// device's end, or past a file's, and succeeds.
func (b *File) checkEnd(op string, off, length int64) error {
	size, err := b.sizeOf(b.fd)
	if err != nil {
		return err
	}
	if off+length > size {
		return fmt.Errorf("%s %s [%d, +%d): it ends at %d now, shrunk behind the server: %w", op, b.path, off, length, size, unix.ENOSPC)
	}
	return nil
}

// ReadAt fills p from offset off.
func (b *File) ReadAt(p []byte, off int64) error {
	if err := b.syncs.check(); err != nil {
		return err
	}
	for len(p) > 0 {
		n, err := unix.Pread(b.fd, p, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("pread %s at %d: %w", b.path, off, err)
		}
		if n == 0 {
			// Past the end of a file that shrank under us: the spec wants
			// an error, not zeroes the client would take for data.
			return fmt.Errorf("pread %s at %d: %w", b.path, off, unix.EIO)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// ReadAtNoWait fills p from off if it can without waiting for a disk: the data
// is in the page cache (RWF_NOWAIT), or the file is in memory. Otherwise it
// fails with ErrWouldBlock, as it does where the kernel cannot tell (or, in
// memory, with ReadAt's error), and the caller reads with ReadAt, which
// reports real errors.
func (b *File) ReadAtNoWait(p []byte, off int64) error {
	if b.syncs.failed.Load() {
		return ErrWouldBlock // ReadAt fails it
	}
	if b.inMemory {
		return b.ReadAt(p, off)
	}
	if b.noWaitRead.Load() {
		return ErrWouldBlock
	}
	n, err := unix.Preadv2(b.fd, [][]byte{p}, off, unix.RWF_NOWAIT)
	if noWaitRefused(err) {
		b.noWaitRead.Store(true)
	}
	if err != nil || n != len(p) {
		return ErrWouldBlock // partly cached, or past the end: ReadAt tells which
	}
	return nil
}

// WriteAtNoWait writes p at off (not durably) if it can without waiting: no
// other buffered write to the file holds writeMu, and the kernel takes the
// write without waiting for a disk or for writeback (RWF_NOWAIT), or the file
// is in memory. Otherwise it fails with ErrWouldBlock having written nothing,
// and the caller writes with WriteAt. A write the kernel takes only in part
// is finished by waiting: the rest must land before the write is answered.
func (b *File) WriteAtNoWait(p []byte, off int64) error {
	if b.syncs.failed.Load() {
		return ErrWouldBlock // WriteAt fails it
	}
	if !b.device {
		if !b.writeMu.TryLock() {
			return ErrWouldBlock
		}
		defer b.writeMu.Unlock()
	}
	if b.inMemory {
		return b.pwritev2(p, off, 0)
	}
	if b.noWaitWrite.Load() {
		return ErrWouldBlock
	}
	n, err := unix.Pwritev2(b.fd, [][]byte{p}, off, unix.RWF_NOWAIT)
	if noWaitRefused(err) {
		b.noWaitWrite.Store(true)
	}
	if err != nil || n <= 0 {
		return ErrWouldBlock
	}
	return b.pwritev2(p[n:], off+int64(n), 0)
}

// noWaitRefused reports whether the kernel refused RWF_NOWAIT itself, not
// the one I/O: a file system without it answers EOPNOTSUPP, buffered writes
// where it is not supported EINVAL, an old kernel ENOSYS.
func noWaitRefused(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS)
}

// SpliceRead moves [off, off+n) into the pipe whose write end is w, by
// reference to page-cache pages where the kernel can, so a reply can be sent
// without copying its data. The pipe must have room for n bytes.
func (b *File) SpliceRead(w int, off int64, n int) error {
	if err := b.syncs.check(); err != nil {
		return err
	}
	for n > 0 {
		k, err := unix.Splice(b.fd, &off, w, nil, n, unix.SPLICE_F_MOVE)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("splice from %s at %d: %w", b.path, off, err)
		}
		if k == 0 {
			// Past the end of a file that shrank: an error, as in ReadAt.
			return fmt.Errorf("splice from %s at %d: %w", b.path, off, unix.EIO)
		}
		n -= int(k) // the kernel advanced off
	}
	return nil
}

// SpliceWrite writes n bytes from the pipe whose read end is r at off, and
// returns how many it wrote. Not durable: a FUA write goes through WriteAt.
func (b *File) SpliceWrite(r int, off int64, n int) (int, error) {
	if err := b.syncs.check(); err != nil {
		return 0, err
	}
	if !b.device {
		b.writeMu.Lock() // see writeMu
		defer b.writeMu.Unlock()
	}
	done := 0
	for done < n {
		k, err := unix.Splice(r, nil, b.fd, &off, n-done, unix.SPLICE_F_MOVE)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("splice to %s at %d: %w", b.path, off, err)
		}
		if k == 0 {
			return done, fmt.Errorf("splice to %s at %d: pipe empty with %d bytes to go: %w", b.path, off, n-done, unix.EIO)
		}
		done += int(k) // the kernel advanced off
	}
	return done, nil
}

// WriteAt writes p at offset off; with fua the data is on stable storage when
// it returns.
func (b *File) WriteAt(p []byte, off int64, fua bool) error {
	if err := b.syncs.check(); err != nil {
		return err
	}
	if fua && b.dsync {
		// The kernel syncs the range before returning, and a failed
		// write-back of any page of the file fails it: it is a sync,
		// and whatever it fails with is the export's failure. EOPNOTSUPP
		// too: that the kernel takes the flag was settled at Open, and
		// a failed write-back carries the device's errno (ext4, xfs and
		// fuse keep it; BLK_STS_NOTSUPP is EOPNOTSUPP). Writing again
		// another way would have the next sync succeed, the failure
		// already reported, and the lost data acknowledged.
		//
		// A device's end is checked first: a write past it fails
		// with ENOSPC before anything is synced, which is not a
		// failed write-back of the export.
		if b.device {
			if err := b.checkEnd("writing", off, int64(len(p))); err != nil {
				return err
			}
		}
		return b.syncs.run(func() error { return b.writeDSync(p, off) })
	}
	if !fua && !b.device {
		b.writeMu.Lock()
		defer b.writeMu.Unlock()
	}
	if err := b.pwritev2(p, off, 0); err != nil {
		return err
	}
	if fua {
		return b.Flush()
	}
	return nil
}

func (b *File) pwritev2(p []byte, off int64, flags int) error {
	for len(p) > 0 {
		var n int
		var err error
		if flags == 0 {
			n, err = unix.Pwrite(b.fd, p, off)
		} else {
			n, err = unix.Pwritev2(b.fd, [][]byte{p}, off, flags)
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("pwrite %s at %d: %w", b.path, off, err)
		}
		if n == 0 {
			// Not seen from Linux; written again, it would loop.
			return fmt.Errorf("pwrite %s at %d: wrote nothing: %w", b.path, off, unix.EIO)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// Failed returns the WriteBackError every request to this backend fails
// with, or nil while it works.
func (b *File) Failed() error { return b.syncs.check() }

// OnFailure sets a function told of a failed flush or durable write before
// the request that met it is answered, and before any later flush can
// succeed; it may be told more than once if syncs fail together. Set it
// before the first I/O.
func (b *File) OnFailure(f func(error)) { b.syncs.setOnFail(f) }

// MarkFailed makes the backend fail every request as if a write-back had
// failed with err: one that failed before the server restarted.
func (b *File) MarkFailed(err error) { b.syncs.fail(err) }

// Flush makes every write completed so far, through any connection, durable.
//
// Once a flush or durable write failed, every later one fails too, and so
// does every read, write, trim and zeroing (see WriteBackError and
// syncTracker).
func (b *File) Flush() error {
	return b.syncs.run(func() error {
		interrupted := false
		for tries := 1; ; tries++ {
			err := fdatasync(b.fd)
			if err == unix.EINTR && tries < maxSyncTries {
				// A network file system may return it (local ones
				// restart the call themselves). Failing the export
				// for it would keep it failed until lvnbd recover.
				interrupted = true
				continue
			}
			if err != nil {
				return fmt.Errorf("fdatasync %s: %w", b.path, err)
			}
			break
		}
		if interrupted {
			// An interrupted fdatasync may have taken the file's
			// write-back error with it: file_write_and_wait_range
			// reports the interruption and drops the error it
			// consumed. The file system keeps its own record, which
			// fdatasync does not consume: syncfs reports it (Linux
			// 5.8 on), another file's error too, which fails the
			// export in the safe direction.
			if err := syncfs(b.fd); err != nil {
				return fmt.Errorf("syncfs %s after an interrupted fdatasync: %w", b.path, err)
			}
		}
		return nil
	})
}

// maxSyncTries bounds the fdatasync calls of one flush that a signal
// interrupts: a file system that keeps returning EINTR fails the flush.
const maxSyncTries = 3

// syncfs is unix.Syncfs; tests replace it.
var syncfs = unix.Syncfs

// fdatasync is unix.Fdatasync; tests interrupt it.
var fdatasync = unix.Fdatasync

// Trim discards a range: a hole in a file, BLKDISCARD on a device. Discard is
// advisory, so a backend that cannot discard reports success.
func (b *File) Trim(off, length int64) error {
	if err := b.syncs.check(); err != nil {
		return err
	}
	var err error
	if b.device {
		// BLKDISCARD drops the range's cached pages, dirty ones too, and
		// the device may then fail or refuse the discard: the range may
		// read as older data. Unlike a zeroing (see zeroDevice), that
		// is allowed: after a TRIM the client may assume nothing of the
		// range until it writes it again (NBD spec), so nothing is
		// written back first, which would write what is being thrown
		// away. Nothing outside the range is touched: BLKDISCARD
		// refuses a range not on the device's logical blocks, so its
		// ragged ends are left as they are, as the spec allows (the
		// start rounded up, the end down).
		start := (off + b.blockSize - 1) / b.blockSize * b.blockSize
		end := (off + length) / b.blockSize * b.blockSize
		if start >= end {
			return nil
		}
		r := [2]uint64{uint64(start), uint64(end - start)}
		err = ioctlRange(b.fd, unix.BLKDISCARD, &r)
	} else {
		err = unix.Fallocate(b.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	}
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("discarding %s [%d, +%d): %w", b.path, off, length, err)
	}
	return nil
}

// pageSize is the unit of the page cache.
var pageSize = int64(os.Getpagesize())

// Zero makes a range read as zeroes. mayTrim allows deallocating it;
// fast refuses with ErrNotFast instead of falling back to writing zeroes,
// and leaves the range as it was.
func (b *File) Zero(off, length int64, mayTrim, fast bool) error {
	if err := b.syncs.check(); err != nil {
		return err
	}
	if length == 0 {
		return nil // fallocate would answer EINVAL
	}
	if err := b.zero(off, length, mayTrim, fast); err != nil {
		return err
	}
	// After, not before: a shrink meanwhile is caught too.
	return b.checkEnd("zeroing", off, length)
}

// zero is Zero of a range of non-zero length, without the check of the end.
func (b *File) zero(off, length int64, mayTrim, fast bool) error {
	if !b.device {
		return b.zeroFile(off, length, mayTrim, fast)
	}
	// A block device takes fallocate and BLKZEROOUT in whole logical
	// blocks only, and the server advertises a minimum block size of 1.
	// Both drop the range's page cache first and zero the part of a page
	// in the range in the cache only, which a refusal would leave behind:
	// so the device is given whole pages. The ragged ends are written,
	// after the middle, so that a refusal (ErrNotFast) leaves the range
	// untouched.
	unit := max(b.blockSize, pageSize) // powers of 2: a multiple of both
	start, end := (off+unit-1)/unit*unit, (off+length)/unit*unit
	if start >= end {
		return b.writeZeroes(off, length) // less than one whole page
	}
	if err := b.zeroDevice(start, end-start, mayTrim, fast); err != nil {
		return err
	}
	if err := b.writeZeroes(off, start-off); err != nil {
		return err
	}
	return b.writeZeroes(end, off+length-end)
}

// zeroFile is Zero of a regular file. Both fallocate modes are metadata
// operations there, and a file system refuses a mode it lacks before it
// changes anything.
func (b *File) zeroFile(off, length int64, mayTrim, fast bool) error {
	if mayTrim {
		err := unix.Fallocate(b.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		if err == nil {
			return nil
		}
		if !notSupported(err) {
			return fmt.Errorf("punching %s [%d, +%d): %w", b.path, off, length, err)
		}
	}
	err := unix.Fallocate(b.fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if err == nil {
		return nil
	}
	if !notSupported(err) {
		return fmt.Errorf("zeroing %s [%d, +%d): %w", b.path, off, length, err)
	}
	if fast {
		return ErrNotFast
	}
	return b.writeZeroes(off, length)
}

// zeroDevice is Zero of whole pages of a block device.
//
// Every fallocate and BLKZEROOUT of a device first drops the range's
// cached pages, dirty ones too, and only then zeroes, which can still fail
// or be refused (blkdev_fallocate and blk_ioctl_zeroout call
// truncate_bdev_range first). Dropped unwritten pages would be acknowledged
// writes lost, so the range is written back before any of them: then a
// call that fails has dropped only pages the device holds too.
func (b *File) zeroDevice(off, length int64, mayTrim, fast bool) error {
	// PUNCH_HOLE is the kernel's zero-out without fallback: fast, but it
	// may unmap (thin LVs and SSDs give the space back), and only a
	// device that offloads zeroing takes it. ZERO_RANGE keeps the blocks
	// mapped (NOUNMAP) and writes zeroes when it must. So with NO_HOLE,
	// or on a device without the offload, a fast zeroing cannot be
	// promised, and is refused before the kernel is asked anything.
	punch := mayTrim && b.zeroOffload.Load()
	if fast && !punch {
		return ErrNotFast
	}
	if err := b.writeBack(off, length); err != nil {
		return err
	}
	if punch {
		err := unix.Fallocate(b.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		if err == nil {
			return nil
		}
		if !notSupported(err) {
			return fmt.Errorf("punching %s [%d, +%d): %w", b.path, off, length, err)
		}
		// Some devices (SCSI WRITE SAME) tell that they cannot only
		// by failing, and some change (a device-mapper table reload).
		b.zeroOffload.Store(false)
		if fast {
			b.dropCache(off, length)
			return ErrNotFast
		}
	}
	err := unix.Fallocate(b.fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if err == nil {
		return nil
	}
	if !notSupported(err) {
		return fmt.Errorf("zeroing %s [%d, +%d): %w", b.path, off, length, err)
	}
	r := [2]uint64{uint64(off), uint64(length)}
	if err := ioctlRange(b.fd, unix.BLKZEROOUT, &r); err == nil {
		return nil
	}
	return b.writeZeroes(off, length)
}

// writeBack writes a device's dirty cached pages of [off, off+length) and
// waits for them, without flushing the device's cache: they need to be on
// the device, not durable. Its wait reports a failed write-back of any page
// of the device, as fdatasync does, and uses the report up (errseq), so it
// runs as a sync, and a failure of it is the export's.
func (b *File) writeBack(off, length int64) error {
	return b.syncs.run(func() error {
		err := unix.SyncFileRange(b.fd, off, length,
			unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER)
		if err != nil {
			return fmt.Errorf("sync_file_range %s [%d, +%d): %w", b.path, off, length, err)
		}
		return nil
	})
}

// dropCache drops a device's clean cached pages around a range a refused
// zero-out dropped, so that they are read again from the device. The range
// is whole pages, but a large folio across one of its ends is not dropped:
// the kernel zeroes its part in the range, in the cache only. Page-cache
// folios are at most a PMD (pageSize/8 page table entries of pageSize)
// and aligned to their size, so the range is widened to that. Dropping
// clean pages loses nothing; dirty ones are kept, and only started on
// their way to the device.
func (b *File) dropCache(off, length int64) {
	pmd := pageSize * (pageSize / 8)
	start, end := off/pmd*pmd, (off+length+pmd-1)/pmd*pmd
	unix.Fadvise(b.fd, start, end-start, unix.FADV_DONTNEED) // advice: nothing to do if refused
}

func notSupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.ENODEV)
}

// zeroChunk is shared read-only by every fallback zero write.
var zeroChunk = make([]byte, 1<<20)

func (b *File) writeZeroes(off, length int64) error {
	for length > 0 {
		n := min(length, int64(len(zeroChunk)))
		if err := b.pwritev2(zeroChunk[:n], off, 0); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

// Cache asks the kernel to read a range ahead of use (NBD_CMD_CACHE).
func (b *File) Cache(off, length int64) error {
	if err := b.syncs.check(); err != nil {
		return err
	}
	if err := unix.Fadvise(b.fd, off, length, unix.FADV_WILLNEED); err != nil {
		return fmt.Errorf("fadvise %s: %w", b.path, err)
	}
	return nil
}

// Sparse reports whether Extents can tell holes from data.
func (b *File) Sparse() bool { return !b.device }

// Extents describes the allocation of [off, off+length), at most max runs;
// the last run may end before off+length when max is reached.
func (b *File) Extents(off, length int64, max int) ([]Extent, error) {
	// After a failed write-back every request fails (see syncTracker):
	// a map of what may be gone from the disk is no better than a read.
	if err := b.syncs.check(); err != nil {
		return nil, err
	}
	end := off + length
	if b.device {
		return []Extent{{Length: length}}, nil
	}
	// SEEK_DATA's ENXIO says no data after off, and also that off is
	// past the end of the file: the file's end now is needed to tell.
	size, err := b.sizeOf(b.fd)
	if err != nil {
		return nil, err
	}
	var out []Extent
	for off < end && len(out) < max {
		if off >= size {
			// Past the end of a file that shrank behind the server:
			// data, not a hole that reads as zeroes, or a backup that
			// skips zeroes would store them where reads fail.
			out = append(out, Extent{Length: end - off})
			break
		}
		data, err := unix.Seek(b.fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			data = min(end, size) // no data after off
		} else if err != nil {
			return nil, fmt.Errorf("SEEK_DATA in %s at %d: %w", b.path, off, err)
		}
		if data > off {
			n := min(data, end) - off
			out = append(out, Extent{Length: n, Hole: true, Zero: true})
			off += n
			continue
		}
		hole, err := unix.Seek(b.fd, off, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("SEEK_HOLE in %s at %d: %w", b.path, off, err)
		}
		n := min(hole, end) - off
		if n <= 0 {
			// The file shrank under us: report the rest as data rather
			// than loop; reads there will fail with an error.
			n = end - off
		}
		out = append(out, Extent{Length: n})
		off += n
	}
	return out, nil
}

// Close closes the file or device.
func (b *File) Close() error { return b.f.Close() }

// ioctlRange issues BLKDISCARD or BLKZEROOUT, which take a pointer to an
// {offset, length} pair.
func ioctlRange(fd int, req uint, r *[2]uint64) error {
	return ioctlPtr(fd, req, unsafe.Pointer(r))
}

// ioctlPtr issues a block-device ioctl that takes a pointer; x/sys/unix has no
// typed wrappers for BLKGETSIZE64, BLKDISCARD or BLKZEROOUT.
func ioctlPtr(fd int, req uint, arg unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(arg))
	if errno != 0 {
		return errno
	}
	return nil
}
