package server

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
	"testing/iotest"
)

// readPlan is a sequence of reads: a positive n reads an n-byte payload, a
// negative n an (-n)-byte header followed by no payload.
func runPlan(t *testing.T, rr *requestReader, stream []byte, plan []int) {
	t.Helper()
	pos := 0
	for i, n := range plan {
		var err error
		var got []byte
		if n >= 0 {
			got = make([]byte, n)
			err = rr.readPayload(got)
		} else {
			got = make([]byte, -n)
			err = rr.readHeader(got)
			rr.noPayload()
		}
		if err != nil {
			t.Fatalf("read %d (%d bytes at %d): %v", i, len(got), pos, err)
		}
		if !bytes.Equal(got, stream[pos:pos+len(got)]) {
			t.Fatalf("read %d (%d bytes at %d): wrong bytes", i, len(got), pos)
		}
		pos += len(got)
	}
}

func TestRequestReaderKeepsTheStreamInOrder(t *testing.T) {
	header := 28
	cases := []struct {
		name string
		plan []int // alternating header and payload sizes
	}{
		{"small writes", []int{-header, 4096, -header, 4096, -header, 512}},
		{"large writes", []int{-header, 256 << 10, -header, 256 << 10, -header, 1 << 20}},
		{"large then small", []int{-header, 1 << 20, -header, 4096, -header, 4096, -header, 64 << 10}},
		{"reads between writes", []int{-header, -header, -header, 128 << 10, -header, -header}},
		{"just under direct", []int{-header, directReadMin - 1, -header, directReadMin, -header, directReadMin + 1}},
		{"payload larger than the buffer", []int{-header, 3 * readBufferSize, -header}},
	}
	sources := map[string]func(io.Reader) io.Reader{
		"whole":    func(r io.Reader) io.Reader { return r },
		"one byte": iotest.OneByteReader,
		"half":     iotest.HalfReader,
	}
	for _, tc := range cases {
		total := 0
		for _, n := range tc.plan {
			total += max(n, -n)
		}
		stream := make([]byte, total)
		for i := range stream {
			stream[i] = byte(i*7 + i>>8)
		}
		for sname, wrap := range sources {
			for _, pre := range []int{0, 5, header + 100} {
				t.Run(tc.name+"/"+sname, func(t *testing.T) {
					// pre bytes were buffered by the handshake's reader.
					hs := bufio.NewReader(bytes.NewReader(stream))
					if pre > 0 {
						if _, err := hs.Peek(min(pre, len(stream))); err != nil {
							t.Fatal(err)
						}
					}
					var rest io.Reader = bytes.NewReader(stream[hs.Buffered():])
					rr := newRequestReader(hs, wrap(rest))
					runPlan(t, rr, stream, tc.plan)
					if err := rr.readHeader(make([]byte, header)); err != io.EOF {
						t.Fatalf("after the stream: %v, want io.EOF", err)
					}
				})
			}
		}
	}
}

func TestRequestReaderShortStreams(t *testing.T) {
	cases := []struct {
		name    string
		stream  int
		header  bool
		n       int
		wantErr error
	}{
		{"no header", 0, true, 28, io.EOF},
		{"half a header", 10, true, 28, io.ErrUnexpectedEOF},
		{"no payload", 0, false, 4096, io.ErrUnexpectedEOF},
		{"half a small payload", 100, false, 4096, io.ErrUnexpectedEOF},
		{"half a large payload", 100 << 10, false, 1 << 20, io.ErrUnexpectedEOF},
		{"no large payload", 0, false, 1 << 20, io.ErrUnexpectedEOF},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rr := newRequestReader(bufio.NewReader(bytes.NewReader(nil)), bytes.NewReader(make([]byte, tc.stream)))
			var err error
			if tc.header {
				err = rr.readHeader(make([]byte, tc.n))
			} else {
				err = rr.readPayload(make([]byte, tc.n))
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("got %v, want %v", err, tc.wantErr)
			}
		})
	}
}

// countingReader counts the bytes asked for in each Read, to see the
// read-ahead window.
type countingReader struct {
	r     io.Reader
	asked []int
}

func (c *countingReader) Read(p []byte) (int, error) {
	c.asked = append(c.asked, len(p))
	return c.r.Read(p)
}

// After a large payload the next fill must not read the next payload into the
// buffer (that copy is what the reader exists to avoid); small requests must
// get the whole buffer back.
func TestRequestReaderWindow(t *testing.T) {
	stream := make([]byte, 28+(1<<20)+28+(1<<20)+28+4096+28+4096)
	src := &countingReader{r: bytes.NewReader(stream)}
	rr := newRequestReader(bufio.NewReader(bytes.NewReader(nil)), src)
	runPlan(t, rr, stream, []int{-28, 1 << 20})
	src.asked = nil
	runPlan(t, rr, stream[28+(1<<20):], []int{-28})
	if len(src.asked) != 1 || src.asked[0] > smallWindow {
		t.Fatalf("header after a large payload: reads asked for %v, want one of at most %d", src.asked, smallWindow)
	}
	runPlan(t, rr, stream[2*28+(1<<20):], []int{1 << 20, -28})
	src.asked = nil
	// The header's fill took part of this small payload; the rest comes
	// with a wide read again.
	runPlan(t, rr, stream[3*28+(2<<20):], []int{4096})
	if len(src.asked) != 1 || src.asked[0] < readBufferSize/2 {
		t.Fatalf("small payload after large ones: reads asked for %v, want one wide read", src.asked)
	}
}

// FuzzRequestReader checks that any plan of reads over any chunking of the
// stream returns the stream's bytes in order.
func FuzzRequestReader(f *testing.F) {
	f.Add(uint64(1), []byte{28, 0, 16, 28, 0, 1})
	f.Add(uint64(7), []byte{28, 255, 28, 3, 255, 255})
	f.Fuzz(func(t *testing.T, seed uint64, spec []byte) {
		if len(spec) > 64 {
			spec = spec[:64]
		}
		var plan []int
		total := 0
		for i, b := range spec {
			n := int(b)
			if i%2 == 1 {
				n = n * 4 << 10 // payloads up to ~1 MiB
			} else {
				n = -max(1, n%64)
			}
			plan = append(plan, n)
			total += max(n, -n)
		}
		rng := rand.New(rand.NewPCG(seed, 0))
		// Up to 32 MiB per input: drawn in bulk, which a byte at a time
		// from rng made the slowest part of each run.
		var key [32]byte
		binary.LittleEndian.PutUint64(key[:], seed)
		stream := make([]byte, total)
		_, _ = rand.NewChaCha8(key).Read(stream)
		src := &chunkedReader{data: stream, rng: rng}
		runPlan(t, newRequestReader(bufio.NewReader(bytes.NewReader(nil)), src), stream, plan)
	})
}

// chunkedReader returns its data in reads of random sizes.
type chunkedReader struct {
	data []byte
	rng  *rand.Rand
}

func (c *chunkedReader) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := min(len(p), len(c.data), 1+c.rng.IntN(64<<10))
	copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}
