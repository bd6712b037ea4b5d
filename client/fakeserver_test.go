package client

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"testing"

	"github.com/lvnbd/lvnbd/nbd"
)

// fakeExport is an in-memory export of the fake server.
type fakeExport struct {
	mu    sync.Mutex
	data  []byte
	desc  string
	flags nbd.TransmissionFlags
}

func newFakeExport(size int, desc string) *fakeExport {
	return &fakeExport{data: make([]byte, size), desc: desc,
		flags: nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagSendFUA | nbd.FlagSendTrim |
			nbd.FlagSendWriteZeroes | nbd.FlagSendFastZero | nbd.FlagSendCache | nbd.FlagCanMultiConn}
}

const fakeMetaID = 7 // deliberately not 0 or 1: context ids are opaque

// fakeServer is a small NBD server for tests, built on the nbd codec, with
// knobs for the handshake variants and misbehaviour the client must survive.
type fakeServer struct {
	t       testing.TB
	exports map[string]*fakeExport

	// Handshake knobs.
	noFixed      bool        // plain newstyle: only NBD_OPT_EXPORT_NAME
	noZeroes     bool        // do not offer NBD_FLAG_NO_ZEROES
	noGo         bool        // NBD_OPT_INFO and NBD_OPT_GO are NBD_REP_ERR_UNSUP
	noStructured bool        // NBD_OPT_STRUCTURED_REPLY is NBD_REP_ERR_UNSUP
	noMeta       bool        // meta-context options are NBD_REP_ERR_UNSUP
	blockSizes   *BlockSizes // advertised with NBD_INFO_BLOCK_SIZE

	// Transmission knobs.
	holeReads bool // structured reads: zero 4 KiB blocks as holes, chunks in reverse order
	reverse   int  // hold replies until this many are queued, then send them newest first
	// reply, when set, answers a request itself; returning false falls
	// back to the normal answer.
	reply func(fc *fakeConn, req nbd.RequestHeader, payload []byte) bool
	// transmission, when set, replaces the whole transmission phase.
	transmission func(fc *fakeConn)

	mu       sync.Mutex
	options  []nbd.Option // every option received, in order
	requests []nbd.RequestHeader
	byConn   map[*fakeConn]int // requests per connection
	wg       sync.WaitGroup
	ln       net.Listener
}

// fakeConn is one connection of the fake server.
type fakeConn struct {
	s          *fakeServer
	nc         net.Conn
	export     *fakeExport
	structured bool
	metaOK     bool
	wmu        sync.Mutex
	held       [][]byte
}

// start serves on a loopback port until the test ends and returns the URI of
// export (nbd://127.0.0.1:PORT/export).
func (s *fakeServer) start(t testing.TB, export string) string {
	t.Helper()
	s.t = t
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.ln = ln
	var mu sync.Mutex
	var open []net.Conn
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			open = append(open, nc)
			mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer nc.Close()
				s.serve(nc)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, nc := range open {
			nc.Close()
		}
		mu.Unlock()
		s.wg.Wait()
	})
	return "nbd://" + ln.Addr().String() + "/" + export
}

func (s *fakeServer) logOption(o nbd.Option) {
	s.mu.Lock()
	s.options = append(s.options, o)
	s.mu.Unlock()
}

func (s *fakeServer) seenOptions() []nbd.Option {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.options)
}

func (s *fakeServer) seenRequests() []nbd.RequestHeader {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.requests)
}

func (s *fakeServer) serve(nc net.Conn) {
	fc := &fakeConn{s: s, nc: nc}
	if !fc.handshake() {
		return
	}
	if s.transmission != nil {
		s.transmission(fc)
		return
	}
	fc.transmit()
}

func (fc *fakeConn) handshake() bool {
	s := fc.s
	flags := nbd.FlagFixedNewstyle | nbd.FlagNoZeroes
	if s.noFixed {
		flags &^= nbd.FlagFixedNewstyle
	}
	if s.noZeroes {
		flags &^= nbd.FlagNoZeroes
	}
	hello, _ := nbd.ServerHello{Flags: flags}.AppendBinary(nil)
	if _, err := fc.nc.Write(hello); err != nil {
		return false
	}
	var cf [4]byte
	if _, err := io.ReadFull(fc.nc, cf[:]); err != nil {
		return false
	}
	clientNoZeroes := binary.BigEndian.Uint32(cf[:])&uint32(nbd.ClientFlagNoZeroes) != 0
	metaExport := ""
	for {
		var hb [nbd.OptionHeaderSize]byte
		if _, err := io.ReadFull(fc.nc, hb[:]); err != nil {
			return false
		}
		var h nbd.OptionHeader
		if err := h.UnmarshalBinary(hb[:]); err != nil || h.Length > nbd.MaxOptionLength {
			return false
		}
		data := make([]byte, h.Length)
		if _, err := io.ReadFull(fc.nc, data); err != nil {
			return false
		}
		s.logOption(h.Option)
		switch h.Option {
		case nbd.OptExportName:
			e := s.exports[string(data)]
			if e == nil {
				return false
			}
			fc.export = e
			fc.metaOK = fc.metaOK && metaExport == string(data)
			b, _ := nbd.ExportNameReply{Size: uint64(len(e.data)), Flags: fc.flags()}.AppendBinary(nil)
			if !clientNoZeroes {
				b = append(b, make([]byte, nbd.ExportNameZeroPadding)...)
			}
			_, err := fc.nc.Write(b)
			return err == nil
		case nbd.OptAbort:
			fc.optReply(h.Option, nbd.RepAck, nil)
			return false
		case nbd.OptList:
			for _, name := range slices.Sorted(mapKeys(s.exports)) {
				b, _ := nbd.ServerEntry{Name: name, Description: s.exports[name].desc}.AppendBinary(nil)
				fc.optReply(h.Option, nbd.RepServer, b)
			}
			fc.optReply(h.Option, nbd.RepAck, nil)
		case nbd.OptStructuredReply:
			if s.noStructured {
				fc.optReply(h.Option, nbd.RepErrUnsup, nil)
				continue
			}
			fc.structured = true
			fc.optReply(h.Option, nbd.RepAck, nil)
		case nbd.OptSetMetaContext, nbd.OptListMetaContext:
			if s.noMeta || !fc.structured {
				fc.optReply(h.Option, nbd.RepErrUnsup, nil)
				continue
			}
			var req nbd.MetaContextRequest
			if err := req.UnmarshalBinary(data); err != nil {
				fc.optReply(h.Option, nbd.RepErrInvalid, []byte(err.Error()))
				continue
			}
			match := h.Option == nbd.OptListMetaContext && len(req.Queries) == 0
			for _, q := range req.Queries {
				match = match || q == nbd.MetaContextBaseAllocation
			}
			if match {
				b, _ := nbd.MetaContext{ID: fakeMetaID, Name: nbd.MetaContextBaseAllocation}.AppendBinary(nil)
				fc.optReply(h.Option, nbd.RepMetaContext, b)
				if h.Option == nbd.OptSetMetaContext {
					fc.metaOK, metaExport = true, req.Export
				}
			}
			fc.optReply(h.Option, nbd.RepAck, nil)
		case nbd.OptInfo, nbd.OptGo:
			if s.noGo {
				fc.optReply(h.Option, nbd.RepErrUnsup, []byte("old server"))
				continue
			}
			var req nbd.InfoRequest
			if err := req.UnmarshalBinary(data); err != nil {
				fc.optReply(h.Option, nbd.RepErrInvalid, []byte(err.Error()))
				continue
			}
			e := s.exports[req.Name]
			if e == nil {
				fc.optReply(h.Option, nbd.RepErrUnknown, []byte(fmt.Sprintf("no export called %q here", req.Name)))
				continue
			}
			fc.export = e
			infos := []nbd.Info{{Type: nbd.InfoExport, Size: uint64(len(e.data)), Flags: fc.flags()}}
			if s.blockSizes != nil {
				infos = append(infos, nbd.Info{Type: nbd.InfoBlockSize, MinBlockSize: s.blockSizes.Minimum,
					PrefBlockSize: s.blockSizes.Preferred, MaxPayloadSize: s.blockSizes.MaxPayload})
			}
			if req.Has(nbd.InfoDescription) {
				infos = append(infos, nbd.Info{Type: nbd.InfoDescription, Text: e.desc})
			}
			// An unknown info type the client must ignore.
			infos = append(infos, nbd.Info{Type: 99, Raw: []byte("future")})
			for _, in := range infos {
				b, _ := in.AppendBinary(nil)
				fc.optReply(h.Option, nbd.RepInfo, b)
			}
			fc.optReply(h.Option, nbd.RepAck, nil)
			if h.Option == nbd.OptGo {
				fc.metaOK = fc.metaOK && metaExport == req.Name
				return true
			}
		default:
			fc.optReply(h.Option, nbd.RepErrUnsup, nil)
		}
	}
}

func mapKeys[K comparable, V any](m map[K]V) func(func(K) bool) {
	return func(yield func(K) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func (fc *fakeConn) flags() nbd.TransmissionFlags {
	f := fc.export.flags
	if fc.structured {
		f |= nbd.FlagSendDF
	}
	return f
}

func (fc *fakeConn) optReply(opt nbd.Option, t nbd.OptionReplyType, data []byte) {
	b, _ := nbd.OptionReplyHeader{Option: opt, Type: t, Length: uint32(len(data))}.AppendBinary(nil)
	fc.nc.Write(append(b, data...))
}

// readRequest reads one request and its payload; ok is false at the end.
func (fc *fakeConn) readRequest() (nbd.RequestHeader, []byte, bool) {
	var hb [nbd.RequestHeaderSize]byte
	if _, err := io.ReadFull(fc.nc, hb[:]); err != nil {
		return nbd.RequestHeader{}, nil, false
	}
	var req nbd.RequestHeader
	if err := req.UnmarshalBinary(hb[:]); err != nil {
		fc.s.t.Errorf("fake server: %v", err)
		return req, nil, false
	}
	var payload []byte
	if req.Command == nbd.CmdWrite {
		payload = make([]byte, req.Length)
		if _, err := io.ReadFull(fc.nc, payload); err != nil {
			return req, nil, false
		}
	}
	fc.s.mu.Lock()
	fc.s.requests = append(fc.s.requests, req)
	if fc.s.byConn == nil {
		fc.s.byConn = map[*fakeConn]int{}
	}
	fc.s.byConn[fc]++
	fc.s.mu.Unlock()
	return req, payload, true
}

// transmit serves requests until NBD_CMD_DISC or the client goes away.
func (fc *fakeConn) transmit() {
	for {
		req, payload, ok := fc.readRequest()
		if !ok || req.Command == nbd.CmdDisc {
			return
		}
		if fc.s.reply != nil && fc.s.reply(fc, req, payload) {
			continue
		}
		fc.queue(fc.answer(req, payload))
	}
}

// queue sends a reply now, or holds it for out-of-order delivery.
func (fc *fakeConn) queue(b []byte) {
	if fc.s.reverse == 0 {
		fc.send(b)
		return
	}
	fc.held = append(fc.held, b)
	if len(fc.held) == fc.s.reverse {
		for i := len(fc.held) - 1; i >= 0; i-- {
			fc.send(fc.held[i])
		}
		fc.held = nil
	}
}

func (fc *fakeConn) send(b []byte) {
	fc.wmu.Lock()
	defer fc.wmu.Unlock()
	fc.nc.Write(b)
}

// answer performs req on the export and encodes the reply.
func (fc *fakeConn) answer(req nbd.RequestHeader, payload []byte) []byte {
	e := fc.export
	e.mu.Lock()
	defer e.mu.Unlock()
	size := uint64(len(e.data))
	if req.Command != nbd.CmdFlush && (req.Offset > size || uint64(req.Length) > size-req.Offset) {
		return fc.errorReply(req, nbd.EINVAL, "beyond the end of the export")
	}
	span := e.data[req.Offset : req.Offset+uint64(req.Length)]
	switch req.Command {
	case nbd.CmdRead:
		if !fc.structured {
			b, _ := nbd.SimpleReply{Handle: req.Handle}.AppendBinary(nil)
			return append(b, span...)
		}
		if !fc.s.holeReads {
			return dataChunk(req.Handle, req.Offset, span, nbd.ReplyFlagDone)
		}
		var chunks [][]byte
		for off := uint64(0); off < uint64(len(span)); off += 4096 {
			end := min(off+4096, uint64(len(span)))
			if allZero(span[off:end]) {
				chunks = append(chunks, holeChunk(req.Handle, req.Offset+off, uint32(end-off), 0))
			} else {
				chunks = append(chunks, dataChunk(req.Handle, req.Offset+off, span[off:end], 0))
			}
		}
		var out []byte
		for i := len(chunks) - 1; i >= 0; i-- {
			out = append(out, chunks[i]...)
		}
		b, _ := nbd.StructuredReplyHeader{Flags: nbd.ReplyFlagDone, Type: nbd.ReplyNone, Handle: req.Handle}.AppendBinary(out)
		return b
	case nbd.CmdWrite:
		copy(span, payload)
	case nbd.CmdTrim, nbd.CmdWriteZeroes:
		clear(span)
	case nbd.CmdFlush, nbd.CmdCache:
	case nbd.CmdBlockStatus:
		if !fc.metaOK {
			return fc.errorReply(req, nbd.EINVAL, "no metadata context")
		}
		var ext []nbd.Extent
		for off := uint64(0); off < uint64(len(span)); off += 4096 {
			end := min(off+4096, uint64(len(span)))
			var f uint32
			if allZero(span[off:end]) {
				f = nbd.StateHole | nbd.StateZero
			}
			if n := len(ext); n > 0 && ext[n-1].Flags == f {
				ext[n-1].Length += uint32(end - off)
			} else {
				ext = append(ext, nbd.Extent{Length: uint32(end - off), Flags: f})
			}
		}
		if req.Flags&nbd.CmdFlagReqOne != 0 {
			ext = ext[:1]
		}
		return statusChunk(req.Handle, fakeMetaID, ext, nbd.ReplyFlagDone)
	default:
		return fc.errorReply(req, nbd.EINVAL, "unknown command")
	}
	b, _ := nbd.SimpleReply{Handle: req.Handle}.AppendBinary(nil)
	return b
}

func (fc *fakeConn) errorReply(req nbd.RequestHeader, errno nbd.Errno, msg string) []byte {
	if !fc.structured {
		b, _ := nbd.SimpleReply{Errno: errno, Handle: req.Handle}.AppendBinary(nil)
		return b
	}
	return errorChunk(req.Handle, nbd.ErrorChunk{Errno: errno, Message: msg}, nbd.ReplyFlagDone)
}

func allZero(b []byte) bool { return !slices.ContainsFunc(b, func(x byte) bool { return x != 0 }) }

// Chunk encoders for scripted replies.

func dataChunk(handle, off uint64, data []byte, flags nbd.ReplyFlags) []byte {
	b, _ := nbd.StructuredReplyHeader{Flags: flags, Type: nbd.ReplyOffsetData, Handle: handle,
		Length: uint32(nbd.OffsetDataPrefixSize + len(data))}.AppendBinary(nil)
	b = binary.BigEndian.AppendUint64(b, off) // the codec has no type for this prefix
	return append(b, data...)
}

func holeChunk(handle, off uint64, n uint32, flags nbd.ReplyFlags) []byte {
	b, _ := nbd.StructuredReplyHeader{Flags: flags, Type: nbd.ReplyOffsetHole, Handle: handle, Length: nbd.OffsetHoleSize}.AppendBinary(nil)
	b, _ = nbd.OffsetHole{Offset: off, Length: n}.AppendBinary(b)
	return b
}

func errorChunk(handle uint64, ec nbd.ErrorChunk, flags nbd.ReplyFlags) []byte {
	p, _ := ec.AppendBinary(nil)
	b, _ := nbd.StructuredReplyHeader{Flags: flags, Type: ec.Type(), Handle: handle, Length: uint32(len(p))}.AppendBinary(nil)
	return append(b, p...)
}

func statusChunk(handle uint64, id uint32, ext []nbd.Extent, flags nbd.ReplyFlags) []byte {
	p, _ := nbd.BlockStatus{ContextID: id, Extents: ext}.AppendBinary(nil)
	b, _ := nbd.StructuredReplyHeader{Flags: flags, Type: nbd.ReplyBlockStatus, Handle: handle, Length: uint32(len(p))}.AppendBinary(nil)
	return append(b, p...)
}

func noneChunk(handle uint64) []byte {
	b, _ := nbd.StructuredReplyHeader{Flags: nbd.ReplyFlagDone, Type: nbd.ReplyNone, Handle: handle}.AppendBinary(nil)
	return b
}

func simpleReply(handle uint64, errno nbd.Errno) []byte {
	b, _ := nbd.SimpleReply{Errno: errno, Handle: handle}.AppendBinary(nil)
	return b
}

// serveRaw runs handler on every connection to a loopback listener, for
// servers that misbehave from the first byte.
func serveRaw(t testing.TB, handler func(nc net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var open []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			open = append(open, nc)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer nc.Close()
				handler(nc)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, nc := range open {
			nc.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return "nbd://" + ln.Addr().String() + "/x"
}

// pattern returns n bytes that differ at every offset, so misplaced data shows.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) + seed + byte(i>>12)
	}
	return b
}

func mustEqual(t testing.TB, what string, want, got []byte) {
	t.Helper()
	if !bytes.Equal(want, got) {
		i := 0
		for i < len(want) && i < len(got) && want[i] == got[i] {
			i++
		}
		t.Fatalf("%s: %d bytes differ from offset %d (want len %d, got len %d)", what, len(want)-i, i, len(want), len(got))
	}
}
