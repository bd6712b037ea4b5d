package main

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lvnbd/lvnbd/control"
	"github.com/lvnbd/lvnbd/server"
)

func newFenceCmd() *cobra.Command {
	var (
		ctlPath string
		export  string
		list    bool
		asJSON  bool
	)
	cmd := &cobra.Command{
		Use:   "fence CLIENT",
		Short: "Cut a client off this storage box's exports until unfenced",
		Long: `Fence a client (an address, a CIDR or a client certificate name) off one
export (--export) or all of them: its connections are cut at once, new ones
are refused, and when the command returns none of its writes will reach the
storage any more. Fences are saved and survive a server restart; lift one
with lvnbd unfence. --list shows the fences.

A certificate name works only on a server that verifies client certificates
(tls.ca), and covers the clients that show that name. A host that can connect
without its certificate (where TLS is optional) must be fenced by its
addresses too.

If the fence cannot be saved, or writes in flight do not finish in time,
the command fails and says so; the fence is in force all the same.

For Pacemaker, lvnbd fence-agent speaks the fence-agents protocol.`,
		Example: `  lvnbd fence 10.0.0.21
  lvnbd fence 10.0.0.21 --export vm1
  lvnbd fence --list`,
		Args: func(cmd *cobra.Command, args []string) error {
			if list {
				if len(args) > 0 {
					return fmt.Errorf("--list takes no CLIENT (got %q): lvnbd fence --list, or lvnbd fence CLIENT", args[0])
				}
				return nil
			}
			if asJSON {
				return fmt.Errorf("--json goes with --list: lvnbd fence --list --json")
			}
			return cobra.ExactArgs(1)(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			c := control.NewClient(ctlPath)
			out := cmd.OutOrStdout()
			if list {
				fences, err := c.Fences(cmd.Context())
				if err != nil {
					return err
				}
				if asJSON {
					if fences == nil {
						fences = []server.Fence{} // [], not null, for scripts
					}
					return json.NewEncoder(out).Encode(fences)
				}
				tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "CLIENT\tEXPORT\tSINCE")
				for _, f := range fences {
					e := f.Export
					if e == "" {
						e = "(all)"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\n", f.Client, e, f.Since.Format(time.RFC3339))
				}
				return tw.Flush()
			}
			cut, err := c.Fence(cmd.Context(), args[0], export)
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "fenced %s off %s; %d connection(s) cut\n", args[0], server.FenceScope(export), cut)
			if export != "" {
				// A mistyped name fences nothing the host uses:
				// say so, though a fence for an export to come is
				// kept all the same.
				if st, err := c.Status(cmd.Context()); err == nil &&
					!slices.ContainsFunc(st.Exports, func(e server.ExportStatus) bool { return e.Name == export }) {
					fmt.Fprintf(cmd.ErrOrStderr(), "lvnbd: warning: no export %q is served now: the fence applies once one is; "+
						"check the name (lvnbd status)\n", export)
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&ctlPath, "control", control.DefaultPath, "the server's control socket")
	cmd.Flags().StringVar(&export, "export", "", "fence off this export only")
	cmd.Flags().BoolVar(&list, "list", false, "list the fences")
	cmd.Flags().BoolVar(&asJSON, "json", false, "with --list, print JSON")
	return cmd
}

func newUnfenceCmd() *cobra.Command {
	var ctlPath, export string
	cmd := &cobra.Command{
		Use:   "unfence CLIENT",
		Short: "Lift a fence set with lvnbd fence",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := control.NewClient(ctlPath)
			err := c.Unfence(cmd.Context(), args[0], export)
			// What still fences the client, so that "unfenced" is not
			// taken for "free": a fence of all exports and fences of
			// single ones are lifted one by one.
			var left []string
			if fences, ferr := c.Fences(cmd.Context()); ferr == nil {
				for _, f := range fences {
					if server.SameFenceClient(f.Client, args[0]) && f.Export != export {
						left = append(left, server.FenceScope(f.Export))
					}
				}
			}
			still := ""
			if len(left) > 0 {
				still = fmt.Sprintf("; still fenced off %s (lvnbd unfence %s [--export NAME], as fenced)", strings.Join(left, ", "), args[0])
			}
			if err != nil {
				return fmt.Errorf("%w%s", err, still)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "unfenced %s on %s%s\n", args[0], server.FenceScope(export), still)
			return nil
		},
	}
	cmd.Flags().StringVar(&ctlPath, "control", control.DefaultPath, "the server's control socket")
	cmd.Flags().StringVar(&export, "export", "", "the export the fence was for (as given to lvnbd fence)")
	return cmd
}
