package server

import (
	"bufio"
	"io"
)

// requestReader reads the transmission phase's byte stream: request headers
// and write payloads. It reads ahead so that many small requests (4 KiB
// random writes, reads, flushes) cost one read(2) between them, but it does not
// let a large write payload pass through its buffer: every byte read ahead
// must be copied out again, which measured 15% of the server's CPU in a
// sequential write. A payload of directReadMin or more is read straight from
// the connection into the request's buffer, and after one the read-ahead
// shrinks to smallWindow, so the next fill takes the next header and not the
// bulk of the next payload. It grows back when small requests return.
type requestReader struct {
	src    io.Reader
	buf    []byte
	r, w   int // unread bytes are buf[r:w]
	window int // the most one fill reads
}

const (
	// directReadMin is the payload remainder from which a payload is
	// read from the connection directly.
	directReadMin = 32 << 10
	// smallWindow is the read-ahead while large writes stream in: a
	// header plus a little.
	smallWindow = 4 << 10
)

// newRequestReader reads from src, starting with whatever the handshake's
// buffered reader already holds (a client may pipeline its first requests
// behind NBD_OPT_GO).
func newRequestReader(handshake *bufio.Reader, src io.Reader) *requestReader {
	rr := &requestReader{src: src, buf: make([]byte, readBufferSize), window: readBufferSize}
	if n := handshake.Buffered(); n > 0 {
		rr.w, _ = io.ReadFull(handshake, rr.buf[:n])
	}
	return rr
}

// buffered is how many unread bytes the reader holds.
func (rr *requestReader) buffered() int { return rr.w - rr.r }

// fill reads at least once more into the buffer, at most window bytes.
func (rr *requestReader) fill() error {
	if rr.r == rr.w {
		rr.r, rr.w = 0, 0
	} else if rr.r > 0 && len(rr.buf)-rr.r < rr.window {
		rr.w = copy(rr.buf, rr.buf[rr.r:rr.w])
		rr.r = 0
	}
	end := min(len(rr.buf), rr.w+rr.window)
	for {
		n, err := rr.src.Read(rr.buf[rr.w:end])
		rr.w += n
		if n > 0 {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// readHeader fills p with a request header.
func (rr *requestReader) readHeader(p []byte) error { return rr.copyOut(p) }

// noPayload records a request without a payload: small requests are back,
// so the read-ahead is widened again.
func (rr *requestReader) noPayload() { rr.window = len(rr.buf) }

// readPayload fills p with a write's payload.
func (rr *requestReader) readPayload(p []byte) error {
	if len(p)-rr.buffered() < directReadMin {
		rr.window = len(rr.buf)
		err := rr.copyOut(p)
		if err == io.EOF {
			err = io.ErrUnexpectedEOF // a header came without its payload
		}
		return err
	}
	n := copy(p, rr.buf[rr.r:rr.w])
	rr.r += n
	rr.window = smallWindow
	_, err := io.ReadFull(rr.src, p[n:])
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// copyOut fills p through the buffer.
func (rr *requestReader) copyOut(p []byte) error {
	for done := 0; done < len(p); {
		if rr.r == rr.w {
			if err := rr.fill(); err != nil {
				if done > 0 && err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return err
			}
		}
		n := copy(p[done:], rr.buf[rr.r:rr.w])
		rr.r += n
		done += n
	}
	return nil
}

// takeBuffered returns up to n bytes of a payload that the reader holds (valid
// until the next read), for a payload whose rest is read from the connection
// by the caller.
func (rr *requestReader) takeBuffered(n int) []byte {
	k := min(n, rr.buffered())
	b := rr.buf[rr.r : rr.r+k]
	rr.r += k
	rr.window = smallWindow
	return b
}
