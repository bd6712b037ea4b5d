package pair

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/client/kernel"
	"github.com/lvnbd/lvnbd/client/refusals"
	"github.com/lvnbd/lvnbd/client/volumeid"
)

// idle is what step returns when nothing is due until a request or an event
// comes.
const idle time.Duration = -1

// errDeviceLost means a leg's device is gone or attached to something else.
var errDeviceLost = errors.New("device lost")

// leg is one export of a pair and its kernel device. Its state is owned by
// the goroutine of run; other goroutines read the published LegStatus, send
// requests through do and signal dead connections through suspect.
type leg struct {
	s       *Supervisor
	spec    *Spec
	name    string // "a" or "b"
	uri     client.URI
	backend string // the canonical URI: the device's backend identifier
	link    string
	log     *zap.Logger

	kick    chan struct{} // capacity 1: connections may be dead
	reqs    chan legRequest
	stopped chan struct{} // closed when run returns

	// Owned by run's goroutine.
	dev        int // -1: no device
	size       uint64
	blockSize  uint32
	readOnly   bool
	down       bool
	stale      bool // connections may be dead: give the device fresh ones
	unseen     bool // stale only because nobody watched: not counted as a reconnect
	failures   int  // failed attempts in a row
	retryAt    time.Time
	pollAt     time.Time
	healthAt   time.Time
	reconnects int
	adopted    bool
	// timeoutKept: a reconnect kept the device's higher timeout (see
	// reconnect), and said so.
	timeoutKept bool
	// heldBy is what the last health check found holding the device on
	// the dom0 (Config.Holders), as it was said.
	heldBy string
	// lostDevice is the device lost, until another is attached or the leg
	// is taken down (Size 0: none): its link led the guest to this leg's
	// data, so the export must not have shrunk under it.
	lostDevice kernel.Device
	// notAdopted is a device on the leg's export that adoptable refused
	// (-1: none), which pair down --leg must not take for the leg's own.
	notAdopted int

	mu        sync.Mutex
	st        LegStatus
	suspected bool // set by suspect, for events that come between steps
	all       bool // the last suspicion was for every leg
}

type legRequest struct {
	fn   func(ctx context.Context, now time.Time) error
	ctx  context.Context
	done chan error
}

func newLeg(s *Supervisor, p *pairState, i int, u client.URI) *leg {
	l := &leg{
		s:          s,
		spec:       &p.spec,
		name:       Legs[i],
		uri:        u,
		backend:    u.String(),
		link:       LinkPath(s.cfg.LinkDir, p.spec.Name, Legs[i]),
		kick:       make(chan struct{}, 1),
		reqs:       make(chan legRequest),
		stopped:    make(chan struct{}),
		dev:        -1,
		notAdopted: -1,
	}
	l.log = s.log.With(zap.String("pair", p.spec.Name), zap.String("leg", l.name), zap.String("uri", l.backend))
	l.st = LegStatus{Leg: l.name, URI: l.backend, Link: l.link, State: StateAttaching, Since: time.Now(),
		Connections: p.spec.Connections}
	if len(p.spec.Vdevs) == 2 {
		l.st.Vdev = p.spec.Vdevs[i]
	}
	return l
}

// run steps the leg whenever something is due, an event comes or a request
// arrives, until ctx is done.
func (l *leg) run(ctx context.Context) {
	defer close(l.stopped)
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-l.kick:
		case req := <-l.reqs:
			req.done <- req.fn(req.ctx, time.Now())
		}
		l.takeSuspicion(time.Now())
		if wait := l.step(ctx, time.Now()); wait >= 0 {
			timer.Reset(wait)
		} else {
			timer.Stop()
		}
	}
}

// do runs fn in the leg's goroutine, between steps.
func (l *leg) do(ctx context.Context, fn func(ctx context.Context, now time.Time) error) error {
	if ctx.Err() != nil {
		// Not left to select's choice between the request and the end.
		return context.Cause(ctx)
	}
	req := legRequest{fn: fn, ctx: ctx, done: make(chan error, 1)}
	select {
	case l.reqs <- req:
	case <-l.stopped:
		return ErrStopped
	case <-l.s.stopped: // also when Run ended before the leg ran
		return ErrStopped
	case <-ctx.Done():
		return context.Cause(ctx)
	}
	return <-req.done
}

// suspect tells the leg its connections may be dead: the kernel said so, or
// (all) nobody was listening when it might have.
func (l *leg) suspect(all bool) {
	l.mu.Lock()
	// A death reported by the kernel outweighs a mere doubt.
	l.all = all && (l.all || !l.suspected)
	l.suspected = true
	l.mu.Unlock()
	select {
	case l.kick <- struct{}{}:
	default: // a kick is already pending
	}
}

// takeSuspicion turns a pending suspicion into a reconnect.
func (l *leg) takeSuspicion(now time.Time) {
	l.mu.Lock()
	suspected, all := l.suspected, l.all
	l.suspected = false
	l.mu.Unlock()
	if !suspected || l.dev < 0 || l.down {
		return
	}
	wasStale := l.stale
	l.stale = true
	if all {
		// Only a check: counted as a reconnect if a death is reported too.
		l.unseen = l.unseen || !wasStale
		return
	}
	if !wasStale || l.unseen {
		l.log.Warn("the kernel reports a dead connection", zap.String("device", kernel.DevicePath(l.dev)))
	}
	l.unseen = false
	l.publish(now, StateReconnecting, nil)
}

// step does what is due at now: attach, reconnect, health check, size poll.
// It returns how long until something is due again, or idle.
func (l *leg) step(ctx context.Context, now time.Time) time.Duration {
	if l.down || ctx.Err() != nil {
		return idle
	}
	if l.dev < 0 || l.stale {
		if now.Before(l.retryAt) {
			return l.retryAt.Sub(now)
		}
		var err error
		if l.dev < 0 {
			err = l.attach(ctx, now)
		} else {
			err = l.reconnect(ctx, now)
		}
		if err != nil {
			if ctx.Err() != nil {
				return idle
			}
			if errors.Is(err, errDeviceLost) {
				l.lost(now, err)
				return 0
			}
			l.failures++
			wait := backoff(l.failures, l.s.cfg.MinBackoff, l.maxBackoff(), l.s.jitter())
			l.retryAt = now.Add(wait)
			state := StateReconnecting
			if l.dev < 0 {
				state = StateFailed
			}
			l.log.Warn("leg failed", zap.Error(err), zap.Int("failures", l.failures), zap.Duration("retry_in", wait))
			l.publish(now, state, err)
			return wait
		}
		l.failures, l.retryAt = 0, time.Time{}
		l.healthAt = now.Add(l.s.cfg.HealthInterval)
		l.pollAt = now.Add(l.s.cfg.PollInterval)
		l.publish(now, StateConnected, nil)
	}
	if !now.Before(l.healthAt) {
		l.healthAt = now.Add(l.s.cfg.HealthInterval)
		if err := l.checkHealth(ctx); errors.Is(err, errDeviceLost) {
			l.lost(now, err)
			return 0
		} else if errors.Is(err, errUnbound) {
			// Not connected, whatever sysfs says: the guest may have
			// no other half (pair down --leg of the other leg checks
			// this state). Reconnecting says why it cannot be, and
			// goes on trying, as for a held device at adoption.
			l.log.Warn("leg's device disconnected under its holder", zap.Error(err))
			l.stale = true
			l.publish(now, StateReconnecting, err)
			return 0
		} else if err != nil && ctx.Err() == nil {
			l.noteError(now, fmt.Errorf("health check: %w", err))
		} else {
			l.publish(now, "", nil)
		}
	}
	if !now.Before(l.pollAt) {
		l.pollAt = now.Add(l.s.cfg.PollInterval)
		if err := l.pollSize(ctx, now); err != nil && ctx.Err() == nil {
			l.noteError(now, fmt.Errorf("size poll: %w", err))
		}
	}
	next := l.healthAt
	if l.pollAt.Before(next) {
		next = l.pollAt
	}
	return next.Sub(now)
}

// liveFirst orders the devices attached to the leg's export (more than one)
// for adoption: those still bound to their connections first. Two can be
// there: one an earlier attempt could not detach, or one disconnected under
// its holder (pair down --force with a domain still holding it). Adopting
// a dead one would point the leg's link, and the guest, at it and leave the
// live one reconnected by nobody. The others are logged.
func (l *leg) liveFirst(ctx context.Context, devs []kernel.Device) []kernel.Device {
	var live, dead []kernel.Device
	for _, d := range devs {
		if bound, err := l.s.cfg.Kernel.Bound(ctx, d.Index, l.backend); err == nil && !bound {
			dead = append(dead, d)
		} else {
			live = append(live, d)
		}
	}
	ordered := append(live, dead...)
	var others []string
	for _, d := range ordered[1:] {
		others = append(others, d.Path())
	}
	l.log.Warn("more than one device is attached to the leg's export: adopting one still bound to its connections; detach the others once nothing holds them (lvnbd detach)",
		zap.String("adopting", ordered[0].Path()), zap.Strings("others", others), zap.Int("unbound", len(dead)))
	return ordered
}

// maxBackoff is the longest wait between attempts. While the device is
// there, I/O waits for it for the dead-connection timeout and then fails
// (and md drops the leg): at most a quarter of that between redials, so a
// storage box that comes back in time is redialed in time too. Never under
// the shortest backoff, so a tiny dead timeout does not become a busy loop.
func (l *leg) maxBackoff() time.Duration {
	longest := l.s.cfg.MaxBackoff
	if l.dev < 0 || l.spec.DeadTimeout <= 0 {
		return longest
	}
	return min(longest, max(l.spec.DeadTimeout/4, l.s.cfg.MinBackoff))
}

// attach adopts the device a previous run attached to the leg's export, or
// attaches a new one.
func (l *leg) attach(ctx context.Context, now time.Time) error {
	devs, err := l.s.cfg.Kernel.Status(ctx, kernel.AnyDevice)
	if err != nil {
		return err
	}
	for _, d := range devs {
		if !d.Running() || d.Backend == l.backend {
			continue
		}
		// The same export under another spelling (the host's case, its
		// port given or not, a trailing dot): a second device on it would
		// be a second writer the guest does not know of, and the first,
		// perhaps the guest's half, would be reconnected by nobody. The
		// kernel compares backends as written, so it is not adopted.
		if u, err := client.ParseURI(d.Backend); err == nil && u.SameExport(l.uri) {
			return fmt.Errorf("%s is attached to this leg's export as %q, spelled otherwise than %q: write "+
				"the leg's URI as that device's backend in the configuration, or detach the device first "+
				"(lvnbd detach %s), so that no export has two devices", d.Path(), d.Backend, l.backend, d.Path())
		}
	}
	var mine []kernel.Device
	for _, d := range devs {
		if d.Running() && d.Backend == l.backend {
			mine = append(mine, d)
		}
	}
	if len(mine) > 1 {
		mine = l.liveFirst(ctx, mine)
	}
	if len(mine) > 0 {
		d := mine[0]
		if why := l.adoptable(d); why != "" {
			return errors.New(why)
		}
		l.useDevice(d)
		l.adopted = true
		l.log.Info("adopted", zap.String("device", d.Path()), zap.Uint64("size", d.Size))
		l.setLink(now)
		// Its connections may have died while nobody listened.
		l.stale, l.unseen = true, true
		l.publish(now, StateReconnecting, nil)
		return l.reconnect(ctx, now)
	}
	err = l.connect(ctx, now)
	if errors.Is(err, kernel.ErrReceiversStarved) && !errors.Is(err, kernel.ErrStillAttached) {
		// The kernel has started worker threads meanwhile: a second attach, at once, gets
		// its receivers. Not a failure worth a backoff, nor one `pair up` should report.
		// (A device that could not be disconnected again is adopted by the next attempt.)
		l.log.Info("attaching again", zap.Error(err))
		err = l.connect(ctx, now)
	}
	return err
}

// connect dials the leg's export and attaches a new device to it.
func (l *leg) connect(ctx context.Context, now time.Time) error {
	socks, info, err := l.dial(ctx)
	if err != nil {
		return err
	}
	// The kernel holds its own references once Connect returns.
	defer kernel.CloseSockets(socks)
	// A lost device's link led the guest to this leg's data.
	if err := l.checkID(info, "attach", l.s.cfg.IDs.Verify); err != nil {
		return err
	}
	if l.lostDevice.Size != 0 {
		if _, err := kernel.GrownSize(l.lostDevice, info.Size); errors.Is(err, kernel.ErrExportShrank) {
			return l.refuseShrunk("attach", l.lostDevice, info, err)
		}
	}
	// A refusal from before a restart of the dom0, whose volume IDs are
	// gone with its devices.
	if err := l.checkRefusal("attach", info); err != nil {
		return err
	}
	cfg, err := kernel.ExportConfig(info, 0)
	if err != nil {
		return err
	}
	cfg.Sockets = socks
	cfg.Timeout = l.spec.Timeout
	cfg.DeadConnTimeout = l.spec.DeadTimeout
	cfg.Backend = l.backend
	cfg.Index = kernel.AnyDevice
	index, err := l.s.cfg.Kernel.Connect(ctx, cfg)
	if err != nil {
		return err
	}
	l.useDevice(kernel.Device{Index: index, Size: cfg.Size, BlockSize: cfg.BlockSize, ReadOnly: info.ReadOnly()})
	l.lostDevice = kernel.Device{}
	if err := l.s.cfg.IDs.Set(l.backend, info.ID()); err != nil {
		l.noteError(now, fmt.Errorf("recording the volume ID of %s: %w", kernel.DevicePath(index), err))
	}
	l.log.Info("attached", zap.String("device", kernel.DevicePath(index)), zap.Uint64("size", cfg.Size),
		zap.Int("connections", len(socks)))
	l.setLink(now)
	return nil
}

// dial opens the leg's connections, bounded by the dial timeout (the
// sockets outlive it: the handshake is over when they are returned).
func (l *leg) dial(ctx context.Context) ([]*os.File, client.ExportInfo, error) {
	dctx, cancel := context.WithTimeout(ctx, l.s.cfg.DialTimeout)
	defer cancel()
	return l.s.cfg.Dial(dctx, l.uri, l.spec.Connections)
}

// reconnect gives the device fresh connections, and the export's size if it
// grew.
func (l *leg) reconnect(ctx context.Context, now time.Time) error {
	d, err := l.current(ctx)
	if err != nil {
		return err
	}
	socks, info, err := l.dial(ctx)
	if err != nil {
		return err
	}
	defer kernel.CloseSockets(socks)
	if err := l.checkID(info, "reconnect "+d.Path(), l.s.cfg.IDs.Check); err != nil {
		return err
	}
	if info.ReadOnly() && !d.ReadOnly {
		return fmt.Errorf("%s is writable but the export is now read-only: not reconnecting it", d.Path())
	}
	size, err := kernel.GrownSize(d, info.Size)
	if errors.Is(err, kernel.ErrExportShrank) {
		return l.refuseShrunk("reconnect "+d.Path(), d, info, err)
	}
	if err != nil {
		return err
	}
	if err := l.checkRefusal("reconnect "+d.Path(), info); err != nil {
		return err
	}
	// The kernel takes one socket per dead connection and drops the rest:
	// with none dead, this changes nothing. A grown size goes after the
	// sockets, on its own: see kernel.Reconfig.
	r := kernel.Reconfig{Sockets: socks, Timeout: l.spec.Timeout, DeadConnTimeout: l.spec.DeadTimeout, Backend: l.backend}
	err = l.s.cfg.Kernel.Reconfigure(ctx, l.dev, r)
	if errors.Is(err, kernel.ErrTimeoutLowered) {
		// A timeout lowered in the configuration of a device attached
		// with a higher one: its connections keep the higher one's
		// TCP_USER_TIMEOUT, so the device keeps its timeout too, until
		// the leg is attached anew.
		if !l.timeoutKept {
			l.log.Warn("the leg's timeout is lower than its device's: kept as it is until the leg is attached anew (lvnbd pair down --leg, then up)",
				zap.Duration("timeout", l.spec.Timeout), zap.Error(err))
			l.timeoutKept = true
		}
		r.Timeout = 0
		err = l.s.cfg.Kernel.Reconfigure(ctx, l.dev, r)
	}
	if err != nil {
		if errors.Is(err, kernel.ErrWrongBackend) {
			// Detached and its number reused while we dialed.
			return fmt.Errorf("%w: %w", errDeviceLost, err)
		}
		return err
	}
	l.size = d.Size
	if !l.unseen {
		l.reconnects++
		l.log.Info("reconnected", zap.String("device", d.Path()), zap.Int("connections", len(socks)))
	}
	l.stale, l.unseen = false, false
	if size != d.Size {
		// The connections are back whatever happens here; a failed grow
		// is retried by the size poll.
		if err := l.grow(ctx, size); err != nil && ctx.Err() == nil {
			l.noteError(now, fmt.Errorf("growing %s after the reconnect: %w", d.Path(), err))
		}
	}
	return nil
}

// grow gives the device the export's grown size.
func (l *leg) grow(ctx context.Context, size uint64) error {
	if err := l.s.cfg.Kernel.Reconfigure(ctx, l.dev, kernel.Reconfig{Size: size, Backend: l.backend}); err != nil {
		return err
	}
	l.log.Info("grew", zap.String("device", kernel.DevicePath(l.dev)), zap.Uint64("from", l.size), zap.Uint64("to", size))
	l.size = size
	return nil
}

// current returns the leg's device as the kernel has it now; errDeviceLost
// if it is no longer attached to the leg's export.
func (l *leg) current(ctx context.Context) (kernel.Device, error) {
	path := kernel.DevicePath(l.dev)
	devs, err := l.s.cfg.Kernel.Status(ctx, l.dev)
	if errors.Is(err, kernel.ErrNoDevice) {
		return kernel.Device{}, fmt.Errorf("%w: %s no longer exists", errDeviceLost, path)
	}
	if err != nil {
		return kernel.Device{}, err
	}
	d := devs[0]
	switch {
	case !d.Running():
		return kernel.Device{}, fmt.Errorf("%w: %s is no longer attached", errDeviceLost, path)
	case d.Backend != l.backend:
		return kernel.Device{}, fmt.Errorf("%w: %s is attached to %q now", errDeviceLost, path, d.Backend)
	}
	return d, nil
}

// checkHealth checks that the device is still attached to the leg's export,
// learns its size (someone may have grown it) and restores the link. A
// device another process disconnected while something holds it open (the
// guest's blkback) still shows its pid and backend, and the kernel sends no
// dead-link notice for it, yet fails all its I/O: errUnbound.
func (l *leg) checkHealth(ctx context.Context) error {
	d, err := l.current(ctx)
	if err != nil {
		return err
	}
	l.useDevice(d)
	if err := l.setLink(time.Time{}); err != nil {
		return err
	}
	if l.stale {
		return nil // being given connections anyway
	}
	bound, err := l.s.cfg.Kernel.Bound(ctx, l.dev, l.backend)
	if err != nil {
		return err
	}
	if !bound {
		return fmt.Errorf("%w: %s was disconnected, by another process (lvnbd detach --force, nbd-client -d?), while "+
			"something holds it open: it fails all its I/O", errUnbound, kernel.DevicePath(l.dev))
	}
	return l.checkHolders()
}

// checkHolders says, once each time it changes, that the dom0 holds the
// leg's device with an md array or a device-mapper volume of its own: the
// guest's mirror assembled on the dom0, or its LVM activated, which may
// write under the running guest. Nothing here undoes it: the admin must.
func (l *leg) checkHolders() error {
	if l.s.cfg.Holders == nil {
		return nil
	}
	holders, err := l.s.cfg.Holders(l.dev)
	if err != nil {
		return fmt.Errorf("listing what holds %s: %w", kernel.DevicePath(l.dev), err)
	}
	was := l.heldBy
	l.heldBy = strings.Join(holders, ", ")
	if len(holders) == 0 || l.heldBy == was {
		return nil
	}
	err = fmt.Errorf("%w: %s is held on this dom0 by %s: the guest's md array assembled here, or its LVM "+
		"activated, can write under the running guest; stop it now (mdadm --stop /dev/MD, or dmsetup remove / "+
		"vgchange -an), and install lvnbd's udev rule 59-lvnbd.rules, which keeps udev off the legs",
		errHeldOnDom0, kernel.DevicePath(l.dev), l.heldBy)
	l.log.Error("leg's device held on the dom0", zap.Error(err))
	return err
}

// errHeldOnDom0 means the dom0 stacks its own device on a leg's device.
var errHeldOnDom0 = errors.New("the leg's device is held on the dom0")

// errUnbound means the leg's device was disconnected while held open.
var errUnbound = errors.New("the device is no longer connected")

// pollSize grows the device if the export grew.
func (l *leg) pollSize(ctx context.Context, now time.Time) error {
	ictx, cancel := context.WithTimeout(ctx, l.s.cfg.DialTimeout)
	defer cancel()
	info, err := l.s.cfg.Info(ictx, l.backend)
	if err != nil {
		return err
	}
	// Said now, before the connections die and the reconnect refuses.
	if err := l.checkID(info, "size poll", l.s.cfg.IDs.Verify); err != nil {
		return err
	}
	d := kernel.Device{Index: l.dev, Size: l.size, BlockSize: l.blockSize, Backend: l.backend}
	size, err := kernel.GrownSize(d, info.Size)
	if errors.Is(err, kernel.ErrExportShrank) {
		// Refused from now on; the connections the device has may still
		// live, and only the server can cut them (a shrink it makes does).
		return l.refuseShrunk("size poll", d, info, err)
	}
	if err != nil {
		return err
	}
	if err := l.checkRefusal("size poll", info); err != nil || size == l.size {
		return err
	}
	// Grown as a reconnect grows, fresh connections first: a new size
	// freezes the device's queue until the I/O in flight is done, and I/O
	// waiting for dead connections is done only once they are replaced.
	// The kernel may not have said yet that they died (a storage box that
	// restarted just now answered this poll), and with none dead it drops
	// the sockets. Not counted as a reconnect.
	l.unseen = true
	if err := l.reconnect(ctx, now); err != nil {
		l.unseen = false
		return err
	}
	l.publish(now, StateConnected, nil)
	return nil
}

// checkID refuses an export whose volume is not the one the leg's device was
// attached to, or that shrank under it, as the host's volume IDs record it:
// check is the store's Check (which records the ID of a device attached
// before IDs were) or Verify; what names what was refused.
func (l *leg) checkID(info client.ExportInfo, what string, check func(backend, id string) error) error {
	err := check(l.backend, info.ID())
	if err == nil {
		return nil
	}
	// Refused, so an ID was recorded (Check records one only where none
	// is): the device's volume, which lifts the refusal.
	known, _ := l.s.cfg.IDs.Get(l.backend)
	return l.refusal(what, err, known)
}

// refuseShrunk records in the volume IDs that the leg's export shrank under
// device d, so that it is refused from then on, even once grown back to d's
// size under the same ID (its tail is not d's data), and returns that
// refusal of what; shrank is kernel.GrownSize's error.
func (l *leg) refuseShrunk(what string, d kernel.Device, info client.ExportInfo, shrank error) error {
	err := l.s.cfg.IDs.Shrank(l.backend, info.ID(), d.Size, info.Size)
	if !errors.Is(err, volumeid.ErrReplaced) {
		return fmt.Errorf("%s: %w; recording that in the volume IDs failed, so it would not be refused once grown back: %w",
			what, shrank, err)
	}
	return l.refusal(what, err, "") // no volume lifts it: the tail is lost
}

// refusal is err, from the volume IDs, as a refusal of what, saying how to
// replace the leg when the export is not the device's data
// (volumeid.ErrReplaced); nil if err is. Such a refusal is recorded in the
// refusals, which outlive the dom0's restarts: accepts is the volume ID
// the leg's device was attached to, the only one that lifts it ("" for
// none).
func (l *leg) refusal(what string, err error, accepts string) error {
	var shrank *volumeid.ShrankError
	if errors.As(err, &shrank) {
		accepts = "" // no volume lifts it: the tail is lost
	}
	if errors.Is(err, volumeid.ErrReplaced) {
		if rerr := l.remember(err, accepts); rerr != nil {
			err = fmt.Errorf("%w (and %w)", err, rerr)
		}
	}
	switch {
	case err == nil:
		return nil
	case errors.As(err, &shrank):
		return fmt.Errorf("%s of leg %s refused: %w; here: lvnbd pair down --leg %s %s, then lvnbd pair up --leg %s %s",
			what, l.name, err, l.name, l.spec.Name, l.name, l.spec.Name)
	case errors.Is(err, volumeid.ErrReplaced):
		return fmt.Errorf("%s of leg %s refused: %w; to use the new volume, remove this leg from the guest's "+
			"mirror, take it down and up again (lvnbd pair down --leg %s %s, then pair up --leg %s %s) and add it "+
			"to the mirror as a new member, resynced in full", what, l.name, err, l.name, l.spec.Name, l.name, l.spec.Name)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// remember records the refusal err in the host's refusals, so that the leg
// stays refused after a restart of the dom0 forgot its volume IDs, until it
// is taken down or its export serves the volume accepts again. An error
// says the refusal was not recorded.
func (l *leg) remember(err error, accepts string) error {
	r := refusals.Refusal{Pair: l.spec.Name, Leg: l.name, Reason: err.Error(), Since: time.Now().UTC(), Accepts: accepts}
	if err := l.s.cfg.Refusals.Add(l.backend, r); err != nil {
		l.log.Warn("recording the refusal: it will not outlive a restart of the dom0", zap.Error(err))
		return fmt.Errorf("recording the refusal failed, so it will not outlive a restart of the dom0: %w", err)
	}
	return nil
}

// checkRefusal refuses, as a refusal of what, an export the leg refused
// before, as the refusals record it, unless info says it serves the volume
// the leg's device was attached to again (a server that answered without
// IDs for a while): that lifts the refusal. Checked after the volume IDs,
// which say best why while they know the device's volume; this covers a
// restart of the dom0, after which they know nothing, and a device
// attached by hand since, whose volume they took from it. The refusals
// unreadable, the leg is refused too: it must not take what may have been.
func (l *leg) checkRefusal(what string, info client.ExportInfo) error {
	r, ok, err := l.s.cfg.Refusals.Get(l.backend)
	switch {
	case err != nil:
		// A leg whose device's volume the IDs know, and which the
		// export serves (the ID check passed), goes on: an unreadable
		// file must not keep every healthy leg of the host from its
		// connections.
		if known, _ := l.s.cfg.IDs.Get(l.backend); known != "" && known == info.ID() {
			l.log.Warn("cannot read the refusals; the export serves the device's volume, going on", zap.Error(err))
			return nil
		}
		return fmt.Errorf("%s of leg %s: %w", what, l.name, err)
	case !ok:
		return nil
	case r.Accepts != "" && info.ID() == r.Accepts:
		if err := l.s.cfg.Refusals.Forget(l.backend); err != nil {
			// Lifted again at the next check: not worth a refusal.
			l.log.Warn("the export serves the device's volume again, but forgetting its refusal failed", zap.Error(err))
			return nil
		}
		l.log.Info("the export serves the device's volume again: its refusal is lifted", zap.String("volume_id", r.Accepts))
		return nil
	}
	where := ""
	if p := l.s.cfg.Refusals.Path(); p != "" {
		where = " (" + p + ")"
	}
	reason := strings.TrimPrefix(r.Reason, volumeid.ErrReplaced.Error()+": ")
	return l.refusal(what, fmt.Errorf("%w: refused on %s, and still until the leg alone is taken down (lvnbd "+
		"pair down --leg), also across restarts%s: %s", volumeid.ErrReplaced, r.Since.Format(time.RFC3339), where, reason),
		r.Accepts)
}

// adoptable says why device d, attached to the leg's export, must not be
// adopted, or "" if it may: a refusal is recorded for the export, and d
// cannot be told to be the leg's own device from before it (a device
// attached by hand after a restart of the dom0, whose volume ID that attach
// recorded). Adopted, its link would lead the guest to it, while its own
// connections still serve the refused export.
func (l *leg) adoptable(d kernel.Device) string {
	r, ok, err := l.s.cfg.Refusals.Get(l.backend)
	id, idErr := l.s.cfg.IDs.Get(l.backend)
	switch {
	case err != nil && idErr == nil && id != "":
		return "" // the reconnect's ID check decides; the refusals unreadable
	case err != nil:
		return fmt.Sprintf("%s is attached to the leg's export, and the refusals cannot be read to tell whether "+
			"it may be adopted: %v", d.Path(), err)
	case !ok:
		return ""
	case r.Accepts == "":
		// A shrink, which no volume lifts: only the leg's own device
		// carries its mark in the IDs, and its reconnect refuses it.
		var shrank *volumeid.ShrankError
		if errors.As(l.s.cfg.IDs.Verify(l.backend, ""), &shrank) {
			return ""
		}
	case idErr == nil && id == r.Accepts:
		return "" // the leg's own device, from before the refusal
	}
	how := "is not attached to the volume the leg's device had"
	if id == "" {
		how = "cannot be told to be the leg's device (no volume ID is recorded for it)"
	}
	l.notAdopted = d.Index
	return fmt.Sprintf("%s is attached to the leg's export, which was refused on %s (%s), and %s: detach it "+
		"(lvnbd detach %s), then lvnbd pair down --leg %s %s and pair up --leg %s %s to add the export as a new "+
		"member", d.Path(), r.Since.Format(time.RFC3339), r.Reason, how, d.Path(), l.name, l.spec.Name, l.name, l.spec.Name)
}

// useDevice takes d as the leg's device.
func (l *leg) useDevice(d kernel.Device) {
	l.dev, l.size, l.blockSize, l.readOnly = d.Index, d.Size, d.BlockSize, d.ReadOnly
}

// lost forgets a device that went away; the next step attaches a new one.
// Its link goes too: the device number is free for any export to take, and
// a guest started from the link (xl create) or an mdadm --incremental would
// be given another volume's disk.
func (l *leg) lost(now time.Time, err error) {
	l.log.Warn("device lost: attaching again", zap.Error(err))
	if l.size != 0 {
		l.lostDevice = kernel.Device{Index: l.dev, Size: l.size, BlockSize: l.blockSize, Backend: l.backend}
	}
	l.dev, l.size, l.stale, l.unseen = -1, 0, false, false
	if rerr := removeLink(l.link); rerr != nil {
		l.log.Warn("removing the link of the lost device", zap.String("link", l.link), zap.Error(rerr))
		err = errors.Join(err, rerr)
	}
	l.publish(now, StateFailed, err)
}

// setLink points the leg's link at its device. A failure is recorded (at
// now, unless zero) and returned.
func (l *leg) setLink(now time.Time) error {
	err := setLink(l.link, kernel.DevicePath(l.dev))
	if err != nil && !now.IsZero() {
		l.noteError(now, err)
	}
	return err
}

// up is the request of Supervisor.Up: attach if down, retry now if waiting.
func (l *leg) up(_ context.Context, now time.Time) error {
	l.retryAt = time.Time{}
	if l.down {
		l.down, l.failures, l.adopted = false, 0, false
		l.publish(now, StateAttaching, nil)
	}
	return nil
}

// detach is the request of Supervisor.Down: detach the device, remove the
// link and stay down.
func (l *leg) detach(ctx context.Context, now time.Time, forgetRefusal bool) error {
	// Not cancelled with the request: an interrupted netlink exchange
	// would leave the supervisor's connection to the kernel unusable.
	ctx = context.WithoutCancel(ctx)
	if l.dev >= 0 {
		// The device may have been detached by hand since the last health
		// check and its number given to another export: that one is not
		// ours to take down.
		_, err := l.current(ctx)
		switch {
		case errors.Is(err, errDeviceLost):
			l.log.Warn("not detaching: the device is no longer the leg's", zap.Error(err))
		case err != nil:
			return fmt.Errorf("checking %s before detaching it: %w", kernel.DevicePath(l.dev), err)
		default:
			err := l.s.cfg.Kernel.Disconnect(ctx, l.dev)
			if err != nil && !errors.Is(err, kernel.ErrNoDevice) {
				return err
			}
			l.log.Info("detached", zap.String("device", kernel.DevicePath(l.dev)))
		}
	}
	if err := removeLink(l.link); err != nil {
		return err
	}
	l.dev, l.size, l.stale, l.unseen, l.failures, l.retryAt = -1, 0, false, false, 0, time.Time{}
	l.lostDevice = kernel.Device{}
	l.down = true
	// A device something still holds open (blkback, after a failed xl
	// block-detach and --force) keeps its configuration, backend and pid
	// until the last close, and pair up adopts it by its backend. Linux
	// 6.1 and 6.12 refuse it new connections; its volume ID is kept until
	// it is gone all the same, so that no kernel reconnects it to another
	// volume under the guest.
	held, err := l.s.cfg.Kernel.Status(ctx, kernel.AnyDevice)
	if err != nil {
		err = fmt.Errorf("checking that the leg's device is gone, before forgetting its volume ID: %w", err)
		l.publish(now, StateDown, err)
		return err
	}
	for _, d := range held {
		if d.Running() && d.Backend == l.backend && d.Index == l.notAdopted {
			err := fmt.Errorf("%s, attached to the refused export by other means than this leg, was not adopted: "+
				"detach it first (lvnbd detach %s), then take the leg down again", d.Path(), d.Path())
			l.publish(now, StateDown, err)
			return err
		}
		if d.Running() && d.Backend == l.backend {
			err := fmt.Errorf("%w: %s is disconnected, but something (the guest's blkback?) still holds it open, "+
				"and is found by its backend: its volume ID is kept, so that it only ever reconnects to "+
				"the same volume; once nothing holds it, take the leg down again to forget the ID", errStillHeld, d.Path())
			l.log.Warn("leg down, its device still held open", zap.Error(err))
			l.publish(now, StateDown, err)
			return err
		}
	}
	// Taken down on purpose and gone: the leg may come back up on another
	// volume, as a new half of the mirror.
	if err := l.s.cfg.IDs.Forget(l.backend); err != nil {
		l.log.Warn("forgetting the detached device's volume ID", zap.Error(err))
	}
	// Its refusal too, when it is being replaced; if that fails, the leg
	// is refused at pair up: better said now.
	if !forgetRefusal {
		if _, refused, _ := l.s.cfg.Refusals.Get(l.backend); refused {
			l.log.Warn("leg down, still refused: take it down alone (lvnbd pair down --leg) to replace it as a new member")
		}
	} else if err := l.s.cfg.Refusals.Forget(l.backend); err != nil {
		err = fmt.Errorf("the leg is down, but forgetting its refusal failed, so pair up would refuse it again: %w", err)
		l.publish(now, StateDown, err)
		return err
	}
	l.publish(now, StateDown, nil)
	return nil
}

// errStillHeld means a detached device is still configured because
// something holds it open.
var errStillHeld = errors.New("device still held open")

// noteError records err without changing the state.
func (l *leg) noteError(now time.Time, err error) {
	l.mu.Lock()
	repeated := l.st.LastError == err.Error()
	l.mu.Unlock()
	if !repeated {
		l.log.Warn("leg", zap.Error(err))
	}
	l.publish(now, "", err)
}

// publish makes the leg's state visible to status readers: state (unchanged
// if empty), since now when it changed, and err as the last error if not nil.
func (l *leg) publish(now time.Time, state State, err error) {
	l.mu.Lock()
	if state != "" && state != l.st.State {
		l.st.State, l.st.Since = state, now
	}
	old := -1
	if l.st.Device != "" {
		old, _ = kernel.ParseDevice(l.st.Device)
	}
	l.st.Device = ""
	if l.dev >= 0 {
		l.st.Device = kernel.DevicePath(l.dev)
	}
	l.st.Size = l.size
	l.st.Reconnects = l.reconnects
	l.st.Adopted = l.adopted
	if err != nil {
		l.st.LastError, l.st.LastErrorAt = err.Error(), now
	}
	l.mu.Unlock()
	l.s.changedLeg(l, old, l.dev)
}

func (l *leg) status() LegStatus {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.st
}
