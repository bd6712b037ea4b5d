package server

import (
	"bufio"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/nbd"
)

// peakRSS is the process's peak resident set (VmHWM), clients included.
func peakRSS(t testing.TB) string {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func openFDs(t testing.TB) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// 64 connections, each with 32 requests always in flight, for a bounded
// time: every reply arrives, memory stays bounded, and once the clients are
// gone no goroutine or descriptor is left behind.
func TestLoadManyConnectionsDeepQueues(t *testing.T) {
	if testing.Short() {
		t.Skip("load test: skipped with -short")
	}
	const (
		conns    = 64
		depth    = 32
		block    = 4096
		size     = 64 << 20
		duration = 3 * time.Second
	)
	disk, _ := fileExport(t, "disk", size, false)
	ts := startServer(t, nil, disk)
	runtime.GC()
	goroutinesBefore, fdsBefore := runtime.NumGoroutine(), openFDs(t)

	var peakHeap atomic.Uint64
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peakHeap.Load() {
				peakHeap.Store(ms.HeapInuse)
			}
			select {
			case <-stopSampling:
				return
			case <-tick.C:
			}
		}
	}()

	var total atomic.Int64
	var wg sync.WaitGroup
	deadline := time.Now().Add(duration)
	for i := range conns {
		c := dialRaw(t, ts.addr)
		c.open("disk", false)
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := hammer(c.nc, c.r, uint64(i), depth, block, size, deadline)
			if err != nil {
				t.Errorf("connection %d: %v", i, err)
			}
			total.Add(n)
		}()
	}
	wg.Wait()
	close(stopSampling)
	<-sampled
	t.Logf("%d requests over %d connections at QD%d in %v; peak heap in use %d MiB; peak RSS of the test process %s",
		total.Load(), conns, depth, duration, peakHeap.Load()>>20, peakRSS(t))
	if total.Load() < conns*depth {
		t.Errorf("only %d requests completed", total.Load())
	}
	// 64 × 32 × 4 KiB is 8 MiB of payload in flight: the server's bounds
	// and pools must keep the heap far below one buffer per request of
	// the maximum size.
	if peak := peakHeap.Load(); peak > 512<<20 {
		t.Errorf("peak heap in use %d MiB: memory is not bounded", peak>>20)
	}

	// After the clients leave, the server is back where it started.
	deadlineLeak := time.Now().Add(10 * time.Second)
	for {
		g, f := runtime.NumGoroutine(), openFDs(t)
		if g <= goroutinesBefore && f <= fdsBefore {
			break
		}
		if time.Now().After(deadlineLeak) {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			t.Fatalf("leak: %d goroutines (was %d), %d fds (was %d)\n%s", g, goroutinesBefore, f, fdsBefore, buf[:n])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// hammer keeps depth random 4 KiB reads and writes in flight on one
// connection until deadline, then sends a FLUSH and, once every reply is in,
// disconnects; it returns the replies seen.
func hammer(nc net.Conn, r *bufio.Reader, seed uint64, depth, block int, size int64, deadline time.Time) (int64, error) {
	rng := rand.New(rand.NewPCG(seed, 7))
	payload := make([]byte, block)
	pending := map[uint64]nbd.Command{}
	var mu sync.Mutex
	closing := false // the final FLUSH is pending: the reader ends when all are in
	slots := make(chan struct{}, depth)
	done := make(chan error, 1)
	var replies int64
	go func() {
		var hb [nbd.SimpleReplySize]byte
		data := make([]byte, block)
		for {
			if _, err := io.ReadFull(r, hb[:]); err != nil {
				done <- err
				return
			}
			var rep nbd.SimpleReply
			if err := rep.UnmarshalBinary(hb[:]); err != nil || rep.Errno != 0 {
				done <- err
				return
			}
			mu.Lock()
			cmd, ok := pending[rep.Handle]
			delete(pending, rep.Handle)
			finished := closing && len(pending) == 0
			mu.Unlock()
			if !ok {
				done <- io.ErrUnexpectedEOF
				return
			}
			if cmd == nbd.CmdRead {
				if _, err := io.ReadFull(r, data); err != nil {
					done <- err
					return
				}
			}
			replies++
			if finished {
				done <- nil
				return
			}
			<-slots
		}
	}()
	w := bufio.NewWriter(nc)
	for handle := uint64(1); time.Now().Before(deadline); handle++ {
		slots <- struct{}{}
		cmd := nbd.CmdRead
		if rng.IntN(2) == 0 {
			cmd = nbd.CmdWrite
		}
		off := uint64(rng.Int64N(size/int64(block))) * uint64(block)
		mu.Lock()
		pending[handle] = cmd
		mu.Unlock()
		b, _ := nbd.RequestHeader{Command: cmd, Handle: handle, Offset: off, Length: uint32(block)}.AppendBinary(nil)
		w.Write(b)
		if cmd == nbd.CmdWrite {
			binary.BigEndian.PutUint64(payload, handle)
			w.Write(payload)
		}
		if len(slots) == cap(slots) || rng.IntN(4) == 0 {
			if err := w.Flush(); err != nil {
				return replies, err
			}
		}
	}
	slots <- struct{}{}
	mu.Lock()
	pending[0] = nbd.CmdFlush
	closing = true
	mu.Unlock()
	b, _ := nbd.RequestHeader{Command: nbd.CmdFlush, Handle: 0}.AppendBinary(nil)
	w.Write(b)
	if err := w.Flush(); err != nil {
		return replies, err
	}
	err := <-done
	disc, _ := nbd.RequestHeader{Command: nbd.CmdDisc}.AppendBinary(nil)
	nc.Write(disc)
	nc.Close()
	return replies, err
}
