package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Config describes one benchmark run.
type Config struct {
	// Name is what the report calls the target (a path or URI).
	Name string
	Mode Mode
	// BlockSize is the length of every request (the last sequential one
	// may be shorter).
	BlockSize int
	// QueueDepth is the number of requests outstanding at once.
	QueueDepth int
	// Runtime ends the run after this long; 0 means no time bound (a
	// sequential run then covers the region once).
	Runtime time.Duration
	// IOLimit ends a random run after this many bytes; 0 means no bound.
	IOLimit int64
	// ReadPercent is the share of reads in ModeRandRW; other modes take
	// none.
	ReadPercent int
	// FUA makes every write durable before it completes; only modes that
	// write take it.
	FUA bool
	// Timeout bounds every request, the closing flush and the verify's
	// reads included: one not done within it ends the run with a
	// *TimeoutError. An NBD request is given up then; a file or device
	// request ends the run when the kernel returns it. 0 means no bound.
	Timeout time.Duration
	// Verify writes a pattern derived from Seed and each offset and checks
	// it: write modes re-read what they wrote after the closing flush,
	// read modes check what an earlier write run with the same seed left.
	// Either reads what storage holds: a target read through the page
	// cache has it dropped first.
	Verify bool
	// Seed seeds the pattern and the random offsets. Zero draws a fresh
	// one for the run (in Report.Seed, for a later read run to check): a
	// write run that reused an earlier run's pattern would pass its
	// verify over that run's data even if its own writes were lost.
	Seed uint64
	// Notices, if set, receives one line before the first write of a run
	// that writes over earlier data (as --force allowed), naming it and
	// the bytes at stake.
	Notices io.Writer
	// Progress, if set, receives a live status line every
	// ProgressInterval (default 1 s), for a terminal.
	Progress         io.Writer
	ProgressInterval time.Duration
}

// Validate checks c against a target of the given size and the alignment
// direct I/O needs (a file or block device opened with O_DIRECT).
func (c *Config) Validate(size int64, align int) error {
	return c.validate(size, align, alignDirectIO)
}

// alignReason says why a target needs requests aligned, for the error that
// refuses a block size or region that is not.
type alignReason int

const (
	alignDirectIO alignReason = iota // O_DIRECT: --direct=false lifts it
	alignExport                      // an NBD export's minimum block size
)

// errorf refuses what (given by --flag) of n bytes.
func (why alignReason) errorf(what, flag string, n int64, align int) error {
	if why == alignExport {
		return fmt.Errorf("%s %d is not a multiple of %d, the export's minimum block size: give a --%s that is a multiple of it",
			what, n, align, flag)
	}
	return fmt.Errorf("%s %d is not a multiple of %d, which direct I/O needs (or use --direct=false)", what, n, align)
}

func (c *Config) validate(size int64, align int, why alignReason) error {
	switch {
	case c.Mode < ModeRead || c.Mode > ModeRandRW:
		return fmt.Errorf("unknown mode %v", c.Mode)
	case c.BlockSize <= 0:
		return fmt.Errorf("block size %d: must be positive", c.BlockSize)
	case c.BlockSize > 32<<20:
		return fmt.Errorf("block size %s: over the 32 MiB NBD request limit", formatIBytes(int64(c.BlockSize)))
	case c.QueueDepth <= 0 || c.QueueDepth > 4096:
		return fmt.Errorf("queue depth %d: want 1 to 4096", c.QueueDepth)
	case c.Runtime < 0 || c.IOLimit < 0 || c.Timeout < 0:
		return errors.New("runtime, I/O limit and timeout must not be negative")
	case c.FUA && !c.Mode.Writes():
		// It would be ignored: FUA is a flag of writes.
		return fmt.Errorf("FUA (--fua) makes writes durable, and a %v run writes nothing: leave it out, or run a mode that writes", c.Mode)
	case c.Mode != ModeRandRW && c.ReadPercent != 0:
		return fmt.Errorf("a read percentage (--rwmix-read) sets the mix of randrw only; a %v run would ignore it: leave it out, or run --mode randrw", c.Mode)
	case c.Verify && !c.Mode.Writes() && c.Seed == 0:
		// Zero draws a fresh seed, whose pattern nothing wrote.
		return errors.New("a read run's verify checks the pattern of an earlier write run: give that run's seed (--seed)")
	case !c.Mode.Random() && c.IOLimit > 0:
		// It would be ignored: a sequential run covers its region once.
		return fmt.Errorf("an I/O limit (--io) bounds random modes only; a %v run covers its region once: give the region instead (--size %d)", c.Mode, c.IOLimit)
	case c.IOLimit > 0 && c.IOLimit < int64(c.BlockSize):
		return fmt.Errorf("I/O limit %s is less than one %s request, so the run would do nothing: give --io of at least the block size (--bs)", formatIBytes(c.IOLimit), formatIBytes(int64(c.BlockSize)))
	case c.Mode == ModeRandRW && (c.ReadPercent < 0 || c.ReadPercent > 100):
		return fmt.Errorf("read percentage %d: want 0 to 100", c.ReadPercent)
	case c.Mode.Random() && c.Runtime == 0 && c.IOLimit == 0:
		return errors.New("a random run needs a runtime or an I/O limit")
	case size <= 0:
		return errors.New("target has no size")
	case c.Mode.Random() && size < int64(c.BlockSize):
		return fmt.Errorf("region of %s is smaller than one %s block", formatIBytes(size), formatIBytes(int64(c.BlockSize)))
	}
	if align > 1 {
		if c.BlockSize%align != 0 {
			return why.errorf("block size", "bs", int64(c.BlockSize), align)
		}
		if !c.Mode.Random() && size%int64(align) != 0 {
			return why.errorf("size", "size", size, align)
		}
	}
	return nil
}

const (
	opRead = iota
	opWrite
	opFlush // not counted in the figures by op
)

type runner struct {
	t        Target
	cfg      Config
	size     int64
	blocks   int64 // chunks of BlockSize in the region (sequential: the last may be short)
	bufAlign int   // of buffer addresses

	next   atomic.Int64 // sequential: next chunk
	issued atomic.Int64 // bytes started, for IOLimit
	stop   atomic.Bool  // runtime over or a request failed

	done    [2]atomic.Int64 // bytes completed, by op, for progress
	ops     [2]atomic.Int64
	written *bitmap // chunks written, for verify

	// verified and verifyTotal are the verify's bytes checked and to
	// check, for its progress line.
	verified    atomic.Int64
	verifyTotal int64

	// epoch and inflight time requests for the watchdog: inflight[i] is
	// when worker i's request started, in nanoseconds since epoch plus
	// one, or 0 while it has none.
	epoch    time.Time
	inflight []atomic.Int64

	mu       sync.Mutex
	err      error
	mismatch *MismatchError
	badChunk int64
}

func (r *runner) fail(err error) {
	r.mu.Lock()
	if r.err == nil {
		r.err = err
	}
	r.mu.Unlock()
	r.stop.Store(true)
}

func (r *runner) recordMismatch(m *MismatchError) {
	r.mu.Lock()
	if r.mismatch == nil || m.Offset < r.mismatch.Offset {
		r.mismatch = m
	}
	r.badChunk++
	r.mu.Unlock()
}

type workerStats struct {
	hist  [2]Histogram
	bytes [2]int64
}

// ErrInterrupted is returned, with the report of what completed, by a run
// cancelled (Ctrl-C, SIGTERM) before it finished: scripts read the exit
// status, and a partial run is not a result.
var ErrInterrupted = errors.New("run interrupted: the report covers only what completed")

// ErrVerifyIncomplete is returned with ErrInterrupted, or alone, when a run
// asked to verify did not check all it should have.
var ErrVerifyIncomplete = errors.New("verify incomplete: not all data was checked")

// ErrTimeout is returned (wrapped in a *TimeoutError) by a run one of whose
// requests was not done within Config.Timeout.
var ErrTimeout = errors.New("request timed out")

// TimeoutError says which target left which request unanswered, and for how
// long.
type TimeoutError struct {
	Target  string        // Config.Name
	Request string        // "a read of 4.0 KiB at offset 8192", "the closing flush"
	Timeout time.Duration // Config.Timeout
}

func (e *TimeoutError) Error() string {
	return fmt.Sprintf("no reply from %s within %v to %s: the run was stopped (--timeout)", e.Target, e.Timeout, e.Request)
}

// Unwrap makes errors.Is(err, ErrTimeout) true.
func (e *TimeoutError) Unwrap() error { return ErrTimeout }

// cacheDropper is implemented by targets that may be read through the page
// cache: the verify drops it first, to read what storage holds.
type cacheDropper interface {
	DropCache() error
}

// Run runs the benchmark cfg describes against t and reports on it. The report
// is returned even when the run fails or ctx is cancelled (Ctrl-C): it then
// covers what completed, and says so; the error is then ErrInterrupted.
func Run(ctx context.Context, t Target, cfg Config) (*Report, error) {
	align := 1
	if a, ok := t.(Aligner); ok {
		align = a.Alignment()
	}
	size := t.Size()
	why := alignDirectIO
	if _, ok := t.(*NBD); ok {
		why = alignExport
	}
	if err := cfg.validate(size, align, why); err != nil {
		return nil, err
	}
	if cfg.Seed == 0 {
		// Small enough to survive a JSON round trip through float64
		// (jq), so a later read run can reuse it.
		cfg.Seed = rand.Uint64N(1<<31) + 1
	}
	bs := int64(cfg.BlockSize)
	r := &runner{t: t, cfg: cfg, size: size, bufAlign: bufferAlign, inflight: make([]atomic.Int64, cfg.QueueDepth)}
	if a, ok := t.(interface{ MemoryAlignment() int }); ok {
		r.bufAlign = max(bufferAlign, a.MemoryAlignment())
	}
	if cfg.Mode.Random() {
		r.blocks = size / bs
	} else {
		r.blocks = (size + bs - 1) / bs
	}
	if cfg.Verify && cfg.Mode.Writes() {
		r.written = newBitmap(r.blocks)
	}
	rep := newReport(t, cfg, size)
	if d, ok := t.(cacheDropper); ok && cfg.Verify && !cfg.Mode.Writes() {
		// The cache may hold what the write run being checked left.
		if err := d.DropCache(); err != nil {
			return nil, fmt.Errorf("verify: %w", err)
		}
	}
	if o, ok := t.(Overwriter); ok && cfg.Mode.Writes() && cfg.Notices != nil {
		if what := o.Overwrites(); what != "" {
			if cfg.Mode.Random() {
				fmt.Fprintf(cfg.Notices, "overwriting %s: random %s blocks in its first %d bytes (%s)\n", what, formatIBytes(bs), size, formatIBytes(size))
			} else {
				fmt.Fprintf(cfg.Notices, "overwriting %s: %d bytes (%s) from offset 0\n", what, size, formatIBytes(size))
			}
		}
	}

	// rctx is cancelled, under ctx, by the watchdog when a request has
	// taken longer than the timeout: every request then in flight is
	// given up, and the run ends.
	rctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	r.epoch = time.Now()
	stopWatchdog := r.startWatchdog(cancel)
	defer stopWatchdog()

	// The clock starts before the runtime timer, so a timed run reports
	// at least its runtime: the timer fires no sooner than Runtime after
	// it is set, and the run ends only after it fires.
	start := time.Now()
	var stopTimer func() bool
	if cfg.Runtime > 0 {
		stopTimer = time.AfterFunc(cfg.Runtime, func() { r.stop.Store(true) }).Stop
	}
	stopProgress := r.startProgress(r.runProgress)
	stats := make([]*workerStats, cfg.QueueDepth)
	var wg sync.WaitGroup
	for i := range stats {
		stats[i] = &workerStats{}
		wg.Go(func() { r.work(ctx, rctx, i, stats[i]) })
	}
	wg.Wait()
	if stopTimer != nil {
		stopTimer()
	}
	if cfg.Mode.Writes() && rctx.Err() == nil && r.err == nil {
		// dd conv=fsync: the data is not written until it is durable, so
		// the flush counts in the time.
		fs := time.Now()
		if _, err := r.issue(rctx, 0, opFlush, nil, 0, opNames[opFlush]); err != nil && ctx.Err() == nil {
			if !errors.Is(err, ErrTimeout) {
				err = fmt.Errorf("flush: %w", err)
			}
			r.fail(err)
		} else if err == nil {
			rep.FlushSeconds = time.Since(fs).Seconds()
			rep.Flushed = true
		}
	}
	elapsed := time.Since(start)
	stopProgress()

	var hist [2]Histogram
	var bytes [2]int64
	for _, s := range stats {
		for op := range hist {
			hist[op].Merge(&s.hist[op])
			bytes[op] += s.bytes[op]
		}
	}
	rep.fill(elapsed, hist, bytes)

	if cfg.Verify && cfg.Mode.Writes() && rctx.Err() == nil && r.err == nil {
		vs := time.Now()
		if d, ok := t.(cacheDropper); ok {
			// After the flush the cached pages are clean and can go;
			// reads then come from storage, not from what the run
			// left in memory.
			if err := d.DropCache(); err != nil {
				r.fail(fmt.Errorf("verify: %w", err))
			}
		}
		if r.err == nil {
			r.verifyTotal = r.verifyBytes()
			stop := r.startProgress(r.verifyProgress)
			rep.Verify.CheckedBytes = r.verifyWritten(ctx, rctx)
			stop()
		}
		rep.Verify.Seconds = time.Since(vs).Seconds()
	}
	if cause := context.Cause(rctx); r.err == nil && ctx.Err() == nil && errors.Is(cause, ErrTimeout) {
		// The request that overran reports itself, with what it was;
		// this is in case it did not.
		r.fail(cause)
	}
	if cfg.Verify && !cfg.Mode.Writes() {
		rep.Verify.CheckedBytes = rep.Read.Bytes
	}
	if rep.Verify != nil {
		rep.Verify.MismatchedBlocks = r.badChunk
		if r.mismatch != nil {
			off := r.mismatch.Offset
			rep.Verify.FirstMismatchOffset = &off
		}
		rep.Verify.OK = r.mismatch == nil && r.err == nil && ctx.Err() == nil
	}
	rep.Interrupted = ctx.Err() != nil
	err := r.err
	switch {
	case err != nil:
	case r.mismatch != nil:
		err = r.mismatch
	case rep.Verify != nil && !rep.Verify.OK && !rep.Interrupted:
		err = ErrVerifyIncomplete
	}
	if err != nil {
		rep.Error = err.Error()
	}
	// An interruption is not a failure of the target: the report says
	// it in Interrupted, not Error. The error still carries it, since
	// a partial run is no result for a script that reads the exit status.
	switch {
	case !rep.Interrupted:
	case err != nil:
		err = fmt.Errorf("%w; %w", ErrInterrupted, err)
	case rep.Verify != nil:
		err = fmt.Errorf("%w; %w", ErrInterrupted, ErrVerifyIncomplete)
	default:
		err = ErrInterrupted
	}
	return rep, err
}

// nextIO picks the next request: its op, offset and length. ok is false when
// the run is over.
func (r *runner) nextIO(rng *rand.Rand) (op int, off int64, n int, ok bool) {
	bs := int64(r.cfg.BlockSize)
	if !r.cfg.Mode.Random() {
		i := r.next.Add(1) - 1
		if i >= r.blocks {
			return 0, 0, 0, false
		}
		off = i * bs
		if r.cfg.Mode == ModeWrite {
			op = opWrite
		}
		return op, off, int(min(bs, r.size-off)), true
	}
	if r.cfg.IOLimit > 0 && r.issued.Add(bs) > r.cfg.IOLimit {
		return 0, 0, 0, false
	}
	off = rng.Int64N(r.blocks) * bs
	switch r.cfg.Mode {
	case ModeRandWrite:
		op = opWrite
	case ModeRandRW:
		if rng.IntN(100) >= r.cfg.ReadPercent {
			op = opWrite
		}
	}
	return op, off, int(bs), true
}

// opNames name the requests in a *TimeoutError.
var opNames = [...]string{opRead: "read", opWrite: "write", opFlush: "closing flush"}

// work issues requests for worker id until the run is over. Its requests
// go to rctx, which the watchdog cancels on a timeout; ctx tells an
// interruption (Ctrl-C), which is no failure of the target.
func (r *runner) work(ctx, rctx context.Context, id int, st *workerStats) {
	rng := rand.New(rand.NewPCG(r.cfg.Seed, uint64(id)+1))
	// A buffer for each direction: a read must not land in what the
	// next write sends.
	var rbuf, wbuf []byte
	if r.cfg.Mode.Reads() {
		rbuf = alignedBuffer(r.cfg.BlockSize, r.bufAlign)
	}
	if r.cfg.Mode.Writes() {
		wbuf = alignedBuffer(r.cfg.BlockSize, r.bufAlign)
		if !r.cfg.Verify {
			// Incompressible data, filled once: zeroes would flatter
			// any layer that compresses or detects zero blocks.
			for i := 0; i+8 <= len(wbuf); i += 8 {
				binary.LittleEndian.PutUint64(wbuf[i:], rng.Uint64())
			}
		}
	}
	var stamps uint64 // blocks stamped so far
	checkReads := r.cfg.Verify && !r.cfg.Mode.Writes()
	for !r.stop.Load() && rctx.Err() == nil {
		op, off, n, ok := r.nextIO(rng)
		if !ok {
			return
		}
		p := wbuf
		if op == opRead {
			p = rbuf
		}
		p = p[:n]
		if op == opWrite {
			if r.cfg.Verify {
				FillPattern(p, off, r.cfg.Seed)
			} else {
				stamps = stamp(p, r.cfg.Seed, id, stamps)
			}
		}
		lat, err := r.issue(rctx, id, op, p, off, opNames[op])
		if err != nil {
			r.failRequest(ctx, rctx, err)
			return
		}
		st.hist[op].Record(lat)
		st.bytes[op] += int64(n)
		r.done[op].Add(int64(n))
		r.ops[op].Add(1)
		if r.written != nil && op == opWrite {
			r.written.set(off / int64(r.cfg.BlockSize))
		}
		if checkReads {
			if err := CheckPattern(p, off, r.cfg.Seed); err != nil {
				r.recordMismatch(err.(*MismatchError))
			}
		}
	}
}

// stamp writes a word into the first eight bytes of every 4 KiB of p that no
// other block of the run carries, so that a layer that deduplicates finds no
// two blocks alike; the rest of the buffer stays as it was filled, random.
// It returns the number of words stamped so far by worker id.
func stamp(p []byte, seed uint64, id int, stamped uint64) uint64 {
	for i := 0; i+8 <= len(p); i += 4096 {
		stamped++
		// Unique per (worker, count) below 2^40 stamps, and mix64 is a
		// bijection: unique words that look random.
		binary.LittleEndian.PutUint64(p[i:], mix64(uint64(id)<<40|stamped)^seed)
	}
	return stamped
}

// mix64 is the SplitMix64 finaliser, a bijection on uint64.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// issue sends one request from worker slot and times it. The watchdog
// watches it while it is in flight; one that took longer than the timeout
// returns a *TimeoutError naming what (opNames) and where.
func (r *runner) issue(ctx context.Context, slot, op int, p []byte, off int64, what string) (time.Duration, error) {
	start := time.Now()
	r.inflight[slot].Store(int64(start.Sub(r.epoch)) + 1)
	var err error
	switch op {
	case opRead:
		err = r.t.ReadAt(ctx, p, off)
	case opWrite:
		err = r.t.WriteAt(ctx, p, off, r.cfg.FUA)
	default:
		err = r.t.Flush(ctx)
	}
	lat := time.Since(start)
	r.inflight[slot].Store(0)
	if r.cfg.Timeout > 0 && lat > r.cfg.Timeout {
		req := "the " + what
		if op != opFlush {
			req = fmt.Sprintf("a %s of %s at offset %d", what, formatIBytes(int64(len(p))), off)
		}
		return lat, &TimeoutError{Target: r.cfg.Name, Request: req, Timeout: r.cfg.Timeout}
	}
	return lat, err
}

// failRequest fails the run with a request's error, unless the run was
// interrupted (ctx) or the watchdog gave the request up for another one
// that timed out (rctx), which reports itself.
func (r *runner) failRequest(ctx, rctx context.Context, err error) {
	switch {
	case ctx.Err() != nil:
	case errors.Is(err, ErrTimeout), rctx.Err() == nil:
		r.fail(err)
	}
}

// startWatchdog cancels the run with a *TimeoutError once a request has been
// in flight longer than the timeout, until the returned function is called.
// One goroutine looking every eighth of the timeout costs the requests
// nothing but two atomic stores, where a context each would cost a timer.
func (r *runner) startWatchdog(cancel context.CancelCauseFunc) (stop func()) {
	if r.cfg.Timeout <= 0 {
		return func() {}
	}
	quit := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		tick := time.NewTicker(max(r.cfg.Timeout/8, time.Millisecond))
		defer tick.Stop()
		for {
			select {
			case <-quit:
				return
			case <-tick.C:
			}
			now := int64(time.Since(r.epoch))
			for i := range r.inflight {
				if s := r.inflight[i].Load(); s != 0 && now-(s-1) > int64(r.cfg.Timeout) {
					cancel(&TimeoutError{Target: r.cfg.Name, Request: "a request", Timeout: r.cfg.Timeout})
					return
				}
			}
		}
	}()
	return func() { close(quit); <-finished }
}

// verifyBytes is how many bytes the verify re-reads: every chunk written,
// the last one perhaps short.
func (r *runner) verifyBytes() int64 {
	var n int64
	for i := range r.written.words {
		n += int64(bits.OnesCount64(r.written.words[i].Load()))
	}
	n *= int64(r.cfg.BlockSize)
	if last := r.blocks - 1; r.written.words[last/64].Load()&(1<<(last%64)) != 0 {
		n -= r.blocks*int64(r.cfg.BlockSize) - r.size
	}
	return n
}

// verifyWritten re-reads every chunk the run wrote, QueueDepth at a time,
// and checks the pattern. It returns the bytes checked. Workers take the
// bitmap a word (64 chunks) at a time.
func (r *runner) verifyWritten(ctx, rctx context.Context) int64 {
	var nextWord atomic.Int64
	bs := int64(r.cfg.BlockSize)
	var wg sync.WaitGroup
	for id := range r.cfg.QueueDepth {
		wg.Go(func() {
			buf := alignedBuffer(r.cfg.BlockSize, r.bufAlign)
			for rctx.Err() == nil {
				w := nextWord.Add(1) - 1
				if w >= int64(len(r.written.words)) {
					return
				}
				for v := r.written.words[w].Load(); v != 0; v &= v - 1 {
					off := (w*64 + int64(bits.TrailingZeros64(v))) * bs
					p := buf[:min(bs, r.size-off)]
					if _, err := r.issue(rctx, id, opRead, p, off, "verify read"); err != nil {
						if !errors.Is(err, ErrTimeout) {
							err = fmt.Errorf("verify: %w", err)
						}
						r.failRequest(ctx, rctx, err)
						return
					}
					r.verified.Add(int64(len(p)))
					if err := CheckPattern(p, off, r.cfg.Seed); err != nil {
						r.recordMismatch(err.(*MismatchError))
					}
				}
			}
		})
	}
	wg.Wait()
	return r.verified.Load()
}

// progress is what one status line shows.
type progress struct {
	elapsed time.Duration // since the phase began
	bytes   int64         // done so far
	mbps    float64       // over the last interval
	iops    float64
}

// runProgress says how far the run is.
func (r *runner) runProgress() (bytes, ops int64, line func(progress) string) {
	return r.done[opRead].Load() + r.done[opWrite].Load(), r.ops[opRead].Load() + r.ops[opWrite].Load(), r.runLine
}

func (r *runner) runLine(p progress) string {
	line := fmt.Sprintf("%s  %8.1f MB/s  %9.0f IOPS  %s done  %v", r.cfg.Mode, p.mbps, p.iops, formatIBytes(p.bytes), p.elapsed.Round(100*time.Millisecond))
	if r.cfg.Runtime > 0 {
		// As given: a rounded 2.5 s would read 2 s or 3 s.
		line += fmt.Sprintf(" / %v", r.cfg.Runtime)
	} else if !r.cfg.Mode.Random() {
		line += fmt.Sprintf("  (%.0f%%)", 100*float64(p.bytes)/float64(r.size))
	}
	return line
}

// verifyProgress says how far the verify is.
func (r *runner) verifyProgress() (bytes, ops int64, line func(progress) string) {
	bytes = r.verified.Load()
	return bytes, bytes / int64(r.cfg.BlockSize), r.verifyLine
}

func (r *runner) verifyLine(p progress) string {
	line := fmt.Sprintf("verify  %8.1f MB/s  %9.0f IOPS  %s of %s checked  %v", p.mbps, p.iops,
		formatIBytes(p.bytes), formatIBytes(r.verifyTotal), p.elapsed.Round(100*time.Millisecond))
	if r.verifyTotal > 0 {
		line += fmt.Sprintf("  (%.0f%%)", 100*float64(p.bytes)/float64(r.verifyTotal))
	}
	return line
}

// startProgress prints a status line of what sample says every interval
// until the returned function is called, which clears it.
func (r *runner) startProgress(sample func() (bytes, ops int64, line func(progress) string)) (stop func()) {
	w := r.cfg.Progress
	if w == nil {
		return func() {}
	}
	interval := r.cfg.ProgressInterval
	if interval <= 0 {
		interval = time.Second
	}
	quit := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		begin := time.Now()
		last, lastBytes, lastOps := begin, int64(0), int64(0)
		for {
			select {
			case <-quit:
				fmt.Fprint(w, "\r\x1b[K")
				return
			case now := <-tick.C:
				bytes, ops, line := sample()
				dt := now.Sub(last).Seconds()
				fmt.Fprintf(w, "\r\x1b[K%s", line(progress{
					elapsed: now.Sub(begin), bytes: bytes,
					mbps: float64(bytes-lastBytes) / dt / 1e6, iops: float64(ops-lastOps) / dt,
				}))
				last, lastBytes, lastOps = now, bytes, ops
			}
		}
	}()
	return func() { close(quit); <-finished }
}
