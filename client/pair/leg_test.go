package pair

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/lvnbd/lvnbd/client/kernel"
	"github.com/lvnbd/lvnbd/client/refusals"
	"github.com/lvnbd/lvnbd/client/volumeid"
)

// legStep is one step of a leg at a moment, and what it should do.
type legStep struct {
	at     time.Duration                                // since the start
	before func(k *fakeKernel, st *fakeStorage, l *leg) // what happens first
	// What the step should do and leave.
	calls      []string // kernel changes
	wait       time.Duration
	state      State
	device     string // also where the link must point
	size       uint64
	reconnects int
	adopted    bool
	errHas     string // in LastError, "" for none so far
	noLink     bool
}

const mib = 1 << 20

func TestLegStep(t *testing.T) {
	down := func(uri string) func(*fakeKernel, *fakeStorage, *leg) {
		return func(_ *fakeKernel, st *fakeStorage, _ *leg) { st.set(uri, func(e *fakeExport) { e.down = true }) }
	}
	up := func(uri string) func(*fakeKernel, *fakeStorage, *leg) {
		return func(_ *fakeKernel, st *fakeStorage, _ *leg) { st.set(uri, func(e *fakeExport) { e.down = false }) }
	}
	resize := func(size uint64) func(*fakeKernel, *fakeStorage, *leg) {
		return func(_ *fakeKernel, st *fakeStorage, _ *leg) { st.set(uriA, func(e *fakeExport) { e.size = size }) }
	}
	dies := func(_ *fakeKernel, _ *fakeStorage, l *leg) { l.suspect(false) }
	then := func(fs ...func(*fakeKernel, *fakeStorage, *leg)) func(*fakeKernel, *fakeStorage, *leg) {
		return func(k *fakeKernel, st *fakeStorage, l *leg) {
			for _, f := range fs {
				f(k, st, l)
			}
		}
	}
	attached := legStep{calls: []string{"connect " + backendA + " 2 sockets -> nbd0"}, wait: 5 * time.Second,
		state: StateConnected, device: "/dev/nbd0", size: 64 * mib}
	const shrank = "the export's volume was made anew or rolled back: the export " + backendA + " shrank under the device " +
		"(from 67108864 to 33554432 bytes), its tail is lost, so this half must be replaced as a new member: take the leg " +
		"down and up and add it in full (see lvnbd pair down --help)"
	running := func(index int, backend string, size uint64) kernel.Device {
		return kernel.Device{Index: index, Connected: true, PID: 7, Backend: backend, Size: size, BlockSize: 512}
	}

	tests := []struct {
		name  string
		devs  []kernel.Device // attached before the supervisor starts
		setup func(k *fakeKernel, st *fakeStorage)
		steps []legStep
	}{
		{name: "attach", steps: []legStep{attached,
			// Health check at 5 s, then size poll at 10 s: nothing to do.
			{at: 5 * time.Second, wait: 5 * time.Second, state: StateConnected, device: "/dev/nbd0", size: 64 * mib},
			{at: 10 * time.Second, wait: 5 * time.Second, state: StateConnected, device: "/dev/nbd0", size: 64 * mib},
		}},
		{name: "adopt on restart",
			devs: []kernel.Device{
				{Index: 0, Connected: true, Backend: backendA, Size: 64 * mib}, // disconnected, still open
				running(1, backendB, 64*mib),
				running(3, backendA, 64*mib),
			},
			steps: []legStep{
				// Fresh sockets for connections that may have died unseen;
				// not a reconnect.
				{calls: []string{"reconfigure nbd3 2 sockets"}, wait: 5 * time.Second, state: StateConnected,
					device: "/dev/nbd3", size: 64 * mib, adopted: true},
			}},
		{name: "adopt a device whose export grew meanwhile",
			devs: []kernel.Device{running(3, backendA, 32*mib)},
			steps: []legStep{
				// The sockets first, alone: the kernel resizes before it
				// takes sockets, and a resize waits for the I/O that waits
				// for them.
				{calls: []string{"reconfigure nbd3 2 sockets", "reconfigure nbd3 0 sockets size 67108864"}, wait: 5 * time.Second,
					state: StateConnected, device: "/dev/nbd3", size: 64 * mib, adopted: true},
			}},
		{name: "adopt with the storage box unreachable",
			devs:  []kernel.Device{running(3, backendA, 64*mib)},
			setup: func(_ *fakeKernel, st *fakeStorage) { down(uriA)(nil, st, nil) },
			steps: []legStep{
				{wait: time.Second, state: StateReconnecting, device: "/dev/nbd3", size: 64 * mib, adopted: true,
					errHas: "connection refused"},
				{at: time.Second, before: up(uriA), calls: []string{"reconfigure nbd3 2 sockets"}, wait: 5 * time.Second,
					state: StateConnected, device: "/dev/nbd3", size: 64 * mib, adopted: true, errHas: "connection refused"},
			}},
		{name: "leg dies, backoff, reconnect",
			steps: []legStep{attached,
				{at: time.Second, before: then(down(uriA), dies), wait: time.Second, state: StateReconnecting,
					device: "/dev/nbd0", size: 64 * mib, errHas: "connection refused"},
				{at: 2 * time.Second, wait: 2 * time.Second, state: StateReconnecting, device: "/dev/nbd0", size: 64 * mib, errHas: "refused"},
				// More deaths reported meanwhile do not hurry the backoff.
				{at: 3 * time.Second, before: dies, wait: time.Second, state: StateReconnecting, device: "/dev/nbd0", size: 64 * mib, errHas: "refused"},
				// At most a quarter of the 10 s dead timeout.
				{at: 4 * time.Second, wait: 2500 * time.Millisecond, state: StateReconnecting, device: "/dev/nbd0", size: 64 * mib, errHas: "refused"},
				{at: 8 * time.Second, before: up(uriA), calls: []string{"reconfigure nbd0 2 sockets"}, wait: 5 * time.Second,
					state: StateConnected, device: "/dev/nbd0", size: 64 * mib, reconnects: 1, errHas: "refused"},
				// Backoff starts over after a success.
				{at: 9 * time.Second, before: then(down(uriA), dies), wait: time.Second, state: StateReconnecting,
					device: "/dev/nbd0", size: 64 * mib, reconnects: 1, errHas: "refused"},
			}},
		{name: "reconnect to a grown export grows the device",
			steps: []legStep{attached,
				{at: time.Second, before: then(resize(128*mib), dies),
					calls: []string{"reconfigure nbd0 2 sockets", "reconfigure nbd0 0 sockets size 134217728"},
					wait:  5 * time.Second, state: StateConnected, device: "/dev/nbd0", size: 128 * mib, reconnects: 1},
			}},
		{name: "reconnected but the grow fails: the size poll grows it",
			steps: []legStep{attached,
				{at: time.Second, before: then(resize(128*mib), dies, func(k *fakeKernel, _ *fakeStorage, _ *leg) {
					k.resizeErr = errors.New("EIO")
				}), calls: []string{"reconfigure nbd0 2 sockets"}, wait: 5 * time.Second, state: StateConnected,
					device: "/dev/nbd0", size: 64 * mib, reconnects: 1, errHas: "growing /dev/nbd0 after the reconnect: EIO"},
				// The size poll, 10 s after the reconnect.
				{at: 11 * time.Second, calls: []string{"reconfigure nbd0 2 sockets", "reconfigure nbd0 0 sockets size 134217728"}, wait: 5 * time.Second,
					state: StateConnected, device: "/dev/nbd0", size: 128 * mib, reconnects: 1, errHas: "EIO"},
			}},
		{name: "device replaced while dialing a reconnect: not reconfigured, attached again",
			steps: []legStep{attached,
				{at: time.Second, before: func(k *fakeKernel, st *fakeStorage, l *leg) {
					// Detached by hand and the number reused by an attach
					// without a backend, which the kernel does not check.
					st.onDial = func() { k.setDevice(kernel.Device{Index: 0, Connected: true, PID: 9, Size: 128 * mib, BlockSize: 512}) }
					l.suspect(false)
				}, wait: 0, state: StateFailed, errHas: "device is attached to another export"},
				{at: time.Second, calls: []string{"connect " + backendA + " 2 sockets -> nbd2"}, wait: 5 * time.Second,
					state: StateConnected, device: "/dev/nbd2", size: 64 * mib, errHas: "another export"},
			}},
		{name: "events lost: fresh sockets, not a reconnect",
			steps: []legStep{attached,
				{at: time.Second, before: func(_ *fakeKernel, _ *fakeStorage, l *leg) { l.suspect(true) },
					calls: []string{"reconfigure nbd0 2 sockets"}, wait: 5 * time.Second, state: StateConnected,
					device: "/dev/nbd0", size: 64 * mib},
			}},
		// Fresh sockets first, so that the resize's queue freeze never
		// waits for I/O that waits for connections the kernel has not
		// yet reported dead.
		{name: "export grows: the size poll grows the device in place, after fresh sockets, not counted as a reconnect",
			steps: []legStep{attached,
				{at: 5 * time.Second, before: resize(128 * mib), wait: 5 * time.Second, state: StateConnected, device: "/dev/nbd0", size: 64 * mib},
				{at: 10 * time.Second, calls: []string{"reconfigure nbd0 2 sockets", "reconfigure nbd0 0 sockets size 134217728"}, wait: 5 * time.Second,
					state: StateConnected, device: "/dev/nbd0", size: 128 * mib},
			}},
		{name: "export shrinks: the device does not",
			steps: []legStep{attached,
				{at: 10 * time.Second, before: resize(32 * mib), wait: 5 * time.Second, state: StateConnected, device: "/dev/nbd0",
					size: 64 * mib, errHas: "size poll of leg a refused: " + shrank},
			}},
		// The tail the device had is gone from the export: md must not
		// take this half back from its bitmap.
		{name: "export shrunk, then grown back under the same ID: refused",
			setup: func(_ *fakeKernel, st *fakeStorage) { st.set(uriA, func(e *fakeExport) { e.id = "uuid-1" }) },
			steps: []legStep{attached,
				{at: time.Second, before: then(resize(32*mib), dies), wait: time.Second, state: StateReconnecting,
					device: "/dev/nbd0", size: 64 * mib, errHas: "reconnect /dev/nbd0 of leg a refused: " + shrank},
				{at: 2 * time.Second, before: resize(64 * mib), wait: 2 * time.Second, state: StateReconnecting,
					device: "/dev/nbd0", size: 64 * mib, errHas: shrank + "; here: lvnbd pair down --leg a vm1, then lvnbd pair up --leg a vm1"},
				// Grown beyond: still not the device's data.
				{at: 4 * time.Second, before: resize(128 * mib), wait: 2500 * time.Millisecond, state: StateReconnecting,
					device: "/dev/nbd0", size: 64 * mib, errHas: shrank},
			}},
		{name: "shrink seen by the size poll, grown back before the connections die: refused",
			steps: []legStep{attached,
				{at: 10 * time.Second, before: resize(32 * mib), wait: 5 * time.Second, state: StateConnected, device: "/dev/nbd0",
					size: 64 * mib, errHas: "size poll of leg a refused: " + shrank},
				{at: 12 * time.Second, before: then(resize(64*mib), dies), wait: time.Second, state: StateReconnecting,
					device: "/dev/nbd0", size: 64 * mib, errHas: "reconnect /dev/nbd0 of leg a refused: " + shrank},
			}},
		{name: "device lost while its export shrank: not attached again, also once grown back",
			steps: []legStep{attached,
				{at: 5 * time.Second, before: then(resize(32*mib), func(k *fakeKernel, _ *fakeStorage, _ *leg) {
					k.setDevice(kernel.Device{Index: 0, Connected: true}) // someone detached it
				}), wait: 0, state: StateFailed, errHas: "/dev/nbd0 is no longer attached"},
				{at: 5 * time.Second, wait: time.Second, state: StateFailed, errHas: "attach of leg a refused: " + shrank},
				{at: 6 * time.Second, before: resize(64 * mib), wait: 2 * time.Second, state: StateFailed, errHas: shrank},
			}},
		{name: "down and up after a shrink: attached as a new half",
			steps: []legStep{attached,
				{at: time.Second, before: then(resize(32*mib), dies), wait: time.Second, state: StateReconnecting,
					device: "/dev/nbd0", size: 64 * mib, errHas: shrank},
				{at: 2 * time.Second, before: func(_ *fakeKernel, _ *fakeStorage, l *leg) {
					if err := l.detach(context.Background(), time.Time{}, true); err != nil {
						panic(err)
					}
				}, calls: []string{"disconnect nbd0"}, wait: idle, state: StateDown, errHas: shrank, noLink: true},
				{at: time.Minute, before: func(_ *fakeKernel, _ *fakeStorage, l *leg) { l.up(context.Background(), time.Time{}) },
					calls: []string{"connect " + backendA + " 2 sockets -> nbd0"}, wait: 5 * time.Second,
					state: StateConnected, device: "/dev/nbd0", size: 32 * mib, errHas: shrank},
			}},
		{name: "reconnect to an export grown under its ID grows the device",
			setup: func(_ *fakeKernel, st *fakeStorage) { st.set(uriA, func(e *fakeExport) { e.id = "uuid-1" }) },
			steps: []legStep{attached,
				{at: time.Second, before: then(resize(128*mib), dies),
					calls: []string{"reconfigure nbd0 2 sockets", "reconfigure nbd0 0 sockets size 134217728"},
					wait:  5 * time.Second, state: StateConnected, device: "/dev/nbd0", size: 128 * mib, reconnects: 1},
				{at: 15 * time.Second, before: resize(256 * mib),
					calls: []string{"reconfigure nbd0 2 sockets", "reconfigure nbd0 0 sockets size 268435456"},
					wait:  5 * time.Second, state: StateConnected, device: "/dev/nbd0", size: 256 * mib, reconnects: 1},
			}},
		{name: "export turned read-only: not reconnected",
			steps: []legStep{attached,
				{at: time.Second, before: func(k *fakeKernel, st *fakeStorage, l *leg) {
					st.set(uriA, func(e *fakeExport) { e.readOnly = true })
					l.suspect(false)
				}, wait: time.Second, state: StateReconnecting, device: "/dev/nbd0", size: 64 * mib, errHas: "now read-only"},
			}},
		{name: "volume made anew under the export's name: not reconnected, nor attached again",
			setup: func(_ *fakeKernel, st *fakeStorage) { st.set(uriA, func(e *fakeExport) { e.id = "uuid-1" }) },
			steps: []legStep{attached,
				{at: time.Second, before: func(_ *fakeKernel, st *fakeStorage, l *leg) {
					st.set(uriA, func(e *fakeExport) { e.id = "uuid-2" })
					l.suspect(false)
				}, wait: time.Second, state: StateReconnecting, device: "/dev/nbd0", size: 64 * mib,
					errHas: "reconnect /dev/nbd0 of leg a refused: the export's volume was made anew or rolled back: the volume behind " +
						backendA + " is not the one its device was attached to (volume id uuid-1, now uuid-2)"},
				{at: 5 * time.Second, before: func(k *fakeKernel, _ *fakeStorage, _ *leg) {
					k.setDevice(kernel.Device{Index: 0, Connected: true}) // someone detached it
				}, wait: 0, state: StateFailed, errHas: "/dev/nbd0 is no longer attached"},
				{at: 5 * time.Second, wait: 2 * time.Second, state: StateFailed, // the second failure in a row
					errHas: "attach of leg a refused: the export's volume was made anew"},
			}},
		{name: "volume ID learned at the first reconnect of an adopted device",
			devs:  []kernel.Device{running(0, backendA, 64*mib)},
			setup: func(_ *fakeKernel, st *fakeStorage) { st.set(uriA, func(e *fakeExport) { e.id = "uuid-1" }) },
			steps: []legStep{
				{calls: []string{"reconfigure nbd0 2 sockets"}, wait: 5 * time.Second, state: StateConnected,
					device: "/dev/nbd0", size: 64 * mib, adopted: true},
				{at: time.Second, before: func(_ *fakeKernel, st *fakeStorage, l *leg) {
					st.set(uriA, func(e *fakeExport) { e.id = "uuid-2" })
					l.suspect(false)
				}, wait: time.Second, state: StateReconnecting, device: "/dev/nbd0", size: 64 * mib, adopted: true,
					errHas: "volume id uuid-1, now uuid-2"},
			}},
		{name: "kernel refuses the reconnect",
			steps: []legStep{attached,
				{at: time.Second, before: func(k *fakeKernel, _ *fakeStorage, l *leg) {
					k.reconfigureErr = errors.New("EINVAL")
					l.suspect(false)
				}, wait: time.Second, state: StateReconnecting, device: "/dev/nbd0", size: 64 * mib, errHas: "EINVAL"},
				{at: 2 * time.Second, calls: []string{"reconfigure nbd0 2 sockets"}, wait: 5 * time.Second,
					state: StateConnected, device: "/dev/nbd0", size: 64 * mib, reconnects: 1, errHas: "EINVAL"},
			}},
		{name: "device lost: attached again, link follows",
			steps: []legStep{attached,
				{at: 5 * time.Second, before: func(k *fakeKernel, _ *fakeStorage, _ *leg) {
					k.setDevice(kernel.Device{Index: 0, Connected: true}) // someone detached it
				}, wait: 0, state: StateFailed, errHas: "/dev/nbd0 is no longer attached"},
				{at: 5 * time.Second, calls: []string{"connect " + backendA + " 2 sockets -> nbd2"}, wait: 5 * time.Second,
					state: StateConnected, device: "/dev/nbd2", size: 64 * mib, errHas: "no longer attached"},
			}},
		{name: "device taken over by another export",
			steps: []legStep{attached,
				{at: 5 * time.Second, before: func(k *fakeKernel, _ *fakeStorage, _ *leg) {
					k.setDevice(kernel.Device{Index: 0, Connected: true, PID: 9, Backend: "nbd://elsewhere:10809/x"})
				}, wait: 0, state: StateFailed, errHas: `attached to "nbd://elsewhere:10809/x" now`},
			}},
		{name: "attach fails: backoff doubles up to 30 s",
			setup: func(_ *fakeKernel, st *fakeStorage) { down(uriA)(nil, st, nil) },
			steps: []legStep{
				{wait: time.Second, state: StateFailed, errHas: "connection refused", noLink: true},
				{at: 1 * time.Second, wait: 2 * time.Second, state: StateFailed, errHas: "refused", noLink: true},
				{at: 3 * time.Second, wait: 4 * time.Second, state: StateFailed, errHas: "refused", noLink: true},
				{at: 7 * time.Second, wait: 8 * time.Second, state: StateFailed, errHas: "refused", noLink: true},
				{at: 15 * time.Second, wait: 16 * time.Second, state: StateFailed, errHas: "refused", noLink: true},
				{at: 31 * time.Second, wait: 30 * time.Second, state: StateFailed, errHas: "refused", noLink: true},
				{at: 61 * time.Second, wait: 30 * time.Second, state: StateFailed, errHas: "refused", noLink: true},
				{at: 91 * time.Second, before: up(uriA), calls: attached.calls, wait: 5 * time.Second,
					state: StateConnected, device: "/dev/nbd0", size: 64 * mib, errHas: "refused"},
			}},
		{name: "kernel refuses the attach",
			setup: func(k *fakeKernel, _ *fakeStorage) { k.connectErr = kernel.ErrBusy },
			steps: []legStep{
				{wait: time.Second, state: StateFailed, errHas: "device is in use", noLink: true},
				{at: time.Second, calls: attached.calls, wait: 5 * time.Second, state: StateConnected, device: "/dev/nbd0",
					size: 64 * mib, errHas: "in use"},
			}},
		{name: "the kernel starves a receiver: attached again at once, no failure shown",
			setup: func(k *fakeKernel, _ *fakeStorage) {
				k.connectErr = &kernel.OpError{Op: "connect", Index: 0, Err: kernel.ErrReceiversStarved}
			},
			steps: []legStep{attached}},
		{name: "the kernel starves a receiver, and the device stays attached: no second device, a failure",
			setup: func(k *fakeKernel, _ *fakeStorage) {
				k.connectErr = errors.Join(&kernel.OpError{Op: "connect", Index: 0, Err: kernel.ErrReceiversStarved},
					fmt.Errorf("disconnecting /dev/nbd0 again failed, %w", kernel.ErrStillAttached))
			},
			steps: []legStep{{wait: time.Second, state: StateFailed, errHas: "stays attached", noLink: true}}},
		{name: "down and up",
			steps: []legStep{attached,
				{at: time.Second, before: func(_ *fakeKernel, _ *fakeStorage, l *leg) {
					if err := l.detach(context.Background(), time.Time{}, true); err != nil {
						panic(err)
					}
				}, calls: []string{"disconnect nbd0"}, wait: idle, state: StateDown, noLink: true},
				// Deaths and time change nothing while down.
				{at: time.Minute, before: dies, wait: idle, state: StateDown, noLink: true},
				{at: 2 * time.Minute, before: func(_ *fakeKernel, _ *fakeStorage, l *leg) { l.up(context.Background(), time.Time{}) },
					calls: []string{"connect " + backendA + " 2 sockets -> nbd0"}, wait: 5 * time.Second,
					state: StateConnected, device: "/dev/nbd0", size: 64 * mib},
			}},
		{name: "down and up on a volume made anew: attached, as a new half",
			setup: func(_ *fakeKernel, st *fakeStorage) { st.set(uriA, func(e *fakeExport) { e.id = "uuid-1" }) },
			steps: []legStep{attached,
				{at: time.Second, before: func(_ *fakeKernel, st *fakeStorage, l *leg) {
					if err := l.detach(context.Background(), time.Time{}, true); err != nil {
						panic(err)
					}
					st.set(uriA, func(e *fakeExport) { e.id = "uuid-2" })
				}, calls: []string{"disconnect nbd0"}, wait: idle, state: StateDown, noLink: true},
				{at: time.Minute, before: func(_ *fakeKernel, _ *fakeStorage, l *leg) { l.up(context.Background(), time.Time{}) },
					calls: []string{"connect " + backendA + " 2 sockets -> nbd0"}, wait: 5 * time.Second,
					state: StateConnected, device: "/dev/nbd0", size: 64 * mib},
			}},
		{name: "down after the device was detached and its number reused: the other device stays",
			steps: []legStep{attached,
				{at: time.Second, before: func(k *fakeKernel, _ *fakeStorage, l *leg) {
					k.setDevice(running(0, "nbd://other:10809/x", mib))
					if err := l.detach(context.Background(), time.Time{}, true); err != nil {
						panic(err)
					}
				}, wait: idle, state: StateDown, noLink: true},
			}},
		{name: "down after the device was detached and reused without a backend",
			steps: []legStep{attached,
				{at: time.Second, before: func(k *fakeKernel, _ *fakeStorage, l *leg) {
					k.setDevice(running(0, "", mib))
					if err := l.detach(context.Background(), time.Time{}, true); err != nil {
						panic(err)
					}
				}, wait: idle, state: StateDown, noLink: true},
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := newFakeKernel(t, tt.devs...)
			st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
			if tt.setup != nil {
				tt.setup(k, st)
			}
			s := newTestSupervisor(t, []Spec{testSpec()}, k, st, nil)
			l := s.pairs[0].legs[0]
			ctx := context.Background()
			t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
			for i, want := range tt.steps {
				if want.before != nil {
					want.before(k, st, l)
				}
				now := t0.Add(want.at)
				l.takeSuspicion(now)
				wait := l.step(ctx, now)
				got := l.status()
				if diff := cmp.Diff(want.calls, k.takeCalls()); diff != "" {
					t.Errorf("step %d at %v: kernel calls (-want +got):\n%s", i, want.at, diff)
				}
				if wait != want.wait {
					t.Errorf("step %d at %v: wait %v, want %v", i, want.at, wait, want.wait)
				}
				type summary struct {
					State      State
					Device     string
					Size       uint64
					Reconnects int
					Adopted    bool
				}
				if diff := cmp.Diff(summary{want.state, want.device, want.size, want.reconnects, want.adopted},
					summary{got.State, got.Device, got.Size, got.Reconnects, got.Adopted}); diff != "" {
					t.Errorf("step %d at %v: status (-want +got):\n%s", i, want.at, diff)
				}
				if !strings.Contains(got.LastError, want.errHas) || (want.errHas == "") != (got.LastError == "") {
					t.Errorf("step %d at %v: last error %q, want one with %q", i, want.at, got.LastError, want.errHas)
				}
				link := linkTarget(t, s, "vm1", "a")
				switch {
				case want.noLink && link != "":
					t.Errorf("step %d at %v: link to %s, want none", i, want.at, link)
				case want.device != "" && link != want.device:
					t.Errorf("step %d at %v: link to %q, want %s", i, want.at, link, want.device)
				}
			}
		})
	}
}

// TestAttachConfig checks what a leg asks the kernel for.
func TestAttachConfig(t *testing.T) {
	k := newFakeKernel(t)
	st := newFakeStorage(t, map[string]uint64{uriA: 64*mib + 100, uriB: 64 * mib})
	s := newTestSupervisor(t, []Spec{testSpec()}, k, st, nil)
	s.pairs[0].legs[0].step(context.Background(), time.Now())
	if len(k.connected) != 1 {
		t.Fatalf("%d connects", len(k.connected))
	}
	got := k.connected[0]
	got.ServerFlags = 0
	want := kernel.Config{
		Size:            64 * mib, // whole blocks only
		BlockSize:       512,
		Timeout:         5 * time.Second,
		DeadConnTimeout: 10 * time.Second,
		Backend:         backendA,
		Index:           kernel.AnyDevice,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Config (-want +got):\n%s", diff)
	}
}

func TestBackoff(t *testing.T) {
	tests := []struct {
		failures int
		jitter   float64
		want     time.Duration
	}{
		{1, 0.5, time.Second},
		{2, 0.5, 2 * time.Second},
		{3, 0.5, 4 * time.Second},
		{5, 0.5, 16 * time.Second},
		{6, 0.5, 30 * time.Second},
		{1000, 0.5, 30 * time.Second},
		{1, 0, 800 * time.Millisecond},
		{6, 0.999, 35988 * time.Millisecond}, // just under +20%
	}
	for _, tt := range tests {
		got := backoff(tt.failures, time.Second, 30*time.Second, tt.jitter)
		if diff := got - tt.want; diff < -time.Millisecond || diff > time.Millisecond {
			t.Errorf("backoff(%d, jitter %v) = %v, want %v", tt.failures, tt.jitter, got, tt.want)
		}
	}
}

// TestReconnectBackoffGaps checks the waits between redials of a leg whose
// device is waiting for a reconnect: I/O fails after the dead timeout, so a
// box back within it must be redialed within it, a quarter of it at most.
func TestReconnectBackoffGaps(t *testing.T) {
	const s = time.Second
	tests := []struct {
		name        string
		deadTimeout time.Duration
		want        []time.Duration // after the 1st, 2nd... failed attempt
	}{
		// Before: 16, 30, 30 s after 8 s; the box back at 32 s was found at
		// 61 s, after the guest's I/O had failed.
		{name: "the default 60 s", deadTimeout: 60 * s, want: []time.Duration{1 * s, 2 * s, 4 * s, 8 * s, 15 * s, 15 * s, 15 * s}},
		{name: "the VM suite's 5 s", deadTimeout: 5 * s, want: []time.Duration{1 * s, 1250 * time.Millisecond, 1250 * time.Millisecond}},
		{name: "under 4 s: the shortest backoff", deadTimeout: 2 * s, want: []time.Duration{1 * s, 1 * s, 1 * s}},
		{name: "over 2 min: the longest backoff", deadTimeout: 10 * time.Minute, want: []time.Duration{1 * s, 2 * s, 4 * s, 8 * s, 16 * s, 30 * s, 30 * s}},
		// I/O has failed already: no hurry.
		{name: "none: fails at once", deadTimeout: 0, want: []time.Duration{1 * s, 2 * s, 4 * s, 8 * s, 16 * s, 30 * s, 30 * s}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := newFakeKernel(t)
			st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
			spec := testSpec()
			spec.DeadTimeout = tt.deadTimeout
			sv := newTestSupervisor(t, []Spec{spec}, k, st, nil)
			l := sv.pairs[0].legs[0]
			ctx := context.Background()
			now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
			l.step(ctx, now)
			st.set(uriA, func(e *fakeExport) { e.down = true })
			l.suspect(false)
			l.takeSuspicion(now)
			var got []time.Duration
			for range tt.want {
				wait := l.step(ctx, now)
				got = append(got, wait)
				now = now.Add(wait)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("waits between redials (-want +got):\n%s", diff)
			}
			if state := l.status().State; state != StateReconnecting {
				t.Errorf("state %s, want %s", state, StateReconnecting)
			}
		})
	}
}

// reloadableLeg returns a fake kernel and storage (leg a's export with ID
// uuid-1), and start, which makes a new supervisor on them and one volume-ID
// file, as a reload or a restart of the daemon does, and returns its leg a.
func reloadableLeg(t *testing.T) (*fakeKernel, *fakeStorage, func() *leg) {
	k := newFakeKernel(t)
	st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
	st.set(uriA, func(e *fakeExport) { e.id = "uuid-1" })
	ids := volumeid.Open(filepath.Join(t.TempDir(), "volume-ids.json"))
	start := func() *leg {
		s, err := newSupervisor(&Config{Pairs: []Spec{testSpec()}, Kernel: k, Logger: zaptest.NewLogger(t),
			LinkDir: filepath.Join(t.TempDir(), "lvnbd"), Dial: st.dial, Info: st.info, IDs: ids}, &fakeRunner{t: t})
		if err != nil {
			t.Fatal(err)
		}
		return s.pairs[0].legs[0]
	}
	return k, st, start
}

// The volume ID recorded at attach outlives the supervisor: after a reload
// or a restart, the new one adopts the device and still refuses the volume
// made anew meanwhile.
func TestVolumeIDSurvivesReload(t *testing.T) {
	k, st, start := reloadableLeg(t)
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	l := start()
	l.step(context.Background(), now)
	if got := l.status(); got.State != StateConnected {
		t.Fatalf("first supervisor: %+v", got)
	}
	st.set(uriA, func(e *fakeExport) { e.id = "uuid-2" })
	k.takeCalls()

	l = start() // the reload
	l.step(context.Background(), now.Add(time.Second))
	got := l.status()
	if got.State != StateReconnecting || !got.Adopted || !strings.Contains(got.LastError, "volume id uuid-1, now uuid-2") {
		t.Errorf("after the reload: %+v, want the adopted device refused the new volume", got)
	}
	if calls := k.takeCalls(); len(calls) != 0 {
		t.Errorf("the refused volume reached the kernel: %v", calls)
	}
}

// A shrink the size poll saw outlives the supervisor too: after a reload,
// the new one adopts the device and refuses the export grown back meanwhile.
func TestShrinkSurvivesReload(t *testing.T) {
	k, st, start := reloadableLeg(t)
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	l := start()
	l.step(context.Background(), now)
	st.set(uriA, func(e *fakeExport) { e.size = 32 * mib })
	l.step(context.Background(), now.Add(10*time.Second)) // the size poll
	if got := l.status(); got.State != StateConnected || !strings.Contains(got.LastError, "shrank") {
		t.Fatalf("first supervisor after the shrink: %+v", got)
	}
	st.set(uriA, func(e *fakeExport) { e.size = 64 * mib })
	k.takeCalls()

	l = start() // the reload
	l.step(context.Background(), now.Add(11*time.Second))
	got := l.status()
	if got.State != StateReconnecting || !got.Adopted || !strings.Contains(got.LastError, "reconnect /dev/nbd0 of leg a refused: "+
		"the export's volume was made anew or rolled back: the export "+backendA+" shrank under the device (from 67108864 to 33554432 bytes)") {
		t.Errorf("after the reload: %+v, want the adopted device refused the export grown back", got)
	}
	if calls := k.takeCalls(); len(calls) != 0 {
		t.Errorf("the refused export reached the kernel: %v", calls)
	}
}

// refusalEnv is a leg whose export is uriA (volume uuid-1 at first), with
// refusals kept in a file; boot starts a supervisor afresh, as a restart of
// the dom0 does (no devices, no volume IDs), or over kernel k.
type refusalEnv struct {
	t       *testing.T
	st      *fakeStorage
	refused *refusals.Store
	ctx     context.Context
	now     time.Time
	poll    time.Duration // the size poll's interval; 0 for the default
}

func newRefusalEnv(t *testing.T) *refusalEnv {
	st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
	st.set(uriA, func(e *fakeExport) { e.id = "uuid-1" })
	return &refusalEnv{t: t, st: st, refused: refusals.Open(filepath.Join(t.TempDir(), "refused-legs.json")),
		ctx: context.Background(), now: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (e *refusalEnv) boot(k *fakeKernel, ids *volumeid.Store) *leg {
	if ids == nil {
		ids = volumeid.Open(filepath.Join(e.t.TempDir(), "volume-ids.json"))
	}
	s, err := newSupervisor(&Config{Pairs: []Spec{testSpec()}, Kernel: k, Logger: zaptest.NewLogger(e.t),
		LinkDir: filepath.Join(e.t.TempDir(), "lvnbd"), Dial: e.st.dial, Info: e.st.info, IDs: ids, Refusals: e.refused,
		PollInterval: e.poll},
		&fakeRunner{t: e.t})
	if err != nil {
		e.t.Fatal(err)
	}
	return s.pairs[0].legs[0]
}

// step runs leg l at d after the start, after a death of its connections
// if dies.
func (e *refusalEnv) step(l *leg, d time.Duration, dies bool) LegStatus {
	if dies {
		l.suspect(false)
		l.takeSuspicion(e.now.Add(d))
	}
	l.step(e.ctx, e.now.Add(d))
	return l.status()
}

// refuse attaches leg a, then has its export serve uuid-2 (rolled back,
// say) and its connections die: the reconnect refuses it.
func (e *refusalEnv) refuse() *leg {
	l := e.boot(newFakeKernel(e.t), nil)
	e.step(l, 0, false)
	e.st.set(uriA, func(x *fakeExport) { x.id = "uuid-2" })
	if got := e.step(l, time.Second, true); got.State != StateReconnecting || !strings.Contains(got.LastError, "volume id uuid-1, now uuid-2") {
		e.t.Fatalf("before the restart: %+v, want the export refused", got)
	}
	return l
}

// A leg refused as not its device's volume stays refused after the dom0
// restarted: the device and the volume IDs in /run are gone with the reboot,
// and only the refusals in /var/lib say that the export was refused. Taken
// down alone and up, the leg attaches the export as a new half.
func TestRefusalOutlivesARestartOfTheDom0(t *testing.T) {
	e := newRefusalEnv(t)
	e.refuse()
	k := newFakeKernel(t)
	l := e.boot(k, nil) // the restart
	got := e.step(l, time.Hour, false)
	if got.State != StateFailed || !strings.Contains(got.LastError, "attach of leg a refused: the export's volume was made "+
		"anew or rolled back: refused on ") || !strings.Contains(got.LastError, "volume id uuid-1, now uuid-2") {
		t.Errorf("after the restart: %+v, want the leg still refused, saying why", got)
	}
	if calls := k.takeCalls(); len(calls) != 0 {
		t.Errorf("after the restart the refused export reached the kernel: %v", calls)
	}

	if err := l.detach(e.ctx, e.now.Add(2*time.Hour), true); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := e.refused.Get(backendA); ok || err != nil {
		t.Errorf("the refusal outlived pair down --leg: %v %v", ok, err)
	}
	l.up(e.ctx, e.now.Add(2*time.Hour))
	if got := e.step(l, 2*time.Hour, false); got.State != StateConnected {
		t.Errorf("after pair down and up: %+v, want the export attached as a new half", got)
	}
	if calls := k.takeCalls(); len(calls) != 1 || !strings.HasPrefix(calls[0], "connect "+backendA) {
		t.Errorf("after pair down and up: kernel calls %v", calls)
	}
}

// Taken down with the whole pair (a domain shut down), the leg keeps its
// refusal: the half must not come back with the pair unnoticed.
func TestWholePairDownKeepsTheRefusal(t *testing.T) {
	e := newRefusalEnv(t)
	l := e.refuse()
	if err := l.detach(e.ctx, e.now.Add(time.Minute), false); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := e.refused.Get(backendA); !ok {
		t.Fatal("the whole pair's down forgot the refusal")
	}
	l.up(e.ctx, e.now.Add(2*time.Minute))
	if got := e.step(l, 2*time.Minute, false); got.State != StateFailed || !strings.Contains(got.LastError, "refused on ") {
		t.Errorf("after pair down and up: %+v, want the leg still refused", got)
	}
}

// After a restart of the dom0, a device attached to the refused export by
// hand (its volume ID recorded by lvnbd attach) is not adopted, and does
// not lift the refusal: only the device's own volume does.
func TestAdoptionOfAHandAttachedDeviceKeepsTheRefusal(t *testing.T) {
	e := newRefusalEnv(t)
	e.refuse()
	ids := volumeid.Open(filepath.Join(t.TempDir(), "volume-ids.json"))
	if err := ids.Set(backendA, "uuid-2"); err != nil { // what lvnbd attach records
		t.Fatal(err)
	}
	k := newFakeKernel(t, kernel.Device{Index: 5, Connected: true, PID: 7, Backend: backendA, Size: 64 * mib, BlockSize: 512})
	l := e.boot(k, ids)
	got := e.step(l, time.Hour, false)
	if got.State == StateConnected || got.Adopted || !strings.Contains(got.LastError, "/dev/nbd5 is attached to the leg's export, which was refused on") {
		t.Errorf("after the restart: %+v, want the hand-attached device left alone", got)
	}
	if _, ok, _ := e.refused.Get(backendA); !ok {
		t.Error("the refusal was forgotten")
	}
	if calls := k.takeCalls(); len(calls) != 0 {
		t.Errorf("kernel calls %v", calls)
	}
	// pair down --leg says what that device is, not that the leg's own
	// is held open.
	if err := l.detach(e.ctx, e.now.Add(2*time.Hour), true); err == nil ||
		!strings.Contains(err.Error(), "/dev/nbd5, attached to the refused export by other means than this leg, was not adopted") {
		t.Errorf("pair down --leg: %v", err)
	}
}

// A refusal the export lifts again (a server that answered without IDs
// for a while, then with the device's again) is forgotten, whether the
// reconnect or the size poll saw it: kept, it would refuse the device's own
// volume after a restart of the dom0.
func TestARefusalTheExportLiftsIsForgotten(t *testing.T) {
	for _, poll := range []bool{false, true} {
		t.Run(map[bool]string{false: "reconnect", true: "size poll"}[poll], func(t *testing.T) {
			e := newRefusalEnv(t)
			if !poll {
				e.poll = time.Hour // the reconnect alone sees the export
			}
			l := e.boot(newFakeKernel(t), nil)
			e.step(l, 0, false)
			e.st.set(uriA, func(x *fakeExport) { x.id = "" })
			if got := e.step(l, 10*time.Second, !poll); !strings.Contains(got.LastError, "volume id uuid-1, now none") {
				t.Fatalf("the export without an ID: %+v, want it refused", got)
			}
			if _, ok, _ := e.refused.Get(backendA); !ok {
				t.Fatal("the refusal was not recorded")
			}
			e.st.set(uriA, func(x *fakeExport) { x.id = "uuid-1" })
			if got := e.step(l, 20*time.Second, !poll); got.State != StateConnected {
				t.Fatalf("the export with the device's ID again: %+v, want it connected", got)
			}
			if _, ok, _ := e.refused.Get(backendA); ok {
				t.Error("the refusal the export lifted is still recorded")
			}
			// And after a restart, the export serving the device's volume
			// attaches.
			if got := e.step(e.boot(newFakeKernel(t), nil), time.Hour, false); got.State != StateConnected {
				t.Errorf("after a restart: %+v", got)
			}
		})
	}
}

// A leg that lost its device takes its link down at once, also while it
// cannot attach again: the device number is free for any export to take,
// and the link must never lead a guest to another volume's disk.
func TestLostDeviceTakesItsLink(t *testing.T) {
	k := newFakeKernel(t)
	st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
	s := newTestSupervisor(t, []Spec{testSpec()}, k, st, nil)
	l := s.pairs[0].legs[0]
	ctx := context.Background()
	t0 := time.Now()
	l.step(ctx, t0)
	if got := linkTarget(t, s, "vm1", "a"); got != "/dev/nbd0" {
		t.Fatalf("link a -> %q, want /dev/nbd0", got)
	}
	// Box A is down; nbd0 was detached by hand and its number taken by
	// another export.
	st.set(uriA, func(e *fakeExport) { e.down = true })
	k.setDevice(kernel.Device{Index: 0, Connected: true, PID: 9, Backend: "nbd://elsewhere:10809/vm2", Size: 64 * mib, BlockSize: 512})
	l.step(ctx, t0.Add(5*time.Second)) // the health check finds it lost
	l.step(ctx, t0.Add(5*time.Second)) // the attach fails: box A is down
	if st := l.status(); st.State != StateFailed || st.Device != "" {
		t.Fatalf("leg a: %s on %q, want failed without a device", st.State, st.Device)
	}
	if got := linkTarget(t, s, "vm1", "a"); got != "" {
		t.Errorf("leg a has no device, but its link leads to %s, now another export's", got)
	}
	// Attached again, the link is back.
	st.set(uriA, func(e *fakeExport) { e.down = false })
	l.step(ctx, t0.Add(time.Minute))
	st2 := l.status()
	if got := linkTarget(t, s, "vm1", "a"); st2.State != StateConnected || got != st2.Device || got == "/dev/nbd0" {
		t.Errorf("leg a after the attach: %s on %q, its link -> %q", st2.State, st2.Device, got)
	}
}

// A shrink is lifted by no volume: the tail is lost whatever the export
// serves. Recorded from the mark an older lvnbd left in the volume IDs, it
// still refuses, after a restart of the dom0, a device attached by hand to
// the export grown back under the same ID.
func TestAShrinkIsLiftedByNoVolume(t *testing.T) {
	e := newRefusalEnv(t)
	ids := volumeid.Open(filepath.Join(t.TempDir(), "volume-ids.json"))
	if err := ids.Shrank(backendA, "uuid-1", 64*mib, 32*mib); err == nil {
		t.Fatal("Shrank recorded no refusal")
	}
	own := kernel.Device{Index: 5, Connected: true, PID: 7, Backend: backendA, Size: 64 * mib, BlockSize: 512}
	if got := e.step(e.boot(newFakeKernel(t, own), ids), 0, false); got.State == StateConnected || !strings.Contains(got.LastError, "shrank") {
		t.Fatalf("the leg's own device, its export grown back: %+v, want it refused", got)
	}
	r, ok, _ := e.refused.Get(backendA)
	if !ok || r.Accepts != "" {
		t.Fatalf("refusal %+v (%v), want one no volume lifts", r, ok)
	}

	ids = volumeid.Open(filepath.Join(t.TempDir(), "volume-ids.json")) // the restart
	if err := ids.Set(backendA, "uuid-1"); err != nil {                // lvnbd attach by hand
		t.Fatal(err)
	}
	byHand := own
	byHand.Index = 7
	got := e.step(e.boot(newFakeKernel(t, byHand), ids), time.Hour, false)
	if got.State == StateConnected || got.Adopted || !strings.Contains(got.LastError, "/dev/nbd7 is attached to the leg's export, which was refused on") {
		t.Errorf("after the restart, a device attached by hand: %+v, want it not adopted", got)
	}
	if _, ok, _ := e.refused.Get(backendA); !ok {
		t.Error("the refusal of the shrink was lifted")
	}
}

// A shrink that follows a refusal the device's volume would lift (one
// answer without an ID) is never lifted: after a restart of the dom0 the
// export grown back under the device's ID is still refused.
func TestAShrinkAfterALiftableRefusalIsNeverLifted(t *testing.T) {
	e := newRefusalEnv(t)
	l := e.boot(newFakeKernel(t), nil)
	e.step(l, 0, false)
	e.st.set(uriA, func(x *fakeExport) { x.id = "" })
	e.step(l, 10*time.Second, false) // a size poll: refused, liftable by uuid-1
	e.st.set(uriA, func(x *fakeExport) { x.id, x.size = "uuid-1", 32*mib })
	if got := e.step(l, 20*time.Second, false); !strings.Contains(got.LastError, "shrank") {
		t.Fatalf("the shrink: %+v", got)
	}
	e.st.set(uriA, func(x *fakeExport) { x.size = 64 * mib })
	if got := e.step(e.boot(newFakeKernel(t), nil), time.Hour, false); got.State == StateConnected {
		t.Errorf("after a restart, the export grown back: %+v, want it refused", got)
	}
}

// Refusals that cannot be read keep no healthy leg from its connections:
// a leg whose device's volume the IDs know, served by the export, goes on.
func TestUnreadableRefusalsKeepLiveLegs(t *testing.T) {
	e := newRefusalEnv(t)
	l := e.boot(newFakeKernel(t), nil)
	e.step(l, 0, false)
	if err := os.WriteFile(e.refused.Path(), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := e.step(l, time.Second, true); got.State != StateConnected {
		t.Errorf("a reconnect with the refusals unreadable: %+v, want the leg connected", got)
	}
	// With nothing known, the leg does not attach what may have been
	// refused.
	if got := e.step(e.boot(newFakeKernel(t), nil), time.Hour, false); got.State == StateConnected ||
		!strings.Contains(got.LastError, "is corrupt") {
		t.Errorf("after a restart: %+v, want the leg refused, naming the file", got)
	}
}

// The dom0 holding a leg's device (the guest's mirror assembled here by a
// udev without lvnbd's rule) is said once, as an error and in the leg's
// status, and said again only if what holds it changes.
func TestLegHeldOnTheDom0IsSaid(t *testing.T) {
	k := newFakeKernel(t)
	st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
	var held []string
	core, logs := observer.New(zap.ErrorLevel)
	s, err := newSupervisor(&Config{Pairs: []Spec{testSpec()}, Kernel: k, Logger: zap.New(core),
		LinkDir: filepath.Join(t.TempDir(), "lvnbd"), Dial: st.dial, Info: st.info,
		Holders: func(index int) ([]string, error) {
			if index != 0 {
				t.Errorf("holders of nbd%d, want nbd0", index)
			}
			return held, nil
		}}, &fakeRunner{t: t})
	if err != nil {
		t.Fatal(err)
	}
	l := s.pairs[0].legs[0]
	ctx, now := context.Background(), time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	l.step(ctx, now)
	l.step(ctx, now.Add(10*time.Second)) // a health check: nothing holds it
	if got := l.status(); got.LastError != "" {
		t.Fatalf("unheld: %+v", got)
	}
	held = []string{"nbd0 held by md127"}
	for i := range 3 {
		l.step(ctx, now.Add(time.Duration(20+10*i)*time.Second))
	}
	if got := l.status(); got.State != StateConnected || !strings.Contains(got.LastError,
		"/dev/nbd0 is held on this dom0 by nbd0 held by md127: the guest's md array assembled here") {
		t.Errorf("held: %+v", got)
	}
	if n := logs.FilterMessage("leg's device held on the dom0").Len(); n != 1 {
		t.Errorf("said %d times, want once", n)
	}
	held = []string{"nbd0 held by md127", "nbd0 held by dm-3"}
	l.step(ctx, now.Add(time.Minute))
	if n := logs.FilterMessage("leg's device held on the dom0").Len(); n != 2 {
		t.Errorf("said %d times after a change, want twice", n)
	}
}
