package main

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/lvnbd/lvnbd/bench"
)

func newBenchCmd() *cobra.Command {
	var (
		mode, bs, size, ioLimit string
		qd, conns, rwmixRead    int
		runtime, timeout        time.Duration
		direct, fua, verify     bool
		force, jsonOut          bool
		seed                    uint64
		tlsFiles                clientTLS
	)
	cmd := &cobra.Command{
		Use:   "bench TARGET [URI...]",
		Short: "Measure throughput, IOPS and latency of an NBD export, block device or file",
		Long: `Measure an NBD export (nbd://HOST[:PORT]/NAME, nbd+unix:///NAME?socket=PATH), a block
device (/dev/nbd0, /dev/md0, a guest disk) or a file, with the same workloads, so the
server alone and the kernel path can be compared.

Sequential modes work like dd iflag=direct / oflag=direct conv=fsync: read or write
the region (--size, default all of the target) once in --bs requests, QD 1 unless
--qd says otherwise. Random modes keep --qd requests outstanding for --runtime (or
until --io bytes), spread over --conns connections for NBD targets. Every mode that
writes (write, randwrite, randrw) ends with a flush, which counts in the time and is
reported on its own ("flush", flush_seconds in --json). Several URIs of one export
(one per link, the same export name) may be given: requests are spread over them by
block, and --verify reads each block back through another link than the one that
wrote it (the server must advertise CAN_MULTI_CONN, as lvnbd does, and none may be
read-only for a write mode). A server without CAN_MULTI_CONN gets one connection,
and stderr says so.

Files and devices are opened with O_DIRECT unless --direct=false, and read-only
unless the run may write. Writes never touch existing data unless asked: a write
mode on a block device, a non-empty file or an NBD export needs --force, and then
says on stderr what it overwrites. A block device in use is refused even with
--force: mounted, a member of an md array or a device-mapper table, swap, open in
another program (lvnbd serve exporting it, qemu), or a Xen guest's disk.

--verify writes a pattern derived from each offset and the seed and, after the
closing flush, reads back every block written and checks it; with a read mode it
checks every block read against what an earlier '--mode write --verify --seed N'
run left (N is in that run's report). Verify reads what storage holds: with
--direct=false the page cache is dropped first. Without --seed every run draws a
fresh seed, so no earlier run's data can pass for this one's; a write run given the
seed of an earlier one over the same region cannot tell its writes from that run's.

--timeout (default 30s, as for 'lvnbd info'; 0: none) bounds every request, the
closing flush and the verify's reads included: when one is not done within it, the
run stops and fails with an error naming the target and the request, after the
report of what completed. An NBD request is given up at once, so a stalled server
cannot hang the run, --runtime or not; a file or device request ends the run when
the kernel returns it. Raise it for a closing flush with much cached data to write.

Flags a mode would ignore are refused: --io with sequential modes, --conns with
files and devices, --fua with read modes, --rwmix-read with modes other than randrw.

Sizes take binary one-letter suffixes like dd and fio (4k, 1M, 4G) or explicit
units (512KiB, 1GB). A live progress line goes to stderr when it is a terminal, for
the run and then for the verify. Ctrl-C stops the run and still prints a report of
what completed, without waiting for requests in flight; the exit status is then
non-zero, as it is when a run fails, times out, or its verify fails or does not
finish. A second Ctrl-C ends lvnbd at once.

` + clientTLSHelp,
		Example: `  lvnbd bench --mode write --bs 1M --size 4G --force /dev/nbd0
  lvnbd bench --mode randread --bs 4k --qd 32 --conns 4 --runtime 30s nbd://storage-a/vm1
  lvnbd bench --mode randrw --verify --size 1G --runtime 10s --json /srv/test.img
  lvnbd bench --mode read --conns 4 nbd://10.1.0.1/vm1 nbd://10.2.0.1/vm1
  lvnbd bench --mode read --size 1G --tls-ca /etc/lvnbd/ca.crt nbds://storage-a/vm1`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := bench.ParseMode(mode)
			if err != nil {
				return err
			}
			cfg := bench.Config{Name: strings.Join(args, " "), Mode: m, Runtime: runtime, Timeout: timeout, FUA: fua, Verify: verify}
			flags := cmd.Flags()
			switch {
			case m == bench.ModeRandRW:
				cfg.ReadPercent = rwmixRead
			case flags.Changed("rwmix-read"):
				// Refused, like every flag the mode would ignore
				// (Config.Validate says so for the others).
				return fmt.Errorf("--rwmix-read sets the mix of randrw only; a %v run would ignore it: leave it out, or run --mode randrw", m)
			}
			// The defaults follow the mode: dd-like for sequential runs,
			// fio-like for random ones.
			if !flags.Changed("bs") && m.Random() {
				bs = "4k"
			}
			if !flags.Changed("qd") && m.Random() {
				qd = 32
			}
			if !flags.Changed("runtime") && m.Random() && !flags.Changed("io") {
				cfg.Runtime = 30 * time.Second
			}
			blockSize, err := bench.ParseSize(bs)
			if err != nil {
				return fmt.Errorf("--bs: %w", err)
			}
			cfg.BlockSize, cfg.QueueDepth = int(blockSize), qd
			var region int64
			if size != "" {
				if region, err = bench.ParseSize(size); err != nil {
					return fmt.Errorf("--size: %w", err)
				}
			}
			if ioLimit != "" {
				if cfg.IOLimit, err = bench.ParseSize(ioLimit); err != nil {
					return fmt.Errorf("--io: %w", err)
				}
			}
			switch {
			case flags.Changed("seed") && seed == 0:
				return errors.New("--seed 0: want a positive seed, or leave --seed out for a fresh one")
			case flags.Changed("seed"):
				cfg.Seed = seed
			case verify && !m.Writes():
				return errors.New("--verify with a read mode checks an earlier write run's data: give its --seed")
			}
			// Otherwise the seed is 0: Run draws a fresh one, reported.
			if conns < 1 {
				return fmt.Errorf("--conns %d: want at least 1", conns)
			}
			if err := cfg.Validate(max(region, blockSize), 1); err != nil {
				return err
			}
			out, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
			cfg.Notices = stderr
			if bench.IsTerminal(stderr) {
				cfg.Progress = stderr
			}

			if tlsFiles.given() && !bench.IsNBDURI(args[0]) {
				return fmt.Errorf("--tls-ca, --tls-cert, --tls-key and --tls-crl are for nbds:// URIs, and %s is not an NBD URI", args[0])
			}
			opts, err := tlsFiles.options(stderr, args...)
			if err != nil {
				return err
			}
			o := bench.OpenOptions{
				Write: m.Writes(), Force: force, Size: region, Direct: direct, Conns: conns,
				Validate: cfg.Validate, Notices: stderr,
			}
			if opts != nil {
				o.TLS = opts.TLS
			}
			ctx := cmd.Context()
			t, err := bench.Open(ctx, args, o)
			if err != nil {
				return dialHint(err)
			}
			defer t.Close()
			rep, runErr := bench.Run(ctx, t, cfg)
			if f, ok := t.(*bench.File); ok && runErr != nil && (rep == nil || rep.Write.Ops == 0) {
				// Nothing was written to the file this run made: leave
				// none behind for the next run to need --force over.
				if err := f.RemoveCreated(); err != nil {
					fmt.Fprintln(stderr, "lvnbd:", err)
				}
			}
			if rep == nil {
				return runErr
			}
			if jsonOut {
				err = rep.WriteJSON(out)
			} else {
				err = rep.WriteText(out)
			}
			// After the report, so a script gets both the figures of
			// what completed and a non-zero exit status.
			if runErr != nil {
				return runErr
			}
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&mode, "mode", "read", "workload: read, write (sequential, dd-style), randread, randwrite, randrw")
	f.StringVar(&bs, "bs", "1M", "request size (default 1M sequential, 4k random)")
	f.StringVar(&size, "size", "", "region to use from offset 0 (default: the whole target; creates a missing file in write modes)")
	f.IntVar(&qd, "qd", 1, "requests outstanding at once (default 1 sequential, 32 random)")
	f.IntVar(&conns, "conns", 1, "NBD connections, spread over the URIs; the queue depth is spread over them (NBD only: files and devices take --qd)")
	f.DurationVar(&runtime, "runtime", 0, "stop after this long (default: sequential runs cover the region once, random ones run 30s)")
	f.DurationVar(&timeout, "timeout", 30*time.Second, "fail the run when a request is not done within this long (0: never)")
	f.StringVar(&ioLimit, "io", "", "random modes: stop after this many bytes, at least --bs (sequential modes cover --size once)")
	f.IntVar(&rwmixRead, "rwmix-read", 50, "randrw: percentage of reads")
	f.BoolVar(&direct, "direct", true, "files and devices: O_DIRECT, bypassing the page cache")
	f.BoolVar(&fua, "fua", false, "write modes: make every write durable before it completes (FUA, O_DSYNC)")
	f.BoolVar(&verify, "verify", false, "write a pattern and, after the flush, check every block written as storage holds it (read modes: check an earlier run's, by its --seed)")
	f.Uint64Var(&seed, "seed", 0, "seed of the verify pattern and random offsets (default: fresh each run, shown in the report)")
	f.BoolVar(&force, "force", false, "allow write modes to overwrite a block device (not one in use), a non-empty file or an NBD export")
	f.BoolVar(&jsonOut, "json", false, "print the report as one JSON object")
	tlsFiles.addFlags(f)
	return cmd
}
