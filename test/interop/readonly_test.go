package interop

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestReadOnlyExport serves a file with NAME=PATH:ro and checks that clients
// see it read-only, can read it, cannot write it, and that the file is
// unchanged afterwards.
func TestReadOnlyExport(t *testing.T) {
	requireInterop(t, "nbdinfo", "qemu-io", "qemu-img", "nbdcopy")
	const size = 4 << 20
	dir := t.TempDir()
	golden := filepath.Join(dir, "golden.img")
	if err := os.WriteFile(golden, bytes.Repeat([]byte{0x5a}, size), 0o644); err != nil {
		t.Fatal(err)
	}
	stBefore, err := os.Stat(golden)
	if err != nil {
		t.Fatal(err)
	}
	wantSum := sha256File(t, golden)
	src := randomFile(t, filepath.Join(dir, "src.img"), size, 700)
	s := startServer(t, serverOpts{exports: []string{"golden=" + golden + ":ro"}})
	uri := s.uri("golden")

	exports := nbdinfoJSON(t, uri)
	if len(exports) != 1 {
		t.Fatalf("nbdinfo reported %d exports, want 1", len(exports))
	}
	want := map[string]any{
		"is_read_only":  true,
		"can_trim":      false,
		"can_zero":      false,
		"can_fast_zero": false,
		"can_fua":       false,
		"export-size":   float64(size),
	}
	if diff := cmp.Diff(want, pick(exports[0], want)); diff != "" {
		t.Errorf("nbdinfo --json %s (-want +got):\n%s", uri, diff)
	}

	mustRun(t, "qemu-io", "-r", "-f", "raw", uri, "-c", "read -P 0x5a 0 4194304")

	writers := []struct {
		name string
		args []string
	}{
		{"qemu-io write", []string{"qemu-io", "-f", "raw", uri, "-c", "write -P 0x11 0 65536"}},
		{"qemu-io discard", []string{"qemu-io", "-f", "raw", "-d", "unmap", uri, "-c", "discard 0 65536"}},
		{"nbdcopy", []string{"nbdcopy", src, uri}},
		{"qemu-img convert", []string{"qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri}},
	}
	for _, w := range writers {
		t.Run(w.name, func(t *testing.T) {
			out, err := run(t, w.args[0], w.args[1:]...)
			if err == nil {
				t.Errorf("%s to a read-only export succeeded, want a failure\n%s", w.name, out)
			} else {
				t.Logf("failed as expected: %v\n%s", err, out)
			}
		})
	}

	// Every client above refuses on its own, seeing the read-only flag, so
	// the server's own refusal is checked with requests sent regardless.
	t.Run("raw requests", func(t *testing.T) {
		const eperm = 1
		rc := dialRaw(t, fmt.Sprintf("127.0.0.1:%d", s.port), "golden")
		defer rc.close(t)
		reqs := []struct {
			name    string
			cmd     uint16
			payload []byte
		}{
			{"NBD_CMD_WRITE", rawCmdWrite, bytes.Repeat([]byte{0x11}, 4096)},
			{"NBD_CMD_TRIM", rawCmdTrim, nil},
			{"NBD_CMD_WRITE_ZEROES", rawCmdWriteZeroes, nil},
		}
		for _, r := range reqs {
			if errno := rc.do(t, r.cmd, 8192, 4096, r.payload); errno != eperm {
				t.Errorf("%s on a read-only export: errno %d, want EPERM (%d)", r.name, errno, eperm)
			}
		}
	})

	if got := sha256File(t, golden); got != wantSum {
		t.Errorf("read-only export's file changed: SHA-256 %s, want %s", got, wantSum)
	}
	stAfter, err := os.Stat(golden)
	if err != nil {
		t.Fatal(err)
	}
	if !stAfter.ModTime().Equal(stBefore.ModTime()) {
		t.Errorf("read-only export's file was modified at %v (was %v)", stAfter.ModTime(), stBefore.ModTime())
	}
}
