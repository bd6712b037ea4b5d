package bench

import "sync/atomic"

// bitmap marks the chunks (of the block size) a run wrote, from many
// workers; 1 TiB of 4 KiB blocks takes 32 MiB.
type bitmap struct {
	words []atomic.Uint64
}

func newBitmap(n int64) *bitmap {
	return &bitmap{words: make([]atomic.Uint64, (n+63)/64)}
}

func (b *bitmap) set(i int64) { b.words[i/64].Or(1 << (i % 64)) }
