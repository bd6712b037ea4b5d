package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"time"
)

// Report is the outcome of a run. Its JSON keys are stable: scripts read them.
type Report struct {
	Target      string `json:"target"`
	TargetKind  string `json:"target_kind"`
	Mode        string `json:"mode"`
	BlockSize   int    `json:"block_size"`
	QueueDepth  int    `json:"queue_depth"`
	Connections int    `json:"connections"`
	// Size is the region the run used, from offset 0.
	Size int64 `json:"size"`
	FUA  bool  `json:"fua"`
	// Seed is the seed the run used, drawn afresh unless given: a later
	// read run with Verify checks a write run's data by it.
	Seed uint64 `json:"seed"`

	// Totals over reads and writes; Seconds includes the closing flush
	// of a run that wrote, sequential or random.
	Seconds   float64 `json:"seconds"`
	Bytes     int64   `json:"bytes"`
	Ops       int64   `json:"ops"`
	MBPerSec  float64 `json:"mb_per_s"`
	MiBPerSec float64 `json:"mib_per_s"`
	IOPS      float64 `json:"iops"`

	Read  OpReport `json:"read"`
	Write OpReport `json:"write"`

	// Flushed says the closing flush of a run that wrote (write,
	// randwrite, randrw) completed, in FlushSeconds, which Seconds
	// includes.
	Flushed      bool    `json:"flushed"`
	FlushSeconds float64 `json:"flush_seconds"`

	// Verify is null unless the run verified data.
	Verify *VerifyReport `json:"verify"`

	// Interrupted is set when the run was cancelled (Ctrl-C) and the
	// figures cover only what completed.
	Interrupted bool   `json:"interrupted"`
	Error       string `json:"error"`
}

// OpReport covers one kind of request.
type OpReport struct {
	Ops       int64         `json:"ops"`
	Bytes     int64         `json:"bytes"`
	MBPerSec  float64       `json:"mb_per_s"`
	MiBPerSec float64       `json:"mib_per_s"`
	IOPS      float64       `json:"iops"`
	Latency   LatencyReport `json:"latency_us"`
}

// LatencyReport is request latency in microseconds.
type LatencyReport struct {
	Min  float64 `json:"min"`
	Mean float64 `json:"mean"`
	P50  float64 `json:"p50"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p99_9"`
	Max  float64 `json:"max"`
}

// VerifyReport is the outcome of the data check.
type VerifyReport struct {
	OK           bool    `json:"ok"`
	CheckedBytes int64   `json:"checked_bytes"`
	Seconds      float64 `json:"seconds"`
	// MismatchedBlocks counts requests whose data was wrong.
	MismatchedBlocks int64 `json:"mismatched_blocks"`
	// FirstMismatchOffset is the lowest offset found wrong, or null.
	FirstMismatchOffset *int64 `json:"first_mismatch_offset"`
}

func newReport(t Target, cfg Config, size int64) *Report {
	rep := &Report{
		Target: cfg.Name, Mode: cfg.Mode.String(), BlockSize: cfg.BlockSize,
		QueueDepth: cfg.QueueDepth, Connections: 1, Size: size, FUA: cfg.FUA, Seed: cfg.Seed,
	}
	if d, ok := t.(Describer); ok {
		rep.TargetKind = d.Describe()
	}
	if c, ok := t.(interface{ Connections() int }); ok {
		rep.Connections = c.Connections()
	}
	if cfg.Verify {
		rep.Verify = &VerifyReport{}
	}
	return rep
}

func (rep *Report) fill(elapsed time.Duration, hist [2]Histogram, bytes [2]int64) {
	secs := elapsed.Seconds()
	rep.Seconds = secs
	rep.Read = opReport(&hist[opRead], bytes[opRead], secs)
	rep.Write = opReport(&hist[opWrite], bytes[opWrite], secs)
	rep.Bytes = rep.Read.Bytes + rep.Write.Bytes
	rep.Ops = rep.Read.Ops + rep.Write.Ops
	if secs > 0 {
		rep.MBPerSec = float64(rep.Bytes) / secs / 1e6
		rep.MiBPerSec = float64(rep.Bytes) / secs / (1 << 20)
		rep.IOPS = float64(rep.Ops) / secs
	}
}

func opReport(h *Histogram, bytes int64, secs float64) OpReport {
	us := func(d time.Duration) float64 { return float64(d) / 1e3 }
	o := OpReport{
		Ops: int64(h.Count()),
		Latency: LatencyReport{
			Min: us(h.Min()), Mean: us(h.Mean()), P50: us(h.Quantile(0.50)),
			P99: us(h.Quantile(0.99)), P999: us(h.Quantile(0.999)), Max: us(h.Max()),
		},
	}
	o.Bytes = bytes
	if secs > 0 {
		o.MBPerSec = float64(o.Bytes) / secs / 1e6
		o.MiBPerSec = float64(o.Bytes) / secs / (1 << 20)
		o.IOPS = float64(o.Ops) / secs
	}
	return o
}

// WriteJSON writes the report as one JSON object and a newline.
func (rep *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}

// WriteText writes the report for people.
func (rep *Report) WriteText(w io.Writer) error {
	ew := &errWriter{w: w}
	kind := rep.TargetKind
	if rep.Connections > 1 {
		kind += fmt.Sprintf(", %d connections", rep.Connections)
	}
	ew.printf("%s %s (%s)\n", rep.Mode, rep.Target, kind)
	ew.printf("  block size %s, queue depth %d, region %s, seed %d", formatIBytes(int64(rep.BlockSize)), rep.QueueDepth, formatIBytes(rep.Size), rep.Seed)
	if rep.FUA {
		ew.printf(", FUA on every write")
	}
	ew.printf("\n")
	line := func(name string, o OpReport) {
		ew.printf("  %-6s %10.1f MB/s (%.1f MiB/s)  %9.0f IOPS  %d bytes (%s) in %.3f s\n",
			name, o.MBPerSec, o.MiBPerSec, o.IOPS, o.Bytes, formatIBytes(o.Bytes), rep.Seconds)
		l := o.Latency
		ew.printf("         latency p50 %s  p99 %s  p99.9 %s  (min %s, mean %s, max %s)\n",
			fmtMicros(l.P50), fmtMicros(l.P99), fmtMicros(l.P999), fmtMicros(l.Min), fmtMicros(l.Mean), fmtMicros(l.Max))
	}
	if rep.Read.Ops > 0 || rep.Mode == ModeRead.String() || rep.Mode == ModeRandRead.String() {
		line("read", rep.Read)
	}
	if rep.Write.Ops > 0 || rep.Mode == ModeWrite.String() || rep.Mode == ModeRandWrite.String() {
		line("write", rep.Write)
	}
	if rep.Read.Ops > 0 && rep.Write.Ops > 0 {
		ew.printf("  %-6s %10.1f MB/s (%.1f MiB/s)  %9.0f IOPS  %d bytes (%s)\n",
			"total", rep.MBPerSec, rep.MiBPerSec, rep.IOPS, rep.Bytes, formatIBytes(rep.Bytes))
	}
	if rep.Flushed {
		ew.printf("  flush  %.3f s, included in the time\n", rep.FlushSeconds)
	}
	if v := rep.Verify; v != nil {
		switch {
		case v.FirstMismatchOffset != nil:
			ew.printf("  verify FAILED: first mismatch at offset %d (0x%x); %d requests had wrong data; %s checked\n",
				*v.FirstMismatchOffset, *v.FirstMismatchOffset, v.MismatchedBlocks, formatIBytes(v.CheckedBytes))
		case v.OK:
			ew.printf("  verify ok: %s checked against seed %d", formatIBytes(v.CheckedBytes), rep.Seed)
			if v.Seconds > 0 {
				ew.printf(" in %.3f s", v.Seconds)
			}
			ew.printf("\n")
			if rep.Mode == ModeWrite.String() {
				// A random run wrote only some blocks: a read run
				// over the region would find the others wrong.
				ew.printf("         check it again later with --mode read --verify --seed %d --size %d\n", rep.Seed, rep.Size)
			}
		default:
			ew.printf("  verify incomplete: %s checked\n", formatIBytes(v.CheckedBytes))
		}
	}
	if rep.Interrupted {
		ew.printf("  interrupted: the figures cover only what completed\n")
	}
	if rep.Error != "" {
		ew.printf("  error: %s\n", rep.Error)
	}
	return ew.err
}

func fmtMicros(us float64) string {
	switch {
	case us >= 1e6:
		return fmt.Sprintf("%.2f s", us/1e6)
	case us >= 1e3:
		return fmt.Sprintf("%.2f ms", us/1e3)
	default:
		return fmt.Sprintf("%.0f µs", us)
	}
}

type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) printf(format string, args ...any) {
	if e.err == nil {
		_, e.err = fmt.Fprintf(e.w, format, args...)
	}
}
