package backend

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
	return openDevice(t, dev), path
}

// ramfsDevice is loopDevice over a file of zeroes on ramfs, which has no
// fallocate: the device cannot zero without being sent the zeroes
// (write_zeroes_max_bytes 0), like an LV on a SATA disk or a thin LV.
func ramfsDevice(t *testing.T, size int64) (*File, string) {
	t.Helper()
	looptest.Require(t, "mount", "umount")
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "ramfs", "ramfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount -t ramfs ramfs %s: %v: %s", dir, err, out)
	}
	// Registered after t.TempDir's removal and before the device's
	// detach, so it runs between them.
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	path := filepath.Join(dir, "disk.img")
	must(t, os.WriteFile(path, make([]byte, size), 0o600)) // ramfs has no holes
	return openDevice(t, looptest.AttachFile(t, path, 0)), path
}

// openDevice opens a loop device of 512-byte blocks until the test ends.
func openDevice(t *testing.T, dev string) *File {
	t.Helper()
	b, err := Open(dev, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	if !b.IsDevice() || b.blockSize != 512 {
		t.Fatalf("%s: device %v, logical block size %d; want a device of 512-byte blocks", dev, b.IsDevice(), b.blockSize)
	}
	return b
}

// readAll checks that b reads as want, from the page cache, then, flushed
// and evicted, from the device: a kernel that changed the cache alone
// shows in one and not the other.
func readAll(t *testing.T, b *File, want []byte) {
	t.Helper()
	got := make([]byte, len(want))
	must(t, b.ReadAt(got, 0))
	if i := firstDiff(got, want); i >= 0 {
		t.Errorf("from the page cache, byte %d is %#x, want %#x", i, got[i], want[i])
	}
	must(t, b.Flush())
	must(t, unix.Fadvise(b.fd, 0, int64(len(want)), unix.FADV_DONTNEED))
	must(t, b.ReadAt(got, 0))
	if i := firstDiff(got, want); i >= 0 {
		t.Errorf("from the device, byte %d is %#x, want %#x", i, got[i], want[i])
	}
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

// WRITE_ZEROES on a block device, with a write-zeroes offload or without:
// any range, aligned or not, reads back as zeroes, in the page cache as on
// the device, with the bytes around it untouched, acknowledged but
// unflushed ones included; with NO_HOLE (mayTrim false) nothing is
// deallocated; a zero length does nothing. FAST_ZERO succeeds where the
// device offloads zeroing, and is refused elsewhere, with the range
// untouched (TestRefusedFastZeroLeavesTheRange).
func TestZeroOnADevice(t *testing.T) {
	const size = 4 << 20
	for _, dev := range []struct {
		name    string
		open    func(*testing.T, int64) (*File, string)
		offload bool
	}{
		{"offload", loopDevice, true},
		{"no offload", ramfsDevice, false},
	} {
		for _, tc := range []struct {
			name          string
			off, length   int64
			mayTrim, fast bool
		}{
			{"inside one block", 1000, 20, false, false},
			{"across two blocks", 1000, 100, false, false},
			{"inside one page, fast", 1000, 2000, true, true},
			{"ragged both ends", 1000, 300 << 10, false, false},
			{"ragged both ends, may trim", 1000, 300 << 10, true, false},
			{"ragged both ends, fast", 1000, 300 << 10, true, true},
			{"aligned, no hole", 64 << 10, 1 << 20, false, false},
			{"aligned, may trim", 64 << 10, 1 << 20, true, false},
			{"aligned, fast", 64 << 10, 1 << 20, true, true},
			{"empty", 4096, 0, false, false},
			{"to the end", size - 1000, 1000, false, false},
		} {
			t.Run(dev.name+"/"+tc.name, func(t *testing.T) {
				b, backing := dev.open(t, size)
				if b.zeroOffload.Load() != dev.offload {
					t.Fatalf("Open found a write-zeroes offload %v, want %v", b.zeroOffload.Load(), dev.offload)
				}
				want := bytes.Repeat([]byte{0xff}, size)
				must(t, b.WriteAt(want, 0, true))
				// Acknowledged, not flushed, across both ends of the range.
				dirty := bytes.Repeat([]byte{0xee}, 1200)
				for _, end := range []int64{tc.off, tc.off + tc.length} {
					at := min(max(end-600, 0), size-1200)
					must(t, b.WriteAt(dirty, at, false))
					copy(want[at:], dirty)
				}
				before := allocatedBytes(t, backing)
				err := b.Zero(tc.off, tc.length, tc.mayTrim, tc.fast)
				// Less than a page is written, fast or not.
				if tc.fast && !dev.offload && tc.length >= pageSize {
					if !errors.Is(err, ErrNotFast) {
						t.Fatalf("fast Zero(%d, %d) without an offload: %v, want ErrNotFast", tc.off, tc.length, err)
					}
				} else if err != nil {
					t.Fatalf("Zero(%d, %d, mayTrim %v, fast %v): %v", tc.off, tc.length, tc.mayTrim, tc.fast, err)
				} else {
					clear(want[tc.off : tc.off+tc.length])
				}
				readAll(t, b, want)
				if after := allocatedBytes(t, backing); !tc.mayTrim && after < before {
					t.Errorf("with NO_HOLE the device deallocated %d bytes", before-after)
				}
			})
		}
	}
}

// A refused FAST_ZERO leaves the range as it was (the spec: the server
// SHOULD NOT alter the export), in the page cache as on the device, with
// acknowledged writes not yet flushed, which the kernel drops from the
// cache before it zeroes. A device without a write-zeroes offload is
// refused at once; one that claims it and fails (some find out only by
// trying) after the kernel dropped the range's cache, and not tried again.
func TestRefusedFastZeroLeavesTheRange(t *testing.T) {
	const size = 1 << 20
	for _, claims := range []bool{false, true} {
		t.Run(fmt.Sprintf("claims offload %v", claims), func(t *testing.T) {
			b, _ := ramfsDevice(t, size)
			b.zeroOffload.Store(claims)
			want := bytes.Repeat([]byte{'A'}, size)
			must(t, b.WriteAt(want, 0, true)) // on the device and clean in the cache
			dirty := bytes.Repeat([]byte{'B'}, 64<<10)
			must(t, b.WriteAt(dirty, 0, false)) // acknowledged, not flushed
			copy(want, dirty)
			if err := b.Zero(1000, 200<<10, true, true); !errors.Is(err, ErrNotFast) {
				t.Fatalf("fast Zero = %v, want ErrNotFast", err)
			}
			if b.zeroOffload.Load() {
				t.Error("the device refused to zero, and still counts as offloading it")
			}
			readAll(t, b, want)
		})
	}
}

// The write-zeroes offload of a device is read from sysfs, a partition's
// from its disk; unknown is an error.
func TestWriteZeroesMaxBytes(t *testing.T) {
	sys := t.TempDir()
	for path, content := range map[string]string{
		"devices/pci0/block/sda/queue/write_zeroes_max_bytes":     "0\n",
		"devices/pci0/block/sda/sda1/partition":                   "1\n",
		"devices/virtual/block/dm-0/queue/write_zeroes_max_bytes": "4294966784\n",
		"devices/virtual/block/dm-1/queue/write_zeroes_max_bytes": "many\n",
	} {
		must(t, os.MkdirAll(filepath.Join(sys, filepath.Dir(path)), 0o755))
		must(t, os.WriteFile(filepath.Join(sys, path), []byte(content), 0o644))
	}
	must(t, os.MkdirAll(filepath.Join(sys, "dev/block"), 0o755))
	for link, target := range map[string]string{
		"8:0":   "../../devices/pci0/block/sda",
		"8:1":   "../../devices/pci0/block/sda/sda1",
		"253:0": "../../devices/virtual/block/dm-0",
		"253:1": "../../devices/virtual/block/dm-1",
	} {
		must(t, os.Symlink(target, filepath.Join(sys, "dev/block", link)))
	}
	for _, tc := range []struct {
		major, minor uint32
		want         int64
		wantErr      bool
	}{
		{8, 0, 0, false},
		{8, 1, 0, false},
		{253, 0, 4294966784, false},
		{253, 1, 0, true},
		{7, 9, 0, true},
	} {
		got, err := writeZeroesMaxBytes(sys, unix.Mkdev(tc.major, tc.minor))
		if got != tc.want || (err != nil) != tc.wantErr {
			t.Errorf("%d:%d: %d, %v; want %d, error %v", tc.major, tc.minor, got, err, tc.want, tc.wantErr)
		}
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

// A backend closed while someone still holds it (a handshake on an export
// withdrawn meanwhile) refuses to re-read its size, instead of reading the
// size of whatever file got its descriptor number since.
func TestRefreshAfterClose(t *testing.T) {
	b, _ := sparseFile(t, 2<<20)
	fd := b.fd
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	other, err := os.Create(filepath.Join(t.TempDir(), "other"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if int(other.Fd()) != fd {
		t.Logf("the descriptor %d was not reused (got %d); checking the refusal alone", fd, other.Fd())
	}
	if n, err := b.Refresh(); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("Refresh after Close: %d, %v; want an error saying it is closed", n, err)
	}
	if b.Size() != 2<<20 {
		t.Errorf("size after a refused Refresh: %d", b.Size())
	}
}

// A TRIM of a device off its logical blocks discards the whole blocks inside
// the range and leaves its ragged ends: BLKDISCARD refuses the range as given,
// and the spec lets a server round the start up and the end down.
func TestTrimOfADeviceRoundsToItsBlocks(t *testing.T) {
	dev, _ := looptest.Attach(t, 1<<20, 4096)
	b, err := Open(dev, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	if b.blockSize != 4096 {
		t.Fatalf("%s: logical block size %d, want 4096", dev, b.blockSize)
	}
	data := bytes.Repeat([]byte{0x5a}, 1<<20)
	must(t, b.WriteAt(data, 0, true))
	must(t, b.Trim(4096+512, 3*4096)) // [4608, 16896): whole blocks [8192, 16384)
	want := bytes.Clone(data)
	clear(want[8192:16384])
	got := make([]byte, 1<<20)
	must(t, b.ReadAt(got, 0))
	if !bytes.Equal(got, want) {
		first := 0
		for first < len(got) && got[first] == want[first] {
			first++
		}
		t.Fatalf("after the trim, byte %d reads %#x, want %#x (the aligned middle discarded, the ends kept)", first, got[first], want[first])
	}
	must(t, b.Trim(4096+512, 1024)) // no whole block: nothing to do
}
