package server

import (
	"net"
	"net/netip"
	"testing"
)

func TestParseAllow(t *testing.T) {
	tests := []struct {
		in      string
		want    string
		wantErr bool
	}{
		{in: "192.0.2.7", want: "192.0.2.7/32"},
		{in: "10.0.0.7/24", want: "10.0.0.0/24"},
		{in: "fd00::/64", want: "fd00::/64"},
		{in: "::ffff:10.0.1.21", want: "10.0.1.21/32"},
		{in: "::ffff:10.0.1.21/128", want: "10.0.1.21/32"},
		{in: "::ffff:10.0.0.0/104", want: "10.0.0.0/8"},
		{in: "fe80::1%eth0", want: "fe80::1/128"},
		{in: "::ffff:0:0/95", wantErr: true},
		{in: "10.0.0.0/33", wantErr: true},
		{in: "dom0-a", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseAllow([]string{tt.in})
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseAllow(%q) = %v, %v; want error %v", tt.in, got, err, tt.wantErr)
			}
			if tt.wantErr {
				return
			}
			if want := netip.MustParsePrefix(tt.want); len(got) != 1 || got[0] != want {
				t.Errorf("ParseAllow(%q) = %v, want %v", tt.in, got, want)
			}
		})
	}
}

// remoteConn is a net.Conn that only has a remote address.
type remoteConn struct {
	net.Conn
	remote net.Addr
}

func (c remoteConn) RemoteAddr() net.Addr { return c.remote }

func tcpPeer(addr string) peer {
	ap := netip.MustParseAddrPort(addr)
	return peerOf(remoteConn{remote: net.TCPAddrFromAddrPort(ap)})
}

// Fences and allow rules match peers as the server sees them: link-local
// ones with their interface's zone, IPv4 ones maybe mapped into IPv6.
func TestFenceMatches(t *testing.T) {
	linkLocal := tcpPeer("[fe80::5%eth1]:4000")
	v4 := tcpPeer("10.0.1.21:4000")
	mapped := tcpPeer("[::ffff:10.0.1.21]:4000")
	local := peerOf(remoteConn{remote: &net.UnixAddr{Name: "@", Net: "unix"}})
	tests := []struct {
		name   string
		fence  Fence
		peer   peer
		export string
		want   bool
	}{
		{"link-local address with the zone", Fence{Client: "fe80::5%eth1"}, linkLocal, "vm1", true},
		{"link-local address without a zone", Fence{Client: "fe80::5"}, linkLocal, "vm1", true},
		{"link-local prefix", Fence{Client: "fe80::/10"}, linkLocal, "vm1", true},
		{"another link-local address", Fence{Client: "fe80::6"}, linkLocal, "vm1", false},
		{"mapped address, IPv4 peer", Fence{Client: "::ffff:10.0.1.21"}, v4, "vm1", true},
		{"mapped CIDR, IPv4 peer", Fence{Client: "::ffff:10.0.1.0/120"}, v4, "vm1", true},
		{"IPv4 address, mapped peer", Fence{Client: "10.0.1.21"}, mapped, "vm1", true},
		{"another address", Fence{Client: "10.0.1.22"}, v4, "vm1", false},
		{"another export", Fence{Client: "10.0.1.21", Export: "vm2"}, v4, "vm1", false},
		{"name, its certificate", Fence{Client: "dom0-a"}, peer{addr: v4.addr, tls: true, names: []string{"dom0-a"}}, "vm1", true},
		{"name, another certificate", Fence{Client: "dom0-a"}, peer{addr: v4.addr, tls: true, names: []string{"dom0-b"}}, "vm1", false},
		{"name, TLS without a certificate", Fence{Client: "dom0-a"}, peer{addr: v4.addr, tls: true}, "vm1", false},
		{"name, plain text", Fence{Client: "dom0-a"}, v4, "vm1", false},
		{"name, local Unix-socket client", Fence{Client: "dom0-a"}, local, "vm1", false},
		{"address, local Unix-socket client", Fence{Client: "0.0.0.0/0"}, local, "vm1", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.fence.matches(tt.peer, tt.export); got != tt.want {
				t.Errorf("fence %+v matches %v: %v, want %v", tt.fence, tt.peer, got, tt.want)
			}
		})
	}
	// An allow rule is parsed and matched alike.
	a := Access{}
	var err error
	if a.Allow, err = ParseAllow([]string{"fe80::/10", "::ffff:10.0.1.0/120"}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []peer{linkLocal, v4, mapped} {
		if why, _ := a.check(p); why != "" {
			t.Errorf("allow rules refused %v: %s", p, why)
		}
	}
}

// check refuses with tlsReqd (NBD_REP_ERR_TLS_REQD) exactly when starting
// TLS is what the client lacks: the spec's "TLS-only export".
func TestAccessCheck(t *testing.T) {
	plain := tcpPeer("10.0.1.21:4000")
	withTLS := plain
	withTLS.tls = true
	withCert := withTLS
	withCert.names = []string{"dom0-a"}
	here := []netip.Prefix{netip.MustParsePrefix("10.0.1.0/24")}
	elsewhere := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	names := []string{"dom0-a"}

	tests := []struct {
		name        string
		access      Access
		peer        peer
		wantRefused bool
		wantTLSReqd bool
	}{
		{"open", Access{}, plain, false, false},
		{"TLS required, plain client", Access{TLS: TLSRequired}, plain, true, true},
		{"TLS off, TLS client", Access{TLS: TLSOff}, withTLS, true, false},
		{"address not allowed", Access{Allow: elsewhere}, plain, true, false},
		{"names, TLS optional, plain client", Access{AllowNames: names}, plain, true, true},
		{"names, TLS required, plain client", Access{TLS: TLSRequired, AllowNames: names}, plain, true, true},
		{"names, TLS client without certificate", Access{AllowNames: names}, withTLS, true, false},
		{"names, TLS client with certificate", Access{AllowNames: names}, withCert, false, false},
		// TLS cannot help: the export is not offered over it.
		{"names, TLS off, plain client", Access{TLS: TLSOff, AllowNames: names}, plain, true, false},
		// TLS cannot help: the address is refused whatever the certificate.
		{"names, address not allowed, plain client", Access{Allow: elsewhere, AllowNames: names}, plain, true, false},
		{"names, address allowed, plain client", Access{Allow: here, AllowNames: names}, plain, true, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			why, tlsReqd := tt.access.check(tt.peer)
			if (why != "") != tt.wantRefused || tlsReqd != tt.wantTLSReqd {
				t.Errorf("check(%v) = %q, %v; want refused %v, TLS required %v", tt.peer, why, tlsReqd, tt.wantRefused, tt.wantTLSReqd)
			}
		})
	}
}
