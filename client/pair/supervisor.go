package pair

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/client/kernel"
	"github.com/lvnbd/lvnbd/client/refusals"
	"github.com/lvnbd/lvnbd/client/volumeid"
)

// Defaults of Config.
const (
	DefaultLinkDir        = "/dev/lvnbd"
	DefaultPollInterval   = 10 * time.Second
	DefaultHealthInterval = 5 * time.Second
	DefaultDialTimeout    = 15 * time.Second
)

// TCP keepalive of the connections handed to the kernel. The kernel notices a
// dead connection on its own only when a request times out; these probes
// make it notice a storage box that went silent (a cut link, a crashed
// host) within about 25 s even when the guest does no I/O.
const (
	keepAliveIdle     = 10 * time.Second
	keepAliveInterval = 5 * time.Second
	keepAliveCount    = 3
)

// ErrUnknownPair is returned for a pair name that is not in the
// configuration.
var ErrUnknownPair = errors.New("no such pair")

// ErrUnknownLeg means a leg name other than a and b.
var ErrUnknownLeg = errors.New("no such leg")

// ErrStopped is a wait cut short because the supervisor stopped: the daemon
// is stopping, or reloading its configuration (a new supervisor adopts the
// legs, and this one's status goes stale).
var ErrStopped = errors.New("the pair daemon stopped or reloaded its configuration meanwhile")

// ErrLastHalf is returned when one leg would be taken down while the other
// is not connected.
var ErrLastHalf = errors.New("the other leg is not connected")

// Kernel is what the supervisor uses of the kernel's nbd driver;
// *kernel.Conn is the real one.
type Kernel interface {
	Connect(ctx context.Context, cfg kernel.Config) (int, error)
	Disconnect(ctx context.Context, index int) error
	Reconfigure(ctx context.Context, index int, r kernel.Reconfig) error
	Status(ctx context.Context, index int) ([]kernel.Device, error)
	WatchLinkDead(ctx context.Context) (<-chan int, error)
	// Bound reports whether a running device can still be given
	// connections (kernel.Conn.Bound).
	Bound(ctx context.Context, index int, backend string) (bool, error)
}

// DialFunc opens n connections to an export, each past a handshake without
// structured replies, as kernel.DialSockets does.
type DialFunc func(ctx context.Context, u client.URI, n int) ([]*os.File, client.ExportInfo, error)

// InfoFunc asks a server about an export without attaching it, as
// client.Info does.
type InfoFunc func(ctx context.Context, uri string) (client.ExportInfo, error)

// Config configures a Supervisor. Zero fields take the defaults.
type Config struct {
	// Pairs are the pairs to keep attached.
	Pairs []Spec
	// Kernel is the nbd driver; required.
	Kernel Kernel
	// Logger receives what the supervisor does; nil logs nothing.
	Logger *zap.Logger
	// LinkDir holds the stable names LinkDir/PAIR/LEG (DefaultLinkDir).
	LinkDir string
	// PollInterval is how often each export's size is read, to grow its
	// device when the volume grew (DefaultPollInterval).
	PollInterval time.Duration
	// HealthInterval is how often each device is checked to still be
	// attached to its export (DefaultHealthInterval).
	HealthInterval time.Duration
	// MinBackoff and MaxBackoff bound the wait between failed attempts to
	// attach or reconnect a leg (DefaultMinBackoff, DefaultMaxBackoff).
	MinBackoff, MaxBackoff time.Duration
	// DialTimeout bounds one attempt to connect and negotiate
	// (DefaultDialTimeout).
	DialTimeout time.Duration
	// Dial opens connections for the kernel; nil uses kernel.DialSockets
	// with TCP keepalive probes.
	Dial DialFunc
	// Info reads an export's size; nil uses client.Info.
	Info InfoFunc
	// Down names pairs, and legs as PAIR/LEG, that start down, as if taken
	// down with Down: a daemon reloading its configuration keeps down what
	// was down.
	Down []string
	// IDs records the volume each leg's device was attached to, across
	// reloads and restarts (volumeid.DefaultPath); nil keeps them in this
	// supervisor's memory only.
	IDs *volumeid.Store
	// Refusals records the legs refused as not their device's volume
	// (volumeid.ErrReplaced), across restarts of the dom0, until they are
	// taken down (refusals.DefaultPath); nil keeps them in this
	// supervisor's memory only.
	Refusals *refusals.Store
	// Holders lists the dom0's stacked devices (md, device-mapper) on nbd
	// device index or its partitions; nil checks nothing. A leg's device
	// is the guest's, through Xen's blkback: any holder on the dom0 is an
	// array or volume group of the guest's assembled here (udev without
	// lvnbd's rule, an admin's scan), which may write under the guest.
	Holders func(index int) ([]string, error)
	// Users says what uses nbd device index besides the leg's own link:
	// mounts, md or device-mapper holders, a Xen block backend serving it
	// to a guest. Down refuses to detach a device in use without force;
	// nil checks nothing.
	Users func(index int) ([]string, error)
}

// Supervisor attaches both legs of every pair as kernel block devices and
// keeps them attached: it reconnects dead legs, grows devices whose export
// grew, adopts the devices of a previous run and maintains the stable links.
// Its methods may be called from several goroutines.
type Supervisor struct {
	cfg    Config
	log    *zap.Logger
	runner runner
	// jitter returns a number in [0, 1) that spreads backoffs.
	jitter func() float64
	pairs  []*pairState

	mu      sync.Mutex
	byIndex map[int]*leg  // device index -> the leg that has it
	changed chan struct{} // closed and replaced whenever a leg's status changes
	// stopped is closed when Run returns: nothing changes any more.
	stopped  chan struct{}
	stopOnce sync.Once
	// ops counts the Up and Down under way, each with its context's cancel
	// in opCancels; closing (under mu) refuses new ones at once. Close
	// waits for those under way, up to closeGrace, then cancels them: an
	// operation is done or cut before the supervisor stops, or refused.
	ops       sync.WaitGroup
	opCancels map[*context.CancelCauseFunc]struct{}
	closing   bool
	// closeGrace and xlTimeout are CloseGrace and XLTimeout; tests
	// shorten them.
	closeGrace, xlTimeout time.Duration
}

// CloseGrace is how long Close lets an Up or Down under way go on before it
// cancels it: an xl block-detach that is nearly done finishes, and one
// hung (a domain or backend stuck on a dead leg) does not hold up a reload
// or a stop for ever.
const CloseGrace = 30 * time.Second

// XLTimeout bounds one xl block-attach or block-detach. libxl gives up on
// a backend after 10 s and on hotplug scripts after 40 s; one that takes
// longer is stuck, and would hold the pair, and a reload, meanwhile.
const XLTimeout = 2 * time.Minute

// pairState is one pair under supervision.
type pairState struct {
	spec Spec
	legs [2]*leg
	// op serialises Up and Down of the pair.
	op sync.Mutex
}

// New validates cfg and returns a supervisor; Run starts it.
func New(cfg *Config) (*Supervisor, error) {
	return newSupervisor(cfg, execRunner{})
}

func newSupervisor(cfg *Config, r runner) (*Supervisor, error) {
	if cfg == nil || cfg.Kernel == nil {
		return nil, errors.New("pair: Config.Kernel is required")
	}
	if err := ValidateSpecs(cfg.Pairs); err != nil {
		return nil, err
	}
	c := *cfg
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	if c.LinkDir == "" {
		c.LinkDir = DefaultLinkDir
	}
	if c.PollInterval <= 0 {
		c.PollInterval = DefaultPollInterval
	}
	if c.HealthInterval <= 0 {
		c.HealthInterval = DefaultHealthInterval
	}
	if c.MinBackoff <= 0 {
		c.MinBackoff = DefaultMinBackoff
	}
	if c.MaxBackoff < c.MinBackoff {
		c.MaxBackoff = max(DefaultMaxBackoff, c.MinBackoff)
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.Dial == nil {
		d := &net.Dialer{KeepAliveConfig: net.KeepAliveConfig{
			Enable: true, Idle: keepAliveIdle, Interval: keepAliveInterval, Count: keepAliveCount}}
		c.Dial = func(ctx context.Context, u client.URI, n int) ([]*os.File, client.ExportInfo, error) {
			return kernel.DialSockets(ctx, d, u, n)
		}
	}
	if c.Info == nil {
		c.Info = func(ctx context.Context, uri string) (client.ExportInfo, error) { return client.Info(ctx, uri, nil) }
	}
	if c.IDs == nil {
		c.IDs = volumeid.Open("")
	}
	if c.Refusals == nil {
		c.Refusals = refusals.Open("")
	}
	s := &Supervisor{
		cfg:     c,
		log:     c.Logger,
		runner:  r,
		jitter:  rand.Float64,
		byIndex: map[int]*leg{},
		changed: make(chan struct{}),
		stopped: make(chan struct{}),

		opCancels:  map[*context.CancelCauseFunc]struct{}{},
		closeGrace: CloseGrace,
		xlTimeout:  XLTimeout,
	}
	for _, spec := range c.Pairs {
		p := &pairState{spec: spec}
		for i := range Legs {
			// ValidateSpecs parsed them.
			u, _ := client.ParseURI(spec.URIs[i])
			p.legs[i] = newLeg(s, p, i, u)
			if slices.Contains(c.Down, spec.Name) || slices.Contains(c.Down, spec.Name+"/"+Legs[i]) {
				p.legs[i].down = true
				p.legs[i].st.State = StateDown
			}
		}
		s.pairs = append(s.pairs, p)
	}
	return s, nil
}

// Run attaches (or adopts) every leg and keeps them attached until ctx is
// done. It leaves the devices attached when it returns: the guests keep
// their disks, and the next Run adopts them.
func (s *Supervisor) Run(ctx context.Context) error {
	defer s.stopOnce.Do(func() { close(s.stopped) })
	// Subscribe before attaching, so no death goes unseen.
	events, err := s.cfg.Kernel.WatchLinkDead(ctx)
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	for _, p := range s.pairs {
		for _, l := range p.legs {
			wg.Go(func() { l.run(ctx) })
		}
	}
	s.watch(ctx, events)
	wg.Wait()
	return nil
}

// watch passes the kernel's LINK_DEAD events to the legs until ctx is done,
// subscribing again if the subscription fails.
func (s *Supervisor) watch(ctx context.Context, events <-chan int) {
	for {
		select {
		case <-ctx.Done():
			return
		case index, ok := <-events:
			switch {
			case !ok:
				if events = s.resubscribe(ctx); events == nil {
					return
				}
				// Deaths may have gone unseen meanwhile.
				s.suspectAll()
			case index == kernel.EventsLost:
				s.log.Warn("dead-connection notifications were lost: checking every leg")
				s.suspectAll()
			default:
				s.mu.Lock()
				l := s.byIndex[index]
				s.mu.Unlock()
				if l != nil {
					l.suspect(false)
					break
				}
				// The device may be a leg's whose Connect the kernel has
				// accepted but which has not recorded it yet: the kernel
				// sends one notice per dead connection, so dropping this
				// one would leave that leg "connected" on a dead
				// connection. As after lost notices, every leg checks;
				// those without a device yet ignore it.
				s.log.Info("dead connection on a device no leg has (yet): checking every leg",
					zap.String("device", kernel.DevicePath(index)))
				s.suspectAll()
			}
		}
	}
}

// resubscribe subscribes to LINK_DEAD again, with backoff, until it works
// or ctx is done (nil).
func (s *Supervisor) resubscribe(ctx context.Context) <-chan int {
	for failures := 1; ; failures++ {
		wait := backoff(failures, s.cfg.MinBackoff, s.cfg.MaxBackoff, s.jitter())
		s.log.Warn("dead-connection notifications stopped: subscribing again", zap.Duration("in", wait))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		events, err := s.cfg.Kernel.WatchLinkDead(ctx)
		if err == nil {
			return events
		}
		s.log.Warn("subscribing to dead-connection notifications", zap.Error(err))
	}
}

// suspectAll makes every leg with a device give it fresh connections.
func (s *Supervisor) suspectAll() {
	for _, p := range s.pairs {
		for _, l := range p.legs {
			l.suspect(true)
		}
	}
}

// Ready waits until every leg has made its first attempt: attached,
// adopted, or failed and left to retry.
func (s *Supervisor) Ready(ctx context.Context) error {
	return s.waitFor(ctx, func() bool {
		for _, p := range s.pairs {
			for _, l := range p.legs {
				if l.status().State == StateAttaching {
					return false
				}
			}
		}
		return true
	})
}

// Status returns the state of every pair, in configuration order.
func (s *Supervisor) Status() []PairStatus {
	out := make([]PairStatus, len(s.pairs))
	for i, p := range s.pairs {
		out[i] = p.status()
	}
	return out
}

func (p *pairState) status() PairStatus {
	st := PairStatus{Name: p.spec.Name, XenDomain: p.spec.XenDomain, Up: true}
	for _, l := range p.legs {
		ls := l.status()
		if ls.State == StateDown {
			st.Up = false
		}
		st.Legs = append(st.Legs, ls)
	}
	return st
}

// lookupLegs finds pair name and the indexes of the legs leg names: both
// when it is empty.
func (s *Supervisor) lookupLegs(name, leg string) (*pairState, []int, error) {
	p, err := s.lookup(name)
	if err != nil {
		return nil, nil, err
	}
	if leg == "" {
		return p, []int{0, 1}, nil
	}
	i := slices.Index(Legs[:], leg)
	if i < 0 {
		return nil, nil, fmt.Errorf("%w %q in pair %s: a pair's legs are a and b", ErrUnknownLeg, leg, name)
	}
	return p, []int{i}, nil
}

func (s *Supervisor) lookup(name string) (*pairState, error) {
	for _, p := range s.pairs {
		if p.spec.Name == name {
			return p, nil
		}
	}
	return nil, fmt.Errorf("%w %q", ErrUnknownPair, name)
}

// Up brings pair name up, or only its leg leg ("a" or "b"; "" is both):
// legs that were down are attached, legs waiting to retry are retried now.
// It waits up to wait for each leg to be connected (or to fail once), then,
// with a Xen domain configured, gives each leg that has a device to the
// domain with xl block-attach. Legs without a device, and legs whose device
// is not connected (its export refused, or unreachable), are reported in
// the error.
func (s *Supervisor) Up(ctx context.Context, name, leg string, wait time.Duration) (PairStatus, error) {
	ctx, end, err := s.beginOp(ctx)
	if err != nil {
		return PairStatus{}, err
	}
	defer end()
	p, legs, err := s.lookupLegs(name, leg)
	if err != nil {
		return PairStatus{}, err
	}
	p.op.Lock()
	defer p.op.Unlock()
	if ctx.Err() != nil {
		return p.status(), context.Cause(ctx) // cut by Close while waiting its turn
	}
	start := time.Now()
	for _, i := range legs {
		l := p.legs[i]
		if err := l.do(ctx, l.up); err != nil {
			return p.status(), err
		}
	}
	// A leg is up once connected. One that failed since (no device), or
	// whose device could not be given connections since (its export
	// refused: made anew, or its storage box went down; or unreachable),
	// is not, and is reported.
	settled := func() bool {
		for _, i := range legs {
			st := p.legs[i].status()
			erredSince := !st.LastErrorAt.Before(start)
			if st.State != StateConnected && !(erredSince && (st.State == StateFailed || st.Device != "")) {
				return false
			}
		}
		return true
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	err = s.waitFor(wctx, settled)
	cancel()
	if ctx.Err() != nil {
		return p.status(), context.Cause(ctx)
	}
	if errors.Is(err, ErrStopped) {
		// Acting on this supervisor's status (xl block-attach) would
		// act on what the next one may have changed.
		return p.status(), fmt.Errorf("waiting for pair %s to come up: %w: run lvnbd pair up again", name, err)
	}
	var errs []error
	var disks []string
	if p.spec.XenDomain != "" {
		if disks, err = p.spec.XenDisks(s.cfg.LinkDir); err != nil {
			return p.status(), err
		}
	}
	for _, i := range legs {
		st := p.legs[i].status()
		if st.Device == "" {
			why := st.LastError
			if why == "" {
				why = "still " + string(st.State)
			}
			errs = append(errs, fmt.Errorf("leg %s (%s) has no device: %s", st.Leg, st.URI, why))
			continue
		}
		if st.State != StateConnected {
			// Given to the domain all the same, as its device is the
			// guest's half: its I/O fails until it is connected.
			why := "still " + string(st.State) + " after " + wait.String()
			if !st.LastErrorAt.Before(start) {
				why = st.LastError
			}
			errs = append(errs, fmt.Errorf("leg %s (%s) is %s on %s: %s", st.Leg, st.URI, st.State, st.Device, why))
		}
		if disks != nil {
			if err := s.xl(ctx, "block-attach", p.spec.XenDomain, disks[i]); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return p.status(), errors.Join(errs...)
}

// Down takes pair name down, or only its leg leg ("a" or "b"; "" is both):
// with a Xen domain configured, xl block-detach takes the legs from the
// domain first; then their devices are detached, their links removed and
// their volume IDs forgotten (and, for one leg named, its refusal: see
// refusals), and the legs stay down until Up. Unless force:
// one leg is not taken down while the other is not connected (the guest
// would lose the last half of its mirror), and if xl fails for a leg the
// devices stay attached and no further leg is taken from the domain. One leg
// taken down and up again is how a mirror half whose volume was made anew
// is taken into use, while the guest runs on the other.
func (s *Supervisor) Down(ctx context.Context, name, leg string, force bool) (PairStatus, error) {
	ctx, end, err := s.beginOp(ctx)
	if err != nil {
		return PairStatus{}, err
	}
	defer end()
	p, legs, err := s.lookupLegs(name, leg)
	if err != nil {
		return PairStatus{}, err
	}
	p.op.Lock()
	defer p.op.Unlock()
	if ctx.Err() != nil {
		return p.status(), context.Cause(ctx) // cut by Close while waiting its turn
	}
	if len(legs) == 1 && !force {
		if other := p.legs[1-legs[0]].status(); other.State != StateConnected {
			why := ""
			if other.LastError != "" {
				why = " (" + other.LastError + ")"
			}
			return p.status(), fmt.Errorf("%w: leg %s is %s%s, so the guest may have no other half of its mirror than leg %s; "+
				"bring leg %s back first (lvnbd pair up --leg %s %s), or take leg %s down with --force",
				ErrLastHalf, other.Leg, other.State, why, leg, other.Leg, other.Leg, name, leg)
		}
	}
	// The legs to detach: those the domain has let go of (all of them,
	// without one).
	detach := legs
	var errs []error
	if p.spec.XenDomain != "" {
		detach = nil
		for _, i := range legs {
			if p.legs[i].status().State == StateDown {
				detach = append(detach, i) // taken from the domain when it went down
				continue
			}
			if ctx.Err() != nil {
				// Cut (Close, or the caller gone): no leg more is
				// taken from the domain, not even with --force.
				errs = append(errs, fmt.Errorf("%w: leg %s and the legs after it stay attached", context.Cause(ctx), Legs[i]))
				break
			}
			if err := s.xl(ctx, "block-detach", p.spec.XenDomain, p.spec.Vdevs[i]); err != nil {
				if ctx.Err() != nil {
					// Killed by the cut: whether the domain let go of
					// the leg is unknown, --force or not.
					errs = append(errs, fmt.Errorf("%w\nleg %s stays attached, and so do the legs after it", err, Legs[i]))
					break
				}
				if !force {
					// The guest may still use this leg: take no
					// other from it either. Those it let go of are
					// detached, so that the state says what the
					// guest has, and a retry asks xl for the rest.
					errs = append(errs, fmt.Errorf("%w\nleg %s stays attached, and so do the legs after it: make the guest let go of %s, or take the pair down with --force",
						err, Legs[i], p.spec.Vdevs[i]))
					break
				}
				errs = append(errs, err)
			}
			detach = append(detach, i)
		}
	}
	if !force && s.cfg.Users != nil && p.spec.XenDomain == "" {
		// A device something still uses (a domain whose configuration
		// file names it, as xen_domain is not set; a mount on the dom0)
		// would fail all its I/O once detached: the guest would lose
		// that half, or both at once. lvnbd detach refuses too. (With
		// xen_domain, xl block-detach above is the guard.)
		var inUse []error
		for _, i := range detach {
			st := p.legs[i].status()
			index, err := kernel.ParseDevice(st.Device)
			if err != nil {
				continue // no device to detach
			}
			users, err := s.cfg.Users(index)
			switch {
			case err != nil:
				inUse = append(inUse, fmt.Errorf("leg %s: cannot tell whether %s is in use: %w; --force detaches it anyway",
					st.Leg, st.Device, err))
			case len(users) > 0:
				inUse = append(inUse, fmt.Errorf("leg %s: %s is in use (%s): take it from its users first (xl "+
					"block-detach DOMAIN VDEV for a guest), or --force", st.Leg, st.Device, strings.Join(users, ", ")))
			}
		}
		if len(inUse) > 0 {
			return p.status(), errors.Join(append(errs, inUse...)...)
		}
	}
	// Taken down alone, a leg is being replaced: its refusal goes with
	// its volume ID. With the whole pair (a domain shut down, say) it
	// stays: a half refused as another volume must not come back with the
	// pair unnoticed.
	forgetRefusal := leg != ""
	// The legs to detach were let go of by the domain (or forced, before
	// any cut): detached even if the operation is cut now, so that the
	// state says what the guest has.
	dctx := context.WithoutCancel(ctx)
	for _, i := range detach {
		l := p.legs[i]
		if err := l.do(dctx, func(ctx context.Context, now time.Time) error { return l.detach(ctx, now, forgetRefusal) }); err != nil {
			errs = append(errs, fmt.Errorf("leg %s: %w", l.name, err))
		}
	}
	return p.status(), errors.Join(errs...)
}

// beginOp starts an Up or Down: it returns the context to run it with,
// which Close cancels (with ErrStopped) if the operation outlasts its
// grace, and end, to call when it ends. Once Close has been called it
// returns ErrStopped at once.
func (s *Supervisor) beginOp(ctx context.Context) (_ context.Context, end func(), _ error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return nil, nil, fmt.Errorf("%w: run the command again once it has", ErrStopped)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	s.opCancels[&cancel] = struct{}{}
	s.ops.Add(1)
	return ctx, func() {
		s.mu.Lock()
		delete(s.opCancels, &cancel)
		s.mu.Unlock()
		cancel(nil)
		s.ops.Done()
	}, nil
}

// Close refuses the Up and Down that come after it, and waits for those
// under way to end: call it before stopping Run for a reload, so that a
// pair down (an xl block-detach, then the detach) is not cut between its
// steps, and its result is in the status the next supervisor starts from.
// One still going after closeGrace (an xl hung, or an up waiting long for
// its legs) is cancelled: its xl is killed, and it returns ErrStopped. A
// Down's detach of the legs the domain let go of is never cut (see Down
// and leg.detach).
func (s *Supervisor) Close() {
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		s.ops.Wait()
		close(done)
	}()
	t := time.NewTimer(s.closeGrace)
	defer t.Stop()
	select {
	case <-done:
		return
	case <-t.C:
	}
	s.mu.Lock()
	n := len(s.opCancels)
	for cancel := range s.opCancels {
		(*cancel)(fmt.Errorf("%w (the operation was cut after %s)", ErrStopped, s.closeGrace))
	}
	s.mu.Unlock()
	if n > 0 {
		s.log.Warn("cancelled pair operations still under way", zap.Int("operations", n), zap.Duration("after", s.closeGrace))
	}
	<-done
}

// xl runs xl ARGS for an Up or Down, bounded by xlTimeout.
func (s *Supervisor) xl(ctx context.Context, args ...string) error {
	ctx, cancel := context.WithTimeoutCause(ctx, s.xlTimeout,
		fmt.Errorf("xl %s did not finish within %s (the domain or its block backend stuck?)", args[0], s.xlTimeout))
	defer cancel()
	_, err := s.runner.run(ctx, append([]string{"xl"}, args...)...)
	if err != nil && context.Cause(ctx) != nil && ctx.Err() != nil {
		return fmt.Errorf("%w: %w", context.Cause(ctx), err)
	}
	return err
}

// changedLeg records a leg's device index and wakes waitFor.
func (s *Supervisor) changedLeg(l *leg, oldIndex, newIndex int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if oldIndex != newIndex && s.byIndex[oldIndex] == l {
		delete(s.byIndex, oldIndex)
	}
	if newIndex >= 0 {
		s.byIndex[newIndex] = l
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

// waitFor waits until cond is true, checking after every status change;
// ErrStopped once Run has returned.
func (s *Supervisor) waitFor(ctx context.Context, cond func() bool) error {
	for {
		s.mu.Lock()
		changed := s.changed
		s.mu.Unlock()
		if cond() {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		case <-s.stopped:
			return ErrStopped
		}
	}
}
