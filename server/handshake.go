package server

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/nbd"
)

// baseAllocationID is the metadata context id of base:allocation, the only
// context lvnbd serves.
const baseAllocationID = 1

// maxSkippedOption bounds the data of an option lvnbd reads and throws away
// to answer it (see skipOversized): a client may send an option lvnbd does
// not know with more data than any it takes, and must get a reply, but
// reading gigabytes for one costs more than hanging up on a client that
// behaves so.
const maxSkippedOption = 4 << 20

// session is what the handshake agreed on for the transmission phase.
type session struct {
	export     *Export
	structured bool
	metaAlloc  bool // base:allocation selected for this export
	flags      nbd.TransmissionFlags
	nc         net.Conn      // the TLS connection after STARTTLS
	r          *bufio.Reader // reads nc
	peer       peer
}

// errAbort ends a handshake the client chose to end.
var errAbort = errors.New("client aborted the handshake")

// negotiator runs the fixed-newstyle handshake on one connection.
type negotiator struct {
	s          *Server
	nc         net.Conn
	r          *bufio.Reader
	log        *zap.Logger
	fixed      bool
	noZeroes   bool
	structured bool
	metaExport string // export the last SET_META_CONTEXT selected base:allocation for
	metaAlloc  bool
	out        []byte
	peer       peer
	// attach records the client on the export it is about to enter, just
	// before the reply that lets it in; it returns why it may not enter
	// after all (the export was retired, or the client fenced meanwhile),
	// or "".
	attach func(*session) string
}

// whyRetired is attach's answer when the export was removed during the
// handshake.
const whyRetired = "the export was removed meanwhile"

// negotiate runs the handshake and returns the agreed session.
func (s *Server) negotiate(ctx context.Context, nc net.Conn, r *bufio.Reader, p peer, log *zap.Logger,
	attach func(*session) string) (sess *session, err error) {
	n := &negotiator{s: s, nc: nc, r: r, log: log, peer: p, attach: attach}
	defer func() {
		if err != nil {
			// The connection ends here: a TLS session ends with its
			// close_notify, before the caller closes the socket, or the
			// client cannot tell the end from a cut.
			closeTLS(n.nc)
		}
	}()
	hello, _ := nbd.ServerHello{Flags: nbd.FlagFixedNewstyle | nbd.FlagNoZeroes}.AppendBinary(nil)
	if _, err := nc.Write(hello); err != nil {
		return nil, fmt.Errorf("sending greeting: %w", err)
	}
	var cf [nbd.ClientFlagsSize]byte
	if _, err := io.ReadFull(r, cf[:]); err != nil {
		return nil, fmt.Errorf("reading client flags: %w", err)
	}
	flags := nbd.ClientFlags(binary.BigEndian.Uint32(cf[:]))
	if unknown := flags &^ (nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes); unknown != 0 {
		return nil, fmt.Errorf("client set unknown handshake flags %v", unknown)
	}
	n.fixed = flags&nbd.ClientFlagFixedNewstyle != 0
	n.noZeroes = flags&nbd.ClientFlagNoZeroes != 0
	for {
		sess, err := n.option(ctx)
		if err != nil || sess != nil {
			return sess, err
		}
	}
}

// option reads and answers one option; it returns a session once the client
// enters transmission.
func (n *negotiator) option(ctx context.Context) (*session, error) {
	var hb [nbd.OptionHeaderSize]byte
	if _, err := io.ReadFull(n.r, hb[:]); err != nil {
		return nil, fmt.Errorf("reading option: %w", err)
	}
	var h nbd.OptionHeader
	if err := h.UnmarshalBinary(hb[:]); err != nil {
		return nil, err
	}
	if h.Length > nbd.MaxOptionLength {
		return nil, n.skipOversized(h)
	}
	data := make([]byte, h.Length)
	if _, err := io.ReadFull(n.r, data); err != nil {
		return nil, fmt.Errorf("reading %v data: %w", h.Option, err)
	}
	if !n.fixed && h.Option != nbd.OptExportName {
		// Without fixed newstyle there is no way to say "unsupported".
		return nil, fmt.Errorf("non-fixed-newstyle client sent %v", h.Option)
	}
	switch h.Option {
	case nbd.OptExportName:
		return n.exportName(string(data))
	case nbd.OptAbort:
		_ = n.reply(h.Option, nbd.RepAck, nil)
		return nil, errAbort
	case nbd.OptList:
		return nil, n.list(data)
	case nbd.OptInfo, nbd.OptGo:
		return n.infoGo(h.Option, data)
	case nbd.OptStructuredReply:
		if len(data) != 0 {
			return nil, n.replyErr(h.Option, nbd.RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		n.structured = true
		return nil, n.reply(h.Option, nbd.RepAck, nil)
	case nbd.OptListMetaContext, nbd.OptSetMetaContext:
		return nil, n.metaContext(h.Option, data)
	case nbd.OptStartTLS:
		return nil, n.startTLS(ctx, data)
	default:
		return nil, n.replyErr(h.Option, nbd.RepErrUnsup, fmt.Sprintf("%v is not supported", h.Option))
	}
}

// handles reports whether lvnbd implements opt: the options option answers
// other than with NBD_REP_ERR_UNSUP. It must list the cases of option's
// switch (TestHandledOptions checks).
func handles(opt nbd.Option) bool {
	switch opt {
	case nbd.OptExportName, nbd.OptAbort, nbd.OptList, nbd.OptInfo, nbd.OptGo, nbd.OptStructuredReply,
		nbd.OptListMetaContext, nbd.OptSetMetaContext, nbd.OptStartTLS:
		return true
	}
	return false
}

// skipOversized answers an option whose data is longer than any option lvnbd
// takes (nbd.MaxOptionLength). The spec wants an unknown option answered with
// NBD_REP_ERR_UNSUP and the next one parsed, so the data is read and thrown
// away, and a known option gets NBD_REP_ERR_TOO_BIG. Only beyond
// maxSkippedOption, or when no reply can be sent, is the client hung up on.
func (n *negotiator) skipOversized(h nbd.OptionHeader) error {
	switch {
	case h.Length > maxSkippedOption:
		return fmt.Errorf("%v with %d bytes of data, over the %d-byte limit", h.Option, h.Length, maxSkippedOption)
	case !n.fixed:
		return fmt.Errorf("non-fixed-newstyle client sent %v with %d bytes of data", h.Option, h.Length)
	case h.Option == nbd.OptExportName:
		// No error reply exists for it, and no name is this long.
		return fmt.Errorf("NBD_OPT_EXPORT_NAME with a %d-byte name", h.Length)
	}
	if _, err := io.CopyN(io.Discard, n.r, int64(h.Length)); err != nil {
		return fmt.Errorf("reading %v data: %w", h.Option, err)
	}
	switch {
	case h.Option == nbd.OptAbort:
		// Its data is ignored however long: the client is leaving.
		_ = n.reply(h.Option, nbd.RepAck, nil)
		return errAbort
	case handles(h.Option):
		return n.replyErr(h.Option, nbd.RepErrTooBig,
			fmt.Sprintf("%v with %d bytes of data, over the %d-byte limit", h.Option, h.Length, nbd.MaxOptionLength))
	}
	return n.replyErr(h.Option, nbd.RepErrUnsup, fmt.Sprintf("%v is not supported", h.Option))
}

func (n *negotiator) exportName(name string) (*session, error) {
	e, ok := n.s.cfg.Exports.Lookup(name)
	if !ok {
		// The option has no error reply: the spec says to hang up.
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME: no export %q (have %s)", name, n.s.cfg.Exports.names())
	}
	if why, _ := n.access(e); why != "" {
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %s", name, why)
	}
	sess := n.session(e)
	size := n.currentSize(e) // before attach: see infoGo
	if why := n.attach(sess); why != "" {
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %s", name, why)
	}
	b, _ := nbd.ExportNameReply{Size: uint64(sizeSince(e, size)), Flags: sess.flags}.AppendBinary(nil)
	if !n.noZeroes {
		b = append(b, make([]byte, nbd.ExportNameZeroPadding)...)
	}
	if _, err := n.nc.Write(b); err != nil {
		return nil, fmt.Errorf("sending export info: %w", err)
	}
	return sess, nil
}

func (n *negotiator) session(e *Export) *session {
	return &session{
		export:     e,
		structured: n.structured,
		metaAlloc:  n.structured && n.metaAlloc && n.metaExport == e.Name,
		flags:      e.transmissionFlags(n.structured),
		nc:         n.nc,
		r:          n.r,
		peer:       n.peer,
	}
}

// sizeSince is the size to tell a client just counted on e, whose size was
// read before as read: smaller if someone else saw e shrink in between.
// That one cut the clients counted then, not this one; told the smaller
// size, it cannot go on over the lost tail. A shrink seen after the count
// cuts it (refreshSize).
func sizeSince(e *Export, read int64) int64 {
	return min(read, e.Backend.Size())
}

// currentSize re-reads the export's size, so a file or LV grown outside
// lvnbd (truncate, lvextend) shows at the next handshake and a client polling
// NBD_OPT_INFO sees it, and one shrunk cuts the export's clients (see
// refreshSize); on failure the last known size is used.
func (n *negotiator) currentSize(e *Export) int64 {
	size, err := e.refreshSize(n.log)
	if err != nil {
		n.log.Warn("re-reading the export size", zap.String("export", e.Name), zap.Error(err))
		return e.Backend.Size()
	}
	return size
}

// access returns why this client may not use e, or "".
func (n *negotiator) access(e *Export) (why string, tlsReqd bool) {
	why, tlsReqd = e.currentAccess().check(n.peer)
	if why == "" && n.s.fenced(n.peer, e.Name) {
		why = fmt.Sprintf("%s is fenced off export %q (lvnbd unfence)", n.peer, e.Name)
	}
	if why != "" {
		n.log.Warn("access refused", zap.String("export", e.Name), zap.String("why", why))
	}
	return why, tlsReqd
}

// startTLS upgrades the connection (NBD_OPT_STARTTLS). Negotiation state
// from before is forgotten, as the spec requires.
func (n *negotiator) startTLS(ctx context.Context, data []byte) error {
	tlsConfig := n.s.tlsConfig.Load()
	switch {
	case tlsConfig == nil:
		return n.replyErr(nbd.OptStartTLS, nbd.RepErrPolicy, "TLS is not configured on this server")
	case n.peer.tls:
		return n.replyErr(nbd.OptStartTLS, nbd.RepErrInvalid, "TLS is already in use")
	case len(data) != 0:
		return n.replyErr(nbd.OptStartTLS, nbd.RepErrInvalid, "NBD_OPT_STARTTLS takes no data")
	case n.r.Buffered() != 0:
		// Bytes sent before our ACK would be plaintext injected into the
		// TLS session.
		return fmt.Errorf("client sent %d bytes after NBD_OPT_STARTTLS before the TLS handshake", n.r.Buffered())
	}
	if err := n.reply(nbd.OptStartTLS, nbd.RepAck, nil); err != nil {
		return err
	}
	tc := tls.Server(n.nc, tlsConfig)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	n.nc, n.r = tc, bufio.NewReaderSize(tc, readBufferSize)
	n.peer.tls = true
	if chains := tc.ConnectionState().VerifiedChains; len(chains) > 0 && len(chains[0]) > 0 {
		n.peer.names = certNames(chains[0][0])
	}
	n.structured, n.metaAlloc, n.metaExport = false, false, ""
	n.log.Debug("TLS started", zap.Strings("client_names", n.peer.names))
	return nil
}

// usable returns the exports this client may use, sorted by name. Only
// these are ever named to it, by NBD_OPT_LIST or in an error message: the
// spec lets a server hide what a client cannot use, and for lvnbd a name is
// a VM's volume.
func (n *negotiator) usable() []*Export {
	var out []*Export
	for _, e := range n.s.cfg.Exports.List() {
		if why, _ := e.currentAccess().check(n.peer); why == "" {
			out = append(out, e)
		}
	}
	return out
}

func (n *negotiator) list(data []byte) error {
	if len(data) != 0 {
		return n.replyErr(nbd.OptList, nbd.RepErrInvalid, "NBD_OPT_LIST takes no data")
	}
	for _, e := range n.usable() {
		b, err := nbd.ServerEntry{Name: e.Name, Description: e.Description}.AppendBinary(nil)
		if err != nil {
			return err
		}
		n.queue(nbd.OptList, nbd.RepServer, b)
	}
	return n.reply(nbd.OptList, nbd.RepAck, nil)
}

func (n *negotiator) infoGo(opt nbd.Option, data []byte) (*session, error) {
	var req nbd.InfoRequest
	if err := req.UnmarshalBinary(data); err != nil {
		return nil, n.replyErr(opt, nbd.RepErrInvalid, err.Error())
	}
	e, ok := n.s.cfg.Exports.Lookup(req.Name)
	if !ok {
		return nil, n.replyErr(opt, nbd.RepErrUnknown, unknownExportMessage(req.Name, n.usable()))
	}
	if why, tlsReqd := n.access(e); why != "" {
		return nil, n.refuse(opt, why, tlsReqd)
	}
	sess := n.session(e)
	// Read before the client is counted: a shrink this read is the first
	// to see cuts the export's clients, not this one, which is told the
	// smaller size and can refuse it.
	size := n.currentSize(e)
	// The client counts as connected (lvnbd status, in-use checks) from
	// before it hears so, never after.
	if opt == nbd.OptGo {
		if why := n.attach(sess); why == whyRetired {
			return nil, n.replyErr(opt, nbd.RepErrUnknown, fmt.Sprintf("export %q: %s", e.Name, why))
		} else if why != "" {
			return nil, n.replyErr(opt, nbd.RepErrPolicy, why)
		}
		size = sizeSince(e, size)
	}
	infos := []nbd.Info{
		{Type: nbd.InfoExport, Size: uint64(size), Flags: sess.flags},
		// Sent even unasked: clients that did not ask ignore it.
		{Type: nbd.InfoBlockSize, MinBlockSize: minBlockSize, PrefBlockSize: prefBlockSize, MaxPayloadSize: maxPayload},
	}
	if req.Has(nbd.InfoName) {
		infos = append(infos, nbd.Info{Type: nbd.InfoName, Text: e.Name})
	}
	if req.Has(nbd.InfoDescription) && e.Description != "" {
		infos = append(infos, nbd.Info{Type: nbd.InfoDescription, Text: e.Description})
	}
	for _, info := range infos {
		b, err := info.AppendBinary(nil)
		if err != nil {
			return nil, err
		}
		n.queue(opt, nbd.RepInfo, b)
	}
	if err := n.reply(opt, nbd.RepAck, nil); err != nil {
		return nil, err
	}
	if opt == nbd.OptInfo {
		return nil, nil
	}
	return sess, nil
}

func (n *negotiator) metaContext(opt nbd.Option, data []byte) error {
	if opt == nbd.OptSetMetaContext {
		n.metaAlloc = false // a set replaces earlier ones, even when it fails
	}
	if !n.structured {
		return n.replyErr(opt, nbd.RepErrInvalid, "negotiate NBD_OPT_STRUCTURED_REPLY before meta contexts")
	}
	var req nbd.MetaContextRequest
	if err := req.UnmarshalBinary(data); err != nil {
		return n.replyErr(opt, nbd.RepErrInvalid, err.Error())
	}
	e, ok := n.s.cfg.Exports.Lookup(req.Export)
	if !ok {
		return n.replyErr(opt, nbd.RepErrUnknown, fmt.Sprintf("no export %q on this server", req.Export))
	}
	// Refused as GO would refuse it: a client that may not use the export
	// learns nothing about it here either.
	if why, tlsReqd := n.access(e); why != "" {
		return n.refuse(opt, why, tlsReqd)
	}
	match := opt == nbd.OptListMetaContext && len(req.Queries) == 0
	for _, q := range req.Queries {
		if q == nbd.MetaContextBaseAllocation || (opt == nbd.OptListMetaContext && q == "base:") {
			match = true
		}
	}
	if match {
		id := uint32(baseAllocationID)
		if opt == nbd.OptListMetaContext {
			// The spec reserves the id in LIST replies: only SET
			// gives one the client may use.
			id = 0
		}
		b, _ := nbd.MetaContext{ID: id, Name: nbd.MetaContextBaseAllocation}.AppendBinary(nil)
		n.queue(opt, nbd.RepMetaContext, b)
		if opt == nbd.OptSetMetaContext {
			n.metaAlloc, n.metaExport = true, e.Name
		}
	}
	return n.reply(opt, nbd.RepAck, nil)
}

// queue appends an option reply to the pending output.
func (n *negotiator) queue(opt nbd.Option, t nbd.OptionReplyType, data []byte) {
	n.out, _ = nbd.OptionReplyHeader{Option: opt, Type: t, Length: uint32(len(data))}.AppendBinary(n.out)
	n.out = append(n.out, data...)
}

// reply queues a final reply and sends everything queued.
func (n *negotiator) reply(opt nbd.Option, t nbd.OptionReplyType, data []byte) error {
	n.queue(opt, t, data)
	_, err := n.nc.Write(n.out)
	n.out = n.out[:0]
	if err != nil {
		return fmt.Errorf("sending %v reply: %w", opt, err)
	}
	return nil
}

// refuse answers opt for an export the client may not use (access): TLS_REQD
// where TLS would let it in, POLICY otherwise.
func (n *negotiator) refuse(opt nbd.Option, why string, tlsReqd bool) error {
	t := nbd.RepErrPolicy
	if tlsReqd {
		t = nbd.RepErrTLSReqd
	}
	return n.replyErr(opt, t, why)
}

// replyErr answers opt with an error reply carrying a message for the user;
// the handshake goes on.
func (n *negotiator) replyErr(opt nbd.Option, t nbd.OptionReplyType, msg string) error {
	n.log.Debug("option refused", zap.Stringer("option", opt), zap.Stringer("reply", t), zap.String("why", msg))
	msg = truncateString(msg, nbd.MaxStringLength)
	n.out = n.out[:0] // drop informational replies queued before the error
	return n.reply(opt, t, []byte(msg))
}

// truncateString cuts s to at most limit bytes, at the start of a UTF-8
// sequence: the spec's strings are UTF-8, and a client may refuse a message
// ending in half a character.
func truncateString(s string, limit int) string {
	if len(s) <= limit {
		return s
	}
	i := limit
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i]
}

// unknownExportMessage is the NBD_REP_ERR_UNKNOWN message for name: it lists
// the exports the client may use (usable) to help a user who mistyped, as
// many as fit in the spec's 4096-byte string, and how many more there are.
func unknownExportMessage(name string, usable []*Export) string {
	var b strings.Builder
	fmt.Fprintf(&b, "no export %q on this server", name)
	if len(usable) == 0 {
		return b.String()
	}
	noList := b.Len()
	b.WriteString(" (exports: ")
	for i, e := range usable {
		q := strconv.Quote(e.Name)
		if i > 0 {
			q = ", " + q
		}
		// Room for this name and for what ends the message if the next
		// does not fit: the count of the rest, or the closing bracket.
		end := ")"
		if rest := len(usable) - i - 1; rest > 0 {
			end = fmt.Sprintf(", and %d more)", rest)
		}
		if b.Len()+len(q)+len(end) > nbd.MaxStringLength {
			if i == 0 {
				// Not even one fits (a very long name asked for):
				// no list.
				return b.String()[:noList]
			}
			// The previous round kept room for this.
			fmt.Fprintf(&b, ", and %d more)", len(usable)-i)
			return b.String()
		}
		b.WriteString(q)
	}
	b.WriteString(")")
	return b.String()
}
