package server

import (
	"math/bits"
	"sync"
)

// Buffers come from pools by power-of-two size class, so a 4 KiB request
// never holds a 32 MiB buffer and steady traffic allocates nothing.
const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 25 // 32 MiB, the largest payload
)

var bufPools [maxClassShift - minClassShift + 1]sync.Pool

func classOf(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a buffer of length n (n ≤ 32 MiB) to give back with putBuf.
func getBuf(n int) []byte {
	c := classOf(n)
	if c >= len(bufPools) {
		// Callers bound n by the maximum payload; this only keeps a
		// future mistake from panicking the whole server.
		return make([]byte, n)
	}
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<(c+minClassShift))
}

// putBuf returns b, which came from getBuf, to its pool.
func putBuf(b []byte) {
	c := classOf(cap(b))
	if c >= len(bufPools) || cap(b) != 1<<(c+minClassShift) {
		return // not ours
	}
	b = b[:cap(b)]
	bufPools[c].Put(&b)
}
