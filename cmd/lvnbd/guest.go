package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/lvnbd/lvnbd/guest"
	"github.com/lvnbd/lvnbd/volume"
)

// guestDeps are the guest commands' ties to the machine, replaced in tests.
type guestDeps struct {
	create func(ctx context.Context, opts guest.CreateOptions) (guest.Created, error)
	status func() ([]guest.ArrayStatus, error)
	watch  func(ctx context.Context, cfg *guest.WatchConfig) error
}

func realGuest() *guestDeps {
	return &guestDeps{
		create: guest.Create,
		status: guest.Status,
		watch:  func(ctx context.Context, cfg *guest.WatchConfig) error { return guest.NewWatcher(cfg).Run(ctx) },
	}
}

func newGuestCmd(deps *guestDeps) *cobra.Command {
	if deps == nil {
		deps = realGuest()
	}
	cmd := &cobra.Command{
		Use:   "guest",
		Short: "Inside the guest: mirror the two legs of a volume with md RAID1 and keep the mirror whole",
		Long: `Commands for the guest (domU), which sees a volume's two legs — one from each
storage box, attached by its dom0 — as two disks, and mirrors them with md
RAID1 so it keeps running when one storage box dies.

'guest create' builds the mirror with a write-intent bitmap and failfast legs.
'guest watch' re-adds a leg that came back (md then resyncs only what changed
while it was gone) and grows the mirror after both legs grew.
'guest status' shows the arrays, their legs and any resync.`,
	}
	cmd.AddCommand(newGuestCreateCmd(deps), newGuestWatchCmd(deps), newGuestStatusCmd(deps))
	return cmd
}

func newGuestCreateCmd(deps *guestDeps) *cobra.Command {
	var (
		opts        guest.CreateOptions
		bitmapChunk string
	)
	cmd := &cobra.Command{
		Use:   "create --name NAME DEVICE_A DEVICE_B",
		Short: "Create a RAID1 mirror of two legs as /dev/md/NAME",
		Long: `Create /dev/md/NAME, a RAID1 array over two legs of the same volume, one from
each storage box:

  mdadm --create /dev/md/NAME --run --level=1 --raid-devices=2 --metadata=1.2 \
        --bitmap=internal --failfast DEVICE_A DEVICE_B

The internal write-intent bitmap lets a leg that was away resync only the
chunks written meanwhile (--bitmap-chunk of them at a time; mdadm's default
is 64M). Failfast legs are failed as soon as an I/O on them fails, instead of
being retried while the guest waits.

Legs of different sizes are refused: make the smaller volume as large as
the other on its storage box. A leg that is mounted or held by an array is
refused. So is one that carries
an md superblock, a filesystem or a partition table, or none of them but
data in its first or last MiB (raw data, plain dm-crypt, or old data a new
thick LV kept from its disk), naming what it found; --force destroys it. With --filesystem the new array gets an ext4 or xfs
filesystem. Prints /dev/md/NAME. Needs mdadm 4.0 or later (--failfast).

For the guest to assemble the array at boot, add it to /etc/mdadm/mdadm.conf
(mdadm --detail --brief /dev/md/NAME) and rebuild the initramfs.`,
		Example: `  lvnbd guest create --name data /dev/xvdb /dev/xvdc --filesystem ext4
  lvnbd guest create --name db --bitmap-chunk 16M /dev/xvdd /dev/xvde`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if opts.Name == "" {
				return fmt.Errorf("--name is required: the array becomes /dev/md/NAME")
			}
			if bitmapChunk != "" {
				// 64M is 64 MiB, as to mdadm and LVM.
				n, err := volume.ParseSize(bitmapChunk)
				if err != nil {
					return fmt.Errorf("--bitmap-chunk: %w", err)
				}
				opts.BitmapChunk = uint64(n)
			}
			opts.Devices = [2]string{args[0], args[1]}
			c, err := deps.create(cmd.Context(), opts)
			for _, f := range c.Overwritten {
				fmt.Fprintf(cmd.ErrOrStderr(), "lvnbd: --force: overwrote: %s\n", f)
			}
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), c.Path)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.Name, "name", "", "array name: the array is /dev/md/NAME (required)")
	f.StringVar(&opts.Filesystem, "filesystem", "", "make a filesystem on the array: ext4 or xfs")
	f.BoolVar(&opts.Force, "force", false, "create over legs that carry data, destroying it")
	f.StringVar(&bitmapChunk, "bitmap-chunk", "", "write-intent bitmap chunk, a power of two such as 16M (default mdadm's, 64M)")
	return cmd
}

func newGuestWatchCmd(deps *guestDeps) *cobra.Command {
	var (
		cfg                 guest.WatchConfig
		logLevel, logFormat string
	)
	cmd := &cobra.Command{
		Use:   "watch",
		Short: "Re-add legs that come back and grow arrays whose legs grew (a daemon)",
		Long: `Watch md RAID1 arrays (every one in /proc/mdstat, or the --md ones) until
SIGINT or SIGTERM, every --interval:

A leg md failed (faulty) or no longer lists is brought back once it answers
reads again, its md superblock names this array, and an in-sync leg answers
reads too (md never fails the last leg, so with both storage boxes down the
watcher waits instead of touching the only copy left); an array that is
broken, readonly or read-auto is left alone. A faulty leg is removed, then
re-added with 'mdadm --re-add', so md resyncs only the chunks its
write-intent bitmap marked. If md refuses the re-add (the bitmap cannot cover
the gap), or the leg's disk is not the one md had (another disk sequence
number, Linux 5.15 on: the dom0 detached and attached it again), the leg is
added as a spare and fully resynced, which the log says. A leg whose own
superblock says it ran without the other leg is left alone: it may hold the
newest writes, and the log says how to compare and choose. Stop the watcher
before replacing a half (lvnbd pair down --help). A device
without an md superblock is added (fully resynced) only if it is blank: no
signature lvnbd or blkid knows, and its first and last MiB all zeroes. A leg
whose superblock belongs to another array, or that holds anything else, is
never touched. Failed attempts are retried with a growing delay, up to 5
minutes.

When every leg of a whole, idle array grew (lvextend on the storage boxes,
then the dom0 pushed the new size), the array is grown with 'mdadm --grow
--size=max'. With --grow-fs, a mounted ext2/3/4 filesystem on it is then
grown online with resize2fs, and a mounted xfs with xfs_growfs. Unmounted
filesystems are left alone: resize2fs wants a fresh 'e2fsck -f' first, which
is the admin's call.

The watcher needs mdadm 4.0 or later in the guest (--failfast), and refuses
to start with an older one.`,
		Example: `  lvnbd guest watch
  lvnbd guest watch --md /dev/md/data --grow-fs --interval 5s`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if cfg.Interval <= 0 {
				return fmt.Errorf("--interval %s: want a positive duration", cfg.Interval)
			}
			log, err := newLogger(logLevel, logFormat)
			if err != nil {
				return err
			}
			defer func() { _ = log.Sync() }()
			cfg.Log = log.Named("guest")
			return deps.watch(cmd.Context(), &cfg)
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&cfg.Arrays, "md", nil, "array to watch, /dev/md/NAME or /dev/mdN (repeatable; default every RAID1 array)")
	f.BoolVar(&cfg.GrowFS, "grow-fs", false, "grow the mounted filesystem (ext2/3/4, xfs) after growing an array")
	f.DurationVar(&cfg.Interval, "interval", 2*time.Second, "time between two looks at the arrays")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	f.StringVar(&logFormat, "log-format", "console", "log format: console or json")
	return cmd
}

func newGuestStatusCmd(deps *guestDeps) *cobra.Command {
	var asJSON, check bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the md arrays, their legs and any resync",
		Long: `Show every md array: its health (healthy, degraded, recovering, resyncing,
resync-pending, checking, repairing, reshaping, failed or inactive), size,
running sync action with progress, and each leg with its slot and md state flags
(in_sync, faulty, spare, failfast, write_error...); an array whose state this
version cannot read is shown as unknown, with why ("problem" in --json), and
the others as usual. resync-pending means the
legs may differ while no resync runs: a read-auto array after an unclean
shutdown resyncs at its first write (or mdadm --readwrite), a frozen one once
sync_action is idle again. --json prints the same for scripts:
{"arrays": [...]}, sizes in bytes. With --check the exit status says whether
all is well, for monitoring: 0 when every array is healthy, 1 when one is not
(or there is none), after the same output.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			arrays, err := deps.status()
			if err != nil {
				return err
			}
			if asJSON {
				if arrays == nil {
					arrays = []guest.ArrayStatus{}
				}
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if err := enc.Encode(struct {
					Arrays []guest.ArrayStatus `json:"arrays"`
				}{arrays}); err != nil {
					return err
				}
			} else {
				printGuestStatus(cmd.OutOrStdout(), arrays)
			}
			if check && (len(arrays) == 0 || slices.ContainsFunc(arrays, func(a guest.ArrayStatus) bool { return a.Health != "healthy" })) {
				return exitCode(1) // the output says which
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	cmd.Flags().BoolVar(&check, "check", false, "exit with status 1 unless every array is healthy (for monitoring)")
	return cmd
}

func printGuestStatus(w io.Writer, arrays []guest.ArrayStatus) {
	if len(arrays) == 0 {
		fmt.Fprintln(w, "no md arrays")
		return
	}
	for i, a := range arrays {
		if i > 0 {
			fmt.Fprintln(w)
		}
		sync := "-"
		if s := a.Sync; s != nil {
			sync = fmt.Sprintf("%s %.1f%%", s.Action, s.Percent)
			if s.Finish != "" {
				sync += ", " + s.Finish + " left"
			}
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ARRAY\tDEVICE\tSIZE\tHEALTH\tSYNC")
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", a.Path, a.Device, humanize.IBytes(a.Size), a.Health, sync)
		tw.Flush()
		if a.Problem != "" {
			fmt.Fprintf(w, "  cannot read its state: %s\n", a.Problem)
		}
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		for _, m := range a.Members {
			slot := "-"
			if m.Slot >= 0 {
				slot = fmt.Sprint(m.Slot)
			}
			fmt.Fprintf(tw, "  leg %s\tslot %s\t%s\t%s\n", m.Device, slot, humanize.IBytes(m.Size), strings.Join(m.State, ","))
		}
		tw.Flush()
	}
}
