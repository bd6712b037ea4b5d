package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/lvnbd/lvnbd/client/pair"
	"github.com/lvnbd/lvnbd/config"
)

func newPairCmd() *cobra.Command {
	var ctlPath string
	cmd := &cobra.Command{
		Use:   "pair",
		Short: "Show, bring up and take down the pairs of the dom0 daemon",
		Long: `A pair is one volume exported by two storage boxes (leg a and leg b), attached
on this dom0 as two kernel devices that the guest mirrors with md RAID1.
'lvnbd client' keeps the pairs of client.toml attached; these commands ask it
(over --control) what the legs are doing, or take a pair down and up again.
'lvnbd pair xen-config' only reads client.toml; 'lvnbd pair refusals' lists
the legs refused as another volume.`,
		Example: `  lvnbd pair status
  lvnbd pair down vm1
  lvnbd pair up vm1
  lvnbd pair xen-config vm1`,
	}
	cmd.PersistentFlags().StringVar(&ctlPath, "control", pair.DefaultSocket, "the control socket of lvnbd client")
	cmd.AddCommand(newPairStatusCmd(&ctlPath), newPairUpCmd(&ctlPath), newPairDownCmd(&ctlPath), newPairXenConfigCmd(), newPairRefusalsCmd(nil, &ctlPath))
	return cmd
}

func newPairStatusCmd(ctlPath *string) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status [NAME...]",
		Short: "Show the state of every leg",
		Long: `Show each leg: its state, device, size, connections, reconnects since the
daemon started and, below the table, its last error and when it happened.

States: connected; reconnecting (the device is there, its connections died,
the daemon is redialing: I/O waits up to dead_timeout, then fails); failed
(no device: the export could not be attached, retried with backoff);
attaching (first attempt under way); down (lvnbd pair down).`,
		Example: `  lvnbd pair status
  lvnbd pair status --json vm1`,
		RunE: func(cmd *cobra.Command, args []string) error {
			list, err := pair.NewClient(*ctlPath).Status(cmd.Context())
			if err != nil {
				return err
			}
			if len(args) > 0 {
				var picked []pair.PairStatus
				for _, name := range args {
					i := indexOfPair(list, name)
					if i < 0 {
						return fmt.Errorf("%w %q", pair.ErrUnknownPair, name)
					}
					picked = append(picked, list[i])
				}
				list = picked
			}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(list)
			}
			writePairTable(cmd.OutOrStdout(), list, time.Now())
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func indexOfPair(list []pair.PairStatus, name string) int {
	for i, p := range list {
		if p.Name == name {
			return i
		}
	}
	return -1
}

func writePairTable(w io.Writer, list []pair.PairStatus, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PAIR\tLEG\tSTATE\tSINCE\tDEVICE\tSIZE\tCONNS\tRECONNECTS\tURI")
	var errs []string
	for _, p := range list {
		for _, l := range p.Legs {
			dev, size := "-", "-"
			if l.Device != "" {
				dev, size = l.Device, humanize.IBytes(l.Size)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", p.Name, l.Leg, l.State, ago(now, l.Since),
				dev, size, l.Connections, l.Reconnects, l.URI)
			if l.LastError != "" {
				errs = append(errs, fmt.Sprintf("%s.%s, %s: %s", p.Name, l.Leg, ago(now, l.LastErrorAt),
					strings.ReplaceAll(l.LastError, "\n", " ")))
			}
		}
	}
	tw.Flush()
	if len(errs) > 0 {
		fmt.Fprintln(w, "\nLast errors:")
		for _, e := range errs {
			fmt.Fprintln(w, "  "+e)
		}
	}
}

// ago says how long before now t was, to the second.
func ago(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return now.Sub(t).Round(time.Second).String() + " ago"
}

func newPairUpCmd(ctlPath *string) *cobra.Command {
	var (
		wait time.Duration
		leg  string
	)
	cmd := &cobra.Command{
		Use:   "up NAME",
		Short: "Attach a pair (or one leg) taken down, and give it to its Xen domain",
		Long: `Bring a pair up: legs taken down are attached again, legs waiting to retry
are retried at once. Waits up to --wait for each leg to be connected (or
to fail once). With xen_domain set in client.toml, each leg that has a
device is then given to the domain:

  xl block-attach DOMAIN 'format=raw, vdev=VDEV, access=rw, target=/dev/lvnbd/PAIR/LEG'

With --leg, only that leg. Fails, naming them and why, if a leg has no
device or its device is not connected (its export refused, as after a
storage box went down, or unreachable); the daemon keeps trying.`,
		Example: `  lvnbd pair up vm1
  lvnbd pair up --leg a vm1`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := pair.NewClient(*ctlPath).Up(cmd.Context(), args[0], leg, wait)
			return printPairResult(cmd.OutOrStdout(), st, err)
		},
	}
	cmd.Flags().DurationVar(&wait, "wait", pair.DefaultUpWait, "how long to wait for the legs' devices")
	cmd.Flags().StringVar(&leg, "leg", "", "bring up only this leg, a or b (default both)")
	return cmd
}

func newPairDownCmd(ctlPath *string) *cobra.Command {
	var (
		force bool
		leg   string
	)
	cmd := &cobra.Command{
		Use:   "down NAME",
		Short: "Take a pair (or one leg) from its Xen domain and detach it",
		Long: `Take a pair down: with xen_domain set, each leg is first taken from the domain
(xl block-detach DOMAIN VDEV); then both devices are detached, their links
removed and the volume IDs they were attached to forgotten. The pair stays
down, across reloads too, until lvnbd pair up or a restart of lvnbd client.
A leg refused as another volume (below) stays refused when the whole pair is
taken down and up, also across restarts of the dom0
(/var/lib/lvnbd/refused-legs.json): only --leg takes it back.

With --leg, only that leg: the guest keeps running on the other. This is how
one half of a mirror is replaced, for example when its storage box's volume
was made anew, rolled back by a snapshot merge or a shrink, or shrank under its
device (even if grown back since), or the box went down under its server (power
loss, panic, reset), and the leg refuses it ("the export's volume was made anew
or rolled back", followed by what happened):

  guest:  stop lvnbd guest watch (before Linux 5.15, or where the guest's
          disk outlives the detach, it would add the half back from md's
          bitmap; lvnbd guest watch --help)
  guest:  mdadm /dev/md0 --fail /dev/xvdb --remove /dev/xvdb
  dom0:   lvnbd pair down --leg a vm1
  dom0:   lvnbd pair up --leg a vm1
  guest:  mdadm --zero-superblock /dev/xvdb; mdadm /dev/md0 --add --failfast /dev/xvdb
  guest:  start lvnbd guest watch again

One leg is not taken down while the other is not connected: the guest may
have no other half of its mirror. Connected is not in sync: this dom0 cannot
see the guest's md, which may still be resyncing the other half (after it
came back, or was replaced). Check in the guest first that the array holds
the other half in sync ('lvnbd guest status': the array healthy, the leg you
keep in_sync); the fail-and-remove step above is that check, as md does not
fail the last in-sync member of a RAID1. If xl fails for a leg, the devices stay
attached and no further leg is taken from the domain, since the guest may
still use them. Without xen_domain, a device something uses (a domain whose
configuration file names it, a mount, md or device-mapper on the dom0) is not
detached either: the error names the users. --force does all of these anyway
(when the domain is gone, say).

A device something still holds open (blkback, when xl failed and --force was
given) stays configured until it is let go: its volume ID is then kept, so
it can only ever reconnect to the same volume. Once nothing holds it, take
the leg down again to forget the ID.`,
		Example: `  lvnbd pair down vm1
  lvnbd pair down --leg a vm1
  lvnbd pair down --force vm1`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := pair.NewClient(*ctlPath).Down(cmd.Context(), args[0], leg, force)
			return printPairResult(cmd.OutOrStdout(), st, err)
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "detach the devices even if xl block-detach fails, or one leg while the other is not connected")
	cmd.Flags().StringVar(&leg, "leg", "", "take down only this leg, a or b (default both)")
	return cmd
}

// printPairResult shows the state of the pair up or down left, also when it
// failed.
func printPairResult(w io.Writer, st pair.PairStatus, err error) error {
	var re *pair.RemoteError
	if errors.As(err, &re) && re.Pair != nil {
		st = *re.Pair
	}
	if st.Name != "" {
		writePairTable(w, []pair.PairStatus{st}, time.Now())
	}
	return err
}

func newPairXenConfigCmd() *cobra.Command {
	var configPath, linkDir string
	cmd := &cobra.Command{
		Use:   "xen-config NAME",
		Short: "Print the xl disk lines of a pair's two legs",
		Long: `Print the disk specifications of a pair's legs for the guest's xl
configuration, one per line, from client.toml (vdevs) and the stable names
lvnbd client maintains:

  format=raw, vdev=xvdb, access=rw, target=/dev/lvnbd/vm1/a
  format=raw, vdev=xvdc, access=rw, target=/dev/lvnbd/vm1/b

In the domain's configuration file each goes, quoted, in its disk = [...]
list. Leave xen_domain out of client.toml for a pair whose disks are in the
domain's configuration file, or lvnbd pair up would attach them twice.`,
		Example: `  lvnbd pair xen-config vm1`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := config.LoadClient(configPath)
			if err != nil {
				return err
			}
			for _, spec := range pairSpecs(cfg) {
				if spec.Name != args[0] {
					continue
				}
				disks, err := spec.XenDisks(linkDir)
				if err != nil {
					return fmt.Errorf("%s: %w", configPath, err)
				}
				_, err = fmt.Fprintln(cmd.OutOrStdout(), strings.Join(disks, "\n"))
				return err
			}
			return fmt.Errorf("%w %q in %s", pair.ErrUnknownPair, args[0], configPath)
		},
	}
	cmd.Flags().StringVar(&configPath, "config", config.DefaultClientPath, "client.toml")
	cmd.Flags().StringVar(&linkDir, "link-dir", pair.DefaultLinkDir, "where lvnbd client puts the stable names (its --link-dir)")
	return cmd
}
