package interop

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestNBDCopyRoundTripMultiConn copies 256 MiB of random data into an export
// and back out with nbdcopy over 4 connections each way (multi-conn).
func TestNBDCopyRoundTripMultiConn(t *testing.T) {
	requireInterop(t, "nbdcopy")
	const size = 256 << 20
	dir := fastDir(t)
	src := randomFile(t, filepath.Join(dir, "src.bin"), size, 2)
	disk := sparseFile(t, filepath.Join(dir, "disk.img"), size)
	dst := filepath.Join(dir, "dst.bin")
	s := startServer(t, serverOpts{exports: []string{"disk=" + disk}})

	// nbdcopy opens no more connections than it has threads, and defaults
	// to one thread per core.
	copyFlags := []string{"--connections=4", "--threads=4"}
	before := s.countLog("client connected")
	mustRun(t, "nbdcopy", append(copyFlags, "--flush", src, s.uri("disk"))...)
	if got := s.countLog("client connected") - before; got != 4 {
		t.Errorf("nbdcopy to the export used %d connections, want 4 (multi-conn)", got)
	}
	before = s.countLog("client connected")
	mustRun(t, "nbdcopy", append(copyFlags, s.uri("disk"), dst)...)
	if got := s.countLog("client connected") - before; got != 4 {
		t.Errorf("nbdcopy from the export used %d connections, want 4 (multi-conn)", got)
	}

	want := sha256File(t, src)
	for _, f := range []struct{ what, path string }{
		{"backing file", disk},
		{"copy read back", dst},
	} {
		if got := sha256File(t, f.path); got != want {
			t.Errorf("SHA-256 of the %s = %s, want %s (source)", f.what, got, want)
		}
	}
}

// TestQemuImgConvertAndCompare writes an image with qemu-img convert into an
// export and checks qemu-img compare finds it identical, then that compare
// does notice a one-byte change (so "identical" means something).
func TestQemuImgConvertAndCompare(t *testing.T) {
	requireInterop(t, "qemu-img", "qemu-io")
	const size = 64 << 20
	dir := fastDir(t)
	// Data with holes, so convert exercises zeroing and sparse reads too.
	src := sparseFile(t, filepath.Join(dir, "src.img"), size)
	for i, off := range []int64{0, 5 << 20, 17<<20 + 4096, size - 1<<20} {
		writeAt(t, src, randomBytes(uint64(30+i), 1<<20), off)
	}
	disk := filepath.Join(dir, "disk.img")
	randomFile(t, disk, size, 31) // stale content convert must overwrite
	s := startServer(t, serverOpts{exports: []string{"disk=" + disk}})

	mustRun(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, s.uri("disk"))
	out := mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri("disk"))
	if !strings.Contains(out, "Images are identical") {
		t.Errorf("qemu-img compare printed %q, want \"Images are identical\"", out)
	}
	if got, want := sha256File(t, disk), sha256File(t, src); got != want {
		t.Errorf("SHA-256 of the backing file = %s, want %s (source)", got, want)
	}

	const changed = 9<<20 + 77 // inside a hole of the source
	mustRun(t, "qemu-io", "-f", "raw", s.uri("disk"), "-c", fmt.Sprintf("write -P 0x5a %d 1", changed))
	// qemu-img reports the start of the first differing chunk it compared.
	out, err := run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri("disk"))
	if err == nil || !strings.Contains(out, "Content mismatch at offset") {
		t.Errorf("after changing byte %d, qemu-img compare: err=%v, output %q; want exit 1 and \"Content mismatch at offset\"",
			changed, err, out)
	}
	if got := readAt(t, disk, changed, 1); !bytes.Equal(got, []byte{0x5a}) {
		t.Errorf("backing file byte %d = %#x, want 0x5a", changed, got)
	}
}

func sha256File(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}
