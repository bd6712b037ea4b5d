package backend

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"
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
