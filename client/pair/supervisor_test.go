package pair

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap/zaptest"

	"github.com/lvnbd/lvnbd/client/kernel"
	"github.com/lvnbd/lvnbd/client/refusals"
	"github.com/lvnbd/lvnbd/client/volumeid"
)

// start runs s until the test ends, inside a synctest bubble.
func start(t *testing.T, s *Supervisor) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
	t.Cleanup(stop)
	synctest.Wait()
	return stop
}

// legStates summarises a status as "vm1.a connected /dev/nbd0 r0".
func legStates(st []PairStatus) []string {
	var out []string
	for _, p := range st {
		for _, l := range p.Legs {
			out = append(out, p.Name+"."+l.Leg+" "+string(l.State)+" "+l.Device+" r"+string(rune('0'+l.Reconnects)))
		}
	}
	return out
}

func checkStates(t *testing.T, s *Supervisor, want ...string) {
	t.Helper()
	if diff := cmp.Diff(want, legStates(s.Status())); diff != "" {
		t.Errorf("legs (-want +got):\n%s", diff)
	}
}

func TestRunReconnectsDeadLeg(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k, st, s := startPair(t)
		checkStates(t, s, "vm1.a connected /dev/nbd0 r0", "vm1.b connected /dev/nbd1 r0")
		if a, b := linkTarget(t, s, "vm1", "a"), linkTarget(t, s, "vm1", "b"); a != "/dev/nbd0" || b != "/dev/nbd1" {
			t.Errorf("links to %q and %q", a, b)
		}
		k.takeCalls()

		// Storage box A dies: both of its connections are reported dead.
		st.set(uriA, func(e *fakeExport) { e.down = true })
		k.linkDead(0)
		k.linkDead(0)
		synctest.Wait()
		checkStates(t, s, "vm1.a reconnecting /dev/nbd0 r0", "vm1.b connected /dev/nbd1 r0")
		// It comes back 10 s later; the backoff (1, 2, then 2.5 s: a
		// quarter of the 10 s dead timeout) finds it at 10.5 s.
		time.Sleep(10 * time.Second)
		st.set(uriA, func(e *fakeExport) { e.down = false })
		time.Sleep(400 * time.Millisecond)
		synctest.Wait()
		checkStates(t, s, "vm1.a reconnecting /dev/nbd0 r0", "vm1.b connected /dev/nbd1 r0")
		time.Sleep(200 * time.Millisecond)
		synctest.Wait()
		checkStates(t, s, "vm1.a connected /dev/nbd0 r1", "vm1.b connected /dev/nbd1 r0")
		if diff := cmp.Diff([]string{"reconfigure nbd0 2 sockets"}, k.takeCalls()); diff != "" {
			t.Errorf("kernel calls (-want +got):\n%s", diff)
		}

		// An event for a device no leg has may be for a leg that has not
		// recorded its device yet: every leg checks, as after lost events,
		// and that is not counted as a reconnect.
		k.linkDead(9)
		synctest.Wait()
		if diff := cmp.Diff([]string{"reconfigure nbd0 2 sockets", "reconfigure nbd1 2 sockets"}, k.takeCalls(), cmpSorted); diff != "" {
			t.Errorf("kernel calls after an event for nbd9 (-want +got):\n%s", diff)
		}
		checkStates(t, s, "vm1.a connected /dev/nbd0 r1", "vm1.b connected /dev/nbd1 r0")
	})
}

// The kernel reports a connection dead once. If it does so between
// accepting a leg's CONNECT and the leg recording its device, the leg must
// still give the device a fresh connection.
func TestRunDeathWhileAttaching(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		// Box B is down, so that only leg a has a device to check.
		st.set(uriB, func(e *fakeExport) { e.down = true })
		// Leg a's Connect returns only once the supervisor has handled
		// the notice (start waits until everything is blocked), so the
		// leg has not recorded its device when the notice comes.
		release := make(chan struct{})
		k.onConnect = map[string]func(int){backendA: func(index int) {
			k.linkDead(index)
			<-release
		}}
		s := newTestSupervisor(t, []Spec{testSpec()}, k, st, nil)
		start(t, s)
		close(release)
		synctest.Wait()
		want := []string{"connect " + backendA + " 2 sockets -> nbd0", "reconfigure nbd0 2 sockets"}
		if diff := cmp.Diff(want, k.takeCalls()); diff != "" {
			t.Errorf("kernel calls (-want +got):\n%s", diff)
		}
		checkStates(t, s, "vm1.a connected /dev/nbd0 r0", "vm1.b failed  r0")
	})
}

func TestRunGrowsDevices(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k, st, s := startPair(t)
		k.takeCalls()
		st.set(uriA, func(e *fakeExport) { e.size = 192 * mib })
		st.set(uriB, func(e *fakeExport) { e.size = 192 * mib })
		time.Sleep(DefaultPollInterval)
		synctest.Wait()
		calls := k.takeCalls()
		want := []string{"reconfigure nbd0 0 sockets size 201326592", "reconfigure nbd0 2 sockets",
			"reconfigure nbd1 0 sockets size 201326592", "reconfigure nbd1 2 sockets"}
		if diff := cmp.Diff(want, calls, cmpSorted); diff != "" {
			t.Errorf("kernel calls (-want +got):\n%s", diff)
		}
		for _, l := range s.Status()[0].Legs {
			if l.Size != 192*mib {
				t.Errorf("leg %s size %d", l.Leg, l.Size)
			}
		}
	})
}

var cmpSorted = cmp.Transformer("sorted", func(in []string) []string {
	out := append([]string(nil), in...)
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j] < out[i] {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
})

func TestRunAdoptsOnRestart(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		s := newTestSupervisor(t, []Spec{testSpec()}, k, st, nil)
		stop := start(t, s)
		stop()
		// Stopping detaches nothing.
		want := []string{"connect " + backendA + " 2 sockets -> nbd0", "connect " + backendB + " 2 sockets -> nbd1"}
		if diff := cmp.Diff(want, k.takeCalls(), cmpSorted); diff != "" {
			t.Errorf("first run (-want +got):\n%s", diff)
		}

		s2 := successor(t, s, []Spec{testSpec()}, k, st)
		start(t, s2)
		want = []string{"reconfigure nbd0 2 sockets", "reconfigure nbd1 2 sockets"}
		if diff := cmp.Diff(want, k.takeCalls(), cmpSorted); diff != "" {
			t.Errorf("second run (-want +got):\n%s", diff)
		}
		checkStates(t, s2, "vm1.a connected /dev/nbd0 r0", "vm1.b connected /dev/nbd1 r0")
		for _, l := range s2.Status()[0].Legs {
			if !l.Adopted {
				t.Errorf("leg %s not adopted", l.Leg)
			}
		}
	})
}

// A timeout lowered in the configuration does not reach a device attached
// with a higher one (its connections keep the higher one's TCP_USER_TIMEOUT):
// the adopting daemon reconnects it keeping its timeout, and says so.
func TestAdoptionKeepsAHigherTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		s := newTestSupervisor(t, []Spec{testSpec()}, k, st, nil)
		stop := start(t, s)
		stop()
		k.takeCalls()

		lower := testSpec()
		lower.Timeout = testSpec().Timeout / 2
		s2 := successor(t, s, []Spec{lower}, k, st)
		start(t, s2)
		want := []string{"reconfigure nbd0 2 sockets", "reconfigure nbd1 2 sockets"}
		if diff := cmp.Diff(want, k.takeCalls(), cmpSorted); diff != "" {
			t.Errorf("adoption with a lower timeout (-want +got):\n%s", diff)
		}
		checkStates(t, s2, "vm1.a connected /dev/nbd0 r0", "vm1.b connected /dev/nbd1 r0")
		k.mu.Lock()
		defer k.mu.Unlock()
		if k.lowered != 2 || k.timeouts[0] != testSpec().Timeout || k.timeouts[1] != testSpec().Timeout {
			t.Errorf("%d refused lowerings, timeouts %v; want 2, both devices keeping %v", k.lowered, k.timeouts, testSpec().Timeout)
		}
	})
}

// successor is the supervisor a restart of s's daemon makes, with specs, on
// the same kernel, storage and links.
func successor(t *testing.T, s *Supervisor, specs []Spec, k *fakeKernel, st *fakeStorage) *Supervisor {
	t.Helper()
	s2, err := newSupervisor(&Config{Pairs: specs, Kernel: k, LinkDir: s.cfg.LinkDir,
		Dial: st.dial, Info: st.info}, &fakeRunner{t: t})
	if err != nil {
		t.Fatal(err)
	}
	return s2
}

func TestRunEventsLostAndResubscribe(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k, st, s := startPair(t)
		k.takeCalls()

		k.linkDead(kernel.EventsLost)
		synctest.Wait()
		want := []string{"reconfigure nbd0 2 sockets", "reconfigure nbd1 2 sockets"}
		if diff := cmp.Diff(want, k.takeCalls(), cmpSorted); diff != "" {
			t.Errorf("after lost events (-want +got):\n%s", diff)
		}

		k.dropSubscription()
		time.Sleep(DefaultMinBackoff)
		synctest.Wait()
		if k.subscriptions != 2 {
			t.Errorf("%d subscriptions, want 2", k.subscriptions)
		}
		if diff := cmp.Diff(want, k.takeCalls(), cmpSorted); diff != "" {
			t.Errorf("after subscribing again (-want +got):\n%s", diff)
		}
		// The new subscription works.
		st.set(uriB, func(e *fakeExport) { e.size = 128 * mib })
		k.linkDead(1)
		synctest.Wait()
		if diff := cmp.Diff([]string{"reconfigure nbd1 2 sockets", "reconfigure nbd1 0 sockets size 134217728"}, k.takeCalls()); diff != "" {
			t.Errorf("after an event (-want +got):\n%s", diff)
		}
		checkStates(t, s, "vm1.a connected /dev/nbd0 r0", "vm1.b connected /dev/nbd1 r1")
	})
}

// startXen starts a supervisor of xenSpec's pair, both legs 64 MiB and
// connected, its xl run by r, and returns it with its kernel, the calls
// of the start taken.
func startXen(t *testing.T, r runner) (*Supervisor, *fakeKernel) {
	t.Helper()
	k := newFakeKernel(t)
	st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
	s := newTestSupervisor(t, []Spec{xenSpec()}, k, st, r)
	start(t, s)
	k.takeCalls()
	return s, k
}

func xenSpec() Spec {
	s := testSpec()
	s.XenDomain = "guest1"
	s.Vdevs = []string{"xvdb", "xvdc"}
	return s
}

func TestUpDownXen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		r := &fakeRunner{t: t}
		s := newTestSupervisor(t, []Spec{xenSpec()}, k, st, r)
		linkA, linkB := LinkPath(s.cfg.LinkDir, "vm1", "a"), LinkPath(s.cfg.LinkDir, "vm1", "b")
		start(t, s)
		k.takeCalls()
		ctx := context.Background()

		r.want = [][]string{
			{"xl", "block-attach", "guest1", "format=raw, vdev=xvdb, access=rw, target=" + linkA},
			{"xl", "block-attach", "guest1", "format=raw, vdev=xvdc, access=rw, target=" + linkB},
		}
		if _, err := s.Up(ctx, "vm1", "", time.Minute); err != nil {
			t.Fatal(err)
		}
		r.done()

		r.want = append(r.want,
			[]string{"xl", "block-detach", "guest1", "xvdb"},
			[]string{"xl", "block-detach", "guest1", "xvdc"})
		ps, err := s.Down(ctx, "vm1", "", false)
		if err != nil {
			t.Fatal(err)
		}
		r.done()
		if ps.Up || ps.Legs[0].State != StateDown || ps.Legs[1].State != StateDown {
			t.Errorf("after down: %+v", ps)
		}
		if diff := cmp.Diff([]string{"disconnect nbd0", "disconnect nbd1"}, k.takeCalls(), cmpSorted); diff != "" {
			t.Errorf("kernel calls (-want +got):\n%s", diff)
		}
		if a := linkTarget(t, s, "vm1", "a"); a != "" {
			t.Errorf("link a still to %s", a)
		}
		// Down stays down.
		time.Sleep(time.Minute)
		synctest.Wait()
		if calls := k.takeCalls(); len(calls) != 0 {
			t.Errorf("calls while down: %q", calls)
		}

		// Up again: attached, then given to the domain.
		r.want = append(r.want, r.want[0], r.want[1])
		ps, err = s.Up(ctx, "vm1", "", time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		r.done()
		if !ps.Up || ps.Legs[0].Device == "" || ps.Legs[1].Device == "" {
			t.Errorf("after up: %+v", ps)
		}
		if _, err := s.Up(ctx, "vm2", "", time.Minute); !errors.Is(err, ErrUnknownPair) {
			t.Errorf("up vm2: %v, want ErrUnknownPair", err)
		}
	})
}

func TestDownXenFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		// Only xvdb is asked for: once it fails, xvdc is not taken from
		// the guest either.
		r := &fakeRunner{t: t, want: [][]string{
			{"xl", "block-detach", "guest1", "xvdb"},
		}}
		xlFailed := errors.New(`running ["xl" "block-detach"]: exit status 1`)
		r.fail = map[int]error{0: xlFailed, 1: xlFailed}
		s := newTestSupervisor(t, []Spec{xenSpec()}, k, st, r)
		start(t, s)
		k.takeCalls()
		ctx := context.Background()

		// The guest may still use leg a: nothing is detached.
		_, err := s.Down(ctx, "vm1", "", false)
		if err == nil || !strings.Contains(err.Error(), "leg a stays attached, and so do the legs after it: make the guest let go of xvdb") {
			t.Fatalf("down: %v", err)
		}
		r.done()
		if calls := k.takeCalls(); len(calls) != 0 {
			t.Errorf("kernel calls: %q", calls)
		}
		// With force they are, and the xl error is still reported.
		r.want = append(r.want, r.want[0], []string{"xl", "block-detach", "guest1", "xvdc"})
		ps, err := s.Down(ctx, "vm1", "", true)
		if err == nil || !strings.Contains(err.Error(), "exit status 1") {
			t.Errorf("forced down: %v", err)
		}
		if ps.Up {
			t.Error("forced down: still up")
		}
		r.done()
		if diff := cmp.Diff([]string{"disconnect nbd0", "disconnect nbd1"}, k.takeCalls(), cmpSorted); diff != "" {
			t.Errorf("kernel calls (-want +got):\n%s", diff)
		}
	})
}

func TestUpReportsLegWithoutDevice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		st.set(uriB, func(e *fakeExport) { e.down = true })
		// Only the leg that has a device is given to the domain.
		r := &fakeRunner{t: t, want: [][]string{
			{"xl", "block-attach", "guest1", "format=raw, vdev=xvdb, access=rw, target=" + LinkPath("", "vm1", "a")},
		}}
		s := newTestSupervisor(t, []Spec{xenSpec()}, k, st, r)
		r.want[0][3] = "format=raw, vdev=xvdb, access=rw, target=" + LinkPath(s.cfg.LinkDir, "vm1", "a")
		start(t, s)
		ps, err := s.Up(context.Background(), "vm1", "", time.Minute)
		if err == nil || !strings.Contains(err.Error(), "leg b ("+backendB+") has no device: cannot connect") {
			t.Errorf("up: %v", err)
		}
		r.done()
		if ps.Legs[1].State != StateFailed {
			t.Errorf("leg b: %+v", ps.Legs[1])
		}
	})
}

func TestReadyAndStartDown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib,
			"nbd://192.0.2.2/vm2": 64 * mib, "nbd://198.51.100.2/vm2": 64 * mib})
		st.set(uriA, func(e *fakeExport) { e.down = true })
		vm2 := Spec{Name: "vm2", URIs: [2]string{"nbd://192.0.2.2/vm2", "nbd://198.51.100.2/vm2"}, Connections: 1, Timeout: 30 * time.Second}
		s, err := newSupervisor(&Config{Pairs: []Spec{testSpec(), vm2}, Kernel: k, LinkDir: t.TempDir(),
			Dial: st.dial, Info: st.info, Down: []string{"vm2"}}, &fakeRunner{t: t})
		if err != nil {
			t.Fatal(err)
		}
		s.jitter = func() float64 { return 0.5 }
		// Before Run, nothing has been tried: not ready.
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		if err := s.Ready(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Ready before Run: %v", err)
		}
		cancel()
		start(t, s)
		// Leg vm1.a failed once, vm1.b is attached, vm2 stays down: ready.
		if err := s.Ready(context.Background()); err != nil {
			t.Fatal(err)
		}
		checkStates(t, s, "vm1.a failed  r0", "vm1.b connected /dev/nbd1 r0", "vm2.a down  r0", "vm2.b down  r0")
		if s.Status()[1].Up {
			t.Error("vm2 is up")
		}
		time.Sleep(time.Hour)
		synctest.Wait()
		if diff := cmp.Diff([]string{"connect " + backendB + " 2 sockets -> nbd1"}, k.takeCalls()); diff != "" {
			t.Errorf("kernel calls (-want +got):\n%s", diff)
		}
	})
}

// Without xen_domain, down does not detach a device something uses (a
// domain whose configuration file names it, a mount, md): its I/O would
// fail, and with both legs the guest would lose both halves at once. It
// says who uses it; --force detaches anyway. A device nothing uses is
// detached. With xen_domain, xl block-detach is the check (TestUpDownXen).
func TestDownRefusesADeviceInUse(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		s := newTestSupervisor(t, []Spec{testSpec()}, k, st, nil)
		users := map[int][]string{0: {"nbd0 used by Xen domain 5 as 51728"}}
		s.cfg.Users = func(index int) ([]string, error) { return users[index], nil }
		start(t, s)
		k.takeCalls()
		ctx := context.Background()

		_, err := s.Down(ctx, "vm1", "", false)
		if err == nil || !strings.Contains(err.Error(), "leg a: /dev/nbd0 is in use (nbd0 used by Xen domain 5 as 51728)") {
			t.Errorf("down of a pair whose leg a is in use: %v, want it refused naming the user", err)
		}
		if calls := k.takeCalls(); len(calls) != 0 {
			t.Errorf("kernel calls: %q, want none", calls)
		}
		checkStates(t, s, "vm1.a connected /dev/nbd0 r0", "vm1.b connected /dev/nbd1 r0")

		if _, err := s.Down(ctx, "vm1", "b", false); err != nil {
			t.Errorf("down of leg b, unused: %v", err)
		}
		if _, err := s.Down(ctx, "vm1", "a", true); err != nil {
			t.Errorf("down --force of leg a: %v", err)
		}
		if diff := cmp.Diff([]string{"disconnect nbd1", "disconnect nbd0"}, k.takeCalls()); diff != "" {
			t.Errorf("kernel calls (-want +got):\n%s", diff)
		}
	})
}

// A device attached to the leg's export under another spelling of its URI
// (here without the port) is neither adopted (the kernel compares backends
// as written) nor joined by a second device on the same export: the leg
// fails, saying so, and nothing is attached for it.
func TestLegRefusesASecondDeviceOnItsExport(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		other := "nbd://192.0.2.2/vm1" // backendA without the default port
		k := newFakeKernel(t, kernel.Device{Index: 5, Connected: true, PID: 42, Backend: other, Size: 64 * mib, BlockSize: 512})
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		s := newTestSupervisor(t, []Spec{testSpec()}, k, st, nil)
		start(t, s)
		got := s.Status()[0].Legs[0]
		if got.State != StateFailed || got.Device != "" ||
			!strings.Contains(got.LastError, "/dev/nbd5 is attached to this leg's export as \""+other+"\"") {
			t.Errorf("leg a: %+v, want failed, saying /dev/nbd5 is on its export", got)
		}
		for _, c := range k.takeCalls() {
			if strings.HasPrefix(c, "connect "+backendA) || strings.Contains(c, "nbd5") {
				t.Errorf("kernel call %q: want none for leg a", c)
			}
		}
	})
}

// A leg's device disconnected by another process while something holds it
// open keeps its pid and backend, and the kernel sends no dead-link notice,
// yet it fails all its I/O. The health check finds it: the leg is no longer
// connected, says why, and the other leg is not taken down without --force.
func TestHealthCheckFindsADeviceDisconnectedUnderItsHolder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k, _, s := startPair(t)
		checkStates(t, s, "vm1.a connected /dev/nbd0 r0", "vm1.b connected /dev/nbd1 r0")

		k.disconnectUnder(0)
		time.Sleep(s.cfg.HealthInterval)
		synctest.Wait()
		got := s.Status()[0].Legs[0]
		// The health check's error, or the reconnect's that follows it.
		if got.State != StateReconnecting || !strings.Contains(got.LastError, "disconnected") {
			t.Errorf("leg a after its device was disconnected under its holder: %+v, want reconnecting, saying so", got)
		}
		if _, err := s.Down(context.Background(), "vm1", "b", false); !errors.Is(err, ErrLastHalf) {
			t.Errorf("down of leg b: %v, want ErrLastHalf", err)
		}
	})
}

// One leg taken down and up again leaves the other alone: the guest keeps
// running on it while its other half is replaced.
func TestDownUpOneLeg(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		r := &fakeRunner{t: t}
		s := newTestSupervisor(t, []Spec{xenSpec()}, k, st, r)
		linkA := LinkPath(s.cfg.LinkDir, "vm1", "a")
		start(t, s)
		k.takeCalls()
		ctx := context.Background()

		for _, leg := range []string{"c", "A", "a/b"} {
			if _, err := s.Down(ctx, "vm1", leg, false); !errors.Is(err, ErrUnknownLeg) {
				t.Errorf("down of leg %q: %v, want ErrUnknownLeg", leg, err)
			}
			if _, err := s.Up(ctx, "vm1", leg, time.Minute); !errors.Is(err, ErrUnknownLeg) {
				t.Errorf("up of leg %q: %v, want ErrUnknownLeg", leg, err)
			}
		}

		r.want = [][]string{{"xl", "block-detach", "guest1", "xvdb"}}
		ps, err := s.Down(ctx, "vm1", "a", false)
		if err != nil {
			t.Fatal(err)
		}
		r.done()
		if ps.Up {
			t.Error("the pair is up with leg a down")
		}
		if diff := cmp.Diff([]string{"disconnect nbd0"}, k.takeCalls()); diff != "" {
			t.Errorf("kernel calls (-want +got):\n%s", diff)
		}
		if a, b := linkTarget(t, s, "vm1", "a"), linkTarget(t, s, "vm1", "b"); a != "" || b != "/dev/nbd1" {
			t.Errorf("links after leg a went down: a -> %q, b -> %q", a, b)
		}
		time.Sleep(time.Hour)
		synctest.Wait()
		checkStates(t, s, "vm1.a down  r0", "vm1.b connected /dev/nbd1 r0")
		if calls := k.takeCalls(); len(calls) != 0 {
			t.Errorf("calls while leg a is down: %q", calls)
		}

		r.want = append(r.want, []string{"xl", "block-attach", "guest1", "format=raw, vdev=xvdb, access=rw, target=" + linkA})
		ps, err = s.Up(ctx, "vm1", "a", time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		r.done()
		if !ps.Up {
			t.Errorf("after up of leg a: %+v", ps)
		}
		checkStates(t, s, "vm1.a connected /dev/nbd0 r0", "vm1.b connected /dev/nbd1 r0")
		if diff := cmp.Diff([]string{"connect " + backendA + " 2 sockets -> nbd0"}, k.takeCalls()); diff != "" {
			t.Errorf("kernel calls (-want +got):\n%s", diff)
		}
	})
}

// A leg named PAIR/LEG in Config.Down starts down, as a reload keeps it; its
// pair's other leg is attached.
func TestStartOneLegDown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		s, err := newSupervisor(&Config{Pairs: []Spec{testSpec()}, Kernel: k, LinkDir: t.TempDir(),
			Dial: st.dial, Info: st.info, Down: []string{"vm1/b", "vm2"}}, &fakeRunner{t: t})
		if err != nil {
			t.Fatal(err)
		}
		start(t, s)
		if err := s.Ready(context.Background()); err != nil {
			t.Fatal(err)
		}
		checkStates(t, s, "vm1.a connected /dev/nbd0 r0", "vm1.b down  r0")
		if diff := cmp.Diff([]string{"connect " + backendA + " 2 sockets -> nbd0"}, k.takeCalls()); diff != "" {
			t.Errorf("kernel calls (-want +got):\n%s", diff)
		}
	})
}

// One leg is not taken down while the other is not connected: the guest
// would lose the last half of its mirror. --force does it anyway.
func TestDownRefusesTheLastHalf(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		st.set(uriB, func(e *fakeExport) { e.down = true })
		r := &fakeRunner{t: t}
		s := newTestSupervisor(t, []Spec{xenSpec()}, k, st, r)
		start(t, s)
		k.takeCalls()
		ctx := context.Background()

		_, err := s.Down(ctx, "vm1", "a", false)
		if !errors.Is(err, ErrLastHalf) || !strings.Contains(err.Error(), "leg b is failed") ||
			!strings.Contains(err.Error(), "lvnbd pair up --leg b vm1") {
			t.Fatalf("down of leg a with leg b failed: %v, want ErrLastHalf saying what to do", err)
		}
		r.done() // no xl call
		if calls := k.takeCalls(); len(calls) != 0 {
			t.Errorf("kernel calls: %q", calls)
		}
		checkStates(t, s, "vm1.a connected /dev/nbd0 r0", "vm1.b failed  r0")

		r.want = [][]string{{"xl", "block-detach", "guest1", "xvdb"}}
		if _, err := s.Down(ctx, "vm1", "a", true); err != nil {
			t.Fatalf("forced down of leg a: %v", err)
		}
		r.done()
		checkStates(t, s, "vm1.a down  r0", "vm1.b failed  r0")
	})
}

// A pair taken down after one of its legs runs xl block-detach only for the
// other: the leg already down is no longer the domain's.
func TestDownSkipsXlForALegAlreadyDown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		r := &fakeRunner{t: t, want: [][]string{{"xl", "block-detach", "guest1", "xvdb"}}}
		s := newTestSupervisor(t, []Spec{xenSpec()}, k, st, r)
		start(t, s)
		ctx := context.Background()
		if _, err := s.Down(ctx, "vm1", "a", false); err != nil {
			t.Fatal(err)
		}
		r.want = append(r.want, []string{"xl", "block-detach", "guest1", "xvdc"})
		if _, err := s.Down(ctx, "vm1", "", false); err != nil {
			t.Fatalf("down of the pair after leg a: %v", err)
		}
		r.done()
		checkStates(t, s, "vm1.a down  r0", "vm1.b down  r0")
	})
}

// A leg taken down while something still holds its device open (blkback,
// after a failed xl block-detach and --force) keeps its volume ID: the
// kernel keeps such a device configured, pair up adopts it, and it must not
// then be given a volume made anew. Once let go, down forgets the ID and up
// attaches the new volume.
func TestHeldDeviceKeepsItsVolumeID(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		k.held = map[int]bool{0: true}
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		st.set(uriA, func(e *fakeExport) { e.id = "uuid-1" })
		s, err := newSupervisor(&Config{Pairs: []Spec{testSpec()}, Kernel: k, Logger: zaptest.NewLogger(t),
			LinkDir: filepath.Join(t.TempDir(), "lvnbd"), Dial: st.dial, Info: st.info,
			IDs: volumeid.Open(filepath.Join(t.TempDir(), "volume-ids.json"))}, &fakeRunner{t: t})
		if err != nil {
			t.Fatal(err)
		}
		s.jitter = func() float64 { return 0.5 }
		start(t, s)
		k.takeCalls()
		ctx := context.Background()

		ps, err := s.Down(ctx, "vm1", "a", false)
		if err == nil || !strings.Contains(err.Error(), "still holds it open") || !strings.Contains(err.Error(), "volume ID is kept") {
			t.Errorf("down of a held leg: %v, want it to say the device is held and its ID kept", err)
		}
		if ps.Legs[0].State != StateDown {
			t.Errorf("leg a after down: %+v, want down", ps.Legs[0])
		}
		st.set(uriA, func(e *fakeExport) { e.id = "uuid-2" }) // made anew on box A
		k.takeCalls()
		// Up says the leg is not up, and why: its own attempt's error,
		// not the down's (a second earlier on the bubble's clock).
		time.Sleep(time.Second)
		_, err = s.Up(ctx, "vm1", "a", time.Minute)
		if err == nil || !strings.Contains(err.Error(), "leg a ("+backendA+") is reconnecting on /dev/nbd0: ") ||
			!strings.Contains(err.Error(), "volume id uuid-1, now uuid-2") {
			t.Errorf("up of a leg whose held device refuses the new volume: %v, want that refusal", err)
		}
		synctest.Wait()
		got := s.Status()[0].Legs[0]
		if got.State != StateReconnecting || !strings.Contains(got.LastError, "volume id uuid-1, now uuid-2") {
			t.Errorf("leg a adopting its held device: %+v, want the new volume refused", got)
		}
		for _, c := range k.takeCalls() {
			if strings.HasPrefix(c, "reconfigure nbd0") {
				t.Errorf("the held device was given the new volume: %q", c)
			}
		}

		// Let go: down forgets the ID, up attaches the new volume.
		k.release(0)
		if _, err := s.Down(ctx, "vm1", "a", false); err != nil {
			t.Fatalf("down once let go: %v", err)
		}
		if _, err := s.Up(ctx, "vm1", "a", time.Minute); err != nil {
			t.Fatalf("up on the new volume: %v", err)
		}
		checkStates(t, s, "vm1.a connected /dev/nbd0 r0", "vm1.b connected /dev/nbd1 r0")
	})
}

// xl lets go of xvdb, then fails on xvdc: leg a, which the guest no longer
// has, is detached and down; leg b stays attached. A retry asks xl for
// xvdc only.
func TestDownAfterXlFailsOnTheSecondLeg(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		r := &fakeRunner{t: t, want: [][]string{
			{"xl", "block-detach", "guest1", "xvdb"},
			{"xl", "block-detach", "guest1", "xvdc"},
		}}
		r.fail = map[int]error{1: errors.New(`running ["xl" "block-detach"]: exit status 1`)}
		s := newTestSupervisor(t, []Spec{xenSpec()}, k, st, r)
		start(t, s)
		k.takeCalls()
		ctx := context.Background()
		_, err := s.Down(ctx, "vm1", "", false)
		if err == nil || !strings.Contains(err.Error(), "leg b stays attached") {
			t.Fatalf("down: %v, want leg b said to stay attached", err)
		}
		r.done()
		if diff := cmp.Diff([]string{"disconnect nbd0"}, k.takeCalls()); diff != "" {
			t.Errorf("kernel calls (-want +got):\n%s", diff)
		}
		checkStates(t, s, "vm1.a down  r0", "vm1.b connected /dev/nbd1 r0")

		r.want = append(r.want, []string{"xl", "block-detach", "guest1", "xvdc"})
		if _, err := s.Down(ctx, "vm1", "", false); err != nil {
			t.Fatalf("retried down: %v", err)
		}
		r.done()
		checkStates(t, s, "vm1.a down  r0", "vm1.b down  r0")
	})
}

// A wait on a supervisor that stops (the daemon reloading its configuration
// or stopping) ends with ErrStopped rather than waiting for changes nobody
// makes any more: pair up then fails, saying to run it again, instead of
// acting on stale status once its --wait ran out.
func TestWaitEndsWhenTheSupervisorStops(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel(t)
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		s := newTestSupervisor(t, []Spec{testSpec()}, k, st, nil)
		stop := start(t, s)
		got := make(chan error, 1)
		go func() { got <- s.waitFor(context.Background(), func() bool { return false }) }()
		synctest.Wait()
		select {
		case err := <-got:
			t.Fatalf("waitFor returned %v with the supervisor running", err)
		default:
		}
		stop()
		synctest.Wait()
		select {
		case err := <-got:
			if !errors.Is(err, ErrStopped) {
				t.Errorf("waitFor after the stop: %v, want ErrStopped", err)
			}
		default:
			t.Fatal("waitFor still waits after the supervisor stopped")
		}
	})
}

// Of two devices attached to a leg's export, the daemon adopts the one still
// bound to its connections, not the lower number: one disconnected under its
// holder would take the guest's link and leave the live one unreconnected.
func TestAdoptionPrefersABoundDevice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dev := func(index int) kernel.Device {
			return kernel.Device{Index: index, Connected: true, PID: 42, Backend: backendA, Size: 64 * mib, BlockSize: 512}
		}
		k := newFakeKernel(t, dev(0), dev(1))
		k.unbound = map[int]bool{0: true}
		st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
		s := newTestSupervisor(t, []Spec{testSpec()}, k, st, nil)
		start(t, s)
		checkStates(t, s, "vm1.a connected /dev/nbd1 r0", "vm1.b connected /dev/nbd2 r0")
		if got := linkTarget(t, s, "vm1", "a"); got != "/dev/nbd1" {
			t.Errorf("leg a's link points at %q, want /dev/nbd1", got)
		}
	})
}

// Close lets a pair up or down under way end and refuses those after it:
// a reload's stop does not cut a pair down between its xl block-detach and
// its detach, and one that comes during the reload is refused, not lost.
func TestCloseRefusesLaterOperations(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := &fakeRunner{t: t}
		s, k := startXen(t, r)
		s.Close()
		ctx := context.Background()
		if _, err := s.Down(ctx, "vm1", "", false); !errors.Is(err, ErrStopped) {
			t.Errorf("Down after Close: %v, want ErrStopped", err)
		}
		if _, err := s.Up(ctx, "vm1", "", time.Minute); !errors.Is(err, ErrStopped) {
			t.Errorf("Up after Close: %v, want ErrStopped", err)
		}
		r.done() // no xl command was run
		if calls := k.takeCalls(); len(calls) != 0 {
			t.Errorf("kernel calls after Close: %q", calls)
		}
	})
}

// Down of the whole pair keeps the legs' refusals (a domain shut down and
// started again must not take a refused half back); Down of one leg, its
// replacement, forgets that leg's.
func TestDownForgetsARefusalOnlyForOneLeg(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, _, s := startPair(t)
		ctx := context.Background()
		for _, b := range []string{backendA, backendB} {
			if err := s.cfg.Refusals.Add(b, refusals.Refusal{Reason: "made anew"}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := s.Down(ctx, "vm1", "", true); err != nil {
			t.Fatal(err)
		}
		for _, b := range []string{backendA, backendB} {
			if _, ok, _ := s.cfg.Refusals.Get(b); !ok {
				t.Errorf("the whole pair's down forgot %s's refusal", b)
			}
		}
		if _, err := s.Down(ctx, "vm1", "a", true); err != nil {
			t.Fatal(err)
		}
		if _, ok, _ := s.cfg.Refusals.Get(backendA); ok {
			t.Error("pair down --leg a kept leg a's refusal")
		}
		if _, ok, _ := s.cfg.Refusals.Get(backendB); !ok {
			t.Error("pair down --leg a forgot leg b's refusal")
		}
	})
}

// hungRunner is an xl that never finishes after its first pass calls: it
// reports each start on started and returns only when its context ends,
// as a killed process.
type hungRunner struct {
	started chan []string
	pass    int
	n       int
}

func (r *hungRunner) run(ctx context.Context, args ...string) ([]byte, error) {
	r.started <- args
	if r.n++; r.n <= r.pass {
		return nil, nil
	}
	<-ctx.Done()
	return nil, fmt.Errorf("running %q: signal: killed", args)
}

// An xl block-detach that hangs (the domain or its backend stuck on a dead
// leg) is killed after XLTimeout, and the leg stays attached.
func TestHungXLIsCut(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := &hungRunner{started: make(chan []string, 1)}
		s, k := startXen(t, r)
		begin := time.Now()
		ps, err := s.Down(context.Background(), "vm1", "a", false)
		if took := time.Since(begin); took != XLTimeout {
			t.Errorf("Down took %s, want XLTimeout (%s)", took, XLTimeout)
		}
		if err == nil || !strings.Contains(err.Error(), "xl block-detach did not finish within 2m0s") {
			t.Errorf("Down with xl hung: %v", err)
		}
		if got := <-r.started; !slices.Equal(got, []string{"xl", "block-detach", "guest1", "xvdb"}) {
			t.Errorf("ran %q", got)
		}
		if ps.Legs[0].State != StateConnected {
			t.Errorf("leg a %s after xl failed, want it still connected", ps.Legs[0].State)
		}
		if calls := k.takeCalls(); len(calls) != 0 {
			t.Errorf("kernel calls: %q, want none (the leg stays attached)", calls)
		}
	})
}

// Close refuses new operations at once, lets one under way go on for
// CloseGrace, then cancels it: a hung xl holds up neither a reload nor a
// stop for longer.
func TestCloseCutsAnOperationThatHangs(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := &hungRunner{started: make(chan []string, 1)}
		s, _ := startXen(t, r)
		downErr := make(chan error, 1)
		go func() {
			_, err := s.Down(context.Background(), "vm1", "a", false)
			downErr <- err
		}()
		<-r.started
		closed := make(chan time.Duration, 1)
		begin := time.Now()
		go func() {
			s.Close()
			closed <- time.Since(begin)
		}()
		synctest.Wait() // Close waits for the Down
		if _, err := s.Up(context.Background(), "vm1", "", time.Minute); !errors.Is(err, ErrStopped) {
			t.Errorf("Up while Close waits: %v, want ErrStopped at once", err)
		}
		if took := <-closed; took != CloseGrace {
			t.Errorf("Close took %s, want CloseGrace (%s)", took, CloseGrace)
		}
		if err := <-downErr; !errors.Is(err, ErrStopped) {
			t.Errorf("the hung Down: %v, want ErrStopped", err)
		}
	})
}

// A forced Down cut by Close takes from the domain, and detaches, only the
// legs whose xl block-detach finished: the leg whose xl was killed, and
// those after it, stay attached and in the guest's hands.
func TestCloseCutsAForcedDownBetweenLegs(t *testing.T) {
	for _, pass := range []int{0, 1} {
		t.Run(fmt.Sprintf("%d xl finished", pass), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				r := &hungRunner{started: make(chan []string, 2), pass: pass}
				s, k := startXen(t, r)
				downErr := make(chan error, 1)
				go func() {
					_, err := s.Down(context.Background(), "vm1", "", true)
					downErr <- err
				}()
				for range pass + 1 {
					<-r.started
				}
				s.Close()
				if err := <-downErr; !errors.Is(err, ErrStopped) {
					t.Errorf("the cut Down: %v, want ErrStopped", err)
				}
				var want []string
				if pass == 1 {
					want = []string{"disconnect nbd0"} // leg a, let go of by the domain
				}
				if diff := cmp.Diff(want, k.takeCalls()); diff != "" {
					t.Errorf("kernel calls (-want +got):\n%s", diff)
				}
				st := s.Status()[0]
				if got := st.Legs[1].State; got != StateConnected {
					t.Errorf("leg b %s after the cut, want it still connected", got)
				}
			})
		})
	}
}
