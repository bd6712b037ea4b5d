package main

import (
	"strings"

	"github.com/spf13/cobra"

	"github.com/lvnbd/lvnbd/fenceagent"
)

func newFenceAgentCmd() *cobra.Command {
	var a fenceagent.Args
	var servers string
	cmd := &cobra.Command{
		Use:   "fence-agent",
		Short: "Pacemaker fence agent (fence_lvnbd): fence a host off the storage boxes",
		Long: `A fence agent speaking the fence-agents protocol, for Pacemaker's stonith.
With no flags it reads key=value lines on standard input, as stonithd passes
them: action=off|on|reboot|status|monitor|list|metadata, plug=CLIENT (the
host's storage-network address or certificate name), servers=A,B (the storage
boxes, reached with ssh as root; empty means this box), export=NAME,
control=PATH. Exit status: 0 success (status: not fenced on every box),
1 error (also a plug that can match no client), 2 status: fenced on every
box. A certificate name as plug needs tls.ca on every box (lvnbd fence).

Install it as fence_lvnbd:  ln -s /usr/bin/lvnbd /usr/sbin/fence_lvnbd
is not enough (the name selects nothing); use a two-line wrapper script:
  #!/bin/sh
  exec /usr/bin/lvnbd fence-agent "$@"`,
		Example: `  printf 'action=off\nplug=10.0.0.21\nservers=store-a,store-b\n' | lvnbd fence-agent
  lvnbd fence-agent --action status --plug 10.0.0.21`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			args := a
			if cmd.Flags().NFlag() == 0 {
				parsed, err := fenceagent.ParseArgs(cmd.InOrStdin())
				if err != nil {
					return err
				}
				args = parsed
			} else if servers != "" {
				args.Servers = strings.Split(servers, ",")
			}
			code := fenceagent.Run(cmd.Context(), args, fenceagent.Boxes(args), cmd.OutOrStdout(), cmd.ErrOrStderr())
			if code != 0 {
				return exitCode(code)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVarP(&a.Action, "action", "o", "reboot", "off, on, reboot, status, monitor, list or metadata")
	f.StringVarP(&a.Plug, "plug", "n", "", "the host to fence: address, CIDR or certificate name")
	f.StringVar(&servers, "servers", "", "storage boxes (comma-separated) reached with ssh; empty means this box")
	f.StringVar(&a.Export, "export", "", "fence off this export only")
	f.StringVar(&a.Control, "control", "/run/lvnbd/control.sock", "control socket path on each box")
	return cmd
}
