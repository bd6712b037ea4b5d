package pair

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/client/kernel"
	"github.com/lvnbd/lvnbd/nbd"
)

// fakeKernel stands in for the kernel's nbd driver.
type fakeKernel struct {
	t    testing.TB
	mu   sync.Mutex
	devs map[int]kernel.Device
	// events is the latest subscription's channel.
	events        chan int
	subscriptions int
	// calls lists every change in order, as "connect nbd://... 2 sockets ->
	// nbd0", "reconfigure nbd0 2 sockets", "reconfigure nbd0 0 sockets size
	// 1024", "disconnect nbd0".
	calls     []string
	connected []kernel.Config // without their sockets
	// connectErr and reconfigureErr fail the next such call, resizeErr the
	// next reconfigure with a size.
	connectErr, reconfigureErr, resizeErr error
	// onConnect, if set, runs once a Connect of its backend has made the
	// device and before Connect returns (without k.mu held, so that it may
	// call linkDead).
	onConnect map[string]func(index int)
	// held are devices something (blkback) holds open: as the kernel's
	// nbd_config_put, a Disconnect leaves their configuration (pid and
	// backend) until release, the last close.
	held map[int]bool
	// unbound are devices another process disconnected while something
	// held them open (disconnectUnder): as the kernel's, they keep pid
	// and backend, Bound says false, and a RECONFIGURE with sockets fails.
	unbound map[int]bool
	// timeouts are the devices' request timeouts; a reconfigure to a
	// lower one is refused, as kernel.Conn does, and counted in lowered.
	timeouts map[int]time.Duration
	lowered  int
}

// disconnectUnder disconnects device index as another process would while
// something holds it open.
func (k *fakeKernel) disconnectUnder(index int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.unbound == nil {
		k.unbound = map[int]bool{}
	}
	k.unbound[index] = true
}

func (k *fakeKernel) Bound(_ context.Context, index int, backend string) (bool, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if d, ok := k.devs[index]; !ok || d.Backend != backend {
		return false, &kernel.OpError{Op: "NBD_CMD_RECONFIGURE", Index: index, Err: kernel.ErrWrongBackend}
	}
	return !k.unbound[index], nil
}

// release is the last close of a held device that was disconnected.
func (k *fakeKernel) release(index int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	delete(k.held, index)
	delete(k.unbound, index)
	delete(k.devs, index)
}

func newFakeKernel(t testing.TB, devs ...kernel.Device) *fakeKernel {
	k := &fakeKernel{t: t, devs: map[int]kernel.Device{}, timeouts: map[int]time.Duration{}}
	for _, d := range devs {
		k.devs[d.Index] = d
	}
	return k
}

// checkOpen fails the test if a socket handed to the kernel is already
// closed: the caller must keep it open until the call returns.
func checkOpen(t testing.TB, what string, files []*os.File) {
	t.Helper()
	for i, f := range files {
		if _, err := f.Stat(); err != nil {
			t.Errorf("%s: socket %d: %v", what, i, err)
		}
	}
}

func (k *fakeKernel) Connect(_ context.Context, cfg kernel.Config) (int, error) {
	index, err := k.connect(cfg)
	k.mu.Lock()
	hook := k.onConnect[cfg.Backend]
	delete(k.onConnect, cfg.Backend)
	k.mu.Unlock()
	if err == nil && hook != nil {
		hook(index)
	}
	return index, err
}

func (k *fakeKernel) connect(cfg kernel.Config) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := cfg.Validate(); err != nil {
		return 0, err
	}
	checkOpen(k.t, "connect", cfg.Sockets)
	if err := k.connectErr; err != nil {
		k.connectErr = nil
		return 0, err
	}
	index := k.free(cfg.Backend)
	k.timeouts[index] = cfg.Timeout
	k.devs[index] = kernel.Device{Index: index, Connected: true, PID: 42, Backend: cfg.Backend,
		Size: cfg.Size, BlockSize: cfg.BlockSize, ReadOnly: cfg.ReadOnly}
	k.calls = append(k.calls, fmt.Sprintf("connect %s %d sockets -> nbd%d", cfg.Backend, len(cfg.Sockets), index))
	cfg.Sockets = nil
	k.connected = append(k.connected, cfg)
	return index, nil
}

// free picks a free device: each test export has its own number (its
// position in preferred), so that legs attaching at once get predictable
// devices; else the lowest free one.
func (k *fakeKernel) free(backend string) int {
	preferred := []string{backendA, backendB}
	for i, b := range preferred {
		if _, used := k.devs[i]; b == backend && !used {
			return i
		}
	}
	for i := len(preferred); ; i++ {
		if _, used := k.devs[i]; !used {
			return i
		}
	}
}

func (k *fakeKernel) Disconnect(_ context.Context, index int) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.devs[index]; !ok {
		return &kernel.OpError{Op: "NBD_CMD_DISCONNECT", Index: index, Err: kernel.ErrNoDevice}
	}
	if !k.held[index] {
		delete(k.devs, index)
	}
	k.calls = append(k.calls, fmt.Sprintf("disconnect nbd%d", index))
	return nil
}

func (k *fakeKernel) Reconfigure(_ context.Context, index int, r kernel.Reconfig) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := r.Validate(); err != nil {
		return err
	}
	checkOpen(k.t, "reconfigure", r.Sockets)
	d, ok := k.devs[index]
	if !ok || !d.Running() {
		return &kernel.OpError{Op: "NBD_CMD_RECONFIGURE", Index: index, Err: kernel.ErrNotConnected}
	}
	if k.unbound[index] && len(r.Sockets) > 0 {
		return &kernel.OpError{Op: "NBD_CMD_RECONFIGURE", Index: index, Err: kernel.ErrDisconnectedHeldOpen}
	}
	// As kernel.Conn does: the kernel itself checks only a device that has
	// a backend.
	if r.Backend != d.Backend {
		return &kernel.OpError{Op: "NBD_CMD_RECONFIGURE", Index: index,
			Err: fmt.Errorf("%w: its backend is %q, not %q", kernel.ErrWrongBackend, d.Backend, r.Backend)}
	}
	if r.Timeout != 0 && r.Timeout < k.timeouts[index] {
		k.lowered++
		return &kernel.OpError{Op: "NBD_CMD_RECONFIGURE", Index: index, Err: kernel.ErrTimeoutLowered}
	}
	if r.Timeout != 0 {
		k.timeouts[index] = r.Timeout
	}
	if err := k.reconfigureErr; err != nil {
		k.reconfigureErr = nil
		return err
	}
	if err := k.resizeErr; err != nil && r.Size != 0 {
		k.resizeErr = nil
		return err
	}
	call := fmt.Sprintf("reconfigure nbd%d %d sockets", index, len(r.Sockets))
	if r.Size != 0 {
		call += fmt.Sprintf(" size %d", r.Size)
		d.Size = r.Size
		k.devs[index] = d
	}
	k.calls = append(k.calls, call)
	return nil
}

func (k *fakeKernel) Status(_ context.Context, index int) ([]kernel.Device, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if index == kernel.AnyDevice {
		var out []kernel.Device
		for _, d := range k.devs {
			out = append(out, d)
		}
		slices.SortFunc(out, func(a, b kernel.Device) int { return a.Index - b.Index })
		return out, nil
	}
	d, ok := k.devs[index]
	if !ok {
		return nil, &kernel.OpError{Op: "NBD_CMD_STATUS", Index: index, Err: kernel.ErrNoDevice}
	}
	return []kernel.Device{d}, nil
}

// WatchLinkDead subscribes anew: events go to the latest subscription.
func (k *fakeKernel) WatchLinkDead(ctx context.Context) (<-chan int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.events = make(chan int)
	k.subscriptions++
	return k.events, nil
}

// linkDead reports a dead connection of device index (or EventsLost), as
// the kernel would; it blocks until the supervisor takes it.
func (k *fakeKernel) linkDead(index int) {
	k.mu.Lock()
	ch := k.events
	k.mu.Unlock()
	ch <- index
}

// dropSubscription ends the current subscription, as a failed socket would.
func (k *fakeKernel) dropSubscription() {
	k.mu.Lock()
	defer k.mu.Unlock()
	close(k.events)
}

// takeCalls returns the calls so far and forgets them.
func (k *fakeKernel) takeCalls() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	c := k.calls
	k.calls = nil
	return c
}

// setDevice changes or removes (running false) a device from outside.
func (k *fakeKernel) setDevice(d kernel.Device) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.devs[d.Index] = d
}

// fakeStorage stands in for the storage boxes: the exports by canonical
// URI, reachable or not.
type fakeStorage struct {
	t       testing.TB
	mu      sync.Mutex
	exports map[string]*fakeExport
	opened  []*os.File
	dials   int
	// onDial, if set, runs at the next dial, which then proceeds.
	onDial func()
}

type fakeExport struct {
	size     uint64
	down     bool
	readOnly bool
	id       string // the volume's, in the description as an lvnbd server puts it
}

func newFakeStorage(t testing.TB, exports map[string]uint64) *fakeStorage {
	s := &fakeStorage{t: t, exports: map[string]*fakeExport{}}
	for uri, size := range exports {
		u, err := client.ParseURI(uri)
		if err != nil {
			t.Fatal(err)
		}
		s.exports[u.String()] = &fakeExport{size: size}
	}
	t.Cleanup(s.checkClosed)
	return s
}

// set changes an export.
func (s *fakeStorage) set(uri string, f func(e *fakeExport)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, _ := client.ParseURI(uri)
	f(s.exports[u.String()])
}

func (s *fakeStorage) lookup(u client.URI) (client.ExportInfo, error) {
	e := s.exports[u.String()]
	if e == nil || e.down {
		return client.ExportInfo{}, &client.DialError{Addr: u.Address(), Err: errors.New("connection refused")}
	}
	flags := nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagCanMultiConn
	if e.readOnly {
		flags |= nbd.FlagReadOnly
	}
	return client.ExportInfo{Name: u.Export, Description: nbd.WithID("volume "+u.Export, e.id), Size: e.size, Flags: flags,
		BlockSizes: client.DefaultBlockSizes}, nil
}

func (s *fakeStorage) dial(_ context.Context, u client.URI, n int) ([]*os.File, client.ExportInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dials++
	if f := s.onDial; f != nil {
		s.onDial = nil
		f()
	}
	info, err := s.lookup(u)
	if err != nil {
		return nil, info, err
	}
	var files []*os.File
	for range n {
		r, w, err := os.Pipe()
		if err != nil {
			s.t.Fatal(err)
		}
		w.Close()
		files = append(files, r)
		s.opened = append(s.opened, r)
	}
	return files, info, nil
}

func (s *fakeStorage) info(_ context.Context, uri string) (client.ExportInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, err := client.ParseURI(uri)
	if err != nil {
		return client.ExportInfo{}, err
	}
	return s.lookup(u)
}

// checkClosed fails the test for every socket the supervisor left open: the
// kernel keeps its own references, so ours would leak.
func (s *fakeStorage) checkClosed() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, f := range s.opened {
		if err := f.Close(); !errors.Is(err, os.ErrClosed) {
			s.t.Errorf("socket %d of %d was left open", i+1, len(s.opened))
		}
	}
}

// fakeRunner is xl: it expects exactly the calls in want, in order, and
// fails the test on any other.
type fakeRunner struct {
	t    testing.TB
	mu   sync.Mutex
	want [][]string
	fail map[int]error // by index into want
	got  int
}

func (r *fakeRunner) run(_ context.Context, args ...string) ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.got >= len(r.want) || !slices.Equal(args, r.want[r.got]) {
		r.t.Errorf("unexpected command %q (call %d)", args, r.got+1)
		return nil, fmt.Errorf("running %q: unexpected", args)
	}
	err := r.fail[r.got]
	r.got++
	return nil, err
}

func (r *fakeRunner) done() {
	r.t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.got != len(r.want) {
		r.t.Errorf("%d of %d expected commands run; missing %q", r.got, len(r.want), r.want[r.got:])
	}
}

const (
	uriA = "nbd://192.0.2.2/vm1"
	uriB = "nbd://198.51.100.2/vm1"
	// Their canonical forms, the devices' backend identifiers.
	backendA = "nbd://192.0.2.2:10809/vm1"
	backendB = "nbd://198.51.100.2:10809/vm1"
)

func testSpec() Spec {
	return Spec{Name: "vm1", URIs: [2]string{uriA, uriB}, Connections: 2, Timeout: 5 * time.Second, DeadTimeout: 10 * time.Second}
}

// newTestSupervisor returns a supervisor of specs on fakes, with links
// under a temporary directory and no jitter (backoffs are exact).
// startPair starts a supervisor of pair vm1 (testSpec) on a fresh fake
// kernel, with both exports up at 64 MiB.
func startPair(t *testing.T) (*fakeKernel, *fakeStorage, *Supervisor) {
	t.Helper()
	k := newFakeKernel(t)
	st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
	s := newTestSupervisor(t, []Spec{testSpec()}, k, st, nil)
	start(t, s)
	return k, st, s
}

func newTestSupervisor(t testing.TB, specs []Spec, k *fakeKernel, st *fakeStorage, r runner) *Supervisor {
	t.Helper()
	if r == nil {
		r = &fakeRunner{t: t}
	}
	s, err := newSupervisor(&Config{
		Pairs:   specs,
		Kernel:  k,
		Logger:  zaptest.NewLogger(t),
		LinkDir: filepath.Join(t.TempDir(), "lvnbd"),
		Dial:    st.dial,
		Info:    st.info,
	}, r)
	if err != nil {
		t.Fatal(err)
	}
	s.jitter = func() float64 { return 0.5 } // a factor of exactly 1
	return s
}

// linkTarget is where a leg's link points, "" if it does not exist.
func linkTarget(t testing.TB, s *Supervisor, pair, leg string) string {
	t.Helper()
	target, err := os.Readlink(LinkPath(s.cfg.LinkDir, pair, leg))
	if errors.Is(err, os.ErrNotExist) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	return target
}
