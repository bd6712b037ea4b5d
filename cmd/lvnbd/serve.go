package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/control"
	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/volume"
	_ "github.com/lvnbd/lvnbd/volume/file" // the file:// driver
	_ "github.com/lvnbd/lvnbd/volume/lvm"  // the lvm:// driver
)

func rescanVolumes(ctx context.Context, vols *server.Volumes, every time.Duration, log *zap.Logger) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := vols.Sync(ctx); err != nil && ctx.Err() == nil {
				log.Warn("re-reading volumes", zap.Error(err))
			}
		}
	}
}

// accessFlags builds the access rules and TLS configuration from flags.
func accessFlags(cert, key, ca, mode string, allow []string) (server.Access, *tls.Config, error) {
	var a server.Access
	var err error
	if a.TLS, err = server.ParseTLSMode(mode); err != nil {
		return a, nil, fmt.Errorf("--tls: %w", err)
	}
	if a.Allow, err = server.ParseAllow(allow); err != nil {
		return a, nil, fmt.Errorf("--allow: %w", err)
	}
	if (cert == "") != (key == "") {
		return a, nil, errors.New("--tls-cert and --tls-key go together")
	}
	if cert == "" {
		if a.TLS == server.TLSRequired || ca != "" {
			return a, nil, errors.New("TLS needs a certificate: give --tls-cert and --tls-key")
		}
		return a, nil, nil
	}
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		return a, nil, fmt.Errorf("loading the TLS certificate: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	if ca != "" {
		pem, err := os.ReadFile(ca)
		if err != nil {
			return a, nil, fmt.Errorf("--tls-ca: %w", err)
		}
		cfg.ClientCAs = x509.NewCertPool()
		if !cfg.ClientCAs.AppendCertsFromPEM(pem) {
			return a, nil, fmt.Errorf("--tls-ca %s: no PEM certificates in it", ca)
		}
		cfg.ClientAuth = tls.VerifyClientCertIfGiven
	}
	return a, cfg, nil
}

func newServeCmd() *cobra.Command {
	var (
		listens   []string
		exports   []string
		logLevel  string
		logFormat string
		volumes   string
		ctlPath   string
		rescan    time.Duration
		tlsCert   string
		tlsKey    string
		tlsCA     string
		tlsMode   string
		allow     []string
		allowName []string
		fenceFile string
		maxConns  int
		maxPer    int
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the NBD server",
		Long: `Run the NBD server until SIGINT or SIGTERM, then drain: stop accepting,
answer every request already received, flush every export to stable storage
and exit 0.

With --volumes, every volume of the driver is an export named after it, and
every snapshot a read-only export VOLUME@SNAPSHOT; they appear, disappear and
change size as lvnbd volume and lvnbd snapshot change them, without a
restart. With no --export and no --volumes, the volumes are sparse files in
./lvnbd-data (--volumes file://./lvnbd-data).

Each --export is NAME=PATH or NAME=PATH:ro, where PATH is a regular file or a
block device. Clients connect to nbd://HOST:PORT/NAME. Several --listen
addresses may be given.

The control socket (--control, root only) is how lvnbd volume, lvnbd snapshot,
lvnbd status and lvnbd fence reach the running server.

TLS: with --tls-cert and --tls-key clients may start TLS (nbds:// URIs);
--tls required makes every export TLS-only; with --tls-ca client certificates
are verified against that CA. --allow limits every export to client
addresses or CIDRs.`,
		Example: `  lvnbd serve
  lvnbd serve --volumes lvm://vg0 --listen tcp://10.0.0.1:10809
  lvnbd serve --export vm1=/dev/vg0/vm1
  lvnbd serve --listen tcp://10.0.0.1:10809 --listen unix:///run/lvnbd.sock \
      --export vm1=/dev/vg0/vm1 --export golden=/srv/golden.img:ro`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(logLevel, logFormat)
			if err != nil {
				return err
			}
			defer log.Sync()
			if len(exports) == 0 && volumes == "" {
				volumes = volume.DefaultURL
			}
			access, tlsConfig, err := accessFlags(tlsCert, tlsKey, tlsCA, tlsMode, allow)
			if err != nil {
				return err
			}
			if len(allowName) > 0 && tlsCA == "" {
				return errors.New("--allow-name needs --tls-ca: client certificate names are only trusted once verified")
			}
			access.AllowNames = allowName
			fences, err := server.LoadFences(fenceFile)
			if err != nil {
				return err
			}
			reg := server.NewRegistry()
			for _, spec := range exports {
				s, err := server.ParseExportSpec(spec)
				if err != nil {
					return err
				}
				e, err := server.OpenExport(s)
				if err != nil {
					return err
				}
				e.Access = access
				defer e.Backend.Close()
				if err := reg.Add(e); err != nil {
					return err
				}
				log.Info("export", zap.String("name", e.Name), zap.String("path", s.Path),
					zap.Int64("size", e.Backend.Size()), zap.Bool("readonly", e.ReadOnly))
			}
			var vols *server.Volumes
			if volumes != "" {
				drv, err := volume.Open(volumes)
				if err != nil {
					return err
				}
				vols = server.NewVolumes(drv, reg, log)
				vols.Access = access
				if err := vols.Sync(cmd.Context()); err != nil {
					return err
				}
				log.Info("exporting volumes", zap.String("driver", drv.String()), zap.Int("exports", len(reg.List())))
			}
			var lns []net.Listener
			for _, l := range listens {
				addr, err := server.ParseListenURL(l)
				if err != nil {
					return err
				}
				ln, err := server.Listen(addr)
				if err != nil {
					for _, open := range lns {
						open.Close()
					}
					return err
				}
				lns = append(lns, ln)
			}
			srv := server.New(&server.Config{Exports: reg, Logger: log, TLS: tlsConfig, Fences: fences,
				MaxConnections: maxConns, MaxConnectionsPerClient: maxPer})
			ctx, cancel := context.WithCancel(cmd.Context())
			defer cancel()
			var background sync.WaitGroup
			defer background.Wait()
			if ctlPath != "" {
				ln, err := control.Listen(ctlPath)
				if err != nil {
					log.Warn("no control socket: lvnbd volume and snapshot commands will change volumes directly, without quiescing",
						zap.Error(err))
				} else {
					log.Info("control socket", zap.String("path", ctlPath))
					background.Add(1)
					go func() {
						defer background.Done()
						if err := control.Serve(ctx, ln, control.Handler(srv, vols, log)); err != nil {
							log.Error("control socket failed", zap.Error(err))
						}
					}()
				}
			}
			if vols != nil && rescan > 0 {
				// Catches changes made with lvm commands directly.
				background.Add(1)
				go func() {
					defer background.Done()
					rescanVolumes(ctx, vols, rescan, log)
				}()
			}
			if err := srv.Serve(ctx, lns...); err != nil {
				return fmt.Errorf("server: %w", err)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&listens, "listen", []string{server.DefaultListen}, "listen URL: tcp://HOST:PORT or unix:///PATH (repeatable)")
	f.StringArrayVar(&exports, "export", nil, "export NAME=PATH[:ro] of a file or block device (repeatable)")
	f.StringVar(&volumes, "volumes", "", "export the volumes of a driver: file:///DIR or lvm://VG (default file://./lvnbd-data when no --export is given)")
	f.StringVar(&ctlPath, "control", control.DefaultPath, "control socket path (empty disables it)")
	f.DurationVar(&rescan, "rescan", 10*time.Second, "how often to re-read the volumes for changes made outside lvnbd (0 disables)")
	f.StringVar(&tlsCert, "tls-cert", "", "TLS certificate (PEM) for nbds:// clients")
	f.StringVar(&tlsKey, "tls-key", "", "TLS private key (PEM)")
	f.StringVar(&tlsCA, "tls-ca", "", "CA (PEM) to verify client certificates against")
	f.StringVar(&tlsMode, "tls", "optional", "TLS for the exports: off, optional or required")
	f.StringArrayVar(&allow, "allow", nil, "client address or CIDR allowed to use the exports (repeatable; default everyone)")
	f.StringArrayVar(&allowName, "allow-name", nil, "client certificate name (CN or DNS SAN) allowed to use the exports (repeatable; needs --tls-ca)")
	f.StringVar(&fenceFile, "fence-file", "/var/lib/lvnbd/fences.json", "where fences are kept across restarts")
	f.IntVar(&maxConns, "max-connections", server.DefaultMaxConnections, "connections served at once")
	f.IntVar(&maxPer, "max-connections-per-client", server.DefaultMaxPerClient, "connections from one client address")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	f.StringVar(&logFormat, "log-format", "console", "log format: console or json")
	return cmd
}
