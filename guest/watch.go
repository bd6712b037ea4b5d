package guest

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"time"

	"github.com/dustin/go-humanize"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// WatchConfig says what a Watcher watches and what it may do.
type WatchConfig struct {
	// Arrays are /dev/md/NAME or /dev/mdN paths; empty watches every RAID1
	// array in /proc/mdstat, including ones assembled later.
	Arrays []string
	// GrowFS grows the mounted ext2/3/4 or xfs filesystem on an array after
	// the array grew.
	GrowFS bool
	// Interval is the time between two looks at the arrays; 0 means 2s.
	Interval time.Duration
	// Log receives what the watcher does and why; nil discards it.
	Log *zap.Logger
}

// Timing of the watcher's retries.
const (
	defaultInterval = 2 * time.Second
	maxBackoff      = 5 * time.Minute
	// growSlack is how much more room every leg must have before the
	// array or its filesystem is grown: less is rounding, not a resize.
	growSlack = 1 << 20
)

// Watcher keeps RAID1 arrays of NBD legs whole: it re-adds a leg that
// failed or went missing once the leg answers reads again — with
// --re-add, so md resyncs only the chunks its write-intent bitmap marked —
// and grows an array, and optionally its filesystem, once every leg grew.
//
// It acts only on what it can prove: a leg is re-added only if its md
// superblock names the same array, and added afresh (a full resync) only if
// re-adding is refused or the device is blank. A device holding anything
// else is left alone and logged.
type Watcher struct {
	cfg    WatchConfig
	h      *host
	log    *zap.Logger
	arrays map[string]*arrayMemory // by kernel name
}

// arrayMemory is what the watcher remembers of an array between looks.
type arrayMemory struct {
	uuid string
	// legs are the devices seen as members, so one that md removed (or an
	// admin did) is still known to belong here.
	legs map[string]*legMemory
	// grewAt is the smallest leg's usable size at the last grow attempt,
	// so a grow md refused is not repeated every interval.
	grewAt uint64
	// fsGrewAt is the array's size at the last filesystem grow attempt.
	fsGrewAt uint64
	// notes holds the last message logged per topic: conditions that last
	// (a leg still dead) are logged when they change, not every interval.
	notes map[string]string
}

type legMemory struct {
	failures int
	retryAt  time.Time
}

// NewWatcher returns a watcher of the arrays cfg names on this machine.
func NewWatcher(cfg *WatchConfig) *Watcher {
	return newWatcher(realHost(), cfg)
}

func newWatcher(h *host, cfg *WatchConfig) *Watcher {
	w := &Watcher{h: h, arrays: make(map[string]*arrayMemory)}
	if cfg != nil {
		w.cfg = *cfg
	}
	if w.cfg.Interval <= 0 {
		w.cfg.Interval = defaultInterval
	}
	w.log = w.cfg.Log
	if w.log == nil {
		w.log = zap.NewNop()
	}
	return w
}

// Run looks at the arrays every interval until ctx is done, and returns
// nil then.
func (w *Watcher) Run(ctx context.Context) error {
	w.log.Info("watching md arrays", zap.Strings("arrays", w.cfg.Arrays), zap.Duration("interval", w.cfg.Interval),
		zap.Bool("grow_fs", w.cfg.GrowFS))
	for {
		w.Step(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-w.h.clock.After(w.cfg.Interval):
		}
	}
}

// Step looks at every watched array once and acts on what it finds.
func (w *Watcher) Step(ctx context.Context) {
	for _, name := range w.targets() {
		if ctx.Err() != nil {
			return
		}
		a, err := readArray(w.h.sys, name)
		if err != nil {
			w.note(name, "array", zap.WarnLevel, "cannot read the array", zap.Error(err))
			continue
		}
		if a.Level != "raid1" {
			w.note(name, "array", zap.WarnLevel, "not a RAID1 array: not watching it", zap.String("level", a.Level))
			continue
		}
		if a.UUID == "" {
			// Kernels before md/uuid in sysfs: ask mdadm.
			a.UUID = w.detailUUID(ctx, a.Name)
		}
		mem := w.memory(a)
		w.noteFor(mem, name, "array", zap.InfoLevel, "watching", zap.String("uuid", a.UUID),
			zap.Int("raid_disks", a.RaidDisks), zap.Strings("members", memberNames(a)))
		for _, m := range a.Members {
			if _, ok := mem.legs[m.Device]; !ok {
				mem.legs[m.Device] = &legMemory{}
			}
		}
		w.heal(ctx, a, mem)
		w.grow(ctx, a, mem)
		if w.cfg.GrowFS {
			w.growFS(ctx, a, mem)
		}
	}
}

// targets lists the kernel names of the arrays to look at.
func (w *Watcher) targets() []string {
	if len(w.cfg.Arrays) == 0 {
		b, err := fs.ReadFile(w.h.sys, "proc/mdstat")
		if err != nil {
			w.note("", "mdstat", zap.ErrorLevel, "cannot read /proc/mdstat (is md loaded?)", zap.Error(err))
			return nil
		}
		st, err := ParseMdstat(b)
		if err != nil {
			w.note("", "mdstat", zap.ErrorLevel, "cannot parse /proc/mdstat", zap.Error(err))
			return nil
		}
		var names []string
		for _, a := range st.Arrays {
			if a.Active && a.Level == "raid1" {
				names = append(names, a.Name)
			}
		}
		return names
	}
	var names []string
	for _, p := range w.cfg.Arrays {
		name, err := w.h.kernelName(p)
		if err != nil {
			w.note(p, "array", zap.WarnLevel, "array not found (not assembled yet?)", zap.Error(err))
			continue
		}
		names = append(names, name)
	}
	return names
}

func (w *Watcher) memory(a Array) *arrayMemory {
	mem := w.arrays[a.Name]
	if mem == nil || mem.uuid != a.UUID {
		// A different array under a reused name starts from nothing.
		mem = &arrayMemory{uuid: a.UUID, legs: make(map[string]*legMemory), notes: make(map[string]string)}
		w.arrays[a.Name] = mem
	}
	return mem
}

// detailUUID asks mdadm for an array's UUID; "" if it cannot say.
func (w *Watcher) detailUUID(ctx context.Context, name string) string {
	cctx, cancel := contextWithTimeout(ctx)
	defer cancel()
	out, err := w.h.run.run(cctx, "mdadm", "--detail", "--export", devPath(name))
	if err != nil {
		return ""
	}
	d, err := ParseDetail(out)
	if err != nil {
		return ""
	}
	return normalizeUUID(d.UUID)
}

// heal re-adds one failed or missing leg that answers reads again.
func (w *Watcher) heal(ctx context.Context, a Array, mem *arrayMemory) {
	var faulty []string
	inSync := 0
	for _, m := range a.Members {
		if m.State.Has(StateFaulty) {
			faulty = append(faulty, m.Device)
		} else if m.InSync() {
			inSync++
		}
	}
	if a.Degraded == 0 && len(faulty) == 0 {
		w.noteFor(mem, a.Name, "health", zap.InfoLevel, "all legs in sync")
		for _, leg := range mem.legs {
			leg.failures, leg.retryAt = 0, time.Time{}
		}
		return
	}
	if inSync == 0 {
		w.noteFor(mem, a.Name, "health", zap.ErrorLevel, "no leg in sync: nothing to resync from; not touching it")
		return
	}
	if a.SyncAction != "idle" && a.SyncAction != "" {
		w.noteFor(mem, a.Name, "health", zap.InfoLevel, "degraded, "+a.SyncAction+" running", zap.Int("degraded", a.Degraded))
		return
	}
	w.noteFor(mem, a.Name, "health", zap.WarnLevel, "degraded", zap.Int("degraded", a.Degraded), zap.Strings("faulty", faulty))
	if a.Degraded == 0 {
		// A faulty extra member of a whole array (a failed spare): removing
		// it is all there is to do, once it can be told apart from a leg
		// that is coming back.
		return
	}
	// Faulty members first, then legs md no longer lists.
	candidates := slices.Clone(faulty)
	var gone []string
	for dev := range mem.legs {
		if !slices.ContainsFunc(a.Members, func(m Member) bool { return m.Device == dev }) {
			gone = append(gone, dev)
		}
	}
	slices.Sort(gone)
	candidates = append(candidates, gone...)
	now := w.h.clock.Now()
	for _, dev := range candidates {
		leg := mem.legs[dev]
		if leg == nil {
			leg = &legMemory{}
			mem.legs[dev] = leg
		}
		if now.Before(leg.retryAt) {
			continue
		}
		if w.readd(ctx, a, mem, dev, slices.Contains(faulty, dev)) {
			leg.failures, leg.retryAt = 0, time.Time{}
			return // one leg at a time: md recovers one at a time anyway
		}
	}
}

// readd brings one leg back into the array; it reports whether it did.
func (w *Watcher) readd(ctx context.Context, a Array, mem *arrayMemory, dev string, isMember bool) bool {
	md, path := devPath(a.Name), devPath(dev)
	topic := "leg " + dev
	if _, err := fs.Stat(w.h.sys, "sys/class/block/"+dev); err != nil {
		w.noteFor(mem, a.Name, topic, zap.WarnLevel, "leg device is gone", zap.String("device", path))
		return false
	}
	switch r := w.h.probe.probe(path); r {
	case probeReadable:
	default:
		w.noteFor(mem, a.Name, topic, zap.WarnLevel, "leg does not answer reads; waiting for it", zap.String("device", path),
			zap.Stringer("probe", r), zap.Bool("faulty_member", isMember))
		return false
	}
	cctx, cancel := contextWithTimeout(ctx)
	defer cancel()
	blank := false
	out, err := w.h.run.run(cctx, "mdadm", "--examine", "--export", path)
	if err != nil {
		// No md superblock on a device that answered reads just now:
		// blank, or something else entirely.
		sig, err := w.signature(path, dev)
		if err != nil {
			w.backoff(mem, a.Name, dev, topic, "cannot read the leg", err)
			return false
		}
		if sig != "" {
			w.backoff(mem, a.Name, dev, topic, "the leg has no md superblock but a "+sig+": not adding it", nil)
			return false
		}
		blank = true
	} else {
		e, err := ParseExamine(out)
		if err != nil {
			w.backoff(mem, a.Name, dev, topic, "cannot read the leg's md superblock", err)
			return false
		}
		if a.UUID == "" || normalizeUUID(e.UUID) != a.UUID {
			w.backoff(mem, a.Name, dev, topic, fmt.Sprintf("the leg belongs to another array (%q, UUID %s): not adding it", e.Name, e.UUID), nil)
			return false
		}
	}
	if isMember {
		// md keeps a failed member until it is removed; --re-add wants it
		// out first.
		if _, err := w.h.run.run(cctx, "mdadm", "--manage", md, "--remove", path); err != nil {
			w.backoff(mem, a.Name, dev, topic, "cannot remove the failed leg", err)
			return false
		}
		w.log.Info("removed the failed leg", zap.String("array", md), zap.String("device", path))
	}
	if !blank {
		_, err := w.h.run.run(cctx, "mdadm", "--manage", md, "--re-add", "--failfast", path)
		if err == nil {
			w.log.Info("re-added the leg: md resyncs the chunks its bitmap marked", zap.String("array", md), zap.String("device", path))
			mem.notes[topic] = ""
			return true
		}
		w.log.Warn("re-add refused; adding the leg as a new member: a full resync follows", zap.String("array", md),
			zap.String("device", path), zap.Error(err))
	} else {
		w.log.Warn("the leg is blank; adding it as a new member: a full resync follows", zap.String("array", md),
			zap.String("device", path))
	}
	_, err = w.h.run.run(cctx, "mdadm", "--manage", md, "--add", "--failfast", path)
	if err != nil && !blank {
		// mdadm will not turn a device that claims to be an active member
		// into a spare. It is this array's stale copy (its UUID said so),
		// and the array has an in-sync leg: its superblock can go.
		w.log.Warn("add refused; clearing the stale leg's md superblock and adding it again", zap.String("array", md),
			zap.String("device", path), zap.Error(err))
		if _, err = w.h.run.run(cctx, "mdadm", "--zero-superblock", path); err == nil {
			_, err = w.h.run.run(cctx, "mdadm", "--manage", md, "--add", "--failfast", path)
		}
	}
	if err != nil {
		w.backoff(mem, a.Name, dev, topic, "cannot add the leg", err)
		return false
	}
	w.log.Info("added the leg: full resync started", zap.String("array", md), zap.String("device", path))
	mem.notes[topic] = ""
	return true
}

// signature names what detectSignature sees on a device ("" for nothing).
func (w *Watcher) signature(path, dev string) (string, error) {
	size, err := blockDevSize(w.h.sys, dev)
	if err != nil {
		return "", err
	}
	if size == 0 {
		return "", errors.New("the device has no size")
	}
	head, tail, err := w.h.readEnds(path, size)
	if err != nil {
		return "", err
	}
	return detectSignature(head, tail, size), nil
}

// backoff logs why a leg could not be brought back and delays the next try,
// doubling the delay up to maxBackoff.
func (w *Watcher) backoff(mem *arrayMemory, array, dev, topic, msg string, err error) {
	leg := mem.legs[dev]
	leg.failures++
	delay := w.cfg.Interval << min(leg.failures, 16)
	delay = min(delay, maxBackoff)
	leg.retryAt = w.h.clock.Now().Add(delay)
	fields := []zap.Field{zap.String("device", devPath(dev)), zap.Duration("retry_in", delay)}
	if err != nil {
		fields = append(fields, zap.Error(err))
	}
	w.noteFor(mem, array, topic, zap.WarnLevel, msg, fields...)
}

// grow grows an array whose legs all grew.
func (w *Watcher) grow(ctx context.Context, a Array, mem *arrayMemory) {
	if a.Degraded != 0 || (a.SyncAction != "idle" && a.SyncAction != "") || len(a.Members) == 0 {
		return
	}
	if a.Metadata != "1.1" && a.Metadata != "1.2" {
		// Superblocks at the end of the legs (0.90, 1.0) would need moving.
		w.noteFor(mem, a.Name, "grow", zap.InfoLevel, "not growing an array with metadata "+a.Metadata)
		return
	}
	var usable uint64
	for i, m := range a.Members {
		if !m.InSync() {
			return
		}
		size, err := blockDevSize(w.h.sys, m.Device)
		if err != nil || size <= m.Offset {
			return
		}
		if u := size - m.Offset; i == 0 || u < usable {
			usable = u
		}
	}
	if usable < a.ComponentSize+growSlack || usable == mem.grewAt {
		return
	}
	mem.grewAt = usable
	md := devPath(a.Name)
	cctx, cancel := contextWithTimeout(ctx)
	defer cancel()
	if _, err := w.h.run.run(cctx, "mdadm", "--grow", md, "--size=max"); err != nil {
		w.log.Error("cannot grow the array", zap.String("array", md), zap.Error(err))
		return
	}
	w.log.Info("grew the array to use its grown legs", zap.String("array", md),
		zap.String("from", humanize.IBytes(a.ComponentSize)), zap.String("to", humanize.IBytes(usable)))
}

// growFS grows the filesystem mounted from an array that is larger than it.
//
// Only mounted filesystems are grown. ext4 grows online through the kernel
// (resize2fs on a mounted filesystem), and xfs only grows mounted; resize2fs
// on an unmounted ext4 insists on a fresh e2fsck -f first, and checking a
// filesystem the guest may be about to mount is not the watcher's call.
func (w *Watcher) growFS(ctx context.Context, a Array, mem *arrayMemory) {
	if a.Size == 0 || a.Size == mem.fsGrewAt {
		return
	}
	md := devPath(a.Name)
	mp, fstype, err := w.h.mountOf(a.DevNumber)
	if err != nil {
		w.noteFor(mem, a.Name, "fs", zap.WarnLevel, "cannot read the mounts", zap.Error(err))
		return
	}
	if mp == "" {
		return
	}
	cctx, cancel := contextWithTimeout(ctx)
	defer cancel()
	var args []string
	switch fstype {
	case "ext2", "ext3", "ext4":
		out, err := w.h.run.run(cctx, "dumpe2fs", "-h", md)
		if err != nil {
			w.noteFor(mem, a.Name, "fs", zap.WarnLevel, "cannot read the filesystem's size", zap.Error(err))
			return
		}
		sb, err := ParseDumpe2fs(out)
		if err != nil {
			w.noteFor(mem, a.Name, "fs", zap.WarnLevel, "cannot read the filesystem's size", zap.Error(err))
			return
		}
		if sb.Bytes()+growSlack > a.Size {
			mem.fsGrewAt = a.Size
			return
		}
		args = []string{"resize2fs", md}
	case "xfs":
		// xfs_growfs does nothing, quickly, when there is nothing to grow.
		args = []string{"xfs_growfs", mp}
	default:
		w.noteFor(mem, a.Name, "fs", zap.InfoLevel, "cannot grow a "+fstype+" filesystem", zap.String("mountpoint", mp))
		mem.fsGrewAt = a.Size
		return
	}
	mem.fsGrewAt = a.Size
	if _, err := w.h.run.run(cctx, args...); err != nil {
		w.log.Error("cannot grow the filesystem", zap.String("array", md), zap.String("mountpoint", mp), zap.Error(err))
		return
	}
	w.log.Info("grew the filesystem", zap.String("array", md), zap.String("mountpoint", mp), zap.String("fstype", fstype),
		zap.String("size", humanize.IBytes(a.Size)))
}

// note logs msg unless it is what was last logged for array and topic.
func (w *Watcher) note(array, topic string, lvl zapcore.Level, msg string, fields ...zap.Field) {
	mem := w.arrays[array]
	if mem == nil {
		mem = &arrayMemory{legs: make(map[string]*legMemory), notes: make(map[string]string)}
		w.arrays[array] = mem
	}
	w.noteFor(mem, array, topic, lvl, msg, fields...)
}

func (w *Watcher) noteFor(mem *arrayMemory, array, topic string, lvl zapcore.Level, msg string, fields ...zap.Field) {
	if mem.notes[topic] == msg {
		return
	}
	mem.notes[topic] = msg
	if array != "" {
		fields = append([]zap.Field{zap.String("array", devPath(array))}, fields...)
	}
	if ce := w.log.Check(lvl, msg); ce != nil {
		ce.Write(fields...)
	}
}

func memberNames(a Array) []string {
	var out []string
	for _, m := range a.Members {
		out = append(out, devPath(m.Device))
	}
	return out
}
