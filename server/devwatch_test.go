package server

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/looptest"
	"github.com/lvnbd/lvnbd/internal/uevent"
	"github.com/lvnbd/lvnbd/volume"
	"github.com/lvnbd/lvnbd/volume/file"
)

// fakeEvents hands out events, then errStop.
type fakeEvents struct {
	events []uevent.Event
	errs   []error // with the event at the same index: returned instead
}

var errStop = errors.New("stop")

func (f *fakeEvents) Next() (uevent.Event, error) {
	if len(f.events) == 0 {
		return uevent.Event{}, errStop
	}
	ev, err := f.events[0], f.errs[0]
	f.events, f.errs = f.events[1:], f.errs[1:]
	return ev, err
}

// change is the kernel's event after a device-mapper table of device dev
// was loaded, with resize as RESIZE=1.
func change(dev uint64, seq uint64, resize bool) uevent.Event {
	ev := uevent.Event{Action: "change", DevPath: "/devices/virtual/block/dm-3", Subsystem: "block", Seq: seq,
		Vars: map[string]string{"MAJOR": "253", "MINOR": "3"}}
	if dev != unix.Mkdev(253, 3) {
		ev.Vars["MINOR"] = "4"
	}
	if resize {
		ev.Vars["RESIZE"] = "1"
	}
	return ev
}

// The device watch sees what a rescan every few seconds could miss: a
// volume shrunk and grown back behind the server. Its clients are cut and
// the volume gets another ID, so that no dom0 leg takes it back with its
// tail lost. A plain grow, events from before the export was opened, other
// devices' events change nothing; when events were lost, every size is read
// again.
func TestDeviceWatchSeesAShrinkGrownBack(t *testing.T) {
	const mib = 1 << 20
	dev := unix.Mkdev(253, 3)
	lost := uevent.Event{}
	tests := []struct {
		name   string
		sizes  []int64        // the volume's file is truncated to each, in turn
		early  []uevent.Event // seen before the export is watched
		events []uevent.Event
		lost   int // index of the event that is ErrLost instead; -1 none
		rolled bool
	}{
		{"shrunk and grown back before the server looked", []int64{mib, 2 * mib}, nil,
			[]uevent.Event{change(dev, 21, true), change(dev, 22, true)}, -1, true},
		{"shrunk, seen", []int64{mib}, nil, []uevent.Event{change(dev, 21, true)}, -1, true},
		{"grown", []int64{3 * mib}, nil, []uevent.Event{change(dev, 21, true)}, -1, false},
		{"grown and shrunk back before the server looked (it cannot tell)", []int64{3 * mib, 2 * mib}, nil,
			[]uevent.Event{change(dev, 21, true), change(dev, 22, true)}, -1, true},
		{"reloaded, not resized (pvmove)", nil, nil, []uevent.Event{change(dev, 21, false)}, -1, false},
		{"resized before the export was opened", nil, nil, []uevent.Event{change(dev, 10, true)}, -1, false},
		{"resized while it was opened", nil, nil, []uevent.Event{change(dev, 15, true)}, -1, false},
		{"shrunk and grown back between the open and the watch", []int64{mib, 2 * mib},
			[]uevent.Event{change(dev, 21, true)}, nil, -1, true},
		{"another device", []int64{mib, 2 * mib}, nil, []uevent.Event{change(unix.Mkdev(253, 4), 21, true)}, -1, false},
		{"events lost", []int64{mib}, nil, []uevent.Event{lost}, 0, true},
		{"events lost, then the grow queued before", []int64{3 * mib}, nil,
			[]uevent.Event{lost, change(dev, 21, true)}, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			vols, ts, _ := observedVolumes(t, newFileDriver(t))
			vols.deviceOf = func(*Export) (uint64, bool) { return dev, true } // an LV's
			v, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 2 * mib})
			if err != nil {
				t.Fatal(err)
			}
			c := dialRaw(t, ts.addr)
			c.open("vm1", false)
			e, _ := ts.reg.Lookup("vm1")
			for _, size := range tt.sizes {
				if err := os.Truncate(v.Path, size); err != nil {
					t.Fatal(err)
				}
			}
			// Opened between the kernel's events 10 and 20, watched
			// after the early ones.
			vols.mu.Lock()
			vols.unwatch(e)
			for _, ev := range tt.early {
				vols.deviceChanged(ev)
			}
			vols.watch(e, openSeqs{10, 20})
			vols.mu.Unlock()
			events := &fakeEvents{events: tt.events, errs: make([]error, len(tt.events))}
			if tt.lost >= 0 {
				events.errs[tt.lost] = uevent.ErrLost
			}
			if err := vols.WatchDevices(events); !errors.Is(err, errStop) {
				t.Fatalf("WatchDevices: %v, want the events' error", err)
			}
			vols.shrinks.Wait()
			if tt.rolled {
				c.expectClosed()
			} else {
				expectConnected(t, c)
			}
			want := v.ID
			if tt.rolled {
				want += "-r1"
			}
			expectExportID(t, ts.reg, "vm1", want)
			// The export it replaced is no longer watched.
			vols.watchMu.Lock()
			watched := vols.devs[dev]
			vols.watchMu.Unlock()
			if tt.rolled && watched == e {
				t.Error("the export replaced under another ID is still watched")
			}
		})
	}
}

// watchedVolume makes a volume vm1 of size bytes, exported (e) on a device
// dev of its own (as an LV is), whose watch judges the events after 10, and
// those after 20 by size too.
func watchedVolume(t *testing.T, size int64) (vols *Volumes, ts *testServer, v volume.Volume, e *Export, dev uint64) {
	t.Helper()
	dev = unix.Mkdev(253, 3)
	vols, ts, _ = observedVolumes(t, newFileDriver(t))
	vols.deviceOf = func(*Export) (uint64, bool) { return dev, true }
	v, err := vols.Create(context.Background(), volume.CreateOptions{Name: "vm1", Size: size})
	if err != nil {
		t.Fatal(err)
	}
	e, _ = ts.reg.Lookup("vm1")
	vols.mu.Lock()
	vols.unwatch(e)
	vols.watch(e, openSeqs{10, 20})
	vols.mu.Unlock()
	return vols, ts, v, e, dev
}

// A resize the watch sees on an export that cannot read its size (being
// replaced: a recovery closed it before the export opened anew is watched)
// is judged by the next export of the device, once watched: here a shrink
// grown back, which changes the volume's ID.
func TestDeviceWatchHandsOnAResizeItCouldNotJudge(t *testing.T) {
	const mib = 1 << 20
	for _, unwatched := range []bool{false, true} {
		t.Run(map[bool]string{false: "still watched", true: "unwatched meanwhile"}[unwatched], func(t *testing.T) {
			vols, ts, v, e, dev := watchedVolume(t, 2*mib)
			for _, size := range []int64{mib, 2 * mib} {
				if err := os.Truncate(v.Path, size); err != nil {
					t.Fatal(err)
				}
			}
			backend := e.Backend
			e.Backend = refreshHook{backend, func() (int64, error) {
				if unwatched {
					vols.unwatch(e) // retired while it read the size
				}
				return 0, os.ErrClosed
			}}
			vols.deviceChanged(change(dev, 21, true))
			e.Backend = backend
			expectExportID(t, ts.reg, "vm1", v.ID) // nothing judged yet

			// The export that replaces it (here the same one, now readable).
			vols.mu.Lock()
			vols.unwatch(e)
			vols.watch(e, openSeqs{10, 20})
			vols.mu.Unlock()
			vols.shrinks.Wait()
			expectExportID(t, ts.reg, "vm1", v.ID+"-r1")
		})
	}
}

// refreshHook is a backend that runs hook when its size is read again.
type refreshHook struct {
	Backend
	hook func() (int64, error)
}

func (r refreshHook) Refresh() (int64, error) { return r.hook() }

// A resize that reached an export which, while it read the size, was
// replaced in the watch (a recovery) goes to the export that replaced it.
func TestDeviceWatchFollowsAnExportReplacedMeanwhile(t *testing.T) {
	vols, _, v, old, dev := watchedVolume(t, 1<<20)
	b, err := openBackend(v.Path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	asked := 0
	replacement := &Export{Name: "vm1", Description: old.Description, Backend: refreshHook{b, func() (int64, error) {
		asked++
		return b.Refresh()
	}}}
	old.Backend = refreshHook{old.Backend, func() (int64, error) {
		vols.rewatch(old, replacement) // the recovery, meanwhile
		return 0, os.ErrClosed
	}}
	vols.deviceChanged(change(dev, 21, true))
	if asked != 1 {
		t.Errorf("the export that replaced the one the event reached read its size %d times, want once", asked)
	}
}

// loopDriver serves its volumes from loop devices over their files, as the
// LVM driver serves them from device-mapper devices.
type loopDriver struct {
	*file.Driver
	loops map[string]string // volume name → its loop device
}

func (d loopDriver) List(ctx context.Context) ([]volume.Volume, error) {
	vols, err := d.Driver.List(ctx)
	for i := range vols {
		if dev, ok := d.loops[vols[i].Name]; ok {
			vols[i].Path = dev
		}
	}
	return vols, err
}

// End to end with the kernel's own events: a loop device under a volume is
// shrunk and grown back (its file truncated, then losetup -c, which sends
// RESIZE=1 as dm's reload does), with no rescan, before the watch reads the
// events: the watch cuts the client and the volume comes back under another
// ID. The server's ordinary path gives the watch the device (Volumes.watch
// from a sync's open) and takes it back from the export replaced.
func TestDeviceWatchOnALoopDevice(t *testing.T) {
	looptest.Require(t)
	ctx := context.Background()
	fd := newFileDriver(t)
	v, err := fd.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	loop := looptest.AttachFile(t, v.Path, 0)
	l, err := uevent.Listen()
	if err != nil {
		t.Fatal(err)
	}
	ts := startServer(t, nil)
	counted := make(chan struct{}, 1)
	vols := NewVolumes(loopDriver{fd, map[string]string{"vm1": loop}}, ts.reg, zap.New(zaptest.NewLogger(t).Core(),
		zap.Hooks(func(e zapcore.Entry) error {
			if strings.Contains(e.Message, "now has another ID") {
				select {
				case counted <- struct{}{}:
				default:
				}
			}
			return nil
		})))
	if err := vols.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	old, _ := ts.reg.Lookup("vm1")
	c := dialRaw(t, ts.addr)
	c.open("vm1", false)

	for _, size := range []int64{1 << 20, 2 << 20} {
		if err := os.Truncate(v.Path, size); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("losetup", "--set-capacity", loop).CombinedOutput(); err != nil {
			t.Fatalf("losetup --set-capacity %s: %v: %s", loop, err, out)
		}
	}
	// Both resizes are over before the watch reads their events, which
	// wait in the socket: the size is the old one again.
	watching := make(chan error, 1)
	go func() { watching <- vols.WatchDevices(l) }()
	t.Cleanup(func() {
		l.Close()
		<-watching
		vols.Stop()
	})
	c.expectClosed()
	select {
	case <-counted:
	case <-time.After(30 * time.Second):
		t.Fatal("no rollback counted within 30 s of the shrink and grow back")
	}
	vols.shrinks.Wait() // exported again
	now, ok := ts.reg.Lookup("vm1")
	if !ok || now == old {
		t.Fatal("vm1 not exported again")
	}
	expectExportID(t, ts.reg, "vm1", v.ID+"-r1")
	if now.Backend.Size() != 2<<20 {
		t.Errorf("vm1 exported with %d bytes, want %d", now.Backend.Size(), 2<<20)
	}
	vols.watchMu.Lock()
	if len(vols.devs) != 1 || vols.devs[mustDev(t, loop)] != now {
		t.Errorf("watched devices %v, want only %s's new export", vols.devs, loop)
	}
	vols.watchMu.Unlock()
	// A volume removed is no longer watched.
	if err := vols.Remove(ctx, "vm1", true); err != nil {
		t.Fatal(err)
	}
	vols.watchMu.Lock()
	defer vols.watchMu.Unlock()
	if len(vols.devs) != 0 {
		t.Errorf("watched devices after the removal: %v", vols.devs)
	}
}

func mustDev(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Rdev
}
