package interop

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// TestConcurrentClientsDisjointHalves has two qemu-io processes, each on its
// own connection, write the two halves of one export at the same time with
// pipelined requests, then checks every chunk through the server and in the
// backing file.
func TestConcurrentClientsDisjointHalves(t *testing.T) {
	requireInterop(t, "qemu-io")
	const (
		size  = 64 << 20
		chunk = 512 << 10
		half  = size / 2
	)
	disk := sparseFile(t, filepath.Join(fastDir(t), "disk.img"), size)
	s := startServer(t, serverOpts{exports: []string{"disk=" + disk}})

	// Each chunk gets its own byte, so a chunk written to the wrong place
	// or by the wrong client shows.
	pattern := func(writer, i int) byte { return byte(0x01 + 0x80*writer + i) }
	writers := 2
	cmds := make([][]string, writers)
	for w := range writers {
		// Both clients connect, then pause, so their writes overlap.
		cmds[w] = append(cmds[w], "sleep 300")
		for i := range half / chunk {
			off := w*half + i*chunk
			cmds[w] = append(cmds[w], fmt.Sprintf("aio_write -P %#x %d %d", pattern(w, i), off, chunk))
		}
		cmds[w] = append(cmds[w], "aio_flush")
		for i := range half / chunk {
			off := w*half + i*chunk
			cmds[w] = append(cmds[w], fmt.Sprintf("read -P %#x %d %d", pattern(w, i), off, chunk))
		}
	}
	var wg sync.WaitGroup
	outs := make([]string, writers)
	errs := make([]error, writers)
	for w := range writers {
		wg.Go(func() {
			args := []string{"-f", "raw", s.uri("disk")}
			for _, c := range cmds[w] {
				args = append(args, "-c", c)
			}
			outs[w], errs[w] = run(t, "qemu-io", args...)
		})
	}
	wg.Wait()
	for w := range writers {
		if errs[w] != nil || strings.Contains(outs[w], "failed") {
			t.Errorf("qemu-io writer %d: %v\n%s", w, errs[w], outs[w])
		}
	}
	if got := maxConcurrentClients(s.log.String()); got != writers {
		t.Errorf("at most %d clients were connected at once, want %d", got, writers)
	}

	data := readFile(t, disk)
	for w := range writers {
		for i := range half / chunk {
			off := w*half + i*chunk
			want := bytes.Repeat([]byte{pattern(w, i)}, chunk)
			if got := data[off : off+chunk]; !bytes.Equal(got, want) {
				d := firstDiff(got, want)
				t.Errorf("backing file chunk at %d (writer %d): byte %d is %#x, want %#x", off, w, off+d, got[d], want[d])
			}
		}
	}
}

// maxConcurrentClients replays a server log and returns the most clients in
// the transmission phase at once.
func maxConcurrentClients(log string) int {
	n, most := 0, 0
	for _, line := range strings.Split(log, "\n") {
		switch {
		case strings.Contains(line, "client connected"):
			n++
			most = max(most, n)
		case strings.Contains(line, "client disconnected"):
			n--
		}
	}
	return most
}
