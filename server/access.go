package server

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
)

// TLSMode says whether an export needs TLS.
type TLSMode int

// TLS modes of an export.
const (
	// TLSOptional serves clients with or without TLS. It is the zero value:
	// with no TLS configured on the server it simply means "no TLS".
	TLSOptional TLSMode = iota
	// TLSRequired hides the export from clients that did not start TLS.
	TLSRequired
	// TLSOff serves the export in plain text only: it is not offered after
	// STARTTLS.
	TLSOff
)

// ParseTLSMode parses off, optional or required.
func ParseTLSMode(s string) (TLSMode, error) {
	switch s {
	case "optional", "":
		return TLSOptional, nil
	case "required":
		return TLSRequired, nil
	case "off":
		return TLSOff, nil
	}
	return 0, fmt.Errorf("TLS mode %q: want off, optional or required", s)
}

func (m TLSMode) String() string {
	return [...]string{"optional", "required", "off"}[m]
}

// Access is who may use an export.
type Access struct {
	TLS TLSMode
	// Allow lists client addresses; empty allows every address. Clients on
	// Unix sockets are local and pass this check.
	Allow []netip.Prefix
	// AllowNames lists client certificate names (CN or DNS SAN); empty
	// allows any client. A non-empty list needs TLS with client
	// certificates verified against the server's CA.
	AllowNames []string
}

// ParseAllow parses addresses and CIDRs such as 192.0.2.7 or 10.0.0.0/24.
// They are matched as peers' addresses are seen: an IPv4-mapped IPv6 form
// (::ffff:10.0.1.21, ::ffff:10.0.0.0/104) is its IPv4 address or CIDR, and
// a zone (fe80::1%eth0) is dropped, since peers' addresses are compared
// without theirs (see peerOf).
func ParseAllow(list []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range list {
		p, err := parsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("allow %q: %w", s, err)
		}
		out = append(out, p)
	}
	return out, nil
}

var errNotAnAddress = errors.New("not an address or CIDR (e.g. 192.0.2.7, 10.0.0.0/24, fd00::/64)")

// parsePrefix parses an address or a CIDR into the prefix peers' addresses
// are matched against.
func parsePrefix(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		a := p.Addr()
		if a.Is4In6() {
			// Peers' addresses are unmapped: so must the prefix be.
			if p.Bits() < 96 {
				return netip.Prefix{}, errors.New("an IPv4-mapped prefix shorter than /96: write the IPv4 and IPv6 ranges apart")
			}
			return netip.PrefixFrom(a.Unmap(), p.Bits()-96).Masked(), nil
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, errNotAnAddress
	}
	a = a.Unmap().WithZone("")
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// peer is who is on the other end of a connection, as far as access
// control and fencing care.
type peer struct {
	addr  netip.Addr // invalid for Unix sockets
	tls   bool
	names []string // verified client certificate names
}

// peerOf is who nc's other end is. Its address is unmapped and has no zone:
// netip.Prefix.Contains is false for any address with a zone, so a
// link-local client (fe80::5%eth1) would match no allow rule or fence.
// Rules are written without zones (ParseAllow drops them), so a rule on a
// link-local address matches it on every interface.
func peerOf(nc net.Conn) peer {
	if ap, err := netip.ParseAddrPort(nc.RemoteAddr().String()); err == nil {
		return peer{addr: ap.Addr().Unmap().WithZone("")}
	}
	return peer{}
}

// certNames are the names a verified client certificate proves.
func certNames(cert *x509.Certificate) []string {
	names := slices.Clone(cert.DNSNames)
	if cert.Subject.CommonName != "" {
		names = append(names, cert.Subject.CommonName)
	}
	return names
}

func (p peer) String() string {
	var s string
	if p.addr.IsValid() {
		s = p.addr.String()
	} else {
		s = "a local Unix socket client"
	}
	if len(p.names) > 0 {
		s += " (certificate " + strings.Join(p.names, ", ") + ")"
	}
	return s
}

// check returns why p may not use the export, or "" if it may. tlsReqd
// says the refusal is for lack of TLS.
func (a *Access) check(p peer) (why string, tlsReqd bool) {
	switch {
	case a.TLS == TLSRequired && !p.tls:
		return "this export requires TLS: connect with nbds://", true
	case a.TLS == TLSOff && p.tls:
		return "this export is not offered over TLS", false
	}
	if len(a.Allow) > 0 && p.addr.IsValid() &&
		!slices.ContainsFunc(a.Allow, func(pr netip.Prefix) bool { return pr.Contains(p.addr) }) {
		return fmt.Sprintf("access denied for %s", p), false
	}
	if len(a.AllowNames) > 0 && !slices.ContainsFunc(p.names, func(n string) bool { return slices.Contains(a.AllowNames, n) }) {
		if !p.tls && a.TLS != TLSOff {
			// Only TLS can bring a certificate: in the spec's terms the
			// export is TLS-only, and NBD_REP_ERR_TLS_REQD is what tells
			// a client to start TLS and try again. (With TLS off no
			// client can ever use it: that stays a refusal.)
			return "this export requires TLS with a client certificate of an allowed name: connect with nbds://", true
		}
		return fmt.Sprintf("access denied for %s: a client certificate with an allowed name is required", p), false
	}
	return "", false
}
