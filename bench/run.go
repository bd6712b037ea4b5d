package bench

import (
	"context"
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
	// ReadPercent is the share of reads in ModeRandRW.
	ReadPercent int
	// FUA makes every write durable before it completes.
	FUA bool
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

// Validate checks c against a target of the given size and alignment.
func (c *Config) Validate(size int64, align int) error {
	switch {
	case c.Mode < ModeRead || c.Mode > ModeRandRW:
		return fmt.Errorf("unknown mode %v", c.Mode)
	case c.BlockSize <= 0:
		return fmt.Errorf("block size %d: must be positive", c.BlockSize)
	case c.BlockSize > 32<<20:
		return fmt.Errorf("block size %s: over the 32 MiB NBD request limit", formatIBytes(int64(c.BlockSize)))
	case c.QueueDepth <= 0 || c.QueueDepth > 4096:
		return fmt.Errorf("queue depth %d: want 1 to 4096", c.QueueDepth)
	case c.Runtime < 0 || c.IOLimit < 0:
		return errors.New("runtime and I/O limit must not be negative")
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
			return fmt.Errorf("block size %d is not a multiple of %d, which direct I/O needs (or use --direct=false)", c.BlockSize, align)
		}
		if !c.Mode.Random() && size%int64(align) != 0 {
			return fmt.Errorf("size %d is not a multiple of %d, which direct I/O needs (or use --direct=false)", size, align)
		}
	}
	return nil
}

const (
	opRead = iota
	opWrite
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
	if err := cfg.Validate(size, align); err != nil {
		return nil, err
	}
	if cfg.Seed == 0 {
		// Small enough to survive a JSON round trip through float64
		// (jq), so a later read run can reuse it.
		cfg.Seed = rand.Uint64N(1<<31) + 1
	}
	bs := int64(cfg.BlockSize)
	r := &runner{t: t, cfg: cfg, size: size, bufAlign: bufferAlign}
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

	// The clock starts before the runtime timer, so a timed run reports
	// at least its runtime: the timer fires no sooner than Runtime after
	// it is set, and the run ends only after it fires.
	start := time.Now()
	var stopTimer func() bool
	if cfg.Runtime > 0 {
		stopTimer = time.AfterFunc(cfg.Runtime, func() { r.stop.Store(true) }).Stop
	}
	stopProgress := r.startProgress()
	stats := make([]*workerStats, cfg.QueueDepth)
	var wg sync.WaitGroup
	for i := range stats {
		stats[i] = &workerStats{}
		wg.Go(func() { r.work(ctx, i, stats[i]) })
	}
	wg.Wait()
	if stopTimer != nil {
		stopTimer()
	}
	if cfg.Mode.Writes() && ctx.Err() == nil && r.err == nil {
		// dd conv=fsync: the data is not written until it is durable, so
		// the flush counts in the time.
		fs := time.Now()
		if err := t.Flush(ctx); err != nil && ctx.Err() == nil {
			r.fail(fmt.Errorf("flush: %w", err))
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

	if cfg.Verify && cfg.Mode.Writes() && ctx.Err() == nil && r.err == nil {
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
			rep.Verify.CheckedBytes = r.verifyWritten(ctx)
		}
		rep.Verify.Seconds = time.Since(vs).Seconds()
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

func (r *runner) work(ctx context.Context, id int, st *workerStats) {
	buf := alignedBuffer(r.cfg.BlockSize, r.bufAlign)
	rng := rand.New(rand.NewPCG(r.cfg.Seed, uint64(id)+1))
	if r.cfg.Mode.Writes() && !r.cfg.Verify {
		// Incompressible data, filled once: zeroes would flatter any
		// layer that compresses or detects zero blocks.
		for i := 0; i+8 <= len(buf); i += 8 {
			v := rng.Uint64()
			for j := range 8 {
				buf[i+j] = byte(v >> (8 * j))
			}
		}
	}
	checkReads := r.cfg.Verify && !r.cfg.Mode.Writes()
	for !r.stop.Load() && ctx.Err() == nil {
		op, off, n, ok := r.nextIO(rng)
		if !ok {
			return
		}
		p := buf[:n]
		if op == opWrite && r.cfg.Verify {
			FillPattern(p, off, r.cfg.Seed)
		}
		start := time.Now()
		var err error
		if op == opRead {
			err = r.t.ReadAt(ctx, p, off)
		} else {
			err = r.t.WriteAt(ctx, p, off, r.cfg.FUA)
		}
		lat := time.Since(start)
		if err != nil {
			if ctx.Err() == nil {
				r.fail(err)
			}
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

// verifyWritten re-reads every chunk the run wrote, QueueDepth at a time,
// and checks the pattern. It returns the bytes checked. Workers take the
// bitmap a word (64 chunks) at a time.
func (r *runner) verifyWritten(ctx context.Context) int64 {
	var nextWord, checked atomic.Int64
	bs := int64(r.cfg.BlockSize)
	var wg sync.WaitGroup
	for range r.cfg.QueueDepth {
		wg.Go(func() {
			buf := alignedBuffer(r.cfg.BlockSize, r.bufAlign)
			for ctx.Err() == nil {
				w := nextWord.Add(1) - 1
				if w >= int64(len(r.written.words)) {
					return
				}
				for v := r.written.words[w].Load(); v != 0; v &= v - 1 {
					off := (w*64 + int64(bits.TrailingZeros64(v))) * bs
					p := buf[:min(bs, r.size-off)]
					if err := r.t.ReadAt(ctx, p, off); err != nil {
						if ctx.Err() == nil {
							r.fail(fmt.Errorf("verify: %w", err))
						}
						return
					}
					checked.Add(int64(len(p)))
					if err := CheckPattern(p, off, r.cfg.Seed); err != nil {
						r.recordMismatch(err.(*MismatchError))
					}
				}
			}
		})
	}
	wg.Wait()
	return checked.Load()
}

// startProgress prints a status line every interval until the returned
// function is called, which clears it.
func (r *runner) startProgress() (stop func()) {
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
				bytes := r.done[opRead].Load() + r.done[opWrite].Load()
				ops := r.ops[opRead].Load() + r.ops[opWrite].Load()
				dt := now.Sub(last).Seconds()
				line := fmt.Sprintf("%s  %8.1f MB/s  %9.0f IOPS  %s done  %.0f s",
					r.cfg.Mode, float64(bytes-lastBytes)/dt/1e6, float64(ops-lastOps)/dt,
					formatIBytes(bytes), now.Sub(begin).Seconds())
				if r.cfg.Runtime > 0 {
					line += fmt.Sprintf(" / %.0f s", r.cfg.Runtime.Seconds())
				} else if !r.cfg.Mode.Random() {
					line += fmt.Sprintf("  (%.0f%%)", 100*float64(bytes)/float64(r.size))
				}
				fmt.Fprintf(w, "\r\x1b[K%s", line)
				last, lastBytes, lastOps = now, bytes, ops
			}
		}
	}()
	return func() { close(quit); <-finished }
}
