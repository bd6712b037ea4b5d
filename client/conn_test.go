package client

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lvnbd/lvnbd/nbd"
)

func TestReadWriteRoundTrip(t *testing.T) {
	const size = 4 << 20
	tests := []struct {
		name   string
		server *fakeServer
		opts   *Options
	}{
		{name: "simple replies", opts: &Options{NoStructuredReplies: true}},
		{name: "structured replies"},
		{name: "structured with hole chunks in reverse order", server: &fakeServer{holeReads: true}},
		{name: "small max payload",
			server: &fakeServer{holeReads: true, blockSizes: &BlockSizes{Minimum: 512, Preferred: 4096, MaxPayload: 64 << 10}}},
		{name: "EXPORT_NAME fallback with padding", server: &fakeServer{noGo: true, noZeroes: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := tt.server
			if s == nil {
				s = &fakeServer{}
			}
			s.exports = map[string]*fakeExport{"d": newFakeExport(size, "")}
			c := dialT(t, s.start(t, "d"), tt.opts)
			ctx := testContext(t)
			// Offsets chosen so pieces straddle request boundaries.
			writes := []struct {
				off int64
				n   int
			}{{0, 4096}, {65536, 512}, {1 << 20, 256 << 10}, {size - 8192, 8192}, {2 << 20, 1 << 20}}
			for i, w := range writes {
				if err := c.WriteAt(ctx, pattern(w.n, byte(i+1)), w.off, 0); err != nil {
					t.Fatalf("WriteAt(%d, %d): %v", w.off, w.n, err)
				}
			}
			if err := c.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			for i, w := range writes {
				got := make([]byte, w.n)
				if err := c.ReadAt(ctx, got, w.off); err != nil {
					t.Fatalf("ReadAt(%d, %d): %v", w.off, w.n, err)
				}
				mustEqual(t, fmt.Sprintf("write %d", i), pattern(w.n, byte(i+1)), got)
			}
			// Whole-export read: data and holes in the right places.
			all := make([]byte, size)
			for i := range all {
				all[i] = 0xee // holes must overwrite this
			}
			if err := c.ReadAt(ctx, all, 0); err != nil {
				t.Fatal(err)
			}
			mustEqual(t, "whole export", s.exports["d"].data, all)

			if err := c.Trim(ctx, 1<<20, 64<<10, 0); err != nil {
				t.Fatal(err)
			}
			if err := c.WriteZeroes(ctx, 0, 4096, nbd.CmdFlagNoHole|nbd.CmdFlagFUA); err != nil {
				t.Fatal(err)
			}
			if err := c.Cache(ctx, 0, size); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 64<<10)
			if err := c.ReadAt(ctx, got, 1<<20); err != nil {
				t.Fatal(err)
			}
			mustEqual(t, "trimmed", make([]byte, 64<<10), got)
		})
	}
}

func TestRequestsAreSplit(t *testing.T) {
	// Every operation below is three pieces, pipelined, answered newest first.
	s := &fakeServer{reverse: 3, blockSizes: &BlockSizes{Minimum: 512, Preferred: 4096, MaxPayload: 16 << 10},
		exports: map[string]*fakeExport{"d": newFakeExport(1<<20, "")}}
	c := dialT(t, s.start(t, "d"), nil)
	ctx := testContext(t)
	if err := c.WriteAt(ctx, pattern(40<<10, 1), 512, 0); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range s.seenRequests() {
		got = append(got, fmt.Sprintf("%v %d+%d", r.Command, r.Offset, r.Length))
	}
	want := []string{"NBD_CMD_WRITE 512+16384", "NBD_CMD_WRITE 16896+16384", "NBD_CMD_WRITE 33280+8192"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("requests (-want +got):\n%s", diff)
	}
	back := make([]byte, 40<<10)
	if err := c.ReadAt(ctx, back, 512); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "split read", pattern(40<<10, 1), back)
}

func TestConcurrentRequests(t *testing.T) {
	const workers, block = 16, 32 << 10
	s := &fakeServer{holeReads: true, exports: map[string]*fakeExport{"d": newFakeExport(workers*block*4, "")}}
	c := dialT(t, s.start(t, "d"), nil)
	ctx := testContext(t)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for round := range 4 {
				off := int64((w*4 + round) * block)
				data := pattern(block, byte(w*4+round))
				if err := c.WriteAt(ctx, data, off, 0); err != nil {
					errs <- err
					return
				}
				got := make([]byte, block)
				if err := c.ReadAt(ctx, got, off); err != nil {
					errs <- err
					return
				}
				if string(got) != string(data) {
					errs <- fmt.Errorf("worker %d round %d read back other data", w, round)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestOutOfOrderReplies(t *testing.T) {
	// Eight concurrent reads, answered newest first.
	const n = 8
	s := &fakeServer{reverse: n, exports: map[string]*fakeExport{"d": newFakeExport(n*4096, "")}}
	e := s.exports["d"]
	copy(e.data, pattern(len(e.data), 5))
	c := dialT(t, s.start(t, "d"), nil)
	ctx := testContext(t)
	var wg sync.WaitGroup
	bufs := make([][]byte, n)
	errs := make([]error, n)
	for i := range n {
		bufs[i] = make([]byte, 4096)
		wg.Go(func() { errs[i] = c.ReadAt(ctx, bufs[i], int64(i*4096)) })
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		mustEqual(t, fmt.Sprintf("read %d", i), e.data[i*4096:(i+1)*4096], bufs[i])
	}
}

func TestBlockStatus(t *testing.T) {
	s := &fakeServer{exports: map[string]*fakeExport{"d": newFakeExport(64<<10, "")}}
	copy(s.exports["d"].data[16<<10:], pattern(8<<10, 1))
	c := dialT(t, s.start(t, "d"), nil)
	ctx := testContext(t)
	got, err := c.BlockStatus(ctx, 0, 64<<10, 0)
	if err != nil {
		t.Fatal(err)
	}
	hz := nbd.StateHole | nbd.StateZero
	want := []nbd.Extent{{Length: 16 << 10, Flags: hz}, {Length: 8 << 10}, {Length: 40 << 10, Flags: hz}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("BlockStatus (-want +got):\n%s", diff)
	}
	got, err = c.BlockStatus(ctx, 16<<10, 48<<10, nbd.CmdFlagReqOne)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]nbd.Extent{{Length: 8 << 10}}, got); diff != "" {
		t.Errorf("BlockStatus REQ_ONE (-want +got):\n%s", diff)
	}
}

func TestErrorReplies(t *testing.T) {
	tests := []struct {
		name      string
		opts      *Options
		reply     func(req nbd.RequestHeader) []byte
		do        func(ctx context.Context, c *Conn) error
		wantErrno nbd.Errno
		wantMsg   string
	}{
		{
			name: "error chunk with message",
			reply: func(req nbd.RequestHeader) []byte {
				return errorChunk(req.Handle, nbd.ErrorChunk{Errno: nbd.ENOSPC, Message: "volume full"}, nbd.ReplyFlagDone)
			},
			do:        func(ctx context.Context, c *Conn) error { return c.WriteAt(ctx, make([]byte, 512), 0, 0) },
			wantErrno: nbd.ENOSPC,
			wantMsg:   "NBD_CMD_WRITE of 512 bytes at offset 0: ENOSPC: volume full",
		},
		{
			name: "error offset chunk after data, then NONE",
			reply: func(req nbd.RequestHeader) []byte {
				b := dataChunk(req.Handle, req.Offset, make([]byte, 512), 0)
				b = append(b, errorChunk(req.Handle, nbd.ErrorChunk{Errno: nbd.EIO, Message: "bad sector", HasOffset: true, Offset: req.Offset + 512}, 0)...)
				return append(b, noneChunk(req.Handle)...)
			},
			do:        func(ctx context.Context, c *Conn) error { return c.ReadAt(ctx, make([]byte, 1024), 1024) },
			wantErrno: nbd.EIO,
			wantMsg:   "NBD_CMD_READ of 1024 bytes at offset 1024: EIO at offset 1536: bad sector",
		},
		{
			name: "unknown error type is an error, not a disconnect",
			reply: func(req nbd.RequestHeader) []byte {
				p, _ := nbd.ErrorChunk{Errno: nbd.EPERM, Message: "future"}.AppendBinary(nil)
				p = append(p, "extra fields"...)
				h, _ := nbd.StructuredReplyHeader{Flags: nbd.ReplyFlagDone, Type: 0x8000 + 77, Handle: req.Handle, Length: uint32(len(p))}.AppendBinary(nil)
				return append(h, p...)
			},
			do:        func(ctx context.Context, c *Conn) error { return c.Flush(ctx) },
			wantErrno: nbd.EPERM,
			wantMsg:   "NBD_CMD_FLUSH: EPERM: future",
		},
		{
			name:      "simple error reply",
			opts:      &Options{NoStructuredReplies: true},
			reply:     func(req nbd.RequestHeader) []byte { return simpleReply(req.Handle, nbd.EIO) },
			do:        func(ctx context.Context, c *Conn) error { return c.ReadAt(ctx, make([]byte, 4096), 0) },
			wantErrno: nbd.EIO,
			wantMsg:   "NBD_CMD_READ of 4096 bytes at offset 0: EIO",
		},
		{
			name:      "unknown error value becomes EINVAL",
			reply:     func(req nbd.RequestHeader) []byte { return simpleReply(req.Handle, 4242) },
			do:        func(ctx context.Context, c *Conn) error { return c.Trim(ctx, 0, 4096, 0) },
			wantErrno: nbd.EINVAL,
			wantMsg:   "NBD_CMD_TRIM of 4096 bytes at offset 0: EINVAL: server error value 4242",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &fakeServer{exports: map[string]*fakeExport{"d": newFakeExport(1<<20, "")}}
			failNext := true
			s.reply = func(fc *fakeConn, req nbd.RequestHeader, _ []byte) bool {
				if !failNext {
					return false
				}
				failNext = false
				fc.send(tt.reply(req))
				return true
			}
			c := dialT(t, s.start(t, "d"), tt.opts)
			ctx := testContext(t)
			err := tt.do(ctx, c)
			var re *RequestError
			if !errors.As(err, &re) {
				t.Fatalf("got %v (%T), want a *RequestError", err, err)
			}
			var errno nbd.Errno
			if !errors.As(err, &errno) || errno != tt.wantErrno || !errors.Is(err, tt.wantErrno) {
				t.Errorf("errno %v, want %v", errno, tt.wantErrno)
			}
			if err.Error() != tt.wantMsg {
				t.Errorf("message %q, want %q", err, tt.wantMsg)
			}
			// One failed request does not end the connection.
			if err := c.ReadAt(ctx, make([]byte, 512), 0); err != nil {
				t.Errorf("request after an error reply: %v", err)
			}
		})
	}
}

func TestLocalRefusals(t *testing.T) {
	ro := newFakeExport(1<<20, "")
	ro.flags = nbd.FlagHasFlags | nbd.FlagReadOnly
	s := &fakeServer{blockSizes: &BlockSizes{Minimum: 512, Preferred: 4096, MaxPayload: 1 << 20},
		exports: map[string]*fakeExport{"ro": ro}}
	c := dialT(t, s.start(t, "ro"), &Options{NoMetaContext: true})
	// A writable export advertising every command, so that past-the-end
	// requests reach the size check rather than stop at an earlier one.
	const size = 1 << 20
	rws := &fakeServer{exports: map[string]*fakeExport{"rw": newFakeExport(size, "")}}
	rwURI := rws.start(t, "rw")
	w := dialT(t, rwURI, nil)
	p, err := DialPool(testContext(t), rwURI, 2, nil)
	if err != nil {
		t.Fatalf("DialPool: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	ctx := testContext(t)
	// pastEnd is what every refusal of a request past the end says: the
	// export's size (RequestError.Error adds the offset and length).
	pastEnd := fmt.Sprintf("beyond the export's %d bytes", size)
	tests := []struct {
		name  string
		do    func() error
		errno nbd.Errno
		is    error
		text  string // the error names this, when set
	}{
		{"write to read-only", func() error { return c.WriteAt(ctx, make([]byte, 512), 0, 0) }, nbd.EPERM, nil, ""},
		{"unaligned read", func() error { return c.ReadAt(ctx, make([]byte, 100), 0) }, nbd.EINVAL, nil, ""},
		{"negative offset", func() error { return c.ReadAt(ctx, make([]byte, 512), -512) }, nbd.EINVAL, nil, ""},
		{"bad flag", func() error { return c.Cache(ctx, 0, 512) }, 0, ErrUnsupported, ""},
		{"trim unadvertised", func() error { return c.Trim(ctx, 0, 512, 0) }, 0, ErrUnsupported, ""},
		{"zeroes unadvertised", func() error { return c.WriteZeroes(ctx, 0, 512, 0) }, 0, ErrUnsupported, ""},
		{"fua unadvertised", func() error { return c.WriteAt(ctx, make([]byte, 512), 0, nbd.CmdFlagFUA) }, 0, ErrUnsupported, ""},
		{"status without context", func() error { _, err := c.BlockStatus(ctx, 0, 512, 0); return err }, 0, ErrUnsupported, ""},
		{"flag not valid for the command", func() error { return c.WriteAt(ctx, make([]byte, 512), 0, nbd.CmdFlagNoHole) }, nbd.EINVAL, nil, ""},
		{"read wholly past the end", func() error { return c.ReadAt(ctx, make([]byte, 4096), size) }, nbd.EINVAL, nil,
			"NBD_CMD_READ of 4096 bytes at offset 1048576: EINVAL: " + pastEnd},
		{"read across the end", func() error { return c.ReadAt(ctx, make([]byte, 1024), size-512) }, nbd.EINVAL, nil,
			"NBD_CMD_READ of 1024 bytes at offset 1048064: EINVAL: " + pastEnd},
		{"read longer than the export", func() error { return c.ReadAt(ctx, make([]byte, 2*size), 0) }, nbd.EINVAL, nil, pastEnd},
		{"offset far past the end", func() error { return c.ReadAt(ctx, make([]byte, 512), 1<<62) }, nbd.EINVAL, nil, pastEnd},
		{"empty read past the end", func() error { return c.ReadAt(ctx, nil, size+512) }, nbd.EINVAL, nil, pastEnd},
		{"write across the end", func() error { return w.WriteAt(ctx, make([]byte, 8192), size-4096, 0) }, nbd.ENOSPC, nil, pastEnd},
		{"zeroes across the end", func() error { return w.WriteZeroes(ctx, size-4096, 8192, 0) }, nbd.ENOSPC, nil, pastEnd},
		{"trim across the end", func() error { return w.Trim(ctx, size-4096, 8192, 0) }, nbd.EINVAL, nil, pastEnd},
		{"cache across the end", func() error { return w.Cache(ctx, size-4096, 8192) }, nbd.EINVAL, nil, pastEnd},
		{"status across the end", func() error { _, err := w.BlockStatus(ctx, size-4096, 8192, 0); return err }, nbd.EINVAL, nil, pastEnd},
		{"pool read across the end", func() error { return p.ReadAt(ctx, make([]byte, 8192), size-4096) }, nbd.EINVAL, nil, pastEnd},
		{"pool write across the end", func() error { return p.WriteAt(ctx, make([]byte, 8192), size-4096, 0) }, nbd.ENOSPC, nil, pastEnd},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.do()
			if tt.is != nil {
				if !errors.Is(err, tt.is) {
					t.Fatalf("got %v, want %v", err, tt.is)
				}
				return
			}
			if !errors.Is(err, tt.errno) {
				t.Fatalf("got %v, want %v", err, tt.errno)
			}
			if !strings.Contains(fmt.Sprint(err), tt.text) {
				t.Errorf("error %q does not say %q", err, tt.text)
			}
		})
	}
	// Flush on an export without a cache to flush sends nothing.
	if err := c.Flush(ctx); err != nil {
		t.Errorf("Flush: %v", err)
	}
	if got := append(s.seenRequests(), rws.seenRequests()...); len(got) != 0 {
		t.Errorf("requests reached the server: %v", got)
	}
}

// TestRequestsEndingAtExportEnd checks the size check is not off by one:
// requests that end exactly at the end of the export are sent and succeed.
func TestRequestsEndingAtExportEnd(t *testing.T) {
	const size = 1 << 20
	s := &fakeServer{exports: map[string]*fakeExport{"d": newFakeExport(size, "")}}
	copy(s.exports["d"].data[size-4096:], pattern(4096, 3))
	c := dialT(t, s.start(t, "d"), nil)
	ctx := testContext(t)
	tail := make([]byte, 4096)
	tests := []struct {
		name string
		do   func() error
		sent int // requests that reach the server
	}{
		{"read the last block", func() error { return c.ReadAt(ctx, tail, size-4096) }, 1},
		{"read the whole export", func() error { return c.ReadAt(ctx, make([]byte, size), 0) }, 1},
		{"empty read at the end", func() error { return c.ReadAt(ctx, nil, size) }, 0},
		{"write the last block", func() error { return c.WriteAt(ctx, make([]byte, 4096), size-4096, 0) }, 1},
		{"zero the last block", func() error { return c.WriteZeroes(ctx, size-4096, 4096, 0) }, 1},
		{"trim the last block", func() error { return c.Trim(ctx, size-4096, 4096, 0) }, 1},
		{"cache the last block", func() error { return c.Cache(ctx, size-4096, 4096) }, 1},
		{"status of the last block", func() error { _, err := c.BlockStatus(ctx, size-4096, 4096, 0); return err }, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(s.seenRequests())
			if err := tt.do(); err != nil {
				t.Fatalf("got %v, want success", err)
			}
			if got := len(s.seenRequests()) - before; got != tt.sent {
				t.Errorf("%d requests reached the server, want %d", got, tt.sent)
			}
		})
	}
	mustEqual(t, "last block", pattern(4096, 3), tail)
}

// TestLateReplyAfterAbandonIsNotSuccess holds wait (through waitHook) just
// after it abandoned a read, and lets the reader complete the call then: the
// reader threw the data away, or left a hole uncleared, so the read must fail
// with ctx's error instead of reporting a buffer it never filled.
func TestLateReplyAfterAbandonIsNotSuccess(t *testing.T) {
	tests := []struct {
		name      string
		opts      *Options
		holeReads bool
		data      []byte // the first 4 KiB of the export, which the read asks for
	}{
		{name: "simple reply", opts: &Options{NoStructuredReplies: true}, data: pattern(4096, 1)},
		{name: "data chunk", data: pattern(4096, 1)},
		{name: "hole chunk", holeReads: true, data: make([]byte, 4096)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &fakeServer{holeReads: tt.holeReads, exports: map[string]*fakeExport{"d": newFakeExport(1<<20, "")}}
			copy(s.exports["d"].data, tt.data)
			held := make(chan struct{})
			release := make(chan struct{})
			var releaseOnce sync.Once
			releaseReply := func() { releaseOnce.Do(func() { close(release) }) }
			t.Cleanup(releaseReply)
			s.reply = func(fc *fakeConn, req nbd.RequestHeader, _ []byte) bool {
				if req.Command != nbd.CmdRead {
					return false
				}
				b := fc.answer(req, nil)
				go func() { <-release; fc.send(b) }()
				close(held)
				return true
			}
			c := dialT(t, s.start(t, "d"), tt.opts)
			waitHook = func(cl *call) {
				releaseReply() // the reply arrives only after the abandon
				<-cl.done      // and the reader completes the call before wait looks
			}
			t.Cleanup(func() { waitHook = nil })

			ctx, cancel := context.WithCancel(testContext(t))
			buf := make([]byte, 4096)
			for i := range buf {
				buf[i] = 0xee // not what the export holds, so an unfilled buffer shows
			}
			done := make(chan error)
			go func() { done <- c.ReadAt(ctx, buf, 0) }()
			<-held // the server has the request and sits on the reply
			cancel()
			if err := <-done; !errors.Is(err, context.Canceled) {
				t.Fatalf("ReadAt cancelled before its reply was read: %v, want context.Canceled (buffer holds the data: %v)",
					err, string(buf) == string(tt.data))
			}
		})
	}
}

func TestContextCancelDiscardsLateReply(t *testing.T) {
	s := &fakeServer{exports: map[string]*fakeExport{"d": newFakeExport(1<<20, "")}}
	copy(s.exports["d"].data, pattern(8192, 1))
	held := make(chan []byte, 1)
	release := make(chan struct{})
	s.reply = func(fc *fakeConn, req nbd.RequestHeader, _ []byte) bool {
		if req.Command != nbd.CmdRead || req.Offset != 0 {
			return false
		}
		b := fc.answer(req, nil)
		go func() { <-release; fc.send(b) }()
		held <- b
		return true
	}
	c := dialT(t, s.start(t, "d"), nil)

	ctx, cancel := context.WithCancel(testContext(t))
	buf := make([]byte, 4096)
	done := make(chan error)
	go func() { done <- c.ReadAt(ctx, buf, 0) }()
	<-held // the server has the request and sits on the reply
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled ReadAt: %v, want context.Canceled", err)
	}
	close(release)
	// Replies are handled in order, so once this read is answered the late
	// one has been read and thrown away.
	other := make([]byte, 4096)
	if err := c.ReadAt(testContext(t), other, 4096); err != nil {
		t.Fatalf("ReadAt after a cancelled one: %v", err)
	}
	mustEqual(t, "later read", pattern(8192, 1)[4096:], other)
	mustEqual(t, "abandoned buffer", make([]byte, 4096), buf)
}

func TestCloseDrainsThenDisconnects(t *testing.T) {
	s := &fakeServer{exports: map[string]*fakeExport{"d": newFakeExport(1<<20, "")}}
	release := make(chan struct{})
	received := make(chan struct{})
	s.reply = func(fc *fakeConn, req nbd.RequestHeader, p []byte) bool {
		if req.Command != nbd.CmdWrite {
			return false
		}
		b := fc.answer(req, p)
		close(received)
		go func() { <-release; fc.send(b) }()
		return true
	}
	c, err := Dial(testContext(t), s.start(t, "d"), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := testContext(t)
	wrote := make(chan error)
	go func() { wrote <- c.WriteAt(ctx, make([]byte, 512), 0, 0) }()
	<-received
	closed := make(chan error)
	go func() { closed <- c.Close() }()
	// Once Close has begun, new requests are refused; it must not return
	// while the write is in flight.
	for {
		err := c.ReadAt(ctx, make([]byte, 512), 4096)
		if errors.Is(err, ErrClosed) {
			break
		}
		if err != nil {
			t.Fatalf("ReadAt while closing: %v", err)
		}
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned %v with a request in flight", err)
	default:
	}
	close(release)
	if err := <-wrote; err != nil {
		t.Fatalf("in-flight write: %v", err)
	}
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := c.ReadAt(ctx, make([]byte, 512), 0); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadAt after Close: %v, want ErrClosed", err)
	}
	s.ln.Close()
	s.wg.Wait() // the server loop ends on NBD_CMD_DISC
	reqs := s.seenRequests()
	if last := reqs[len(reqs)-1]; last.Command != nbd.CmdDisc {
		t.Errorf("last request %v, want NBD_CMD_DISC", last.Command)
	}
}

func TestShutdownTimeoutFailsPending(t *testing.T) {
	s := &fakeServer{exports: map[string]*fakeExport{"d": newFakeExport(1<<20, "")}}
	got := make(chan struct{})
	s.reply = func(fc *fakeConn, req nbd.RequestHeader, p []byte) bool {
		if req.Command != nbd.CmdRead {
			return false
		}
		close(got) // and never answer
		return true
	}
	c, err := Dial(testContext(t), s.start(t, "d"), nil)
	if err != nil {
		t.Fatal(err)
	}
	read := make(chan error)
	go func() { read <- c.ReadAt(context.Background(), make([]byte, 512), 0) }()
	<-got
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.Shutdown(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Shutdown: %v, want context.Canceled", err)
	}
	if err := <-read; !errors.Is(err, ErrClosed) {
		t.Errorf("pending read: %v, want ErrClosed", err)
	}
}

func TestServerShutdownErrnoDisconnects(t *testing.T) {
	s := &fakeServer{exports: map[string]*fakeExport{"d": newFakeExport(1<<20, "")}}
	s.reply = func(fc *fakeConn, req nbd.RequestHeader, p []byte) bool {
		fc.send(errorChunk(req.Handle, nbd.ErrorChunk{Errno: nbd.ESHUTDOWN, Message: "going down"}, nbd.ReplyFlagDone))
		return true
	}
	c := dialT(t, s.start(t, "d"), nil)
	err := c.Flush(testContext(t))
	if !errors.Is(err, nbd.ESHUTDOWN) || !strings.Contains(err.Error(), "going down") {
		t.Fatalf("Flush: %v, want ESHUTDOWN", err)
	}
	<-c.Done() // the client disconnects by itself
	if err := c.Flush(testContext(t)); !errors.Is(err, ErrClosed) {
		t.Errorf("Flush after ESHUTDOWN: %v, want ErrClosed", err)
	}
	s.ln.Close()
	s.wg.Wait()
	reqs := s.seenRequests()
	if last := reqs[len(reqs)-1]; last.Command != nbd.CmdDisc {
		t.Errorf("last request %v, want NBD_CMD_DISC", last.Command)
	}
}

// A request whose caller gave up (its ctx ended) holds up Close no longer:
// nobody reads its reply, and a stalled server would make every interrupted
// caller wait the whole drain timeout. With it unanswered, the socket is
// closed without NBD_CMD_DISC, which the spec wants only with nothing in
// flight. Requests given up one at a time and with a split request
// (abandonAll) are both covered.
func TestCloseDoesNotWaitForGivenUpRequests(t *testing.T) {
	tests := []struct {
		name string
		reqs int // the read is split into this many 4 KiB requests
	}{
		{name: "one request", reqs: 1},
		{name: "split request", reqs: 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &fakeServer{exports: map[string]*fakeExport{"d": newFakeExport(1<<20, "")},
				blockSizes: &BlockSizes{Minimum: 1, Preferred: 4096, MaxPayload: 4096}}
			got := make(chan struct{}, tt.reqs)
			s.reply = func(fc *fakeConn, req nbd.RequestHeader, p []byte) bool {
				if req.Command != nbd.CmdRead {
					return false
				}
				got <- struct{}{} // and never answer
				return true
			}
			// Without the exemption, Close would give up after this
			// and return context.DeadlineExceeded.
			c, err := Dial(testContext(t), s.start(t, "d"), &Options{DrainTimeout: 50 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(testContext(t))
			read := make(chan error)
			go func() { read <- c.ReadAt(ctx, make([]byte, tt.reqs*4096), 0) }()
			for range tt.reqs {
				<-got // every part is in flight
			}
			cancel()
			if err := <-read; !errors.Is(err, context.Canceled) {
				t.Fatalf("cancelled ReadAt: %v, want context.Canceled", err)
			}
			if err := c.Close(); err != nil {
				t.Errorf("Close with only given-up requests in flight: %v, want nil at once", err)
			}
			s.ln.Close()
			s.wg.Wait()
			for _, r := range s.seenRequests() {
				if r.Command == nbd.CmdDisc {
					t.Errorf("NBD_CMD_DISC sent with a request unanswered")
				}
			}
		})
	}
}
