package main

import (
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lvnbd/lvnbd/snapshot"
	"github.com/lvnbd/lvnbd/volume"
)

func newSnapshotCmd() *cobra.Command {
	var vf volumeFlags
	cmd := &cobra.Command{
		Use:   "snapshot",
		Short: "Create, list, merge and remove snapshots",
		Long: `Manage point-in-time snapshots of volumes, for backups and tests. A snapshot
is exported read-only as nbd://HOST/VOLUME@NAME.

LVM snapshots are classic copy-on-write ones with --size of COW space for the
volume's changes (default a fifth of the volume): one whose COW space fills
up becomes invalid, and can only be removed. Thin volumes get thin
snapshots. File volumes get a reflink (btrfs, XFS) or a sparse copy.

When a running lvnbd serve exports the volumes, these commands go through
its control socket: it quiesces the volume so the snapshot holds every write
acknowledged before it, and closes the exports around a merge.`,
		Example: `  lvnbd snapshot create vm1 --volumes lvm://vg0
  lvnbd snapshot create vm1@before-upgrade --size 5G --volumes lvm://vg0
  lvnbd snapshot list --volumes lvm://vg0
  lvnbd snapshot merge vm1@before-upgrade --volumes lvm://vg0`,
	}
	vf.register(cmd)
	cmd.AddCommand(newSnapshotCreateCmd(&vf), newSnapshotListCmd(&vf), newSnapshotRemoveCmd(&vf), newSnapshotMergeCmd(&vf))
	return cmd
}

func newSnapshotCreateCmd(vf *volumeFlags) *cobra.Command {
	var size string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "create VOLUME[@NAME]",
		Short: "Snapshot a volume",
		Long: `Snapshot VOLUME as VOLUME@NAME; without a name, the UTC time names it
(VOLUME@20261122T031500Z). --size is the COW space of an LVM snapshot:
enough for what the volume will change while the snapshot exists. --json
prints {"snapshot": {...}} as snapshot list --json shows it, for scripts.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var cow int64
			if size != "" {
				var err error
				if cow, err = volume.ParseSize(size); err != nil {
					return fmt.Errorf("--size: %w", err)
				}
			}
			drv, err := vf.open(cmd, false)
			if err != nil {
				return err
			}
			m := &snapshot.Manager{Driver: drv}
			s, err := m.Create(cmd.Context(), args[0], cow)
			if err != nil {
				return err
			}
			if asJSON {
				return printVolumeJSON(cmd.OutOrStdout(), struct {
					Snapshot volume.Snapshot `json:"snapshot"`
				}{s})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created snapshot %s: %s%s, read-only at %s\n", s.Ref(), volume.FormatSize(s.Size), cowNote(s), s.Path)
			return nil
		},
	}
	cmd.Flags().StringVar(&size, "size", "", "COW space of an LVM snapshot, such as 2G (default a fifth of the volume)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the snapshot as JSON, for scripts")
	return cmd
}

func newSnapshotListCmd(vf *volumeFlags) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list [VOLUME]",
		Short: "List snapshots, with how full their COW space is",
		Long: `List the snapshots of every volume, or of VOLUME. USED is how full an LVM
snapshot's COW space is: at 100% the snapshot is invalid. --json prints
{"snapshots": [...]} with sizes in bytes, for scripts.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			drv, err := vf.openToList(cmd)
			if err != nil {
				return err
			}
			var vol string
			if len(args) == 1 {
				vol = args[0]
			}
			m := &snapshot.Manager{Driver: drv}
			snaps, err := m.List(cmd.Context(), vol)
			if err != nil {
				return err
			}
			if snaps == nil {
				snaps = []volume.Snapshot{}
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return printVolumeJSON(out, struct {
					Snapshots []volume.Snapshot `json:"snapshots"`
				}{snaps})
			}
			if len(snaps) == 0 {
				fmt.Fprintf(out, "no snapshots in %s\n", drv)
				return nil
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SNAPSHOT\tSIZE\tCOW\tUSED\tSTATE\tCREATED")
			for _, s := range snaps {
				cow, used := "-", "-"
				switch {
				case s.COWSize > 0:
					cow, used = volume.FormatSize(s.COWSize), fmt.Sprintf("%.1f%%", s.UsagePercent)
				case s.Thin:
					cow, used = "thin", fmt.Sprintf("%.1f%%", s.UsagePercent)
				}
				created := "-"
				if !s.Created.IsZero() {
					created = s.Created.UTC().Format(time.DateTime + "Z")
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.Ref(), volume.FormatSize(s.Size), cow, used, snapshotState(s), created)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func newSnapshotRemoveCmd(vf *volumeFlags) *cobra.Command {
	var force, asJSON bool
	cmd := &cobra.Command{
		Use:   "remove VOLUME@NAME",
		Short: "Remove a snapshot",
		Long: `Remove a snapshot; the volume is untouched. Refused while clients read the
snapshot's export, unless --force disconnects them. --json prints
{"removed": "VOLUME@NAME"}, for scripts.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			drv, err := vf.open(cmd, force)
			if err != nil {
				return err
			}
			m := &snapshot.Manager{Driver: drv}
			if err := m.Remove(cmd.Context(), args[0]); err != nil {
				return err
			}
			if asJSON {
				return printVolumeJSON(cmd.OutOrStdout(), removedResult{Removed: args[0]})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed snapshot %s\n", args[0])
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print what was removed as JSON, for scripts")
	cmd.Flags().BoolVar(&force, "force", false, "disconnect the clients of the snapshot's export instead of refusing")
	return cmd
}

func newSnapshotMergeCmd(vf *volumeFlags) *cobra.Command {
	var force, asJSON bool
	cmd := &cobra.Command{
		Use:   "merge VOLUME@NAME",
		Short: "Revert a volume to a snapshot",
		Long: `Revert VOLUME to its content at the snapshot, then remove the snapshot
(like lvconvert --merge). Everything written to the volume since is lost. The
volume must not be in use: refused while clients are connected to the volume
or the snapshot, unless --force disconnects them. LVM merges a volume that
something else holds open when it is next activated, and undoes what is
written to it until then: a server does not export the volume meanwhile.

The merged volume gets another ID (its export's description ends in
"(lvnbd-id ID-rN)" after the Nth merge). A dom0 leg attached to the volume
refuses it, as it refuses a volume made anew: a guest's md cannot tell the
older copy from a current one, and re-added from its bitmap, the blocks
written since the snapshot would stay old on that half. To give a reverted
half back to a running mirror, take the leg down and up and add it in full
(see lvnbd pair down --help). --json prints {"merged": "VOLUME@NAME",
"volume": {...}}, the volume as volume list --json shows it after the merge
(its new ID, and whether the merge waits), for scripts.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			drv, err := vf.open(cmd, force)
			if err != nil {
				return err
			}
			m := &snapshot.Manager{Driver: drv}
			if err := m.Merge(cmd.Context(), args[0]); err != nil {
				return err
			}
			vol, _, _ := snapshot.ParseRef(args[0], false)
			if asJSON {
				v, err := drv.Get(cmd.Context(), vol)
				if err != nil {
					// The merge is done: say so, and why the volume is missing.
					fmt.Fprintf(cmd.ErrOrStderr(), "lvnbd: merged, but reading volume %s back failed: %v\n", vol, err)
					return printVolumeJSON(cmd.OutOrStdout(), struct {
						Merged string `json:"merged"`
					}{args[0]})
				}
				return printVolumeJSON(cmd.OutOrStdout(), struct {
					Merged string `json:"merged"`
					volumeResult
				}{args[0], volumeResult{Volume: listed(v)}})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "merged snapshot %s into %s, and removed it\n", args[0], vol)
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "disconnect the clients of the volume and the snapshot instead of refusing")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the merged volume as JSON, for scripts")
	return cmd
}

// cowNote is ", 2 GiB of COW space" for snapshots that have COW space.
func cowNote(s volume.Snapshot) string {
	switch {
	case s.COWSize > 0:
		return ", " + volume.FormatSize(s.COWSize) + " of COW space"
	case s.Thin:
		return ", thin"
	}
	return ""
}

func snapshotState(s volume.Snapshot) string {
	switch {
	case s.Problem != "":
		return "UNREADABLE: " + s.Problem
	case s.Invalid:
		return "INVALID (COW space full)"
	case s.Merging:
		return "merging"
	}
	return "ok"
}
