package guest

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
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
// It acts only on what it can prove: it changes an array's members only
// while another leg in sync answers reads and the array is neither broken
// nor read-only; a leg is re-added only if its md superblock names the same
// array and does not say it ran without the other leg, and added afresh (a
// full resync) if its disk was attached anew, if re-adding is refused, or
// if the device is blank by every test. A leg that ran alone, and a device
// holding anything else, are left alone and logged. An array is grown only
// while md may resize it: read-write, idle, no resync pending; nothing is
// written through one that is not read-write.
type Watcher struct {
	cfg WatchConfig
	h   *host
	log *zap.Logger
	// mu guards the arrays map, not the memories in it: an array's memory
	// belongs to the look at that array (see Step).
	mu     sync.Mutex
	arrays map[string]*arrayMemory // by kernel name
	// busy are the arrays whose look went on past lookWait (a command
	// stuck on a leg that died under it), by kernel name; only Step
	// touches it.
	busy map[string]*arrayLook
	// probePending: a probe of the last look left its answer pending.
	probePending atomic.Bool
}

// lookWait is how long a look waits for its work on one array before it
// goes on to the next array. mdadm --examine of a leg that dies right after
// its probe, or a read of its ends, waits in the kernel for as long as the
// dom0 keeps the dead disk's requests (its dead timeout, for ever with
// reconnects), and no signal interrupts it: one such leg must not leave
// every other array unwatched meanwhile. A look at a healthy array takes
// milliseconds; a slow one takes a few probe waits (5 s each).
const lookWait = 30 * time.Second

// arrayLook is the work of one look at one array, run on its own goroutine.
type arrayLook struct {
	done  chan struct{}
	start time.Time
	// warnedAt is when Step last said at warning level that the look is
	// at work still; only Step touches it.
	warnedAt time.Time
	mu       sync.Mutex
	doing    string // the command or read under way, for the log
}

func (l *arrayLook) setDoing(what string) {
	l.mu.Lock()
	l.doing = what
	l.mu.Unlock()
}

func (l *arrayLook) current() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.doing
}

// finished reports whether the look's work ended.
func (l *arrayLook) finished() bool {
	select {
	case <-l.done:
		return true
	default:
		return false
	}
}

type lookKey struct{}

// doing records on ctx's look what it does now, which the log names if the
// look takes long.
func doing(ctx context.Context, what string) {
	if l, ok := ctx.Value(lookKey{}).(*arrayLook); ok {
		l.setDoing(what)
	}
}

// lookRunner records each command on the look that runs it.
type lookRunner struct{ runner }

func (r lookRunner) run(ctx context.Context, args ...string) ([]byte, error) {
	doing(ctx, strings.Join(args, " "))
	return r.runner.run(ctx, args...)
}

// arrayMemory is what the watcher remembers of an array between looks.
type arrayMemory struct {
	uuid string
	// legs are the devices seen as members, so one that md removed (or an
	// admin did) is still known to belong here.
	legs map[string]*legMemory
	// grewAt is the smallest leg's usable size when mdadm last grew the
	// array, so a grow md took without growing is not repeated every
	// interval. A grow mdadm refused is not remembered here: growRetry
	// puts it off, and it is tried again.
	grewAt    uint64
	growRetry retry
	// fsGrewAt is the array's size when its filesystem last grew, or was
	// found to need or allow no grow; fsRetry puts off a failed one.
	fsGrewAt uint64
	fsRetry  retry
	// notes holds the last message logged per topic: conditions that last
	// (a leg still dead) are logged when they change, not every interval.
	notes map[string]string
	// inSync are the members in sync at the last look that had any.
	inSync []string
}

// inSyncMembers names the members of a that hold a current copy.
func inSyncMembers(a Array) []string {
	var out []string
	for _, m := range a.Members {
		if m.InSync() {
			out = append(out, m.Device)
		}
	}
	return out
}

type legMemory struct {
	retry
	// diskseq is the device's disk sequence number at the last look that
	// found it a member of the array (Linux 5.15 on; "" before): a disk
	// detached and attached again under the same name has another.
	diskseq string
}

// retry is how many times in a row an action failed, and when it may be
// tried again.
type retry struct {
	failures int
	retryAt  time.Time
}

// due reports whether the action may be tried at now.
func (r *retry) due(now time.Time) bool { return !now.Before(r.retryAt) }

// fail counts a failure at now and puts the next try off by twice interval,
// doubling with each failure in a row up to maxBackoff; it returns the
// delay.
func (r *retry) fail(now time.Time, interval time.Duration) time.Duration {
	r.failures++
	delay := min(interval<<min(r.failures, 16), maxBackoff)
	r.retryAt = now.Add(delay)
	return delay
}

// reset forgets the failures once the action succeeded or is not wanted.
func (r *retry) reset() { *r = retry{} }

// NewWatcher returns a watcher of the arrays cfg names on this machine.
func NewWatcher(cfg *WatchConfig) *Watcher {
	return newWatcher(realHost(), cfg)
}

func newWatcher(h *host, cfg *WatchConfig) *Watcher {
	if _, ok := h.run.(lookRunner); !ok {
		h.run = lookRunner{h.run}
	}
	w := &Watcher{h: h, arrays: make(map[string]*arrayMemory), busy: make(map[string]*arrayLook)}
	if cfg != nil {
		w.cfg = *cfg
	}
	if w.cfg.Interval <= 0 {
		w.cfg.Interval = defaultInterval
	}
	if p, ok := h.probe.(*readProber); ok {
		// A read slower than the probe waits is collected at the next
		// look, at most soonLook later (see Run): not stale.
		p.maxAge = p.timeout + w.soonLook()
	}
	w.log = w.cfg.Log
	if w.log == nil {
		w.log = zap.NewNop()
	}
	return w
}

// Run looks at the arrays every interval until ctx is done, and returns
// nil then. It returns an error at once if mdadm is missing or too old to
// bring a leg back (see minMdadm).
func (w *Watcher) Run(ctx context.Context) error {
	warning, err := w.h.checkMdadm(ctx)
	if err != nil {
		return err
	}
	if warning != "" {
		w.log.Warn(warning)
	}
	w.log.Info("watching md arrays", zap.Strings("arrays", w.cfg.Arrays), zap.Duration("interval", w.cfg.Interval),
		zap.Bool("grow_fs", w.cfg.GrowFS))
	for {
		w.Step(ctx)
		// At debug level, one line per look: what a test or an admin
		// waits for to know the watcher has seen a change.
		w.log.Debug("looked at the arrays")
		next := w.cfg.Interval
		// Taken and cleared here, not at the start of a look: a look
		// still at work from before may leave a probe pending any time.
		if w.probePending.Swap(false) {
			// Collect the slow read's answer while it is fresh.
			next = w.soonLook()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-w.h.clock.After(next):
		}
	}
}

// probe asks whether dev answers reads, noting an answer still pending.
func (w *Watcher) probe(dev string) probeResult {
	r := w.h.probe.probe(dev)
	if r == probePending {
		w.probePending.Store(true)
	}
	return r
}

// soonLook is how soon the watcher looks again after a probe was left
// pending: the interval, or twice a probe's wait if that is shorter, so a
// slow answer is taken before it is too old to trust.
func (w *Watcher) soonLook() time.Duration {
	if p, ok := w.h.probe.(*readProber); ok {
		return min(w.cfg.Interval, 2*p.timeout)
	}
	return w.cfg.Interval
}

// Step looks at every watched array once and acts on what it finds.
//
// Each array's look runs on its own goroutine, and Step waits up to
// lookWait for it: arrays are looked at one after another, as before, and
// one whose look is stuck (see lookWait) is left to finish on its own while
// Step goes on to the next. Until it finishes that array is not looked at
// again; its memory is its look's alone meanwhile.
func (w *Watcher) Step(ctx context.Context) {
	w.collectBusy()
	names, complete := w.targets()
	if complete {
		w.forgetStopped(names)
	}
	for _, name := range names {
		if ctx.Err() != nil {
			return
		}
		if l := w.busy[name]; l != nil {
			// Said again every maxBackoff at warning level: nothing
			// else is done for the array meanwhile.
			lvl, now := zap.DebugLevel, w.h.clock.Now()
			if now.Sub(l.warnedAt) >= maxBackoff {
				lvl, l.warnedAt = zap.WarnLevel, now
			}
			w.log.Log(lvl, "the array's last look is still at work: not looking at it again yet",
				zap.String("array", devPath(name)), zap.String("doing", l.current()),
				zap.Duration("for", now.Sub(l.start)))
			continue
		}
		l := &arrayLook{done: make(chan struct{}), start: w.h.clock.Now()}
		lctx := context.WithValue(ctx, lookKey{}, l)
		go func() {
			defer close(l.done)
			w.lookAt(lctx, name)
		}()
		var timeout <-chan time.Time
		if w.h.lookWait != nil {
			timeout = w.h.lookWait()
		}
		select {
		case <-l.done:
		case <-ctx.Done():
			// Stopping: the look's commands have ctx too (one that
			// has not started does not start), and stillSafe lets no
			// member change through. A command or read stuck in the
			// kernel stays there until the device answers or fails.
			w.busy[name] = l
			return
		case <-timeout:
			if l.finished() {
				break
			}
			w.busy[name] = l
			l.warnedAt = w.h.clock.Now()
			w.log.Warn("the array's look is taking long: looking at the other arrays meanwhile (a command or read "+
				"stuck on a leg that died under it waits as long as the dom0 keeps the dead disk's requests)",
				zap.String("array", devPath(name)), zap.String("doing", l.current()),
				zap.Duration("for", w.h.clock.Now().Sub(l.start)))
		}
	}
}

// collectBusy takes back the arrays whose long look has finished.
func (w *Watcher) collectBusy() {
	for name, l := range w.busy {
		if !l.finished() {
			continue
		}
		delete(w.busy, name)
		w.log.Info("the array's long look finished", zap.String("array", devPath(name)),
			zap.Duration("took", w.h.clock.Now().Sub(l.start)))
	}
}

// forgetStopped forgets the arrays gone from the kernel, given the complete
// list of names there.
//
// An array gone from the kernel (stopped) is forgotten: once assembled
// again, perhaps from the other leg by an admin, it starts from nothing, as
// after a reboot, and a leg it does not have is not added back on the
// strength of the old memory. (Memories without legs only keep notes, of
// arrays not found.) md's own entry must be gone too: a /dev/md/NAME link
// that udev is rebuilding is no stopped array. That holds for an array
// whose look is still at work too: the look keeps what it holds, and the
// next look, once that one ended, starts from nothing.
func (w *Watcher) forgetStopped(names []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for name, mem := range w.arrays {
		if slices.Contains(names, name) {
			continue
		}
		// A busy look's memory is its own to read: gone is gone.
		if w.busy[name] == nil && len(mem.legs) == 0 {
			continue
		}
		if _, err := fs.Stat(w.h.sys, "sys/block/"+name+"/md/array_state"); err == nil {
			continue
		}
		delete(w.arrays, name)
		w.log.Info("array gone: forgetting its legs", zap.String("array", devPath(name)))
	}
}

// lookAt looks at one array and acts on what it finds.
func (w *Watcher) lookAt(ctx context.Context, name string) {
	a, err := readArray(w.h.sys, name)
	if err != nil {
		w.note(name, "array", zap.WarnLevel, "cannot read the array", zap.Error(err))
		return
	}
	if a.Level != "raid1" {
		w.note(name, "array", zap.WarnLevel, "not a RAID1 array: not watching it", zap.String("level", a.Level))
		return
	}
	if a.UUID == "" {
		// Kernels before md/uuid in sysfs: ask mdadm.
		a.UUID = w.detailUUID(ctx, a.Name)
	}
	mem := w.memory(a)
	inSync := inSyncMembers(a)
	if len(mem.inSync) > 0 && len(inSync) > 0 &&
		!slices.ContainsFunc(inSync, func(d string) bool { return slices.Contains(mem.inSync, d) }) {
		// None of the legs in sync at the last look is now, and others
		// are: stopped and assembled again from the other leg between
		// two looks. Its legs are not the ones known.
		w.log.Warn("the array's legs in sync are all others than at the last look: assembled again from "+
			"another leg? Forgetting its legs; add the one it lacks by hand once you know which holds the newest data",
			zap.String("array", devPath(name)), zap.Strings("were", mem.inSync), zap.Strings("now", inSync))
		w.forget(a.Name)
		mem = w.memory(a)
	}
	if len(inSync) > 0 {
		// Kept through a look with none (both legs failed), so an
		// array brought back from the other leg is still told.
		mem.inSync = inSync
	}
	w.noteFor(mem, name, "array", zap.InfoLevel, "watching", zap.String("uuid", a.UUID),
		zap.Int("raid_disks", a.RaidDisks), zap.Strings("members", memberNames(a)))
	for _, m := range a.Members {
		leg := mem.legs[m.Device]
		if leg == nil {
			leg = &legMemory{}
			mem.legs[m.Device] = leg
		}
		// md holds the disk of every member it lists, failed ones
		// too: no other disk can take its name meanwhile.
		leg.diskseq = w.h.diskseq(m.Device)
	}
	w.heal(ctx, a, mem)
	w.grow(ctx, a, mem)
	if w.cfg.GrowFS {
		w.growFS(ctx, a, mem)
	}
}

// targets lists the kernel names of the arrays to look at; complete is
// false when the list could not be read, so arrays missing from it may
// still be there.
func (w *Watcher) targets() (names []string, complete bool) {
	if len(w.cfg.Arrays) == 0 {
		b, err := fs.ReadFile(w.h.sys, "proc/mdstat")
		if err != nil {
			w.note("", "mdstat", zap.ErrorLevel, "cannot read /proc/mdstat (is md loaded?)", zap.Error(err))
			return nil, false
		}
		st, err := ParseMdstat(b)
		if err != nil {
			w.note("", "mdstat", zap.ErrorLevel, "cannot parse /proc/mdstat", zap.Error(err))
			return nil, false
		}
		for _, a := range st.Arrays {
			if a.Active && a.Level == "raid1" {
				names = append(names, a.Name)
			}
		}
		return names, true
	}
	complete = true
	for _, p := range w.cfg.Arrays {
		name, err := w.h.kernelName(p)
		if err != nil {
			w.note(p, "array", zap.WarnLevel, "array not found (not assembled yet?)", zap.Error(err))
			if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, ErrNotBlockDevice) {
				complete = false // not known to be gone
			}
			continue
		}
		names = append(names, name)
	}
	return names, complete
}

// forget drops what the watcher remembers of the array named name.
func (w *Watcher) forget(name string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.arrays, name)
}

func (w *Watcher) memory(a Array) *arrayMemory {
	w.mu.Lock()
	defer w.mu.Unlock()
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
		switch {
		case m.Failed():
			faulty = append(faulty, m.Device)
		case m.InSync():
			inSync++
			if !m.badBlocksPending() {
				delete(mem.notes, "bad blocks "+m.Device)
			} else {
				// Not failed: md records them in the superblock
				// at its next update, and keeps the leg.
				w.noteFor(mem, a.Name, "bad blocks "+m.Device, zap.WarnLevel, "a leg in sync has bad blocks md "+
					"has not recorded yet (md/dev-"+m.Device+"/unacknowledged_bad_blocks); it keeps using the leg",
					zap.String("device", devPath(m.Device)))
			}
		}
	}
	if a.Degraded == 0 && len(faulty) == 0 {
		w.noteFor(mem, a.Name, "health", zap.InfoLevel, "all legs in sync")
		for dev, leg := range mem.legs {
			if !slices.ContainsFunc(a.Members, func(m Member) bool { return m.Device == dev }) {
				// Whole without it: replaced (mdadm --replace, or a
				// new leg added in its place). A disk that takes its
				// name later is no leg of this array.
				delete(mem.legs, dev)
				continue
			}
			leg.reset()
		}
		return
	}
	if why := unchangeable(a.State); why != "" {
		level := zap.ErrorLevel
		if a.State == "clear" || a.State == "inactive" {
			level = zap.InfoLevel // not running: nothing is at risk
		}
		w.noteFor(mem, a.Name, "health", level, "the array is "+a.State+": "+why+"; not touching it",
			zap.Int("degraded", a.Degraded), zap.Strings("faulty", faulty))
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
		if !leg.due(now) {
			continue
		}
		if w.readd(ctx, a, mem, dev, slices.Contains(faulty, dev)) {
			leg.reset()
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
	switch r := w.probe(path); r {
	case probeReadable:
	default:
		w.noteFor(mem, a.Name, topic, zap.WarnLevel, "leg does not answer reads; waiting for it", zap.String("device", path),
			zap.Stringer("probe", r), zap.Bool("faulty_member", isMember))
		return false
	}
	if !w.sourceAnswers(mem, a) {
		return false
	}
	cctx, cancel := contextWithTimeout(ctx)
	defer cancel()
	blank, fullResync := false, ""
	out, examineErr := w.h.run.run(cctx, "mdadm", "--examine", "--export", path)
	if examineErr != nil {
		// No md superblock on a device that answered reads just now:
		// blank, or something else entirely.
		found, err := w.contents(cctx, path, dev)
		if err != nil {
			w.backoff(mem, a.Name, dev, topic, "cannot tell whether the leg is blank: not adding it", err)
			return false
		}
		if strings.HasPrefix(found, "a md superblock") {
			// One mdadm cannot read: damaged (a bad checksum), or
			// mdadm itself failed. Whose it is cannot be told.
			w.backoff(mem, a.Name, dev, topic, "mdadm cannot read the leg's "+strings.TrimPrefix(found, "a ")+
				": not adding it; see mdadm --examine "+path+", and if it is meant to be this leg, zero it (blkdiscard -z "+
				path+", or at least its first and last MiB) and the watcher adds it", examineErr)
			return false
		}
		if found != "" {
			w.backoff(mem, a.Name, dev, topic, "the leg has no md superblock but "+found+": not adding it; "+
				"if it is meant to be this leg, zero it (blkdiscard -z "+path+", or at least its first and last MiB) "+
				"and the watcher adds it", nil)
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
		var alone bool
		fullResync, alone = w.wroteApart(cctx, path)
		if alone {
			// md does not write the superblock of a leg it failed, so a
			// leg that failed and came back still names the other leg
			// active. One that names it missing was the array's only
			// leg for a while: this array was assembled again from the
			// other leg since (the returning one may then hold the newest
			// writes), or the leg ran in another guest. Either way a
			// resync from this array would overwrite writes found
			// nowhere else, and only the admin can tell which to keep.
			w.backoff(mem, a.Name, dev, topic, fmt.Sprintf("%s, Events %d", fullResync, e.Events)+": it may hold writes this array "+
				"lacks, the newest ones even, which a resync from the array would overwrite: not adding it. Compare "+
				"mdadm --examine of both legs (README, \"When both storage boxes crashed\"); to give up the leg's "+
				"writes: mdadm --zero-superblock "+path+", then mdadm "+md+" --add --failfast "+path, nil)
			return false
		}
		if fullResync == "" {
			fullResync = w.attachedAnew(dev, mem.legs[dev])
		}
	}
	// The superblock reads took seconds: the source leg must still answer
	// before md starts a recovery from it, which would otherwise leave
	// the returning leg half rewritten, no longer the clean older copy.
	listed := unlisted
	if isMember {
		listed = listedFailed
	}
	if !w.stillSafe(ctx, mem, a, dev, listed, topic, "not changing the array's members") {
		return false
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
	add := []string{"mdadm", "--manage", md, "--add", "--failfast", path}
	switch {
	case blank:
		w.log.Warn("the leg is blank; adding it as a new member: a full resync follows", zap.String("array", md),
			zap.String("device", path))
	case fullResync != "":
		w.log.Warn(fullResync+": adding it as a spare, not re-adding it: a full resync follows", zap.String("array", md),
			zap.String("device", path))
		add[3] = "--add-spare"
	default:
		_, err := w.h.run.run(cctx, "mdadm", "--manage", md, "--re-add", "--failfast", path)
		if err == nil {
			w.log.Info("re-added the leg: md resyncs the chunks its bitmap marked", zap.String("array", md), zap.String("device", path))
			mem.notes[topic] = ""
			return true
		}
		w.log.Warn("re-add refused; adding the leg as a spare: a full resync follows", zap.String("array", md),
			zap.String("device", path), zap.Error(err))
		add[3] = "--add-spare"
		// The refused re-add read the members' superblocks, over the
		// network: the source must still answer.
		if !w.stillSafe(ctx, mem, a, dev, eitherWay, topic, "not adding the leg") {
			return false
		}
	}
	// A leg with this array's superblock goes in with --add-spare: --add
	// tries a re-add first (Manage.c, Manage_add: attempt_re_add unless the
	// disposition is 'S'), which would trust the bitmap, or, after a
	// refused one, might succeed after all and make "a full resync
	// follows" untrue. --add-spare (mdadm 3.3 on) takes the device as a
	// spare whatever its superblock says, so the watcher never has to
	// clear one (mdadm 3.1.5 to 3.2.3 refused that with --add).
	_, err := w.h.run.run(cctx, add...)
	if err != nil {
		w.backoff(mem, a.Name, dev, topic, "cannot add the leg", err)
		return false
	}
	w.log.Info("added the leg: full resync started", zap.String("array", md), zap.String("device", path))
	mem.notes[topic] = ""
	return true
}

// wroteApart says why a leg of this array (its UUID said so) must not be
// re-added, or "" if it may be. The running array's bitmap records what
// the array wrote while the leg was away, not what was written to the leg
// if it ran without the other leg (assembled alone before this boot, or
// elsewhere): --re-add would then resync too little, silently. alone says
// the leg did (SuperView.RanAlone), and must not be resynced over either.
// Anything else unclear answers "resync it all": slower, never wrong.
func (w *Watcher) wroteApart(ctx context.Context, path string) (why string, alone bool) {
	out, err := w.h.run.run(ctx, "mdadm", "--examine", path)
	if err != nil {
		return "cannot read the leg's own view of the array (" + err.Error() + ")", false
	}
	v, err := ParseSuperView(out)
	switch {
	case err != nil:
		return "cannot read the leg's own view of the array (" + err.Error() + ")", false
	case strings.Contains(v.ArrayState, "?"):
		return "the leg's superblock is inconsistent (Array State " + v.ArrayState + ")", false
	case v.Role < 0:
		return "the leg's superblock says it is no active member", false
	case v.Role >= len(v.ArrayState):
		return fmt.Sprintf("the leg's superblock names slot %d, which its Array State %s does not have", v.Role, v.ArrayState), false
	case v.RanAlone():
		return "the leg's superblock says it ran without the other leg (Array State " + v.ArrayState + ")", true
	}
	return "", false
}

// attachedAnew says why a returning leg's device is not the disk md had,
// or "" if it is, or cannot be told (a kernel before 5.15, or a leg never
// seen as a member). A disk the dom0 detached and attached again (lvnbd
// pair down and up --leg: a half made anew, or a storage box's half after
// it went down) has a new disk sequence number. Its superblock still names
// this array, but it may be another copy of the volume, without writes md
// believes it holds: md's bitmap does not cover it, only a full resync
// does. A disk whose connections only died and came back keeps its number.
func (w *Watcher) attachedAnew(dev string, leg *legMemory) string {
	if leg == nil || leg.diskseq == "" {
		return ""
	}
	switch now := w.h.diskseq(dev); now {
	case leg.diskseq:
		return ""
	case "":
		return "cannot read the leg's disk sequence number (it was " + leg.diskseq + "): it may be another disk"
	default:
		return "the leg's disk was attached anew (disk sequence number " + now + ", was " + leg.diskseq +
			"): it may be another copy of the volume, which md's bitmap does not cover"
	}
}

// contents names what a device without an md superblock holds, or "" if
// it is blank by every test there is: no signature detectSignature knows,
// none blkid (where installed) knows, and its first and last MiB zero. A
// --add resyncs over the whole device, so anything that is not plainly
// empty is somebody's data; an error means it could not be told.
func (w *Watcher) contents(ctx context.Context, path, dev string) (string, error) {
	size, err := blockDevSize(w.h.sys, dev)
	if err != nil {
		return "", err
	}
	if size == 0 {
		return "", errors.New("the device has no size")
	}
	doing(ctx, "reading the first and last bytes of "+path)
	head, tail, err := w.h.readEnds(path, size)
	if err != nil {
		return "", err
	}
	if sig := detectSignature(head, tail, size); sig != "" {
		return "a " + sig, nil
	}
	if w.h.have("blkid") {
		// blkid knows many more formats (f2fs, ZFS, bcache, iso9660...).
		// It exits 8 when it finds several and cannot choose: an error
		// here, and not blank.
		typ, err := w.h.blkid(ctx, path)
		if err != nil {
			return "", err
		}
		if typ != "" {
			return "a " + typ + " signature (blkid)", nil
		}
	}
	doing(ctx, "reading the first and last MiB of "+path)
	zero, err := w.h.zeroEnds(path, size)
	if err != nil {
		return "", err
	}
	if !zero {
		return "data in its first or last MiB (no signature we know)", nil
	}
	return "", nil
}

// unchangeable says why the watcher must not change the members of an
// array in state (md/array_state), or "" if it may.
func unchangeable(state string) string {
	switch state {
	case "broken":
		return "md lost a member it cannot run without"
	case "readonly", "read-auto":
		// md starts no recovery on a read-only array; read-auto turns
		// read-write on its first write.
		return "read-only, so md would not recover it"
	case "clear", "inactive":
		// Also for a moment while an array starts.
		return "not running (being assembled, or stopped)"
	}
	return ""
}

// sourceAnswers reports whether one of a's in-sync legs answers a direct
// read now, and logs why the watcher waits when none does. md never fails
// the last leg of a RAID1: with both storage boxes dead, the leg that died
// second still shows in_sync, and a returning leg removed, re-added or
// zeroed then leaves the array with no copy to resync from. A probe that
// does not answer in time counts as no.
func (w *Watcher) sourceAnswers(mem *arrayMemory, a Array) bool {
	var tried []string
	for _, m := range a.Members {
		if !m.InSync() {
			continue
		}
		r := w.probe(devPath(m.Device))
		if r == probeReadable {
			mem.notes["source"] = ""
			return true
		}
		tried = append(tried, devPath(m.Device)+" "+r.String())
	}
	w.noteFor(mem, a.Name, "source", zap.ErrorLevel,
		"no in-sync leg answers reads (both storage boxes down?): nothing to resync from; "+
			"waiting for one before touching the returning leg", zap.Strings("in_sync", tried))
	return false
}

// stillSafe reads array a again and reports whether its members may still
// be changed for leg dev. The reads before it may have taken minutes (a leg
// that died under mdadm --examine and came back): what a was then is no
// longer evidence. So it must still be the array a was (the watcher has not
// forgotten it as stopped; its UUID), degraded, with one of the legs in
// sync then in sync still, and dev where it was (listed); the array must be one md recovers, and an in-sync leg must
// answer reads. Otherwise it backs off, saying what, on topic. It also says
// no once ctx is done: a watcher being stopped changes nothing more.
func (w *Watcher) stillSafe(ctx context.Context, mem *arrayMemory, a Array, dev string, listed legListing, topic, what string) bool {
	if ctx.Err() != nil {
		return false
	}
	w.mu.Lock()
	forgotten := w.arrays[a.Name] != mem
	w.mu.Unlock()
	if forgotten {
		w.backoff(mem, a.Name, dev, topic, "the array was stopped meanwhile: "+what, nil)
		return false
	}
	cur, err := readArray(w.h.sys, a.Name)
	if err != nil {
		w.backoff(mem, a.Name, dev, topic, "cannot read the array again: "+what, err)
		return false
	}
	if a.UUID != "" {
		uuid := cur.UUID
		if uuid == "" {
			uuid = w.detailUUID(ctx, a.Name) // no md/uuid in sysfs
		}
		if uuid != a.UUID {
			// Stopped, and another array assembled under the name: the
			// leg's superblock was checked against the one before.
			w.backoff(mem, a.Name, dev, topic, "the array was stopped and another assembled under its name meanwhile "+
				"(UUID "+cmp.Or(uuid, "unknown")+", was "+a.UUID+"): "+what, nil)
			return false
		}
	}
	var member *Member
	for i, m := range cur.Members {
		if m.Device == dev {
			member = &cur.Members[i]
		}
	}
	switch {
	case member != nil && !member.Failed():
		w.backoff(mem, a.Name, dev, topic, "the leg is a working member of the array again (added meanwhile, by hand?): "+what, nil)
		return false
	case listed != eitherWay && (member != nil) != (listed == listedFailed):
		w.backoff(mem, a.Name, dev, topic, "the leg was added to or removed from the array meanwhile: "+what, nil)
		return false
	case cur.Degraded == 0:
		w.backoff(mem, a.Name, dev, topic, "the array is whole again (a leg was added meanwhile): "+what, nil)
		return false
	case !slices.ContainsFunc(inSyncMembers(cur), func(d string) bool { return slices.Contains(inSyncMembers(a), d) }):
		w.backoff(mem, a.Name, dev, topic, "the array's legs in sync are others than when the leg was looked at: "+what, nil)
		return false
	case unchangeable(cur.State) != "":
		w.backoff(mem, a.Name, dev, topic, "the array is "+cur.State+": "+what, nil)
		return false
	case !w.sourceAnswers(mem, cur):
		w.backoff(mem, a.Name, dev, topic, "no in-sync leg answers reads: "+what, nil)
		return false
	}
	return true
}

// legListing is where stillSafe expects a returning leg in its array.
type legListing int

const (
	unlisted     legListing = iota // md does not list it
	listedFailed                   // md lists it as failed
	eitherWay                      // the watcher removed it itself just now
)

// backoff logs why a leg could not be brought back and delays the next try,
// doubling the delay up to maxBackoff.
func (w *Watcher) backoff(mem *arrayMemory, array, dev, topic, msg string, err error) {
	delay := mem.legs[dev].fail(w.h.clock.Now(), w.cfg.Interval)
	fields := []zap.Field{zap.String("device", devPath(dev)), zap.Duration("retry_in", delay)}
	key := msg
	if err != nil {
		fields = append(fields, zap.Error(err))
		key += ": " + err.Error() // a new reason is logged too
	}
	w.noteKeyed(mem, array, topic, key, zap.WarnLevel, msg, fields...)
}

// grow grows an array whose legs all grew, once md may resize it: an
// array that is writable, idle and without a pending resync. A grow mdadm
// refused is tried again after a delay that doubles, as what stopped it (a
// check started meanwhile, the array turned read-only) may pass.
func (w *Watcher) grow(ctx context.Context, a Array, mem *arrayMemory) {
	if a.Degraded != 0 || len(a.Members) == 0 {
		return // heal's business first
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
	if usable < a.ComponentSize+growSlack {
		// Nothing to grow, or no longer: grown, by us or by hand.
		mem.growRetry.reset()
		mem.notes["grow"] = ""
		return
	}
	if usable == mem.grewAt {
		return
	}
	md := devPath(a.Name)
	sizes := []zap.Field{zap.String("from", humanize.IBytes(a.ComponentSize)), zap.String("to", humanize.IBytes(usable))}
	if why := growWait(a); why != "" {
		w.noteFor(mem, a.Name, "grow", zap.InfoLevel, "both legs grew, but "+why, sizes...)
		return
	}
	now := w.h.clock.Now()
	if !mem.growRetry.due(now) {
		return
	}
	cctx, cancel := contextWithTimeout(ctx)
	defer cancel()
	if _, err := w.h.run.run(cctx, "mdadm", "--grow", md, "--size=max"); err != nil {
		delay := mem.growRetry.fail(now, w.cfg.Interval)
		w.noteFor(mem, a.Name, "grow", zap.WarnLevel, "cannot grow the array",
			append(sizes, zap.Duration("retry_in", delay), zap.Error(err))...)
		return
	}
	mem.grewAt = usable
	mem.growRetry.reset()
	mem.notes["grow"] = ""
	w.log.Info("grew the array to use its grown legs", append([]zap.Field{zap.String("array", md)}, sizes...)...)
}

// growWait says why md must not be asked to grow a now, or "" if it may.
func growWait(a Array) string {
	switch {
	case unchangeable(a.State) != "":
		// md refuses to resize an array that is not read-write
		// (update_size: EROFS); read-auto turns read-write on its first
		// write.
		return "the array is " + a.State + ": not growing it until it is read-write"
	case a.SyncAction != "idle" && a.SyncAction != "":
		return "md's sync_action is " + a.SyncAction + ": not growing the array until it is idle"
	case a.ResyncStart != "" && a.ResyncStart != "none":
		// The legs may differ below resync_start; md runs that resync
		// once the array is written to, or its sync_action thawed.
		return "a resync is pending (md/resync_start " + a.ResyncStart + "): not growing the array until it ran"
	}
	return ""
}

// growFS grows the filesystem mounted from an array that is larger than it.
//
// Only mounted filesystems are grown. ext4 grows online through the kernel
// (resize2fs on a mounted filesystem), and xfs only grows mounted; resize2fs
// on an unmounted ext4 insists on a fresh e2fsck -f first, and checking a
// filesystem the guest may be about to mount is not the watcher's call.
// Nothing is written through an array that is not read-write. A grow that
// failed (the filesystem mounted read-only, say) is tried again after a
// delay that doubles.
func (w *Watcher) growFS(ctx context.Context, a Array, mem *arrayMemory) {
	if a.Size == 0 || a.Size == mem.fsGrewAt {
		return
	}
	now := w.h.clock.Now()
	if !mem.fsRetry.due(now) {
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
		var sb Ext4Super
		if err == nil {
			sb, err = ParseDumpe2fs(out)
		}
		if err != nil {
			delay := mem.fsRetry.fail(now, w.cfg.Interval)
			w.noteFor(mem, a.Name, "fs", zap.WarnLevel, "cannot read the filesystem's size", zap.String("mountpoint", mp),
				zap.Duration("retry_in", delay), zap.Error(err))
			return
		}
		if sb.Bytes()+growSlack > a.Size {
			mem.fsFills(a.Size)
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
	if unchangeable(a.State) != "" {
		w.noteFor(mem, a.Name, "fs", zap.InfoLevel, "the array is "+a.State+": not growing its filesystem until it is read-write",
			zap.String("mountpoint", mp))
		return
	}
	if _, err := w.h.run.run(cctx, args...); err != nil {
		delay := mem.fsRetry.fail(now, w.cfg.Interval)
		w.noteFor(mem, a.Name, "fs", zap.WarnLevel, "cannot grow the filesystem", zap.String("mountpoint", mp),
			zap.Duration("retry_in", delay), zap.Error(err))
		return
	}
	mem.fsFills(a.Size)
	w.log.Info("grew the filesystem", zap.String("array", md), zap.String("mountpoint", mp), zap.String("fstype", fstype),
		zap.String("size", humanize.IBytes(a.Size)))
}

// fsFills records that the array's filesystem fills it at size.
func (mem *arrayMemory) fsFills(size uint64) {
	mem.fsGrewAt = size
	mem.fsRetry.reset()
	mem.notes["fs"] = ""
}

// note logs msg unless it is what was last logged for array and topic.
func (w *Watcher) note(array, topic string, lvl zapcore.Level, msg string, fields ...zap.Field) {
	w.mu.Lock()
	mem := w.arrays[array]
	if mem == nil {
		mem = &arrayMemory{legs: make(map[string]*legMemory), notes: make(map[string]string)}
		w.arrays[array] = mem
	}
	w.mu.Unlock()
	w.noteFor(mem, array, topic, lvl, msg, fields...)
}

func (w *Watcher) noteFor(mem *arrayMemory, array, topic string, lvl zapcore.Level, msg string, fields ...zap.Field) {
	w.noteKeyed(mem, array, topic, msg, lvl, msg, fields...)
}

// noteKeyed is noteFor with key, not msg, telling whether the topic changed.
func (w *Watcher) noteKeyed(mem *arrayMemory, array, topic, key string, lvl zapcore.Level, msg string, fields ...zap.Field) {
	if mem.notes[topic] == key {
		return
	}
	mem.notes[topic] = key
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
