package client

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/lvnbd/lvnbd/nbd"
)

// Bounds on what a server's handshake replies can make us collect.
const (
	// maxOptionReplies bounds the NBD_REP_INFO or NBD_REP_META_CONTEXT
	// replies to one option.
	maxOptionReplies = 1024
	// maxListEntries bounds the exports NBD_OPT_LIST may return.
	maxListEntries = 1 << 16
	// maxListBytes bounds the names and descriptions NBD_OPT_LIST may make
	// us keep: maxListEntries entries of the largest each could hold
	// nearly 1 GiB.
	maxListBytes = 16 << 20
	// abortReplyWait bounds the wait for the server's ACK to NBD_OPT_ABORT;
	// the spec lets servers close without one.
	abortReplyWait = time.Second
)

// aLongTimeAgo is a deadline in the past: setting it interrupts blocked I/O.
var aLongTimeAgo = time.Unix(1, 0)

// Negotiate runs the fixed-newstyle handshake for export on an already
// connected socket and returns what the server said about the export. On
// success the socket is at the start of the transmission phase and nothing
// past the handshake has been read from it, so it can be handed to the
// kernel (with opts.NoStructuredReplies) or to NewConn. The caller keeps
// ownership of nc either way; on an option error Negotiate has already sent
// NBD_OPT_ABORT. Negotiate speaks plain text (opts.TLS is not used): the
// kernel cannot take over a TLS session.
func Negotiate(ctx context.Context, nc net.Conn, export string, opts *Options) (ExportInfo, error) {
	if opts != nil && opts.TLS != nil {
		return ExportInfo{}, fmt.Errorf("negotiating export %q: %w (Negotiate speaks plain text only; Dial an nbds:// URI for TLS)", export, ErrTLSNotSupported)
	}
	_, info, err := negotiate(ctx, nc, export, opts, peerName(nc), nil)
	return info, err
}

// negotiate runs the handshake on nc, first starting TLS with tlsConfig
// unless it is nil, and returns the connection to go on with: nc, or the TLS
// session over it.
func negotiate(ctx context.Context, nc net.Conn, export string, opts *Options, server string, tlsConfig *tls.Config) (_ net.Conn, info ExportInfo, err error) {
	if opts == nil {
		opts = &Options{}
	}
	if len(export) > nbd.MaxStringLength {
		return nil, ExportInfo{}, fmt.Errorf("export name of %d bytes is over the protocol's %d", len(export), nbd.MaxStringLength)
	}
	done := watchContext(ctx, nc, server)
	defer func() { err = done(err) }()

	n := &negotiator{ctx: ctx, nc: nc, server: server, export: export, tls: tlsConfig}
	info, err = n.negotiate(opts)
	info.TLS = tlsConfig != nil
	return n.nc, info, err
}

func (n *negotiator) negotiate(opts *Options) (info ExportInfo, err error) {
	if err := n.hello(); err != nil {
		return ExportInfo{}, err
	}
	if !n.fixed {
		// Plain newstyle: EXPORT_NAME is the only option there is.
		return n.exportName()
	}
	structured := false
	if !opts.NoStructuredReplies {
		if structured, err = n.structuredReply(); err != nil {
			return ExportInfo{}, n.abortWith(err)
		}
	}
	var metas []nbd.MetaContext
	if structured && !opts.NoMetaContext {
		metas, err = n.metaContexts(nbd.OptSetMetaContext, []string{nbd.MetaContextBaseAllocation})
		if fatalOptionError(err) {
			return ExportInfo{}, n.abortWith(err)
		}
		// Any other refusal just means no block status.
	}
	info, err = n.infoGo(nbd.OptGo)
	var oe *OptionError
	if errors.As(err, &oe) && oe.Reply == nbd.RepErrUnsup {
		info, err = n.exportName()
	} else if err != nil {
		return ExportInfo{}, n.abortWith(err)
	}
	if err != nil {
		return ExportInfo{}, err
	}
	info.StructuredReplies = structured
	info.MetaContexts = metas
	return info, nil
}

// List returns the exports the server at uri offers (NBD_OPT_LIST). The
// export part of uri is ignored. opts may be nil; only its TLS is used.
func List(ctx context.Context, uri string, opts *Options) (_ []nbd.ServerEntry, err error) {
	u, nc, tlsConfig, err := dialURI(ctx, uri, opts)
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	done := watchContext(ctx, nc, u.Address())
	defer func() { err = done(err) }()

	n := &negotiator{ctx: ctx, nc: nc, server: u.Address(), tls: tlsConfig}
	if err := n.hello(); err != nil {
		return nil, err
	}
	if !n.fixed {
		return nil, fmt.Errorf("%s cannot list exports: it does not speak fixed-newstyle NBD", n.server)
	}
	if err := n.send(nbd.OptList, nil); err != nil {
		return nil, err
	}
	var out []nbd.ServerEntry
	kept := 0 // bytes of names and descriptions in out
	for {
		t, data, err := n.recv(nbd.OptList)
		if err != nil {
			return nil, err
		}
		switch {
		case t == nbd.RepServer:
			if len(out) >= maxListEntries {
				return nil, protocolErrorf("%s listed more than %d exports", n.server, maxListEntries)
			}
			var e nbd.ServerEntry
			if err := e.UnmarshalBinary(data); err != nil {
				return nil, protocolErrorf("%s: %v", n.server, err)
			}
			e.Description = sanitize([]byte(e.Description))
			if kept += len(e.Name) + len(e.Description); kept > maxListBytes {
				return nil, protocolErrorf("%s listed more than %d MiB of export names and descriptions (after %d exports); ask it about one export with Info instead",
					n.server, maxListBytes>>20, len(out))
			}
			out = append(out, e)
		case t == nbd.RepAck:
			n.abort()
			return out, nil
		case t.IsError():
			return nil, n.abortWith(n.optionError(nbd.OptList, t, data))
		default:
			return nil, protocolErrorf("%s answered NBD_OPT_LIST with %v", n.server, t)
		}
	}
}

// Info asks the server at uri about the export named in uri without entering
// transmission (NBD_OPT_INFO), and lists the metadata contexts it offers
// (NBD_OPT_LIST_META_CONTEXT). Servers without NBD_OPT_INFO are asked with
// NBD_OPT_EXPORT_NAME and then disconnected. opts may be nil; only its TLS
// is used.
func Info(ctx context.Context, uri string, opts *Options) (_ ExportInfo, err error) {
	u, nc, tlsConfig, err := dialURI(ctx, uri, opts)
	if err != nil {
		return ExportInfo{}, err
	}
	defer nc.Close()
	done := watchContext(ctx, nc, u.Address())
	defer func() { err = done(err) }()

	n := &negotiator{ctx: ctx, nc: nc, server: u.Address(), export: u.Export, tls: tlsConfig}
	info, err := n.info()
	info.TLS = tlsConfig != nil
	return info, err
}

func (n *negotiator) info() (ExportInfo, error) {
	if err := n.hello(); err != nil {
		return ExportInfo{}, err
	}
	if !n.fixed {
		info, err := n.exportName()
		if err == nil {
			n.disconnect()
		}
		return info, err
	}
	structured, err := n.structuredReply()
	if err != nil {
		return ExportInfo{}, n.abortWith(err)
	}
	info, err := n.infoGo(nbd.OptInfo)
	var oe *OptionError
	fallback := errors.As(err, &oe) && oe.Reply == nbd.RepErrUnsup
	if err != nil && !fallback {
		return ExportInfo{}, n.abortWith(err)
	}
	var metas []nbd.MetaContext
	if structured {
		metas, err = n.metaContexts(nbd.OptListMetaContext, nil)
		if fatalOptionError(err) {
			return ExportInfo{}, n.abortWith(err)
		}
	}
	if fallback {
		if info, err = n.exportName(); err != nil {
			return ExportInfo{}, err
		}
		n.disconnect()
	} else {
		n.abort()
	}
	info.StructuredReplies = structured
	info.MetaContexts = metas
	return info, nil
}

// dialURI parses uri and connects to it. The TLS configuration it returns
// is nil for a plain-text URI.
func dialURI(ctx context.Context, uri string, opts *Options) (URI, net.Conn, *tls.Config, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return URI{}, nil, nil, err
	}
	tlsConfig, err := tlsConfigFor(u, opts)
	if err != nil {
		return URI{}, nil, nil, err
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, u.Network(), u.Address())
	if err != nil {
		if ctx.Err() != nil {
			return URI{}, nil, nil, fmt.Errorf("connecting to %s: %w", u.Address(), ctx.Err())
		}
		return URI{}, nil, nil, &DialError{Addr: u.Address(), Err: err}
	}
	return u, nc, tlsConfig, nil
}

// watchContext makes ctx's deadline and cancellation interrupt I/O on nc. The
// returned function stops watching, clears the deadline and turns an error
// caused by ctx into ctx's error.
func watchContext(ctx context.Context, nc net.Conn, server string) func(error) error {
	if d, ok := ctx.Deadline(); ok {
		nc.SetDeadline(d)
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		nc.SetDeadline(aLongTimeAgo)
		close(fired)
	})
	return func(err error) error {
		if !stop() {
			<-fired
		}
		nc.SetDeadline(time.Time{})
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("handshake with %s: %w", server, ctx.Err())
		}
		if _, ok := ctx.Deadline(); ok && errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("handshake with %s: %w", server, context.DeadlineExceeded)
		}
		return err
	}
}

// fatalOptionError reports whether err from an optional option means the
// handshake cannot go on (anything but a refusal of that one option).
func fatalOptionError(err error) bool {
	var oe *OptionError
	if !errors.As(err, &oe) {
		return err != nil
	}
	return oe.Reply == nbd.RepErrShutdown || oe.Reply == nbd.RepErrTLSReqd
}

func peerName(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return "the server"
}

// negotiator speaks the client side of the option haggling. It reads the
// socket unbuffered so nothing past the handshake is consumed.
type negotiator struct {
	ctx      context.Context // the handshake's: an abort after it ended waits for nothing
	nc       net.Conn        // the socket, or the TLS session over it once started
	server   string
	export   string
	tls      *tls.Config // start TLS after the greeting; nil: plain text
	fixed    bool
	noZeroes bool
	// answered is set by the first reply read over TLS: until then, a
	// server that hangs up may be refusing the client's certificate.
	tlsStarted, answered bool
}

// hello reads the server's greeting, answers with the client flags, and
// starts TLS if the URI asks for it.
func (n *negotiator) hello() error {
	var b [nbd.ServerHelloSize]byte
	if _, err := io.ReadFull(n.nc, b[:]); err != nil {
		return n.readError("greeting", err)
	}
	var h nbd.ServerHello
	if err := h.UnmarshalBinary(b[:]); err != nil {
		return fmt.Errorf("%s is not a newstyle NBD server: %w: %w", n.server, ErrProtocol, err)
	}
	n.fixed = h.Flags&nbd.FlagFixedNewstyle != 0
	n.noZeroes = h.Flags&nbd.FlagNoZeroes != 0
	var flags nbd.ClientFlags
	if n.fixed {
		flags |= nbd.ClientFlagFixedNewstyle
	}
	if n.noZeroes {
		flags |= nbd.ClientFlagNoZeroes
	}
	// The codec has no type for the 4-byte client flags.
	if _, err := n.nc.Write(binary.BigEndian.AppendUint32(nil, uint32(flags))); err != nil {
		return fmt.Errorf("sending client flags to %s: %w", n.server, err)
	}
	if n.tls != nil {
		return n.startTLS()
	}
	return nil
}

func (n *negotiator) send(opt nbd.Option, data []byte) error {
	b, _ := nbd.OptionHeader{Option: opt, Length: uint32(len(data))}.AppendBinary(make([]byte, 0, nbd.OptionHeaderSize+len(data)))
	if _, err := n.nc.Write(append(b, data...)); err != nil {
		return n.noCertificateHint(fmt.Errorf("sending %v to %s: %w", opt, n.server, err), false)
	}
	return nil
}

// recv reads one reply to opt, refusing replies to other options and data
// over nbd.MaxOptionReplyLength before reading it.
func (n *negotiator) recv(opt nbd.Option) (nbd.OptionReplyType, []byte, error) {
	var b [nbd.OptionReplyHeaderSize]byte
	if _, err := io.ReadFull(n.nc, b[:]); err != nil {
		return 0, nil, n.readError(fmt.Sprintf("reply to %v", opt), err)
	}
	var h nbd.OptionReplyHeader
	if err := h.UnmarshalBinary(b[:]); err != nil {
		return 0, nil, fmt.Errorf("%s: %w: %w", n.server, ErrProtocol, err)
	}
	if h.Option != opt {
		return 0, nil, protocolErrorf("%s sent a reply to %v while %v was pending", n.server, h.Option, opt)
	}
	if h.Length > nbd.MaxOptionReplyLength {
		return 0, nil, protocolErrorf("%s sent a %v reply of %d bytes, over the %d-byte limit", n.server, h.Type, h.Length, nbd.MaxOptionReplyLength)
	}
	data := make([]byte, h.Length)
	if _, err := io.ReadFull(n.nc, data); err != nil {
		return 0, nil, n.readError(fmt.Sprintf("reply to %v", opt), err)
	}
	n.answered = n.tlsStarted
	return h.Type, data, nil
}

func (n *negotiator) readError(what string, err error) error {
	hungUp := errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
	if hungUp {
		err = fmt.Errorf("reading %s from %s: %w: the server closed the connection", what, n.server, ErrClosed)
	} else {
		err = fmt.Errorf("reading %s from %s: %w", what, n.server, err)
	}
	return n.noCertificateHint(err, hungUp)
}

// noCertificateHint adds ErrTLSNoClientCertificate to err if the server
// ended the connection as soon as TLS started (hungUp, a reset seen on a
// read or a write, or a TLS alert: TLS 1.3 tells a client it lacks a
// certificate only then), and the client gave no certificate.
func (n *negotiator) noCertificateHint(err error, hungUp bool) error {
	var op *net.OpError
	alert := errors.As(err, &op) && op.Op == "remote error" // crypto/tls's mark of a peer's alert
	if n.tlsStarted && !n.answered && len(n.tls.Certificates) == 0 && n.tls.GetClientCertificate == nil &&
		(hungUp || alert || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)) {
		return fmt.Errorf("%w (%w)", err, ErrTLSNoClientCertificate)
	}
	return err
}

func (n *negotiator) optionError(opt nbd.Option, t nbd.OptionReplyType, data []byte) error {
	return &OptionError{Option: opt, Reply: t, Export: n.export, Server: n.server, Message: sanitize(data)}
}

// structuredReply asks for structured replies and reports whether the server
// agreed.
func (n *negotiator) structuredReply() (bool, error) {
	if err := n.send(nbd.OptStructuredReply, nil); err != nil {
		return false, err
	}
	t, data, err := n.recv(nbd.OptStructuredReply)
	switch {
	case err != nil:
		return false, err
	case t == nbd.RepAck:
		return true, nil
	case t.IsError():
		err := n.optionError(nbd.OptStructuredReply, t, data)
		if fatalOptionError(err) {
			return false, err
		}
		return false, nil
	}
	return false, protocolErrorf("%s answered NBD_OPT_STRUCTURED_REPLY with %v", n.server, t)
}

// metaContexts sends NBD_OPT_SET_META_CONTEXT or NBD_OPT_LIST_META_CONTEXT
// and collects the contexts returned.
func (n *negotiator) metaContexts(opt nbd.Option, queries []string) ([]nbd.MetaContext, error) {
	data, err := nbd.MetaContextRequest{Export: n.export, Queries: queries}.AppendBinary(nil)
	if err != nil {
		return nil, err
	}
	if err := n.send(opt, data); err != nil {
		return nil, err
	}
	var out []nbd.MetaContext
	for {
		t, data, err := n.recv(opt)
		if err != nil {
			return nil, err
		}
		switch {
		case t == nbd.RepMetaContext:
			if len(out) >= maxOptionReplies {
				return nil, protocolErrorf("%s sent more than %d metadata contexts", n.server, maxOptionReplies)
			}
			var m nbd.MetaContext
			if err := m.UnmarshalBinary(data); err != nil {
				return nil, fmt.Errorf("%s: %w: %w", n.server, ErrProtocol, err)
			}
			out = append(out, m)
		case t == nbd.RepAck:
			return out, nil
		case t.IsError():
			return nil, n.optionError(opt, t, data)
		default:
			return nil, protocolErrorf("%s answered %v with %v", n.server, opt, t)
		}
	}
}

// infoGo sends NBD_OPT_INFO or NBD_OPT_GO asking for block sizes, the
// canonical name and the description, and collects the answer.
func (n *negotiator) infoGo(opt nbd.Option) (ExportInfo, error) {
	data, err := nbd.InfoRequest{Name: n.export,
		Requests: []nbd.InfoType{nbd.InfoBlockSize, nbd.InfoName, nbd.InfoDescription}}.AppendBinary(nil)
	if err != nil {
		return ExportInfo{}, err
	}
	if err := n.send(opt, data); err != nil {
		return ExportInfo{}, err
	}
	info := ExportInfo{Name: n.export, BlockSizes: DefaultBlockSizes}
	gotExport := false
	for replies := 0; ; replies++ {
		t, data, err := n.recv(opt)
		if err != nil {
			return ExportInfo{}, err
		}
		switch {
		case t == nbd.RepInfo:
			if replies >= maxOptionReplies {
				return ExportInfo{}, protocolErrorf("%s sent more than %d NBD_REP_INFO replies", n.server, maxOptionReplies)
			}
			var it nbd.Info
			if err := it.UnmarshalBinary(data); err != nil {
				return ExportInfo{}, fmt.Errorf("%s: %w: %w", n.server, ErrProtocol, err)
			}
			switch it.Type {
			case nbd.InfoExport:
				info.Size, info.Flags, gotExport = it.Size, it.Flags, true
			case nbd.InfoName:
				info.Name = it.Text
			case nbd.InfoDescription:
				info.Description = sanitize([]byte(it.Text))
			case nbd.InfoBlockSize:
				bs := BlockSizes{Minimum: it.MinBlockSize, Preferred: it.PrefBlockSize, MaxPayload: it.MaxPayloadSize}
				if err := bs.validate(); err != nil {
					return ExportInfo{}, protocolErrorf("%s: %v", n.server, err)
				}
				info.BlockSizes, info.BlockSizesAdvertised = bs, true
			}
		case t == nbd.RepAck:
			if !gotExport {
				return ExportInfo{}, protocolErrorf("%s accepted %v without sending NBD_INFO_EXPORT", n.server, opt)
			}
			return info, nil
		case t.IsError():
			return ExportInfo{}, n.optionError(opt, t, data)
		default:
			return ExportInfo{}, protocolErrorf("%s answered %v with %v", n.server, opt, t)
		}
	}
}

// exportName enters transmission with NBD_OPT_EXPORT_NAME, for servers that
// know no better. A server without the export can only hang up.
func (n *negotiator) exportName() (ExportInfo, error) {
	if err := n.send(nbd.OptExportName, []byte(n.export)); err != nil {
		return ExportInfo{}, err
	}
	b := make([]byte, nbd.ExportNameReplySize, nbd.ExportNameReplySize+nbd.ExportNameZeroPadding)
	if !n.noZeroes {
		b = b[:cap(b)]
	}
	if _, err := io.ReadFull(n.nc, b); err != nil {
		if errors.Is(err, io.EOF) {
			return ExportInfo{}, &OptionError{Option: nbd.OptExportName, Reply: nbd.RepErrUnknown, Export: n.export, Server: n.server,
				Message: "the server closed the connection after NBD_OPT_EXPORT_NAME, which cannot say why"}
		}
		return ExportInfo{}, n.readError("reply to NBD_OPT_EXPORT_NAME", err)
	}
	var r nbd.ExportNameReply
	if err := r.UnmarshalBinary(b[:nbd.ExportNameReplySize]); err != nil {
		return ExportInfo{}, fmt.Errorf("%s: %w: %w", n.server, ErrProtocol, err)
	}
	return ExportInfo{Name: n.export, Size: r.Size, Flags: r.Flags, BlockSizes: DefaultBlockSizes}, nil
}

// abort ends the handshake softly (NBD_OPT_ABORT), waiting briefly for the
// server's acknowledgement so it need not write to a closed socket, and
// then ends TLS, as the spec wants. Once the handshake's context has ended
// there is nothing to wait for: the caller gave up.
func (n *negotiator) abort() {
	if !n.fixed || n.ctx.Err() != nil || n.send(nbd.OptAbort, nil) != nil {
		return
	}
	wait := time.Now().Add(abortReplyWait)
	if d, ok := n.ctx.Deadline(); ok && d.Before(wait) {
		wait = d
	}
	n.nc.SetReadDeadline(wait)
	n.recv(nbd.OptAbort)
	n.endTLS()
}

// endTLS sends TLS's close_notify, if TLS was started, once nothing more
// will be sent. crypto/tls bounds the write.
func (n *negotiator) endTLS() {
	if tc, ok := n.nc.(*tls.Conn); ok {
		tc.CloseWrite()
	}
}

// abortWith aborts after an option error and returns err.
func (n *negotiator) abortWith(err error) error {
	var oe *OptionError
	if errors.As(err, &oe) {
		n.abort()
	}
	return err
}

// disconnect ends a transmission phase entered only to learn about the
// export (NBD_CMD_DISC).
func (n *negotiator) disconnect() {
	b, _ := nbd.RequestHeader{Command: nbd.CmdDisc}.AppendBinary(nil)
	if _, err := n.nc.Write(b); err == nil {
		n.endTLS()
	}
}

// validate checks the constraints the spec puts on NBD_INFO_BLOCK_SIZE,
// leniently where a server's mistake cannot hurt us.
func (b BlockSizes) validate() error {
	pow2 := func(x uint32) bool { return x != 0 && x&(x-1) == 0 }
	switch {
	case !pow2(b.Minimum) || b.Minimum > 64<<10:
		return fmt.Errorf("minimum block size %d is not a power of two up to 64 KiB", b.Minimum)
	case !pow2(b.Preferred) || b.Preferred < b.Minimum:
		return fmt.Errorf("preferred block size %d is not a power of two at least the minimum %d", b.Preferred, b.Minimum)
	case b.MaxPayload < b.Minimum:
		return fmt.Errorf("maximum payload %d is below the minimum block size %d", b.MaxPayload, b.Minimum)
	}
	return nil
}
