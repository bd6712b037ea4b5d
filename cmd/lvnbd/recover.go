package main

import (
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/lvnbd/lvnbd/control"
)

// recoverSteps is what must happen around lvnbd recover, in order; the
// command's help and its output both say it.
const recoverSteps = `  1. On the guest that mirrors this export (md RAID1), stop lvnbd guest watch
     and make sure md has dropped this half: mdadm /dev/mdN --fail DEV --remove DEV.
  2. Check the disk and the kernel log on this storage box.
  3. lvnbd recover EXPORT. Its clients are disconnected and reconnect to the
     export opened anew.
  4. On the guest: mdadm --zero-superblock DEV, then mdadm /dev/mdN --add --failfast DEV.
     That is a full resync: the data acknowledged before the failure may be
     lost, and a re-add from md's bitmap would not copy it. Then start lvnbd
     guest watch again.`

func newRecoverCmd() *cobra.Command {
	var (
		ctlPath string
		asJSON  bool
	)
	cmd := &cobra.Command{
		Use:   "recover EXPORT",
		Short: "Serve again an export whose storage failed to write back data",
		Long: `When a flush or a durable write of an export fails (the disk failed, or a file
system filled up), data acknowledged before it may never have reached the
disk. From then on every request to the export fails, lvnbd status shows it as
FAILED, and the failure is recorded (--failure-file of lvnbd serve) so that it
stays failed across restarts: a guest's mirror must not take this half back
as if nothing had happened.

lvnbd recover opens the export anew, clears the record and disconnects the
failed export's clients. They reconnect to the new one: a pair's lvnbd client
does at once, a device from lvnbd attach after lvnbd reconnect. An export of
a volume is first rescanned, and the reopened export carries the volume's
current ID: a dom0 refuses it if the volume was made anew meanwhile. It also
clears the record of an export not served now (its volume is missing).
Removing a volume with lvnbd volume remove clears its record too.

The order matters:
` + recoverSteps,
		Example: `  lvnbd status
  lvnbd recover vm1`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			res, err := control.NewClient(ctlPath).Recover(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return json.NewEncoder(out).Encode(res)
			}
			name := showName(res.Export)
			if res.Reopened {
				fmt.Fprintf(out, "export %s recovered: opened anew and served again; %d connection(s) to the failed one cut\n",
					name, res.ClientsCut)
			} else {
				fmt.Fprintf(out, "export %s is not served now; its failure record is cleared\n", name)
			}
			fmt.Fprintf(out, "the failure was: %s\n", res.Failure)
			fmt.Fprintf(out, "a guest mirroring it must now copy this half in full (mdadm --zero-superblock, then --add --failfast), "+
				"not re-add it from its bitmap: see lvnbd recover --help\n")
			return nil
		},
	}
	cmd.Flags().StringVar(&ctlPath, "control", control.DefaultPath, "the server's control socket")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}
