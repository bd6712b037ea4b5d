package server

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/nbd"
)

func pattern(n int, seed uint64) []byte {
	b := make([]byte, n)
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	rand.NewChaCha8(key).Read(b)
	return b
}

func TestRequests(t *testing.T) {
	const size = 4 << 20
	for _, place := range []string{"disk", "tmpfs"} {
		for _, structured := range []bool{false, true} {
			name := place + "/simple"
			if structured {
				name = place + "/structured"
			}
			t.Run(name, func(t *testing.T) {
				dir := t.TempDir()
				if place == "tmpfs" {
					dir = memoryDir(t)
				}
				disk, path := fileExportIn(t, dir, "disk", size, false)
				ro, _ := fileExportIn(t, dir, "ro", size, true)
				ts := startServer(t, nil, disk, ro)
				c := dialRaw(t, ts.addr)
				c.open("disk", structured)

				tests := []struct {
					name    string
					req     nbd.RequestHeader
					payload []byte
					want    nbd.Errno
				}{
					{"write", nbd.RequestHeader{Command: nbd.CmdWrite, Offset: 4096, Length: 8192}, pattern(8192, 1), 0},
					{"write FUA unaligned", nbd.RequestHeader{Command: nbd.CmdWrite, Flags: nbd.CmdFlagFUA, Offset: 100001, Length: 777}, pattern(777, 2), 0},
					{"write to the last byte", nbd.RequestHeader{Command: nbd.CmdWrite, Offset: size - 10, Length: 10}, pattern(10, 3), 0},
					{"write past the end", nbd.RequestHeader{Command: nbd.CmdWrite, Offset: size - 10, Length: 11}, pattern(11, 4), nbd.ENOSPC},
					{"write at an overflowing offset", nbd.RequestHeader{Command: nbd.CmdWrite, Offset: 1<<64 - 1, Length: 2}, []byte{1, 2}, nbd.ENOSPC},
					{"read past the end", nbd.RequestHeader{Command: nbd.CmdRead, Offset: size, Length: 1}, nil, nbd.EINVAL},
					{"read at an overflowing offset", nbd.RequestHeader{Command: nbd.CmdRead, Offset: 1<<64 - 512, Length: 1024}, nil, nbd.EINVAL},
					{"flush", nbd.RequestHeader{Command: nbd.CmdFlush}, nil, 0},
					{"trim", nbd.RequestHeader{Command: nbd.CmdTrim, Offset: 1 << 20, Length: 1 << 20}, nil, 0},
					{"trim past the end", nbd.RequestHeader{Command: nbd.CmdTrim, Offset: size - 1, Length: 2}, nil, nbd.EINVAL},
					{"write zeroes", nbd.RequestHeader{Command: nbd.CmdWriteZeroes, Offset: 4096, Length: 4096}, nil, 0},
					{"write zeroes no hole", nbd.RequestHeader{Command: nbd.CmdWriteZeroes, Flags: nbd.CmdFlagNoHole, Offset: 0, Length: 4096}, nil, 0},
					{"write zeroes fast", nbd.RequestHeader{Command: nbd.CmdWriteZeroes, Flags: nbd.CmdFlagFastZero, Offset: 8192, Length: 4096}, nil, 0},
					{"write zeroes past the end", nbd.RequestHeader{Command: nbd.CmdWriteZeroes, Offset: size, Length: 1}, nil, nbd.ENOSPC},
					{"cache", nbd.RequestHeader{Command: nbd.CmdCache, Offset: 0, Length: 65536}, nil, 0},
					{"unknown command", nbd.RequestHeader{Command: 77, Offset: 0, Length: 0}, nil, nbd.EINVAL},
					{"resize is not offered", nbd.RequestHeader{Command: nbd.CmdResize, Offset: size * 2}, nil, nbd.EINVAL},
					{"unknown flag", nbd.RequestHeader{Command: nbd.CmdFlush, Flags: 1 << 12}, nil, nbd.EINVAL},
					{"flag of another command", nbd.RequestHeader{Command: nbd.CmdWrite, Flags: nbd.CmdFlagNoHole, Offset: 0, Length: 1}, []byte{1}, nbd.EINVAL},
					{"read of length 0", nbd.RequestHeader{Command: nbd.CmdRead, Offset: 0, Length: 0}, nil, 0},
					{"write of length 0", nbd.RequestHeader{Command: nbd.CmdWrite, Offset: 0, Length: 0}, nil, 0},
				}
				if !structured {
					tests = append(tests,
						struct {
							name    string
							req     nbd.RequestHeader
							payload []byte
							want    nbd.Errno
						}{"DF without structured replies", nbd.RequestHeader{Command: nbd.CmdRead, Flags: nbd.CmdFlagDF, Length: 512}, nil, nbd.EINVAL},
						struct {
							name    string
							req     nbd.RequestHeader
							payload []byte
							want    nbd.Errno
						}{"block status without a meta context", nbd.RequestHeader{Command: nbd.CmdBlockStatus, Length: 512}, nil, nbd.EINVAL},
					)
				}
				for i, tt := range tests {
					t.Run(tt.name, func(t *testing.T) {
						tt.req.Handle = uint64(1000 + i)
						c.request(tt.req, tt.payload)
						res := c.reply(0)
						if res.handle != tt.req.Handle || res.errno != tt.want {
							t.Errorf("got handle %d errno %v (%s), want handle %d errno %v", res.handle, res.errno, res.msg, tt.req.Handle, tt.want)
						}
						if structured && tt.want != 0 && res.msg == "" {
							t.Error("structured error reply has no message")
						}
					})
				}

				// What the file holds must match what was acknowledged.
				got, err := os.ReadFile(path)
				if err != nil {
					t.Fatal(err)
				}
				want := make([]byte, size)
				copy(want[4096:], pattern(8192, 1))
				copy(want[100001:], pattern(777, 2))
				copy(want[size-10:], pattern(10, 3))
				clear(want[0:4096])
				clear(want[4096:8192])
				clear(want[8192:12288])
				if !bytes.Equal(got, want) {
					t.Error("file contents differ from the acknowledged writes")
				}

				// Reads return what was written, unaligned too.
				c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: 7, Offset: 100001 - 3, Length: 777 + 6}, nil)
				res := c.reply(777 + 6)
				if res.errno != 0 {
					t.Fatalf("read: %v %s", res.errno, res.msg)
				}
				if diff := cmp.Diff(want[100001-3:100001+777+3], assemble(t, res, 100001-3, 777+6)); diff != "" {
					t.Errorf("read back (-want +got):\n%s", diff)
				}

				// The read-only export refuses writes, trims and zeroes.
				r := dialRaw(t, ts.addr)
				r.open("ro", structured)
				for _, req := range []nbd.RequestHeader{
					{Command: nbd.CmdWrite, Handle: 1, Length: 3},
					{Command: nbd.CmdTrim, Handle: 2, Length: 512},
					{Command: nbd.CmdWriteZeroes, Handle: 3, Length: 512},
				} {
					var payload []byte
					if req.Command == nbd.CmdWrite {
						payload = []byte{1, 2, 3}
					}
					r.request(req, payload)
					if res := r.reply(0); res.errno != nbd.EPERM {
						t.Errorf("%v on read-only export: %v, want EPERM", req.Command, res.errno)
					}
				}
			})
		}
	}
}

// assemble turns a read reply into the bytes of [off, off+n), checking that
// the chunks cover the range exactly once.
func assemble(t testing.TB, res result, off uint64, n int) []byte {
	t.Helper()
	if res.whole != nil {
		if len(res.whole) != n {
			t.Fatalf("simple reply of %d bytes, want %d", len(res.whole), n)
		}
		return res.whole
	}
	out := make([]byte, n)
	covered := make([]bool, n)
	mark := func(start uint64, length int) {
		if start < off || start+uint64(length) > off+uint64(n) {
			t.Fatalf("chunk [%d, +%d) outside the request [%d, +%d)", start, length, off, n)
		}
		for i := range length {
			if covered[int(start-off)+i] {
				t.Fatalf("chunks overlap at %d", start+uint64(i))
			}
			covered[int(start-off)+i] = true
		}
	}
	for o, d := range res.data {
		mark(o, len(d))
		copy(out[o-off:], d)
	}
	for o, l := range res.holes {
		mark(o, int(l))
	}
	for i, c := range covered {
		if !c {
			t.Fatalf("byte %d not covered by any chunk", off+uint64(i))
		}
	}
	return out
}

func TestSparseReadsAndBlockStatus(t *testing.T) {
	const size = 1 << 20
	disk, path := fileExport(t, "disk", size, false)
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	data := pattern(64<<10, 9)
	if _, err := f.WriteAt(data, 256<<10); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if !hasHoles(t, path) {
		t.Skip("the file system under t.TempDir() does not report holes (SEEK_HOLE)")
	}
	ts := startServer(t, nil, disk)
	c := dialRaw(t, ts.addr)
	c.open("disk", true)

	want := make([]byte, size)
	copy(want[256<<10:], data)

	c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: 1, Length: size}, nil)
	res := c.reply(0)
	if res.errno != 0 {
		t.Fatalf("read: %v", res.errno)
	}
	if len(res.holes) == 0 {
		t.Error("a sparse read sent no hole chunks")
	}
	if !bytes.Equal(assemble(t, res, 0, size), want) {
		t.Error("sparse read differs from the file")
	}

	c.request(nbd.RequestHeader{Command: nbd.CmdRead, Flags: nbd.CmdFlagDF, Handle: 2, Length: size}, nil)
	res = c.reply(0)
	if len(res.data) != 1 || len(res.holes) != 0 {
		t.Errorf("DF read: %d data and %d hole chunks, want exactly one data chunk", len(res.data), len(res.holes))
	}
	if !bytes.Equal(assemble(t, res, 0, size), want) {
		t.Error("DF read differs from the file")
	}

	tests := []struct {
		name  string
		req   nbd.RequestHeader
		want  []nbd.Extent
		errno nbd.Errno
	}{
		{"whole export", nbd.RequestHeader{Command: nbd.CmdBlockStatus, Length: size}, []nbd.Extent{
			{Length: 256 << 10, Flags: nbd.StateHole | nbd.StateZero},
			{Length: 64 << 10},
			{Length: size - 320<<10, Flags: nbd.StateHole | nbd.StateZero},
		}, 0},
		{"inside the data", nbd.RequestHeader{Command: nbd.CmdBlockStatus, Offset: 260 << 10, Length: 4096}, []nbd.Extent{{Length: 4096}}, 0},
		{"req one", nbd.RequestHeader{Command: nbd.CmdBlockStatus, Flags: nbd.CmdFlagReqOne, Length: size}, []nbd.Extent{
			{Length: 256 << 10, Flags: nbd.StateHole | nbd.StateZero}}, 0},
		{"length 0", nbd.RequestHeader{Command: nbd.CmdBlockStatus, Length: 0}, nil, nbd.EINVAL},
		{"past the end", nbd.RequestHeader{Command: nbd.CmdBlockStatus, Offset: size - 1, Length: 2}, nil, nbd.EINVAL},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.req.Handle = uint64(10 + i)
			c.request(tt.req, nil)
			res := c.reply(0)
			if res.errno != tt.errno {
				t.Fatalf("errno %v (%s), want %v", res.errno, res.msg, tt.errno)
			}
			if diff := cmp.Diff(tt.want, res.status); diff != "" {
				t.Errorf("extents (-want +got):\n%s", diff)
			}
		})
	}

	// Trim punches a hole that block status then reports.
	c.request(nbd.RequestHeader{Command: nbd.CmdTrim, Handle: 20, Offset: 256 << 10, Length: 64 << 10}, nil)
	if res := c.reply(0); res.errno != 0 {
		t.Fatalf("trim: %v", res.errno)
	}
	c.request(nbd.RequestHeader{Command: nbd.CmdBlockStatus, Handle: 21, Length: size}, nil)
	if diff := cmp.Diff([]nbd.Extent{{Length: size, Flags: nbd.StateHole | nbd.StateZero}}, c.reply(0).status); diff != "" {
		t.Errorf("after trim (-want +got):\n%s", diff)
	}
}

func hasHoles(t testing.TB, path string) bool {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	off, err := unix.Seek(int(f.Fd()), 0, unix.SEEK_DATA)
	return err == nil && off > 0
}

func TestRepliesAreOutOfOrder(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	release := make(chan struct{})
	hb := &hookBackend{Backend: disk.Backend, onRead: func(off int64) error {
		if off == 0 {
			<-release // the first read waits until the second is answered
		}
		return nil
	}}
	disk.Backend = hb
	ts := startServer(t, nil, disk)
	c := dialRaw(t, ts.addr)
	c.open("disk", false)
	c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: 1, Offset: 0, Length: 512}, nil)
	c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: 2, Offset: 4096, Length: 512}, nil)
	if res := c.simpleReply(512); res.handle != 2 {
		t.Fatalf("first reply for handle %d, want 2 (the unblocked request)", res.handle)
	}
	close(release)
	if res := c.simpleReply(512); res.handle != 1 {
		t.Fatalf("second reply for handle %d, want 1", res.handle)
	}
}

func TestFailedIOIsAnErrorReplyNotADisconnect(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	hb := &hookBackend{Backend: disk.Backend,
		onRead: func(off int64) error {
			if off == 8192 {
				return &os.PathError{Op: "pread", Path: "disk", Err: syscall.EIO}
			}
			return nil
		},
		onWrite: func(off int64) error {
			if off == 8192 {
				return &os.PathError{Op: "pwrite", Path: "disk", Err: syscall.ENOSPC}
			}
			return nil
		},
	}
	disk.Backend = hb
	ts := startServer(t, nil, disk)
	for _, structured := range []bool{false, true} {
		c := dialRaw(t, ts.addr)
		c.open("disk", structured)
		c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: 1, Offset: 8192, Length: 512}, nil)
		if res := c.reply(512); res.errno != nbd.EIO {
			t.Errorf("failed read: errno %v, want EIO", res.errno)
		}
		c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 2, Offset: 8192, Length: 4}, []byte{1, 2, 3, 4})
		if res := c.reply(0); res.errno != nbd.ENOSPC {
			t.Errorf("failed write: errno %v, want ENOSPC", res.errno)
		}
		c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: 3, Offset: 0, Length: 512}, nil)
		if res := c.reply(512); res.errno != 0 || res.handle != 3 {
			t.Errorf("read after failures: %+v", res)
		}
	}
}

// With CAN_MULTI_CONN a FLUSH on one connection covers writes acknowledged
// on another: the backend must see the write before the flush, and both
// connections share one descriptor.
func TestFlushCoversOtherConnections(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	hb := &hookBackend{Backend: disk.Backend}
	disk.Backend = hb
	ts := startServer(t, nil, disk)
	a, b := dialRaw(t, ts.addr), dialRaw(t, ts.addr)
	a.open("disk", false)
	if info := b.open("disk", false); info.Flags&nbd.FlagCanMultiConn == 0 {
		t.Fatal("CAN_MULTI_CONN not advertised")
	}
	a.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 1, Offset: 0, Length: 4}, []byte("abcd"))
	if res := a.simpleReply(0); res.errno != 0 {
		t.Fatal(res.errno)
	}
	b.request(nbd.RequestHeader{Command: nbd.CmdFlush, Handle: 2}, nil)
	if res := b.simpleReply(0); res.errno != 0 {
		t.Fatal(res.errno)
	}
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if diff := cmp.Diff([]string{"write 0", "flush"}, hb.events); diff != "" {
		t.Errorf("backend calls (-want +got):\n%s", diff)
	}
}

func TestManyRequestsInFlight(t *testing.T) {
	const n = 4096
	disk, path := fileExport(t, "disk", 8<<20, false)
	ts := startServer(t, &Config{MaxInFlight: 16, MaxInFlightBytes: 1 << 20}, disk)
	c := dialRaw(t, ts.addr)
	c.open("disk", true)
	// Send everything without reading: the server must keep up by
	// back-pressure, not by buffering without bound or deadlocking.
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range n {
			off := uint64(i%2048) * 4096
			c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: uint64(i), Offset: off, Length: 4096}, pattern(4096, uint64(i%2048)))
		}
	}()
	seen := map[uint64]bool{}
	for range n {
		res := c.reply(0)
		if res.errno != 0 || seen[res.handle] {
			t.Fatalf("reply %+v (seen before: %v)", res, seen[res.handle])
		}
		seen[res.handle] = true
	}
	wg.Wait()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2048 {
		if !bytes.Equal(got[i*4096:(i+1)*4096], pattern(4096, uint64(i))) {
			t.Fatalf("block %d differs", i)
		}
	}
}

func TestDrainAnswersInFlightRequests(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	entered := make(chan struct{})
	release := make(chan struct{})
	hb := &hookBackend{Backend: disk.Backend, onWrite: func(int64) error {
		close(entered)
		<-release
		return nil
	}}
	disk.Backend = hb
	ts := startServer(t, nil, disk)
	c := dialRaw(t, ts.addr)
	c.open("disk", false)
	c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 42, Length: 4}, []byte("data"))
	<-entered
	stopped := make(chan error, 1)
	go func() { stopped <- ts.stop(t) }()
	close(release)
	if res := c.simpleReply(0); res.handle != 42 || res.errno != 0 {
		t.Fatalf("in-flight write during drain: %+v", res)
	}
	if err := <-stopped; err != nil {
		t.Fatalf("Serve returned %v, want nil", err)
	}
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if diff := cmp.Diff([]string{"write 0", "flush"}, hb.events); diff != "" {
		t.Errorf("backend calls (-want +got):\n%s", diff)
	}
	c.expectClosed()
}

// writesObserver counts the writes answered without error, and says when
// there have been at least n.
type writesObserver struct {
	answered atomic.Int64
	n        int64
	reached  chan struct{}
	once     sync.Once
}

func (o *writesObserver) ForExport(string) ExportObserver { return o }

func (o *writesObserver) Request(cmd nbd.Command, _ int, _ time.Duration, errno nbd.Errno) {
	if cmd == nbd.CmdWrite && errno == 0 && o.answered.Add(1) >= o.n {
		o.once.Do(func() { close(o.reached) })
	}
}

// A drained client that is still sending gets every reply to what the
// server did, then an end of file, not a reset: closing a socket with
// requests unread in it would make Linux drop the replies still queued.
func TestDrainDeliversEveryReplyToAClientStillSending(t *testing.T) {
	const writes = 500 // 8000 bytes of replies: more than the client's window
	obs := &writesObserver{n: writes, reached: make(chan struct{})}
	e, _ := fileExport(t, "d", 64<<20, false)
	ts := startServer(t, &Config{Observer: obs}, e)
	done, sent := make(chan struct{}), make(chan struct{})
	served = func(x *Export) {
		if x == e {
			close(done)
			<-sent
		}
	}
	t.Cleanup(func() { served = func(*Export) {} })
	c := dialRaw(t, ts.addr)
	// A window smaller than the replies to come keeps some of them
	// queued on the server's side until the client reads.
	if err := c.nc.(*net.TCPConn).SetReadBuffer(4096); err != nil {
		t.Fatal(err)
	}
	c.open("d", false)
	payload := make([]byte, 512)
	var reqs []byte
	for i := range uint64(writes) {
		reqs, _ = nbd.RequestHeader{Command: nbd.CmdWrite, Handle: i, Offset: i * 512, Length: 512}.AppendBinary(reqs)
		reqs = append(reqs, payload...)
	}
	c.write(reqs)
	waitOrFail(t, obs.reached, "the server to answer every write")
	e.DrainClients()
	waitOrFail(t, done, "the drained connection to be served") // every reply is sent, none read
	// The client sends on: the server has not read this.
	c.write(reqs[:16+512])
	close(sent)
	var received int64
	var err error
	for {
		var reply [16]byte
		if _, err = io.ReadFull(c.r, reply[:]); err != nil {
			break
		}
		if binary.BigEndian.Uint32(reply[4:8]) == 0 {
			received++
		}
	}
	if !errors.Is(err, io.EOF) {
		t.Errorf("the drained connection ended with %v, want an end of file", err)
	}
	if received != writes {
		t.Errorf("received %d replies of the %d writes the server answered", received, writes)
	}
}

// A client drained while its handshake ends (its export withdrawn just
// then) is drained: clearing the handshake's deadline does not undo it.
func TestDrainAtTheEndOfTheHandshake(t *testing.T) {
	e, _ := fileExport(t, "d", 1<<20, false)
	ts := startServer(t, nil, e)
	handshaken = func(x *Export) {
		if x == e {
			e.DrainClients()
		}
	}
	t.Cleanup(func() { handshaken = func(*Export) {} })
	c := dialRaw(t, ts.addr)
	c.open("d", false)
	c.request(nbd.RequestHeader{Command: nbd.CmdFlush, Handle: 1}, nil)
	c.expectClosed()
}

// waitOrFail waits for ch to close, failing the test if that takes longer
// than any run of it could.
func waitOrFail(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(30 * time.Second):
		t.Fatalf("waited 30 s for %s", what)
	}
}

// A drained client that resets its connection instead of taking the last
// replies is let go at once, not waited for until the linger's end.
func TestDrainLetsGoOfAClientThatResets(t *testing.T) {
	linger := lingerLimit
	lingerLimit = time.Hour // longer than any test: only the reset ends the wait
	t.Cleanup(func() { lingerLimit = linger })
	const writes = 500
	obs := &writesObserver{n: writes, reached: make(chan struct{})}
	e, _ := fileExport(t, "d", 64<<20, false)
	ts := startServer(t, &Config{Observer: obs, DrainTimeout: time.Hour}, e)
	done := make(chan struct{})
	served = func(x *Export) {
		if x == e {
			close(done)
		}
	}
	t.Cleanup(func() { served = func(*Export) {} })
	c := dialRaw(t, ts.addr)
	tcp := c.nc.(*net.TCPConn)
	if err := tcp.SetReadBuffer(4096); err != nil { // replies stay queued on the server
		t.Fatal(err)
	}
	c.open("d", false)
	var reqs []byte
	for i := range uint64(writes) {
		reqs, _ = nbd.RequestHeader{Command: nbd.CmdWrite, Handle: i, Offset: i * 512, Length: 512}.AppendBinary(reqs)
		reqs = append(reqs, make([]byte, 512)...)
	}
	c.write(reqs)
	waitOrFail(t, obs.reached, "the server to answer every write")
	e.DrainClients()
	waitOrFail(t, done, "the drained connection to be served")
	tcp.SetLinger(0)
	tcp.Close() // a reset, with replies unread
	// stop fails the test if the server takes 20 s.
	if err := ts.stop(t); err != nil {
		t.Errorf("stop: %v", err)
	}
}
