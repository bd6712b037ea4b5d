package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/lvnbd/lvnbd/bench"
	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/client/kernel"
	"github.com/lvnbd/lvnbd/client/pair"
	"github.com/lvnbd/lvnbd/client/refusals"
	"github.com/lvnbd/lvnbd/client/volumeid"
	"github.com/lvnbd/lvnbd/config"
	"github.com/lvnbd/lvnbd/guest"
	"github.com/lvnbd/lvnbd/internal/blockuse"
)

// nbdKernel is what the attach commands use of the kernel's nbd driver;
// *kernel.Conn is the real one.
type nbdKernel interface {
	Connect(ctx context.Context, cfg kernel.Config) (int, error)
	Disconnect(ctx context.Context, index int) error
	Reconfigure(ctx context.Context, index int, r kernel.Reconfig) error
	Status(ctx context.Context, index int) ([]kernel.Device, error)
	WatchLinkDead(ctx context.Context) (<-chan int, error)
	SubscribeLinkDead(ctx context.Context) (events <-chan int, stopped func() error, err error)
	Bound(ctx context.Context, index int, backend string) (bool, error)
	Close() error
}

// hostDeps are the attach commands' ties to the host, replaced in tests.
type hostDeps struct {
	openKernel func(ctx context.Context) (nbdKernel, error)
	// users says what keeps device index busy: mounts, device-mapper or md
	// holders, a pair's stable link under linkDir, Xen's block backend.
	users func(index int, linkDir string) ([]string, error)
	// nodeTimeout bounds the wait for /dev/nbdN to appear after attach.
	nodeTimeout time.Duration
	// volumeIDs records the volume each device was attached to
	// (volumeid.DefaultPath); nil keeps them in memory, for tests.
	volumeIDs *volumeid.Store
	// refusals records the pair legs refused as not their device's volume,
	// across restarts of the dom0 (refusals.DefaultPath); nil keeps them in
	// the daemon's memory, for tests.
	refusals *refusals.Store
	// pairs asks a running lvnbd client daemon for its pairs; nil, or an
	// error (no daemon), is none.
	pairs func(ctx context.Context) ([]pair.PairStatus, error)
	// holders lists the dom0's md and device-mapper devices on nbd device
	// index (deviceHolders); nil checks nothing, for tests.
	holders func(index int) ([]string, error)
	// clientConfig is the pair daemon's configuration file, whose legs
	// lvnbd attach refuses also while no daemon runs; "" checks none.
	clientConfig string
}

// ids returns the host's volume ID store.
func (h *hostDeps) ids() *volumeid.Store {
	if h.volumeIDs == nil {
		h.volumeIDs = volumeid.Open("")
	}
	return h.volumeIDs
}

func realHost() *hostDeps {
	return &hostDeps{
		openKernel: func(ctx context.Context) (nbdKernel, error) {
			c, err := kernel.Dial(ctx)
			if err != nil {
				return nil, err
			}
			return c, nil
		},
		users: func(index int, linkDir string) ([]string, error) {
			return deviceUsers("/sys", "/proc/self/mountinfo", linkDir, index)
		},
		nodeTimeout: 2 * time.Second,
		volumeIDs:   volumeid.Open(volumeid.DefaultPath),
		refusals:    refusals.Open(refusals.DefaultPath),
		pairs: func(ctx context.Context) ([]pair.PairStatus, error) {
			return pair.NewClient(pair.DefaultSocket).Status(ctx)
		},
		clientConfig: config.DefaultClientPath,
		holders: func(index int) ([]string, error) {
			holders, _, err := deviceHolders("/sys", index)
			return holders, err
		},
	}
}

// configuredLegOf returns the pair and leg of the pair daemon's
// configuration file whose export u is; empty strings if none is, or if
// there is no such file. One that cannot be read is warned of on warn.
func (h *hostDeps) configuredLegOf(u client.URI, warn io.Writer) (name, leg string) {
	name, leg, err := h.configuredLeg(u)
	if err != nil {
		fmt.Fprintf(warn, "lvnbd: %v: if it is, use lvnbd pair up --leg\n", err)
	}
	return name, leg
}

// configuredLeg is configuredLegOf, with an error for a file that cannot
// be read.
func (h *hostDeps) configuredLeg(u client.URI) (name, leg string, _ error) {
	if h.clientConfig == "" {
		return "", "", nil
	}
	cfg, err := config.LoadClient(h.clientConfig)
	if errors.Is(err, os.ErrNotExist) {
		return "", "", nil
	}
	if err != nil {
		return "", "", fmt.Errorf("cannot tell whether %s is a pair's leg (%w)", u, err)
	}
	for _, p := range cfg.Pairs {
		for i, uri := range []string{p.A, p.B} {
			if sameExport(uri, u) {
				return p.Name, pair.Legs[i], nil
			}
		}
	}
	return "", "", nil
}

// deviceHolders lists the stacked devices (md, device-mapper) on nbd
// device index and its partitions under sysRoot (/sys), as "nbd0 held by
// md127", and returns the device numbers of the disk and its partitions
// ("43:0" -> nbd0).
func deviceHolders(sysRoot string, index int) (holders []string, devnums map[string]string, _ error) {
	disk := filepath.Join(sysRoot, "block", "nbd"+strconv.Itoa(index))
	parts, err := filepath.Glob(filepath.Join(disk, "nbd"+strconv.Itoa(index)+"p*"))
	if err != nil {
		return nil, nil, err
	}
	devnums = map[string]string{}
	for _, dir := range append([]string{disk}, parts...) {
		name := filepath.Base(dir)
		if b, err := os.ReadFile(filepath.Join(dir, "dev")); err == nil {
			devnums[strings.TrimSpace(string(b))] = name
		}
		hs, err := os.ReadDir(filepath.Join(dir, "holders"))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, nil, err
		}
		for _, h := range hs {
			holders = append(holders, fmt.Sprintf("%s held by %s", name, h.Name()))
		}
	}
	return holders, devnums, nil
}

// pairLegOf returns the pair and leg of the running lvnbd client daemon
// whose export u is; empty strings if none is. A daemon that does not answer
// (starting, reloading, hung) is warned of on warn: its legs cannot be told.
func (h *hostDeps) pairLegOf(ctx context.Context, u client.URI, warn io.Writer) (name, leg string) {
	name, leg, err := h.pairLeg(ctx, u)
	if err != nil {
		fmt.Fprintf(warn, "lvnbd: %v: if it is, detach it and use lvnbd pair up --leg\n", err)
	}
	return name, leg
}

// pairLeg is pairLegOf, with an error for a daemon that does not answer.
func (h *hostDeps) pairLeg(ctx context.Context, u client.URI) (name, leg string, _ error) {
	if h.pairs == nil {
		return "", "", nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	pairs, err := h.pairs(ctx)
	if errors.Is(err, pair.ErrNoDaemon) {
		return "", "", nil // no pairs to protect
	}
	if err != nil {
		return "", "", fmt.Errorf("cannot tell whether %s is a pair's leg (%w)", u, err)
	}
	for _, p := range pairs {
		for _, l := range p.Legs {
			if sameExport(l.URI, u) {
				return p.Name, l.Leg, nil
			}
		}
	}
	return "", "", nil
}

// Defaults of the attach flags.
const (
	defaultTimeout     = 30 * time.Second
	defaultDeadTimeout = 60 * time.Second
)

func newAttachCmd(host *hostDeps) *cobra.Command {
	if host == nil {
		host = realHost()
	}
	var (
		conns       int
		timeout     time.Duration
		deadTimeout time.Duration
		device      string
		blockSize   string
		readOnly    bool
	)
	cmd := &cobra.Command{
		Use:   "attach URI",
		Short: "Attach an NBD export as a kernel block device /dev/nbdN",
		Long: `Connect to an NBD export, negotiate in userspace and hand the connections to
the kernel's nbd driver, which serves /dev/nbdN from then on without any
lvnbd process. Prints the device path.

With --connections N, N sockets are opened (the server must advertise
multi-conn) and the kernel spreads requests over them. A request unanswered
for --timeout is retried on another connection, or fails once all are dead.
When every connection is dead, I/O waits --dead-timeout for 'lvnbd reconnect'
and then fails with EIO instead of hanging.

The URI is the device's backend identifier: 'lvnbd list' shows it and
'lvnbd detach URI' and 'lvnbd reconnect' find the device by it. An export can
be attached only once per host, and a leg of a pair (of the running lvnbd
client, or of /etc/lvnbd/client.toml) is attached by lvnbd client, which
checks its volume: use 'lvnbd pair up --leg'.`,
		Example: `  lvnbd attach nbd://storage-a/vm1
  lvnbd attach --connections 4 --timeout 10s --dead-timeout 2m nbd://10.0.0.1:10809/vm1
  lvnbd attach --device /dev/nbd3 --read-only nbd+unix:///golden?socket=/run/lvnbd.sock`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			u, err := client.ParseURI(args[0])
			if err != nil {
				return err
			}
			if err := checkConnectionFlags(conns, timeout, deadTimeout); err != nil {
				return err
			}
			if timeout == 0 {
				// Not "the kernel's default": with a zero timeout,
				// nbd_xmit_timeout (drivers/block/nbd.c) only logs
				// "Possible stuck request" and re-arms the timer, for
				// ever, so a server gone silent hangs the device's I/O.
				return fmt.Errorf("--timeout 0 means no request ever times out, so I/O to a server that goes silent hangs for ever: "+
					"give a timeout, such as %s (the default), or a longer one such as 5m for a slow link", defaultTimeout)
			}
			index := kernel.AnyDevice
			if device != "" {
				if index, err = kernel.ParseDevice(device); err != nil {
					return fmt.Errorf("--device: %w", err)
				}
			}
			var bs uint32
			if blockSize != "" {
				// Sizes as bench takes them: 4k is 4096, like dd.
				n, err := bench.ParseSize(blockSize)
				if err != nil || n < 0 || n > math.MaxUint32 {
					return fmt.Errorf("--block-size %q: want a size such as 512 or 4k", blockSize)
				}
				if bs = uint32(n); kernel.ValidBlockSize(bs) != nil {
					return fmt.Errorf("--block-size: %w", kernel.ValidBlockSize(bs))
				}
			}

			k, err := host.openKernel(ctx)
			if err != nil {
				return err
			}
			defer k.Close()
			backend := u.String()
			devs, err := k.Status(ctx, kernel.AnyDevice)
			if err != nil {
				return err
			}
			for _, d := range devs {
				if d.Running() && sameExport(d.Backend, u) {
					as := ""
					if d.Backend != backend {
						as = " to " + d.Backend
					}
					if d.Size == 0 {
						// Connected with no size, which attach gives it
						// next: an attach that did not finish.
						return fmt.Errorf("%s is already attached as %s%s, with no size yet (an attach that did not finish): "+
							"lvnbd reconnect --size %s gives it the export's, or lvnbd detach %s", backend, d.Path(), as, d.Path(), d.Path())
					}
					return fmt.Errorf("%s is already attached as %s%s (lvnbd detach %s)", backend, d.Path(), as, d.Path())
				}
				if d.Index == index && d.Connected {
					return fmt.Errorf("%s: %w (attached to %q)", d.Path(), kernel.ErrBusy, d.Backend)
				}
			}

			// A pair's leg keeps the ID of its volume while its device
			// is lost, so that it refuses a volume made anew; a
			// device attached here would start afresh, and the
			// daemon adopt it.
			if name, leg := host.pairLegOf(ctx, u, cmd.ErrOrStderr()); name != "" {
				return fmt.Errorf("%s is leg %s of pair %s (lvnbd client): lvnbd pair up --leg %s %s attaches it, "+
					"checking its volume", backend, leg, name, leg, name)
			}
			// Also while the daemon is stopped: it would adopt the
			// device at its start, without the check, and take it
			// for the leg's even after a refusal the leg kept.
			if name, leg := host.configuredLegOf(u, cmd.ErrOrStderr()); name != "" {
				return fmt.Errorf("%s is leg %s of pair %s in %s: lvnbd client attaches it, checking its volume "+
					"(systemctl start lvnbd-client, or lvnbd pair up --leg %s %s once it runs); to attach it by hand, "+
					"take the pair out of %s first", backend, leg, name, host.clientConfig, leg, name, host.clientConfig)
			}
			// A device attached earlier to this export and detached
			// by other means than lvnbd detach left its ID: this one
			// starts afresh.
			if err := host.ids().Forget(backend); err != nil {
				return err
			}
			connect := func() (int, client.ExportInfo, error) {
				socks, info, err := dialForKernel(ctx, u, conns)
				if err != nil {
					return 0, info, err
				}
				// The kernel holds its own references once Connect returns.
				defer kernel.CloseSockets(socks)
				cfg, err := kernel.ExportConfig(info, bs)
				if err != nil {
					return 0, info, err
				}
				if cfg.Size != info.Size {
					fmt.Fprintf(cmd.ErrOrStderr(), "lvnbd: the export's last %d bytes are not a whole %d-byte block and stay out of the device\n",
						info.Size-cfg.Size, cfg.BlockSize)
				}
				cfg.Sockets = socks
				cfg.ReadOnly = readOnly
				cfg.Timeout = timeout
				cfg.DeadConnTimeout = deadTimeout
				cfg.Backend = backend
				cfg.Index = index // the device asked for, or any
				dev, err := k.Connect(ctx, cfg)
				return dev, info, err
			}
			dev, info, err := connect()
			if errors.Is(err, kernel.ErrReceiversStarved) && !errors.Is(err, kernel.ErrStillAttached) {
				// The kernel has started worker threads meanwhile. (Not if the device could
				// not be disconnected again: a second device of the same backend would not do.)
				fmt.Fprintf(cmd.ErrOrStderr(), "lvnbd: %v; attaching again\n", err)
				dev, info, err = connect()
			}
			if err != nil {
				return err
			}
			if err := host.ids().Set(backend, info.ID()); err != nil {
				// A later lvnbd reconnect, another process, checks the
				// volume against the record: without one it would take
				// whatever volume it finds for the device's. Nothing
				// uses the device yet.
				path := kernel.DevicePath(dev)
				if derr := k.Disconnect(ctx, dev); derr != nil {
					return fmt.Errorf("%s is attached, but its volume ID was not recorded (%w), so a reconnect "+
						"cannot check it, and detaching it failed: %v; lvnbd detach %s", path, err, derr, path)
				}
				return fmt.Errorf("%s detached again: its volume ID was not recorded (%w), and a reconnect checks "+
					"the volume against it; make %s writable (is /run full?) and attach again", path, err, volumeid.DefaultPath)
			}
			waitForNode(ctx, kernel.DevicePath(dev), host.nodeTimeout)
			fmt.Fprintln(cmd.OutOrStdout(), kernel.DevicePath(dev))
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&conns, "connections", 1, "connections to open; more than 1 needs a multi-conn export")
	f.DurationVar(&timeout, "timeout", defaultTimeout, "retry or fail a request unanswered this long (not 0: the kernel would never time a request out)")
	f.DurationVar(&deadTimeout, "dead-timeout", defaultDeadTimeout, "with every connection dead, fail I/O after this long (0: at once)")
	f.StringVar(&device, "device", "", "the device to use, /dev/nbdN (default: a free one)")
	f.StringVar(&blockSize, "block-size", "", "logical block size, 512 to 4k (default: the export's minimum, at least 512)")
	f.BoolVar(&readOnly, "read-only", false, "attach read-only even if the export is writable")
	return cmd
}

func newDetachCmd(host *hostDeps) *cobra.Command {
	if host == nil {
		host = realHost()
	}
	var (
		force   bool
		linkDir string
	)
	cmd := &cobra.Command{
		Use:   "detach DEVICE|URI",
		Short: "Disconnect an attached NBD device",
		Long: `Disconnect /dev/nbdN, or the device attached to URI: the kernel sends the
server NBD_CMD_DISC on every connection and removes the device's size.

A device that is mounted, used by device-mapper or md, a leg of a pair (a
link under --link-dir points at it: use 'lvnbd pair down') or given to a Xen
guest (blkback opens it without showing as a holder) is refused unless
--force; with --force the device keeps its last state until its users let go,
and their I/O fails.`,
		Example: `  lvnbd detach /dev/nbd3
  lvnbd detach nbd://storage-a/vm1`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			k, err := host.openKernel(ctx)
			if err != nil {
				return err
			}
			defer k.Close()
			d, err := findDevice(ctx, k, args[0])
			if err != nil {
				return err
			}
			if !d.Connected {
				return fmt.Errorf("%s is not attached", d.Path())
			}
			if !force {
				users, err := host.users(d.Index, linkDir)
				if err != nil {
					return fmt.Errorf("checking whether %s is in use: %w", d.Path(), err)
				}
				if len(users) > 0 {
					return fmt.Errorf("%s is in use (%s): stop using it first, or --force", d.Path(), strings.Join(users, ", "))
				}
			}
			if err := k.Disconnect(ctx, d.Index); err != nil {
				return err
			}
			// Without users the kernel tears the device down before
			// DISCONNECT returns. One still held open keeps its
			// configuration until the last close; Linux 6.1 and 6.12
			// refuse it new connections (kernel.ErrDisconnectedHeldOpen),
			// but lvnbd reconnect and a pair's daemon would still find it
			// by its backend: its volume ID is kept meanwhile, so that
			// no kernel can reconnect it to another volume.
			after, err := k.Status(ctx, d.Index)
			if err != nil {
				return fmt.Errorf("disconnected %s, but checking that it is gone failed (its volume ID is kept): %w", d.Path(), err)
			}
			if len(after) == 1 && after[0].Running() && after[0].Backend == d.Backend {
				held := fmt.Errorf("disconnected %s, but something still holds it open: it goes away at the last close, "+
					"and its volume ID is kept until then", d.Path())
				if force {
					fmt.Fprintf(cmd.ErrOrStderr(), "lvnbd: %v\n", held)
					return nil
				}
				return held
			}
			if d.Backend != "" {
				// The record is the export's: another device still
				// on it (a pair's leg, with this one a leftover)
				// keeps it, or its next reconnect would take any
				// volume for its own.
				all, err := k.Status(ctx, kernel.AnyDevice)
				if err != nil {
					fmt.Fprintf(cmd.ErrOrStderr(), "lvnbd: %s's volume ID is kept: looking for other devices on its export failed: %v\n", d.Path(), err)
					return nil
				}
				for _, o := range all {
					if o.Index != d.Index && o.Running() && o.Backend == d.Backend {
						return nil
					}
				}
				if err := host.ids().Forget(d.Backend); err != nil {
					fmt.Fprintf(cmd.ErrOrStderr(), "lvnbd: forgetting %s's volume ID: %v\n", d.Path(), err)
				}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "disconnect even if the device is mounted, held by dm or md, a pair's leg or a Xen guest's disk")
	cmd.Flags().StringVar(&linkDir, "link-dir", pair.DefaultLinkDir, "where lvnbd client puts the pairs' stable names (its --link-dir)")
	return cmd
}

// listEntry is one device in 'lvnbd list --json'.
type listEntry struct {
	Path  string `json:"device"`
	State string `json:"state"`
	kernel.Device
}

// deviceState names what a device is doing, for list.
func deviceState(d kernel.Device) string {
	switch {
	case d.Running():
		return "connected"
	case d.Connected:
		// A configuration without a running device: disconnected but
		// still open, or opened while unconfigured.
		return "open"
	}
	return "free"
}

func newListCmd(host *hostDeps) *cobra.Command {
	if host == nil {
		host = realHost()
	}
	var asJSON, all, watch bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List attached NBD devices",
		Long: `List the nbd devices in use: device, size, read-only or read-write, state and
the export (backend) they are attached to. The kernel does not tell how many
connections a device has, nor whether they are alive; --watch shows the
deaths it reports.
--all also lists free devices. --watch then prints a line each time the kernel
reports a dead connection, until interrupted; if the kernel's notifications
fail, it says so and exits non-zero.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			k, err := host.openKernel(ctx)
			if err != nil {
				return err
			}
			defer k.Close()
			var (
				events  <-chan int
				stopped func() error
			)
			if watch {
				// Subscribe first, so nothing between the listing and the
				// watch is missed.
				if events, stopped, err = k.SubscribeLinkDead(ctx); err != nil {
					return err
				}
			}
			devs, err := k.Status(ctx, kernel.AnyDevice)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			entries := []listEntry{}
			for _, d := range devs {
				if all || d.Connected {
					entries = append(entries, listEntry{Path: d.Path(), State: deviceState(d), Device: d})
				}
			}
			if asJSON {
				if err := json.NewEncoder(out).Encode(entries); err != nil {
					return err
				}
			} else {
				writeDeviceTable(out, entries)
			}
			if events == nil {
				return nil
			}
			for index := range events {
				if err := printLinkDead(out, index, asJSON); err != nil {
					return err
				}
			}
			// Interrupted, or the subscription failed: then deaths would
			// go unreported, and a script reading the events must know.
			if err := stopped(); err != nil {
				return fmt.Errorf("watching for dead connections stopped, later ones would go unreported: %w", err)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.BoolVar(&asJSON, "json", false, "print JSON for scripts (with --watch, one object per event)")
	f.BoolVar(&all, "all", false, "list free devices too")
	f.BoolVar(&watch, "watch", false, "after listing, report dead connections as the kernel finds them")
	return cmd
}

func writeDeviceTable(w io.Writer, entries []listEntry) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tSIZE\tMODE\tSTATE\tBACKEND")
	for _, e := range entries {
		mode := "rw"
		if e.ReadOnly {
			mode = "ro"
		}
		backend := e.Backend
		if backend == "" {
			backend = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", e.Path, humanize.IBytes(e.Size), mode, e.State, backend)
	}
	tw.Flush()
}

func printLinkDead(w io.Writer, index int, asJSON bool) error {
	if asJSON {
		ev := map[string]any{"event": "link-dead", "time": time.Now().UTC().Format(time.RFC3339Nano)}
		if index == kernel.EventsLost {
			ev["event"] = "events-lost"
		} else {
			ev["device"] = kernel.DevicePath(index)
		}
		return json.NewEncoder(w).Encode(ev)
	}
	var err error
	if index == kernel.EventsLost {
		_, err = fmt.Fprintln(w, "events lost: check every device")
	} else {
		_, err = fmt.Fprintf(w, "%s: dead connection\n", kernel.DevicePath(index))
	}
	return err
}

func newReconnectCmd(host *hostDeps) *cobra.Command {
	if host == nil {
		host = realHost()
	}
	var (
		conns       int
		timeout     time.Duration
		deadTimeout time.Duration
		sizeOnly    bool
	)
	cmd := &cobra.Command{
		Use:   "reconnect DEVICE [URI]",
		Short: "Give an attached device fresh connections, and its export's new size",
		Long: `Dial the export again and hand the new connections to the kernel in place of
dead ones, without detaching: I/O waiting for --dead-timeout resumes, and
the device works again after it failed. The kernel takes one new connection
per dead one and drops the rest, so give --connections as many as the device
was attached with.

The device is reconnected to the export it was attached with, its backend
('lvnbd list' shows it). A URI is needed only for a device attached without
one (by another tool); a URI naming another export is refused, because the
device's data would silently change under its users (an md mirror would
keep both halves on one storage box and believe them in sync). To move a
device to another export, detach it and attach the other: md then resyncs the
new member. For the same reason an export whose volume was removed and made
anew under the same name (its volume ID, which lvnbd attach recorded in
/run/lvnbd/volume-ids.json, changed) is refused.

If the export grew, the device grows with it, after the fresh connections
and in a request of its own: a new size waits for the device's I/O in flight,
and I/O stalled on dead connections would hold it up until --dead-timeout
failed that I/O; from Linux 6.9, every nbd netlink request on the host (a pair
daemon's reconnects, of any device) waits meanwhile. --size, to push a grown
export's size (after lvextend on the server, say), does just the same, and
says so when the size did not change: give it --connections as for any
reconnect. A device never shrinks: an export found smaller than its device is
recorded in /run/lvnbd/volume-ids.json and refused from then on, even grown
back, since its tail is lost; a pair's leg is then replaced as a new member
(lvnbd pair down --help), and a device used alone is detached and attached
again.`,
		Example: `  lvnbd reconnect /dev/nbd3
  lvnbd reconnect --connections 4 /dev/nbd3
  lvnbd reconnect --size --connections 4 /dev/nbd3`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			index, err := kernel.ParseDevice(args[0])
			if err != nil {
				return err
			}
			if err := checkConnectionFlags(conns, timeout, deadTimeout); err != nil {
				return err
			}
			k, err := host.openKernel(ctx)
			if err != nil {
				return err
			}
			defer k.Close()
			devs, err := k.Status(ctx, index)
			if err != nil {
				return err
			}
			d := devs[0]
			if !d.Running() {
				return fmt.Errorf("%s is not attached (use lvnbd attach)", d.Path())
			}
			var given string
			if len(args) == 2 {
				given = args[1]
			}
			u, err := reconnectURI(d, given)
			if err != nil {
				return err
			}
			// Fresh sockets also for --size, as the pair daemon's size
			// poll grows a leg: see below.
			socks, info, err := dialForKernel(ctx, u, conns)
			if err != nil {
				return err
			}
			defer kernel.CloseSockets(socks)
			if info.ReadOnly() && !d.ReadOnly {
				return fmt.Errorf("%s is writable but %s is now read-only: detach and attach again", d.Path(), u)
			}
			key := d.Backend // as attach recorded it
			if key == "" {
				key = u.String()
			}
			if err := host.ids().Check(key, info.ID()); err != nil {
				if errors.Is(err, volumeid.ErrReplaced) {
					return fmt.Errorf("%s not reconnected: %w; detach it, and attach the new volume only as a new "+
						"member of whatever mirrors it, resynced in full", d.Path(), err)
				}
				return err
			}
			size, err := kernel.GrownSize(d, info.Size)
			if errors.Is(err, kernel.ErrExportShrank) {
				// Recorded, so that the export grown back is refused
				// too: its tail is lost.
				if merr := host.ids().Shrank(key, info.ID(), d.Size, info.Size); !errors.Is(merr, volumeid.ErrReplaced) {
					return fmt.Errorf("%s not reconnected: %w; recording it in the volume IDs failed, so a grow back would not be refused: %w", d.Path(), err, merr)
				}
				return fmt.Errorf("%s not reconnected: %w", d.Path(), err)
			}
			if err != nil {
				return err
			}
			// The sockets go alone, and a new size after them: see
			// kernel.Reconfig. Since Linux 6.9 a new size freezes the
			// device's queue until its I/O in flight is done, holding the
			// kernel's generic netlink lock, so every nbd netlink request
			// on the host (a pair daemon's reconnects) waits meanwhile. I/O
			// parked on dead connections is done only once they are
			// replaced, or failed at the dead timeout; with none dead, the
			// kernel drops the sockets.
			r := kernel.Reconfig{Sockets: socks, Timeout: timeout, DeadConnTimeout: deadTimeout, Backend: d.Backend}
			if err := k.Reconfigure(ctx, index, r); err != nil {
				return err
			}
			if size != d.Size {
				r = kernel.Reconfig{Size: size, Backend: d.Backend}
				if err := k.Reconfigure(ctx, index, r); err != nil {
					return fmt.Errorf("%s has fresh connections, but growing it to %s failed (lvnbd reconnect --size %s retries): %w",
						d.Path(), humanize.IBytes(size), d.Path(), err)
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "lvnbd: %s grew from %s to %s\n", d.Path(), humanize.IBytes(d.Size), humanize.IBytes(size))
			} else if sizeOnly {
				fmt.Fprintf(cmd.ErrOrStderr(), "lvnbd: %s already has the export's size, %s\n", d.Path(), humanize.IBytes(size))
			}
			fmt.Fprintln(cmd.OutOrStdout(), d.Path())
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&conns, "connections", 1, "fresh connections to offer (as many as the device was attached with)")
	f.DurationVar(&timeout, "timeout", 0, "also raise the request timeout (0: leave it as it is; a lower one is refused: the device's connections would keep the old one's TCP_USER_TIMEOUT, so detach and attach to lower it)")
	f.DurationVar(&deadTimeout, "dead-timeout", 0, "also change the dead-connection timeout (0: leave it as it is, not \"fail at once\" as with attach)")
	f.BoolVar(&sizeOnly, "size", false, "push the export's grown size to the device, after fresh connections as any reconnect; say if it did not change")
	return cmd
}

// reconnectURI returns the export to reconnect device d to: its backend, or
// given (which may be empty) for a device attached without one. A given URI
// naming another export than d's backend is refused: the kernel would take
// the other export's sockets under d's old name, and d's users (an md
// mirror, say) would read another volume's data as theirs.
func reconnectURI(d kernel.Device, given string) (client.URI, error) {
	if given == "" {
		if d.Backend == "" {
			return client.URI{}, fmt.Errorf("%s was attached without a backend identifier (not by lvnbd attach): give the export's URI", d.Path())
		}
		given = d.Backend
	}
	u, err := client.ParseURI(given)
	if err != nil {
		return client.URI{}, err
	}
	if d.Backend != "" && u.String() != d.Backend {
		return client.URI{}, fmt.Errorf("%s is attached to %s, not %s: reconnect only gives a device fresh connections to its own export. "+
			"To move it to another export, detach it and attach that one (lvnbd detach %s; lvnbd attach %s); "+
			"an md mirror then resyncs the new member", d.Path(), d.Backend, given, d.Path(), given)
	}
	return u, nil
}

// sameExport reports whether backend, a device's backend identifier, names
// the export u names, however either is spelt (client.URI.SameExport): two
// devices on one export are two writers the export's users do not know of.
// A backend that is no URI (another tool's) is compared as written.
func sameExport(backend string, u client.URI) bool {
	b, err := client.ParseURI(backend)
	if err != nil {
		return backend == u.String()
	}
	return b.SameExport(u)
}

// findDevice resolves a DEVICE|URI argument to a device.
func findDevice(ctx context.Context, k nbdKernel, arg string) (kernel.Device, error) {
	if strings.HasPrefix(arg, "/dev/") || strings.HasPrefix(arg, "nbd") && !strings.Contains(arg, ":") {
		index, err := kernel.ParseDevice(arg)
		if err != nil {
			return kernel.Device{}, err
		}
		devs, err := k.Status(ctx, index)
		if err != nil {
			return kernel.Device{}, err
		}
		return devs[0], nil
	}
	u, err := client.ParseURI(arg)
	if err != nil {
		return kernel.Device{}, fmt.Errorf("want a device /dev/nbdN or an NBD URI: %w", err)
	}
	devs, err := k.Status(ctx, kernel.AnyDevice)
	if err != nil {
		return kernel.Device{}, err
	}
	var found []kernel.Device
	for _, d := range devs {
		if d.Connected && d.Backend == u.String() {
			found = append(found, d)
		}
	}
	switch len(found) {
	case 0:
		return kernel.Device{}, fmt.Errorf("no device is attached to %s (see lvnbd list)", u)
	case 1:
		return found[0], nil
	}
	var paths []string
	for _, d := range found {
		paths = append(paths, d.Path())
	}
	return kernel.Device{}, fmt.Errorf("%s is attached as %s: name the device", u, strings.Join(paths, " and "))
}

// dialForKernel opens n connections to u for the kernel, with the flag to
// change in the error when the export allows only one.
func dialForKernel(ctx context.Context, u client.URI, n int) ([]*os.File, client.ExportInfo, error) {
	socks, info, err := kernel.DialSockets(ctx, nil, u, n)
	if errors.Is(err, kernel.ErrNoMultiConn) {
		err = fmt.Errorf("%w: use --connections 1", err)
	}
	return socks, info, err
}

// waitForNode waits up to limit for devtmpfs or udev to create path: a
// device the kernel had to create for this attach appears a moment later.
func waitForNode(ctx context.Context, path string, limit time.Duration) {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if _, err := os.Stat(path); err == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// deviceUsers lists what keeps nbd device index busy: mounts of it or its
// partitions, the device-mapper or md devices stacked on them, the pair
// whose stable link under linkDir points at it, and Xen block backends
// serving it to a guest.
func deviceUsers(sysRoot, mountinfo, linkDir string, index int) ([]string, error) {
	users, devnums, err := deviceHolders(sysRoot, index)
	if err != nil {
		return nil, err
	}
	// A mountinfo that cannot be read or parsed is an error, not "unused":
	// this check guards a detach.
	b, err := os.ReadFile(mountinfo)
	if err != nil {
		return nil, err
	}
	mounts, err := guest.ParseMountinfo(b)
	if err != nil {
		return nil, err
	}
	for _, m := range mounts {
		if name, ok := devnums[m.DevNumber]; ok {
			users = append(users, fmt.Sprintf("%s mounted on %s", name, m.Mountpoint))
		}
	}
	legs, err := pairLegs(linkDir, index)
	if err != nil {
		return nil, err
	}
	users = append(users, legs...)
	guests, err := blockuse.XenBackends(sysRoot, devnums)
	if err != nil {
		return nil, err
	}
	return append(users, guests...), nil
}

// pairLegs names the pair legs whose stable link, linkDir/PAIR/LEG as lvnbd
// client keeps it, points at nbd device index; none for an empty linkDir. A
// guest may use the device through the link, and the daemon would attach the
// leg again anyway.
func pairLegs(linkDir string, index int) ([]string, error) {
	if linkDir == "" {
		return nil, nil // not asked
	}
	links, err := filepath.Glob(filepath.Join(linkDir, "*", "*"))
	if err != nil {
		return nil, err
	}
	dev := kernel.DevicePath(index)
	var legs []string
	for _, link := range links {
		target, err := os.Readlink(link)
		if err != nil {
			continue // not a link: not one of the daemon's
		}
		if !filepath.IsAbs(target) {
			target = filepath.Join(filepath.Dir(link), target)
		}
		if filepath.Clean(target) != dev {
			continue
		}
		p, leg := filepath.Base(filepath.Dir(link)), filepath.Base(link)
		legs = append(legs, fmt.Sprintf("leg %s of pair %s via %s, taken down with 'lvnbd pair down %s'", leg, p, link, p))
	}
	return legs, nil
}

// checkConnectionFlags validates the flags attach and reconnect share.
func checkConnectionFlags(conns int, timeout, deadTimeout time.Duration) error {
	if conns < 1 || conns > kernel.MaxConnections {
		return fmt.Errorf("--connections %d: want 1 to %d", conns, kernel.MaxConnections)
	}
	if timeout < 0 || deadTimeout < 0 {
		return errors.New("--timeout and --dead-timeout cannot be negative")
	}
	return nil
}
