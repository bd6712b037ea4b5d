package server

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestZeroRuns(t *testing.T) {
	const k = 1024
	buf := func(n int, dataAt ...int) []byte {
		b := make([]byte, n)
		for _, i := range dataAt {
			b[i] = 1
		}
		return b
	}
	tests := []struct {
		name string
		data []byte
		off  int64
		want []zeroRun
	}{
		{"all zero, aligned", buf(128 * k), 0, []zeroRun{{0, 128 * k}}},
		{"all data", buf(128*k, 0, 4*k, 8*k, 12*k, 16*k, 20*k, 24*k, 28*k, 32*k, 36*k, 40*k, 44*k, 48*k, 52*k, 56*k, 60*k,
			64*k, 68*k, 72*k, 76*k, 80*k, 84*k, 88*k, 92*k, 96*k, 100*k, 104*k, 108*k, 112*k, 116*k, 120*k, 124*k), 0, nil},
		{"data in the middle splits the run", buf(256*k, 128*k), 0, []zeroRun{{0, 128 * k}, {132 * k, 256 * k}}},
		{"a short run is data", buf(128*k, 60*k), 0, []zeroRun{{64 * k, 128 * k}}},
		{"unaligned offset: runs start on export blocks", buf(132 * k), 100, []zeroRun{{4*k - 100, 4*k - 100 + 128*k}}},
		{"last byte set", buf(128*k, 128*k-1), 0, []zeroRun{{0, 124 * k}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, zeroRuns(tt.data, tt.off), cmp.AllowUnexported(zeroRun{})); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}
