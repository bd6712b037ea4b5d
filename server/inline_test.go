package server

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sync/semaphore"
	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/nbd"
)

// memoryDir is a new directory on tmpfs, where every small request can be
// answered by the reader; it is removed after the test.
func memoryDir(t testing.TB) string {
	t.Helper()
	var fs unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &fs); err != nil || fs.Type != unix.TMPFS_MAGIC {
		t.Fatalf("/dev/shm is not a tmpfs (statfs: %v): these tests need one", err)
	}
	dir, err := os.MkdirTemp("/dev/shm", "lvnbd-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Small reads and writes answered on the reader (tryInline) and by workers
// give the same results: the bytes written land, reads return them, and
// requests that must be refused (beyond the end) or that the reader leaves to
// a worker (FUA, large) are answered all the same, all pipelined.
func TestInlineAnswersMatchWorkers(t *testing.T) {
	const size = 8 << 20
	type io struct {
		off, n uint64
		fua    bool
	}
	ios := []io{{0, 1, false}, {1, 4095, false}, {4096, 4096, false}, {8192, 4097, false},
		{1 << 20, spliceMin - 1, false}, {2 << 20, spliceMin, false}, {3<<20 + 5, 4096, true},
		{size - 4096, 4096, false}}
	for i := range 32 { // apart: overlapping writes in flight have no order
		ios = append(ios, io{4<<20 + uint64(i)*96<<10 + uint64(i)*517%4096, 4096 + uint64(i), false})
	}
	for _, place := range []string{"tmpfs", "disk"} {
		for _, inline := range []bool{true, false} {
			for _, structured := range []bool{false, true} {
				t.Run(fmt.Sprintf("%s/inline=%v/structured=%v", place, inline, structured), func(t *testing.T) {
					dir := t.TempDir()
					if place == "tmpfs" {
						dir = memoryDir(t)
					}
					want := pattern(size, 5)
					disk, path := fileExportIn(t, dir, "disk", size, false)
					writeFileAt(t, path, want, 0)
					ts := startServer(t, &Config{NoInline: !inline}, disk)
					c := dialRaw(t, ts.addr)
					c.open("disk", structured)

					// Writes, and one beyond the end, in flight together.
					for i, w := range ios {
						data := pattern(int(w.n), uint64(i)+100)
						copy(want[w.off:], data)
						var flags nbd.CommandFlags
						if w.fua {
							flags = nbd.CmdFlagFUA
						}
						c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Flags: flags, Handle: uint64(i), Offset: w.off, Length: uint32(w.n)}, data)
					}
					c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 999, Offset: size - 100, Length: 200}, make([]byte, 200))
					for range len(ios) + 1 {
						res := c.reply(0)
						if res.handle == 999 {
							if res.errno != nbd.ENOSPC {
								t.Errorf("write beyond the end: %v, want ENOSPC", res.errno)
							}
						} else if res.errno != 0 {
							t.Fatalf("write %d: %v %s", res.handle, res.errno, res.msg)
						}
					}
					got, err := os.ReadFile(path)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, want) {
						t.Fatal("the file differs from what was written")
					}
					afterWrites := ts.srv.inlined.Load()

					// Reads of the same ranges, and one beyond the end.
					for i, r := range ios {
						c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: uint64(i), Offset: r.off, Length: uint32(r.n)}, nil)
					}
					c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: 999, Offset: size - 100, Length: 200}, nil)
					for range len(ios) + 1 {
						res := c.replyFor(func(h uint64) int {
							if h == 999 {
								return 0
							}
							return int(ios[h].n)
						})
						if res.handle == 999 {
							if res.errno != nbd.EINVAL {
								t.Errorf("read beyond the end: %v, want EINVAL", res.errno)
							}
							continue
						}
						r := ios[res.handle]
						if res.errno != 0 {
							t.Fatalf("read [%d, +%d): %v %s", r.off, r.n, res.errno, res.msg)
						}
						if !bytes.Equal(assemble(t, res, r.off, int(r.n)), want[r.off:r.off+r.n]) {
							t.Fatalf("read [%d, +%d) differs from the file", r.off, r.n)
						}
					}
					writes, reads := afterWrites, ts.srv.inlined.Load()-afterWrites
					switch {
					case !inline && writes+reads != 0:
						t.Errorf("inline answers off, yet %d writes and %d reads answered on the reader", writes, reads)
					case inline && reads < int64(len(ios))/2:
						// Just written, so in the page cache.
						t.Errorf("only %d of %d reads answered on the reader", reads, len(ios))
					case inline && place == "tmpfs" && writes < int64(len(ios))/2:
						t.Errorf("only %d of %d writes to tmpfs answered on the reader", writes, len(ios))
					}
				})
			}
		}
	}
}

// The replies the reader holds also hold the connection's slots: when the
// slots run out, the reader sends what it holds before it waits for one, or
// it would wait for itself.
func TestHeldRepliesAreSentBeforeTheReaderWaits(t *testing.T) {
	disk, path := fileExportIn(t, memoryDir(t), "disk", 1<<20, false)
	writeFileAt(t, path, pattern(1<<20, 9), 0)
	ts := startServer(t, &Config{MaxInFlight: 2}, disk)
	c := dialRaw(t, ts.addr)
	c.open("disk", false)
	c.nc.SetDeadline(time.Now().Add(10 * time.Second))
	const n = 50
	var batch []byte
	for i := range n {
		b, _ := nbd.RequestHeader{Command: nbd.CmdRead, Handle: uint64(i), Offset: uint64(i) * 4096, Length: 4096}.AppendBinary(nil)
		batch = append(batch, b...)
	}
	c.write(batch) // one segment: the reader holds all of them at once
	for range n {
		if res := c.simpleReply(4096); res.errno != 0 {
			t.Fatalf("read %d: %v", res.handle, res.errno)
		}
	}
	if got := ts.srv.inlined.Load(); got != n {
		t.Errorf("%d of %d reads answered on the reader", got, n)
	}
}

// Fencing is final for writes answered on the reader too: once FenceClient
// returns, the file does not change, though the client keeps writing and the
// reader may hold many writes it has not yet done.
func TestFenceStopsInlineWrites(t *testing.T) {
	const size = 4 << 20
	disk, path := fileExportIn(t, memoryDir(t), "disk", size, false)
	fences, err := LoadFences(filepath.Join(t.TempDir(), "fences.json"))
	if err != nil {
		t.Fatal(err)
	}
	ts := startServer(t, &Config{Fences: fences}, disk)
	c := dialRaw(t, ts.addr)
	c.open("disk", false)

	go func() { // writes until the connection is cut
		var b []byte
		for i := uint64(0); ; i++ {
			b, _ = nbd.RequestHeader{Command: nbd.CmdWrite, Handle: i, Offset: i * 4096 % size, Length: 4096}.AppendBinary(b[:0])
			b = append(b, bytes.Repeat([]byte{byte(i%255 + 1)}, 4096)...)
			if _, err := c.nc.Write(b); err != nil {
				return
			}
		}
	}()
	replies := make(chan int)
	go func() { // counts replies until the connection is cut
		defer close(replies)
		hdr := make([]byte, nbd.SimpleReplySize)
		for n := 1; ; n++ {
			if _, err := io.ReadFull(c.r, hdr); err != nil {
				return
			}
			if n == 500 {
				replies <- n
			}
		}
	}()
	<-replies
	if _, err := ts.srv.FenceClient(context.Background(), Fence{Client: "127.0.0.1", Export: "disk"}); err != nil {
		t.Fatal(err)
	}
	atFence, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for range replies { // until the server cuts the connection
	}
	ts.stop(t) // and every request it read is done with
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(atFence, after) {
		t.Error("the export changed after the fence returned")
	}
	if ts.srv.inlined.Load() == 0 {
		t.Error("no write was answered on the reader: this test tests nothing")
	}
}

// The reader writes nothing itself when the write could wait on a gate: a
// fenced connection, a fence or a quiesce (snapshot) under way. It leaves
// those to a worker, which waits or refuses. (Another write to the same file
// is the backend's to see: backend.TestNoWait.)
func TestInlineWritesLeaveGatedWritesToWorkers(t *testing.T) {
	disk, path := fileExportIn(t, memoryDir(t), "disk", 1<<20, false)
	req := nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 1, Offset: 4096, Length: 4096}
	for _, tc := range []struct {
		name string
		hold func(c *conn) (release func())
	}{
		{"fenced", func(c *conn) func() { c.fenced.Store(true); return func() {} }},
		{"fence waiting", func(c *conn) func() { c.fenceGate.Lock(); return c.fenceGate.Unlock }},
		{"quiesced", func(c *conn) func() { disk.writeGate.Lock(); return disk.writeGate.Unlock }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &conn{s: &Server{}, sess: &session{export: disk}, client: &clientConn{},
				nowait: disk.Backend.(noWaiter), slots: semaphore.NewWeighted(1), bytes: semaphore.NewWeighted(1 << 20)}
			release := tc.hold(c)
			defer release()
			if _, taken := c.tryInline(req, bytes.Repeat([]byte{7}, 4096), 4096); taken {
				t.Fatal("the reader answered the write itself")
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, make([]byte, 1<<20)) {
				t.Fatal("the reader wrote to the file")
			}
		})
	}
}

// A client that sends requests and never reads the replies cannot hold a
// shutdown past the drain timeout, even with the reader itself blocked
// sending the replies it answered.
func TestShutdownWithAClientThatDoesNotRead(t *testing.T) {
	disk, path := fileExportIn(t, memoryDir(t), "disk", 1<<20, false)
	writeFileAt(t, path, pattern(1<<20, 3), 0)
	ts := startServer(t, &Config{DrainTimeout: time.Second}, disk)
	c := dialRaw(t, ts.addr)
	c.open("disk", false)
	var batch []byte
	for i := range 256 {
		b, _ := nbd.RequestHeader{Command: nbd.CmdRead, Handle: uint64(i), Offset: uint64(i%16) * 60 << 10, Length: 60 << 10}.AppendBinary(nil)
		batch = append(batch, b...)
	}
	// Far more reply bytes than the two sockets buffer (15 MiB per batch),
	// until the server stops reading: its sends block.
	stalled := make(chan struct{})
	go func() {
		defer close(stalled)
		for {
			n, err := c.nc.Write(batch)
			if err != nil || n < len(batch) {
				return
			}
		}
	}()
	// Once the reader has answered a batch, it is sending it, or will
	// when it stops: either way into a connection nobody reads.
	for ts.srv.inlined.Load() < maxHeld {
		runtime.Gosched()
	}
	start := time.Now()
	ts.stop(t)
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("shutdown took %v with a 1s drain timeout", took)
	}
	c.nc.Close()
	<-stalled
}

// A reply the reader holds goes out before the reader waits for a write's
// payload: the payload may take long to arrive, and the reply must not wait
// for it.
func TestHeldRepliesDoNotWaitForAPayload(t *testing.T) {
	disk, _ := fileExportIn(t, memoryDir(t), "disk", 1<<20, false)
	ts := startServer(t, nil, disk)
	c := dialRaw(t, ts.addr)
	c.open("disk", false)
	// A small read (answered on the reader, its reply held), then a write
	// whose payload comes only in part.
	b, _ := nbd.RequestHeader{Command: nbd.CmdRead, Handle: 1, Offset: 0, Length: 512}.AppendBinary(nil)
	b, _ = nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 2, Offset: 4096, Length: 128 << 10}.AppendBinary(b)
	c.write(append(b, make([]byte, 4096)...))
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if res := c.simpleReply(512); res.handle != 1 || res.errno != 0 {
		t.Fatalf("got reply %d (errno %v), want the read's", res.handle, res.errno)
	}
	c.nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	c.write(make([]byte, 124<<10))
	if res := c.simpleReply(0); res.handle != 2 || res.errno != 0 {
		t.Fatalf("got reply %d (errno %v), want the write's", res.handle, res.errno)
	}
}
