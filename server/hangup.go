package server

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/nbd"
)

// A write the client has given up on must not be done late, over a newer
// write. Linux's nbd client does give up on requests: when one outlasts the
// device's timeout, nbd_xmit_timeout shuts that socket down (a FIN) and sends
// the request again, on another connection or on the next one the pair daemon
// gives it. A storage box that is alive but stalled (a hung disk, a suspended
// device-mapper table, memory pressure) may still hold the first copy, read
// off the wire and waiting for a worker or for its reader. If it did that
// write after the resent copy completed and the guest wrote the same blocks
// again, the old data would land over the new, and md would serve it from this
// half without noticing.
//
// So every write, TRIM and WRITE_ZEROES, holding its range (rangeLock),
// looks at its own connection just before its I/O: if the client has hung up
// (its FIN or reset is in), the write is done only if the client sent
// NBD_CMD_DISC first, which asks for every request before it to be done (a
// client may send DISC behind writes in flight, shut its side down, and wait
// for their replies). Otherwise it is dropped without a reply, as if the connection had
// died a moment sooner. A write that started before the FIN came holds its
// range, and the resent copy waits for it.
//
// Whether DISC came is known only once the stream has been read to its end,
// and the reader may be parked on the connection's slots, held by the very
// workers that ask. Such a worker wakes the reader, which then reads all that
// is left (bounded by the socket's receive queue: nothing comes after a FIN)
// into memory, decides, and goes on from memory (drainAfterHangup).
//
// Left open:
//   - a FIN that is lost or delayed on the network until after the resent
//     write and the newer one have both completed, while the first copy had
//     not yet started;
//   - a client that sends NBD_CMD_DISC and hangs up after the server stopped
//     reading (a drain, or its shutdown) has the writes read but not yet done
//     dropped: the reader never reads that DISC. The client sees them fail
//     (no reply); nothing it was told is done is lost.

// errAbandoned is a write dropped because its client hung up without
// NBD_CMD_DISC.
var errAbandoned = errors.New("client hung up without NBD_CMD_DISC: write dropped")

// verdict is what a write should do, once it holds its range.
type verdict int

const (
	doWrite verdict = iota
	dropWrite
	awaitEnd // the client hung up; whether it sent DISC is not known yet
)

// writeVerdict decides what a write about to start does (see above).
func (c *conn) writeVerdict() verdict {
	if c.gone.Load() {
		return dropWrite
	}
	if !c.peerHungUp() {
		return doWrite
	}
	select {
	case <-c.decided:
		if c.discSeen {
			return doWrite
		}
		return dropWrite
	default:
		return awaitEnd
	}
}

// decide records how the request stream ended, once, and wakes the writes
// waiting to know.
func (c *conn) decide(disc bool) {
	c.decideOnce.Do(func() {
		c.discSeen = disc
		close(c.decided)
	})
}

// socketOf is the socket under nc, a TLS connection's too, for peerHungUp.
func socketOf(nc net.Conn) syscall.RawConn {
	if t, ok := nc.(*tls.Conn); ok {
		nc = t.NetConn()
	}
	return rawConn(nc)
}

// rawConn is nc's socket for system calls (*net.TCPConn, *net.UnixConn);
// nil for a connection without one, such as a *tls.Conn or a test's pipe.
func rawConn(nc net.Conn) syscall.RawConn {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// peerHungUp reports whether the client's FIN or reset has arrived, whatever
// it sent before that is still unread. One poll(2) that does not wait: the
// price of every write, measured in make bench.
func (c *conn) peerHungUp() bool {
	if c.sock == nil {
		return false // not a socket (tests' pipes): nothing to ask
	}
	hung := false
	err := c.sock.Control(func(fd uintptr) {
		fds := [1]unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
		for {
			n, err := unix.Poll(fds[:], 0)
			if err == unix.EINTR {
				continue
			}
			// Not POLLERR: a socket's error queue (timestamps,
			// zero-copy completions) raises it on a live connection.
			hung = err == nil && n > 0 && fds[0].Revents&(unix.POLLRDHUP|unix.POLLHUP) != 0
			return
		}
	})
	// A socket the server closed (a kick, a failed send, the end of a
	// drain) takes no reply either: its client resends elsewhere too.
	return hung || err != nil
}

// lockForWrite takes what a write, TRIM or WRITE_ZEROES holds for its I/O: its
// range, then the fence gate (no write after a fence) and the export's write
// gate (none during a quiesce). The range comes first, so a write waiting for
// another's blocks holds no gate: a fence or a quiesce waits only for writes
// doing I/O. It returns errAbandoned for a write to drop, and waits, holding
// nothing, while that is being decided.
func (c *conn) lockForWrite(off, length int64) (unlock func(), err error) {
	e := c.sess.export
	ranges := e.ranges()
	for {
		s := ranges.lock(off, off+length)
		c.fenceGate.RLock()
		if c.fenced.Load() {
			c.fenceGate.RUnlock()
			ranges.unlock(s)
			return nil, refuse(nbd.EPERM, "client is fenced")
		}
		// Held for the I/O only: a quiesce (a snapshot) waits for it
		// and holds back the next.
		e.writeGate.RLock()
		v := c.writeVerdict()
		if v == doWrite {
			return func() {
				e.writeGate.RUnlock()
				c.fenceGate.RUnlock()
				ranges.unlock(s)
			}, nil
		}
		e.writeGate.RUnlock()
		c.fenceGate.RUnlock()
		ranges.unlock(s)
		if v == dropWrite {
			return nil, errAbandoned
		}
		c.wakeReader()
		<-c.decided
	}
}

// drainAfterHangup is the reader's answer to a worker that found the client
// hung up while the reader waited for room (see above). It reads the rest of
// the stream into memory, after req (whose header is read, its payload not),
// and records whether it holds an NBD_CMD_DISC. With one, reading goes on
// from memory and every request is done; without, the connection is over and
// what it has read is dropped (gone), and the reason is returned.
func (c *conn) drainAfterHangup(req nbd.RequestHeader) (ended string) {
	c.drained = true
	rest, err := io.ReadAll(c.r.src)
	stream := append(c.r.buf[c.r.r:c.r.w:c.r.w], rest...)
	skip := 0
	if req.Command == nbd.CmdWrite {
		skip = int(req.Length)
	}
	if !endsWithDisc(stream, skip) {
		c.gone.Store(true)
		c.decide(false)
		if err != nil {
			return "reading request: " + err.Error()
		}
		return "client closed the connection without NBD_CMD_DISC"
	}
	c.decide(true)
	c.r.src = bytes.NewReader(rest)
	return ""
}

// endsWithDisc reports whether stream, after skip bytes of a payload, holds
// whole requests up to an NBD_CMD_DISC, as the reader would read them: it
// stops at the first header that is not a request's, and at a write's
// payload it would refuse.
func endsWithDisc(stream []byte, skip int) bool {
	if skip > len(stream) {
		return false
	}
	stream = stream[skip:]
	for len(stream) >= nbd.RequestHeaderSize {
		var req nbd.RequestHeader
		if req.UnmarshalBinary(stream[:nbd.RequestHeaderSize]) != nil {
			return false
		}
		stream = stream[nbd.RequestHeaderSize:]
		switch {
		case req.Command == nbd.CmdDisc:
			return true
		case req.Command != nbd.CmdWrite:
		case req.Length > maxPayload || req.Flags&nbd.CmdFlagPayloadLen != 0 || int(req.Length) > len(stream):
			return false
		default:
			stream = stream[req.Length:]
		}
	}
	return false
}

// readerWakeContext is ctx, cancelled also by a worker that needs the reader
// to read the stream's end (see lockForWrite).
func (c *conn) readerWakeContext(ctx context.Context) context.Context {
	wake, cancel := context.WithCancel(ctx)
	c.wakeReader = cancel
	return wake
}
