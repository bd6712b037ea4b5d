package bench

import (
	"errors"
	"testing"
)

func TestPatternRoundTrip(t *testing.T) {
	// Unaligned offsets and lengths take the byte-at-a-time edges.
	for _, tc := range []struct{ off, n int64 }{{0, 4096}, {3, 17}, {4093, 4100}, {1 << 40, 512}, {5, 3}} {
		p := make([]byte, tc.n)
		FillPattern(p, tc.off, 42)
		if err := CheckPattern(p, tc.off, 42); err != nil {
			t.Errorf("off %d len %d: %v", tc.off, tc.n, err)
		}
		// The same bytes read as one piece or two agree.
		q := make([]byte, tc.n)
		half := tc.n / 2
		FillPattern(q[:half], tc.off, 42)
		FillPattern(q[half:], tc.off+half, 42)
		if string(p) != string(q) {
			t.Errorf("off %d len %d: filled in two pieces differs", tc.off, tc.n)
		}
	}
}

func TestPatternDetects(t *testing.T) {
	p := make([]byte, 8192)
	FillPattern(p, 4096, 7)
	tests := []struct {
		name   string
		data   func() []byte
		off    int64
		seed   uint64
		wantAt int64
	}{
		{name: "flipped byte", off: 4096, seed: 7, wantAt: 4096 + 5000, data: func() []byte {
			q := append([]byte(nil), p...)
			q[5000] ^= 0x10
			return q
		}},
		{name: "stale data from another seed", off: 4096, seed: 8, wantAt: 4096},
		{name: "data from another offset", off: 0, seed: 7, wantAt: 0},
		{name: "zeroes", off: 4096, seed: 7, wantAt: 4096, data: func() []byte { return make([]byte, 8192) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := p
			if tt.data != nil {
				data = tt.data()
			}
			err := CheckPattern(data, tt.off, tt.seed)
			var m *MismatchError
			if !errors.As(err, &m) {
				t.Fatalf("CheckPattern = %v, want a *MismatchError", err)
			}
			if m.Offset != tt.wantAt {
				t.Errorf("mismatch at %d, want %d", m.Offset, tt.wantAt)
			}
		})
	}
}
