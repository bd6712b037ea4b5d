package interop

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"
)

// TestNBDInfoMapShowsHoles writes 4 KiB-aligned data at known offsets of
// sparse files and checks that `nbdinfo --map` (NBD_CMD_BLOCK_STATUS,
// base:allocation) reports data exactly there and holes everywhere else.
func TestNBDInfoMapShowsHoles(t *testing.T) {
	requireInterop(t, "nbdinfo")
	const size = 16 << 20
	type span struct{ off, n int64 }
	cases := []struct {
		name   string
		writes []span
	}{
		{"empty", nil},
		{"scattered", []span{
			{0, 4 << 10},
			{1 << 20, 64 << 10},
			{4<<20 + 8<<10, 4 << 10},
			{4<<20 + 16<<10, 12 << 10},
			{size - 4<<10, 4 << 10},
		}},
		{"one hole in the middle", []span{{0, 8 << 20}, {8<<20 + 4<<10, 8<<20 - 4<<10}}},
		{"full", []span{{0, size}}},
	}
	dir := t.TempDir()
	var exports []string
	want := map[string][]extent{}
	for i, c := range cases {
		name := fmt.Sprintf("e%d", i)
		path := sparseFile(t, filepath.Join(dir, name+".img"), size)
		var ext []extent
		pos := int64(0)
		for j, w := range c.writes {
			writeAt(t, path, randomBytes(uint64(600+10*i+j), int(w.n)), w.off)
			if w.off > pos {
				ext = append(ext, extent{Off: pos, Len: w.off - pos, Hole: true})
			}
			ext = append(ext, extent{Off: w.off, Len: w.n})
			pos = w.off + w.n
		}
		if pos < size {
			ext = append(ext, extent{Off: pos, Len: size - pos, Hole: true})
		}
		want[name] = merge(ext)
		// The comparison below is only fair if the file system allocated
		// exactly what was written.
		if diff := cmp.Diff(want[name], fileExtents(t, path)); diff != "" {
			t.Fatalf("%s: the file system's own map differs from what was written (-want +got):\n%s", path, diff)
		}
		exports = append(exports, name+"="+path)
	}
	s := startServer(t, serverOpts{exports: exports})
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			name := fmt.Sprintf("e%d", i)
			if diff := cmp.Diff(want[name], nbdinfoMap(t, s.uri(name))); diff != "" {
				t.Errorf("nbdinfo --map %s (-want +got):\n%s", s.uri(name), diff)
			}
		})
	}
}

// TestZeroAndTrimPunchHoles zeroes and trims ranges of fully allocated
// exports with qemu-io (NBD_CMD_WRITE_ZEROES, NBD_CMD_TRIM) and nbdcopy
// (which turns its source's holes and zero blocks into zero requests), then
// checks that each backing file reads back zeroes there, has holes where the
// client allowed them, and is untouched around them.
func TestZeroAndTrimPunchHoles(t *testing.T) {
	requireInterop(t, "qemu-io", "nbdcopy", "nbdinfo")
	const size = 8 << 20
	const mib = 1 << 20
	type span struct{ off, n int64 }
	cases := []struct {
		name   string
		qemuIO []string // commands; nil means nbdcopy from the source below
		zeroed []span   // read back as zeroes
		holes  []span   // and are deallocated
	}{
		{
			name:   "qemu-io discard",
			qemuIO: []string{"discard 1048576 1048576"},
			zeroed: []span{{1 * mib, mib}},
			holes:  []span{{1 * mib, mib}},
		},
		{
			name:   "qemu-io write -z -u (may trim)",
			qemuIO: []string{"write -z -u 3149824 524288"}, // 3 MiB + 4 KiB
			zeroed: []span{{3*mib + 4096, 512 << 10}},
			holes:  []span{{3*mib + 4096, 512 << 10}},
		},
		{
			// NO_HOLE: the range must read as zeroes; whether it stays
			// allocated is the file system's business.
			name:   "qemu-io write -z (no hole)",
			qemuIO: []string{"write -z 5242880 262144"},
			zeroed: []span{{5 * mib, 256 << 10}},
		},
		{
			// Only the whole 4 KiB block inside can become a hole; the
			// partial blocks at either end are zeroed in place.
			name:   "qemu-io write -z -u unaligned",
			qemuIO: []string{"write -z -u 1000 10000"},
			zeroed: []span{{1000, 10000}},
			holes:  []span{{4096, 4096}},
		},
		{
			name:   "nbdcopy of a sparse source",
			zeroed: []span{{1 * mib, 2 * mib}, {5 * mib, mib}},
			holes:  []span{{1 * mib, 2 * mib}, {5 * mib, mib}},
		},
	}

	dir := t.TempDir()
	// nbdcopy's source: random data with a hole at [1M, 3M) and written
	// zeroes at [5M, 6M), which nbdcopy detects (--sparse) and sends as
	// zero requests that may trim.
	src := randomFile(t, filepath.Join(dir, "src.img"), size, 900)
	punch(t, src, 1*mib, 2*mib)
	writeAt(t, src, make([]byte, mib), 5*mib)

	var exports, paths []string
	var before [][]byte
	for i := range cases {
		path := randomFile(t, filepath.Join(dir, fmt.Sprintf("disk%d.img", i)), size, uint64(901+i))
		paths = append(paths, path)
		before = append(before, readFile(t, path))
		exports = append(exports, fmt.Sprintf("d%d=%s", i, path))
	}
	s := startServer(t, serverOpts{exports: exports})

	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			uri := s.uri(fmt.Sprintf("d%d", i))
			if c.qemuIO != nil {
				// -d unmap, or qemu drops discards and may-trim flags
				// before they reach the server.
				args := []string{"-f", "raw", "-d", "unmap", uri}
				for _, cmd := range c.qemuIO {
					args = append(args, "-c", cmd)
				}
				mustRun(t, "qemu-io", args...)
			} else {
				mustRun(t, "nbdcopy", "--flush", src, uri)
			}

			want := bytes.Clone(before[i])
			for _, z := range c.zeroed {
				clear(want[z.off : z.off+z.n])
			}
			if c.qemuIO == nil {
				want = readFile(t, src)
			}
			if got := readFile(t, paths[i]); !bytes.Equal(got, want) {
				off := firstDiff(got, want)
				t.Errorf("backing file differs from the expected content first at byte %d: got %#x, want %#x",
					off, got[off], want[off])
			}
			fileMap := fileExtents(t, paths[i])
			nbdMap := nbdinfoMap(t, uri)
			for _, h := range c.holes {
				if !isHole(fileMap, h.off, h.n) {
					t.Errorf("backing file has data in [%d,+%d), want a hole; SEEK_DATA/SEEK_HOLE map: %v", h.off, h.n, fileMap)
				}
				if !isHole(nbdMap, h.off, h.n) {
					t.Errorf("nbdinfo --map shows data in [%d,+%d), want a hole; map: %v", h.off, h.n, nbdMap)
				}
			}
		})
	}
}

// punch deallocates [off, off+n) of a file.
func punch(t testing.TB, path string, off, n int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
		t.Fatalf("punching a hole in %s: %v", path, err)
	}
}
