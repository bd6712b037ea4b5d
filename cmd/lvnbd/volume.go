package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/lvnbd/lvnbd/control"
	"github.com/lvnbd/lvnbd/volume"
	_ "github.com/lvnbd/lvnbd/volume/file" // file:// volumes
	_ "github.com/lvnbd/lvnbd/volume/lvm"  // lvm:// volumes
)

// volumeFlags are the flags every volume and snapshot command has: where the
// volumes are, and how to reach a server that exports them.
type volumeFlags struct {
	url     string
	control string
}

func (f *volumeFlags) register(cmd *cobra.Command) {
	pf := cmd.PersistentFlags()
	pf.StringVar(&f.url, "volumes", volume.DefaultURL, "the volumes: file:///DIR, file://./DIR (relative) or lvm://VG")
	pf.StringVar(&f.control, "control", control.DefaultPath,
		"control socket of a running lvnbd serve; when it serves the same volumes, changes go through it (empty: never)")
}

// open returns the driver: the running server's when it serves these
// volumes, so that exports follow at once, snapshots are quiesced and
// volumes in use are not pulled from under their clients; else the volumes'
// own. force makes the server disconnect clients instead of refusing.
func (f *volumeFlags) open(cmd *cobra.Command, force bool) (volume.Driver, error) {
	return control.OpenDriver(cmd.Context(), f.control, f.url, force, cmd.ErrOrStderr())
}

// openToList is open for commands that change nothing: they say nothing of
// where the volumes are read.
func (f *volumeFlags) openToList(cmd *cobra.Command) (volume.Driver, error) {
	return control.OpenDriver(cmd.Context(), f.control, f.url, false, nil)
}

func newVolumeCmd() *cobra.Command {
	var vf volumeFlags
	cmd := &cobra.Command{
		Use:   "volume",
		Short: "Create, list, resize and remove volumes",
		Long: `Manage the volumes a storage box exports: LVM logical volumes
(--volumes lvm://VG, striped on request) or sparse files (--volumes
file:///DIR, the default being file://./lvnbd-data).

A running lvnbd serve exports every volume as nbd://HOST/NAME without a
restart: when it serves the same --volumes, these commands go through its
control socket, so a new or resized volume is exported at once and a volume
with clients is not removed.

Sizes: 10G, 512M, 1.5T (powers of 1024, as in LVM), 10GB (powers of 1000),
or bytes.`,
		Example: `  lvnbd volume create vm1 --size 20G --stripes 2 --volumes lvm://vg0
  lvnbd volume list --volumes lvm://vg0
  lvnbd volume resize vm1 --size +5G --volumes lvm://vg0`,
	}
	vf.register(cmd)
	cmd.AddCommand(newVolumeCreateCmd(&vf), newVolumeListCmd(&vf), newVolumeResizeCmd(&vf), newVolumeRemoveCmd(&vf))
	return cmd
}

func newVolumeCreateCmd(vf *volumeFlags) *cobra.Command {
	var size, stripeSize string
	var stripes int
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "create NAME --size SIZE",
		Short: "Create a volume",
		Long: `Create a volume of --size, rounded up to the driver's unit (the LVM extent
size, per stripe). With --stripes N the LV is striped over N physical volumes,
--stripe-size at a time (default 64K). Names are letters, digits, dots,
underscores and dashes, at most 64, not starting with a dot or dash. --json
prints {"volume": {...}} as volume list --json shows it (its ID included), for
scripts.`,
		Example: `  lvnbd volume create vm1 --size 20G
  lvnbd volume create db1 --size 100G --stripes 4 --stripe-size 256K --volumes lvm://vg0`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts := volume.CreateOptions{Name: args[0], Stripes: stripes}
			var err error
			if opts.Size, err = volume.ParseSize(size); err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			if stripeSize != "" {
				if opts.StripeSize, err = volume.ParseSize(stripeSize); err != nil {
					return fmt.Errorf("--stripe-size: %w", err)
				}
			}
			drv, err := vf.open(cmd, false)
			if err != nil {
				return err
			}
			v, err := drv.Create(cmd.Context(), opts)
			if err != nil {
				return err
			}
			if asJSON {
				return printVolumeJSON(cmd.OutOrStdout(), volumeResult{Volume: listed(v)})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created volume %s: %s, %s, at %s\n", v.Name, sizeWithBytes(v.Size), layout(v), v.Path)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the volume as JSON, for scripts")
	cmd.Flags().StringVar(&size, "size", "", "size, such as 20G or 512MiB (required)")
	cmd.Flags().IntVar(&stripes, "stripes", 1, "number of physical volumes to stripe over")
	cmd.Flags().StringVar(&stripeSize, "stripe-size", "", "bytes per stripe, a power of two such as 64K (default 64K when striped)")
	cmd.MarkFlagRequired("size")
	return cmd
}

func newVolumeListCmd(vf *volumeFlags) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List volumes",
		Long: `List the volumes with their size, stripes and snapshots. A volume whose
snapshot merge waits for it to be closed (LVM) is marked "merge pending": a
server does not export it until the merge is done. A volume or snapshot the
driver knows but cannot read (its file deleted by hand, an LV lvs reports
oddly) is marked "unreadable", with the reason: a server leaves its export as
it is (and does not export it if it has none). --json prints {"volumes": [...]}
with sizes in bytes (and "merge_pending", "problem"), for scripts. "id" is the
volume's own ID: once the box went down under a running server, its exports'
IDs (what lvnbd info and a dom0 see) add the box's crash epoch, "--cEPOCH",
which lvnbd status shows.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			drv, err := vf.openToList(cmd)
			if err != nil {
				return err
			}
			vols, err := drv.List(cmd.Context())
			if err != nil {
				return err
			}
			if vols == nil {
				vols = []volume.Volume{}
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return printVolumeJSON(out, struct {
					Volumes []volume.Volume `json:"volumes"`
				}{vols})
			}
			if len(vols) == 0 {
				fmt.Fprintf(out, "no volumes in %s\n", drv)
				if d, ok := drv.(interface{ Dir() string }); ok {
					if _, err := os.Stat(d.Dir()); errors.Is(err, fs.ErrNotExist) {
						// A mistyped --volumes reads as an empty box.
						fmt.Fprintf(cmd.ErrOrStderr(), "lvnbd: %s does not exist (yet: the first volume create makes it); check --volumes\n", d.Dir())
					}
				}
				return nil
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSIZE\tBYTES\tSTRIPES\tSNAPSHOTS\tPATH")
			var pending []string
			var problems []error
			for _, v := range vols {
				name := v.Name
				switch {
				case v.Problem != "":
					name += " (unreadable)"
					problems = append(problems, v.Err())
				case v.MergePending:
					name += " (merge pending)"
					pending = append(pending, v.Name)
				}
				for _, s := range v.Snapshots {
					if err := s.Err(); err != nil {
						problems = append(problems, err)
					}
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\t%s\n", name, volume.FormatSize(v.Size), v.Size, stripesColumn(v), len(v.Snapshots), v.Path)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, name := range pending {
				fmt.Fprintf(out, "volume %s: a snapshot merge into it is pending; lvnbd serve does not export it until the merge is done "+
					"(close every other user of it, then lvchange --refresh it)\n", name)
			}
			for _, err := range problems {
				fmt.Fprintf(out, "%v; lvnbd serve leaves its export as it is\n", err)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func newVolumeResizeCmd(vf *volumeFlags) *cobra.Command {
	var size string
	var allowShrink, force, asJSON bool
	cmd := &cobra.Command{
		Use:   "resize NAME --size [+|-]SIZE",
		Short: "Grow (or shrink) a volume",
		Long: `Resize a volume to --size, or by it with + or -. Growing is online: the
server exports the new size at once, and attached hosts pick it up. Shrinking
discards the end of the volume and needs --allow-shrink: shrink the guest's
filesystem first. A running server refuses to shrink a volume with clients
connected to its export, unless --force disconnects them. A shrink gives the
volume another ID (its export's description ends in "-rN"), as a snapshot
merge does: a dom0 leg refuses the volume from then on, even grown back,
since its tail is lost; that half is replaced as a new member of the guest's
mirror (see lvnbd pair down --help). --json prints {"volume": {...},
"previous_size": BYTES}, the volume as volume list --json shows it after the
change, for scripts.`,
		Example: `  lvnbd volume resize vm1 --size +5G
  lvnbd volume resize vm1 --size 20G
  lvnbd volume resize vm1 --size 10G --allow-shrink`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			drv, err := vf.open(cmd, force)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			before, err := drv.Get(ctx, args[0])
			if err != nil {
				return err
			}
			target, err := volume.ParseResize(before.Size, size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			after, err := drv.Resize(ctx, before.Name, target, allowShrink)
			if errors.Is(err, volume.ErrShrink) {
				return fmt.Errorf("%w; if the guest no longer uses that space, add --allow-shrink", err)
			}
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return printVolumeJSON(out, volumeResult{Volume: listed(after), PreviousSize: &before.Size})
			}
			switch {
			case after.Size == before.Size:
				fmt.Fprintf(out, "volume %s is already %s\n", after.Name, sizeWithBytes(after.Size))
			case after.Size < before.Size:
				fmt.Fprintf(out, "%s\n", &volume.ShrinkError{Volume: after.Name, From: before.Size, To: after.Size})
				fmt.Fprintf(out, "resized volume %s from %s to %s\n", after.Name, volume.FormatSize(before.Size), sizeWithBytes(after.Size))
			default:
				fmt.Fprintf(out, "resized volume %s from %s to %s\n", after.Name, volume.FormatSize(before.Size), sizeWithBytes(after.Size))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&size, "size", "", "new size (20G), or a change (+5G, -1G) (required)")
	cmd.Flags().BoolVar(&allowShrink, "allow-shrink", false, "allow making the volume smaller, discarding its end")
	cmd.Flags().BoolVar(&force, "force", false, "when shrinking, disconnect the clients of the volume's export instead of refusing")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the volume after the change as JSON, for scripts")
	cmd.MarkFlagRequired("size")
	return cmd
}

func newVolumeRemoveCmd(vf *volumeFlags) *cobra.Command {
	var force, asJSON bool
	cmd := &cobra.Command{
		Use:   "remove NAME",
		Short: "Remove a volume and its data",
		Long: `Remove a volume and everything on it. A volume with snapshots is refused
(remove or merge them first), and so is one with clients connected to its
export, unless --force disconnects them. --json prints {"removed": NAME},
for scripts.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			drv, err := vf.open(cmd, force)
			if err != nil {
				return err
			}
			if err := drv.Remove(cmd.Context(), args[0]); err != nil {
				return err
			}
			if asJSON {
				return printVolumeJSON(cmd.OutOrStdout(), removedResult{Removed: args[0]})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed volume %s\n", args[0])
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "disconnect the clients of the volume's export instead of refusing")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print what was removed as JSON, for scripts")
	return cmd
}

// sizeWithBytes is 10 GiB (10737418240 bytes).
func sizeWithBytes(n int64) string {
	return fmt.Sprintf("%s (%d bytes)", volume.FormatSize(n), n)
}

// layout says how a volume is laid out: linear, or N stripes of SIZE.
func layout(v volume.Volume) string {
	switch {
	case v.Thin:
		return "thin"
	case v.Stripes > 1:
		return fmt.Sprintf("%d stripes of %s", v.Stripes, volume.FormatSize(v.StripeSize))
	}
	return "linear"
}

// stripesColumn is 1, or 2x64 KiB.
func stripesColumn(v volume.Volume) string {
	if v.Stripes > 1 {
		return fmt.Sprintf("%dx%s", v.Stripes, volume.FormatSize(v.StripeSize))
	}
	return "1"
}

// printVolumeJSON prints v as indented JSON, for the --json flags.
// volumeResult is what volume create and resize, and snapshot merge, print
// with --json.
type volumeResult struct {
	Volume       volume.Volume `json:"volume"`
	PreviousSize *int64        `json:"previous_size,omitempty"` // resize
}

// removedResult is what volume and snapshot remove print with --json.
type removedResult struct {
	Removed string `json:"removed"`
}

// listed is v as volume list --json shows it: an empty list of snapshots,
// never null.
func listed(v volume.Volume) volume.Volume {
	if v.Snapshots == nil {
		v.Snapshots = []volume.Snapshot{}
	}
	return v
}

func printVolumeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
