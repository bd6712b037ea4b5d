package client

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/lvnbd/lvnbd/nbd"
)

// URI schemes of NetworkBlockDevice/nbd doc/uri.md.
const (
	SchemeNBD      = "nbd"
	SchemeNBDS     = "nbds"
	SchemeNBDUnix  = "nbd+unix"
	SchemeNBDSUnix = "nbds+unix"
)

// URI is a parsed NBD URI: nbd://host[:port]/export or
// nbd+unix:///export?socket=/path, and their TLS forms nbds:// and nbds+unix://.
type URI struct {
	Scheme string // one of the Scheme constants
	User   string // userinfo, used only for TLS authentication
	Host   string // host name or IP address, without IPv6 brackets; TCP only
	Port   int    // TCP only; nbd.DefaultPort when the URI has none
	Socket string // Unix socket path; a leading NUL names an abstract socket
	Export string // the export name: the decoded path without its leading "/"

	// TLS parameters of doc/uri.md, for nbds:// and nbds+unix://: tls-type
	// ("" or "x509": lvnbd speaks no other), tls-hostname (the name the
	// server's certificate must carry; default the URI's host) and
	// tls-verify-peer ("0" skips verifying the server).
	TLSType       string
	TLSHostname   string
	TLSVerifyPeer string
	// TLSCertificates is libnbd's tls-certificates parameter: a directory
	// in GnuTLS's layout (ca-cert.pem; client-cert.pem and client-key.pem
	// for a client certificate), so a URI written for nbdinfo or qemu
	// works here too.
	TLSCertificates string
}

// ErrBadURI is wrapped by every error ParseURI returns.
var ErrBadURI = errors.New("invalid NBD URI")

// ParseURI parses an NBD URI as specified by doc/uri.md: the path (minus its
// leading "/") is the percent-decoded export name, the port defaults to 10809,
// IPv6 literals are bracketed, and the Unix schemes take the socket from the
// socket query parameter. Query parameters it does not know are refused.
func ParseURI(s string) (URI, error) {
	bad := func(format string, args ...any) (URI, error) {
		return URI{}, fmt.Errorf("%w %q: %s", ErrBadURI, s, fmt.Sprintf(format, args...))
	}
	u, err := url.Parse(s)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return bad("%v", err)
	}
	var out URI
	switch u.Scheme {
	case SchemeNBD, SchemeNBDS, SchemeNBDUnix, SchemeNBDSUnix:
		out.Scheme = u.Scheme
	case "":
		return bad("no scheme: want nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
	default:
		return bad("unknown scheme %q: want nbd, nbds, nbd+unix or nbds+unix", u.Scheme)
	}
	if u.Opaque != "" {
		return bad("want %s://…, not %s:…", u.Scheme, u.Scheme)
	}
	if u.Fragment != "" || strings.HasSuffix(s, "#") {
		return bad("an NBD URI has no #fragment")
	}
	if u.User != nil {
		out.User = u.User.Username()
		if _, set := u.User.Password(); set {
			return bad("passwords do not belong in NBD URIs")
		}
	}

	// Export name: the decoded path after its leading slash.
	if u.Path != "" && !strings.HasPrefix(u.Path, "/") {
		return bad("the export must follow a slash")
	}
	out.Export = strings.TrimPrefix(u.Path, "/")
	if strings.IndexByte(out.Export, 0) >= 0 {
		return bad("export names cannot contain NUL")
	}
	if len(out.Export) > nbd.MaxStringLength {
		return bad("export name of %d bytes is over the protocol's %d", len(out.Export), nbd.MaxStringLength)
	}

	q, err := parseQuery(u.RawQuery)
	if err != nil {
		return bad("query: %v", err)
	}
	for _, p := range q {
		if len(p.values) != 1 {
			return bad("query parameter %q given %d times", p.key, len(p.values))
		}
		v := p.values[0]
		switch p.key {
		case "socket":
			out.Socket = v
		case "tls-type":
			out.TLSType = v
		case "tls-hostname":
			out.TLSHostname = v
		case "tls-verify-peer":
			if v != "0" && v != "1" {
				return bad("tls-verify-peer must be 0 or 1")
			}
			out.TLSVerifyPeer = v
		case "tls-certificates":
			out.TLSCertificates = v
		default:
			return bad("unknown query parameter %q", p.key)
		}
	}

	if out.IsUnix() {
		if u.Host != "" || u.User != nil {
			return bad("a Unix-socket URI has no host: write %s:///EXPORT?socket=PATH", u.Scheme)
		}
		if out.Socket == "" {
			return bad("%s needs ?socket=PATH", u.Scheme)
		}
		return out, nil
	}
	if slices.ContainsFunc(q, func(p queryParam) bool { return p.key == "socket" }) {
		return bad("socket= is only for nbd+unix and nbds+unix")
	}
	out.Host = u.Hostname()
	if out.Host == "" {
		return bad("no host: want %s://HOST[:PORT]/EXPORT", u.Scheme)
	}
	if strings.HasPrefix(u.Host, "[") != strings.Contains(out.Host, ":") {
		return bad("IPv6 addresses go in brackets, e.g. nbd://[::1]/export")
	}
	// A zone names a network interface (fe80::1%eth0). Go's url.Parse takes
	// raw non-ASCII bytes there but refuses them percent-encoded, which is
	// how String must print them, so such a URI could not be printed back.
	if _, zone, ok := strings.Cut(out.Host, "%"); ok {
		for i := 0; i < len(zone); i++ {
			if zone[i] < 0x21 || zone[i] > 0x7e {
				return bad("IPv6 zone %q is not an interface name or number", zone)
			}
		}
	}
	out.Port = nbd.DefaultPort
	if p := u.Port(); p != "" {
		n, err := strconv.ParseUint(p, 10, 16)
		if err != nil || n == 0 {
			return bad("port %q is not a number from 1 to 65535", p)
		}
		out.Port = int(n)
	}
	return out, nil
}

// queryParam is one query parameter and every value it was given.
type queryParam struct {
	key    string
	values []string
}

// parseQuery splits a raw query into its parameters, in the order they first
// appear. It reads the query as RFC 3986 does, which doc/uri.md defers to
// (and libnbd and qemu follow), not as an HTML form: a "+" is a plus, not a
// space, and ";" is an ordinary character, not a separator to refuse. Empty
// parameters ("a=1&&b=2") are skipped; one without "=" has the value "".
func parseQuery(raw string) ([]queryParam, error) {
	var out []queryParam
	index := map[string]int{} // key → its place in out
	for part := range strings.SplitSeq(raw, "&") {
		if part == "" {
			continue
		}
		rawKey, rawValue, _ := strings.Cut(part, "=")
		key, err := url.PathUnescape(rawKey)
		if err != nil {
			return nil, err
		}
		value, err := url.PathUnescape(rawValue)
		if err != nil {
			return nil, err
		}
		i, ok := index[key]
		if !ok {
			i = len(out)
			index[key] = i
			out = append(out, queryParam{key: key})
		}
		out[i].values = append(out[i].values, value)
	}
	return out, nil
}

// escapeQueryValue percent-encodes v for a query value that parseQuery
// reads back. It writes what earlier versions wrote (url.QueryEscape, with
// "/" left literal as RFC 3986 3.4 allows, which keeps socket paths
// readable), because the string is also a device's backend identifier in
// the kernel, which a daemon restarted on a newer lvnbd must find again; but
// a space becomes %20, not "+", which parseQuery (and libnbd, and qemu)
// read as a plus. QueryEscape writes a "+" itself as %2B, so every "+" it
// writes was a space.
func escapeQueryValue(v string) string {
	return strings.ReplaceAll(strings.ReplaceAll(url.QueryEscape(v), "%2F", "/"), "+", "%20")
}

// IsTLS reports whether the URI requires TLS (nbds, nbds+unix).
func (u URI) IsTLS() bool { return u.Scheme == SchemeNBDS || u.Scheme == SchemeNBDSUnix }

// IsUnix reports whether the URI names a Unix socket.
func (u URI) IsUnix() bool { return u.Scheme == SchemeNBDUnix || u.Scheme == SchemeNBDSUnix }

// Network is the net.Dial network: "tcp" or "unix".
func (u URI) Network() string {
	if u.IsUnix() {
		return "unix"
	}
	return "tcp"
}

// Address is the net.Dial address: host:port, or the socket path (an abstract
// socket's leading NUL becomes Go's "@").
func (u URI) Address() string {
	if u.IsUnix() {
		if rest, ok := strings.CutPrefix(u.Socket, "\x00"); ok {
			return "@" + rest
		}
		return u.Socket
	}
	return net.JoinHostPort(u.Host, strconv.Itoa(u.Port))
}

// Server names the server u dials, so that two URIs on one server compare
// equal (a pair's legs must not): for TCP the host, lower-cased and without a
// trailing dot (an IP address in its canonical form), and the port; for a
// Unix socket its cleaned path. Host names are not resolved, so two names of
// one machine still differ.
func (u URI) Server() string {
	if u.IsUnix() {
		if strings.HasPrefix(u.Socket, "\x00") {
			return "unix:" + u.Socket // abstract: no file system path to clean
		}
		return "unix:" + filepath.Clean(u.Socket)
	}
	host := strings.TrimSuffix(strings.ToLower(u.Host), ".")
	if ip, err := netip.ParseAddr(host); err == nil {
		host = ip.Unmap().String()
	}
	return net.JoinHostPort(host, strconv.Itoa(u.Port))
}

// ExportKey names the export a URI reaches, so that two spellings of one
// export compare equal (see URI.ExportKey). It is comparable, for map keys.
type ExportKey struct {
	Network string // "tcp" or "unix"
	Server  string // as URI.Server
	Export  string // the export name; "" is the server's default export
}

// ExportKey is what the checks that no export is used twice compare: the
// server as Server normalises it (host lower-cased, one trailing dot removed,
// the port always there, an IP address in its canonical form; a socket's
// path cleaned) and the export name, decoded. The scheme's TLS, the user and
// the TLS parameters are left out: they change how the export is reached,
// not which export it is. A device's backend identifier stays String, byte
// for byte: the kernel and earlier versions know devices by it.
func (u URI) ExportKey() ExportKey {
	return ExportKey{Network: u.Network(), Server: u.Server(), Export: u.Export}
}

// SameExport reports whether u and v name one export, however spelt (see
// ExportKey).
func (u URI) SameExport(v URI) bool { return u.ExportKey() == v.ExportKey() }

// String formats the URI so that ParseURI gives it back.
func (u URI) String() string {
	out := url.URL{Scheme: u.Scheme, Path: "/" + u.Export}
	if !u.IsUnix() {
		out.Host = net.JoinHostPort(u.Host, strconv.Itoa(u.Port))
		if u.User != "" {
			out.User = url.User(u.User)
		}
	}
	// Parameters in a fixed order, so equal URIs print alike.
	var q []string
	add := func(k, v string) {
		if v != "" || (k == "socket" && u.IsUnix()) {
			q = append(q, k+"="+escapeQueryValue(v))
		}
	}
	add("socket", u.Socket)
	add("tls-type", u.TLSType)
	add("tls-hostname", u.TLSHostname)
	add("tls-verify-peer", u.TLSVerifyPeer)
	add("tls-certificates", u.TLSCertificates)
	out.RawQuery = strings.Join(q, "&")
	return out.String()
}
