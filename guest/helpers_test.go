package guest

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/google/go-cmp/cmp"
)

// call is one command a test expects, with what it answers.
type call struct {
	args   []string
	stdout string
	err    error // nil for success
	// then, if set, changes the fakes once the command ran: the world
	// moving while the watcher works.
	then func()
	// started, if set, is closed when the command starts, and the command
	// then waits for release, if set: a command stuck on a dead device.
	started chan<- struct{}
	release <-chan struct{}
}

// fakeRunner answers an exact sequence of commands and fails the test on
// any other, and on commands left unrun when the test ends.
type fakeRunner struct {
	t     testing.TB
	mu    sync.Mutex
	calls []call
	n     int
}

func newFakeRunner(t testing.TB, calls ...call) *fakeRunner {
	f := &fakeRunner{t: t, calls: calls}
	t.Cleanup(func() { f.done() })
	return f
}

// expect appends calls to the sequence.
func (f *fakeRunner) expect(calls ...call) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, calls...)
}

// done fails the test if expected calls were not made.
func (f *fakeRunner) done() {
	f.t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if left := f.calls[f.n:]; len(left) > 0 && !f.t.Failed() {
		f.t.Errorf("%d expected commands not run, first %q", len(left), left[0].args)
	}
}

func (f *fakeRunner) run(_ context.Context, args ...string) ([]byte, error) {
	f.t.Helper()
	f.mu.Lock()
	if f.n >= len(f.calls) {
		f.mu.Unlock()
		f.t.Errorf("unexpected command %q", args)
		return nil, errors.New("unexpected command")
	}
	c := f.calls[f.n]
	f.n++
	n := f.n
	f.mu.Unlock()
	if c.started != nil {
		close(c.started) // also for a wrong command: the test goes on, and fails
	}
	if diff := cmp.Diff(c.args, args); diff != "" {
		f.t.Errorf("command %d (-want +got):\n%s", n, diff)
		return nil, errors.New("unexpected command")
	}
	if c.release != nil {
		<-c.release
	}
	if c.then != nil {
		c.then()
	}
	return []byte(c.stdout), c.err
}

// exitError is how a command that exited with a status looks to callers,
// like *exec.ExitError.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }
func (e *exitError) ExitCode() int { return e.code }

// cmdError is what the real runner returns for a failed command.
func cmdError(args []string, code int, stderr string) error {
	return &commandError{args: args, err: &exitError{code, fmt.Sprintf("exit status %d", code)}, out: []byte(stderr), stderr: []byte(stderr)}
}

func readTestdata(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// sysfsDump loads a capture of scenario 25's sysfs_dump (PATH:VALUE lines
// relative to /sys/block/mdX) into fsys under sys/block/NAME, where NAME
// comes from the captured dev number (9:127 is md127). It returns NAME.
func sysfsDump(t testing.TB, fsys fstest.MapFS, file string) string {
	t.Helper()
	files := map[string]string{}
	for _, line := range strings.Split(string(readTestdata(t, file)), "\n") {
		if line == "" {
			continue
		}
		p, v, ok := strings.Cut(line, ":")
		if !ok {
			t.Fatalf("%s: line %q is not PATH:VALUE", file, line)
		}
		files[p] = v
	}
	var minor int
	if _, err := fmt.Sscanf(files["dev"], "9:%d", &minor); err != nil {
		t.Fatalf("%s: dev %q is not an md device number", file, files["dev"])
	}
	name := fmt.Sprintf("md%d", minor)
	for p, v := range files {
		fsys["sys/block/"+name+"/"+p] = &fstest.MapFile{Data: []byte(v + "\n")}
	}
	// /sys/class/block/NAME is where device paths are looked up.
	for _, p := range []string{"dev", "size"} {
		fsys["sys/class/block/"+name+"/"+p] = &fstest.MapFile{Data: []byte(files[p] + "\n")}
	}
	return name
}

// blockDev adds /sys/class/block/NAME with a size in bytes and a device
// number.
func blockDev(fsys fstest.MapFS, name string, size uint64, majmin string) {
	fsys["sys/class/block/"+name+"/size"] = &fstest.MapFile{Data: fmt.Appendf(nil, "%d\n", size/512)}
	fsys["sys/class/block/"+name+"/dev"] = &fstest.MapFile{Data: []byte(majmin + "\n")}
}

// fakeProber answers probes from a map; devices not in it are unreadable.
type fakeProber struct {
	mu     sync.Mutex
	result map[string]probeResult
	probed []string
}

func (p *fakeProber) probe(dev string) probeResult {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.probed = append(p.probed, dev)
	if r, ok := p.result[dev]; ok {
		return r
	}
	return probeUnreadable
}

func (p *fakeProber) set(dev string, r probeResult) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.result == nil {
		p.result = map[string]probeResult{}
	}
	p.result[dev] = r
}

// fakeClock is a clock tests move by hand. After channels fire when the
// clock is advanced past their deadline.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []waiter
	// waiting receives a value whenever someone calls After.
	waiting chan struct{}
}

type waiter struct {
	at time.Time
	ch chan time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 11, 22, 4, 0, 0, 0, time.UTC), waiting: make(chan struct{}, 100)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	c.waiters = append(c.waiters, waiter{c.now.Add(d), ch})
	c.waiting <- struct{}{}
	return ch
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if !w.at.After(c.now) {
			w.ch <- c.now
		} else {
			kept = append(kept, w)
		}
	}
	c.waiters = kept
}

// testHost is a host made of fakes: an empty root file system, no devices
// readable, a runner that expects nothing.
func testHost(t testing.TB) (*host, fstest.MapFS, *fakeRunner, *fakeProber, *fakeClock) {
	fsys := fstest.MapFS{}
	r := newFakeRunner(t)
	p := &fakeProber{}
	c := newFakeClock()
	h := &host{
		run: r,
		sys: fsys,
		resolve: func(p string) (string, error) {
			if target, ok := fsys[strings.TrimPrefix(p, "/")]; ok && target.Mode&fs.ModeSymlink != 0 {
				return string(target.Data), nil
			}
			return p, nil
		},
		exists: func(p string) bool {
			_, ok := fsys[strings.TrimPrefix(p, "/")]
			return ok
		},
		readEnds: func(dev string, size uint64) ([]byte, []byte, error) {
			return make([]byte, min(size, headSize)), make([]byte, min(size, tailSize)), nil
		},
		have:         func(string) bool { return false },
		probe:        p,
		clock:        c,
		mdadmVersion: func(context.Context) ([]byte, error) { return []byte("mdadm - v4.2 - 2021-12-30\n"), nil },
	}
	// The ends are zero when what readEnds returns is: a test that puts
	// data there need not say it twice.
	h.zeroEnds = func(dev string, size uint64) (bool, error) {
		head, tail, err := h.readEnds(dev, size)
		return err == nil && allZero(head) && allZero(tail), err
	}
	return h, fsys, r, p, c
}

// symlink adds a symbolic link /path -> target to fsys, as the fake
// resolve follows it.
func symlink(fsys fstest.MapFS, path, target string) {
	fsys[strings.TrimPrefix(path, "/")] = &fstest.MapFile{Data: []byte(target), Mode: fs.ModeSymlink | 0o777}
}

func sprintf(format string, args ...any) string { return fmt.Sprintf(format, args...) }

// receive waits for ch, and fails the test after a minute: a change that
// would block the watcher for ever fails the test instead of hanging it.
func receive[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(time.Minute):
		t.Fatalf("no %s after a minute", what)
		panic("unreachable")
	}
}
