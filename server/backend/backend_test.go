package backend

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/looptest"
)

func sparseFile(t *testing.T, size int64) (*File, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	b, err := Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b, path
}

func TestOpenRefusesOtherFileTypes(t *testing.T) {
	for _, path := range []string{t.TempDir(), "/dev/null", filepath.Join(t.TempDir(), "missing")} {
		if b, err := Open(path, true); err == nil {
			b.Close()
			t.Errorf("Open(%s) succeeded", path)
		}
	}
}

func TestReadWriteZeroTrimExtents(t *testing.T) {
	const size = 1 << 20
	b, path := sparseFile(t, size)
	if b.Size() != size || b.IsDevice() || !b.Sparse() {
		t.Fatalf("size %d device %v sparse %v", b.Size(), b.IsDevice(), b.Sparse())
	}
	data := bytes.Repeat([]byte{0xab}, 128<<10)
	if err := b.WriteAt(data, 64<<10, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if err := b.ReadAt(got, 64<<10); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}
	probe, _ := b.Extents(0, size, 10)
	if len(probe) < 2 {
		t.Skip("the file system under t.TempDir() does not report holes")
	}
	want := []Extent{{64 << 10, true, true}, {128 << 10, false, false}, {size - 192<<10, true, true}}
	if diff := cmp.Diff(want, probe); diff != "" {
		t.Errorf("extents (-want +got):\n%s", diff)
	}
	if got, _ := b.Extents(0, size, 1); len(got) != 1 {
		t.Errorf("max 1 returned %d extents", len(got))
	}

	// Zero with trim allowed punches a hole; without, it keeps the blocks
	// allocated; both read back as zeroes.
	if err := b.Zero(64<<10, 64<<10, true, false); err != nil {
		t.Fatal(err)
	}
	if err := b.Zero(128<<10, 32<<10, false, true); err != nil && !errors.Is(err, ErrNotFast) {
		t.Fatal(err)
	}
	if err := b.ReadAt(got[:96<<10], 64<<10); err != nil || !bytes.Equal(got[:96<<10], make([]byte, 96<<10)) {
		t.Fatalf("zeroed range does not read as zeroes: %v", err)
	}
	ext, _ := b.Extents(64<<10, 64<<10, 10)
	if diff := cmp.Diff([]Extent{{64 << 10, true, true}}, ext); diff != "" {
		t.Errorf("zero with trim (-want +got):\n%s", diff)
	}
	if err := b.Trim(160<<10, 32<<10); err != nil {
		t.Fatal(err)
	}
	ext, _ = b.Extents(0, size, 10)
	for _, e := range ext {
		if !e.Hole && e.Length != 32<<10 {
			t.Errorf("after trim, data extent of %d bytes; want only the ZERO_RANGE'd 32 KiB (%+v)", e.Length, ext)
		}
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := b.Cache(0, size); err != nil {
		t.Fatal(err)
	}

	// Growing the file shows after Refresh.
	if err := os.Truncate(path, 2*size); err != nil {
		t.Fatal(err)
	}
	if n, err := b.Refresh(); err != nil || n != 2*size || b.Size() != 2*size {
		t.Fatalf("refresh: %d %v", n, err)
	}
	// Reading past a file that shrank under us is an error, not zeroes.
	if err := os.Truncate(path, size/2); err != nil {
		t.Fatal(err)
	}
	if err := b.ReadAt(got[:10], size); err == nil {
		t.Error("read past the end of a shrunk file succeeded")
	}
}

func TestReadOnly(t *testing.T) {
	_, path := sparseFile(t, 4096)
	b, err := Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.WriteAt([]byte{1}, 0, false); !errors.Is(err, unix.EBADF) {
		t.Errorf("write to read-only backend: %v, want EBADF", err)
	}
}

// ReadAtNoWait and WriteAtNoWait do the I/O where it needs no waiting, and
// otherwise fail with ErrWouldBlock having done nothing: on tmpfs always
// (memory), on a disk file for cached reads where the kernel supports
// RWF_NOWAIT; never while another buffered write to the file is under way.
func TestNoWait(t *testing.T) {
	var fs unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &fs); err != nil || fs.Type != unix.TMPFS_MAGIC {
		t.Fatalf("/dev/shm is not a tmpfs (statfs: %v): this test needs one", err)
	}
	for _, dir := range []string{"/dev/shm", t.TempDir()} {
		t.Run(dir, func(t *testing.T) {
			d, err := os.MkdirTemp(dir, "lvnbd-test-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(d) })
			path := filepath.Join(d, "disk.img")
			if err := os.WriteFile(path, bytes.Repeat([]byte{1}, 1<<20), 0o644); err != nil {
				t.Fatal(err)
			}
			b, err := Open(path, false)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			memory := dir == "/dev/shm"
			if b.inMemory != memory {
				t.Fatalf("inMemory %v for a file in %s", b.inMemory, dir)
			}

			// Just written: in the page cache.
			p := make([]byte, 4096)
			if err := b.ReadAtNoWait(p, 8192); err != nil && (memory || !errors.Is(err, ErrWouldBlock)) {
				t.Fatalf("ReadAtNoWait: %v", err)
			} else if err == nil && !bytes.Equal(p, bytes.Repeat([]byte{1}, 4096)) {
				t.Fatal("ReadAtNoWait returned other bytes")
			}
			if err := b.ReadAtNoWait(p, 1<<20-100); err == nil || (!memory && !errors.Is(err, ErrWouldBlock)) {
				t.Fatalf("ReadAtNoWait across the end: %v, want an error (ErrWouldBlock where ReadAt would tell)", err)
			}

			two := bytes.Repeat([]byte{2}, 4096)
			err = b.WriteAtNoWait(two, 4096)
			if memory && err != nil {
				t.Fatalf("WriteAtNoWait on tmpfs: %v", err)
			}
			if err != nil && !errors.Is(err, ErrWouldBlock) {
				t.Fatalf("WriteAtNoWait: %v", err)
			}
			if err == nil {
				if err := b.ReadAt(p, 4096); err != nil || !bytes.Equal(p, two) {
					t.Fatalf("after WriteAtNoWait: %v, bytes equal %v", err, bytes.Equal(p, two))
				}
			}

			// Another buffered write holds the file: nothing is written.
			b.writeMu.Lock()
			err = b.WriteAtNoWait(bytes.Repeat([]byte{3}, 4096), 0)
			b.writeMu.Unlock()
			if !errors.Is(err, ErrWouldBlock) {
				t.Fatalf("WriteAtNoWait during another write: %v, want ErrWouldBlock", err)
			}
			if err := b.ReadAt(p, 0); err != nil || p[0] != 1 {
				t.Fatalf("WriteAtNoWait wrote during another write (%v, first byte %d)", err, p[0])
			}
		})
	}
}

// loopDevice attaches a loop device over a sparse file of size bytes and
// opens it; it returns the backend and the file. It needs root and the loop
// driver: without them it skips, or fails under LVNBD_REQUIRE_LOOP=1 (make
// test sets it).
func loopDevice(t *testing.T, size int64) (*File, string) {
	t.Helper()
	dev, path := looptest.Attach(t, size, 0)
	b, err := Open(dev, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	if !b.IsDevice() || b.blockSize != 512 {
		t.Fatalf("%s: device %v, logical block size %d; want a device of 512-byte blocks", dev, b.IsDevice(), b.blockSize)
	}
	return b, path
}

// allocatedBytes is how much of path's file system space holds data.
func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// WRITE_ZEROES on a block device: any range, aligned or not, reads back as
// zeroes with the bytes around it untouched; with NO_HOLE (mayTrim false)
// nothing is deallocated; a zero length does nothing.
func TestZeroOnADevice(t *testing.T) {
	const size = 4 << 20
	for _, tc := range []struct {
		name        string
		off, length int64
		mayTrim     bool
	}{
		{"inside one block", 1000, 20, false},
		{"across two blocks", 1000, 100, false},
		{"ragged both ends", 1000, 300 << 10, false},
		{"ragged both ends, may trim", 1000, 300 << 10, true},
		{"aligned, no hole", 64 << 10, 1 << 20, false},
		{"aligned, may trim", 64 << 10, 1 << 20, true},
		{"empty", 4096, 0, false},
		{"to the end", size - 1000, 1000, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, backing := loopDevice(t, size)
			full := bytes.Repeat([]byte{0xff}, size)
			if err := b.WriteAt(full, 0, true); err != nil {
				t.Fatal(err)
			}
			before := allocatedBytes(t, backing)
			if err := b.Zero(tc.off, tc.length, tc.mayTrim, false); err != nil {
				t.Fatalf("Zero(%d, %d, mayTrim %v): %v", tc.off, tc.length, tc.mayTrim, err)
			}
			if err := b.Flush(); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, size)
			if err := b.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			want := bytes.Clone(full)
			clear(want[tc.off : tc.off+tc.length])
			if i := firstDiff(got, want); i >= 0 {
				t.Fatalf("byte %d is %#x, want %#x", i, got[i], want[i])
			}
			if after := allocatedBytes(t, backing); !tc.mayTrim && after < before {
				t.Errorf("with NO_HOLE the device deallocated %d bytes", before-after)
			}
		})
	}
}

// FAST_ZERO with NO_HOLE on a device cannot be promised (only unmapping is
// sure to be fast): refused, with the range untouched.
func TestFastZeroNoHoleOnADevice(t *testing.T) {
	b, _ := loopDevice(t, 1<<20)
	full := bytes.Repeat([]byte{0xff}, 1<<20)
	if err := b.WriteAt(full, 0, true); err != nil {
		t.Fatal(err)
	}
	if err := b.Zero(1000, 300<<10, false, true); !errors.Is(err, ErrNotFast) {
		t.Fatalf("fast Zero with NO_HOLE = %v, want ErrNotFast", err)
	}
	got := make([]byte, 1<<20)
	if err := b.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, full); i >= 0 {
		t.Fatalf("the refused zeroing changed byte %d", i)
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}
