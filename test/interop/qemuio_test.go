package interop

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
)

// TestQemuIOUnalignedPatterns writes byte patterns with qemu-io at offsets
// and lengths that ignore every block boundary, reads them back through the
// server, and compares the whole backing file with what was written.
func TestQemuIOUnalignedPatterns(t *testing.T) {
	requireInterop(t, "qemu-io")
	// An odd size, so the last bytes are not in a whole block either.
	const size = 16<<20 + 1000
	disk := sparseFile(t, filepath.Join(t.TempDir(), "disk.img"), size)
	s := startServer(t, serverOpts{exports: []string{"disk=" + disk}})

	// Ranges are disjoint with at least one untouched byte between them,
	// except at the ends of the export.
	cases := []struct {
		name    string
		off, n  int64
		pattern byte
		fua     bool
	}{
		{"first byte", 0, 1, 0x11, false},
		{"unaligned across 4k", 1000, 3333, 0xab, false},
		{"two bytes straddling 4k", 8191, 2, 0x22, false},
		{"across two 4k boundaries", 12287, 8194, 0x33, false},
		{"512-aligned inside 4k", 24576 + 512, 512, 0x44, false},
		{"FUA unaligned", 40000, 7777, 0x45, true},
		{"5 MiB unaligned", 1<<20 + 7, 5<<20 + 13, 0x55, false},
		{"near the end", size - 3335, 3333, 0x66, false},
		{"last byte", size - 1, 1, 0x77, true},
	}
	want := make([]byte, size)
	for _, c := range cases {
		copy(want[c.off:c.off+c.n], bytes.Repeat([]byte{c.pattern}, int(c.n)))
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			write := "write"
			if c.fua {
				write += " -f"
			}
			cmds := []string{
				fmt.Sprintf("%s -P %#x %d %d", write, c.pattern, c.off, c.n),
				fmt.Sprintf("read -P %#x %d %d", c.pattern, c.off, c.n),
			}
			// The bytes just outside the range are untouched zeroes.
			if c.off > 0 {
				cmds = append(cmds, fmt.Sprintf("read -P 0 %d 1", c.off-1))
			}
			if end := c.off + c.n; end < size {
				cmds = append(cmds, fmt.Sprintf("read -P 0 %d 1", end))
			}
			out := qemuIO(t, s.uri("disk"), cmds...)
			if strings.Contains(out, "failed") {
				t.Errorf("qemu-io reported a failure:\n%s", out)
			}
		})
	}

	if got := readFile(t, disk); !bytes.Equal(got, want) {
		off := firstDiff(got, want)
		t.Errorf("backing file differs from what qemu-io wrote, first at byte %d: got %#x, want %#x",
			off, got[off], want[off])
	}

	// A wrong pattern must be noticed, or the checks above prove nothing.
	c := cases[1]
	out, err := run(t, "qemu-io", "-f", "raw", s.uri("disk"), "-c", fmt.Sprintf("read -P %#x %d %d", c.pattern+1, c.off, c.n))
	if err == nil || !strings.Contains(out, "Pattern verification failed") {
		t.Errorf("qemu-io read with the wrong pattern: err=%v, output:\n%s\nwant a failing exit and \"Pattern verification failed\"", err, out)
	}
}

// qemuIO runs qemu-io commands on a raw NBD image and fails t unless it
// exits 0.
func qemuIO(t testing.TB, uri string, cmds ...string) string {
	t.Helper()
	args := []string{"-f", "raw", uri}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	return mustRun(t, "qemu-io", args...)
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
