package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/client/pair"
	"github.com/lvnbd/lvnbd/config"
	"github.com/lvnbd/lvnbd/internal/systemd"
)

// pairSpecs converts client.toml's pairs for the supervisor.
func pairSpecs(c *config.ClientConfig) []pair.Spec {
	specs := make([]pair.Spec, len(c.Pairs))
	for i, p := range c.Pairs {
		specs[i] = pair.Spec{Name: p.Name, URIs: [2]string{p.A, p.B}, Connections: p.Connections,
			Timeout: p.Timeout, DeadTimeout: p.DeadTimeout, XenDomain: p.XenDomain, Vdevs: p.Vdevs}
	}
	return specs
}

func newClientCmd(host *hostDeps) *cobra.Command {
	if host == nil {
		host = realHost()
	}
	var (
		configPath     string
		ctlPath        string
		linkDir        string
		pollInterval   time.Duration
		healthInterval time.Duration
		logLevel       string
		logFormat      string
		metricsListen  string
	)
	cmd := &cobra.Command{
		Use:   "client",
		Short: "Keep the pairs of client.toml attached (the dom0 daemon)",
		Long: `Attach both legs of every [[pair]] of client.toml as kernel NBD devices and
keep them attached until SIGINT or SIGTERM:

  - each leg gets a stable name, LINK-DIR/PAIR/a and LINK-DIR/PAIR/b, a
    symlink to its /dev/nbdN that stays right across reconnects;
  - when the kernel reports a dead connection, the export is dialed again
    with backoff (1 s doubling to 30 s) and the same device gets the new
    connections: the guest's disk never goes away;
  - every --poll-interval the exports' sizes are read, and a device whose
    volume grew grows too, in place;
  - devices attached by an earlier run (the same URI as backend) are
    adopted, not attached twice.

Stopping leaves every device attached: the guests keep their disks, and the
next start adopts them. 'lvnbd pair down' detaches a pair. SIGHUP reloads
client.toml: new pairs are attached, pairs taken down stay down, devices of
pairs removed from the file stay attached, without their links (detach them
with lvnbd detach).

'lvnbd pair status', 'up' and 'down' reach the daemon on --control, a
root-only Unix socket. Under systemd (Type=notify) it reports READY=1 once
every leg has been attached or found unreachable.`,
		Example: `  lvnbd client
  lvnbd client --config /etc/lvnbd/client.toml --poll-interval 30s`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// First: SIGHUP's default action would end the daemon.
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			log, err := newLogger(logLevel, logFormat)
			if err != nil {
				return err
			}
			defer log.Sync()
			cfg, err := config.LoadClient(configPath)
			if err != nil {
				return err
			}
			ln, err := pair.Listen(ctlPath)
			if err != nil {
				return err
			}
			ctx := cmd.Context()

			// The socket outlives reloads; each reload has its supervisor.
			var current atomic.Pointer[http.Handler]
			unavailable := http.Handler(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				http.Error(w, `{"error":"lvnbd client is starting"}`, http.StatusServiceUnavailable)
			}))
			current.Store(&unavailable)
			reloading := http.Handler(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				http.Error(w, `{"error":"lvnbd client is reloading its configuration: try again"}`, http.StatusServiceUnavailable)
			}))
			apiDone := make(chan error, 1)
			apiCtx, stopAPI := context.WithCancel(context.WithoutCancel(ctx))
			go func() {
				apiDone <- pair.Serve(apiCtx, ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					(*current.Load()).ServeHTTP(w, r)
				}))
			}()
			defer func() {
				stopAPI()
				if err := <-apiDone; err != nil {
					log.Error("control socket", zap.Error(err))
				}
			}()

			// Metrics read whichever supervisor runs now (reloads replace it).
			var running atomic.Pointer[pair.Supervisor]
			if metricsListen != "" {
				stopMetrics, err := serveClientMetrics(ctx, metricsListen, func() []pair.PairStatus {
					if sup := running.Load(); sup != nil {
						return sup.Status()
					}
					return nil
				}, log)
				if err != nil {
					return err
				}
				defer stopMetrics()
			}

			if udevRuleMissing("") {
				log.Warn("udev runs without lvnbd's rule: it may assemble the guests' md mirrors from the legs "+
					"in this dom0, hold the devices, and let its LVM write to the guests' volumes; install "+
					udevRule+" (the lvnbd package and packaging/install.sh do) in /etc/udev/rules.d",
					zap.Strings("looked in", udevRuleDirs))
			}
			var down []string
			for {
				sup, failed, stop, err := startSupervisor(ctx, host, &pair.Config{Pairs: pairSpecs(cfg), Logger: log,
					LinkDir: linkDir, PollInterval: pollInterval, HealthInterval: healthInterval, Down: down,
					IDs: host.ids(), Refusals: host.refusals, Holders: host.holders, Users: func(index int) ([]string, error) {
						// The leg's own link is no user: "" leaves the pairs' links out.
						return host.users(index, "")
					}})
				if err != nil {
					return err
				}
				h := pair.Handler(sup, log)
				current.Store(&h)
				running.Store(sup)
				log.Info("supervising", zap.Int("pairs", len(cfg.Pairs)), zap.String("config", configPath),
					zap.String("control", ctlPath))
				go func() {
					if sup.Ready(ctx) == nil {
						if err := systemd.Notify("READY=1"); err != nil {
							log.Warn("systemd", zap.Error(err))
						}
					}
				}()
				reloaded := false
				for !reloaded {
					select {
					case err := <-failed:
						stop()
						return err
					case <-ctx.Done():
						_ = systemd.Notify("STOPPING=1")
						log.Info("stopping: the devices stay attached")
						return stop()
					case <-hup:
						_ = systemd.Notify("RELOADING=1")
						next, err := config.LoadClient(configPath)
						if err != nil {
							log.Error("reload: keeping the running configuration", zap.Error(err))
							_ = systemd.Notify("READY=1")
							continue
						}
						// Stopped first: a pair down or up that
						// lands meanwhile is then either in the
						// status read below or refused, never lost.
						current.Store(&reloading)
						if err := stop(); err != nil {
							return err
						}
						down = downPairs(sup.Status(), next)
						for _, name := range removedPairs(sup.Status(), next) {
							// Its devices stay attached, for the admin
							// to detach (lvnbd detach refuses a device a
							// pair's link leads to).
							if err := pair.RemovePairLinks(linkDir, name); err != nil {
								log.Warn("removing the links of a pair no longer configured", zap.String("pair", name), zap.Error(err))
							} else {
								log.Info("pair no longer configured: its links removed, its devices left attached (lvnbd detach them)", zap.String("pair", name))
							}
						}
						log.Info("reloading", zap.Strings("down", down))
						cfg, reloaded = next, true
					}
				}
			}
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", config.DefaultClientPath, "the pairs to keep attached (client.toml)")
	f.StringVar(&ctlPath, "control", pair.DefaultSocket, "control socket for lvnbd pair")
	f.StringVar(&linkDir, "link-dir", pair.DefaultLinkDir, "where the stable names PAIR/a and PAIR/b go")
	f.DurationVar(&pollInterval, "poll-interval", pair.DefaultPollInterval, "how often to check the exports' sizes, to grow devices")
	f.DurationVar(&healthInterval, "health-interval", pair.DefaultHealthInterval, "how often to check that every device is still attached")
	f.StringVar(&metricsListen, "metrics-listen", "", "HOST:PORT of a Prometheus endpoint, /metrics: each leg's state, size and reconnects (empty: off)")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	f.StringVar(&logFormat, "log-format", "console", "log format: console or json")
	return cmd
}

// startSupervisor runs a supervisor of cfg on its own connection to the
// kernel (a reload must not inherit one an interrupted request left
// unusable). failed delivers the error if it stops by itself; stop stops
// it, leaving the devices attached.
func startSupervisor(ctx context.Context, host *hostDeps, cfg *pair.Config) (_ *pair.Supervisor, failed <-chan error, stop func() error, _ error) {
	k, err := host.openKernel(ctx)
	if err != nil {
		return nil, nil, nil, err
	}
	cfg.Kernel = k
	sup, err := pair.New(cfg)
	if err != nil {
		k.Close()
		return nil, nil, nil, err
	}
	// Run ends when stop cancels it, after Close, not with ctx: on SIGTERM
	// a pair up or down under way gets its grace with the legs still
	// served.
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan error, 1)
	exited := make(chan error, 1)
	go func() {
		err := sup.Run(sctx)
		if sctx.Err() == nil {
			exited <- err
		}
		done <- err
	}()
	stop = func() error {
		sup.Close() // lets a pair up or down under way end first
		cancel()
		err := <-done
		return errors.Join(err, k.Close())
	}
	return sup, exited, stop, nil
}

// downPairs names the legs (PAIR/LEG) that are down now, of pairs still in
// next.
func downPairs(now []pair.PairStatus, next *config.ClientConfig) []string {
	var out []string
	for _, p := range now {
		if p.Up || !slices.ContainsFunc(next.Pairs, func(q config.Pair) bool { return q.Name == p.Name }) {
			continue
		}
		for _, l := range p.Legs {
			if l.State == pair.StateDown {
				out = append(out, p.Name+"/"+l.Leg)
			}
		}
	}
	return out
}

// removedPairs are the pairs of now that next no longer configures.
func removedPairs(now []pair.PairStatus, next *config.ClientConfig) []string {
	var out []string
	for _, p := range now {
		if !slices.ContainsFunc(next.Pairs, func(q config.Pair) bool { return q.Name == p.Name }) {
			out = append(out, p.Name)
		}
	}
	return out
}

// serveClientMetrics answers /metrics on addr with the legs' states until
// stop is called or ctx is done.
func serveClientMetrics(ctx context.Context, addr string, status func() []pair.PairStatus, log *zap.Logger) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-listen %s: %w", addr, err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(pair.NewCollector(status), prometheus.NewGoCollector(),
		prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics endpoint", zap.Error(err))
		}
	}()
	log.Info("metrics", zap.String("url", "http://"+ln.Addr().String()+"/metrics"))
	after := context.AfterFunc(ctx, func() { srv.Close() })
	return func() { after(); srv.Close(); <-done }, nil
}
