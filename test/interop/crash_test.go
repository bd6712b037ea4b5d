package interop

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/nbd"
)

// The server is killed with SIGKILL at random moments while a client
// writes with FUA and FLUSH; after each restart, every write the client was
// told is durable must read back intact. Blocks hold (generation, block
// number) stamps, so a block may show a newer write that was in flight,
// but never an older one than the last durable write, and never a torn one.
func TestCrashConsistency(t *testing.T) {
	requireInterop(t)
	const (
		block  = 4096
		blocks = 2048
		rounds = 12
	)
	img := sparseFile(t, filepath.Join(fastDir(t), "crash.img"), block*blocks)
	rng := rand.New(rand.NewPCG(2026, 11))
	durable := make([]uint64, blocks) // generation the client was told is durable
	issued := make([]uint64, blocks)  // newest generation ever sent
	var gen uint64
	totalChecked, totalDurable := 0, 0
	for round := range rounds {
		s := startServer(t, serverOpts{exports: []string{"crash=" + img}})
		c := dialCodec(t, fmt.Sprintf("127.0.0.1:%d", s.port), "crash")
		killAfter := time.Duration(30+rng.IntN(200)) * time.Millisecond
		killed := time.AfterFunc(killAfter, s.kill)
		n := c.writeUntilDead(rng, &gen, durable, issued, block, blocks)
		killed.Stop()
		s.kill()
		totalDurable += n

		// Restart and check every block through the server.
		s2 := startServer(t, serverOpts{exports: []string{"crash=" + img}})
		r := dialCodec(t, fmt.Sprintf("127.0.0.1:%d", s2.port), "crash")
		for i := range blocks {
			b, err := r.read(uint64(i*block), block)
			if err != nil {
				t.Fatalf("round %d: reading block %d after restart: %v", round, i, err)
			}
			g, idx := binary.BigEndian.Uint64(b), binary.BigEndian.Uint64(b[8:])
			switch {
			case g == 0 && durable[i] == 0:
			case idx != uint64(i) || !stampIntact(b):
				t.Fatalf("round %d: block %d is torn or misplaced (generation %d, index %d)", round, i, g, idx)
			case g < durable[i]:
				t.Fatalf("round %d: block %d holds generation %d, but %d was acknowledged durable", round, i, g, durable[i])
			case g > issued[i]:
				t.Fatalf("round %d: block %d holds generation %d, never written", round, i, g)
			}
			if durable[i] > 0 {
				totalChecked++
			}
		}
		r.disconnect()
		s2.kill() // a kill between rounds too: nothing was in flight
	}
	t.Logf("%d rounds, %d writes acknowledged durable, %d block checks of durable data", rounds, totalDurable, totalChecked)
	if totalDurable == 0 {
		t.Fatal("no write was acknowledged durable: the test checked nothing")
	}
}

// stamp fills b with a pattern derived from its header, so a block that is
// half one write and half another is detected.
func stamp(b []byte, gen, idx uint64) {
	binary.BigEndian.PutUint64(b, gen)
	binary.BigEndian.PutUint64(b[8:], idx)
	for i := 16; i < len(b); i++ {
		b[i] = byte(gen*31 + idx*7 + uint64(i))
	}
}

func stampIntact(b []byte) bool {
	gen, idx := binary.BigEndian.Uint64(b), binary.BigEndian.Uint64(b[8:])
	for i := 16; i < len(b); i++ {
		if b[i] != byte(gen*31+idx*7+uint64(i)) {
			return false
		}
	}
	return true
}

// codecConn is a pipelined client built on lvnbd's own codec; the server's
// behaviour, not the client's, is under test here.
type codecConn struct {
	t  testing.TB
	nc net.Conn
	r  *bufio.Reader
	h  uint64
}

func dialCodec(t testing.TB, addr, export string) *codecConn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(60 * time.Second))
	c := &codecConn{t: t, nc: nc, r: bufio.NewReader(nc)}
	var hello [nbd.ServerHelloSize]byte
	if _, err := io.ReadFull(c.r, hello[:]); err != nil {
		t.Fatal(err)
	}
	b := binary.BigEndian.AppendUint32(nil, uint32(nbd.ClientFlagFixedNewstyle|nbd.ClientFlagNoZeroes))
	b, _ = nbd.OptionHeader{Option: nbd.OptExportName, Length: uint32(len(export))}.AppendBinary(b)
	if _, err := nc.Write(append(b, export...)); err != nil {
		t.Fatal(err)
	}
	var reply [nbd.ExportNameReplySize]byte
	if _, err := io.ReadFull(c.r, reply[:]); err != nil {
		t.Fatal(err)
	}
	return c
}

func (c *codecConn) send(req nbd.RequestHeader, payload []byte) error {
	b, _ := req.AppendBinary(nil)
	_, err := c.nc.Write(append(b, payload...))
	return err
}

func (c *codecConn) reply() (nbd.SimpleReply, error) {
	var b [nbd.SimpleReplySize]byte
	var rep nbd.SimpleReply
	if _, err := io.ReadFull(c.r, b[:]); err != nil {
		return rep, err
	}
	return rep, rep.UnmarshalBinary(b[:])
}

func (c *codecConn) read(off uint64, n int) ([]byte, error) {
	c.h++
	if err := c.send(nbd.RequestHeader{Command: nbd.CmdRead, Handle: c.h, Offset: off, Length: uint32(n)}, nil); err != nil {
		return nil, err
	}
	rep, err := c.reply()
	if err != nil {
		return nil, err
	}
	if rep.Errno != 0 {
		return nil, rep.Errno
	}
	b := make([]byte, n)
	_, err = io.ReadFull(c.r, b)
	return b, err
}

func (c *codecConn) disconnect() {
	c.send(nbd.RequestHeader{Command: nbd.CmdDisc}, nil)
	c.nc.Close()
}

// writeUntilDead keeps 16 writes in flight (a third with FUA) and a FLUSH
// every 64 writes until the server dies, updating durable with what the
// replies prove, and returns how many writes became durable.
func (c *codecConn) writeUntilDead(rng *rand.Rand, gen *uint64, durable, issued []uint64, block, blocks int) int {
	type inflight struct {
		idx   int
		gen   uint64
		fua   bool
		flush bool
	}
	var mu sync.Mutex
	pending := map[uint64]inflight{}
	busy := map[int]bool{} // blocks with a write in flight
	// acked but not yet covered by a flush, by block
	unflushed := map[int]uint64{}
	durableCount := 0
	slots := make(chan struct{}, 16)
	dead := make(chan struct{})
	go func() {
		defer close(dead)
		for {
			rep, err := c.reply()
			if err != nil {
				return
			}
			mu.Lock()
			w, ok := pending[rep.Handle]
			delete(pending, rep.Handle)
			if ok && !w.flush {
				delete(busy, w.idx)
			}
			if ok && rep.Errno == 0 {
				switch {
				case w.flush:
					// Covers every write acknowledged before it was sent:
					// those are what unflushed held then (snapshotted
					// into the flush's record below).
				case w.fua:
					if w.gen > durable[w.idx] {
						durable[w.idx] = w.gen
						durableCount++
					}
				default:
					unflushed[w.idx] = max(unflushed[w.idx], w.gen)
				}
			}
			mu.Unlock()
			<-slots
		}
	}()
	flushCovers := map[uint64]map[int]uint64{}
	for n := 0; ; n++ {
		select {
		case slots <- struct{}{}:
		case <-dead:
			return durableCount
		}
		c.h++
		mu.Lock()
		// Settle flushes that completed: their snapshot is now durable.
		for h, cover := range flushCovers {
			if _, still := pending[h]; !still {
				for idx, g := range cover {
					if g > durable[idx] {
						durable[idx] = g
						durableCount++
					}
				}
				delete(flushCovers, h)
			}
		}
		var err error
		if n%64 == 63 {
			flushCovers[c.h] = unflushed
			unflushed = map[int]uint64{}
			pending[c.h] = inflight{flush: true}
			mu.Unlock()
			err = c.send(nbd.RequestHeader{Command: nbd.CmdFlush, Handle: c.h}, nil)
		} else {
			*gen++
			// NBD does not order overlapping writes in flight together,
			// so a block is written again only after its last write was
			// answered.
			idx := rng.IntN(blocks)
			for busy[idx] {
				idx = rng.IntN(blocks)
			}
			busy[idx] = true
			w := inflight{idx: idx, gen: *gen, fua: rng.IntN(3) == 0}
			pending[c.h] = w
			issued[idx] = max(issued[idx], w.gen)
			mu.Unlock()
			var flags nbd.CommandFlags
			if w.fua {
				flags = nbd.CmdFlagFUA
			}
			buf := make([]byte, block)
			stamp(buf, w.gen, uint64(idx))
			err = c.send(nbd.RequestHeader{Command: nbd.CmdWrite, Flags: flags, Handle: c.h, Offset: uint64(idx * block), Length: uint32(block)}, buf)
		}
		if err != nil {
			<-dead
			mu.Lock()
			defer mu.Unlock()
			for h, cover := range flushCovers {
				if _, still := pending[h]; !still {
					for idx, g := range cover {
						if g > durable[idx] {
							durable[idx] = g
							durableCount++
						}
					}
				}
			}
			return durableCount
		}
	}
}
