package server

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/semaphore"
	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/nbd"
)

// readBufferSize batches request headers and small writes into few reads.
const readBufferSize = 256 << 10

// handle runs one connection from greeting to close.
func (s *Server) handle(ctx context.Context, nc net.Conn, p peer) {
	defer nc.Close()
	id, peer := s.nextID.Add(1), peerName(nc)
	log := s.log.With(zap.Uint64("conn", id), zap.String("peer", peer))
	// Draining (shutdown, or DrainClients) interrupts whatever read is
	// blocked, so the transmission loop answers what it has instead of
	// reading more, and closes the connection DrainTimeout later whatever
	// it is doing: a client that does not read its replies would
	// otherwise hold a send, and the reader behind it, for ever.
	var drainOnce sync.Once
	var draining atomic.Bool
	drain := func() {
		draining.Store(true) // before the deadline: see after the handshake
		nc.SetReadDeadline(time.Now())
		drainOnce.Do(func() { time.AfterFunc(s.cfg.DrainTimeout, func() { nc.Close() }) })
	}
	stop := context.AfterFunc(ctx, drain)
	defer stop()

	r := bufio.NewReaderSize(nc, readBufferSize)
	nc.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	// The client is recorded on its export before the handshake's last
	// reply (see negotiator.attach). Until its transmission loop exists a
	// fence marks it and closes the socket; the loop, once stored, looks
	// at the mark, so requests the client pipelined behind its last option
	// cannot slip past a fence that found no loop yet.
	var attached *Export
	var loop atomic.Pointer[conn]
	var fencedEarly atomic.Bool
	client := &clientConn{id: id, peer: peer, kick: func() { cut(nc) },
		drain: drain,
		fence: func(ctx context.Context) error {
			fencedEarly.Store(true) // before looking for the loop: see below
			if c := loop.Load(); c != nil {
				return c.fence(ctx)
			}
			cut(nc)
			return nil
		}}
	attach := func(sess *session) string {
		client.who = sess.peer
		if !sess.export.attach(client) {
			return whyRetired
		}
		attached = sess.export
		// FenceClient saves a fence, then looks for its victims among
		// the export's clients. The handshake checked the fences before
		// this client was among them: looking again now, one of the two
		// sees the other.
		if s.fenced(sess.peer, sess.export.Name) {
			// Refused: the client may go on to open another export, and
			// must not stay counted (and fenced, drained, cut) as this
			// one's.
			sess.export.detach(id)
			attached = nil
			return fmt.Sprintf("%s is fenced off export %q (lvnbd unfence)", sess.peer, sess.export.Name)
		}
		return ""
	}
	defer func() {
		if attached != nil {
			attached.detach(id)
		}
	}()
	sess, err := s.negotiate(ctx, nc, r, p, log, attach)
	if err != nil {
		if errors.Is(err, errAbort) || ctx.Err() != nil {
			log.Debug("handshake ended", zap.Error(err))
		} else {
			log.Warn("handshake failed", zap.Error(err))
		}
		return
	}
	handshaken(sess.export)
	nc.SetDeadline(time.Time{})
	if ctx.Err() != nil {
		closeTLS(sess.nc)
		return // cancelled during the handshake; the deadline may be cleared
	}
	if draining.Load() {
		// Drained during the handshake (its export withdrawn): the line
		// above cleared the drain's deadline.
		nc.SetReadDeadline(time.Now())
	}
	log = log.With(zap.String("export", sess.export.Name))
	c := &conn{
		s: s, nc: sess.nc, r: newRequestReader(sess.r, sess.nc), log: log, sess: sess,
		slots: semaphore.NewWeighted(int64(s.cfg.MaxInFlight)),
		bytes: semaphore.NewWeighted(s.cfg.MaxInFlightBytes),
		jobs:  make(chan job, s.cfg.MaxInFlight), // never blocks: one per slot
		sock:  socketOf(nc), decided: make(chan struct{}),
	}
	if s.cfg.Observer != nil {
		c.observe = s.cfg.Observer.ForExport(sess.export.Name)
	}
	if !s.cfg.NoSplice {
		c.splice = newSplicer(sess.nc, sess.export.Backend)
	}
	if nw, ok := sess.export.Backend.(noWaiter); ok && !s.cfg.NoInline {
		c.nowait = nw
	}
	c.client = client
	loop.Store(c)
	if fencedEarly.Load() {
		// A fence came while the loop did not exist: it closed the
		// socket, but requests may be buffered already. Refuse them.
		c.fenced.Store(true)
	}
	log.Info("client connected", zap.Stringer("flags", sess.flags), zap.Bool("structured", sess.structured))
	reason := c.serve(ctx)
	served(sess.export)
	switch {
	case c.sendErr != nil:
		// The connection failed: nothing more can be sent on it.
	case draining.Load():
		closeAfterReplies(sess.nc, s.cfg.DrainTimeout)
	default:
		// NBD_CMD_DISC, or the client went: the spec wants the TLS
		// session closed before the TCP connection.
		closeTLS(sess.nc)
	}
	log.Info("client disconnected", zap.String("reason", reason))
}

// handshaken is called when a connection's handshake is over, and served
// when it has answered its last request; tests replace them.
var (
	handshaken = func(*Export) {}
	served     = func(*Export) {}
)

// closeAfterReplies ends a drained connection so that the client gets every
// reply sent to it. Closing a TCP socket with requests still unread in it
// makes Linux reset the connection at once and drop the replies not yet
// delivered, and a drained client is usually still sending. So the server
// half-closes the connection (a FIN behind the last reply), throws away what
// the client still sends, and closes once the client has acknowledged every
// byte sent, or has closed or reset its side, or after lingerLimit (or
// timeout, if shorter): a peer that is gone or reads nothing holds the
// shutdown no longer than that.
func closeAfterReplies(nc net.Conn, timeout time.Duration) {
	raw := nc
	if t, ok := nc.(*tls.Conn); ok {
		raw = t.NetConn()
		// close_notify only: the FIN is the TCP socket's.
		if t.CloseWrite() != nil {
			return
		}
	}
	tcp, ok := raw.(*net.TCPConn)
	if !ok {
		return // a Unix socket's peer reads what was queued to it first
	}
	if tcp.CloseWrite() != nil {
		return
	}
	deadline := time.Now().Add(min(timeout, lingerLimit))
	tcp.SetReadDeadline(deadline)
	peerDone := make(chan struct{})
	go func() {
		io.Copy(io.Discard, tcp) // until the peer's FIN or reset, or the deadline
		close(peerDone)
	}()
	rc, err := tcp.SyscallConn()
	if err != nil {
		return
	}
	// Nothing signals "all acknowledged": the send queue is looked at
	// every few milliseconds.
	wait := time.Millisecond
	for {
		unacked := -1
		rc.Control(func(fd uintptr) { unacked, _ = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) })
		if unacked <= 0 {
			return
		}
		select {
		case <-peerDone:
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, 50*time.Millisecond)
	}
}

// closeTLS ends nc's TLS session, if it has one, with a close_notify, and
// closes the connection; other connections are left to their owner's Close.
// Without the alert a client cannot tell the end of the session from a
// connection cut by an attacker, and clients (gnutls, Python's ssl) report
// it as an error. A peer that does not read holds the alert at most
// closeNotifyTimeout: crypto/tls bounds it only by 5s, which a client left
// not reading after NBD_CMD_DISC would cost every connection's close.
func closeTLS(nc net.Conn) {
	t, ok := nc.(*tls.Conn)
	if !ok {
		return
	}
	// Closing the socket underneath fails the write that sends the alert.
	cut := time.AfterFunc(closeNotifyTimeout, func() { t.NetConn().Close() })
	defer cut.Stop()
	t.Close()
}

// cut closes nc's socket at once. A TLS connection's Close sends a
// close_notify first, which a client that does not read holds for up to
// crypto/tls's 5 s: a fence or a kick must not wait for the client it cuts.
func cut(nc net.Conn) {
	if t, ok := nc.(*tls.Conn); ok {
		t.NetConn().Close()
		return
	}
	nc.Close()
}

// closeNotifyTimeout bounds how long closeTLS waits to send the close_notify:
// the alert is one small record, so a peer that cannot take it this long is
// gone or not reading. Tests change it.
var closeNotifyTimeout = time.Second

// lingerLimit bounds how long a drained connection waits for its client to
// take the last replies: at GbE a full send queue drains in tens of
// milliseconds. Tests change it.
var lingerLimit = 5 * time.Second

func peerName(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" && a.String() != "@" {
		return a.String()
	}
	return "unix"
}

// conn is one connection in the transmission phase. One reader (serve) decodes
// requests, a fixed set of workers does their I/O (bounded by slots and
// bytes), and each reply is sent by the worker that made it, or by one already
// sending (see send), in completion order.
type conn struct {
	s       *Server
	nc      net.Conn
	r       *requestReader
	log     *zap.Logger
	sess    *session
	client  *clientConn // this connection's counters on the export
	observe ExportObserver
	splice  *splicer // nil: reads are copied
	nowait  noWaiter // nil: every request goes to a worker
	slots   *semaphore.Weighted
	bytes   *semaphore.Weighted
	jobs    chan job
	work    sync.WaitGroup // requests read and not yet answered

	// sendMu guards queued and sending: replies waiting for the worker
	// that is sending, and whether one is.
	sendMu  sync.Mutex
	queued  []*reply
	sending bool
	// Owned by the sending worker: the batch it is sending, the bytes not
	// yet written, and the first write error.
	batch   []*reply
	pending []byte
	sendErr error

	// gone is set once the client cannot receive replies any more (it hung
	// up, or a write to it failed): queued requests are then dropped
	// instead of done for nobody.
	gone atomic.Bool

	// fenceGate and fenced make fencing final: a write checks fenced and
	// does its I/O under the shared gate, and fence sets fenced then takes
	// the gate exclusively, so no write starts after fence returns.
	fenceGate sync.RWMutex
	fenced    atomic.Bool
	// quiesced is closed once the writes in flight at the first fence have
	// ended; fenceOnce starts the one goroutine that waits for them, so a
	// fence retried while a write hangs adds none.
	fenceOnce sync.Once
	quiesced  chan struct{}

	// sock is the socket, asked whether the client hung up; wakeReader,
	// decided, discSeen and drained settle what the writes read before a
	// hang-up do (see hangup.go). drained is the reader's own.
	sock       syscall.RawConn
	wakeReader context.CancelFunc
	decideOnce sync.Once
	decided    chan struct{} // closed once discSeen is set
	discSeen   bool
	drained    bool
	// inlineWrites are the writes the reader has taken to do itself (see
	// takeInlineWrite); the reader's own.
	inlineWrites []inlineWrite
	// dropLogged: a write dropped for a hang-up was logged at warning level.
	dropLogged atomic.Bool

	// failureLogged: a request failed because the export's write-back
	// did, and that was logged at warning level.
	failureLogged atomic.Bool

	// holesSeen: the last structured read searched for zeroes found some;
	// largeReads counts reads that could be spliced (see splicePipe).
	holesSeen  atomic.Bool
	largeReads atomic.Uint32
}

// fence stops this connection's writes for good and closes it.
func (c *conn) fence(ctx context.Context) error {
	c.fenced.Store(true)
	c.fenceOnce.Do(func() {
		c.quiesced = make(chan struct{})
		go func() {
			// Taken once the writes in flight end, and let go at
			// once: a later write sees fenced and is refused.
			c.fenceGate.Lock()
			c.fenceGate.Unlock()
			close(c.quiesced)
		}()
	})
	select {
	case <-c.quiesced:
	case <-ctx.Done():
		cut(c.nc)
		return fmt.Errorf("fencing connection %d: writes in flight did not finish: %w", c.client.id, ctx.Err())
	}
	cut(c.nc)
	c.log.Warn("connection fenced")
	return nil
}

// serve reads requests until the client disconnects, errs, or ctx is done,
// then waits for in-flight requests to be answered. It returns why it ended.
func (c *conn) serve(ctx context.Context) string {
	// A fixed set of workers per connection, not a goroutine per request:
	// long-lived goroutines keep their grown stacks and the scheduler has
	// less to do (measured: 25% of CPU in scheduling and stack growth at
	// QD32 with a goroutine per request).
	var workers sync.WaitGroup
	for range c.s.cfg.Workers {
		workers.Add(1)
		go func() {
			defer workers.Done()
			for j := range c.jobs {
				r, errno := c.do(j.req, j.payload, j.pipe, j.cost)
				if c.observe != nil {
					c.observe.Request(j.req.Command, int(j.req.Length), time.Since(j.read), errno)
				}
				if r != nil {
					c.send(r)
				}
				c.work.Done()
			}
		}()
	}

	reason := c.readLoop(ctx, c.readerWakeContext(ctx))
	c.wakeReader() // lets go of the context

	// Drain: every request already read gets its reply, unless the client
	// is gone or the drain outlasts its bound.
	drained := make(chan struct{})
	go func() { c.work.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(c.s.cfg.DrainTimeout):
		c.log.Warn("in-flight requests outlasted the drain timeout; closing", zap.Duration("timeout", c.s.cfg.DrainTimeout))
		c.nc.Close()
		<-drained
	}
	close(c.jobs)
	workers.Wait() // and with them every send
	if c.sendErr != nil && reason == "" {
		reason = "sending replies: " + c.sendErr.Error()
	}
	if c.splice != nil {
		c.splice.close()
	}
	return reason
}

// readLoop reads requests until the stream ends. It waits for room (slots,
// bytes) under wake as well as ctx: a worker cancels wake when it needs the
// stream read to its end (see drainAfterHangup).
func (c *conn) readLoop(ctx, wake context.Context) (reason string) {
	var hb [nbd.RequestHeaderSize]byte
	// held are replies to requests answered here (see tryInline), sent
	// together before the reader can block: on the socket when the
	// requests read so far are done, or on a full connection.
	var held []*reply
	flush := func() {
		held = c.doInlineWrites(held)
		if len(held) > 0 {
			c.send(held...)
			clear(held)
			held = held[:0]
		}
	}
	defer flush()
	// Before the last flush: its small writes then know how the stream
	// ended, and need not wait for it on workers.
	defer func() { c.decide(reason == discReason) }()
	for {
		if c.r.buffered() < nbd.RequestHeaderSize || len(held)+len(c.inlineWrites) >= maxHeld {
			flush()
		}
		if err := c.r.readHeader(hb[:]); err != nil {
			switch {
			case ctx.Err() != nil:
				return "server shutting down"
			case errors.Is(err, io.EOF):
				c.gone.Store(true)
				return "client closed the connection without NBD_CMD_DISC"
			case errors.Is(err, net.ErrClosed), errors.Is(err, os.ErrDeadlineExceeded):
				return "connection closed"
			}
			c.gone.Store(true)
			return "reading request: " + err.Error()
		}
		var req nbd.RequestHeader
		if err := req.UnmarshalBinary(hb[:]); err != nil {
			c.log.Warn("malformed request; closing connection", zap.Error(err))
			return "malformed request: " + err.Error()
		}
		if req.Command == nbd.CmdDisc {
			return discReason
		}
		var cost int64
		switch req.Command {
		case nbd.CmdWrite:
			if req.Length > maxPayload || req.Flags&nbd.CmdFlagPayloadLen != 0 {
				// The payload cannot be trusted or skipped safely.
				c.log.Warn("write payload over the advertised maximum; closing connection",
					zap.Uint32("length", req.Length), zap.Uint32("max", maxPayload))
				return fmt.Sprintf("write of %d bytes over the %d-byte maximum payload", req.Length, maxPayload)
			}
			cost = int64(req.Length)
		case nbd.CmdRead:
			cost = int64(min(req.Length, maxPayload))
		case nbd.CmdBlockStatus:
			cost = min(blockStatusCost(req), c.s.cfg.MaxInFlightBytes)
		}
		// Acquiring blocks the reader when the connection has too much
		// outstanding: TCP back-pressure does the rest. Held replies
		// are sent first: they hold slots too.
		if !c.slots.TryAcquire(1) {
			flush()
			if ended := c.await(ctx, wake, c.slots, 1, req); ended != "" {
				return ended
			}
		}
		if !c.bytes.TryAcquire(cost) {
			flush()
			if ended := c.await(ctx, wake, c.bytes, cost, req); ended != "" {
				c.slots.Release(1)
				return ended
			}
		}
		var payload []byte
		var pipe *splicePipe
		if req.Command == nbd.CmdWrite && req.Length > 0 {
			if c.r.buffered() < int(req.Length) {
				// The payload is still coming, maybe slowly (32 MiB
				// over a GbE link): what is held goes out first.
				flush()
			}
			var err error
			if payload, pipe, err = c.readWritePayload(req); err != nil {
				c.release(cost)
				if ctx.Err() != nil {
					return "server shutting down"
				}
				return "reading write payload: " + err.Error()
			}
		} else {
			c.r.noPayload()
		}
		if r, taken := c.tryInline(req, payload, cost); taken {
			if r != nil {
				held = append(held, r)
			}
			continue
		}
		c.work.Add(1)
		c.jobs <- job{req, payload, pipe, cost, time.Now()}
	}
}

// discReason is why a connection ends at NBD_CMD_DISC.
const discReason = "client sent NBD_CMD_DISC"

// await acquires n of sem for req, whose header is read. If a worker wakes it
// first, the stream is read to its end (drainAfterHangup) and the wait goes on
// under ctx alone, unless the connection is over; then why is returned.
func (c *conn) await(ctx, wake context.Context, sem *semaphore.Weighted, n int64, req nbd.RequestHeader) (ended string) {
	for {
		w := wake
		if c.drained {
			w = ctx
		}
		err := sem.Acquire(w, n)
		switch {
		case err == nil:
			return ""
		case ctx.Err() != nil:
			return "server shutting down"
		}
		if ended := c.drainAfterHangup(req); ended != "" {
			return ended
		}
	}
}

// readWritePayload reads a write's payload into a buffer or, where splicing
// works and the server splices writes (Config.SpliceWrites), into a pipe (see
// splice.go).
func (c *conn) readWritePayload(req nbd.RequestHeader) ([]byte, *splicePipe, error) {
	n := int(req.Length)
	if c.splice != nil && c.s.cfg.SpliceWrites && !c.drained && n >= spliceMin && req.Flags&nbd.CmdFlagFUA == 0 {
		if p := c.splice.get(n); p != nil {
			moved, err := c.splice.receive(c.r, p, n)
			if err == nil {
				return nil, p, nil
			}
			if !errors.Is(err, errPipeFull) {
				c.splice.discard(p)
				return nil, nil, err
			}
			// The rest is read as usual, after what the pipe took.
			c.s.pipeFallbacks.Add(1)
			payload := getBuf(n)
			if err := p.drain(payload[:moved]); err != nil {
				c.splice.discard(p)
				putBuf(payload)
				return nil, nil, err
			}
			c.splice.put(p)
			if _, err := io.ReadFull(c.nc, payload[moved:]); err != nil {
				putBuf(payload)
				return nil, nil, err
			}
			return payload, nil, nil
		}
	}
	payload := getBuf(n)
	if err := c.r.readPayload(payload); err != nil {
		putBuf(payload)
		return nil, nil, err
	}
	return payload, nil, nil
}

// blockStatusCost bounds the memory a BLOCK_STATUS reply holds until it is
// sent: the backend's extents, the reply's and their encoding, about 32
// bytes for each extent the range can have (none is shorter than a 512-byte
// sector, and a reply has at most maxExtents). A client asking about a
// fragmented file without reading the answers is then held to the
// connection's MaxInFlightBytes, as one reading is.
func blockStatusCost(req nbd.RequestHeader) int64 {
	const perExtent = 32
	if req.Flags&nbd.CmdFlagReqOne != 0 {
		return perExtent
	}
	return min(int64(req.Length)/512+2, maxExtents) * perExtent
}

// job is a request read off the wire, waiting for a worker.
type job struct {
	req     nbd.RequestHeader
	payload []byte
	pipe    *splicePipe // instead of payload: a write spliced off the socket
	cost    int64
	read    time.Time // when it came off the wire
}

func (c *conn) release(cost int64) {
	c.bytes.Release(cost)
	c.slots.Release(1)
}

// sendBatchLimit bounds the small replies gathered into one write.
const sendBatchLimit = 256 << 10

// send sends r, and every reply queued while it does. Whichever worker finds
// no send under way sends; the others queue their reply and go back to work.
// Replies that complete while a write is in progress go out together in the
// next one, so a busy connection answers many requests per system call, and
// no reply waits for a goroutine to be woken (a writer goroutine cost a
// wake-up per request; scheduling was about 15% of the server's CPU in 4 KiB
// random reads). A client that does not read its replies blocks the sender
// until the drain timeout closes the connection (see handle).
// After a write error the replies are still taken, so every request's
// buffers and slot are released.
func (c *conn) send(rs ...*reply) {
	c.sendMu.Lock()
	c.queued = append(c.queued, rs...)
	if c.sending {
		c.sendMu.Unlock()
		return
	}
	c.sending = true
	for len(c.queued) > 0 {
		c.batch, c.queued = c.queued, c.batch[:0]
		c.sendMu.Unlock()
		c.sendBatch(c.batch)
		clear(c.batch) // the replies are done with
		c.sendMu.Lock()
	}
	c.sending = false
	c.sendMu.Unlock()
}

// sendBatch writes replies: small ones gathered into one buffer, large
// payloads by writev (never copied), spliced ones from their pipe.
func (c *conn) sendBatch(batch []*reply) {
	fail := func(err error) {
		c.sendErr = err
		c.gone.Store(true)
		c.nc.Close() // unblocks the reader
	}
	for _, r := range batch {
		if r.pipe != nil {
			// The header joins what is pending; the data follows from
			// the pipe.
			if c.sendErr == nil {
				for _, p := range r.parts {
					c.pending = append(c.pending, p...)
				}
				if err := c.splice.send(c.pending, r.pipe, r.pipeLen); err != nil {
					fail(err)
				}
				c.pending = c.pending[:0]
			}
			if c.sendErr == nil {
				c.splice.put(r.pipe)
				c.s.splicedReads.Add(1)
			} else {
				c.splice.discard(r.pipe)
			}
		} else if c.sendErr == nil {
			if len(c.pending)+r.size <= sendBatchLimit {
				for _, p := range r.parts {
					c.pending = append(c.pending, p...)
				}
			} else {
				bufs := make(net.Buffers, 0, len(r.parts)+1)
				if len(c.pending) > 0 {
					bufs = append(bufs, c.pending)
				}
				bufs = append(bufs, r.parts...)
				if _, err := bufs.WriteTo(c.nc); err != nil {
					fail(err)
				}
				c.pending = c.pending[:0]
			}
		}
		r.done()
	}
	if len(c.pending) > 0 && c.sendErr == nil {
		if _, err := c.nc.Write(c.pending); err != nil {
			fail(err)
		}
	}
	c.pending = c.pending[:0]
}

// reply is the encoded answer to one request: parts are written in order,
// then pipeLen bytes from pipe if there is one.
type reply struct {
	parts   [][]byte
	size    int
	pipe    *splicePipe
	pipeLen int
	done    func() // returns buffers and the request's slot
}

func (r *reply) add(p []byte) {
	r.parts = append(r.parts, p)
	r.size += len(p)
}
