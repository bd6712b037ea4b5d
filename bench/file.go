package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// bufferAlign is the alignment of every I/O buffer: O_DIRECT needs the
// device's logical block size, and 4096 covers every device in use.
const bufferAlign = 4096

// AlignedBuffer returns n bytes starting on a 4096-byte boundary. The Go heap
// does not move objects, so slicing an over-allocation is enough.
func AlignedBuffer(n int) []byte {
	b := make([]byte, n+bufferAlign)
	skip := 0
	if r := int(uintptr(unsafe.Pointer(&b[0])) & (bufferAlign - 1)); r != 0 {
		skip = bufferAlign - r
	}
	return b[skip : skip+n : skip+n]
}

// File is a regular file or block device target.
type File struct {
	f       *os.File
	fd      int
	path    string
	device  bool
	direct  bool
	align   int
	size    int64
	noDSync atomic.Bool
}

// OpenFile opens path as a target: a block device (size from BLKGETSIZE64)
// or a regular file. In write modes a missing file is created with o.Size;
// an existing device or non-empty file is written only with o.Force.
func OpenFile(path string, o OpenOptions) (*File, error) {
	flags := unix.O_RDONLY
	if o.Write {
		flags = unix.O_RDWR
	}
	st, statErr := os.Stat(path)
	create := false
	switch {
	case errors.Is(statErr, os.ErrNotExist):
		if !o.Write {
			return nil, fmt.Errorf("%s does not exist (a read mode never creates it; write it first with --mode write)", path)
		}
		if o.Size <= 0 {
			return nil, fmt.Errorf("%s does not exist: give --size to create it", path)
		}
		create = true
		flags |= unix.O_CREAT | unix.O_EXCL
	case statErr != nil:
		return nil, statErr
	case st.Mode().IsRegular(), st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0:
	default:
		return nil, fmt.Errorf("%s is neither a regular file nor a block device (mode %v)", path, st.Mode())
	}
	if o.Direct {
		flags |= unix.O_DIRECT
	}
	fd, err := unix.Open(path, flags|unix.O_CLOEXEC, 0o644)
	if errors.Is(err, unix.EINVAL) && o.Direct {
		return nil, fmt.Errorf("opening %s with O_DIRECT: %w (its file system does not support direct I/O; use --direct=false)", path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	t := &File{f: os.NewFile(uintptr(fd), path), fd: fd, path: path, direct: o.Direct, align: 1}
	if err := t.setUp(st, create, o); err != nil {
		t.f.Close()
		if create {
			os.Remove(path)
		}
		return nil, err
	}
	return t, nil
}

func (t *File) setUp(st os.FileInfo, create bool, o OpenOptions) error {
	var size int64
	t.device = st != nil && st.Mode()&os.ModeDevice != 0
	if t.device {
		var s uint64
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(t.fd), uintptr(unix.BLKGETSIZE64), uintptr(unsafe.Pointer(&s))); errno != 0 {
			return fmt.Errorf("BLKGETSIZE64 on %s: %w", t.path, errno)
		}
		size = int64(s)
		if o.Direct {
			lbs, err := unix.IoctlGetInt(t.fd, unix.BLKSSZGET)
			if err != nil {
				return fmt.Errorf("BLKSSZGET on %s: %w", t.path, err)
			}
			t.align = lbs
		}
	} else {
		var fst unix.Stat_t
		if err := unix.Fstat(t.fd, &fst); err != nil {
			return fmt.Errorf("fstat %s: %w", t.path, err)
		}
		size = fst.Size
		if o.Direct {
			t.align = 512
		}
	}
	if o.Write && !create && !o.Force && size > 0 {
		kind := "non-empty file"
		if t.device {
			kind = "block device"
		}
		return &OverwriteError{Path: t.path, Kind: kind, Size: size, Range: min(o.Size, size)}
	}
	switch {
	case o.Size == 0 && size == 0:
		return fmt.Errorf("%s is empty: give --size (in a write mode) to use it", t.path)
	case o.Size == 0:
		t.size = size
	case o.Size <= size:
		t.size = o.Size
	case t.device:
		return fmt.Errorf("--size %s is larger than block device %s (%s)", formatIBytes(o.Size), t.path, formatIBytes(size))
	case !o.Write:
		return fmt.Errorf("--size %s is larger than file %s (%s); a read mode never extends it", formatIBytes(o.Size), t.path, formatIBytes(size))
	default:
		if err := unix.Ftruncate(t.fd, o.Size); err != nil {
			return fmt.Errorf("extending %s to %d bytes: %w", t.path, o.Size, err)
		}
		t.size = o.Size
	}
	return nil
}

// Size is the region of the file or device in use.
func (t *File) Size() int64 { return t.size }

// Alignment is the multiple that offsets and lengths must be with O_DIRECT.
func (t *File) Alignment() int { return t.align }

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

// WriteAt writes p at offset off; durable writes use RWF_DSYNC, or fdatasync
// where the kernel lacks it.
func (t *File) WriteAt(_ context.Context, p []byte, off int64, durable bool) error {
	flags := 0
	if durable && !t.noDSync.Load() {
		flags = unix.RWF_DSYNC
	}
	for len(p) > 0 {
		var n int
		var err error
		if flags == 0 {
			n, err = unix.Pwrite(t.fd, p, off)
		} else {
			n, err = unix.Pwritev2(t.fd, [][]byte{p}, off, flags)
			if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
				t.noDSync.Store(true)
				flags = 0
				continue
			}
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("pwrite %s at %d: %w", t.path, off, err)
		}
		p, off = p[n:], off+int64(n)
	}
	if durable && flags == 0 {
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

// Close closes the file or device.
func (t *File) Close() error { return t.f.Close() }
