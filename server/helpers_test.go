package server

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server/backend"
)

// testServer runs a server on a loopback port until the test ends.
type testServer struct {
	srv     *Server
	addr    string
	reg     *Registry
	cancel  context.CancelFunc
	done    chan error
	stopped bool
}

func startServer(t testing.TB, cfg *Config, exports ...*Export) *testServer {
	t.Helper()
	reg := NewRegistry()
	for _, e := range exports {
		if err := reg.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	if cfg == nil {
		cfg = &Config{}
	}
	cfg.Exports = reg
	cfg.Logger = zaptest.NewLogger(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ts := &testServer{addr: ln.Addr().String(), reg: reg, cancel: cancel, done: make(chan error, 1)}
	srv := New(cfg)
	ts.srv = srv
	go func() { ts.done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() { ts.stop(t) })
	return ts
}

// stop cancels the server and returns what Serve returned.
func (ts *testServer) stop(t testing.TB) error {
	t.Helper()
	if ts.stopped {
		return nil
	}
	ts.stopped = true
	ts.cancel()
	select {
	case err := <-ts.done:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("server did not stop within 20s")
		return nil
	}
}

// fileExport makes an export over a sparse temp file of size bytes.
func fileExport(t testing.TB, name string, size int64, readOnly bool) (*Export, string) {
	t.Helper()
	return fileExportIn(t, t.TempDir(), name, size, readOnly)
}

// fileExportIn is fileExport in dir, a new directory of the test's (on tmpfs,
// say, where the reader answers small writes too: see tryInline).
func fileExportIn(t testing.TB, dir, name string, size int64, readOnly bool) (*Export, string) {
	t.Helper()
	path := filepath.Join(dir, name+".img")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	e, err := OpenExport(ExportSpec{Name: name, Path: path, ReadOnly: readOnly})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Backend.Close() })
	return e, path
}

// rawClient speaks the protocol byte by byte with the nbd codec, so tests can
// send anything, including what no well-behaved client would.
type rawClient struct {
	t  testing.TB
	nc net.Conn
	r  *bufio.Reader
}

func dialRaw(t testing.TB, addr string) *rawClient {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	t.Cleanup(func() { nc.Close() })
	return &rawClient{t: t, nc: nc, r: bufio.NewReader(nc)}
}

func (c *rawClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *rawClient) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.r, b); err != nil {
		c.t.Fatalf("reading %d bytes: %v", n, err)
	}
	return b
}

// greet reads the greeting and sends client flags.
func (c *rawClient) greet(flags nbd.ClientFlags) {
	c.t.Helper()
	var h nbd.ServerHello
	if err := h.UnmarshalBinary(c.read(nbd.ServerHelloSize)); err != nil {
		c.t.Fatal(err)
	}
	if h.Flags != nbd.FlagFixedNewstyle|nbd.FlagNoZeroes {
		c.t.Fatalf("handshake flags %v", h.Flags)
	}
	c.write(binary.BigEndian.AppendUint32(nil, uint32(flags)))
}

func (c *rawClient) sendOption(opt nbd.Option, data []byte) {
	c.t.Helper()
	b, _ := nbd.OptionHeader{Option: opt, Length: uint32(len(data))}.AppendBinary(nil)
	c.write(append(b, data...))
}

type optReply struct {
	typ  nbd.OptionReplyType
	data []byte
}

// optionReplies reads replies to opt up to and including the final one.
func (c *rawClient) optionReplies(opt nbd.Option) []optReply {
	c.t.Helper()
	var out []optReply
	for {
		var h nbd.OptionReplyHeader
		if err := h.UnmarshalBinary(c.read(nbd.OptionReplyHeaderSize)); err != nil {
			c.t.Fatal(err)
		}
		if h.Option != opt {
			c.t.Fatalf("reply for %v, want %v", h.Option, opt)
		}
		out = append(out, optReply{h.Type, c.read(int(h.Length))})
		if h.Type == nbd.RepAck || h.Type.IsError() {
			return out
		}
	}
}

func (c *rawClient) option(opt nbd.Option, msg interface{ AppendBinary([]byte) ([]byte, error) }) []optReply {
	c.t.Helper()
	var data []byte
	if msg != nil {
		data, _ = msg.AppendBinary(nil)
	}
	c.sendOption(opt, data)
	return c.optionReplies(opt)
}

// open negotiates up to transmission on export name; structured selects
// structured replies and base:allocation.
func (c *rawClient) open(name string, structured bool) nbd.Info {
	c.t.Helper()
	c.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
	if structured {
		if r := c.option(nbd.OptStructuredReply, nil); r[0].typ != nbd.RepAck {
			c.t.Fatalf("structured reply: %v", r[0].typ)
		}
		r := c.option(nbd.OptSetMetaContext, nbd.MetaContextRequest{Export: name, Queries: []string{nbd.MetaContextBaseAllocation}})
		if len(r) != 2 || r[0].typ != nbd.RepMetaContext {
			c.t.Fatalf("set meta context: %+v", r)
		}
	}
	var export nbd.Info
	for _, r := range c.option(nbd.OptGo, nbd.InfoRequest{Name: name}) {
		if r.typ.IsError() {
			c.t.Fatalf("NBD_OPT_GO %q: %v %s", name, r.typ, r.data)
		}
		var info nbd.Info
		if r.typ == nbd.RepInfo && info.UnmarshalBinary(r.data) == nil && info.Type == nbd.InfoExport {
			export = info
		}
	}
	return export
}

func (c *rawClient) request(req nbd.RequestHeader, payload []byte) {
	c.t.Helper()
	b, _ := req.AppendBinary(nil)
	c.write(append(b, payload...))
}

// result is one request's reply as a structured-reply-agnostic summary.
type result struct {
	handle uint64
	errno  nbd.Errno
	msg    string
	whole  []byte            // a simple reply's data: the whole range
	data   map[uint64][]byte // OFFSET_DATA chunks by offset
	holes  map[uint64]uint32 // OFFSET_HOLE chunks by offset
	status []nbd.Extent
	chunks int
}

// simpleReply reads a simple reply, with dataLen bytes of data on success.
func (c *rawClient) simpleReply(dataLen int) result {
	c.t.Helper()
	var r nbd.SimpleReply
	if err := r.UnmarshalBinary(c.read(nbd.SimpleReplySize)); err != nil {
		c.t.Fatal(err)
	}
	res := result{handle: r.Handle, errno: r.Errno}
	if r.Errno == 0 && dataLen > 0 {
		res.whole = c.read(dataLen)
	}
	return res
}

// reply reads one reply of either kind; for simple replies dataLen says how
// much data a successful one carries.
func (c *rawClient) reply(dataLen int) result {
	c.t.Helper()
	magic, err := c.r.Peek(4)
	if err != nil {
		c.t.Fatal(err)
	}
	if binary.BigEndian.Uint32(magic) == nbd.SimpleReplyMagic {
		return c.simpleReply(dataLen)
	}
	res := result{data: map[uint64][]byte{}, holes: map[uint64]uint32{}}
	for {
		var h nbd.StructuredReplyHeader
		if err := h.UnmarshalBinary(c.read(nbd.StructuredHeaderSize)); err != nil {
			c.t.Fatal(err)
		}
		res.handle = h.Handle
		res.chunks++
		payload := c.read(int(h.Length))
		switch {
		case h.Type == nbd.ReplyOffsetData:
			res.data[binary.BigEndian.Uint64(payload)] = payload[8:]
		case h.Type == nbd.ReplyOffsetHole:
			var hole nbd.OffsetHole
			if err := hole.UnmarshalBinary(payload); err != nil {
				c.t.Fatal(err)
			}
			res.holes[hole.Offset] = hole.Length
		case h.Type == nbd.ReplyBlockStatus:
			var bs nbd.BlockStatus
			if err := bs.UnmarshalBinary(payload); err != nil {
				c.t.Fatal(err)
			}
			res.status = bs.Extents
		case h.Type.IsError():
			var e nbd.ErrorChunk
			if err := e.UnmarshalBinary(h.Type, payload); err != nil {
				c.t.Fatal(err)
			}
			res.errno, res.msg = e.Errno, e.Message
		case h.Type != nbd.ReplyNone:
			c.t.Fatalf("unexpected chunk %v", h.Type)
		}
		if h.Flags&nbd.ReplyFlagDone != 0 {
			return res
		}
	}
}

// replyFor reads one reply when replies may come in any order: a simple
// reply's data length is lenOf its handle.
func (c *rawClient) replyFor(lenOf func(handle uint64) int) result {
	c.t.Helper()
	hdr, err := c.r.Peek(nbd.SimpleReplySize)
	if err != nil {
		c.t.Fatal(err)
	}
	if binary.BigEndian.Uint32(hdr) != nbd.SimpleReplyMagic {
		return c.reply(0)
	}
	var r nbd.SimpleReply
	if err := r.UnmarshalBinary(hdr); err != nil {
		c.t.Fatal(err)
	}
	return c.simpleReply(lenOf(r.Handle))
}

// expectClosed asserts the server hangs up without sending anything more.
func (c *rawClient) expectClosed() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := c.r.ReadByte()
	if err == nil {
		c.t.Fatalf("server sent %#x, want the connection closed", b)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		c.t.Fatal("server kept the connection open")
	}
}

// drainUntilClosed reads and discards until the server closes the connection.
func (c *rawClient) drainUntilClosed() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	// A reset is a close too: the server closed with our writes unread.
	if _, err := io.Copy(io.Discard, c.r); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		c.t.Fatalf("server did not close the connection: %v", err)
	}
}

// hookBackend wraps a Backend with test hooks that run before each call.
type hookBackend struct {
	Backend
	mu      sync.Mutex
	events  []string
	onRead  func(off int64) error
	onWrite func(off int64) error
}

func (h *hookBackend) record(ev string) {
	h.mu.Lock()
	h.events = append(h.events, ev)
	h.mu.Unlock()
}

func (h *hookBackend) ReadAt(p []byte, off int64) error {
	if h.onRead != nil {
		if err := h.onRead(off); err != nil {
			return err
		}
	}
	return h.Backend.ReadAt(p, off)
}

func (h *hookBackend) WriteAt(p []byte, off int64, fua bool) error {
	if h.onWrite != nil {
		if err := h.onWrite(off); err != nil {
			return err
		}
	}
	err := h.Backend.WriteAt(p, off, fua)
	h.record(fmt.Sprintf("write %d", off))
	return err
}

func (h *hookBackend) Flush() error {
	h.record("flush")
	return h.Backend.Flush()
}

var _ Backend = (*backend.File)(nil)

// returnsWithoutWaiting runs f, which must not wait for anything held up
// elsewhere in the test, and fails the test with why if it does not return
// within a deadlock detector's limit (not a speed target).
func returnsWithoutWaiting(t testing.TB, why string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { f(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal(why)
	}
}
