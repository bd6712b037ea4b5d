// Package daemon runs lvnbd serve from a configuration: listeners (or the
// sockets systemd passed), exports, volumes, fences, TLS, the control
// socket, periodic volume rescans, systemd notifications, and reloads on
// SIGHUP that change exports and access rules without dropping the
// connections of exports that did not change.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/lvnbd/lvnbd/config"
	"github.com/lvnbd/lvnbd/control"
	"github.com/lvnbd/lvnbd/internal/systemd"
	"github.com/lvnbd/lvnbd/internal/uevent"
	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/server/metrics"
	"github.com/lvnbd/lvnbd/volume"
)

// Options are what the daemon needs besides its configuration.
type Options struct {
	// Load returns the effective configuration; it is called at start and
	// again on every reload.
	Load func() (*config.Config, error)
	// Log is the logger; Level, when set, is its level, changed by reloads.
	Log   *zap.Logger
	Level *zap.AtomicLevel
	// Reload delivers reload requests (SIGHUP).
	Reload <-chan struct{}
	// Reloaded, when set, is told the outcome of every reload (for tests
	// and for callers that report it).
	Reloaded func(error)
}

// Daemon is a running storage-box server.
type Daemon struct {
	opts Options
	log  *zap.Logger
	cfg  *config.Config
	srv  *server.Server
	reg  *server.Registry
	vols *server.Volumes
	// statics names the --export / [[export]] exports; the registry has
	// them (lvnbd recover replaces an export there).
	statics map[string]bool
	// absent are the exports configured whose file or device could not be
	// opened: left out, and opened again by each reload.
	absent map[string]absentExport
	// run is this server as recorded with its volumes (see beginRun),
	// runs their driver; nil when it records nothing.
	run  *volume.Run
	runs volume.RunKeeper
}

// Run serves until ctx is done, then drains and returns; cancellation is a
// normal exit and returns nil.
func Run(ctx context.Context, opts Options) error {
	cfg, err := opts.Load()
	if err != nil {
		return err
	}
	d := &Daemon{opts: opts, log: opts.Log, cfg: cfg, reg: server.NewRegistry(), statics: map[string]bool{}}
	defer d.closeStatics()
	level, err := parseLevel(cfg)
	if err != nil {
		return err
	}
	d.setLevel(level)
	fences, err := server.LoadFences(cfg.Server.FenceFile)
	if err != nil {
		return err
	}
	failures, err := server.LoadFailures(cfg.Server.FailureFile, d.log)
	if err != nil {
		return err
	}
	d.reg.KeepFailures(failures)
	for _, f := range failures.List() {
		d.log.Error("this export's write-back failed before, and every request to it fails until lvnbd recover",
			zap.String("export", f.Export), zap.String("description", f.Description), zap.String("error", f.Error),
			zap.Time("since", f.Since), zap.String("recorded_in", cfg.Server.FailureFile))
	}
	// Until the server serves, no client can have had a write
	// acknowledged: a start that fails takes its record with the volumes
	// out (see beginRun), or the next boot would count a crash.
	serving := false
	defer func() {
		if !serving {
			_ = d.endRun(ctx) // logged
		}
	}()
	tlsConfig, tlsWarnings, err := cfg.TLSConfig()
	if err != nil {
		return err
	}
	for _, w := range tlsWarnings {
		d.log.Warn(w)
	}
	// Like a volume that cannot be opened, an export whose file or device
	// cannot be opened must not keep the box from serving every other; a
	// mistake in the configuration still does.
	plan, err := d.planExports(cfg, func(server.ExportSpec) bool { return true })
	if err != nil {
		return err
	}
	if err := d.applyExports(plan); err != nil {
		return err
	}
	var devEvents *uevent.Listener
	if cfg.Server.Volumes != "" {
		drv, err := volume.Open(cfg.Server.Volumes)
		if err != nil {
			return err
		}
		d.vols = server.NewVolumes(drv, d.reg, d.log)
		if err := d.beginRun(ctx, drv); err != nil {
			return err
		}
		if d.vols.Access, err = cfg.ServerAccess(cfg.VolumeExports); err != nil {
			return err
		}
		// Static exports left out (their file cannot be opened) keep
		// their names from volumes all the same.
		d.vols.SetReserved(staticNames(cfg))
		// Beside the failure file: the server's own records of its
		// exports (none without one).
		if f := cfg.Server.FailureFile; f != "" {
			if err := d.vols.KeepShrinks(shrinkFile(f)); err != nil {
				return err
			}
		}
		// Opened before the first sync: no change of a device it
		// exports goes unseen after (WatchDevices).
		if l, err := uevent.Listen(); err != nil {
			d.log.Warn("not watching the volumes' devices: a volume shrunk and grown back behind the server between two rescans would go unseen", zap.Error(err))
		} else {
			d.log.Info("watching the volumes' devices: the kernel tells of every resize (kernel uevents)")
			devEvents = l
			defer l.Close()
		}
		if err := d.vols.Sync(ctx); errors.Is(err, server.ErrListingVolumes) {
			return err
		} else if err != nil {
			// One volume that cannot be read or opened must not keep
			// the box from serving every other: it is logged, and each
			// rescan tries it again.
			d.log.Error("some volumes are not exported", zap.Error(err))
		}
		d.log.Info("exporting volumes", zap.String("driver", drv.String()), zap.Int("exports", len(d.reg.List())))
	}
	lns, err := d.listen(cfg)
	if err != nil {
		return err
	}
	sc := cfg.ServerConfig()
	sc.Exports, sc.Logger, sc.TLS, sc.Fences = d.reg, d.log, tlsConfig, fences
	var m *metrics.Metrics
	var metricsLn net.Listener
	if addr := cfg.Metrics.Listen; addr != "" {
		if metricsLn, err = net.Listen("tcp", addr); err != nil {
			for _, l := range lns {
				l.Close()
			}
			return fmt.Errorf("metrics.listen %s: %w", addr, err)
		}
		m = metrics.New(d.reg, fences)
		sc.Observer = m
	}
	d.srv = server.New(&sc)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var background sync.WaitGroup
	defer background.Wait()
	run := func(f func()) {
		background.Add(1)
		go func() { defer background.Done(); f() }()
	}
	if path := cfg.Server.Control; path != "" {
		ln, err := control.Listen(path)
		if err != nil {
			d.log.Warn("no control socket: lvnbd volume, snapshot, status and fence will not reach this server",
				zap.String("path", path), zap.Error(err))
		} else {
			d.log.Info("control socket", zap.String("path", path))
			run(func() {
				if err := control.Serve(ctx, ln, control.Handler(d.srv, d.vols, d.log)); err != nil {
					d.log.Error("control socket failed", zap.Error(err))
				}
			})
		}
	}
	if m != nil {
		d.log.Info("metrics", zap.String("url", "http://"+metricsLn.Addr().String()+"/metrics"))
		run(func() {
			if err := m.Serve(ctx, metricsLn); err != nil {
				d.log.Error("metrics endpoint failed", zap.Error(err))
			}
		})
	}
	if d.vols != nil && cfg.Server.Rescan > 0 {
		run(func() { d.rescan(ctx, cfg.Server.Rescan) })
	}
	if devEvents != nil {
		run(func() { d.watchDevices(ctx, devEvents) })
	}
	run(func() { d.reloads(ctx) })
	// Failures.record retries too, with every new failure.
	run(func() { every(ctx, failureRetry, func() { _ = failures.Retry() }) }) // logged by the attempt

	served := make(chan error, 1)
	serving = true
	go func() { served <- d.srv.Serve(ctx, lns...) }()
	notify("READY=1", d.log)
	select {
	case err = <-served:
	case <-ctx.Done():
		notify("STOPPING=1", d.log)
		err = <-served
	}
	cancel()
	// A rescan, reload or control request ending now may have withdrawn
	// an export after the server waited for those closing: their flushes
	// are recorded before the exit too.
	background.Wait()
	if d.vols != nil {
		d.vols.Stop() // rollbacks being counted
	}
	d.reg.WaitClosed()
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	// Exiting cleanly would tell systemd all is well, and the next start
	// would serve those exports again.
	if err := failures.Retry(); err != nil {
		return fmt.Errorf("%w: the failed exports would be served again after a restart", err)
	}
	// Every export was flushed and closed (or its failure recorded): a
	// crash of the box from now on loses nothing this server acknowledged.
	if err := d.endRun(ctx); err != nil {
		return fmt.Errorf("%w: the next boot counts a crash of this box, and every volume changes ID", err)
	}
	return nil
}

// failureRetry is how often a failure record that could not be written is
// tried again.
const failureRetry = 10 * time.Second

// every runs f every interval until ctx is done.
func every(ctx context.Context, interval time.Duration, f func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			f()
		}
	}
}

func notify(state string, log *zap.Logger) {
	if err := systemd.Notify(state); err != nil {
		log.Warn("telling systemd", zap.String("state", state), zap.Error(err))
	}
}

// listen returns the sockets systemd passed, else listeners on cfg's URLs.
func (d *Daemon) listen(cfg *config.Config) ([]net.Listener, error) {
	lns, err := systemd.Listeners()
	if err != nil {
		return nil, err
	}
	if len(lns) > 0 {
		d.log.Info("using the sockets systemd passed", zap.Int("count", len(lns)))
		return lns, nil
	}
	addrs, err := cfg.ListenAddrs()
	if err != nil {
		return nil, err
	}
	for _, a := range addrs {
		ln, err := server.Listen(a)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, err
		}
		lns = append(lns, ln)
	}
	return lns, nil
}

func parseLevel(cfg *config.Config) (zapcore.Level, error) {
	lvl, err := zapcore.ParseLevel(cfg.Log.Level)
	if err != nil {
		return lvl, fmt.Errorf("log.level %q: %w", cfg.Log.Level, err)
	}
	return lvl, nil
}

func (d *Daemon) setLevel(lvl zapcore.Level) {
	if d.opts.Level != nil {
		d.opts.Level.SetLevel(lvl)
	}
}

func (d *Daemon) rescan(ctx context.Context, interval time.Duration) {
	every(ctx, interval, func() {
		if err := d.vols.Sync(ctx); err != nil && ctx.Err() == nil {
			d.log.Warn("re-reading volumes", zap.Error(err))
		}
	})
}

// shrinkFile is where a server whose failure file is failures keeps the
// shrinks seen whose rollback is not counted yet: shrinks.json beside
// failures.json, NAME-shrinks.json beside NAME.json, so that two servers
// with their own failure files in one directory keep their own.
func shrinkFile(failures string) string {
	dir, base := filepath.Split(failures)
	if base == "failures.json" {
		return filepath.Join(dir, "shrinks.json")
	}
	return filepath.Join(dir, strings.TrimSuffix(base, filepath.Ext(base))+"-shrinks.json")
}

// watchDevices runs the volumes' device watch (Volumes.WatchDevices) until
// ctx is done.
func (d *Daemon) watchDevices(ctx context.Context, l *uevent.Listener) {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	if err := d.vols.WatchDevices(l); err != nil && ctx.Err() == nil {
		d.log.Error("the volumes' device watch stopped: a volume shrunk and grown back behind the server between two rescans would go unseen", zap.Error(err))
	}
}

func (d *Daemon) reloads(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.opts.Reload:
			notify("RELOADING=1", d.log)
			err := d.reload()
			if err != nil {
				d.log.Error("configuration rejected; the running one stays", zap.Error(err))
			} else {
				d.log.Info("configuration reloaded")
			}
			notify("READY=1", d.log)
			if d.opts.Reloaded != nil {
				d.opts.Reloaded(err)
			}
		}
	}
}

// reload applies a new configuration: exports added, removed (their
// clients drained: what they sent is answered) and changed; access rules,
// TLS certificates and the log level. What needs a restart is logged.
// Everything is checked and opened before anything changes: a configuration
// rejected leaves the running one exactly as it was.
func (d *Daemon) reload() error {
	cfg, err := d.opts.Load()
	if err != nil {
		return err
	}
	tlsConfig, tlsWarnings, err := cfg.TLSConfig()
	if err != nil {
		return err
	}
	var volAccess server.Access
	if d.vols != nil {
		if volAccess, err = cfg.ServerAccess(cfg.VolumeExports); err != nil {
			return err
		}
	}
	level, err := parseLevel(cfg)
	if err != nil {
		return err
	}
	// An export left out because it could not be opened, and configured
	// the same, is not a new mistake: it stays out, and is logged again.
	plan, err := d.planExports(cfg, func(spec server.ExportSpec) bool {
		a, ok := d.absent[spec.Name]
		return ok && a.spec == spec
	})
	if err != nil {
		return err
	}
	if d.vols != nil {
		// Both sets while the exports change: a replaced export is
		// removed before its successor is added.
		d.vols.SetReserved(append(staticNames(d.cfg), staticNames(cfg)...))
	}
	err = d.applyExports(plan)
	if d.vols != nil {
		reserved := d.cfg
		if err == nil {
			reserved = cfg
		}
		d.vols.SetReserved(staticNames(reserved))
	}
	if err != nil {
		return err
	}
	d.setLevel(level)
	d.srv.SetTLS(tlsConfig)
	for _, w := range tlsWarnings {
		d.log.Warn(w)
	}
	if d.vols != nil {
		d.vols.SetAccess(volAccess)
	}
	old := d.cfg
	d.cfg = cfg
	restart := []struct {
		what     string
		old, new any
	}{
		{"server.listen", old.Server.Listen, cfg.Server.Listen},
		{"server.volumes", old.Server.Volumes, cfg.Server.Volumes},
		{"server.control", old.Server.Control, cfg.Server.Control},
		{"server.fence_file", old.Server.FenceFile, cfg.Server.FenceFile},
		{"server.failure_file", old.Server.FailureFile, cfg.Server.FailureFile},
		{"server.rescan", old.Server.Rescan, cfg.Server.Rescan},
		{"log.format", old.Log.Format, cfg.Log.Format},
		{"limits and timeouts", old.ServerConfig(), cfg.ServerConfig()},
		{"metrics.listen", old.Metrics.Listen, cfg.Metrics.Listen},
	}
	for _, r := range restart {
		if !reflect.DeepEqual(r.old, r.new) {
			d.log.Warn("this change takes effect at the next restart", zap.String("setting", r.what))
		}
	}
	return nil
}

// staticNames are the names of the static exports cfg configures.
func staticNames(cfg *config.Config) []string {
	names := make([]string, 0, len(cfg.Exports))
	for _, ce := range cfg.Exports {
		names = append(names, ce.Spec().Name)
	}
	return names
}

// exportPlan is what a configuration changes in the static exports, worked
// out, checked and opened before anything is changed.
type exportPlan struct {
	keep     map[string]server.Access // unchanged exports, with their access now
	add      []*server.Export         // opened, with their access; new or replacing one
	withdraw []string                 // statics no longer configured, or replaced
	// absent are the exports configured whose file or device could not be
	// opened, left out (at start-up, or still since then).
	absent map[string]absentExport
}

// absentExport is a configured export whose file or device could not be
// opened, and why.
type absentExport struct {
	spec server.ExportSpec
	err  error
}

// close closes what the plan opened, when it is not applied.
func (p *exportPlan) close() {
	for _, e := range p.add {
		e.Backend.Close()
	}
}

// planExports works out how to make the static exports match cfg: it checks
// every name and access rule, and opens the new exports' files and devices.
// It changes nothing, and on error has closed what it opened. An export
// that cannot be opened is an error unless leaveOut says to leave it out.
func (d *Daemon) planExports(cfg *config.Config, leaveOut func(server.ExportSpec) bool) (*exportPlan, error) {
	p := &exportPlan{keep: map[string]server.Access{}, absent: map[string]absentExport{}}
	var errs []error
	seen := map[string]bool{}
	for _, ce := range cfg.Exports {
		spec := ce.Spec()
		if err := server.ValidateExportName(spec.Name); err != nil {
			errs = append(errs, err)
			continue
		}
		if seen[spec.Name] {
			errs = append(errs, fmt.Errorf("export %q: configured twice: export names must be unique", spec.Name))
			continue
		}
		seen[spec.Name] = true
		access, err := cfg.ServerAccess(ce.Access)
		if err != nil {
			errs = append(errs, fmt.Errorf("export %q: %w", spec.Name, err))
			continue
		}
		if e, ok := d.reg.Lookup(spec.Name); ok && e.Name == spec.Name && !d.statics[spec.Name] {
			errs = append(errs, fmt.Errorf("export %q: %w: an export made from a volume has that name", spec.Name, server.ErrExportExists))
			continue
		}
		if cur, ok := d.static(spec.Name); ok && sameSpec(cur, spec) {
			p.keep[spec.Name] = access
			continue
		}
		e, err := server.OpenExport(spec)
		if err != nil {
			if leaveOut(spec) {
				p.absent[spec.Name] = absentExport{spec, err}
				continue
			}
			errs = append(errs, err)
			continue
		}
		e.Access = access
		p.add = append(p.add, e)
	}
	if err := errors.Join(errs...); err != nil {
		p.close()
		return nil, err
	}
	for name := range d.statics {
		if _, ok := p.keep[name]; !ok {
			p.withdraw = append(p.withdraw, name)
		}
	}
	return p, nil
}

// applyExports makes the static exports what p says. Exports under new names
// are added first: a volume export may have taken such a name since the plan
// was made, and then those added are taken back, nothing else has changed,
// and the error says why. Past that point it cannot fail, but for one case
// it logs: an export replaced whose name a volume export took in the
// instant between the old one's removal and the new one's addition.
func (d *Daemon) applyExports(p *exportPlan) error {
	var added, replacing []*server.Export
	for i, e := range p.add {
		if d.statics[e.Name] {
			replacing = append(replacing, e)
			continue
		}
		if err := d.reg.Add(e); err != nil {
			for _, a := range added {
				if x, _, err := d.reg.Remove(a.Name); err == nil {
					x.DrainClients() // the backend closes with the last client
				}
			}
			for _, rest := range p.add[i:] {
				rest.Backend.Close()
			}
			for _, r := range replacing {
				r.Backend.Close()
			}
			return err
		}
		added = append(added, e)
	}
	for _, name := range p.withdraw {
		if e, _, err := d.reg.Remove(name); err == nil {
			e.DrainClients() // the backend closes with the last client
			d.log.Info("export withdrawn; its clients are drained", zap.String("export", name))
		}
		delete(d.statics, name)
	}
	for _, e := range replacing {
		if err := d.reg.Add(e); err != nil {
			e.Backend.Close()
			d.log.Error("export not replaced: its old file or device is withdrawn, and a volume export took its name",
				zap.String("export", e.Name), zap.String("path", e.Description), zap.Error(err))
			continue
		}
		added = append(added, e)
	}
	for _, e := range added {
		d.statics[e.Name] = true
		d.log.Info("export", zap.String("name", e.Name), zap.String("path", e.Description),
			zap.Int64("size", e.Backend.Size()), zap.Bool("readonly", e.ReadOnly))
	}
	for name, a := range p.keep {
		d.setAccess(name, a)
	}
	d.absent = p.absent
	for _, a := range p.absent {
		d.log.Error("export not served: its file or device cannot be opened; a reload tries again",
			zap.String("export", a.spec.Name), zap.String("path", a.spec.Path), zap.Error(a.err))
	}
	return nil
}

// setAccess gives the static export called name access a. lvnbd recover may
// replace the export meanwhile with one that copies the access of the one it
// replaces (under the registry's lock): setting it again on whatever the
// registry holds until that stays the same leaves a on the export served,
// whichever access the recovery copied.
func (d *Daemon) setAccess(name string, a server.Access) {
	var last *server.Export
	for {
		e, ok := d.reg.Lookup(name)
		if !ok || e.Name != name || e == last {
			return
		}
		e.SetAccess(a)
		last = e
	}
}

// static returns the static export called name.
func (d *Daemon) static(name string) (*server.Export, bool) {
	if !d.statics[name] {
		return nil, false
	}
	return d.reg.Lookup(name)
}

func sameSpec(e *server.Export, spec server.ExportSpec) bool {
	return e.Description == spec.Path && e.ReadOnly == spec.ReadOnly
}

func (d *Daemon) closeStatics() {
	for name := range d.statics {
		if _, closed, err := d.reg.Remove(name); err == nil {
			<-closed
		}
	}
}
