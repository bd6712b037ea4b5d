package main

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/client/pair"
	"github.com/lvnbd/lvnbd/client/refusals"
)

// newPairRefusalsCmd makes lvnbd pair refusals; host nil is the real one,
// whose running daemon is asked over ctlPath.
func newPairRefusalsCmd(host *hostDeps, ctlPath *string) *cobra.Command {
	var (
		asJSON bool
		forget string
	)
	cmd := &cobra.Command{
		Use:   "refusals",
		Short: "List the legs refused as another volume; forget the refusal of a pair removed for good",
		Long: `List the legs this dom0 refused as not their device's volume (made anew,
rolled back, shrunk, or served by a storage box that went down), as
lvnbd client recorded them (/var/lib/lvnbd/refused-legs.json): the export,
the pair and leg, since when, which volume ID lifts the refusal by being
served again (none once the export shrank), and why. They outlive restarts
of the dom0; lvnbd pair down --leg forgets a leg's refusal when it is
replaced.

--forget URI forgets the refusal of an export that is no longer a leg of any
pair (a pair removed for good), so that a new pair may use the export. An
export still a leg of a pair in client.toml, or of the running daemon, is
refused: replace that leg as lvnbd pair down --help says. So is any export
while client.toml cannot be read or the running daemon does not answer.
Another spelling of the export (the host's case, the default port) finds
the same record.`,
		Example: `  lvnbd pair refusals
  lvnbd pair refusals --json
  lvnbd pair refusals --forget nbd://storage-a/vm9`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if host == nil {
				host = realHost()
				host.pairs = pair.NewClient(*ctlPath).Status
			}
			store := host.refusals
			if store == nil {
				store = refusals.Open("")
			}
			if forget != "" {
				if asJSON {
					return errors.New("--json is for the list; --forget prints one line")
				}
				return forgetRefusal(cmd, host, store, forget)
			}
			all, err := store.All()
			if err != nil {
				return err
			}
			list := refusalRows(all)
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), list)
			}
			writeRefusals(cmd.OutOrStdout(), list)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	cmd.Flags().StringVar(&forget, "forget", "", "forget the refusal of this export (`URI`), a leg of no pair any more")
	return cmd
}

// refusalRow is one refusal as listed (--json).
type refusalRow struct {
	Export  string    `json:"export"`
	Pair    string    `json:"pair"`
	Leg     string    `json:"leg"`
	Since   time.Time `json:"since"`
	Accepts string    `json:"accepts"` // "" once nothing lifts it
	Reason  string    `json:"reason"`
}

// refusalRows lists the refusals by pair, leg and export.
func refusalRows(all map[string]refusals.Refusal) []refusalRow {
	rows := []refusalRow{}
	for backend, r := range all {
		rows = append(rows, refusalRow{Export: backend, Pair: r.Pair, Leg: r.Leg, Since: r.Since, Accepts: r.Accepts, Reason: r.Reason})
	}
	slices.SortFunc(rows, func(a, b refusalRow) int {
		return cmp.Or(cmp.Compare(a.Pair, b.Pair), cmp.Compare(a.Leg, b.Leg), cmp.Compare(a.Export, b.Export))
	})
	return rows
}

func writeRefusals(w io.Writer, rows []refusalRow) {
	if len(rows) == 0 {
		fmt.Fprintln(w, "no leg refused")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PAIR\tLEG\tEXPORT\tSINCE\tLIFTED BY")
	for _, r := range rows {
		lifted := "volume " + r.Accepts + " served again"
		if r.Accepts == "" {
			lifted = "nothing (replace the leg)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", showName(r.Pair), r.Leg, r.Export, r.Since.UTC().Format(time.RFC3339), lifted)
	}
	tw.Flush()
	for _, r := range rows {
		fmt.Fprintf(w, "\n%s leg %s: %s\n", showName(r.Pair), r.Leg, r.Reason)
	}
}

// forgetRefusal forgets the refusal of uri's export, unless a pair still
// has it as a leg.
func forgetRefusal(cmd *cobra.Command, host *hostDeps, store *refusals.Store, uri string) error {
	u, err := client.ParseURI(uri)
	if err != nil {
		return err
	}
	r, ok, err := store.Get(u.String())
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("no refusal is recorded for %s (lvnbd pair refusals lists them)", uri)
	}
	// A leg's refusal forgotten would let it take back the volume it
	// refused: when that cannot be ruled out, nothing is forgotten.
	name, leg, err := host.pairLeg(cmd.Context(), u)
	if err != nil {
		return fmt.Errorf("%w: not forgetting its refusal (is lvnbd client starting or reloading? try again)", err)
	}
	if name != "" {
		return fmt.Errorf("%s is leg %s of pair %s (lvnbd client): its refusal goes when the leg is replaced "+
			"(lvnbd pair down --leg %s %s, then as lvnbd pair down --help says)", uri, leg, name, leg, name)
	}
	if name, leg, err = host.configuredLeg(u); err != nil {
		return fmt.Errorf("%w: not forgetting its refusal; fix %s first", err, host.clientConfig)
	}
	if name != "" {
		return fmt.Errorf("%s is leg %s of pair %s in %s: its refusal goes when the leg is replaced "+
			"(lvnbd pair down --leg %s %s once lvnbd client runs); take the pair out of %s first if it is gone for good",
			uri, leg, name, host.clientConfig, leg, name, host.clientConfig)
	}
	// Only what was checked: one recorded meanwhile is of a leg again.
	forgot, err := store.ForgetOnly(u.String(), r)
	if err != nil {
		return err
	}
	if !forgot {
		return fmt.Errorf("the refusal of %s changed while it was being forgotten: nothing was forgotten; look again (lvnbd pair refusals)", uri)
	}
	fmt.Fprintf(cmd.OutOrStdout(), "forgot the refusal of %s (leg %s of pair %s, since %s)\n",
		uri, r.Leg, showName(r.Pair), r.Since.UTC().Format(time.RFC3339))
	return nil
}
