package server

import (
	"encoding/binary"
	"errors"
	"fmt"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server/backend"
)

// Structured reads at least this long look for runs of zeroes and send them
// as OFFSET_HOLE chunks; shorter ones are sent as they are.
const holeReadMin = 64 << 10

// maxExtents bounds one block-status reply (the spec's limit is 2^20).
const maxExtents = 1 << 16

// allowedFlags lists the command flags each command accepts.
var allowedFlags = map[nbd.Command]nbd.CommandFlags{
	nbd.CmdRead:        nbd.CmdFlagFUA | nbd.CmdFlagDF,
	nbd.CmdWrite:       nbd.CmdFlagFUA,
	nbd.CmdFlush:       nbd.CmdFlagFUA,
	nbd.CmdTrim:        nbd.CmdFlagFUA,
	nbd.CmdCache:       nbd.CmdFlagFUA,
	nbd.CmdWriteZeroes: nbd.CmdFlagFUA | nbd.CmdFlagNoHole | nbd.CmdFlagFastZero,
	nbd.CmdBlockStatus: nbd.CmdFlagFUA | nbd.CmdFlagReqOne,
}

// requestError is a request refused before any I/O, with the reason.
type requestError struct {
	errno nbd.Errno
	msg   string
}

func (e *requestError) Error() string { return e.msg }

func refuse(errno nbd.Errno, format string, args ...any) error {
	return &requestError{errno: errno, msg: fmt.Sprintf(format, args...)}
}

// check validates a request against the export and the negotiated session.
func (s *session) check(req nbd.RequestHeader) error {
	allowed, known := allowedFlags[req.Command]
	if !known {
		return refuse(nbd.EINVAL, "unknown command %v", req.Command)
	}
	if !s.structured {
		allowed &^= nbd.CmdFlagDF
	}
	if bad := req.Flags &^ allowed; bad != 0 {
		return refuse(nbd.EINVAL, "flags %v not valid for %v", bad, req.Command)
	}
	writes := req.Command == nbd.CmdWrite || req.Command == nbd.CmdWriteZeroes || req.Command == nbd.CmdTrim
	if writes && s.export.ReadOnly {
		return refuse(nbd.EPERM, "export %q is read-only", s.export.Name)
	}
	if req.Command == nbd.CmdFlush {
		return nil
	}
	if req.Command == nbd.CmdRead && req.Length > maxPayload {
		// Structured replies could split a larger read into chunks, but
		// the spec lets a server refuse it, and one bound for every read
		// keeps the memory accounting (and the buffer pools) exact.
		return refuse(nbd.EINVAL, "read of %d bytes over the %d-byte maximum payload", req.Length, maxPayload)
	}
	if req.Command == nbd.CmdBlockStatus {
		if !s.metaAlloc {
			return refuse(nbd.EINVAL, "no metadata context negotiated")
		}
		if req.Length == 0 {
			return refuse(nbd.EINVAL, "block status of length 0")
		}
	}
	size := uint64(s.export.Backend.Size())
	if req.Offset > size || uint64(req.Length) > size-req.Offset {
		errno := nbd.EINVAL
		if req.Command == nbd.CmdWrite || req.Command == nbd.CmdWriteZeroes {
			errno = nbd.ENOSPC
		}
		return refuse(errno, "%v [%d, +%d) beyond the export's %d bytes", req.Command, req.Offset, req.Length, size)
	}
	return nil
}

// do performs one request and returns its reply, to be sent, and the error
// value it answers with; no reply when the client is gone. The reply's done
// returns payload and the request's slot and bytes once it is written.
func (c *conn) do(req nbd.RequestHeader, payload []byte, pipe *splicePipe, cost int64) (_ *reply, errno nbd.Errno) {
	defer func() {
		if pipe != nil { // the payload was not written: the pipe may hold some
			c.splice.discard(pipe)
		}
	}()
	r := &reply{}
	var bufs [][]byte
	if payload != nil {
		bufs = append(bufs, payload)
	}
	r.done = func() {
		for _, b := range bufs {
			putBuf(b)
		}
		c.release(cost)
	}
	if c.gone.Load() {
		// Nobody will read the reply; an unacknowledged write may be
		// dropped as if the connection had died a moment earlier.
		c.dropped(req)
		r.done()
		return nil, nbd.ESHUTDOWN
	}
	err := c.sess.check(req)
	if err == nil {
		switch req.Command {
		case nbd.CmdRead:
			c.client.read.Add(int64(req.Length))
			var data []byte
			data, err = c.read(r, req)
			if data != nil {
				bufs = append(bufs, data)
			}
			if err == nil {
				return r, 0
			}
		case nbd.CmdBlockStatus:
			if err = c.blockStatus(r, req); err == nil {
				return r, 0
			}
		default:
			err = c.modify(req, payload, pipe)
			if err == nil && pipe != nil {
				c.splice.put(pipe) // emptied into the backend
				pipe = nil
				c.s.splicedWrites.Add(1)
			}
		}
	}
	if errors.Is(err, errAbandoned) {
		// Nobody waits for this reply: the client may have sent the
		// write again elsewhere, and it must not land late (hangup.go).
		c.dropped(req)
		r.done()
		return nil, nbd.ESHUTDOWN
	}
	if err != nil {
		errno = errnoOf(err)
		var re *requestError
		if errors.As(err, &re) {
			errno = re.errno
			c.log.Debug("request refused", zap.Stringer("cmd", req.Command), zap.String("why", re.msg))
		} else if wb := (*backend.WriteBackError)(nil); errors.As(err, &wb) && c.failureLogged.Swap(true) {
			// Every request of a failed export fails: one warning per
			// connection, not a flood (the failure itself is logged
			// where it happened).
			c.log.Debug("request failed", zap.Stringer("cmd", req.Command), zap.Stringer("errno", errno))
		} else if !errors.Is(err, backend.ErrNotFast) {
			c.log.Warn("request failed", zap.Stringer("cmd", req.Command), zap.Uint64("offset", req.Offset),
				zap.Uint32("length", req.Length), zap.Stringer("errno", errno), zap.Error(err))
		}
		*r = reply{done: r.done}
		c.errorReply(r, req, errno, err.Error())
	} else {
		c.okReply(r, req)
	}
	return r, errno
}

// dropped logs a write, TRIM or WRITE_ZEROES left undone because its client
// hung up (once per connection at warning level: a timed-out kernel client
// leaves up to a queue's worth), and counts it.
func (c *conn) dropped(req nbd.RequestHeader) {
	if req.Command != nbd.CmdWrite && req.Command != nbd.CmdTrim && req.Command != nbd.CmdWriteZeroes {
		return
	}
	c.s.abandonedWrites.Add(1)
	fields := []zap.Field{zap.Stringer("cmd", req.Command), zap.Uint64("offset", req.Offset), zap.Uint32("length", req.Length)}
	if !c.dropLogged.Swap(true) {
		c.log.Warn("client hung up without NBD_CMD_DISC; dropping the writes it had sent and not seen done", fields...)
		return
	}
	c.log.Debug("write dropped", fields...)
}

// modify performs the commands whose reply carries no data. A write's
// payload is in payload or, spliced off the socket, in pipe.
func (c *conn) modify(req nbd.RequestHeader, payload []byte, pipe *splicePipe) error {
	e := c.sess.export
	b := e.Backend
	off, length := int64(req.Offset), int64(req.Length)
	fua := req.Flags&nbd.CmdFlagFUA != 0
	if req.Command == nbd.CmdWrite || req.Command == nbd.CmdTrim || req.Command == nbd.CmdWriteZeroes {
		unlock, err := c.lockForWrite(off, length)
		if err != nil {
			return err
		}
		defer unlock()
	}
	var err error
	switch req.Command {
	case nbd.CmdWrite:
		c.client.written.Add(length)
		if pipe != nil {
			return c.writeFromPipe(pipe, off, int(length))
		}
		return b.WriteAt(payload, off, fua)
	case nbd.CmdFlush:
		return b.Flush()
	case nbd.CmdTrim:
		err = b.Trim(off, length)
	case nbd.CmdWriteZeroes:
		err = b.Zero(off, length, req.Flags&nbd.CmdFlagNoHole == 0, req.Flags&nbd.CmdFlagFastZero != 0)
	case nbd.CmdCache:
		return b.Cache(off, length)
	}
	if err == nil && fua && length > 0 {
		err = b.Flush()
	}
	return err
}

// writeFromPipe writes a payload spliced off the socket (never FUA: those
// are read into a buffer, for RWF_DSYNC). A backend that turns out not to
// take splices gets the payload copied out of the pipe.
func (c *conn) writeFromPipe(p *splicePipe, off int64, n int) error {
	b := c.sess.export.Backend
	done, err := b.(fileSplicer).SpliceWrite(p.r, off, n)
	if err == nil || done > 0 || !unsupported(err) {
		return err
	}
	c.splice.fail(err)
	buf := getBuf(n)
	defer putBuf(buf)
	if err := p.drain(buf); err != nil {
		return err
	}
	return b.WriteAt(buf, off, false)
}

// read fills r with the reply to a READ and returns the data buffer it used.
func (c *conn) read(r *reply, req nbd.RequestHeader) ([]byte, error) {
	b := c.sess.export.Backend
	off := int64(req.Offset)
	if req.Length == 0 && c.sess.structured {
		c.okReply(r, req)
		return nil, nil
	}
	if p := c.splicePipe(req); p != nil {
		err := c.sess.export.Backend.(fileSplicer).SpliceRead(p.w, off, int(req.Length))
		if err == nil {
			c.dataHeader(r, req)
			r.pipe, r.pipeLen = p, int(req.Length)
			return nil, nil
		}
		c.splice.discard(p)
		if !unsupported(err) {
			return nil, err
		}
		c.splice.fail(err) // this backend cannot splice: copy instead
	}
	data := getBuf(int(req.Length))
	// Read everything before encoding anything, so an I/O error becomes a
	// lone error reply rather than one after content chunks.
	if err := b.ReadAt(data, off); err != nil {
		return data, err
	}
	if !c.sess.structured {
		c.dataHeader(r, req)
		r.add(data)
		return data, nil
	}
	var runs []zeroRun
	if req.Flags&nbd.CmdFlagDF == 0 && req.Length >= holeReadMin {
		runs = zeroRuns(data, off)
		c.holesSeen.Store(len(runs) > 0)
	}
	hdrs := make([]byte, 0, (2*len(runs)+1)*(nbd.StructuredHeaderSize+nbd.OffsetHoleSize))
	chunk := func(start, end int, hole, last bool) {
		var flags nbd.ReplyFlags
		if last {
			flags = nbd.ReplyFlagDone
		}
		from := len(hdrs)
		pos := uint64(off) + uint64(start)
		if hole {
			hdrs, _ = nbd.StructuredReplyHeader{Flags: flags, Type: nbd.ReplyOffsetHole, Handle: req.Handle, Length: nbd.OffsetHoleSize}.AppendBinary(hdrs)
			hdrs, _ = nbd.OffsetHole{Offset: pos, Length: uint32(end - start)}.AppendBinary(hdrs)
			r.add(hdrs[from:len(hdrs):len(hdrs)])
			return
		}
		hdrs = appendDataChunkHeader(hdrs, flags, req.Handle, pos, end-start)
		r.add(hdrs[from:len(hdrs):len(hdrs)])
		r.add(data[start:end])
	}
	pos := 0
	for _, z := range runs {
		if z.start > pos {
			chunk(pos, z.start, false, false)
		}
		chunk(z.start, z.end, true, z.end == len(data))
		pos = z.end
	}
	if pos < len(data) {
		chunk(pos, len(data), false, true)
	}
	return data, nil
}

// holeProbeEvery is how often a structured read that could be spliced is
// copied instead, to look for zeroes (see splicePipe).
const holeProbeEvery = 16

// splicePipe returns a pipe to splice req's data through, or nil when the
// read is to be copied: too short, no splice path, no free pipe, or a read
// whose zeroes should be found.
//
// Zeroes can only be found in data the server sees, so splicing gives up
// sending runs of zeroes as holes (which saves a link's bandwidth when a
// structured client such as a backup reads an unwritten part of an LV). The
// two are reconciled by probing: one structured read in holeProbeEvery is
// copied and searched, and while the probes find zeroes every read is, until
// one finds none. Simple replies (the kernel's client) have no holes to send.
func (c *conn) splicePipe(req nbd.RequestHeader) *splicePipe {
	if c.splice == nil || req.Length < spliceMin {
		return nil
	}
	if c.sess.structured && req.Flags&nbd.CmdFlagDF == 0 &&
		(c.holesSeen.Load() || (c.largeReads.Add(1)-1)%holeProbeEvery == 0) {
		return nil
	}
	return c.splice.get(int(req.Length))
}

// dataHeader adds the header of a read's reply whose data follows it: a
// simple reply, or one OFFSET_DATA chunk that is the last.
func (c *conn) dataHeader(r *reply, req nbd.RequestHeader) {
	if !c.sess.structured {
		hdr, _ := nbd.SimpleReply{Handle: req.Handle}.AppendBinary(make([]byte, 0, nbd.SimpleReplySize))
		r.add(hdr)
		return
	}
	r.add(appendDataChunkHeader(make([]byte, 0, nbd.StructuredHeaderSize+nbd.OffsetDataPrefixSize),
		nbd.ReplyFlagDone, req.Handle, req.Offset, int(req.Length)))
}

// appendDataChunkHeader appends what precedes n bytes of data at offset in an
// OFFSET_DATA chunk: the chunk header and the offset.
func appendDataChunkHeader(b []byte, flags nbd.ReplyFlags, handle, offset uint64, n int) []byte {
	b, _ = nbd.StructuredReplyHeader{Flags: flags, Type: nbd.ReplyOffsetData, Handle: handle,
		Length: uint32(nbd.OffsetDataPrefixSize + n)}.AppendBinary(b)
	return binary.BigEndian.AppendUint64(b, offset)
}

// zeroRun is [start, end) of a read buffer that is all zeroes.
type zeroRun struct{ start, end int }

// zeroRuns finds the runs of zeroes in data (read at export offset off) worth
// sending as OFFSET_HOLE chunks instead of bytes: whole 4 KiB blocks, aligned
// on the export, at least holeRunMin long. Looking at the data just read is
// cheap — a block of data is given up at its first non-zero word — where
// asking the file system (SEEK_HOLE) can cost a walk of the whole file per
// read (tmpfs), and it finds zeroes that were written as well as holes.
func zeroRuns(data []byte, off int64) []zeroRun {
	const block = 4096
	var runs []zeroRun
	first := int((block - off%block) % block)
	runStart := -1
	flush := func(end int) {
		if runStart >= 0 && end-runStart >= holeRunMin {
			runs = append(runs, zeroRun{runStart, end})
		}
		runStart = -1
	}
	for i := first; i+block <= len(data); i += block {
		if allZero(data[i : i+block]) {
			if runStart < 0 {
				runStart = i
			}
			continue
		}
		flush(i)
	}
	end := first + (len(data)-first)/block*block
	flush(end)
	return runs
}

// holeRunMin is the shortest zero run sent as a hole: shorter ones are not
// worth a chunk of their own.
const holeRunMin = 64 << 10

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

func (c *conn) blockStatus(r *reply, req nbd.RequestHeader) error {
	limit := maxExtents
	if req.Flags&nbd.CmdFlagReqOne != 0 {
		limit = 1
	}
	extents, err := c.sess.export.Backend.Extents(int64(req.Offset), int64(req.Length), limit)
	if err != nil {
		return err
	}
	bs := nbd.BlockStatus{ContextID: baseAllocationID, Extents: make([]nbd.Extent, 0, len(extents))}
	for _, x := range extents {
		var flags uint32
		if x.Hole {
			flags |= nbd.StateHole
		}
		if x.Zero {
			flags |= nbd.StateZero
		}
		bs.Extents = append(bs.Extents, nbd.Extent{Length: uint32(x.Length), Flags: flags})
	}
	payload, err := bs.AppendBinary(nil)
	if err != nil {
		return err
	}
	hdr, _ := nbd.StructuredReplyHeader{Flags: nbd.ReplyFlagDone, Type: nbd.ReplyBlockStatus,
		Handle: req.Handle, Length: uint32(len(payload))}.AppendBinary(nil)
	r.add(hdr)
	r.add(payload)
	return nil
}

// okReply answers a request that succeeded with no data.
func (c *conn) okReply(r *reply, req nbd.RequestHeader) {
	var b []byte
	if c.sess.structured && (req.Command == nbd.CmdRead || req.Command == nbd.CmdBlockStatus) {
		b, _ = nbd.StructuredReplyHeader{Flags: nbd.ReplyFlagDone, Type: nbd.ReplyNone, Handle: req.Handle}.AppendBinary(nil)
	} else {
		b, _ = nbd.SimpleReply{Handle: req.Handle}.AppendBinary(nil)
	}
	r.add(b)
}

// errorReply answers a failed request: a structured error chunk with a
// message where structured replies are in use, else a simple reply.
func (c *conn) errorReply(r *reply, req nbd.RequestHeader, errno nbd.Errno, msg string) {
	if !c.sess.structured {
		b, _ := nbd.SimpleReply{Errno: errno, Handle: req.Handle}.AppendBinary(nil)
		r.add(b)
		return
	}
	msg = truncateString(msg, nbd.MaxStringLength)
	chunk := nbd.ErrorChunk{Errno: errno, Message: msg}
	payload, _ := chunk.AppendBinary(nil)
	b, _ := nbd.StructuredReplyHeader{Flags: nbd.ReplyFlagDone, Type: chunk.Type(), Handle: req.Handle,
		Length: uint32(len(payload))}.AppendBinary(nil)
	r.add(append(b, payload...))
}
