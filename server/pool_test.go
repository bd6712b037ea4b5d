package server

import "testing"

func TestPoolSizeClasses(t *testing.T) {
	for _, n := range []int{1, 4096, 4097, 1 << 20, 32 << 20, 32<<20 + 1, 64 << 20} {
		b := getBuf(n)
		if len(b) != n {
			t.Fatalf("getBuf(%d) has length %d", n, len(b))
		}
		putBuf(b)
	}
}
