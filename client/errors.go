package client

import (
	"errors"
	"fmt"
	"strings"
	"syscall"
	"unicode"

	"github.com/lvnbd/lvnbd/nbd"
)

// Sentinel errors; the errors this package returns wrap them.
var (
	// ErrTLSNotSupported is returned for TLS lvnbd cannot speak: an
	// nbds:// URI for the kernel, a tls-type other than x509.
	ErrTLSNotSupported = errors.New("TLS is not supported here")
	// ErrTLSRequired means the server serves the export only over TLS
	// (NBD_REP_ERR_TLS_REQD): an nbds:// URI reaches it.
	ErrTLSRequired = errors.New("the server requires TLS")
	// ErrTLSRefused means the server would not start TLS for an nbds://
	// URI (it has none configured, or no NBD_OPT_STARTTLS at all).
	ErrTLSRefused = errors.New("the server does not offer TLS")
	// ErrTLSNoClientCertificate is wrapped, beside the error itself, when a
	// server ends the connection right after TLS started and the client
	// gave no certificate: GnuTLS servers (nbdkit --tls-verify-peer,
	// qemu-nbd) refuse a client without one so, with no word of why, and
	// TLS 1.3 servers with an alert only then.
	ErrTLSNoClientCertificate = errors.New("the server ended the connection as soon as TLS started, and no client certificate was given: it may want one")
	// ErrProtocol means the server broke the NBD protocol; the connection
	// is closed and every request pending on it fails with this error.
	ErrProtocol = errors.New("NBD protocol violation by the server")
	// ErrClosed is returned by requests on a connection that has been
	// closed, by Close or by the server.
	ErrClosed = errors.New("NBD connection closed")
	// ErrUnsupported is returned for a request the export does not
	// advertise (trim without NBD_FLAG_SEND_TRIM, say); nothing is sent.
	ErrUnsupported = errors.New("not supported by this export")
	// ErrExportNotFound means the server has no export of the requested name.
	ErrExportNotFound = errors.New("export not found")
)

// DialError reports that the server could not be reached at all.
type DialError struct {
	Addr string // host:port or socket path
	Err  error
}

func (e *DialError) Error() string {
	// "connection refused" reads better than Go's "dial tcp 127.0.0.1:10809:
	// connect: connection refused" when the address is already in front.
	var errno syscall.Errno
	if errors.As(e.Err, &errno) {
		return fmt.Sprintf("cannot connect to %s: %v", e.Addr, errno)
	}
	return fmt.Sprintf("cannot connect to %s: %v", e.Addr, e.Err)
}

// Unwrap returns the underlying error (a syscall.Errno such as ECONNREFUSED
// for errors.Is).
func (e *DialError) Unwrap() error { return e.Err }

// OptionError is a server's error reply to a handshake option, carrying the
// server's message for the user.
type OptionError struct {
	Option  nbd.Option
	Reply   nbd.OptionReplyType
	Export  string
	Server  string // address the server was reached at
	Message string // the server's text, possibly empty
}

func (e *OptionError) Error() string {
	var s string
	switch {
	case e.Option == nbd.OptStartTLS && e.Reply != nbd.RepErrShutdown:
		s = fmt.Sprintf("%s refused to start TLS (%v answered with %v)", e.Server, e.Option, e.Reply)
	case e.Reply == nbd.RepErrUnknown:
		s = fmt.Sprintf("export %q not found on %s", e.Export, e.Server)
	case e.Reply == nbd.RepErrTLSReqd && e.Export == "" && e.Option == nbd.OptList:
		s = fmt.Sprintf("%s lists its exports only over TLS: use an nbds:// URI", e.Server)
	case e.Reply == nbd.RepErrTLSReqd:
		s = fmt.Sprintf("%s requires TLS for export %q: use an nbds:// URI", e.Server, e.Export)
	case e.Reply == nbd.RepErrUnsup:
		s = fmt.Sprintf("%s does not support %v", e.Server, e.Option)
	case e.Reply == nbd.RepErrPolicy:
		s = fmt.Sprintf("%s refused %v for export %q by policy", e.Server, e.Option, e.Export)
	case e.Reply == nbd.RepErrShutdown:
		s = fmt.Sprintf("%s is shutting down", e.Server)
	default:
		s = fmt.Sprintf("%s answered %v for export %q with %v", e.Server, e.Option, e.Export, e.Reply)
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Unwrap lets errors.Is see ErrExportNotFound, ErrTLSRequired and
// ErrTLSRefused.
func (e *OptionError) Unwrap() error {
	switch {
	case e.Option == nbd.OptStartTLS && e.Reply != nbd.RepErrShutdown:
		return ErrTLSRefused
	case e.Reply == nbd.RepErrUnknown:
		return ErrExportNotFound
	case e.Reply == nbd.RepErrTLSReqd:
		return ErrTLSRequired
	}
	return nil
}

// RequestError is a server's error reply to a transmission request, or a
// request refused locally before sending. errors.As(err, &errno) with an
// nbd.Errno, or errors.Is(err, nbd.ENOSPC), tells the error values apart.
type RequestError struct {
	Command nbd.Command
	Offset  uint64
	Length  uint64
	Errno   nbd.Errno // one of the protocol's values; unknown ones become EINVAL
	Message string    // the server's text (structured replies only), or why it was refused
	// ErrorOffset is where the error happened, when the server said so
	// (NBD_REPLY_TYPE_ERROR_OFFSET).
	ErrorOffset    uint64
	HasErrorOffset bool
}

func (e *RequestError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%v", e.Command)
	if e.Command != nbd.CmdFlush {
		fmt.Fprintf(&b, " of %d bytes at offset %d", e.Length, e.Offset)
	}
	b.WriteString(": " + e.Errno.String())
	if e.HasErrorOffset {
		fmt.Fprintf(&b, " at offset %d", e.ErrorOffset)
	}
	if e.Message != "" {
		b.WriteString(": " + e.Message)
	}
	return b.String()
}

// Unwrap returns the nbd.Errno.
func (e *RequestError) Unwrap() error { return e.Errno }

var knownErrnos = map[nbd.Errno]bool{
	nbd.EPERM: true, nbd.EIO: true, nbd.ENOMEM: true, nbd.EINVAL: true, nbd.ENOSPC: true,
	nbd.EOVERFLOW: true, nbd.ENOTSUP: true, nbd.ESHUTDOWN: true,
}

// newRequestError builds the error for a request answered with errno. The
// spec says to treat unknown values as EINVAL.
func newRequestError(req requestRange, errno nbd.Errno, msg string) *RequestError {
	if !knownErrnos[errno] {
		msg = strings.TrimSuffix(fmt.Sprintf("server error value %d; %s", uint32(errno), msg), "; ")
		errno = nbd.EINVAL
	}
	return &RequestError{Command: req.cmd, Offset: req.off, Length: req.length, Errno: errno, Message: msg}
}

// requestRange is what an error needs to know of a request.
type requestRange struct {
	cmd    nbd.Command
	off    uint64
	length uint64
}

// protocolErrorf returns an error wrapping ErrProtocol.
func protocolErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// sanitize makes a peer's message safe to print: valid UTF-8, no control
// characters, bounded.
func sanitize(b []byte) string {
	if len(b) > nbd.MaxStringLength {
		b = b[:nbd.MaxStringLength]
	}
	s := strings.ToValidUTF8(string(b), "\uFFFD")
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	return strings.TrimSpace(s)
}
