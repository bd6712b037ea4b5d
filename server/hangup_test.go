package server

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/nbd"
)

// A write the Linux client resent after a timeout, and the newer write behind
// it, must not be overwritten by the first copy, still held by a stalled
// server when the client hung up on it (see hangup.go). These tests stall a
// write in the backend, hang up the way nbd_xmit_timeout does (shutdown of
// both directions), and write again on a second connection.

// hangupRig is one export on a hooked file backend, served with one worker and
// two slots per connection, so a test controls what waits where.
type hangupRig struct {
	t        *testing.T
	ts       *testServer
	disk     *Export
	hb       *hookBackend
	accepted chan net.Conn    // the server's side of each connection
	seen     chan seenRequest // each request a worker answered (or dropped)
	stalled  chan int64       // offsets of writes held in the backend
	release  map[int64]chan struct{}
}

type seenRequest struct {
	cmd   nbd.Command
	bytes int
	errno nbd.Errno
}

type seenRequests chan seenRequest

func (s seenRequests) ForExport(string) ExportObserver { return s }

func (s seenRequests) Request(cmd nbd.Command, n int, _ time.Duration, errno nbd.Errno) {
	s <- seenRequest{cmd, n, errno}
}

// hookNoWait lets the reader do small writes itself, past the hooks.
type hookNoWait struct {
	*hookBackend
	noWaiter
}

// acceptedListener passes on the server's side of every connection.
type acceptedListener struct {
	net.Listener
	conns chan net.Conn
}

func (l *acceptedListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err == nil {
		l.conns <- nc
	}
	return nc, err
}

// newHangupRig serves one export; the first write at each of stallAt that
// reaches a worker waits in the backend until the test releases it. With
// inline, the export is on tmpfs and the reader does small writes itself.
func newHangupRig(t *testing.T, inline bool, stallAt ...int64) *hangupRig {
	dir := t.TempDir()
	if inline {
		dir = memoryDir(t)
	}
	disk, _ := fileExportIn(t, dir, "disk", 1<<20, false)
	nw := disk.Backend.(noWaiter)
	rig := &hangupRig{t: t, disk: disk, accepted: make(chan net.Conn, 8), seen: make(chan seenRequest, 64),
		stalled: make(chan int64, len(stallAt)), release: map[int64]chan struct{}{}}
	for _, off := range stallAt {
		rig.release[off] = make(chan struct{})
	}
	stalls := map[int64]bool{}
	rig.hb = &hookBackend{Backend: disk.Backend, onWrite: func(off int64) error {
		rig.hb.mu.Lock()
		ch, stall := rig.release[off]
		stall = stall && !stalls[off]
		stalls[off] = true
		rig.hb.mu.Unlock()
		if stall {
			rig.stalled <- off
			<-ch
		}
		return nil
	}}
	disk.Backend = rig.hb
	if inline {
		disk.Backend = hookNoWait{rig.hb, nw}
	}
	cfg := Config{Workers: 1, MaxInFlight: 2, NoSplice: true, NoInline: !inline, Observer: seenRequests(rig.seen)}
	rig.ts = fenceServerWith(t, cfg, disk, func(ln net.Listener) net.Listener {
		return &acceptedListener{Listener: ln, conns: rig.accepted}
	})
	return rig
}

// dial opens a connection with simple replies, and returns the server's side
// of it too.
func (rig *hangupRig) dial() (*rawClient, net.Conn) {
	rig.t.Helper()
	c := dialRaw(rig.t, rig.ts.addr)
	c.open("disk", false)
	select {
	case nc := <-rig.accepted:
		return c, nc
	case <-time.After(10 * time.Second):
		rig.t.Fatal("the server accepted no connection")
		return nil, nil
	}
}

// write sends a write of data at off with handle h, without waiting.
func write(c *rawClient, h uint64, off uint64, data []byte) {
	c.t.Helper()
	c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: h, Offset: off, Length: uint32(len(data))}, data)
}

// writeAndWait writes and asserts the write succeeded.
func writeAndWait(c *rawClient, h uint64, off uint64, data []byte) {
	c.t.Helper()
	write(c, h, off, data)
	if r := c.simpleReply(0); r.handle != h || r.errno != 0 {
		c.t.Fatalf("write %d: handle %d, errno %v", h, r.handle, r.errno)
	}
}

// readBack reads length bytes at off.
func readBack(c *rawClient, off uint64, length int) []byte {
	c.t.Helper()
	c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: 99, Offset: off, Length: uint32(length)}, nil)
	r := c.simpleReply(length)
	if r.errno != 0 {
		c.t.Fatalf("read: %v", r.errno)
	}
	return r.whole
}

func (rig *hangupRig) waitStalled(off int64) {
	rig.t.Helper()
	select {
	case got := <-rig.stalled:
		if got != off {
			rig.t.Fatalf("write at %d stalled, want %d", got, off)
		}
	case <-time.After(10 * time.Second):
		rig.t.Fatalf("no write reached the backend at %d", off)
	}
}

// waitSeen waits for a worker to be done with a request of n bytes.
func (rig *hangupRig) waitSeen(n int) seenRequest {
	rig.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case s := <-rig.seen:
			if s.bytes == n {
				return s
			}
		case <-deadline:
			rig.t.Fatalf("no request of %d bytes was answered (a worker waits for a reader that waits for it?)", n)
		}
	}
}

// resendAfterHangUp does what a kernel client does once it has hung up on a
// connection with W1 (8 KiB of A at x) still unanswered: on a second
// connection it writes W1 again, then the guest's next write, B, over the same
// blocks. It then lets the write stalled at stallOff go, and checks that the
// first connection's copy of W1 is dropped (ESHUTDOWN) and B stays.
func (rig *hangupRig) resendAfterHangUp(stallOff, x int64) {
	t := rig.t
	t.Helper()
	c2, _ := rig.dial()
	writeAndWait(c2, 5, uint64(x), fill('A', 8192)) // W1 resent
	writeAndWait(c2, 6, uint64(x), fill('B', 8192)) // the guest's next write
	rig.forgetSeen()
	close(rig.release[stallOff])
	if s := rig.waitSeen(8192); s.errno != nbd.ESHUTDOWN {
		t.Errorf("the first copy of W1 was answered with %v, want dropped (ESHUTDOWN)", s.errno)
	}
	if got := readBack(c2, uint64(x), 8192); !bytes.Equal(got, fill('B', 8192)) {
		t.Fatalf("the blocks hold %q..., want the newer write's B: the old copy landed over it", got[:8])
	}
}

// forgetSeen forgets the requests answered so far.
func (rig *hangupRig) forgetSeen() {
	for {
		select {
		case <-rig.seen:
		default:
			return
		}
	}
}

// shutdown shuts a client's socket down in both directions, as Linux's nbd
// client does to a connection whose request timed out.
func shutdown(t *testing.T, nc net.Conn, how int) {
	t.Helper()
	rc, err := nc.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.Shutdown(int(fd), how) }); err != nil || serr != nil {
		t.Fatalf("shutdown: %v %v", err, serr)
	}
}

// waitHungUp waits, in poll(2), until the server's side of a connection has
// the client's FIN.
func waitHungUp(t *testing.T, nc net.Conn) {
	t.Helper()
	rc, err := nc.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var perr error
	fds := []unix.PollFd{{Events: unix.POLLRDHUP}}
	rc.Control(func(fd uintptr) {
		fds[0].Fd = int32(fd)
		for n, perr = unix.Poll(fds, 10_000); perr == unix.EINTR; n, perr = unix.Poll(fds, 10_000) {
		}
	})
	if perr != nil || n != 1 {
		t.Fatalf("the server's socket did not see the client hang up: %d %v", n, perr)
	}
}

func fill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

// A write read off a connection before its client hung up, and not started
// until the client had written the same blocks twice more elsewhere, is
// dropped: here it waits in the queue behind a stalled write, and the reader
// waits for the slots both hold, so it has not reached the hang-up either.
func TestWriteOfAClientThatHungUpIsNotDoneLate(t *testing.T) {
	const stallOff, x, other = 0, 64 << 10, 128 << 10
	rig := newHangupRig(t, false, stallOff)
	c1, s1 := rig.dial()
	write(c1, 1, stallOff, fill('0', 4096))
	rig.waitStalled(stallOff)
	write(c1, 2, x, fill('A', 8192))     // W1: queued behind the stalled write
	write(c1, 3, other, fill('b', 4096)) // takes the stalled write's slot once it is done
	write(c1, 4, other, fill('c', 4096)) // the reader waits for a slot
	shutdown(t, c1.nc, unix.SHUT_RDWR)
	waitHungUp(t, s1)

	rig.resendAfterHangUp(stallOff, x)
	if n := rig.ts.srv.abandonedWrites.Load(); n < 1 {
		t.Errorf("abandonedWrites = %d, want at least W1", n)
	}
}

// The same on the reader's own path: the write waited in the socket while the
// reader waited for a slot, and is read, small and to tmpfs, after the
// hang-up.
func TestSmallWriteOfAClientThatHungUpIsNotDoneLate(t *testing.T) {
	const stallOff, x, other = 0, 64 << 10, 128 << 10
	rig := newHangupRig(t, true, stallOff)
	c1, s1 := rig.dial()
	c1.request(nbd.RequestHeader{Command: nbd.CmdWrite, Flags: nbd.CmdFlagFUA, Handle: 1, Offset: stallOff, Length: 4096}, fill('0', 4096))
	rig.waitStalled(stallOff) // a durable write goes to the worker
	c1.request(nbd.RequestHeader{Command: nbd.CmdFlush, Handle: 2}, nil)
	write(c1, 3, x, fill('A', 8192)) // W1: no slot left for it
	write(c1, 4, other, fill('c', 4096))
	// Only the client's sending side: its socket takes the replies, so
	// the server does not learn of the hang-up from a reset to one.
	shutdown(t, c1.nc, unix.SHUT_WR)
	waitHungUp(t, s1)

	rig.resendAfterHangUp(stallOff, x)
	if rig.ts.srv.inlined.Load() == 0 {
		t.Error("the reader did no write itself: the test no longer tests its path")
	}
}

// A write that started before its client hung up holds its blocks: the copy
// resent on another connection waits for it, and the newer write comes after
// both.
func TestResentWriteWaitsForTheFirstCopy(t *testing.T) {
	const x = 64 << 10
	rig := newHangupRig(t, false, x)
	held := make(chan struct{}, 4)
	rig.disk.ranges().waitHook = func() { held <- struct{}{} }
	c1, s1 := rig.dial()
	write(c1, 1, x, fill('A', 12288)) // W1, in the backend
	rig.waitStalled(x)
	shutdown(t, c1.nc, unix.SHUT_RDWR)
	waitHungUp(t, s1)

	c2, _ := rig.dial()
	write(c2, 2, x, fill('A', 12288)) // W1 resent
	select {
	case <-held:
		close(rig.release[x])
		c2.simpleReply(0)
		writeAndWait(c2, 3, x, fill('B', 8192))
	case <-rig.seen: // only the resent copy can be answered meanwhile
		// No range lock: the first copy is still in the backend.
		c2.simpleReply(0)
		writeAndWait(c2, 3, x, fill('B', 8192))
		close(rig.release[x])
		rig.waitSeen(12288)
	case <-time.After(10 * time.Second):
		t.Fatal("the resent write neither waited for the first copy nor was answered")
	}
	if got := readBack(c2, x, 8192); !bytes.Equal(got, fill('B', 8192)) {
		t.Fatalf("the blocks hold %q..., want the newer write's B", got[:8])
	}
}

// A client may send NBD_CMD_DISC behind writes it has not seen answered, shut
// its side down, and wait for the replies (libnbd does): the spec wants every
// request before DISC done, so a hang-up after DISC drops nothing.
func TestWritesBeforeDiscAreDoneAfterAHangUp(t *testing.T) {
	const stallOff, x, other = 0, 64 << 10, 128 << 10
	rig := newHangupRig(t, false, stallOff)
	c1, s1 := rig.dial()
	write(c1, 1, stallOff, fill('0', 4096))
	rig.waitStalled(stallOff)
	write(c1, 2, x, fill('A', 8192))
	write(c1, 3, other, fill('b', 4096))
	write(c1, 4, other, fill('c', 4096)) // the reader waits for a slot
	c1.request(nbd.RequestHeader{Command: nbd.CmdDisc}, nil)
	shutdown(t, c1.nc, unix.SHUT_WR)
	waitHungUp(t, s1)
	close(rig.release[stallOff])

	answered := map[uint64]nbd.Errno{}
	for range 4 {
		r := c1.simpleReply(0)
		answered[r.handle] = r.errno
	}
	for h := uint64(1); h <= 4; h++ {
		if errno, ok := answered[h]; !ok || errno != 0 {
			t.Errorf("write %d: answered %v, errno %v; want done", h, ok, errno)
		}
	}
	c1.expectClosed()
	c2, _ := rig.dial()
	if got := readBack(c2, x, 8192); !bytes.Equal(got, fill('A', 8192)) {
		t.Fatalf("the blocks hold %q..., want the write sent before DISC", got[:8])
	}
	if got := readBack(c2, other, 4096); !bytes.Equal(got, fill('c', 4096)) {
		t.Fatalf("the last write before DISC left %q...", got[:8])
	}
}

func TestRangeLockOverlaps(t *testing.T) {
	for _, tc := range []struct {
		a, b span
		want bool
	}{
		{span{0, 10}, span{10, 20}, false},
		{span{0, 10}, span{9, 20}, true},
		{span{5, 6}, span{0, 100}, true},
		{span{0, 100}, span{5, 6}, true},
		{span{20, 30}, span{0, 20}, false},
		{span{0, 1}, span{0, 1}, true},
	} {
		if got := tc.a.overlaps(tc.b); got != tc.want {
			t.Errorf("%v overlaps %v = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}

func TestRangeLock(t *testing.T) {
	var l rangeLock
	waited := make(chan struct{}, 1)
	l.waitHook = func() { waited <- struct{}{} }
	a := l.lock(0, 4096)
	if _, ok := l.tryLock(4095, 8192); ok {
		t.Fatal("tryLock took a range overlapping a held one")
	}
	b, ok := l.tryLock(4096, 8192)
	if !ok {
		t.Fatal("tryLock refused a range next to a held one")
	}
	if s := l.lock(10, 10); s != (span{10, 10}) {
		t.Fatalf("an empty range: %v", s)
	}
	got := make(chan span)
	go func() { got <- l.lock(0, 8192) }()
	<-waited
	l.unlock(a)
	<-waited // woken by a's unlock, and waiting again for b
	l.unlock(b)
	c := <-got
	if len(l.held) != 1 || l.held[0] != c {
		t.Fatalf("held %v, want only %v", l.held, c)
	}
	l.unlock(c)
	if len(l.held) != 0 {
		t.Fatalf("held %v after every unlock", l.held)
	}
}

func TestEndsWithDisc(t *testing.T) {
	hdr := func(cmd nbd.Command, length uint32) []byte {
		b, _ := nbd.RequestHeader{Command: cmd, Length: length}.AppendBinary(nil)
		return b
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	disc := hdr(nbd.CmdDisc, 0)
	for _, tc := range []struct {
		name   string
		stream []byte
		skip   int
		want   bool
	}{
		{"nothing", nil, 0, false},
		{"disc alone", disc, 0, true},
		{"after a payload", cat(fill('x', 100), disc), 100, true},
		{"payload cut short", fill('x', 50), 100, false},
		{"write then disc", cat(hdr(nbd.CmdWrite, 512), fill(0, 512), disc), 0, true},
		{"disc inside a payload is data", cat(hdr(nbd.CmdWrite, uint32(len(disc))), disc), 0, false},
		{"read then disc", cat(hdr(nbd.CmdRead, 4096), disc), 0, true},
		{"no disc", cat(hdr(nbd.CmdFlush, 0), hdr(nbd.CmdRead, 512)), 0, false},
		{"half a header", disc[:20], 0, false},
		{"garbage", cat(fill(0xff, 28), disc), 0, false},
		{"oversized write", cat(hdr(nbd.CmdWrite, maxPayload+1), disc), 0, false},
	} {
		if got := endsWithDisc(tc.stream, tc.skip); got != tc.want {
			t.Errorf("%s: endsWithDisc = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// FuzzEndsWithDisc: the scan never panics, and agrees with reading the same
// stream one request at a time as the reader does.
func FuzzEndsWithDisc(f *testing.F) {
	b, _ := nbd.RequestHeader{Command: nbd.CmdDisc}.AppendBinary(nil)
	w, _ := nbd.RequestHeader{Command: nbd.CmdWrite, Length: 3}.AppendBinary(nil)
	f.Add(b, 0)
	f.Add(append(append(w, 1, 2, 3), b...), 0)
	f.Add(append([]byte{9, 9}, b...), 2)
	f.Fuzz(func(t *testing.T, stream []byte, skip int) {
		if skip < 0 {
			return
		}
		got := endsWithDisc(stream, skip)
		want := false
		if skip <= len(stream) {
			r := &requestReader{src: bytes.NewReader(stream[skip:]), buf: make([]byte, 64), window: 64}
			for {
				var h [nbd.RequestHeaderSize]byte
				if r.readHeader(h[:]) != nil {
					break
				}
				var req nbd.RequestHeader
				if req.UnmarshalBinary(h[:]) != nil {
					break
				}
				if req.Command == nbd.CmdDisc {
					want = true
					break
				}
				if req.Command == nbd.CmdWrite {
					if req.Length > maxPayload || req.Flags&nbd.CmdFlagPayloadLen != 0 || r.readPayload(make([]byte, req.Length)) != nil {
						break
					}
				}
			}
		}
		if got != want {
			t.Fatalf("endsWithDisc = %v, reading request by request says %v", got, want)
		}
	})
}

// A write waiting for blocks another connection's write holds has not started
// its I/O: a fence of its connection does not wait for that other write, and
// the write is not done after the fence.
func TestFenceDoesNotWaitForAnotherConnectionsWrite(t *testing.T) {
	const x = 64 << 10
	rig := newHangupRig(t, false, x)
	held := make(chan struct{}, 4)
	rig.disk.ranges().waitHook = func() { held <- struct{}{} }
	c1, _ := rig.dial()
	write(c1, 1, x, fill('A', 8192))
	rig.waitStalled(x)

	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	nc, err := d.Dial("tcp", rig.ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	c2 := &rawClient{t: t, nc: nc, r: bufio.NewReader(nc)}
	c2.open("disk", false)
	<-rig.accepted
	write(c2, 2, x, fill('B', 8192))
	<-held // waiting for the stalled write's range

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if cut, err := rig.ts.srv.FenceClient(ctx, Fence{Client: "127.0.0.2", Export: "disk"}); err != nil || cut != 1 {
		t.Fatalf("FenceClient = %d, %v; want the waiting write's connection cut at once", cut, err)
	}
	close(rig.release[x])
	c1.simpleReply(0)
	if writes := writesDone(t, rig.ts, rig.hb); !slices.Equal(writes, []string{"write 65536"}) {
		t.Errorf("backend writes %v: want the stalled write once, and never the fenced one", writes)
	}
}

// An export that replaces one under the same name whose clients are still
// there (a static export a reload changed, an export lvnbd recover reopened)
// shares its range lock: a copy resent on the new export waits for the first
// copy still under way on the old one. Once the old one has no client, the
// new export has a lock of its own.
func TestReplacedExportSharesItsRangeLock(t *testing.T) {
	r := NewRegistry()
	old, _ := fileExport(t, "disk", 1<<20, false)
	if err := r.Add(old); err != nil {
		t.Fatal(err)
	}
	if !old.attach(&clientConn{id: 1, kick: func() {}, drain: func() {}}) {
		t.Fatal("attach refused")
	}
	if _, _, err := r.Remove("disk"); err != nil {
		t.Fatal(err)
	}
	replacing, _ := fileExport(t, "disk", 1<<20, false)
	if err := r.Add(replacing); err != nil {
		t.Fatal(err)
	}
	if replacing.ranges() != old.ranges() {
		t.Error("the export replacing one still in use has a range lock of its own")
	}
	other, _ := fileExport(t, "other", 1<<20, false)
	if err := r.Add(other); err != nil {
		t.Fatal(err)
	}
	if other.ranges() == old.ranges() {
		t.Error("an export under another name shares the range lock")
	}

	old.detach(1) // the last client: the old export closes
	if _, _, err := r.Remove("disk"); err != nil {
		t.Fatal(err)
	}
	r.WaitClosed() // both closed in the background
	<-old.closed
	<-replacing.closed
	third, _ := fileExport(t, "disk", 1<<20, false)
	if err := r.Add(third); err != nil {
		t.Fatal(err)
	}
	if third.ranges() == old.ranges() {
		t.Error("an export replacing one without clients took its range lock")
	}
}
