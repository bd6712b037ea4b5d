package server

import (
	"context"
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/uevent"
	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/volume"
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
		sizes  []int64 // the volume's file is truncated to each, in turn
		events []uevent.Event
		lost   int // index of the event that is ErrLost instead; -1 none
		rolled bool
		cut    bool // the client is cut
	}{
		{"shrunk and grown back before the server looked", []int64{mib, 2 * mib},
			[]uevent.Event{change(dev, 11, true), change(dev, 12, true)}, -1, true, true},
		{"shrunk, seen", []int64{mib}, []uevent.Event{change(dev, 11, true)}, -1, true, true},
		{"grown", []int64{3 * mib}, []uevent.Event{change(dev, 11, true)}, -1, false, false},
		{"grown and shrunk back before the server looked (it cannot tell)", []int64{3 * mib, 2 * mib},
			[]uevent.Event{change(dev, 11, true), change(dev, 12, true)}, -1, true, true},
		{"reloaded, not resized (pvmove)", nil, []uevent.Event{change(dev, 11, false)}, -1, false, false},
		{"resized before the export was opened", nil, []uevent.Event{change(dev, 10, true)}, -1, false, false},
		{"another device", []int64{mib, 2 * mib}, []uevent.Event{change(unix.Mkdev(253, 4), 11, true)}, -1, false, false},
		{"events lost", []int64{mib}, []uevent.Event{lost}, 0, true, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			vols, ts, _ := observedVolumes(t, newFileDriver(t))
			v, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 2 * mib})
			if err != nil {
				t.Fatal(err)
			}
			c := dialRaw(t, ts.addr)
			c.open("vm1", false)
			// As Volumes.watch does for an LV's device, opened after
			// the kernel's event 10.
			e, _ := ts.reg.Lookup("vm1")
			e.watchFrom = 10
			e.watchedSize.Store(e.Backend.Size())
			vols.devs.Store(dev, e)

			for _, size := range tt.sizes {
				if err := os.Truncate(v.Path, size); err != nil {
					t.Fatal(err)
				}
			}
			events := &fakeEvents{events: tt.events, errs: make([]error, len(tt.events))}
			if tt.lost >= 0 {
				events.errs[tt.lost] = uevent.ErrLost
			}
			if err := vols.WatchDevices(events); !errors.Is(err, errStop) {
				t.Fatalf("WatchDevices: %v, want the events' error", err)
			}
			vols.shrinks.Wait()
			if tt.cut {
				c.expectClosed()
			} else {
				expectConnected(t, c)
			}
			now, ok := ts.reg.Lookup("vm1")
			if !ok {
				t.Fatal("vm1 not exported")
			}
			want := v.ID
			if tt.rolled {
				want += "-r1"
			}
			if got := nbd.DescriptionID(now.Description); got != want {
				t.Errorf("vm1 carries ID %q, want %q", got, want)
			}
		})
	}
}
