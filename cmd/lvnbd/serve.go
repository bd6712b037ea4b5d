package main

import (
	"errors"
	"fmt"
	"net"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/server"
)

func newServeCmd() *cobra.Command {
	var (
		listens   []string
		exports   []string
		logLevel  string
		logFormat string
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the NBD server",
		Long: `Run the NBD server until SIGINT or SIGTERM, then drain: stop accepting,
answer every request already received, flush every export to stable storage
and exit 0.

Each --export is NAME=PATH or NAME=PATH:ro, where PATH is a regular file or a
block device (an LVM logical volume, say). Clients connect to
nbd://HOST:PORT/NAME. Several --listen addresses may be given.`,
		Example: `  lvnbd serve --export vm1=/dev/vg0/vm1
  lvnbd serve --listen tcp://10.0.0.1:10809 --listen unix:///run/lvnbd.sock \
      --export vm1=/dev/vg0/vm1 --export golden=/srv/golden.img:ro`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(logLevel, logFormat)
			if err != nil {
				return err
			}
			defer log.Sync()
			if len(exports) == 0 {
				return errors.New("no exports: give at least one --export NAME=PATH (see lvnbd serve --help)")
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
				defer e.Backend.Close()
				if err := reg.Add(e); err != nil {
					return err
				}
				log.Info("export", zap.String("name", e.Name), zap.String("path", s.Path),
					zap.Int64("size", e.Backend.Size()), zap.Bool("readonly", e.ReadOnly))
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
			srv := server.New(&server.Config{Exports: reg, Logger: log})
			if err := srv.Serve(cmd.Context(), lns...); err != nil {
				return fmt.Errorf("server: %w", err)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&listens, "listen", []string{server.DefaultListen}, "listen URL: tcp://HOST:PORT or unix:///PATH (repeatable)")
	f.StringArrayVar(&exports, "export", nil, "export NAME=PATH[:ro] of a file or block device (repeatable)")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	f.StringVar(&logFormat, "log-format", "console", "log format: console or json")
	return cmd
}
