package client

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/nbd"
)

// A hostile or broken server must produce errors: no panic, no allocation of
// the size it claims, no request left hanging.

func TestHostileTransmission(t *testing.T) {
	hdr := func(typ nbd.ReplyType, flags nbd.ReplyFlags, handle uint64, length uint32) []byte {
		b, _ := nbd.StructuredReplyHeader{Flags: flags, Type: typ, Handle: handle, Length: length}.AppendBinary(nil)
		return b
	}
	done := nbd.ReplyFlagDone
	read := func(ctx context.Context, c *Conn) error { return c.ReadAt(ctx, make([]byte, 1024), 4096) }
	status := func(ctx context.Context, c *Conn) error { _, err := c.BlockStatus(ctx, 4096, 1024, 0); return err }
	status1 := func(ctx context.Context, c *Conn) error {
		_, err := c.BlockStatus(ctx, 4096, 1024, nbd.CmdFlagReqOne)
		return err
	}
	write := func(ctx context.Context, c *Conn) error { return c.WriteAt(ctx, make([]byte, 1024), 4096, 0) }

	tests := []struct {
		name    string
		opts    *Options
		do      func(context.Context, *Conn) error
		reply   func(req nbd.RequestHeader) []byte
		is      error  // default ErrProtocol
		wantMsg string // substring
	}{
		{name: "bad magic", do: read, wantMsg: "neither",
			reply: func(nbd.RequestHeader) []byte { return []byte("HTTP/1.1 400 Bad Request\r\n\r\n") }},
		{name: "unknown handle", do: read, wantMsg: "no request is waiting",
			reply: func(r nbd.RequestHeader) []byte { return noneChunk(r.Handle + 1000) }},
		{name: "huge data chunk", do: read, wantMsg: "outside the request",
			reply: func(r nbd.RequestHeader) []byte {
				return binary.BigEndian.AppendUint64(hdr(nbd.ReplyOffsetData, done, r.Handle, 0xffffffff), r.Offset)
			}},
		{name: "data before the request", do: read, wantMsg: "outside the request",
			reply: func(r nbd.RequestHeader) []byte { return dataChunk(r.Handle, r.Offset-1, make([]byte, 16), done) }},
		{name: "data past the request", do: read, wantMsg: "outside the request",
			reply: func(r nbd.RequestHeader) []byte { return dataChunk(r.Handle, r.Offset+1000, make([]byte, 25), done) }},
		{name: "offset overflow", do: read, wantMsg: "outside the request",
			reply: func(r nbd.RequestHeader) []byte { return dataChunk(r.Handle, ^uint64(0)-3, make([]byte, 16), done) }},
		{name: "overlapping chunks", do: read, wantMsg: "overlaps",
			reply: func(r nbd.RequestHeader) []byte {
				return append(dataChunk(r.Handle, r.Offset, make([]byte, 512), 0), holeChunk(r.Handle, r.Offset+511, 2, done)...)
			}},
		{name: "success with data missing", do: read, wantMsg: "only 512 bytes",
			reply: func(r nbd.RequestHeader) []byte { return dataChunk(r.Handle, r.Offset, make([]byte, 512), done) }},
		{name: "empty data chunk", do: read, wantMsg: "carries no data",
			reply: func(r nbd.RequestHeader) []byte { return dataChunk(r.Handle, r.Offset, nil, done) }},
		{name: "empty hole", do: read, wantMsg: "length 0",
			reply: func(r nbd.RequestHeader) []byte { return holeChunk(r.Handle, r.Offset, 0, done) }},
		{name: "hole chunk of the wrong size", do: read, wantMsg: "want 12",
			reply: func(r nbd.RequestHeader) []byte {
				return append(hdr(nbd.ReplyOffsetHole, done, r.Handle, 13), make([]byte, 13)...)
			}},
		{name: "NONE without DONE", do: read, wantMsg: "without NBD_REPLY_FLAG_DONE",
			reply: func(r nbd.RequestHeader) []byte { return hdr(nbd.ReplyNone, 0, r.Handle, 0) }},
		{name: "NONE with payload", do: read, wantMsg: "bytes of payload",
			reply: func(r nbd.RequestHeader) []byte { return append(hdr(nbd.ReplyNone, done, r.Handle, 4), 1, 2, 3, 4) }},
		{name: "unknown chunk type", do: read, wantMsg: "unexpected chunk type",
			reply: func(r nbd.RequestHeader) []byte { return hdr(3, done, r.Handle, 0) }},
		{name: "data chunk for a write", do: write, wantMsg: "in reply to NBD_CMD_WRITE",
			reply: func(r nbd.RequestHeader) []byte { return dataChunk(r.Handle, r.Offset, make([]byte, 8), done) }},
		{name: "simple reply to a structured read", do: read, wantMsg: "simple reply to NBD_CMD_READ",
			reply: func(r nbd.RequestHeader) []byte { return simpleReply(r.Handle, 0) }},
		{name: "structured reply on a simple connection", opts: &Options{NoStructuredReplies: true}, do: read,
			wantMsg: "not negotiated",
			reply:   func(r nbd.RequestHeader) []byte { return noneChunk(r.Handle) }},
		{name: "huge error chunk", do: read, wantMsg: "NBD_REPLY_TYPE_ERROR chunk of",
			reply: func(r nbd.RequestHeader) []byte { return hdr(nbd.ReplyError, done, r.Handle, 1<<30) }},
		{name: "error message overruns the chunk", do: read, wantMsg: "error chunk",
			reply: func(r nbd.RequestHeader) []byte {
				p := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint32(nil, uint32(nbd.EIO)), 100)
				return append(hdr(nbd.ReplyError, done, r.Handle, uint32(len(p))), p...)
			}},
		{name: "error value 0", do: read, wantMsg: "error value 0",
			reply: func(r nbd.RequestHeader) []byte { return errorChunk(r.Handle, nbd.ErrorChunk{Errno: 0}, done) }},
		{name: "error offset outside the request", do: read, wantMsg: "error offset",
			reply: func(r nbd.RequestHeader) []byte {
				return errorChunk(r.Handle, nbd.ErrorChunk{Errno: nbd.EIO, HasOffset: true, Offset: 0}, done)
			}},
		{name: "status for a context never selected", do: status, wantMsg: "not selected",
			reply: func(r nbd.RequestHeader) []byte {
				return statusChunk(r.Handle, 99, []nbd.Extent{{Length: 1024}}, done)
			}},
		{name: "huge status chunk", do: status, wantMsg: "for a 1024-byte request",
			reply: func(r nbd.RequestHeader) []byte { return hdr(nbd.ReplyBlockStatus, done, r.Handle, 0xfffffff4) }},
		{name: "ragged status chunk", do: status, wantMsg: "block status chunk",
			reply: func(r nbd.RequestHeader) []byte {
				return append(hdr(nbd.ReplyBlockStatus, done, r.Handle, 9), make([]byte, 9)...)
			}},
		{name: "two status chunks for one context", do: status, wantMsg: "two block status chunks",
			reply: func(r nbd.RequestHeader) []byte {
				one := statusChunk(r.Handle, fakeMetaID, []nbd.Extent{{Length: 1024}}, 0)
				return append(one, statusChunk(r.Handle, fakeMetaID, []nbd.Extent{{Length: 1024}}, done)...)
			}},
		{name: "status extents past the request", do: status, wantMsg: "run past the request",
			reply: func(r nbd.RequestHeader) []byte {
				return statusChunk(r.Handle, fakeMetaID, []nbd.Extent{{Length: 1024}, {Length: 512}}, done)
			}},
		{name: "status with REQ_ONE and two extents", do: status1, wantMsg: "REQ_ONE",
			reply: func(r nbd.RequestHeader) []byte {
				return statusChunk(r.Handle, fakeMetaID, []nbd.Extent{{Length: 512}, {Length: 512}}, done)
			}},
		{name: "status success without status", do: status, wantMsg: "without a base:allocation chunk",
			reply: func(r nbd.RequestHeader) []byte { return noneChunk(r.Handle) }},
		{name: "simple success to block status", do: status, wantMsg: "needs a structured one",
			reply: func(r nbd.RequestHeader) []byte { return simpleReply(r.Handle, 0) }},
		{name: "hang up mid-data", do: read, is: ErrClosed, wantMsg: "server closed the connection",
			reply: func(r nbd.RequestHeader) []byte {
				return dataChunk(r.Handle, r.Offset, make([]byte, 1024), done)[:40]
			}},
		{name: "hang up mid-header", do: read, is: ErrClosed, wantMsg: "server closed the connection",
			reply: func(r nbd.RequestHeader) []byte { return noneChunk(r.Handle)[:7] }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &fakeServer{exports: map[string]*fakeExport{"d": newFakeExport(1<<20, "")}}
			s.transmission = func(fc *fakeConn) {
				req, _, ok := fc.readRequest()
				if !ok {
					return
				}
				fc.send(tt.reply(req))
				if tt.is == ErrClosed {
					return // and hang up
				}
				io.Copy(io.Discard, fc.nc) // until the client hangs up
			}
			c := dialT(t, s.start(t, "d"), tt.opts)
			ctx := testContext(t)
			err := tt.do(ctx, c)
			want := tt.is
			if want == nil {
				want = ErrProtocol
			}
			if !errors.Is(err, want) || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("got %v, want %v containing %q", err, want, tt.wantMsg)
			}
			<-c.Done() // the connection is torn down
			if err := c.Flush(ctx); !errors.Is(err, want) {
				t.Errorf("request on the dead connection: %v, want %v", err, want)
			}
		})
	}
}

// A protocol violation fails every pending request, not just the one it
// concerned.
func TestProtocolErrorFailsAllPending(t *testing.T) {
	const n = 5
	s := &fakeServer{exports: map[string]*fakeExport{"d": newFakeExport(1<<20, "")}}
	s.transmission = func(fc *fakeConn) {
		for range n {
			if _, _, ok := fc.readRequest(); !ok {
				return
			}
		}
		fc.send([]byte("garbage!garbage!garbage!"))
		io.Copy(io.Discard, fc.nc)
	}
	c := dialT(t, s.start(t, "d"), nil)
	ctx := testContext(t)
	errs := make(chan error, n)
	for i := range n {
		go func() { errs <- c.ReadAt(ctx, make([]byte, 512), int64(i*512)) }()
	}
	for range n {
		if err := <-errs; !errors.Is(err, ErrProtocol) {
			t.Errorf("pending read: %v, want ErrProtocol", err)
		}
	}
}

// optionServer greets as a fixed-newstyle server and answers each option with
// what answer returns; a nil answer hangs up.
func optionServer(t *testing.T, answer func(opt nbd.Option, data []byte) []byte) string {
	return serveRaw(t, func(nc net.Conn) {
		hello, _ := nbd.ServerHello{Flags: nbd.FlagFixedNewstyle | nbd.FlagNoZeroes}.AppendBinary(nil)
		nc.Write(hello)
		var cf [4]byte
		if _, err := io.ReadFull(nc, cf[:]); err != nil {
			return
		}
		for {
			var hb [nbd.OptionHeaderSize]byte
			if _, err := io.ReadFull(nc, hb[:]); err != nil {
				return
			}
			var h nbd.OptionHeader
			if err := h.UnmarshalBinary(hb[:]); err != nil {
				return
			}
			data := make([]byte, h.Length)
			if _, err := io.ReadFull(nc, data); err != nil {
				return
			}
			b := answer(h.Option, data)
			if b == nil {
				return
			}
			if _, err := nc.Write(b); err != nil {
				return
			}
		}
	})
}

func optReply(opt nbd.Option, t nbd.OptionReplyType, data []byte) []byte {
	b, _ := nbd.OptionReplyHeader{Option: opt, Type: t, Length: uint32(len(data))}.AppendBinary(nil)
	return append(b, data...)
}

func infoReply(opt nbd.Option, in nbd.Info) []byte {
	b, _ := in.AppendBinary(nil)
	return optReply(opt, nbd.RepInfo, b)
}

func TestHostileHandshake(t *testing.T) {
	ack := func(opt nbd.Option) []byte { return optReply(opt, nbd.RepAck, nil) }
	goodExport := nbd.Info{Type: nbd.InfoExport, Size: 4096, Flags: nbd.FlagHasFlags}
	// answerGo answers everything before NBD_OPT_GO with ACK and GO with b.
	answerGo := func(b func() []byte) func(nbd.Option, []byte) []byte {
		return func(opt nbd.Option, _ []byte) []byte {
			if opt == nbd.OptGo {
				return b()
			}
			return ack(opt)
		}
	}
	tests := []struct {
		name    string
		raw     func(nc net.Conn)               // whole conversation, or
		answer  func(nbd.Option, []byte) []byte // option answers
		list    bool                            // exercise List instead of Dial
		is      error
		wantMsg string
	}{
		{name: "garbage greeting", is: ErrProtocol, wantMsg: "not a newstyle NBD server",
			raw: func(nc net.Conn) { nc.Write([]byte("SSH-2.0-OpenSSH_9.2p1\r\n")) }},
		{name: "oldstyle greeting", is: ErrProtocol, wantMsg: "not a newstyle NBD server",
			raw: func(nc net.Conn) {
				b := binary.BigEndian.AppendUint64(nil, nbd.Magic)
				nc.Write(binary.BigEndian.AppendUint64(b, 0x00420281861253))
				nc.Write(make([]byte, 136))
			}},
		{name: "hang up after the greeting", is: ErrClosed, wantMsg: "closed the connection",
			raw: func(nc net.Conn) { nc.Write([]byte("NBDMAGIC")) }},
		{name: "option reply of 4 GiB", is: ErrProtocol, wantMsg: "over the 65536-byte limit",
			answer: func(opt nbd.Option, _ []byte) []byte {
				b, _ := nbd.OptionReplyHeader{Option: opt, Type: nbd.RepAck, Length: 0xffffffff}.AppendBinary(nil)
				return b
			}},
		{name: "reply to another option", is: ErrProtocol, wantMsg: "while NBD_OPT_STRUCTURED_REPLY was pending",
			answer: func(opt nbd.Option, _ []byte) []byte { return ack(nbd.OptList) }},
		{name: "bad reply magic", is: ErrProtocol, wantMsg: "bad magic",
			answer: func(opt nbd.Option, _ []byte) []byte { return make([]byte, 20) }},
		{name: "endless NBD_REP_INFO", is: ErrProtocol, wantMsg: "more than 1024",
			answer: answerGo(func() []byte {
				var b []byte
				for range 1100 {
					b = append(b, infoReply(nbd.OptGo, goodExport)...)
				}
				return b
			})},
		{name: "GO accepted without NBD_INFO_EXPORT", is: ErrProtocol, wantMsg: "without sending NBD_INFO_EXPORT",
			answer: answerGo(func() []byte { return ack(nbd.OptGo) })},
		{name: "export info of the wrong size", is: ErrProtocol, wantMsg: "info reply",
			answer: answerGo(func() []byte { return optReply(nbd.OptGo, nbd.RepInfo, []byte{0, 0, 1, 2}) })},
		{name: "impossible block sizes", is: ErrProtocol, wantMsg: "minimum block size 3",
			answer: answerGo(func() []byte {
				b := infoReply(nbd.OptGo, goodExport)
				b = append(b, infoReply(nbd.OptGo, nbd.Info{Type: nbd.InfoBlockSize, MinBlockSize: 3, PrefBlockSize: 4096, MaxPayloadSize: 1 << 20})...)
				return append(b, ack(nbd.OptGo)...)
			})},
		{name: "unexpected reply type", is: ErrProtocol, wantMsg: "answered NBD_OPT_GO with NBD_REP_SERVER",
			answer: answerGo(func() []byte { return optReply(nbd.OptGo, nbd.RepServer, []byte{0, 0, 0, 0}) })},
		{name: "endless meta contexts", is: ErrProtocol, wantMsg: "more than 1024 metadata contexts",
			answer: func(opt nbd.Option, _ []byte) []byte {
				if opt != nbd.OptSetMetaContext {
					return ack(opt)
				}
				m, _ := nbd.MetaContext{ID: 1, Name: "base:allocation"}.AppendBinary(nil)
				var b []byte
				for range 1100 {
					b = append(b, optReply(opt, nbd.RepMetaContext, m)...)
				}
				return b
			}},
		{name: "TLS required", is: ErrTLSRequired, wantMsg: "requires TLS",
			answer: func(opt nbd.Option, _ []byte) []byte {
				if opt == nbd.OptAbort {
					return ack(opt)
				}
				return optReply(opt, nbd.RepErrTLSReqd, []byte("use TLS"))
			}},
		{name: "endless export list", list: true, is: ErrProtocol, wantMsg: "more than 65536 exports",
			answer: func(opt nbd.Option, _ []byte) []byte {
				e, _ := nbd.ServerEntry{Name: "x"}.AppendBinary(nil)
				one := optReply(opt, nbd.RepServer, e)
				b := make([]byte, 0, len(one)*(maxListEntries+1))
				for range maxListEntries + 1 {
					b = append(b, one...)
				}
				return b
			}},
		{name: "export list of over 16 MiB", list: true, is: ErrProtocol, wantMsg: "more than 16 MiB of export names and descriptions",
			answer: func(opt nbd.Option, _ []byte) []byte {
				if opt != nbd.OptList {
					return ack(opt)
				}
				// Far fewer entries than maxListEntries, each as large as
				// an entry may be, and then a proper end.
				e, _ := nbd.ServerEntry{Name: strings.Repeat("n", nbd.MaxStringLength), Description: strings.Repeat("d", nbd.MaxStringLength)}.AppendBinary(nil)
				one := optReply(opt, nbd.RepServer, e)
				n := maxListBytes/(2*nbd.MaxStringLength) + 1
				b := make([]byte, 0, len(one)*n+nbd.OptionReplyHeaderSize)
				for range n {
					b = append(b, one...)
				}
				return append(b, ack(opt)...)
			}},
		{name: "list entry longer than its reply", list: true, is: ErrProtocol, wantMsg: "server entry",
			answer: func(opt nbd.Option, _ []byte) []byte {
				return optReply(opt, nbd.RepServer, binary.BigEndian.AppendUint32(nil, 1000))
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var uri string
			if tt.raw != nil {
				uri = serveRaw(t, tt.raw)
			} else {
				uri = optionServer(t, tt.answer)
			}
			var err error
			if tt.list {
				_, err = List(testContext(t), uri, nil)
			} else {
				var c *Conn
				c, err = Dial(testContext(t), uri, nil)
				if err == nil {
					c.Close()
				}
			}
			if !errors.Is(err, tt.is) || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("got %v, want %v containing %q", err, tt.is, tt.wantMsg)
			}
		})
	}
}

// A server that stalls in the middle of read data must not hold the caller
// past its context. The reader is copying into the caller's buffer then, so
// the connection is torn down (nothing can resynchronise the stream), and
// the buffer is not written once the call returned.
func TestStalledReadDataEndsWithContext(t *testing.T) {
	const block = 4096
	tests := []struct {
		name string
		opts *Options
		// pool reads two pieces over two connections: the first is never
		// answered, the second stalls, so it is abandoned after the first
		// one's wait ended.
		pool bool
	}{
		{name: "simple reply", opts: &Options{NoStructuredReplies: true}},
		{name: "data chunk"},
		{name: "pool, the other piece stalls", pool: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &fakeServer{blockSizes: &BlockSizes{Minimum: 512, Preferred: block, MaxPayload: block},
				exports: map[string]*fakeExport{"d": newFakeExport(1<<20, "")}}
			copy(s.exports["d"].data, pattern(2*block, 1))
			stallAt := uint64(0)
			if tt.pool {
				stallAt = block
			}
			s.reply = func(fc *fakeConn, req nbd.RequestHeader, _ []byte) bool {
				if req.Command != nbd.CmdRead {
					return false
				}
				if req.Offset == stallAt {
					// The reply's header and 100 bytes of data, then
					// nothing, on an open socket.
					head := nbd.SimpleReplySize
					if fc.structured {
						head = nbd.StructuredHeaderSize + nbd.OffsetDataPrefixSize
					}
					fc.send(fc.answer(req, nil)[:head+100])
				}
				return true
			}
			opts := &Options{DrainTimeout: time.Millisecond} // pending reads never end
			if tt.opts != nil {
				opts.NoStructuredReplies = tt.opts.NoStructuredReplies
			}
			var d Device
			var conns []*Conn
			n := block
			if tt.pool {
				p, err := DialPool(testContext(t), s.start(t, "d"), 2, opts)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { p.Close() })
				d, conns, n = p, p.conns, 2*block
			} else {
				c := dialT(t, s.start(t, "d"), opts)
				d, conns = c, []*Conn{c}
			}

			ctx, cancel := context.WithTimeout(testContext(t), 300*time.Millisecond)
			defer cancel()
			buf := make([]byte, n)
			read := make(chan error, 1)
			go func() { read <- d.ReadAt(ctx, buf, 0) }()
			// A bound on the failure, not a synchronisation: without the
			// fix ReadAt returns only when the server hangs up.
			bound := time.NewTimer(10 * time.Second)
			defer bound.Stop()
			select {
			case err := <-read:
				if !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("ReadAt: %v, want context.DeadlineExceeded", err)
				}
			case <-bound.C:
				t.Fatal("ReadAt still blocked 10s after its 300ms deadline, on a stalled reply")
			}
			returned := bytes.Clone(buf)
			failed := 0
			for _, c := range conns {
				if err := c.Err(); err != nil {
					if !errors.Is(err, ErrClosed) || !strings.Contains(err.Error(), "given up while its data was arriving") {
						t.Errorf("connection error %v, want ErrClosed saying why", err)
					}
					<-c.Done() // its reader has stopped
					failed++
				}
			}
			if failed != 1 {
				t.Errorf("%d connections failed, want the one with the stalled reply", failed)
			}
			mustEqual(t, "buffer after ReadAt returned", returned, buf)
		})
	}
}
