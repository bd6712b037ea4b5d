package main

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/lvnbd/lvnbd/control"
)

func newStatusCmd() *cobra.Command {
	var (
		ctlPath string
		asJSON  bool
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show a running server's exports and connected clients",
		Long: `Show what the lvnbd server on this box exports and who is connected, with
byte counts per connection. An export whose storage failed to write back data
shows as FAILED, with why: every request to it fails, also after a restart,
until lvnbd recover (see its --help for what to do first). Failures recorded
for exports not served now are listed too. Once the box went down under a
running server, the volumes' crash epoch is shown ("epoch" in --json): every
volume's ID ends with it (see lvnbd serve --help). A volume that shrank behind
the server (lvreduce) is not exported until the server has counted that as a
rollback, which gives it another ID: one still waiting is listed
("shrinks_pending" in --json), and the server's log says why. It asks the
server through its control socket (root only).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := control.NewClient(ctlPath).Status(cmd.Context())
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			switch {
			case st.Driver != "" && st.Epoch != "":
				fmt.Fprintf(out, "volumes: %s, crash epoch %s: this box went down under a running server, so the "+
					"volumes' IDs end in --c%s, and dom0s refuse the halves they attached before\n\n", st.Driver, st.Epoch, st.Epoch)
			case st.Driver != "":
				fmt.Fprintf(out, "volumes: %s\n\n", st.Driver)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "EXPORT\tSIZE\tMODE\tCLIENTS")
			for _, e := range st.Exports {
				mode := "rw"
				if e.ReadOnly {
					mode = "ro"
				}
				if e.Failed != "" {
					mode = "FAILED"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\n", e.Name, humanize.IBytes(uint64(e.Size)), mode, len(e.Clients))
			}
			tw.Flush()
			served := map[string]bool{}
			for _, e := range st.Exports {
				served[e.Name] = true
				if e.Failed != "" {
					fmt.Fprintf(out, "  %s: FAILED: %s\n", e.Name, e.Failed)
				}
			}
			for _, f := range st.Failures {
				if !served[f.Export] {
					fmt.Fprintf(out, "  %s (not served now): FAILED since %s: %s; lvnbd recover clears this record\n",
						f.Export, f.Since.Format(time.RFC3339), f.Error)
				}
			}
			for _, p := range st.Shrinks {
				fmt.Fprintf(out, "  %s (not served now): shrank behind the server; not exported until its rollback is "+
					"counted, which changes its ID from %s (see the server's log for why it is not yet)\n", p.Volume, p.ID)
			}
			for _, e := range st.Exports {
				for _, c := range e.Clients {
					fmt.Fprintf(out, "  %s: connection %d from %s since %s, read %s, written %s\n", e.Name, c.ID, c.Peer,
						c.Since.Format(time.RFC3339), humanize.IBytes(uint64(c.ReadBytes)), humanize.IBytes(uint64(c.WrittenBytes)))
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&ctlPath, "control", control.DefaultPath, "the server's control socket")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}
