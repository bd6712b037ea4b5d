package bench

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"
)

// openTestFile opens path with O_DIRECT where the temp file system allows it,
// as the command does by default.
func openTestFile(tb testing.TB, path string, o OpenOptions) *File {
	tb.Helper()
	o.Direct = true
	f, err := OpenFile(path, o)
	if err != nil && strings.Contains(err.Error(), "O_DIRECT") {
		tb.Logf("temp file system has no O_DIRECT; testing through the page cache: %v", err)
		o.Direct = false
		f, err = OpenFile(path, o)
	}
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { f.Close() })
	return f
}

// flipByte inverts the byte at off in the file at path, behind the
// benchmark's back.
func flipByte(tb testing.TB, path string, off int64) {
	tb.Helper()
	fd, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		tb.Fatal(err)
	}
	defer fd.Close()
	b := make([]byte, 1)
	if _, err := fd.ReadAt(b, off); err != nil {
		tb.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := fd.WriteAt(b, off); err != nil {
		tb.Fatal(err)
	}
}

func mustRun(tb testing.TB, target Target, cfg Config) *Report {
	tb.Helper()
	rep, err := Run(context.Background(), target, cfg)
	if err != nil {
		tb.Fatalf("Run(%v): %v", cfg.Mode, err)
	}
	return rep
}

func TestSequentialWriteReadVerify(t *testing.T) {
	const size = 3<<20 + 512 // not a multiple of the block size: the last request is short
	path := filepath.Join(t.TempDir(), "disk.img")

	w := openTestFile(t, path, OpenOptions{Write: true, Size: size})
	rep := mustRun(t, w, Config{Name: path, Mode: ModeWrite, BlockSize: 1 << 20, QueueDepth: 2, Verify: true, Seed: 99})
	if rep.Write.Bytes != size || rep.Bytes != size || rep.Write.Ops != 4 || rep.Read.Ops != 0 {
		t.Errorf("write: %d bytes in %d ops (reads %d), want %d in 4", rep.Write.Bytes, rep.Write.Ops, rep.Read.Ops, size)
	}
	if !rep.Flushed || rep.Verify == nil || !rep.Verify.OK || rep.Verify.CheckedBytes != size {
		t.Errorf("write: flushed %v, verify %+v, want flushed and %d bytes verified", rep.Flushed, rep.Verify, size)
	}
	if st, err := os.Stat(path); err != nil || st.Size() != size {
		t.Fatalf("file after the write run: %v, %v; want %d bytes", st, err, size)
	}

	r := openTestFile(t, path, OpenOptions{})
	rep = mustRun(t, r, Config{Name: path, Mode: ModeRead, BlockSize: 64 << 10, QueueDepth: 4, Verify: true, Seed: 99})
	if rep.Read.Bytes != size || rep.Read.Ops != (size+64<<10-1)/(64<<10) || rep.Write.Ops != 0 {
		t.Errorf("read: %d bytes in %d ops, want %d", rep.Read.Bytes, rep.Read.Ops, size)
	}
	if !rep.Verify.OK || rep.Verify.CheckedBytes != size {
		t.Errorf("read verify: %+v", rep.Verify)
	}
	if rep.Read.Latency.P50 <= 0 || rep.Read.Latency.P999 < rep.Read.Latency.P50 || rep.MBPerSec <= 0 || rep.IOPS <= 0 {
		t.Errorf("read figures: %+v", rep.Read)
	}

	// A byte changed behind the benchmark's back is found, at its offset.
	const corrupt = 2<<20 + 12345
	flipByte(t, path, corrupt)
	rep, err := Run(context.Background(), r, Config{Name: path, Mode: ModeRead, BlockSize: 64 << 10, QueueDepth: 4, Verify: true, Seed: 99})
	var m *MismatchError
	if !errors.As(err, &m) || m.Offset != corrupt {
		t.Fatalf("read after corruption: err %v, want a mismatch at %d", err, corrupt)
	}
	if rep.Verify.OK || rep.Verify.FirstMismatchOffset == nil || *rep.Verify.FirstMismatchOffset != corrupt || rep.Verify.MismatchedBlocks != 1 {
		t.Errorf("report after corruption: %+v", rep.Verify)
	}

	// Another seed's data is stale.
	_, err = Run(context.Background(), r, Config{Name: path, Mode: ModeRead, BlockSize: 64 << 10, QueueDepth: 1, Verify: true, Seed: 100})
	if !errors.As(err, &m) || m.Offset >= 8 {
		t.Errorf("read with another seed: %v, want a mismatch in the first word", err)
	}
}

// corrupting flips one byte of a write that covers offset at.
type corrupting struct {
	Target
	at int64
}

func (c *corrupting) WriteAt(ctx context.Context, p []byte, off int64, durable bool) error {
	if c.at >= off && c.at < off+int64(len(p)) {
		q := append([]byte(nil), p...)
		q[c.at-off] ^= 1
		p = q
	}
	return c.Target.WriteAt(ctx, p, off, durable)
}

func TestRandomReadWriteVerify(t *testing.T) {
	const size = 4 << 20
	path := filepath.Join(t.TempDir(), "disk.img")
	f := openTestFile(t, path, OpenOptions{Write: true, Size: size})

	cfg := Config{Name: path, Mode: ModeRandRW, BlockSize: 4096, QueueDepth: 8, IOLimit: 2 << 20, ReadPercent: 30, Verify: true, Seed: 5}
	rep := mustRun(t, f, cfg)
	if rep.Bytes != cfg.IOLimit || rep.Ops != cfg.IOLimit/4096 {
		t.Errorf("%d bytes in %d ops, want exactly the I/O limit %d", rep.Bytes, rep.Ops, cfg.IOLimit)
	}
	if rep.Read.Ops == 0 || rep.Write.Ops == 0 || rep.Read.Ops > rep.Write.Ops {
		t.Errorf("%d reads and %d writes, want about 30%% reads", rep.Read.Ops, rep.Write.Ops)
	}
	// Verify re-reads each distinct block written, at most all writes.
	if !rep.Verify.OK || rep.Verify.CheckedBytes == 0 || rep.Verify.CheckedBytes > rep.Write.Bytes || rep.Verify.CheckedBytes%4096 != 0 {
		t.Errorf("verify %+v after %d bytes written", rep.Verify, rep.Write.Bytes)
	}

	// A write corrupted on its way to the target is caught by the
	// verify pass. Write every block so the corrupted one is covered.
	const bad = 1<<20 + 77
	cfg = Config{Name: path, Mode: ModeWrite, BlockSize: 4096, QueueDepth: 8, Verify: true, Seed: 6}
	rep, err := Run(context.Background(), &corrupting{Target: f, at: bad}, cfg)
	var m *MismatchError
	if !errors.As(err, &m) || m.Offset != bad || rep.Verify.OK || *rep.Verify.FirstMismatchOffset != bad {
		t.Errorf("corrupted write: err %v, verify %+v; want a mismatch at %d", err, rep.Verify, bad)
	}
}

func TestRuntimeBoundsRandomRun(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	f := openTestFile(t, path, OpenOptions{Write: true, Size: 8 << 20})
	start := time.Now()
	rep := mustRun(t, f, Config{Mode: ModeRandWrite, BlockSize: 4096, QueueDepth: 4, Runtime: 300 * time.Millisecond})
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("a 300 ms run took %v", took)
	}
	if rep.Write.Ops == 0 || rep.Write.Bytes != rep.Write.Ops*4096 || rep.Read.Ops != 0 || !rep.Flushed {
		t.Errorf("report %+v", rep)
	}
	if rep.Seconds < 0.3 {
		t.Errorf("ran %.3f s, want at least the 0.3 s runtime", rep.Seconds)
	}
}

func TestCancelGivesPartialReport(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	f := openTestFile(t, path, OpenOptions{Write: true, Size: 8 << 20})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	rep, err := Run(ctx, f, Config{Mode: ModeRandRW, BlockSize: 4096, QueueDepth: 4, Runtime: time.Minute, ReadPercent: 50})
	// Scripts read the exit status: a partial run is not a result.
	if !errors.Is(err, ErrInterrupted) || errors.Is(err, ErrVerifyIncomplete) {
		t.Fatalf("a cancelled run: %v, want ErrInterrupted alone", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("cancellation took %v", took)
	}
	if !rep.Interrupted || rep.Ops == 0 || rep.Flushed || rep.Error != "" {
		t.Errorf("interrupted %v, %d ops, flushed %v, error %q; want a partial, unflushed report of no failure", rep.Interrupted, rep.Ops, rep.Flushed, rep.Error)
	}

	// A verify cut short says so too.
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	rep, err = Run(cancelled, f, Config{Mode: ModeWrite, BlockSize: 4096, QueueDepth: 4, Verify: true})
	if !errors.Is(err, ErrInterrupted) || !errors.Is(err, ErrVerifyIncomplete) || rep == nil || rep.Verify.OK {
		t.Errorf("a cancelled verify run: %v, report %+v; want ErrInterrupted and ErrVerifyIncomplete with a report", err, rep)
	}
}

func TestWritesNeedForce(t *testing.T) {
	dir := t.TempDir()
	full := filepath.Join(dir, "full.img")
	if err := os.WriteFile(full, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty.img")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.img")

	tests := []struct {
		name    string
		path    string
		o       OpenOptions
		wantErr string // "" = opens
	}{
		{name: "non-empty file", path: full, o: OpenOptions{Write: true},
			wantErr: "refusing to write to non-empty file " + full + " (1.0 MiB, 1048576 bytes): all of it would be overwritten"},
		{name: "part of a non-empty file", path: full, o: OpenOptions{Write: true, Size: 4096},
			wantErr: "its first 4.0 KiB would be overwritten"},
		{name: "non-empty file with force", path: full, o: OpenOptions{Write: true, Force: true}},
		{name: "reading needs no force", path: full, o: OpenOptions{}},
		{name: "empty file", path: empty, o: OpenOptions{Write: true, Size: 1 << 20}},
		{name: "missing file is created for writes", path: missing, o: OpenOptions{Write: true, Size: 1 << 20}},
		{name: "reads never create", path: filepath.Join(dir, "other.img"), o: OpenOptions{Size: 1 << 20}, wantErr: "does not exist"},
		{name: "created files need a size", path: filepath.Join(dir, "other.img"), o: OpenOptions{Write: true}, wantErr: "give --size"},
		{name: "reads never extend", path: full, o: OpenOptions{Size: 2 << 20}, wantErr: "larger than file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := OpenFile(tt.path, tt.o)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				f.Close()
				return
			}
			if err == nil {
				f.Close()
				t.Fatalf("OpenFile succeeded, want an error containing %q", tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q, want it to contain %q", err, tt.wantErr)
			}
		})
	}
	if _, err := OpenFile(full, OpenOptions{Write: true}); !errors.Is(err, ErrOverwrite) {
		t.Errorf("errors.Is(%v, ErrOverwrite) = false", err)
	}
	if st, err := os.Stat(filepath.Join(dir, "other.img")); err == nil {
		t.Errorf("a refused open left a file behind: %v", st)
	}
}

func TestConfigValidate(t *testing.T) {
	ok := Config{Mode: ModeRandRead, BlockSize: 4096, QueueDepth: 32, Runtime: time.Second}
	tests := []struct {
		name    string
		edit    func(*Config)
		size    int64
		align   int
		wantErr string
	}{
		{name: "ok", edit: func(*Config) {}, size: 1 << 20, align: 512},
		{name: "zero block size", edit: func(c *Config) { c.BlockSize = 0 }, size: 1 << 20, wantErr: "must be positive"},
		{name: "block over 32 MiB", edit: func(c *Config) { c.BlockSize = 64 << 20 }, size: 1 << 30, wantErr: "32 MiB"},
		{name: "zero queue depth", edit: func(c *Config) { c.QueueDepth = 0 }, size: 1 << 20, wantErr: "queue depth"},
		{name: "random run without a bound", edit: func(c *Config) { c.Runtime = 0 }, size: 1 << 20, wantErr: "runtime or an I/O limit"},
		{name: "sequential run needs no bound", edit: func(c *Config) { c.Mode, c.Runtime = ModeRead, 0 }, size: 1 << 20},
		{name: "unaligned direct block", edit: func(c *Config) { c.BlockSize = 1000 }, size: 1 << 20, align: 512, wantErr: "not a multiple of 512"},
		{name: "unaligned block without direct", edit: func(c *Config) { c.BlockSize = 1000 }, size: 1 << 20, align: 1},
		{name: "unaligned direct size", edit: func(c *Config) { c.Mode = ModeRead }, size: 1<<20 + 1, align: 512, wantErr: "size 1048577"},
		{name: "region under a block", edit: func(*Config) {}, size: 2048, wantErr: "smaller than one"},
		{name: "bad mix", edit: func(c *Config) { c.Mode, c.ReadPercent = ModeRandRW, 101 }, size: 1 << 20, wantErr: "read percentage"},
		{name: "I/O limit", edit: func(c *Config) { c.IOLimit = 1 << 20 }, size: 1 << 20},
		{name: "I/O limit on a sequential run", edit: func(c *Config) { c.Mode, c.IOLimit = ModeRead, 1<<20 }, size: 4 << 20,
			wantErr: "bounds random modes only; a read run covers its region once: give the region instead (--size 1048576)"},
		{name: "I/O limit under a block", edit: func(c *Config) { c.IOLimit = 1000 }, size: 1 << 20,
			wantErr: "I/O limit 1000 B is less than one 4.0 KiB request, so the run would do nothing"},
		{name: "read verify without the write run's seed", edit: func(c *Config) { c.Verify = true }, size: 1 << 20,
			wantErr: "give that run's seed"},
		{name: "read verify with a seed", edit: func(c *Config) { c.Verify, c.Seed = true, 8 }, size: 1 << 20},
		// Flags a mode would ignore are refused, as --io is above.
		{name: "FUA on a read run", edit: func(c *Config) { c.FUA = true }, size: 1 << 20,
			wantErr: "FUA (--fua) makes writes durable, and a randread run writes nothing"},
		{name: "FUA on a write run", edit: func(c *Config) { c.Mode, c.FUA = ModeRandWrite, true }, size: 1 << 20},
		{name: "read percentage outside randrw", edit: func(c *Config) { c.Mode, c.ReadPercent = ModeRandWrite, 50 }, size: 1 << 20,
			wantErr: "a read percentage (--rwmix-read) sets the mix of randrw only; a randwrite run would ignore it"},
		{name: "read percentage in randrw", edit: func(c *Config) { c.Mode, c.ReadPercent = ModeRandRW, 0 }, size: 1 << 20},
		{name: "negative timeout", edit: func(c *Config) { c.Timeout = -time.Second }, size: 1 << 20, wantErr: "timeout must not be negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := ok
			tt.edit(&c)
			err := c.Validate(tt.size, max(tt.align, 1))
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("Validate: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("Validate = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

func TestAlignedBuffer(t *testing.T) {
	for _, n := range []int{512, 4096, 1 << 20, 4097} {
		b := alignedBuffer(n, bufferAlign)
		if len(b) != n || cap(b) != n {
			t.Errorf("alignedBuffer(%d, bufferAlign): len %d cap %d", n, len(b), cap(b))
		}
		if addr := uintptrOf(b); addr%4096 != 0 {
			t.Errorf("alignedBuffer(%d, bufferAlign) at %#x, not 4096-aligned", n, addr)
		}
		// Where statx asks for more (DIOALIGN's memory alignment).
		for _, align := range []int{8192, 1 << 16} {
			b := alignedBuffer(n, align)
			if len(b) != n || cap(b) != n || uintptrOf(b)%uintptr(align) != 0 {
				t.Errorf("alignedBuffer(%d, %d): len %d cap %d at %#x", n, align, len(b), cap(b), uintptrOf(b))
			}
		}
	}
}

// memAligned asks for buffers aligned to more than a page, and records the
// addresses it gets.
type memAligned struct {
	Target
	align int
	bad   atomic.Int64
}

func (m *memAligned) MemoryAlignment() int { return m.align }

func (m *memAligned) check(p []byte) {
	if uintptrOf(p)%uintptr(m.align) != 0 {
		m.bad.Add(1)
	}
}

func (m *memAligned) ReadAt(ctx context.Context, p []byte, off int64) error {
	m.check(p)
	return m.Target.ReadAt(ctx, p, off)
}

func (m *memAligned) WriteAt(ctx context.Context, p []byte, off int64, durable bool) error {
	m.check(p)
	return m.Target.WriteAt(ctx, p, off, durable)
}

func TestRunAlignsBuffersForTarget(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	m := &memAligned{Target: openTestFile(t, path, OpenOptions{Write: true, Size: 1 << 20}), align: 1 << 16}
	mustRun(t, m, Config{Mode: ModeWrite, BlockSize: 64 << 10, QueueDepth: 4, Verify: true})
	if n := m.bad.Load(); n != 0 {
		t.Errorf("%d requests had buffers not aligned to the target's %d bytes", n, m.align)
	}
}

// memTarget is a target in memory that records what each write sent.
type memTarget struct {
	mu     sync.Mutex
	data   []byte
	writes [][]byte
}

func newMemTarget(size int) *memTarget { return &memTarget{data: make([]byte, size)} }

func (m *memTarget) ReadAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(p, m.data[off:])
	return nil
}

func (m *memTarget) WriteAt(_ context.Context, p []byte, off int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	m.writes = append(m.writes, bytes.Clone(p))
	return nil
}

func (m *memTarget) Flush(context.Context) error { return nil }
func (m *memTarget) Size() int64                 { return int64(len(m.data)) }
func (m *memTarget) Close() error                { return nil }

// Writes send incompressible data that differs from block to block, also
// when reads in randrw fill a buffer of their own with the zeroes of a
// fresh target: no layer that compresses, detects zeroes or deduplicates
// may flatter the figures.
func TestWritesSendDistinctIncompressibleData(t *testing.T) {
	tests := []struct {
		name string
		mode Mode
		bs   int
		mix  int
	}{
		{name: "randrw", mode: ModeRandRW, bs: 4096, mix: 50},
		{name: "randrw mostly reads", mode: ModeRandRW, bs: 4096, mix: 90},
		{name: "randwrite", mode: ModeRandWrite, bs: 4096},
		{name: "randrw of 64 KiB", mode: ModeRandRW, bs: 64 << 10, mix: 50},
		{name: "write of 512 bytes", mode: ModeWrite, bs: 512},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMemTarget(4 << 20)
			cfg := Config{Mode: tt.mode, BlockSize: tt.bs, QueueDepth: 4, ReadPercent: tt.mix, Seed: 3}
			if tt.mode.Random() {
				cfg.IOLimit = 2 << 20
			}
			mustRun(t, m, cfg)
			if len(m.writes) == 0 {
				t.Fatal("no writes")
			}
			zero := make([]byte, 512)
			seen := map[string]bool{}
			var zeroes, dups int
			for _, w := range m.writes {
				// Every 512-byte sector: none all zero, none like
				// another where a word varies (each 4 KiB).
				for i := 0; i < len(w); i += 512 {
					if bytes.Equal(w[i:i+512], zero) {
						zeroes++
					}
				}
				for i := 0; i < len(w); i += 4096 {
					b := string(w[i:min(i+4096, len(w))])
					if seen[b] {
						dups++
					}
					seen[b] = true
				}
			}
			if zeroes != 0 || dups != 0 {
				t.Errorf("of %d writes: %d sectors all zero, %d blocks like an earlier one; want none", len(m.writes), zeroes, dups)
			}
		})
	}
}

// stalling never answers the requests stall picks, until ctx ends.
type stalling struct {
	*memTarget
	stall func(op int) bool
}

func (s *stalling) ReadAt(ctx context.Context, p []byte, off int64) error {
	if s.stall(opRead) {
		<-ctx.Done()
		return ctx.Err()
	}
	return s.memTarget.ReadAt(ctx, p, off)
}

func (s *stalling) WriteAt(ctx context.Context, p []byte, off int64, durable bool) error {
	if s.stall(opWrite) {
		<-ctx.Done()
		return ctx.Err()
	}
	return s.memTarget.WriteAt(ctx, p, off, durable)
}

func (s *stalling) Flush(ctx context.Context) error {
	if s.stall(opFlush) {
		<-ctx.Done()
		return ctx.Err()
	}
	return nil
}

// A target that stops answering ends the run after the timeout, with an
// error that names it and the request it left unanswered, whatever the
// phase: the run, the closing flush or the verify.
func TestTimeoutEndsStalledRun(t *testing.T) {
	const timeout = 50 * time.Millisecond
	tests := []struct {
		name    string
		cfg     Config
		stall   func(op int) bool
		wantReq string
	}{
		{name: "random reads with a runtime", cfg: Config{Mode: ModeRandRead, QueueDepth: 4, Runtime: time.Hour},
			stall: func(op int) bool { return true }, wantReq: "to a read of 4.0 KiB at offset "},
		{name: "sequential writes", cfg: Config{Mode: ModeWrite, QueueDepth: 1},
			stall: func(op int) bool { return true }, wantReq: "to a write of 4.0 KiB at offset 0:"},
		{name: "closing flush", cfg: Config{Mode: ModeWrite, QueueDepth: 2},
			stall: func(op int) bool { return op == opFlush }, wantReq: "to the closing flush:"},
		{name: "verify", cfg: Config{Mode: ModeWrite, QueueDepth: 2, Verify: true},
			stall: func(op int) bool { return op == opRead }, wantReq: "to a verify read of 4.0 KiB at offset "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			cfg.Name, cfg.BlockSize, cfg.Timeout = "nbd://stalled/vm1", 4096, timeout
			type result struct {
				rep *Report
				err error
			}
			done := make(chan result, 1)
			go func() {
				rep, err := Run(context.Background(), &stalling{memTarget: newMemTarget(1 << 20), stall: tt.stall}, cfg)
				done <- result{rep, err}
			}()
			var res result
			select {
			case res = <-done:
			case <-time.After(20 * time.Second): // a guard, not synchronisation
				t.Fatalf("Run still waits on a stalled target 20 s after its %v timeout", timeout)
			}
			var te *TimeoutError
			if !errors.As(res.err, &te) || !errors.Is(res.err, ErrTimeout) || errors.Is(res.err, ErrInterrupted) {
				t.Fatalf("Run: %v, want a *TimeoutError", res.err)
			}
			want := "no reply from nbd://stalled/vm1 within 50ms " + tt.wantReq
			if !strings.HasPrefix(res.err.Error(), want) {
				t.Errorf("error %q, want it to begin %q", res.err, want)
			}
			if res.rep == nil || res.rep.Error != res.err.Error() || res.rep.Interrupted {
				t.Errorf("report %+v, want the error in it and not interrupted", res.rep)
			}
			if cfg.Verify && (res.rep.Verify == nil || res.rep.Verify.OK) {
				t.Errorf("verify %+v after a timeout, want not ok", res.rep.Verify)
			}
		})
	}
}

// directTarget needs requests aligned as O_DIRECT on 4 KiB sectors does.
type directTarget struct{ *memTarget }

func (directTarget) Alignment() int { return 4096 }

// An NBD export's alignment is its minimum block size, which --direct=false
// does not lift: the refusal says so, and what to give instead.
func TestAlignmentErrorNamesItsReason(t *testing.T) {
	tests := []struct {
		name    string
		target  Target
		cfg     Config
		wantErr string
	}{
		{name: "export, block size", target: &NBD{size: 1 << 20, align: 4096}, cfg: Config{Mode: ModeRead, BlockSize: 512, QueueDepth: 1},
			wantErr: "block size 512 is not a multiple of 4096, the export's minimum block size: give a --bs that is a multiple of it"},
		{name: "export, size", target: &NBD{size: 6000, align: 4096}, cfg: Config{Mode: ModeRead, BlockSize: 4096, QueueDepth: 1},
			wantErr: "size 6000 is not a multiple of 4096, the export's minimum block size: give a --size that is a multiple of it"},
		{name: "direct I/O", target: directTarget{newMemTarget(1 << 20)}, cfg: Config{Mode: ModeRead, BlockSize: 512, QueueDepth: 1},
			wantErr: "block size 512 is not a multiple of 4096, which direct I/O needs (or use --direct=false)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Run(context.Background(), tt.target, tt.cfg)
			if err == nil || err.Error() != tt.wantErr {
				t.Errorf("Run: %v, want %q", err, tt.wantErr)
			}
		})
	}
}

// The progress line shows the runtime as given, not rounded to seconds.
func TestProgressLine(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		p    progress
		want string // the end of the line
	}{
		{name: "runtime under a whole second", cfg: Config{Mode: ModeRandRead, Runtime: 2500 * time.Millisecond},
			p: progress{elapsed: 1520 * time.Millisecond, bytes: 1 << 20}, want: "1.0 MiB done  1.5s / 2.5s"},
		{name: "runtime in minutes", cfg: Config{Mode: ModeRandWrite, Runtime: 90 * time.Second},
			p: progress{elapsed: 61 * time.Second, bytes: 1 << 30}, want: "1.0 GiB done  1m1s / 1m30s"},
		{name: "sequential run", cfg: Config{Mode: ModeRead},
			p: progress{elapsed: 2 * time.Second, bytes: 1 << 20}, want: "1.0 MiB done  2s  (25%)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &runner{cfg: tt.cfg, size: 4 << 20}
			if got := r.runLine(tt.p); !strings.HasSuffix(got, tt.want) {
				t.Errorf("progress line %q, want it to end %q", got, tt.want)
			}
		})
	}
}

// lineWatch is a terminal that tells when a line with a word has been
// written to it.
type lineWatch struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	word string
	seen chan struct{}
}

func (w *lineWatch) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if w.seen != nil && strings.Contains(w.buf.String(), w.word) {
		close(w.seen)
		w.seen = nil
	}
	return len(p), nil
}

func (w *lineWatch) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// readsAfter holds every read until ch is closed (or ctx ends).
type readsAfter struct {
	*memTarget
	ch <-chan struct{}
}

func (r *readsAfter) ReadAt(ctx context.Context, p []byte, off int64) error {
	select {
	case <-r.ch:
	case <-ctx.Done():
		return ctx.Err()
	}
	return r.memTarget.ReadAt(ctx, p, off)
}

// The verify has a progress line of its own: a large one would otherwise
// show nothing for as long as it takes. The verify's reads wait for it.
func TestVerifyShowsProgress(t *testing.T) {
	w := &lineWatch{word: "verify ", seen: make(chan struct{})}
	target := &readsAfter{memTarget: newMemTarget(1 << 20), ch: w.seen}
	// A guard, not synchronisation: without a verify line the reads
	// would wait for ever.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := Run(ctx, target, Config{Mode: ModeWrite, BlockSize: 64 << 10, QueueDepth: 2, Verify: true,
		Progress: w, ProgressInterval: time.Millisecond})
	if err != nil {
		t.Fatalf("Run: %v (progress: %q)", err, w.String())
	}
	out := w.String()
	if !strings.Contains(out, "of 1.0 MiB checked") || !strings.HasSuffix(out, "\r\x1b[K") {
		t.Errorf("progress %q, want a verify line of the 1.0 MiB to check, cleared at the end", out)
	}
}
