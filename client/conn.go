package client

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/lvnbd/lvnbd/nbd"
)

const (
	// readBufferSize batches reply headers; large reads bypass it and go
	// straight into the caller's buffer.
	readBufferSize = 64 << 10
	// smallPayload: write payloads up to this are copied behind the header
	// into one write; larger ones go out with writev, uncopied (over TLS,
	// the header and the payload as records of their own).
	smallPayload = 64 << 10
	// maxErrorChunk bounds the payload of an error chunk: a 4096-byte
	// message plus the fields of any error type we may not know.
	maxErrorChunk = 64 << 10
	// discTimeout bounds sending NBD_CMD_DISC on close.
	discTimeout = 5 * time.Second
)

// Conn is one NBD connection in the transmission phase. Its methods may be
// called from many goroutines at once: requests are pipelined, written one at
// a time, and a single reader goroutine hands each reply to its request.
type Conn struct {
	nc      net.Conn // the socket, or the TLS session over it
	raw     net.Conn // the socket: closing it ends the connection at once
	r       *bufio.Reader
	info    ExportInfo
	server  string
	lim     limits
	metaID  uint32          // base:allocation
	hasMeta bool            // base:allocation was selected
	metaIDs map[uint32]bool // every selected context
	drain   time.Duration
	self    func() (*Conn, error)

	sendLock chan struct{} // capacity 1; a mutex that can wait with a context
	wbuf     []byte        // guarded by sendLock

	mu      sync.Mutex
	pending map[uint64]*call
	next    uint64
	err     error         // why the connection is unusable; first one wins
	closing bool          // no new requests: Close, or the server sent ESHUTDOWN
	idle    chan struct{} // closed when only given-up calls are pending while closing
	// givenUp counts the pending calls whose callers gave up on them
	// (their ctx ended): Shutdown does not wait for those.
	givenUp int

	readerDone   chan struct{}
	discOnce     sync.Once
	shutdownOnce sync.Once
}

// Dial connects to the export at uri, negotiates, and returns a connection
// ready for requests. nbds:// and nbds+unix:// URIs start TLS first (see
// Options.TLS) and fail if the server will not.
func Dial(ctx context.Context, uri string, opts *Options) (*Conn, error) {
	u, nc, tlsConfig, err := dialURI(ctx, uri, opts)
	if err != nil {
		return nil, err
	}
	conn, info, err := negotiate(ctx, nc, u.Export, opts, u.Address(), tlsConfig)
	if err != nil {
		nc.Close()
		return nil, err
	}
	return newConn(conn, nc, info, u.Address(), opts), nil
}

// NewConn starts the transmission phase on nc, which Negotiate left at its
// start with info. The Conn owns nc from now on.
func NewConn(nc net.Conn, info ExportInfo, opts *Options) *Conn {
	return newConn(nc, nc, info, peerName(nc), opts)
}

func newConn(nc, raw net.Conn, info ExportInfo, server string, opts *Options) *Conn {
	c := &Conn{
		nc:         nc,
		raw:        raw,
		r:          bufio.NewReaderSize(nc, readBufferSize),
		info:       info,
		server:     server,
		lim:        limitsOf(info),
		metaIDs:    map[uint32]bool{},
		drain:      opts.drainTimeout(),
		sendLock:   make(chan struct{}, 1),
		pending:    map[uint64]*call{},
		readerDone: make(chan struct{}),
	}
	c.self = func() (*Conn, error) { return c, nil } // start tells if c is usable
	if info.StructuredReplies {
		c.metaID, c.hasMeta = info.metaContextID(nbd.MetaContextBaseAllocation)
		for _, m := range info.MetaContexts {
			c.metaIDs[m.ID] = true
		}
	}
	go c.readLoop()
	return c
}

// Export returns what the handshake learned about the export.
func (c *Conn) Export() ExportInfo { return c.info.clone() }

// Done is closed when the connection has ended, by Close or by failure.
func (c *Conn) Done() <-chan struct{} { return c.readerDone }

// Err returns why the connection ended, or nil while it is usable.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// ReadAt fills p from offset off, splitting it into pipelined requests no
// larger than the server's maximum payload.
func (c *Conn) ReadAt(ctx context.Context, p []byte, off int64) error {
	return run(ctx, c.info, c.lim, c.hasMeta, op{cmd: nbd.CmdRead, off: off, length: int64(len(p)), buf: p}, c.self)
}

// WriteAt writes p at offset off. flags may hold nbd.CmdFlagFUA.
func (c *Conn) WriteAt(ctx context.Context, p []byte, off int64, flags nbd.CommandFlags) error {
	return run(ctx, c.info, c.lim, c.hasMeta, op{cmd: nbd.CmdWrite, flags: flags, off: off, length: int64(len(p)), buf: p}, c.self)
}

// Flush makes every write the server has acknowledged durable. An export
// that does not advertise NBD_FLAG_SEND_FLUSH has no volatile cache to flush,
// so Flush sends nothing there (as Linux's nbd driver does).
func (c *Conn) Flush(ctx context.Context) error {
	return run(ctx, c.info, c.lim, c.hasMeta, op{cmd: nbd.CmdFlush}, c.self)
}

// Trim tells the server [off, off+length) is no longer needed. flags may hold
// nbd.CmdFlagFUA.
func (c *Conn) Trim(ctx context.Context, off, length int64, flags nbd.CommandFlags) error {
	return run(ctx, c.info, c.lim, c.hasMeta, op{cmd: nbd.CmdTrim, flags: flags, off: off, length: length}, c.self)
}

// WriteZeroes makes [off, off+length) read as zeroes. flags may hold
// nbd.CmdFlagFUA, nbd.CmdFlagNoHole and nbd.CmdFlagFastZero.
func (c *Conn) WriteZeroes(ctx context.Context, off, length int64, flags nbd.CommandFlags) error {
	return run(ctx, c.info, c.lim, c.hasMeta, op{cmd: nbd.CmdWriteZeroes, flags: flags, off: off, length: length}, c.self)
}

// Cache asks the server to prefetch [off, off+length).
func (c *Conn) Cache(ctx context.Context, off, length int64) error {
	return run(ctx, c.info, c.lim, c.hasMeta, op{cmd: nbd.CmdCache, off: off, length: length}, c.self)
}

// BlockStatus returns the base:allocation extents from off onwards, as one
// request: the server may describe less than length (the caller asks again
// from where it stopped) or, in the last extent, more. flags may hold
// nbd.CmdFlagReqOne. Extent flags are nbd.StateHole and nbd.StateZero.
func (c *Conn) BlockStatus(ctx context.Context, off, length int64, flags nbd.CommandFlags) ([]nbd.Extent, error) {
	return blockStatus(ctx, c.info, c.lim, c.hasMeta, off, length, flags, c.self)
}

// Close waits up to the drain timeout for in-flight requests, sends
// NBD_CMD_DISC and closes the socket. Requests whose callers gave up (their
// ctx ended) are not waited for: nobody would read their replies.
func (c *Conn) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), c.drain)
	defer cancel()
	return c.Shutdown(ctx)
}

// Shutdown refuses new requests, waits for in-flight ones to be answered,
// then sends NBD_CMD_DISC and closes the socket. If ctx ends first the socket
// is closed under the remaining requests, which fail with ErrClosed, and
// ctx's error is returned. Requests whose callers gave up are not waited
// for; if any is left unanswered the socket is closed without NBD_CMD_DISC,
// which the spec wants sent only with nothing in flight, and to a server
// that may have stalled could not be sent anyway.
func (c *Conn) Shutdown(ctx context.Context) error {
	c.mu.Lock()
	c.closing = true
	var idle chan struct{}
	if len(c.pending) > c.givenUp {
		if c.idle == nil {
			c.idle = make(chan struct{})
		}
		idle = c.idle
	}
	c.mu.Unlock()
	var err error
	if idle != nil {
		select {
		case <-idle:
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	c.discOnce.Do(func() {
		c.mu.Lock()
		quiet := len(c.pending) == 0
		c.mu.Unlock()
		if err == nil && quiet && c.Err() == nil {
			ctx, cancel := context.WithTimeout(context.Background(), discTimeout)
			b, _ := nbd.RequestHeader{Command: nbd.CmdDisc}.AppendBinary(nil)
			if c.sendRaw(ctx, b) == nil {
				c.endTLS(ctx)
			}
			cancel()
		}
		c.fail(ErrClosed)
	})
	<-c.readerDone
	return err
}

// call is one request awaiting its reply.
type call struct {
	conn *Conn
	req  nbd.RequestHeader
	dst  []byte // READ destination, len == req.Length
	done chan struct{}
	err  error // set before done is closed

	// mu is held by the reader while it writes into dst, and by a caller
	// abandoning the call, so dst is never written once its owner returned.
	// The reader holds it for as long as the payload takes to arrive.
	mu        sync.Mutex
	abandoned bool
	// givenUp: the caller returned without the reply; guarded by conn.mu.
	givenUp bool
	// dropped: the reader threw away read data (or left a hole uncleared)
	// because the call was abandoned, so dst is not the reply.
	dropped bool

	// Reader-only state of a structured reply.
	spans     spans
	covered   uint64
	failure   *RequestError // the first error chunk
	extents   []nbd.Extent
	statusIDs []uint32 // contexts that sent a block status chunk
}

func (cl *call) finish(err error) {
	cl.err = err
	close(cl.done)
}

// abandon stops the reader writing into dst, because the caller gives up
// for the reason why. If the reader is copying the payload into dst, abandon
// waits for the copy to end while ctx lasts: the data may be arriving slowly
// or have stalled, and a stream cannot be resynchronised mid-payload, so once
// ctx is done the connection fails, which closes the socket and ends the copy
// at once. (The reader also holds mu to clear a hole, briefly; a ctx already
// done costs the connection then too, as telling the two apart would race.)
// abandon reports whether it failed the connection.
func (cl *call) abandon(ctx context.Context, why error) (failedConn bool) {
	if !cl.mu.TryLock() {
		locked := make(chan struct{})
		go func() {
			cl.mu.Lock()
			close(locked)
		}()
		select {
		case <-locked:
		case <-ctx.Done():
			c := cl.conn
			// Not %w: why is this caller's reason (often its
			// context's deadline), not that of the others failed
			// with the connection. In a goroutine: fail waits for
			// each call's mu, and this one's goes to the locker
			// above, whose owner is this function.
			go c.fail(fmt.Errorf("%w: %s to %s was given up while its data was arriving (%v), and the stream cannot be resynchronised mid-payload; dial again to go on",
				ErrClosed, describe(cl.rangeOf()), c.server, why))
			failedConn = true
			<-locked // the closed socket ends the copy
		}
	}
	cl.abandoned = true
	cl.mu.Unlock()
	cl.conn.giveUp(cl)
	return failedConn
}

// stopWrites stops the reader writing into dst once the socket is closed;
// it waits for a copy in progress, which the closed socket ends.
func (cl *call) stopWrites() {
	cl.mu.Lock()
	cl.abandoned = true
	cl.mu.Unlock()
}

// describe names a request for an error: "NBD_CMD_READ of 4096 bytes at offset 0".
func describe(r requestRange) string {
	return fmt.Sprintf("%v of %d bytes at offset %d", r.cmd, r.length, r.off)
}

// waitHook, nil outside tests, runs between abandon and wait's last look at
// done; it exists for TestLateReplyAfterAbandonIsNotSuccess.
var waitHook func(*call)

// wait returns the call's result, or ctx's error once the call is abandoned.
func (cl *call) wait(ctx context.Context) error {
	select {
	case <-cl.done:
		return cl.err
	case <-ctx.Done():
	}
	if cl.abandon(ctx, ctx.Err()) {
		// Whatever finished the call, dst holds a part of the reply.
		return ctx.Err()
	}
	if waitHook != nil {
		waitHook(cl)
	}
	select {
	case <-cl.done:
	default:
		return ctx.Err()
	}
	// Finished around the abandon. If the reader got to the data only after
	// it, it discarded it, and success would hand back an unfilled buffer.
	// Under mu: after a fail() the reader may still be discarding chunks.
	cl.mu.Lock()
	dropped := cl.dropped
	cl.mu.Unlock()
	if dropped {
		return ctx.Err()
	}
	return cl.err
}

func (cl *call) rangeOf() requestRange {
	return requestRange{cmd: cl.req.Command, off: cl.req.Offset, length: uint64(cl.req.Length)}
}

// start registers and sends one request.
func (c *Conn) start(ctx context.Context, req nbd.RequestHeader, payload, dst []byte) (*call, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	cl := &call{conn: c, req: req, dst: dst, done: make(chan struct{})}
	c.mu.Lock()
	if err := c.unusableLocked(); err != nil {
		c.mu.Unlock()
		return nil, err
	}
	c.next++
	cl.req.Handle = c.next
	c.pending[cl.req.Handle] = cl
	c.mu.Unlock()

	b, _ := cl.req.AppendBinary(make([]byte, 0, nbd.RequestHeaderSize))
	sent, err := c.send(ctx, b, payload)
	if err == nil {
		return cl, nil
	}
	if sent {
		// A request cut short leaves the stream unusable.
		c.fail(fmt.Errorf("sending %v: %w", req.Command, err))
	} else {
		c.forget(cl)
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return nil, c.Err()
}

// usable returns why no request can start on c, or nil if one can.
func (c *Conn) usable() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.unusableLocked()
}

// unusableLocked is usable with c.mu held: c failed, or it is closing (by
// Close, or softly after the server answered ESHUTDOWN).
func (c *Conn) unusableLocked() error {
	switch {
	case c.err != nil:
		return c.err
	case c.closing:
		return fmt.Errorf("%w: the connection to %s is shutting down", ErrClosed, c.server)
	}
	return nil
}

// send writes a request header and its payload as one unit. sent reports
// whether any byte may have reached the socket. A ctx ending mid-write
// interrupts it (and the caller then tears the connection down).
func (c *Conn) send(ctx context.Context, hdr, payload []byte) (sent bool, err error) {
	select {
	case c.sendLock <- struct{}{}:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	defer func() { <-c.sendLock }()
	if err := ctx.Err(); err != nil {
		return false, err
	}
	var fired chan struct{}
	stop := func() bool { return true }
	if ctx.Done() != nil {
		fired = make(chan struct{})
		stop = context.AfterFunc(ctx, func() {
			c.nc.SetWriteDeadline(aLongTimeAgo)
			close(fired)
		})
	}
	if len(payload) <= smallPayload {
		c.wbuf = append(append(c.wbuf[:0], hdr...), payload...)
		_, err = c.nc.Write(c.wbuf)
	} else {
		bufs := net.Buffers{hdr, payload}
		_, err = bufs.WriteTo(c.nc)
	}
	if !stop() {
		<-fired
		if err == nil {
			c.nc.SetWriteDeadline(time.Time{})
		} else {
			err = ctx.Err()
		}
	}
	return true, err
}

// sendRaw writes b with no reply expected (NBD_CMD_DISC).
func (c *Conn) sendRaw(ctx context.Context, b []byte) error {
	_, err := c.send(ctx, b, nil)
	return err
}

// endTLS sends TLS's close_notify after NBD_CMD_DISC, as the spec wants;
// nothing without TLS. ctx bounds it (crypto/tls bounds it to 5 s too).
func (c *Conn) endTLS(ctx context.Context) {
	tc, ok := c.nc.(*tls.Conn)
	if !ok {
		return
	}
	stop := context.AfterFunc(ctx, func() { c.raw.SetWriteDeadline(aLongTimeAgo) })
	defer stop()
	tc.CloseWrite()
}

// forget drops a registered call that was never sent.
func (c *Conn) forget(cl *call) {
	c.mu.Lock()
	if c.pending[cl.req.Handle] == cl {
		delete(c.pending, cl.req.Handle)
		c.signalIdle()
	}
	c.mu.Unlock()
}

// giveUp records that cl's caller no longer waits for it, so that
// Shutdown does not either.
func (c *Conn) giveUp(cl *call) {
	c.mu.Lock()
	if c.pending[cl.req.Handle] == cl && !cl.givenUp {
		cl.givenUp = true
		c.givenUp++
		c.signalIdle()
	}
	c.mu.Unlock()
}

// signalIdle wakes Shutdown once nothing is pending that a caller waits
// for. c.mu must be held.
func (c *Conn) signalIdle() {
	if c.idle != nil && len(c.pending) == c.givenUp {
		close(c.idle)
		c.idle = nil
	}
}

// complete hands a finished reply to its caller.
func (c *Conn) complete(cl *call, err *RequestError) {
	c.mu.Lock()
	if c.pending[cl.req.Handle] != cl {
		c.mu.Unlock()
		return // already failed with the connection
	}
	delete(c.pending, cl.req.Handle)
	if cl.givenUp {
		c.givenUp--
	}
	c.signalIdle()
	c.mu.Unlock()
	if err == nil {
		cl.finish(nil)
		return
	}
	if err.Errno == nbd.ESHUTDOWN {
		// The spec wants a soft disconnect once the server says it is
		// going away.
		c.shutdownOnce.Do(func() { go c.Close() })
	}
	cl.finish(err)
}

// fail ends the connection: every pending request fails with err (or the
// error the connection already failed with).
func (c *Conn) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		if errors.Is(err, ErrClosed) && !errors.Is(err, ErrProtocol) {
			c.err = err
		} else {
			c.err = fmt.Errorf("NBD connection to %s: %w", c.server, err)
		}
	}
	err = c.err
	calls := c.pending
	c.pending = map[uint64]*call{}
	c.givenUp = 0
	c.closing = true
	c.signalIdle()
	c.mu.Unlock()
	// The socket, not a TLS session over it, whose Close would first try
	// to send close_notify to a server that may have stalled.
	c.raw.Close()
	for _, cl := range calls {
		cl.stopWrites() // the socket is closed, so a copy in progress ends now
		cl.finish(err)
	}
}

func (c *Conn) lookup(handle uint64) (*call, error) {
	c.mu.Lock()
	cl := c.pending[handle]
	c.mu.Unlock()
	if cl == nil {
		return nil, protocolErrorf("reply for handle %#x, which no request is waiting for", handle)
	}
	return cl, nil
}

// readLoop demultiplexes replies until the connection ends.
func (c *Conn) readLoop() {
	defer close(c.readerDone)
	c.fail(c.readReplies())
}

func (c *Conn) readReplies() error {
	var hb [nbd.StructuredHeaderSize]byte
	for {
		if _, err := io.ReadFull(c.r, hb[:4]); err != nil {
			return readError(err)
		}
		switch magic := binary.BigEndian.Uint32(hb[:4]); magic {
		case nbd.SimpleReplyMagic:
			if _, err := io.ReadFull(c.r, hb[4:nbd.SimpleReplySize]); err != nil {
				return readError(err)
			}
			var rep nbd.SimpleReply
			if err := rep.UnmarshalBinary(hb[:nbd.SimpleReplySize]); err != nil {
				return fmt.Errorf("%w: %w", ErrProtocol, err)
			}
			if err := c.simpleReply(rep); err != nil {
				return err
			}
		case nbd.StructuredReplyMagic:
			if !c.info.StructuredReplies {
				return protocolErrorf("structured reply chunk, but structured replies were not negotiated")
			}
			if _, err := io.ReadFull(c.r, hb[4:]); err != nil {
				return readError(err)
			}
			var h nbd.StructuredReplyHeader
			if err := h.UnmarshalBinary(hb[:]); err != nil {
				return fmt.Errorf("%w: %w", ErrProtocol, err)
			}
			if err := c.chunk(h); err != nil {
				return err
			}
		default:
			return protocolErrorf("reply magic %#08x is neither a simple nor a structured reply", magic)
		}
	}
}

func readError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w: the server closed the connection", ErrClosed)
	case errors.Is(err, net.ErrClosed):
		return ErrClosed
	}
	return fmt.Errorf("reading replies: %w", err)
}

func (c *Conn) simpleReply(rep nbd.SimpleReply) error {
	cl, err := c.lookup(rep.Handle)
	if err != nil {
		return err
	}
	cmd := cl.req.Command
	if c.info.StructuredReplies && cmd == nbd.CmdRead {
		return protocolErrorf("simple reply to NBD_CMD_READ, but structured replies were negotiated")
	}
	if rep.Errno != 0 {
		c.complete(cl, newRequestError(cl.rangeOf(), rep.Errno, ""))
		return nil
	}
	switch cmd {
	case nbd.CmdRead:
		if err := c.readData(cl, 0, uint64(cl.req.Length)); err != nil {
			return err
		}
	case nbd.CmdBlockStatus:
		return protocolErrorf("simple success reply to NBD_CMD_BLOCK_STATUS, which needs a structured one")
	}
	c.complete(cl, nil)
	return nil
}

// readData reads n bytes of read data into the call's buffer at rel, or
// discards them if the caller has given up.
func (c *Conn) readData(cl *call, rel, n uint64) error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.abandoned {
		cl.dropped = true
		_, err := io.CopyN(io.Discard, c.r, int64(n))
		return readError(err)
	}
	_, err := io.ReadFull(c.r, cl.dst[rel:rel+n])
	return readError(err)
}

// chunk handles one structured reply chunk.
func (c *Conn) chunk(h nbd.StructuredReplyHeader) error {
	cl, err := c.lookup(h.Handle)
	if err != nil {
		return err
	}
	cmd := cl.req.Command
	switch {
	case h.Type == nbd.ReplyNone:
		if h.Length != 0 {
			return protocolErrorf("NBD_REPLY_TYPE_NONE with %d bytes of payload", h.Length)
		}
		if h.Flags&nbd.ReplyFlagDone == 0 {
			return protocolErrorf("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")
		}
	case h.Type == nbd.ReplyOffsetData:
		if cmd != nbd.CmdRead {
			return protocolErrorf("%v chunk in reply to %v", h.Type, cmd)
		}
		if h.Length <= nbd.OffsetDataPrefixSize {
			return protocolErrorf("%v chunk of %d bytes carries no data", h.Type, h.Length)
		}
		var ob [nbd.OffsetDataPrefixSize]byte
		if _, err := io.ReadFull(c.r, ob[:]); err != nil {
			return readError(err)
		}
		n := uint64(h.Length - nbd.OffsetDataPrefixSize)
		rel, err := cl.claim(binary.BigEndian.Uint64(ob[:]), n)
		if err != nil {
			return err
		}
		if err := c.readData(cl, rel, n); err != nil {
			return err
		}
	case h.Type == nbd.ReplyOffsetHole:
		if cmd != nbd.CmdRead {
			return protocolErrorf("%v chunk in reply to %v", h.Type, cmd)
		}
		if h.Length != nbd.OffsetHoleSize {
			return protocolErrorf("%v chunk of %d bytes, want %d", h.Type, h.Length, nbd.OffsetHoleSize)
		}
		var b [nbd.OffsetHoleSize]byte
		if _, err := io.ReadFull(c.r, b[:]); err != nil {
			return readError(err)
		}
		var hole nbd.OffsetHole
		if err := hole.UnmarshalBinary(b[:]); err != nil {
			return fmt.Errorf("%w: %w", ErrProtocol, err)
		}
		if hole.Length == 0 {
			return protocolErrorf("%v chunk of length 0", h.Type)
		}
		rel, err := cl.claim(hole.Offset, uint64(hole.Length))
		if err != nil {
			return err
		}
		cl.mu.Lock()
		if cl.abandoned {
			cl.dropped = true
		} else {
			clear(cl.dst[rel : rel+uint64(hole.Length)])
		}
		cl.mu.Unlock()
	case h.Type == nbd.ReplyBlockStatus:
		if cmd != nbd.CmdBlockStatus {
			return protocolErrorf("%v chunk in reply to %v", h.Type, cmd)
		}
		// Every extent but the last ends inside the request, and none is
		// empty, so a chunk holds at most req.Length extents.
		limit := 4 + 8*uint64(min(nbd.MaxBlockStatusExtents, cl.req.Length))
		if uint64(h.Length) > limit {
			return protocolErrorf("%v chunk of %d bytes for a %d-byte request", h.Type, h.Length, cl.req.Length)
		}
		p := make([]byte, h.Length)
		if _, err := io.ReadFull(c.r, p); err != nil {
			return readError(err)
		}
		var bs nbd.BlockStatus
		if err := bs.UnmarshalBinary(p); err != nil {
			return fmt.Errorf("%w: %w", ErrProtocol, err)
		}
		if err := c.status(cl, bs); err != nil {
			return err
		}
	case h.Type.IsError():
		if h.Length > maxErrorChunk {
			return protocolErrorf("%v chunk of %d bytes", h.Type, h.Length)
		}
		p := make([]byte, h.Length)
		if _, err := io.ReadFull(c.r, p); err != nil {
			return readError(err)
		}
		var ec nbd.ErrorChunk
		if err := ec.UnmarshalBinary(h.Type, p); err != nil {
			return fmt.Errorf("%w: %w", ErrProtocol, err)
		}
		end := cl.req.Offset + uint64(cl.req.Length)
		if ec.HasOffset && cl.req.Length > 0 && (ec.Offset < cl.req.Offset || ec.Offset >= end) {
			return protocolErrorf("error offset %d outside the request [%d, +%d)", ec.Offset, cl.req.Offset, cl.req.Length)
		}
		if cl.failure == nil {
			cl.failure = newRequestError(cl.rangeOf(), ec.Errno, sanitize([]byte(ec.Message)))
			cl.failure.ErrorOffset, cl.failure.HasErrorOffset = ec.Offset, ec.HasOffset
		}
	default:
		return protocolErrorf("unexpected chunk type %v in reply to %v", h.Type, cmd)
	}
	if h.Flags&nbd.ReplyFlagDone == 0 {
		return nil
	}
	if cl.failure == nil {
		switch {
		case cmd == nbd.CmdRead && cl.covered != uint64(cl.req.Length):
			return protocolErrorf("read of %d bytes at %d succeeded with only %d bytes of data and holes",
				cl.req.Length, cl.req.Offset, cl.covered)
		case cmd == nbd.CmdBlockStatus && cl.extents == nil:
			return protocolErrorf("block status succeeded without a base:allocation chunk")
		}
	}
	c.complete(cl, cl.failure)
	return nil
}

// claim checks that the content chunk [off, off+n) lies inside the request
// and overlaps no earlier one, and returns its position in the buffer.
func (cl *call) claim(off, n uint64) (uint64, error) {
	start, end := cl.req.Offset, cl.req.Offset+uint64(cl.req.Length)
	if off < start || off > end || n > end-off {
		return 0, protocolErrorf("chunk [%d, +%d) outside the request [%d, +%d)", off, n, start, cl.req.Length)
	}
	rel := off - start
	if !cl.spans.add(rel, rel+n) {
		return 0, protocolErrorf("chunk [%d, +%d) overlaps an earlier chunk", off, n)
	}
	cl.covered += n
	return rel, nil
}

// status checks one block status chunk and keeps base:allocation's extents.
func (c *Conn) status(cl *call, bs nbd.BlockStatus) error {
	if !c.metaIDs[bs.ContextID] {
		return protocolErrorf("block status for context %d, which was not selected", bs.ContextID)
	}
	for _, id := range cl.statusIDs {
		if id == bs.ContextID {
			return protocolErrorf("two block status chunks for context %d", bs.ContextID)
		}
	}
	cl.statusIDs = append(cl.statusIDs, bs.ContextID)
	if cl.req.Flags&nbd.CmdFlagReqOne != 0 {
		if len(bs.Extents) != 1 || bs.Extents[0].Length > cl.req.Length {
			return protocolErrorf("block status with NBD_CMD_FLAG_REQ_ONE returned %d extents", len(bs.Extents))
		}
	} else {
		var sum uint64
		for _, e := range bs.Extents[:len(bs.Extents)-1] {
			sum += uint64(e.Length)
		}
		if len(bs.Extents) > 1 && sum >= uint64(cl.req.Length) {
			return protocolErrorf("block status extents run past the request before the last one")
		}
	}
	if bs.ContextID == c.metaID {
		cl.extents = bs.Extents
	}
	return nil
}

// spans is a sorted set of disjoint, non-adjacent half-open ranges.
type spans []span

type span struct{ start, end uint64 }

// add inserts [start, end) and reports false if it overlaps what is there.
func (s *spans) add(start, end uint64) bool {
	sp := *s
	// First span ending after start: the only one that can overlap.
	lo, hi := 0, len(sp)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if sp[m].end <= start {
			lo = m + 1
		} else {
			hi = m
		}
	}
	i := lo
	if i < len(sp) && sp[i].start < end {
		return false
	}
	left := i > 0 && sp[i-1].end == start
	right := i < len(sp) && sp[i].start == end
	switch {
	case left && right:
		sp[i-1].end = sp[i].end
		sp = append(sp[:i], sp[i+1:]...)
	case left:
		sp[i-1].end = end
	case right:
		sp[i].start = start
	default:
		sp = append(sp, span{})
		copy(sp[i+1:], sp[i:])
		sp[i] = span{start, end}
	}
	*s = sp
	return true
}
