package interop

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDrainOnSignal signals the server while nbdcopy is streaming writes into
// it. The server must drain (answer what it has read, flush) and exit 0
// promptly; the client may fail. Whatever reached the backing file must be
// what the client sent, never garbage.
func TestDrainOnSignal(t *testing.T) {
	requireInterop(t, "nbdcopy", "nbdkit")
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) { testDrain(t, sig) })
	}
}

func testDrain(t *testing.T, sig syscall.Signal) {
	const (
		size    = 1 << 30
		started = 16 << 20 // bytes on the backing file before the signal
	)
	disk := sparseFile(t, filepath.Join(fastDir(t), "disk.img"), size)
	s := startServer(t, serverOpts{exports: []string{"disk=" + disk}})

	// nbdkit's pattern plugin is the source: every 8-byte word holds its own
	// offset, so any block of the result can be checked on its own. nbdcopy
	// keeps many writes in flight on 4 connections.
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	cp := exec.CommandContext(ctx, "nbdcopy", "--connections=4", "--threads=4", "--",
		"[", "nbdkit", "--exit-with-parent", "pattern", fmt.Sprintf("size=%d", size), "]", s.uri("disk"))
	var cpOut syncBuffer
	cp.Stdout, cp.Stderr = &cpOut, &cpOut
	t.Logf("$ %s", shellLine(cp.Args))
	if err := cp.Start(); err != nil {
		t.Fatal(err)
	}
	cpDone := make(chan error, 1)
	go func() { cpDone <- cp.Wait() }()

	waitAllocated(t, disk, started, 20*time.Second)
	select {
	case err := <-cpDone:
		t.Fatalf("nbdcopy ended (%v) before the signal; nothing was left to drain\n%s", err, cpOut.String())
	default:
	}
	before := time.Now()
	t.Logf("sending %v to the server mid-copy", sig)
	code, err := s.signal(sig)
	elapsed := time.Since(before)
	if err != nil {
		t.Fatal(err)
	}
	if code != 0 {
		t.Errorf("server exited with code %d after %v, want 0", code, sig)
	}
	if elapsed > 10*time.Second {
		t.Errorf("server took %v to drain, want well under its 30 s drain bound", elapsed)
	}
	log := s.log.String()
	for _, want := range []string{`"reason": "server shutting down"`, "server stopped"} {
		if !strings.Contains(log, want) {
			t.Errorf("server log lacks %q", want)
		}
	}
	if strings.Contains(log, "outlasted the drain timeout") {
		t.Errorf("in-flight requests outlasted the drain timeout")
	}

	// The client may fail now; it must not hang.
	select {
	case err := <-cpDone:
		t.Logf("nbdcopy ended (a failure is expected): %v\n%s", err, cpOut.String())
	case <-ctx.Done():
		t.Fatalf("nbdcopy did not end after the server exited")
	}

	if written := checkPattern(t, disk); written < started {
		t.Errorf("only %d bytes of the pattern are in the backing file, want at least %d", written, started)
	}
}

// waitAllocated waits until the file holds at least n bytes of data.
func waitAllocated(t testing.TB, path string, n int64, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		if st.Blocks*512 >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s holds %d bytes after %v, want at least %d: the copy is not progressing", path, st.Blocks*512, timeout, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// checkPattern checks that each 4 KiB block of the file is either zeroes or
// nbdkit's pattern (each big-endian 8-byte word is its offset), and returns
// how many bytes hold the pattern.
func checkPattern(t testing.TB, path string) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const chunk, block = 1 << 20, 4096
	got := make([]byte, chunk)
	want := make([]byte, chunk)
	zero := make([]byte, block)
	var matched int64
	bad := 0
	for off := int64(0); ; off += chunk {
		n, err := io.ReadFull(f, got)
		if n == 0 {
			break
		}
		if err != nil && err != io.ErrUnexpectedEOF {
			t.Fatal(err)
		}
		for i := 0; i < chunk; i += 8 {
			binary.BigEndian.PutUint64(want[i:], uint64(off)+uint64(i))
		}
		for b := 0; b < n; b += block {
			g := got[b:min(b+block, n)]
			switch {
			case bytes.Equal(g, zero[:len(g)]):
			case bytes.Equal(g, want[b:b+len(g)]):
				matched += int64(len(g))
			default:
				if bad++; bad <= 5 {
					t.Errorf("backing file block at %d is neither zeroes nor the data sent there", off+int64(b))
				}
			}
		}
	}
	if bad > 5 {
		t.Errorf("... %d bad blocks in all", bad)
	}
	return matched
}
