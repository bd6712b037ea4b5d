package bench

import (
	"math"
	"math/bits"
	"time"
)

// Histogram records latencies in nanoseconds in fixed log-linear buckets,
// like HdrHistogram: each power of two is split into 128 linear buckets, so a
// reported percentile is within 1/128 (0.8%) of the true value, values under
// 256 ns are exact, and the memory is fixed (36 KiB) however many samples go
// in. It is not safe for concurrent use: each worker keeps its own and they
// are merged.
type Histogram struct {
	counts [histBuckets]uint64
	total  uint64
	sum    float64
	min    uint64
	max    uint64
}

const (
	histSubBits = 7                  // 128 linear buckets per power of two
	histMaxBits = 40                 // values up to 2^40 ns (18 minutes)
	histMax     = 1<<histMaxBits - 1 // larger values are clamped
	histBuckets = (histMaxBits - histSubBits + 1) << histSubBits
)

func bucketOf(v uint64) int {
	shift := max(0, bits.Len64(v)-(histSubBits+1))
	return shift<<histSubBits + int(v>>shift)
}

// bucketHigh is the largest value that falls in bucket i.
func bucketHigh(i int) uint64 {
	if i < 2<<histSubBits {
		return uint64(i)
	}
	shift := i>>histSubBits - 1
	m := uint64(i - shift<<histSubBits)
	return (m+1)<<shift - 1
}

// Record adds one sample.
func (h *Histogram) Record(d time.Duration) {
	v := uint64(max(d, 0))
	if v > histMax {
		v = histMax
	}
	h.counts[bucketOf(v)]++
	if h.total == 0 || v < h.min {
		h.min = v
	}
	if v > h.max {
		h.max = v
	}
	h.total++
	h.sum += float64(v)
}

// Merge adds o's samples to h.
func (h *Histogram) Merge(o *Histogram) {
	if o.total == 0 {
		return
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	if h.total == 0 || o.min < h.min {
		h.min = o.min
	}
	h.max = max(h.max, o.max)
	h.total += o.total
	h.sum += o.sum
}

// Count is the number of samples.
func (h *Histogram) Count() uint64 { return h.total }

// Min is the smallest sample.
func (h *Histogram) Min() time.Duration { return time.Duration(h.min) }

// Max is the largest sample.
func (h *Histogram) Max() time.Duration { return time.Duration(h.max) }

// Mean is the exact average of the samples.
func (h *Histogram) Mean() time.Duration {
	if h.total == 0 {
		return 0
	}
	return time.Duration(math.Round(h.sum / float64(h.total)))
}

// Quantile returns the value at or below which a fraction q (0.99 for p99)
// of the samples lie: the highest value of the bucket holding that sample,
// never more than the largest sample.
func (h *Histogram) Quantile(q float64) time.Duration {
	if h.total == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.total)))
	switch {
	case rank <= 1:
		return time.Duration(h.min)
	case rank >= h.total:
		return time.Duration(h.max)
	}
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			return time.Duration(min(max(bucketHigh(i), h.min), h.max))
		}
	}
	return time.Duration(h.max)
}
