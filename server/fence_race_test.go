package server

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap/zaptest"

	"github.com/lvnbd/lvnbd/nbd"
)

// fenceServer serves e with an empty fence list, through the listener wrap
// returns if wrap is not nil.
func fenceServer(t *testing.T, e *Export, wrap func(net.Listener) net.Listener, obs Observer) *testServer {
	t.Helper()
	return fenceServerWith(t, Config{Observer: obs}, e, wrap)
}

// fenceServerWith is fenceServer with more of the configuration: cfg's
// Fences, if nil, is an empty list kept in memory.
func fenceServerWith(t *testing.T, cfg Config, e *Export, wrap func(net.Listener) net.Listener) *testServer {
	t.Helper()
	if cfg.Fences == nil {
		fences, err := LoadFences("")
		if err != nil {
			t.Fatal(err)
		}
		cfg.Fences = fences
	}
	reg := NewRegistry()
	if err := reg.Add(e); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{addr: ln.Addr().String(), reg: reg, done: make(chan error, 1)}
	if wrap != nil {
		ln = wrap(ln)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ts.cancel = cancel
	cfg.Exports, cfg.Logger = reg, zaptest.NewLogger(t)
	ts.srv = New(&cfg)
	go func() { ts.done <- ts.srv.Serve(ctx, ln) }()
	t.Cleanup(func() { ts.stop(t) })
	return ts
}

// writesDone returns the backend's events once the server has stopped, so
// every connection has ended and nothing more can reach the backend.
func writesDone(t *testing.T, ts *testServer, hb *hookBackend) []string {
	t.Helper()
	if err := ts.stop(t); err != nil {
		t.Fatal(err)
	}
	hb.mu.Lock()
	defer hb.mu.Unlock()
	var writes []string
	for _, ev := range hb.events {
		if ev != "flush" { // the shutdown flush
			writes = append(writes, ev)
		}
	}
	return writes
}

// pausingRefresh pauses the first Refresh: the handshake's NBD_OPT_GO
// re-reads the size after checking the fences and before recording the
// client on the export.
type pausingRefresh struct {
	*hookBackend
	once             sync.Once
	entered, release chan struct{}
}

func (p *pausingRefresh) Refresh() (int64, error) {
	p.once.Do(func() { close(p.entered); <-p.release })
	return p.hookBackend.Refresh()
}

// A fence that comes after the handshake checked the fences, and before the
// client was recorded on the export, finds no connection to cut: the
// handshake must see the fence and refuse the client.
func TestFenceDuringTheHandshake(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	hb := &hookBackend{Backend: disk.Backend}
	pr := &pausingRefresh{hookBackend: hb, entered: make(chan struct{}), release: make(chan struct{})}
	disk.Backend = pr
	ts := fenceServer(t, disk, nil, nil)

	c := dialRaw(t, ts.addr)
	c.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
	fenced := make(chan int, 1)
	go func() {
		<-pr.entered
		cut, err := ts.srv.FenceClient(context.Background(), Fence{Client: "127.0.0.1", Export: "disk"})
		if err != nil {
			t.Error(err)
		}
		fenced <- cut
		close(pr.release)
	}()
	replies := c.option(nbd.OptGo, nbd.InfoRequest{Name: "disk"})
	t.Logf("the fence cut %d connections", <-fenced)
	if last := replies[len(replies)-1]; last.typ != nbd.RepErrPolicy {
		t.Fatalf("NBD_OPT_GO after the fence was answered %v %q, want NBD_REP_ERR_POLICY", last.typ, last.data)
	}
	if writes := writesDone(t, ts, hb); len(writes) > 0 {
		t.Errorf("writes reached the storage: %v", writes)
	}
}

// pausingConn pauses the server when it clears the handshake's deadline: the
// handshake is over and the transmission loop not yet built.
type pausingConn struct {
	net.Conn
	once             *sync.Once
	entered, release chan struct{}
}

func (p *pausingConn) SetDeadline(tm time.Time) error {
	if tm.IsZero() {
		p.once.Do(func() { close(p.entered); <-p.release })
	}
	return p.Conn.SetDeadline(tm)
}

type pausingListener struct {
	net.Listener
	once             sync.Once
	entered, release chan struct{}
}

func (l *pausingListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &pausingConn{Conn: nc, once: &l.once, entered: l.entered, release: l.release}, nil
}

// answers is an Observer that passes on each request's error value.
type answers chan nbd.Errno

func (a answers) ForExport(string) ExportObserver { return a }

func (a answers) Request(_ nbd.Command, _ int, _ time.Duration, errno nbd.Errno) { a <- errno }

// A fence between the handshake and the transmission loop closes the socket,
// but a write the client sent right behind NBD_OPT_GO is already in the
// server's buffer: it must be refused, not written.
func TestFenceBeforeTheTransmissionLoop(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	hb := &hookBackend{Backend: disk.Backend}
	disk.Backend = hb
	pl := &pausingListener{entered: make(chan struct{}), release: make(chan struct{})}
	answered := make(answers, 1)
	ts := fenceServer(t, disk, func(ln net.Listener) net.Listener { pl.Listener = ln; return pl }, answered)

	c := dialRaw(t, ts.addr)
	c.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
	// NBD_OPT_GO and a WRITE in one segment, as a pipelining client sends
	// them.
	data, _ := nbd.InfoRequest{Name: "disk"}.AppendBinary(nil)
	b, _ := nbd.OptionHeader{Option: nbd.OptGo, Length: uint32(len(data))}.AppendBinary(nil)
	b = append(b, data...)
	b, _ = nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 1, Offset: 0, Length: 4}.AppendBinary(b)
	c.write(append(b, "late"...))
	<-pl.entered
	cut, err := ts.srv.FenceClient(context.Background(), Fence{Client: "127.0.0.1", Export: "disk"})
	if err != nil || cut != 1 {
		t.Fatalf("FenceClient = %d, %v; want the one connection cut", cut, err)
	}
	close(pl.release)
	// Refused or not, the write is answered (to a closed socket): then
	// the server may stop.
	select {
	case errno := <-answered:
		if errno != nbd.EPERM {
			t.Errorf("the write behind NBD_OPT_GO was answered %v, want EPERM", errno)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the write behind NBD_OPT_GO was never answered")
	}
	if writes := writesDone(t, ts, hb); len(writes) > 0 {
		t.Errorf("a write reached the storage after FenceClient returned: %v", writes)
	}
}

// Clients of an export removed from the registry keep it until they hang up;
// a fence must cut them too.
func TestFenceReachesRemovedExports(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	hb := &hookBackend{Backend: disk.Backend}
	disk.Backend = hb
	ts := fenceServer(t, disk, nil, nil)

	c := dialRaw(t, ts.addr)
	c.open("disk", false)
	if _, _, err := ts.reg.Remove("disk"); err != nil {
		t.Fatal(err)
	}
	cut, err := ts.srv.FenceClient(context.Background(), Fence{Client: "127.0.0.1"})
	if err != nil || cut != 1 {
		t.Fatalf("FenceClient = %d, %v; want the one connection cut", cut, err)
	}
	c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 1, Offset: 0, Length: 4}, []byte("late"))
	c.drainUntilClosed()
	if writes := writesDone(t, ts, hb); len(writes) > 0 {
		t.Errorf("a write reached the storage after FenceClient returned: %v", writes)
	}
	// Once its clients are gone, a removed export is forgotten.
	if n := len(ts.reg.inUse()); n != 0 {
		t.Errorf("%d exports in use after the last client left", n)
	}
}

// A fence cuts every connection of the client at once, even when writes on
// some of them do not finish and its caller has given up: one by one, it
// stopped at the first that did not quiesce and left the others writing.
func TestFenceCutsEveryVictimWhenOneHangs(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	entered := make(chan int64, 2)
	release := make(chan struct{})
	hb := &hookBackend{Backend: disk.Backend, onWrite: func(off int64) error {
		if off < 2*4096 {
			entered <- off
			<-release
		}
		return nil
	}}
	disk.Backend = hb
	ts := fenceServerWith(t, Config{DrainTimeout: 100 * time.Millisecond}, disk, nil)
	releaseWrites := sync.OnceFunc(func() { close(release) })
	t.Cleanup(releaseWrites) // before the server stops, if the test fails first

	a, b := dialRaw(t, ts.addr), dialRaw(t, ts.addr)
	a.open("disk", false)
	b.open("disk", false)
	a.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 1, Offset: 0, Length: 4}, []byte("hang"))
	b.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 1, Offset: 4096, Length: 4}, []byte("hang"))
	<-entered
	<-entered

	ctx, cancel := context.WithCancel(context.Background())
	cancel() // the caller hung up before the fence was done
	cut, err := ts.srv.FenceClient(ctx, Fence{Client: "127.0.0.1", Export: "disk"})
	if cut != 2 || !errors.Is(err, ErrFenceNotQuiesced) {
		t.Errorf("FenceClient = %d, %v; want both connections cut, and told that their writes did not finish", cut, err)
	}
	for i, c := range []*rawClient{a, b} {
		late, _ := nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 2, Offset: uint64(4096 * (2 + i)), Length: 4}.AppendBinary(nil)
		c.nc.Write(append(late, "late"...)) // fails if the server closed the connection already
	}
	releaseWrites()
	a.drainUntilClosed()
	b.drainUntilClosed()
	writes := writesDone(t, ts, hb)
	slices.Sort(writes)
	if diff := cmp.Diff([]string{"write 0", "write 4096"}, writes); diff != "" {
		t.Errorf("writes that reached the storage (-the two in flight +got):\n%s", diff)
	}
}

// hungWrite serves export disk with cfg and has a client connect and send a
// FUA write that hangs in the backend until release is closed; it returns
// once the write is under way.
func hungWrite(t *testing.T, cfg Config) (disk *Export, ts *testServer, c *rawClient, hb *hookBackend, release chan struct{}) {
	t.Helper()
	disk, _ = fileExport(t, "disk", 1<<20, false)
	entered := make(chan struct{}, 1)
	release = make(chan struct{})
	hb = &hookBackend{Backend: disk.Backend, onWrite: func(int64) error {
		entered <- struct{}{}
		<-release
		return nil
	}}
	disk.Backend = hb
	ts = fenceServerWith(t, cfg, disk, nil)
	c = dialRaw(t, ts.addr)
	c.open("disk", false)
	c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Flags: nbd.CmdFlagFUA, Handle: 1, Length: 4}, []byte("hung"))
	<-entered
	return disk, ts, c, hb, release
}

// A connection's fence given up on (its context ended while a write still
// ran) still takes the connection's write gate once that write ends: it
// must let it go then and close the connection, or the connection's later
// requests wait for the gate for ever and it never ends.
func TestFenceGivenUpLetsTheConnectionEnd(t *testing.T) {
	disk, _, c, hb, release := hungWrite(t, Config{})
	clients := disk.Clients()
	if len(clients) != 1 {
		t.Fatalf("%d clients, want 1", len(clients))
	}
	disk.mu.Lock()
	cc := disk.clients[clients[0].ID]
	disk.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := cc.fence(ctx); err == nil {
		t.Fatal("a fence given up on reported success")
	}
	// Retried while the write hangs (as a cluster retries a fence), it
	// adds no goroutine waiting for the write.
	before := runtime.NumGoroutine()
	for range 50 {
		if err := cc.fence(ctx); err == nil {
			t.Fatal("a fence given up on reported success")
		}
	}
	if added := runtime.NumGoroutine() - before; added > 10 {
		t.Errorf("50 retried fences added %d goroutines", added)
	}
	hb.onWrite = nil
	close(release)
	c.expectClosed()
}

// A cluster retries a fence whose victim's write hangs: each FenceClient
// reports the write, and none leaves a goroutine behind waiting for it.
func TestRetriedFenceLeavesNoGoroutines(t *testing.T) {
	_, ts, _, _, release := hungWrite(t, Config{DrainTimeout: 20 * time.Millisecond})
	defer close(release)
	fence := func() {
		t.Helper()
		if _, err := ts.srv.FenceClient(context.Background(), Fence{Client: "127.0.0.1"}); !errors.Is(err, ErrFenceNotQuiesced) {
			t.Fatalf("FenceClient with a write hung: %v, want ErrFenceNotQuiesced", err)
		}
	}
	fence()
	before := runtime.NumGoroutine()
	for range 30 {
		fence()
	}
	if added := runtime.NumGoroutine() - before; added > 10 {
		t.Errorf("30 retried fences left %d goroutines", added)
	}
}

// A fence whose save hangs (a slow or failing disk under /var/lib) is in
// force at once, and stops no handshake: they read the list without
// waiting for the write.
func TestHungFenceSaveBlocksNoHandshake(t *testing.T) {
	f, err := LoadFences(filepath.Join(t.TempDir(), "fences.json"))
	if err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan struct{}), make(chan struct{})
	save := saveFences
	saveFences = func(path string, v any) error {
		close(entered)
		<-release
		return save(path, v)
	}
	t.Cleanup(func() { saveFences = save })
	added := make(chan error, 1)
	go func() { added <- f.add(Fence{Client: "192.0.2.7", Export: "vm1"}) }()
	<-entered
	p := peer{addr: netip.MustParseAddr("192.0.2.7")}
	var matched bool
	returnsWithoutWaiting(t, "a handshake's fence check waited for the fence file's write",
		func() { matched = f.matches(p, "vm1") })
	if !matched {
		t.Error("the fence being saved is not in force")
	}
	close(release)
	if err := <-added; err != nil {
		t.Fatal(err)
	}
	if got, err := LoadFences(f.path); err != nil || len(got.List()) != 1 {
		t.Errorf("fence file after the save: %v, %v", got.List(), err)
	}
}
