package main

import (
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/lvnbd/lvnbd/config"
	"github.com/lvnbd/lvnbd/control"
	"github.com/lvnbd/lvnbd/server/daemon"
	"github.com/lvnbd/lvnbd/volume"
)

func newServeCmd() *cobra.Command {
	var (
		configPath  string
		checkConfig bool
	)
	def := config.Default()
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the NBD server",
		Long: `Run the NBD server until SIGINT or SIGTERM, then drain: stop accepting,
answer every request already received, flush every export to stable storage
and exit 0. SIGHUP reloads the configuration file.

With --volumes, every volume of the driver is an export named after it, and
every snapshot a read-only export VOLUME@SNAPSHOT; they appear, disappear and
change size as lvnbd volume and lvnbd snapshot change them, without a
restart. With no --export and no --volumes, the volumes are sparse files in
./lvnbd-data (--volumes file://./lvnbd-data).

Each --export is NAME=PATH or NAME=PATH:ro, where PATH is a regular file or a
block device. Clients connect to nbd://HOST:PORT/NAME. Several --listen
addresses may be given; sockets passed by systemd (socket activation) are
used instead.

--config FILE (e.g. /etc/lvnbd/server.toml) holds every setting these flags
have; flags given on the command line override it; unknown keys are errors.
--check-config validates it and prints the effective configuration. On
SIGHUP the file is read again: exports added, removed (their clients are
drained) or changed, access rules, TLS certificates and the log level take
effect without dropping the connections of unchanged exports; a bad file is
rejected with a log line and the running configuration stays.

The control socket (--control, root only) is how lvnbd volume, lvnbd snapshot,
lvnbd status and lvnbd fence reach the running server.

A crash of this box under a running server (power loss, panic, reset) loses
the writes acknowledged since the last flush. The server records with its
volumes that it serves them (tags lvnbd-run-* and lvnbd-epoch-* on the volume
group; lvnbd.json of file volumes); the next start after such a crash logs it
and exports every volume under a new ID, which dom0s refuse until each half is
added to its guest's mirror in full. A server killed while the box stays up
changes nothing.

A volume shrunk behind the server (lvreduce, truncate) has lost its tail: the
server cuts its clients and counts a rollback, so it is exported again under
another ID, which dom0s refuse also once it is grown back. Besides --rescan
and each handshake, the kernel's device events tell the server at once of
every resize of an LV it exports.

TLS: with --tls-cert and --tls-key clients may start TLS (nbds:// URIs);
--tls required makes every export TLS-only; with --tls-ca client certificates
are verified against that CA, and --tls-crl refuses those its CRL revokes.
--allow limits every export to client addresses or CIDRs, --allow-name to
client certificate names.`,
		Example: `  lvnbd serve
  lvnbd serve --volumes lvm://vg0 --listen tcp://10.0.0.1:10809
  lvnbd serve --config /etc/lvnbd/server.toml
  lvnbd serve --config /etc/lvnbd/server.toml --check-config
  lvnbd serve --listen tcp://10.0.0.1:10809 --listen unix:///run/lvnbd.sock \
      --export vm1=/dev/vg0/vm1 --export golden=/srv/golden.img:ro`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			load := func() (*config.Config, error) {
				cfg := config.Default()
				if configPath != "" {
					var err error
					if cfg, err = config.Load(configPath); err != nil {
						return nil, err
					}
				}
				if err := cfg.ApplyFlags(cmd.Flags()); err != nil {
					return nil, err
				}
				return cfg.Effective(), nil
			}
			cfg, err := load()
			if err != nil {
				return err
			}
			if checkConfig {
				return cfg.WriteTOML(cmd.OutOrStdout())
			}
			log, level, err := newLeveledLogger(cfg.Log.Level, cfg.Log.Format)
			if err != nil {
				return err
			}
			defer log.Sync()
			// SIGHUP is a reload, not the end (its default action).
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			reload := make(chan struct{}, 1)
			go func() {
				for range hup {
					select {
					case reload <- struct{}{}:
					default: // one pending reload reads the newest file anyway
					}
				}
			}()
			return daemon.Run(cmd.Context(), daemon.Options{Load: load, Log: log, Level: level, Reload: reload})
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", "", "configuration file, such as /etc/lvnbd/server.toml (flags override it)")
	f.BoolVar(&checkConfig, "check-config", false, "validate the configuration, print the effective one, and exit")
	f.StringArray("listen", def.Server.Listen, "listen URL: tcp://HOST:PORT or unix:///PATH (repeatable)")
	f.StringArray("export", nil, "export NAME=PATH[:ro] of a file or block device (repeatable)")
	f.String("volumes", "", "export the volumes of a driver: file:///DIR or lvm://VG (default "+volume.DefaultURL+" when no --export is given)")
	f.String("control", control.DefaultPath, "control socket path (empty disables it)")
	f.Duration("rescan", def.Server.Rescan, "how often to re-read the volumes for changes made outside lvnbd (0 disables)")
	f.Duration("handshake-timeout", def.Server.HandshakeTimeout, "a client must finish negotiating within this")
	f.Duration("drain-timeout", def.Server.DrainTimeout, "at shutdown, how long in-flight requests may take")
	f.Int("max-connections", def.Server.MaxConnections, "connections served at once")
	f.Int("max-connections-per-client", def.Server.MaxConnectionsPerClient, "connections from one client address")
	f.Int("max-inflight-requests", def.Server.MaxInflightRequests, "requests outstanding per connection")
	f.String("max-inflight-bytes", "128MiB", "payload bytes held per connection (at least 32MiB)")
	f.String("fence-file", def.Server.FenceFile, "where fences are kept across restarts (empty: in memory only)")
	f.String("failure-file", def.Server.FailureFile, "where exports whose write-back failed are recorded, to stay failed across restarts (empty: in memory only)")
	f.String("tls-cert", "", "TLS certificate (PEM) for nbds:// clients")
	f.String("tls-key", "", "TLS private key (PEM)")
	f.String("tls-ca", "", "CA (PEM) to verify client certificates against")
	f.String("tls-crl", "", "CRL (PEM) of client certificates to refuse, for exports with --allow-name (read again on reload)")
	f.String("tls", def.TLS.Default, "TLS for the exports: off, optional or required")
	f.StringArray("allow", nil, "client address or CIDR allowed to use the exports (repeatable; default everyone)")
	f.StringArray("allow-name", nil, "client certificate name (CN or DNS SAN) allowed to use the exports (repeatable; needs --tls-ca)")
	f.String("metrics-listen", "", "HOST:PORT of a Prometheus endpoint, /metrics (empty: off)")
	f.String("log-level", def.Log.Level, "log level: debug, info, warn, error")
	f.String("log-format", def.Log.Format, "log format: console or json")
	return cmd
}
