package backend

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// The file or device under an export can shrink behind the server (an
// lvreduce or a truncate of its own), which goes on with the size it read
// last until a rescan or a handshake sees the change. Meanwhile a request
// past the new end must fail with ENOSPC, not be acknowledged for blocks
// that do not exist, nor fail the export as if its disk had failed.

// shrink makes the file under b size bytes long, and, under a loop device,
// the device too (losetup -c, as an LV's size changes under the server).
func shrink(t *testing.T, b *File, backing string, size int64) {
	t.Helper()
	must(t, os.Truncate(backing, size))
	if b.IsDevice() {
		if out, err := exec.Command("losetup", "-c", b.Path()).CombinedOutput(); err != nil {
			t.Fatalf("losetup -c %s: %v: %s", b.Path(), err, out)
		}
	}
	if b.Size() == size {
		t.Fatal("the backend read the new size itself: the test shows nothing")
	}
}

// A zeroing across the new end fails with ENOSPC, in every mode: the
// kernel's fallocate with FALLOC_FL_KEEP_SIZE stops at a device's end, or
// past a file's, and succeeds. A fast zeroing may be refused instead.
func TestZeroPastAShrunkEnd(t *testing.T) {
	const size, shrunk = 4 << 20, 2 << 20
	for _, dev := range []struct {
		name string
		open func(*testing.T, int64) (*File, string)
	}{
		{"device", loopDevice},
		{"file", sparseFile},
	} {
		for _, mode := range []struct {
			name          string
			mayTrim, fast bool
		}{
			{"no hole", false, false},
			{"may trim", true, false},
			{"fast", true, true},
		} {
			t.Run(dev.name+"/"+mode.name, func(t *testing.T) {
				b, backing := dev.open(t, size)
				must(t, b.WriteAt(bytes.Repeat([]byte{0xff}, size), 0, false))
				must(t, b.Flush())
				shrink(t, b, backing, shrunk)
				err := b.Zero(1<<20, 3<<20, mode.mayTrim, mode.fast)
				if !errors.Is(err, unix.ENOSPC) && !(mode.fast && errors.Is(err, ErrNotFast)) {
					t.Errorf("zeroing [1 MiB, 4 MiB) of a file or device now 2 MiB: %v, want ENOSPC", err)
				}
				if err := b.Failed(); err != nil {
					t.Errorf("the export failed: %v", err)
				}
				// Inside the new end it zeroes as before.
				must(t, b.Zero(0, 4096, mode.mayTrim, false))
			})
		}
	}
}

// A FUA write past a device's new end fails with ENOSPC, and only the
// write: the kernel refuses it before anything is synced, so it is not a
// failed write-back, which would fail the export until lvnbd recover.
func TestFUAWritePastAShrunkDeviceFailsOnlyTheWrite(t *testing.T) {
	b, backing := loopDevice(t, 4<<20)
	if !b.dsync {
		t.Fatal("the kernel does not take RWF_DSYNC writes: the test shows nothing")
	}
	shrink(t, b, backing, 2<<20)
	if err := b.WriteAt(make([]byte, 4096), 3<<20, true); !errors.Is(err, unix.ENOSPC) {
		t.Errorf("a FUA write at 3 MiB of a device now 2 MiB: %v, want ENOSPC", err)
	}
	if err := b.Failed(); err != nil {
		t.Fatalf("the export failed: %v", err)
	}
	must(t, b.WriteAt([]byte("still works"), 0, true))
	must(t, b.Flush())
}

// BLOCK_STATUS past the end of a file that shrank reports data, as for
// any range it cannot map: a hole reads as zeroes, and a backup that skips
// zeroes would store them where reads fail.
func TestExtentsPastAShrunkFile(t *testing.T) {
	const mib = 1 << 20
	for _, tc := range []struct {
		name        string
		off, length int64
		want        []Extent
	}{
		{"across the end", 0, 4 * mib, []Extent{{Length: mib}, {Length: mib, Hole: true, Zero: true}, {Length: 2 * mib}}},
		{"from the end", 2 * mib, 2 * mib, []Extent{{Length: 2 * mib}}},
		{"past the end", 3 * mib, mib, []Extent{{Length: mib}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, path := sparseFile(t, 4*mib)
			must(t, b.WriteAt(bytes.Repeat([]byte{1}, mib), 0, false))
			must(t, b.WriteAt(bytes.Repeat([]byte{1}, mib), 3*mib, false))
			shrink(t, b, path, 2*mib)
			got, err := b.Extents(tc.off, tc.length, 64)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("Extents(%d, %d) = %+v, want %+v", tc.off, tc.length, got, tc.want)
			}
		})
	}
}
