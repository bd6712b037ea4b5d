package file

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// copyChunk bounds one copy_file_range call, so that a cancelled context
// stops a long copy soon.
const copyChunk = 64 << 20

// copySparse makes dst a copy of src that allocates only what src does: it
// finds src's data regions with SEEK_DATA/SEEK_HOLE and copies just those,
// so the holes stay holes.
func copySparse(ctx context.Context, dst, src *os.File) error {
	st, err := src.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	// Truncating to 0 first drops anything a failed attempt left behind.
	if err := dst.Truncate(0); err != nil {
		return err
	}
	if err := dst.Truncate(size); err != nil {
		return err
	}
	fd := int(src.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // only a hole is left
		}
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			// No SEEK_DATA on this filesystem: everything is data.
			return copyRange(ctx, dst, src, off, size-off)
		}
		if err != nil {
			return fmt.Errorf("finding data in %s: %w", src.Name(), err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("finding holes in %s: %w", src.Name(), err)
		}
		hole = min(hole, size)
		if err := copyRange(ctx, dst, src, data, hole-data); err != nil {
			return err
		}
		off = hole
	}
	return nil
}

// copyRange copies n bytes at off from src to the same offset in dst, in
// the kernel with copy_file_range where it can.
func copyRange(ctx context.Context, dst, src *os.File, off, n int64) error {
	roff, woff := off, off
	for n > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		c, err := unix.CopyFileRange(int(src.Fd()), &roff, int(dst.Fd()), &woff, int(min(n, copyChunk)), 0)
		switch {
		case err == nil && c == 0:
			return fmt.Errorf("copying %s: %w (did the file shrink?)", src.Name(), io.ErrUnexpectedEOF)
		case err == nil:
			n -= int64(c)
		case errors.Is(err, unix.EINTR):
		case errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EXDEV), errors.Is(err, unix.EINVAL), errors.Is(err, unix.EOPNOTSUPP):
			return copyRangeRW(ctx, dst, src, roff, n)
		default:
			return fmt.Errorf("copying %s: %w", src.Name(), err)
		}
	}
	return nil
}

// copyRangeRW is copyRange with pread and pwrite.
func copyRangeRW(ctx context.Context, dst, src *os.File, off, n int64) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		b := buf[:min(n, int64(len(buf)))]
		if _, err := src.ReadAt(b, off); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("copying %s: %w", src.Name(), err)
		}
		if _, err := dst.WriteAt(b, off); err != nil {
			return fmt.Errorf("copying to %s: %w", dst.Name(), err)
		}
		off += int64(len(b))
		n -= int64(len(b))
	}
	return nil
}
