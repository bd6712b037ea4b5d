package client

import (
	"context"
	"fmt"
	"math"
	"slices"

	"github.com/lvnbd/lvnbd/nbd"
)

// maxEffectLength bounds one TRIM, WRITE_ZEROES, CACHE or BLOCK_STATUS
// request; longer ranges are split. A multiple of every legal minimum block
// size.
const maxEffectLength = 1 << 30

// limits are the request sizes a connection keeps to.
type limits struct {
	align uint64 // every offset and length is a multiple of this
	maxIO uint64 // largest READ or WRITE payload per request
}

// limitsOf honours the server's block sizes, and never sends more than the
// 32 MiB every server must accept even if it advertises more.
func limitsOf(info ExportInfo) limits {
	bs := info.BlockSizes
	align := uint64(max(bs.Minimum, 1))
	maxIO := uint64(min(max(bs.MaxPayload, 1), nbd.DefaultMaxPayload))
	maxIO -= maxIO % align
	if maxIO == 0 {
		maxIO = align
	}
	return limits{align: align, maxIO: maxIO}
}

func (e ExportInfo) clone() ExportInfo {
	e.MetaContexts = slices.Clone(e.MetaContexts)
	return e
}

// op is one caller-level operation, before splitting into requests.
type op struct {
	cmd    nbd.Command
	flags  nbd.CommandFlags
	off    int64
	length int64
	buf    []byte // READ destination or WRITE source, len == length
}

// allowedFlags are the command flags each operation may carry.
var allowedFlags = map[nbd.Command]nbd.CommandFlags{
	nbd.CmdRead:        0,
	nbd.CmdWrite:       nbd.CmdFlagFUA,
	nbd.CmdFlush:       0,
	nbd.CmdTrim:        nbd.CmdFlagFUA,
	nbd.CmdCache:       0,
	nbd.CmdWriteZeroes: nbd.CmdFlagFUA | nbd.CmdFlagNoHole | nbd.CmdFlagFastZero,
	nbd.CmdBlockStatus: nbd.CmdFlagReqOne,
}

// requiredFlag is the transmission flag without which a command must not be
// sent. (FLUSH without SEND_FLUSH is a no-op instead: see Conn.Flush.)
var requiredFlag = map[nbd.Command]nbd.TransmissionFlags{
	nbd.CmdTrim:        nbd.FlagSendTrim,
	nbd.CmdWriteZeroes: nbd.FlagSendWriteZeroes,
	nbd.CmdCache:       nbd.FlagSendCache,
}

// validate refuses, before anything is sent, what the protocol forbids the
// client to send.
func validate(info ExportInfo, lim limits, o op, hasMeta bool) error {
	rr := requestRange{cmd: o.cmd, off: uint64(o.off), length: uint64(o.length)}
	refuse := func(errno nbd.Errno, format string, args ...any) error {
		e := newRequestError(rr, errno, fmt.Sprintf(format, args...))
		return e
	}
	if o.off < 0 || o.length < 0 || o.length > math.MaxInt64-o.off {
		return refuse(nbd.EINVAL, "offset and length must be non-negative and not overflow")
	}
	if bad := o.flags &^ allowedFlags[o.cmd]; bad != 0 {
		return refuse(nbd.EINVAL, "flags %v are not valid for %v", bad, o.cmd)
	}
	if f, ok := requiredFlag[o.cmd]; ok && info.Flags&f == 0 {
		return fmt.Errorf("%v: %w: the server does not advertise %s", o.cmd, ErrUnsupported, flagName(f))
	}
	if o.cmd == nbd.CmdBlockStatus && !hasMeta {
		return fmt.Errorf("%v: %w: no base:allocation metadata context was negotiated", o.cmd, ErrUnsupported)
	}
	if o.flags&nbd.CmdFlagFUA != 0 && info.Flags&nbd.FlagSendFUA == 0 {
		return fmt.Errorf("%v with FUA: %w: the server does not advertise SEND_FUA", o.cmd, ErrUnsupported)
	}
	if o.flags&nbd.CmdFlagFastZero != 0 && info.Flags&nbd.FlagSendFastZero == 0 {
		return fmt.Errorf("%v with FAST_ZERO: %w: the server does not advertise SEND_FAST_ZERO", o.cmd, ErrUnsupported)
	}
	if info.ReadOnly() && (o.cmd == nbd.CmdWrite || o.cmd == nbd.CmdTrim || o.cmd == nbd.CmdWriteZeroes) {
		return refuse(nbd.EPERM, "export %q is read-only", info.Name)
	}
	if lim.align > 1 && o.cmd != nbd.CmdFlush && (uint64(o.off)%lim.align != 0 || uint64(o.length)%lim.align != 0) {
		return refuse(nbd.EINVAL, "not aligned to the export's minimum block size of %d bytes", lim.align)
	}
	// The spec forbids a request past the end, and a server may answer one
	// by disconnecting, failing every request in flight. info.Size is the
	// handshake's: nothing in the protocol tells a connection of a resize.
	// Written as a subtraction so that no sum can wrap; off and length are
	// non-negative here. ENOSPC for writes, as the spec has a server answer.
	if uint64(o.length) > info.Size || uint64(o.off) > info.Size-uint64(o.length) {
		errno := nbd.EINVAL
		if o.cmd == nbd.CmdWrite || o.cmd == nbd.CmdWriteZeroes {
			errno = nbd.ENOSPC
		}
		return refuse(errno, "beyond the export's %d bytes", info.Size)
	}
	return nil
}

func flagName(f nbd.TransmissionFlags) string {
	if names := f.Names(); len(names) == 1 {
		return names[0]
	}
	return f.String()
}

// run validates o, splits it into requests, sends each on the connection
// pick chooses for it, and waits for every reply. hasMeta tells whether
// base:allocation was negotiated, which every connection pick may choose
// agrees on.
func run(ctx context.Context, info ExportInfo, lim limits, hasMeta bool, o op, pick func() (*Conn, error)) error {
	if err := validate(info, lim, o, hasMeta); err != nil {
		return err
	}
	if o.cmd == nbd.CmdFlush {
		if info.Flags&nbd.FlagSendFlush == 0 {
			return nil
		}
		c, err := pick()
		if err != nil {
			return err
		}
		cl, err := c.start(ctx, nbd.RequestHeader{Command: nbd.CmdFlush}, nil, nil)
		if err != nil {
			return err
		}
		return cl.wait(ctx)
	}
	piece := uint64(maxEffectLength)
	if o.cmd == nbd.CmdRead || o.cmd == nbd.CmdWrite {
		piece = lim.maxIO
	}
	var calls []*call
	for done := uint64(0); done < uint64(o.length); {
		n := min(uint64(o.length)-done, piece)
		req := nbd.RequestHeader{Command: o.cmd, Flags: o.flags, Offset: uint64(o.off) + done, Length: uint32(n)}
		var payload, dst []byte
		switch o.cmd {
		case nbd.CmdWrite:
			payload = o.buf[done : done+n]
		case nbd.CmdRead:
			dst = o.buf[done : done+n]
		}
		// One pick per piece, so that a pool's round robin spreads
		// one-piece requests evenly.
		c, err := pick()
		if err != nil {
			abandonAll(ctx, calls, err)
			return err
		}
		cl, err := c.start(ctx, req, payload, dst)
		if err != nil {
			abandonAll(ctx, calls, err)
			return err
		}
		calls = append(calls, cl)
		done += n
	}
	for i, cl := range calls {
		if err := cl.wait(ctx); err != nil {
			abandonAll(ctx, calls[i+1:], err)
			return err
		}
	}
	return nil
}

// abandonAll makes sure no reply writes into the caller's buffer after it
// has been given back; why is the reason it is given back. A copy in
// progress is waited for while ctx lasts (see call.abandon).
func abandonAll(ctx context.Context, calls []*call, why error) {
	for _, cl := range calls {
		cl.abandon(ctx, why)
	}
}

// blockStatus sends one NBD_CMD_BLOCK_STATUS on the connection pick chooses.
func blockStatus(ctx context.Context, info ExportInfo, lim limits, hasMeta bool, off, length int64, flags nbd.CommandFlags, pick func() (*Conn, error)) ([]nbd.Extent, error) {
	o := op{cmd: nbd.CmdBlockStatus, flags: flags, off: off, length: length}
	if err := validate(info, lim, o, hasMeta); err != nil {
		return nil, err
	}
	if length == 0 {
		return nil, nil
	}
	c, err := pick()
	if err != nil {
		return nil, err
	}
	req := nbd.RequestHeader{Command: nbd.CmdBlockStatus, Flags: flags, Offset: uint64(off),
		Length: uint32(min(uint64(length), maxEffectLength))}
	cl, err := c.start(ctx, req, nil, nil)
	if err != nil {
		return nil, err
	}
	if err := cl.wait(ctx); err != nil {
		return nil, err
	}
	return cl.extents, nil
}
