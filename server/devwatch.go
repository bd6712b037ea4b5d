package server

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

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
			// The events queued before the overflow still come, and
			// are judged against the sizes seen before it: not stored
			// here.
			v.log.Warn("kernel device events were lost (a burst overflowed the socket's buffer): re-reading every export's size; a volume shrunk and grown back behind the server in that moment goes unseen")
			v.watchMu.Lock()
			watched := slices.Collect(maps.Values(v.devs))
			v.watchMu.Unlock()
			for _, e := range watched {
				_, _ = e.refreshSize(v.log) // a shrink it sees, it handles
			}
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
	resized := ev.Vars["RESIZE"] == "1"
	v.watchMu.Lock()
	e, ok := v.devs[dev]
	if !ok && resized {
		// Perhaps an export being opened: watch looks.
		v.unwatchedResize[dev] = ev.Seq
	}
	v.watchMu.Unlock()
	if !ok {
		return
	}
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
		// An export being replaced (a recovery closed it) cannot judge
		// the resize: the export that replaces it does, now if it is
		// watched already, else once it is, as for a device none had.
		v.watchMu.Lock()
		next := v.devs[dev]
		if (next == e || next == nil) && resized {
			v.unwatchedResize[dev] = ev.Seq
		}
		v.watchMu.Unlock()
		if next != nil && next != e {
			v.deviceChanged(ev)
			return
		}
		v.log.Warn("re-reading the size of an export whose device changed", zap.String("export", e.Name), zap.Error(err))
		return
	}
	e.watchedSize.Store(size)
	// A resize during the open may be in the size it read, or not.
	if resized && size == seen && ev.Seq > e.watchAmbiguous {
		e.shrank(v.log, size, size, "the kernel resized the device, and it had its old size again when the server looked: it may have shrunk and grown back")
	}
}

// openSeqs are the kernel's last uevent numbers before and after an open
// of an export's device.
type openSeqs struct{ before, after uint64 }

// openWithSeqs runs open between two reads of the kernel's last uevent
// number. Unknown, every event is taken as after the open, and none is
// judged by size alone (see deviceChanged).
func openWithSeqs[T any](open func() (T, error)) (T, openSeqs, error) {
	before, err1 := uevent.LastSeq()
	x, err := open()
	after, err2 := uevent.LastSeq()
	if err1 != nil || err2 != nil {
		return x, openSeqs{0, math.MaxUint64}, err
	}
	return x, openSeqs{before, after}, err
}

// watch has WatchDevices look after e, whose device was opened as seqs
// say: e's device number leads to it. A resize the watch saw of that
// device before this, but after the open began, is judged now.
func (v *Volumes) watch(e *Export, seqs openSeqs) {
	dev, ok := v.deviceOf(e)
	if !ok {
		return
	}
	if seqs.after == math.MaxUint64 {
		v.log.Warn("cannot read the kernel's uevent number (/sys/kernel/uevent_seqnum): the device watch of this export "+
			"does not take a resize back to the size it last saw for a shrink grown back", zap.String("export", e.Name))
	}
	v.register(dev, e, seqs.before, seqs.after, e.Backend.Size())
}

// rewatch moves the watch of old's device to now, which replaces old as an
// export of the same volume (a recovery): from where old's watch was, so a
// resize old's watch has not judged, or could not, is judged by now's.
func (v *Volumes) rewatch(old, now *Export) {
	dev, ok := v.deviceOf(now)
	if !ok {
		return
	}
	v.watchMu.Lock()
	from, ambiguous, size := old.watchFrom, old.watchAmbiguous, old.watchedSize.Load()
	if v.devs[dev] == old {
		delete(v.devs, dev)
	}
	v.watchMu.Unlock()
	v.register(dev, now, from, ambiguous, size)
}

// register has the watch lead dev to e, which judges the resizes sent after
// event from (those up to ambiguous not by size alone) against size, and a
// resize seen of dev since it was last watched.
func (v *Volumes) register(dev uint64, e *Export, from, ambiguous uint64, size int64) {
	v.watchMu.Lock()
	e.watchFrom, e.watchAmbiguous = from, ambiguous
	e.watchedSize.Store(size)
	v.devs[dev] = e
	late, resized := v.unwatchedResize[dev]
	delete(v.unwatchedResize, dev)
	v.watchMu.Unlock()
	if resized && late > from {
		v.deviceChanged(uevent.Event{Action: "change", Subsystem: "block", Seq: late, Vars: map[string]string{
			"MAJOR": strconv.FormatUint(uint64(unix.Major(dev)), 10), "MINOR": strconv.FormatUint(uint64(unix.Minor(dev)), 10),
			"RESIZE": "1"}})
	}
}

// unwatch undoes watch.
func (v *Volumes) unwatch(e *Export) {
	if dev, ok := v.deviceOf(e); ok {
		v.watchMu.Lock()
		if v.devs[dev] == e {
			delete(v.devs, dev)
		}
		v.watchMu.Unlock()
	}
}

// devOf is the device number of e's block device.
func devOf(e *Export) (uint64, bool) {
	if d, ok := e.Backend.(interface{ Dev() (uint64, bool) }); ok {
		return d.Dev()
	}
	return 0, false
}
