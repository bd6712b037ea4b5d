package server

import (
	"errors"
	"fmt"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/internal/uevent"
)

// DeviceEvents are the kernel's device events: uevent.Listener.
type DeviceEvents interface {
	Next() (uevent.Event, error)
}

// WatchDevices re-reads the size of a volume's or snapshot's export as soon
// as the kernel says its block device changed, until events fails (close
// the listener to stop it). LVM reloads an LV's device-mapper table for
// every lvreduce and lvextend, and the kernel then sends a change event,
// with RESIZE=1 when the size changed. The rescan alone reads the sizes
// every few seconds: an lvreduce and an lvextend back to the same size
// between two rescans would go unseen, the volume's tail lost under the ID
// its dom0 legs trust (see Export.shrank). Here a shrink is seen within
// moments, and a resize whose size is the one last seen (it changed and
// changed back before the server looked) is taken for a shrink grown back:
// it may have been one.
func (v *Volumes) WatchDevices(events DeviceEvents) error {
	for {
		ev, err := events.Next()
		switch {
		case errors.Is(err, uevent.ErrLost):
			v.log.Warn("kernel device events were lost (a burst overflowed the socket's buffer): re-reading every export's size; a volume shrunk and grown back behind the server in that moment goes unseen")
			v.devs.Range(func(_, x any) bool {
				e := x.(*Export)
				if size, err := e.refreshSize(v.log); err == nil {
					e.watchedSize.Store(size)
				}
				return true
			})
			continue
		case err != nil:
			return fmt.Errorf("watching devices: %w", err)
		}
		v.deviceChanged(ev)
	}
}

// deviceChanged handles one event of WatchDevices.
func (v *Volumes) deviceChanged(ev uevent.Event) {
	if ev.Subsystem != "block" || ev.Action != "change" {
		return
	}
	dev, ok := ev.Dev()
	if !ok {
		return
	}
	x, ok := v.devs.Load(dev)
	if !ok {
		return
	}
	e := x.(*Export)
	if ev.Seq != 0 && ev.Seq <= e.watchFrom {
		return // sent before the export's size was first read
	}
	e.mu.Lock()
	handled := e.shrinkSeen
	e.mu.Unlock()
	if handled {
		return // being replaced under another ID
	}
	seen := e.watchedSize.Load()
	size, err := e.refreshSize(v.log) // a shrink it is the first to see, it handles
	if err != nil {
		v.log.Warn("re-reading the size of an export whose device changed", zap.String("export", e.Name), zap.Error(err))
		return
	}
	e.watchedSize.Store(size)
	if ev.Vars["RESIZE"] == "1" && size == seen {
		e.shrank(v.log, size, size, "the kernel resized the device, and it had its old size again when the server looked: it may have shrunk and grown back")
	}
}

// watch has WatchDevices look after e, opened after the kernel's uevent
// number seq: e's device number leads to it.
func (v *Volumes) watch(e *Export, seq uint64) {
	d, ok := e.Backend.(interface{ Dev() (uint64, bool) })
	if !ok {
		return
	}
	dev, ok := d.Dev()
	if !ok {
		return
	}
	e.watchFrom = seq
	e.watchedSize.Store(e.Backend.Size())
	v.devs.Store(dev, e)
}

// unwatch undoes watch.
func (v *Volumes) unwatch(e *Export) {
	if d, ok := e.Backend.(interface{ Dev() (uint64, bool) }); ok {
		if dev, ok := d.Dev(); ok {
			v.devs.CompareAndDelete(dev, e)
		}
	}
}
