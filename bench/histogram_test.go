package bench

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

func TestBucketsAreContiguous(t *testing.T) {
	// Every value maps to a bucket whose range holds it, and buckets are
	// ordered: bucket i+1 starts right after bucket i ends.
	prevHigh := uint64(0)
	for i := 1; i < histBuckets; i++ {
		low := prevHigh + 1
		if got := bucketOf(low); got != i {
			t.Fatalf("bucketOf(%d) = %d, want %d", low, got, i)
		}
		high := bucketHigh(i)
		if high < low || bucketOf(high) != i {
			t.Fatalf("bucket %d: [%d, %d], bucketOf(high) = %d", i, low, high, bucketOf(high))
		}
		// log-linear: a bucket is at most 1/128 of its values wide.
		if width := high - low + 1; low >= 256 && float64(width)/float64(low) > 1.0/128 {
			t.Fatalf("bucket %d: [%d, %d] is %.4f of its low end, want ≤ 1/128", i, low, high, float64(width)/float64(low))
		}
		prevHigh = high
	}
	if prevHigh < histMax {
		t.Errorf("last bucket ends at %d, want ≥ %d", prevHigh, uint64(histMax))
	}
}

func TestHistogramQuantiles(t *testing.T) {
	us := time.Microsecond
	tests := []struct {
		name    string
		samples []time.Duration
		q       float64
		want    time.Duration
	}{
		{name: "empty", q: 0.5, want: 0},
		{name: "one", samples: []time.Duration{100}, q: 0.99, want: 100},
		{name: "exact small values", samples: []time.Duration{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, q: 0.5, want: 5},
		{name: "p90 of ten", samples: []time.Duration{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, q: 0.9, want: 9},
		{name: "p100 is the max", samples: []time.Duration{10 * us, 20 * us, 30 * us}, q: 1, want: 30 * us},
		{name: "p0 is the min", samples: []time.Duration{10 * us, 20 * us, 30 * us}, q: 0, want: 10 * us},
		{name: "never above the max", samples: []time.Duration{1000*us + 1}, q: 0.5, want: 1000*us + 1},
		{name: "huge values clamp", samples: []time.Duration{time.Hour}, q: 0.5, want: histMax},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h Histogram
			for _, s := range tt.samples {
				h.Record(s)
			}
			if got := h.Quantile(tt.q); got != tt.want {
				t.Errorf("Quantile(%v) = %v, want %v", tt.q, got, tt.want)
			}
		})
	}
}

func TestHistogramMatchesExactPercentiles(t *testing.T) {
	// A long-tailed latency distribution: 98% around 100 µs, 2% around 5 ms.
	rng := rand.New(rand.NewPCG(1, 2))
	var h, a, b Histogram
	var all []time.Duration
	for i := range 200000 {
		d := time.Duration(50e3 + rng.ExpFloat64()*50e3)
		if rng.IntN(100) < 2 {
			d = time.Duration(2e6 + rng.ExpFloat64()*3e6)
		}
		all = append(all, d)
		h.Record(d)
		if i%2 == 0 {
			a.Record(d)
		} else {
			b.Record(d)
		}
	}
	a.Merge(&b)
	slices.Sort(all)
	for _, q := range []float64{0.5, 0.9, 0.99, 0.999, 0.9999} {
		exact := all[int(q*float64(len(all)))-1]
		for name, hist := range map[string]*Histogram{"direct": &h, "merged": &a} {
			got := hist.Quantile(q)
			// The answer is the top of the bucket holding the exact value.
			if got < exact || float64(got-exact) > float64(exact)/128 {
				t.Errorf("%s: p%v = %v, exact %v: off by more than 1/128", name, q*100, got, exact)
			}
		}
	}
	if h.Count() != uint64(len(all)) || a.Count() != h.Count() {
		t.Errorf("counts %d and %d, want %d", h.Count(), a.Count(), len(all))
	}
	if h.Min() != all[0] || h.Max() != all[len(all)-1] || a.Min() != h.Min() || a.Max() != h.Max() {
		t.Errorf("min/max %v/%v (merged %v/%v), want %v/%v", h.Min(), h.Max(), a.Min(), a.Max(), all[0], all[len(all)-1])
	}
	var sum time.Duration
	for _, d := range all {
		sum += d
	}
	if want := sum / time.Duration(len(all)); h.Mean()-want > 1 || want-h.Mean() > 1 {
		t.Errorf("mean %v, want %v", h.Mean(), want)
	}
}

func BenchmarkHistogramRecord(b *testing.B) {
	var h Histogram
	for i := range b.N {
		h.Record(time.Duration(i&0xfffff) * 100)
	}
}
