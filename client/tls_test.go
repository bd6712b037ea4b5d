package client

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/lvnbd/lvnbd/internal/testpki"
	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server"
)

// lvnbdServer runs lvnbd's own server in this process, on a port of host
// (a loopback address) and on a Unix socket, with file exports of 1 MiB
// whose access each test sets; it returns the TCP address and the socket's
// path.
func lvnbdServer(t *testing.T, host string, tlsConfig *tls.Config, access map[string]server.Access) (addr, sock string) {
	t.Helper()
	reg := server.NewRegistry()
	dir := t.TempDir()
	for name, a := range access {
		path := filepath.Join(dir, name+".img")
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, 1<<20); err != nil {
			t.Fatal(err)
		}
		e, err := server.OpenExport(server.ExportSpec{Name: name, Path: path})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.Backend.Close() })
		e.Access = a
		if err := reg.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	srv := server.New(&server.Config{Exports: reg, Logger: zaptest.NewLogger(t), TLS: tlsConfig})
	ctx, cancel := context.WithCancel(context.Background())
	tcp, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	sock = filepath.Join(shortDir(t), "s.sock")
	unix, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 2)
	go func() { done <- srv.Serve(ctx, tcp) }()
	go func() { done <- srv.Serve(ctx, unix) }()
	t.Cleanup(func() {
		cancel()
		for range 2 {
			<-done
		}
	})
	return tcp.Addr().String(), sock
}

// writeCADir writes a tls-certificates directory holding only pki's CA: a
// client without a certificate of its own.
func writeCADir(t *testing.T, pki *testpki.PKI) string {
	t.Helper()
	ca, err := os.ReadFile(filepath.Join(pki.Dir, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "ca-cert.pem"), ca, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestTLSWithLvnbd(t *testing.T) {
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	other, err := testpki.New(t.TempDir(), "dom0-a") // another CA, same names
	if err != nil {
		t.Fatal(err)
	}
	caOnly := writeCADir(t, pki)
	addr, sock := lvnbdServer(t, "127.0.0.1", pki.ServerConfig(), map[string]server.Access{
		"secret": {TLS: server.TLSRequired},
		"named":  {TLS: server.TLSRequired, AllowNames: []string{"dom0-a"}},
	})
	withCert, err := LoadTLSConfig(filepath.Join(pki.Dir, "ca-cert.pem"), filepath.Join(pki.Dir, "client-cert.pem"), filepath.Join(pki.Dir, "client-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	withOtherCA, err := LoadTLSConfig(filepath.Join(other.Dir, "ca-cert.pem"), "", "")
	if err != nil {
		t.Fatal(err)
	}
	tcp := func(export, query string) string { return "nbds://" + addr + "/" + export + query }
	// A server that wants a client certificate in the TLS handshake itself:
	// TLS 1.3 tells a client without one only after the handshake.
	strictConfig := pki.ServerConfig()
	strictConfig.ClientAuth = tls.RequireAndVerifyClientCert
	strict, _ := lvnbdServer(t, "127.0.0.1", strictConfig, map[string]server.Access{"secret": {TLS: server.TLSRequired}})

	works := []struct {
		name string
		uri  string
		opts *Options
	}{
		{"CA and client certificate given", tcp("named", ""), &Options{TLS: withCert}},
		{"the URI's tls-certificates", tcp("named", "?tls-certificates="+pki.Dir), nil},
		{"no client certificate, an export that needs none", tcp("secret", "?tls-certificates="+caOnly), nil},
		{"the name checked is tls-hostname's", tcp("named", "?tls-hostname=localhost&tls-certificates="+pki.Dir), nil},
		{"tls-verify-peer=0 trusts an unknown CA", tcp("named", "?tls-verify-peer=0"), &Options{TLS: &tls.Config{Certificates: []tls.Certificate{pki.Client}}}},
		{"Unix socket with tls-hostname", "nbds+unix:///named?socket=" + sock + "&tls-hostname=localhost&tls-certificates=" + pki.Dir, nil},
		{"Unix socket, the server not checked", "nbds+unix:///named?socket=" + sock + "&tls-verify-peer=0", &Options{TLS: &tls.Config{Certificates: []tls.Certificate{pki.Client}}}},
	}
	for _, tt := range works {
		t.Run(tt.name, func(t *testing.T) {
			c := dialT(t, tt.uri, tt.opts)
			if !c.Export().TLS {
				t.Error("ExportInfo.TLS is false on an nbds:// connection")
			}
			exercise1MiB(t, c)
			ctx := testContext(t)
			info, err := Info(ctx, tt.uri, tt.opts)
			if err != nil || !info.TLS || info.Size != 1<<20 {
				t.Errorf("Info: %+v, %v; want TLS, 1 MiB", info, err)
			}
			list, err := List(ctx, tt.uri, tt.opts)
			if err != nil || len(list) == 0 {
				t.Errorf("List over TLS: %v, %v", list, err)
			}
		})
	}

	t.Run("a pool, every connection over TLS", func(t *testing.T) {
		p, err := DialPool(testContext(t), tcp("named", "?tls-certificates="+pki.Dir), 4, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		if p.Connections() != 4 {
			t.Fatalf("%d connections, want 4", p.Connections())
		}
		exercise1MiB(t, p)
	})

	fails := []struct {
		name    string
		uri     string
		opts    *Options
		is      error
		as      any
		wantMsg string
	}{
		{"plain text to a TLS-only export", "nbd://" + addr + "/secret", nil, ErrTLSRequired, nil, "use an nbds:// URI"},
		{"the system's roots do not know the test CA", tcp("secret", ""), nil, nil, &x509.UnknownAuthorityError{}, "TLS handshake with " + addr},
		{"another CA", tcp("secret", ""), &Options{TLS: withOtherCA}, nil, &x509.UnknownAuthorityError{}, "certificate signed by unknown authority"},
		{"a name the certificate lacks", tcp("secret", "?tls-hostname=storage-b&tls-certificates="+caOnly), nil, nil, &x509.HostnameError{}, "storage-b"},
		{"no client certificate for a named export", tcp("named", "?tls-certificates="+caOnly), nil, nil, new(*OptionError), "by policy"},
		{"no client certificate for a server that wants one in the TLS handshake", "nbds://" + strict + "/secret?tls-certificates=" + caOnly, nil,
			ErrTLSNoClientCertificate, nil, "certificate required"},
		{"Unix socket without tls-hostname", "nbds+unix:///named?socket=" + sock + "&tls-certificates=" + pki.Dir, nil, nil, nil, "add tls-hostname=NAME"},
		{"tls-type=psk", tcp("secret", "?tls-type=psk"), nil, ErrTLSNotSupported, nil, "X.509 TLS only"},
		{"certificates in the URI and in the options", tcp("secret", "?tls-certificates="+pki.Dir), &Options{TLS: withCert}, nil, nil, "give one or the other"},
		{"TLS options for a plain-text URI", "nbd://" + addr + "/secret", &Options{TLS: withCert}, nil, nil, "write nbds://"},
		{"a tls-certificates directory that is not there", tcp("secret", "?tls-certificates=/nonexistent"), nil, os.ErrNotExist, nil, "must hold ca-cert.pem"},
		{"TLS parameters in a plain-text URI", "nbd://" + addr + "/secret?tls-certificates=" + pki.Dir, nil, nil, nil, "plain-text URI, yet it has tls-certificates"},
	}
	for _, tt := range fails {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Dial(testContext(t), tt.uri, tt.opts)
			if err == nil {
				t.Fatal("Dial succeeded")
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("Dial: %v, want it to say %q", err, tt.wantMsg)
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("Dial: %v, want errors.Is %v", err, tt.is)
			}
			if tt.as != nil && !errors.As(err, tt.as) {
				t.Errorf("Dial: %v (%T), want errors.As %T", err, err, tt.as)
			}
			if _, ierr := Info(testContext(t), tt.uri, tt.opts); ierr == nil {
				t.Error("Info succeeded")
			}
		})
	}
}

// exercise1MiB writes a pattern over the first MiB of d in 64 KiB requests,
// flushes, and reads it back in one.
func exercise1MiB(t *testing.T, d Device) {
	t.Helper()
	ctx := testContext(t)
	want := pattern(1<<20, 3)
	for off := 0; off < len(want); off += 64 << 10 {
		if err := d.WriteAt(ctx, want[off:off+64<<10], int64(off), 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if err := d.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "read back over TLS", want, got)
}

func TestTLSRefusedByAServerWithout(t *testing.T) {
	addr, _ := lvnbdServer(t, "127.0.0.1", nil, map[string]server.Access{"vm1": {}})
	uri := "nbds://" + addr + "/vm1?tls-verify-peer=0"
	_, err := Dial(testContext(t), uri, nil)
	if !errors.Is(err, ErrTLSRefused) || !strings.Contains(err.Error(), "refused to start TLS") ||
		!strings.Contains(err.Error(), "TLS is not configured on this server") {
		t.Fatalf("Dial(%s): %v, want ErrTLSRefused with the server's reason", uri, err)
	}
	// List too (TestTLSHostileServers checks that nothing else is sent).
	if _, err := List(testContext(t), uri, nil); !errors.Is(err, ErrTLSRefused) {
		t.Fatalf("List(%s): %v, want ErrTLSRefused", uri, err)
	}
}

// TestTLSHostileServers: a server that misbehaves around STARTTLS ends the
// attempt with an error, within the caller's deadline, and is never spoken
// to in plain text after asking for TLS.
func TestTLSHostileServers(t *testing.T) {
	greet := func(nc net.Conn, flags nbd.HandshakeFlags) bool {
		b, _ := nbd.ServerHello{Flags: flags}.AppendBinary(nil)
		if _, err := nc.Write(b); err != nil {
			return false
		}
		var cf [4]byte
		_, err := io.ReadFull(nc, cf[:])
		return err == nil
	}
	// readOption reads one option and returns it.
	readOption := func(nc net.Conn) (nbd.Option, bool) {
		var b [nbd.OptionHeaderSize]byte
		if _, err := io.ReadFull(nc, b[:]); err != nil {
			return 0, false
		}
		var h nbd.OptionHeader
		if h.UnmarshalBinary(b[:]) != nil {
			return 0, false
		}
		io.CopyN(io.Discard, nc, int64(h.Length))
		return h.Option, true
	}
	reply := func(opt nbd.Option, t nbd.OptionReplyType) []byte {
		b, _ := nbd.OptionReplyHeader{Option: opt, Type: t}.AppendBinary(nil)
		return b
	}
	// asked greets as a fixed-newstyle server and reads the client's first
	// option, which it reports; false if the client went away.
	asked := func(nc net.Conn, seen chan<- nbd.Option) (nbd.Option, bool) {
		if !greet(nc, nbd.FlagFixedNewstyle) {
			return 0, false
		}
		opt, ok := readOption(nc)
		if ok {
			seen <- opt
		}
		return opt, ok
	}
	tests := []struct {
		name    string
		handler func(nc net.Conn, seen chan<- nbd.Option)
		is      error
		wantMsg string
	}{
		{"acks STARTTLS, then stalls", func(nc net.Conn, seen chan<- nbd.Option) {
			opt, ok := asked(nc, seen)
			if !ok {
				return
			}
			nc.Write(reply(opt, nbd.RepAck))
			io.Copy(io.Discard, nc) // the TLS ClientHello, never answered
		}, context.DeadlineExceeded, "handshake with"},
		{"acks STARTTLS, then speaks plain text", func(nc net.Conn, seen chan<- nbd.Option) {
			opt, ok := asked(nc, seen)
			if !ok {
				return
			}
			nc.Write(reply(opt, nbd.RepAck))
			nc.Write(bytes.Repeat([]byte("not TLS "), 64))
		}, nil, "TLS handshake with"},
		{"answers another option", func(nc net.Conn, seen chan<- nbd.Option) {
			if _, ok := asked(nc, seen); ok {
				nc.Write(reply(nbd.OptGo, nbd.RepAck))
			}
		}, ErrProtocol, "sent a reply to NBD_OPT_GO"},
		{"acks STARTTLS with data", func(nc net.Conn, seen chan<- nbd.Option) {
			opt, ok := asked(nc, seen)
			if !ok {
				return
			}
			r, _ := nbd.OptionReplyHeader{Option: opt, Type: nbd.RepAck, Length: 4}.AppendBinary(nil)
			nc.Write(append(r, "junk"...))
		}, ErrProtocol, "4 bytes of data"},
		{"shutting down", func(nc net.Conn, seen chan<- nbd.Option) {
			opt, ok := asked(nc, seen)
			if !ok {
				return
			}
			nc.Write(reply(opt, nbd.RepErrShutdown))
		}, nil, "is shutting down"},
		{"old newstyle: no options at all", func(nc net.Conn, seen chan<- nbd.Option) {
			if greet(nc, 0) {
				if opt, ok := readOption(nc); ok {
					seen <- opt
				}
			}
		}, ErrTLSRefused, "old newstyle"},
		{"refuses TLS", func(nc net.Conn, seen chan<- nbd.Option) {
			if !greet(nc, nbd.FlagFixedNewstyle) {
				return
			}
			for {
				opt, ok := readOption(nc)
				if !ok {
					return
				}
				seen <- opt
				if opt == nbd.OptAbort {
					nc.Write(reply(opt, nbd.RepAck))
					return
				}
				nc.Write(reply(opt, nbd.RepErrUnsup))
			}
		}, ErrTLSRefused, "refused to start TLS"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			seen := make(chan nbd.Option, 16)
			uri := strings.Replace(serveRaw(t, func(nc net.Conn) { tt.handler(nc, seen) }), "nbd://", "nbds://", 1) + "?tls-verify-peer=0"
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			defer cancel()
			_, err := Dial(ctx, uri, nil)
			if err == nil || (tt.is != nil && !errors.Is(err, tt.is)) || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("Dial: %v, want %v saying %q", err, tt.is, tt.wantMsg)
			}
			if tt.is == nil && errors.Is(err, ErrTLSRefused) {
				t.Errorf("Dial: %v is ErrTLSRefused", err)
			}
			close(seen)
			for opt := range seen {
				if opt != nbd.OptStartTLS && opt != nbd.OptAbort {
					t.Errorf("the client sent %v in plain text to a server it asked for TLS", opt)
				}
			}
		})
	}
}

func TestLoadTLSConfig(t *testing.T) {
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	file := func(name string) string { return filepath.Join(pki.Dir, name) }
	notPEM := filepath.Join(t.TempDir(), "junk.pem")
	os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600)
	keyOnly, certOnly := t.TempDir(), t.TempDir()
	for _, dir := range []string{keyOnly, certOnly} {
		ca, _ := os.ReadFile(file("ca-cert.pem"))
		os.WriteFile(filepath.Join(dir, "ca-cert.pem"), ca, 0o600)
	}
	key, _ := os.ReadFile(file("client-key.pem"))
	os.WriteFile(filepath.Join(keyOnly, "client-key.pem"), key, 0o600)
	cert, _ := os.ReadFile(file("client-cert.pem"))
	os.WriteFile(filepath.Join(certOnly, "client-cert.pem"), cert, 0o600)

	tests := []struct {
		name          string
		load          func() (*tls.Config, error)
		wantErr       string
		roots, client bool
	}{
		{"CA, certificate and key", func() (*tls.Config, error) {
			return LoadTLSConfig(file("ca-cert.pem"), file("client-cert.pem"), file("client-key.pem"))
		}, "", true, true},
		{"CA alone", func() (*tls.Config, error) { return LoadTLSConfig(file("ca-cert.pem"), "", "") }, "", true, false},
		{"nothing: the system's roots", func() (*tls.Config, error) { return LoadTLSConfig("", "", "") }, "", false, false},
		{"no such CA", func() (*tls.Config, error) { return LoadTLSConfig("/nonexistent/ca.pem", "", "") }, "reading the TLS CA", false, false},
		{"a CA that is not PEM", func() (*tls.Config, error) { return LoadTLSConfig(notPEM, "", "") }, "holds no PEM certificate", false, false},
		{"certificate without key", func() (*tls.Config, error) { return LoadTLSConfig("", file("client-cert.pem"), "") }, "has no key file", false, false},
		{"key without certificate", func() (*tls.Config, error) { return LoadTLSConfig("", "", file("client-key.pem")) }, "has no certificate file", false, false},
		{"a key that is not the certificate's", func() (*tls.Config, error) {
			return LoadTLSConfig("", file("client-cert.pem"), file("server-key.pem"))
		}, "loading the TLS client certificate", false, false},
		{"directory with everything", func() (*tls.Config, error) { return loadTLSDir(pki.Dir) }, "", true, true},
		{"directory with a key but no certificate", func() (*tls.Config, error) { return loadTLSDir(keyOnly) }, "holds client-key.pem but not client-cert.pem", false, false},
		{"directory with a certificate but no key", func() (*tls.Config, error) { return loadTLSDir(certOnly) }, "holds client-cert.pem but not client-key.pem", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := tt.load()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %v, want an error saying %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if (cfg.RootCAs != nil) != tt.roots || (len(cfg.Certificates) == 1) != tt.client || cfg.MinVersion < tls.VersionTLS12 {
				t.Errorf("roots %v, client certificates %d, min version %x; want roots %v, client %v, TLS 1.2 or later",
					cfg.RootCAs != nil, len(cfg.Certificates), cfg.MinVersion, tt.roots, tt.client)
			}
		})
	}
}

// The client flags go out before STARTTLS, as the spec orders: checked here
// byte by byte so a reordering shows even where a lenient server copes.
func TestStartTLSComesRightAfterTheClientFlags(t *testing.T) {
	got := make(chan []byte, 1)
	uri := serveRaw(t, func(nc net.Conn) {
		b, _ := nbd.ServerHello{Flags: nbd.FlagFixedNewstyle | nbd.FlagNoZeroes}.AppendBinary(nil)
		nc.Write(b)
		buf := make([]byte, 4+nbd.OptionHeaderSize)
		io.ReadFull(nc, buf)
		got <- buf
	})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	Dial(ctx, strings.Replace(uri, "nbd://", "nbds://", 1)+"?tls-verify-peer=0", nil)
	b := <-got
	if flags := binary.BigEndian.Uint32(b); flags != uint32(nbd.ClientFlagFixedNewstyle|nbd.ClientFlagNoZeroes) {
		t.Errorf("client flags %#x", flags)
	}
	var h nbd.OptionHeader
	if err := h.UnmarshalBinary(b[4:]); err != nil || h.Option != nbd.OptStartTLS || h.Length != 0 {
		t.Errorf("first option %+v (%v), want NBD_OPT_STARTTLS with no data", h, err)
	}
}

// TestTLSChecksWhatTheURINames: the server's certificate is checked for the
// URI's host, and only the URI's tls-verify-peer=0 skips the check: a
// configuration given in Options cannot name another host or skip it.
func TestTLSChecksWhatTheURINames(t *testing.T) {
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	other, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	// 127.0.0.2 is loopback too, and not in the certificate (127.0.0.1,
	// ::1 and localhost are).
	addr, _ := lvnbdServer(t, "127.0.0.2", pki.ServerConfig(), map[string]server.Access{"vm1": {TLS: server.TLSRequired}})
	uri := "nbds://" + addr + "/vm1"
	tests := []struct {
		name string
		uri  string
		opts *Options
		as   any
	}{
		{"the URI's host is not in the certificate", uri + "?tls-certificates=" + pki.Dir, nil, &x509.HostnameError{}},
		{"a ServerName in Options is not what is checked", uri, &Options{TLS: &tls.Config{RootCAs: pki.CAPool, ServerName: "localhost"}}, &x509.HostnameError{}},
		{"InsecureSkipVerify in Options does not skip the check", uri + "?tls-hostname=localhost", &Options{TLS: &tls.Config{RootCAs: other.CAPool, InsecureSkipVerify: true}}, &x509.UnknownAuthorityError{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Dial(testContext(t), tt.uri, tt.opts)
			if !errors.As(err, tt.as) {
				t.Fatalf("Dial: %v, want %T", err, tt.as)
			}
		})
	}
	// The same configuration, for a name the certificate has.
	c := dialT(t, uri+"?tls-hostname=localhost", &Options{TLS: &tls.Config{RootCAs: pki.CAPool, ServerName: "storage-b"}})
	exercise1MiB(t, c)
}

// TestTLSRevokedServerCertificate: a tls-certificates directory's CRL
// (ca-crl.pem, as qemu reads it) is honoured.
func TestTLSRevokedServerCertificate(t *testing.T) {
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := lvnbdServer(t, "127.0.0.1", pki.ServerConfig(), map[string]server.Access{"vm1": {TLS: server.TLSRequired}})
	uri := "nbds://" + addr + "/vm1?tls-certificates=" + pki.Dir

	if err := pki.WriteCRL(pki.Client.Leaf); err != nil { // another certificate revoked
		t.Fatal(err)
	}
	exercise1MiB(t, dialT(t, uri, nil))

	if err := pki.WriteCRL(pki.Client.Leaf, pki.Server.Leaf); err != nil {
		t.Fatal(err)
	}
	_, err = Dial(testContext(t), uri, nil)
	if err == nil || !strings.Contains(err.Error(), "is revoked by the CRL "+filepath.Join(pki.Dir, "ca-crl.pem")) {
		t.Fatalf("Dial with the server's certificate revoked: %v", err)
	}

	if err := os.WriteFile(filepath.Join(pki.Dir, "ca-crl.pem"), []byte("not a CRL\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Dial(testContext(t), uri, nil); err == nil || !strings.Contains(err.Error(), `holds no PEM "X509 CRL"`) {
		t.Fatalf("Dial with a CRL file that holds none: %v", err)
	}
}

// eofConn records whether a read of the connection met its end.
type eofConn struct {
	net.Conn
	eof atomic.Bool
}

func (c *eofConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err == io.EOF {
		c.eof.Store(true)
	}
	return n, err
}

// tlsFake is a server that starts TLS when asked, for checks of what the
// client sends over it: answer gets each option after STARTTLS and returns
// whether the handshake goes on; after gets the session and its socket.
func tlsFake(t *testing.T, cfg *tls.Config, answer func(tc *tls.Conn, opt nbd.Option, data []byte) bool, after func(tc *tls.Conn, raw *eofConn)) string {
	t.Helper()
	uri := serveRaw(t, func(nc net.Conn) {
		nc.SetDeadline(time.Now().Add(10 * time.Second))
		b, _ := nbd.ServerHello{Flags: nbd.FlagFixedNewstyle | nbd.FlagNoZeroes}.AppendBinary(nil)
		nc.Write(b)
		var rw io.ReadWriter = nc
		var tc *tls.Conn
		var raw *eofConn
		if _, err := io.ReadFull(rw, make([]byte, 4)); err != nil {
			return
		}
		for {
			var hb [nbd.OptionHeaderSize]byte
			if _, err := io.ReadFull(rw, hb[:]); err != nil {
				return
			}
			var h nbd.OptionHeader
			if h.UnmarshalBinary(hb[:]) != nil {
				return
			}
			data := make([]byte, h.Length)
			if _, err := io.ReadFull(rw, data); err != nil {
				return
			}
			if h.Option == nbd.OptStartTLS && tc == nil {
				r, _ := nbd.OptionReplyHeader{Option: h.Option, Type: nbd.RepAck}.AppendBinary(nil)
				nc.Write(r)
				raw = &eofConn{Conn: nc}
				tc = tls.Server(raw, cfg)
				if tc.Handshake() != nil {
					return
				}
				rw = tc
				continue
			}
			if tc == nil || !answer(tc, h.Option, data) {
				break
			}
		}
		if tc != nil {
			after(tc, raw)
		}
	})
	return strings.Replace(uri, "nbd://", "nbds://", 1) + "?tls-hostname=localhost"
}

// TestTLSEndsWithCloseNotify: the spec wants TLS shut down (close_notify)
// after NBD_OPT_ABORT and after NBD_CMD_DISC, not just the socket closed.
func TestTLSEndsWithCloseNotify(t *testing.T) {
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	reply := func(tc *tls.Conn, opt nbd.Option, typ nbd.OptionReplyType, data []byte) {
		b, _ := nbd.OptionReplyHeader{Option: opt, Type: typ, Length: uint32(len(data))}.AppendBinary(nil)
		tc.Write(append(b, data...))
	}
	ended := make(chan error, 1)
	// After the handshake the next read ends with io.EOF either way
	// (crypto/tls takes a socket closed between records for the end), but
	// after a close_notify it does not read the socket again, so the
	// socket's own end is never met.
	afterAbort := func(tc *tls.Conn, raw *eofConn) {
		if _, err := tc.Read(make([]byte, 1)); err != io.EOF {
			ended <- fmt.Errorf("read after the end: %v, want io.EOF", err)
			return
		}
		if raw.eof.Load() {
			ended <- errors.New("the socket was closed with no close_notify")
			return
		}
		ended <- nil
	}
	afterGo := func(tc *tls.Conn, raw *eofConn) {
		hdr := make([]byte, nbd.RequestHeaderSize)
		if _, err := io.ReadFull(tc, hdr); err != nil {
			ended <- fmt.Errorf("reading NBD_CMD_DISC: %w", err)
			return
		}
		var r nbd.RequestHeader
		if err := r.UnmarshalBinary(hdr); err != nil || r.Command != nbd.CmdDisc {
			ended <- fmt.Errorf("request %+v (%v), want NBD_CMD_DISC", r, err)
			return
		}
		afterAbort(tc, raw)
	}
	answer := func(tc *tls.Conn, opt nbd.Option, _ []byte) bool {
		switch opt {
		case nbd.OptList:
			reply(tc, opt, nbd.RepAck, nil)
		case nbd.OptAbort:
			reply(tc, opt, nbd.RepAck, nil)
			return false
		case nbd.OptGo:
			info, _ := nbd.Info{Type: nbd.InfoExport, Size: 1 << 20, Flags: nbd.FlagHasFlags}.AppendBinary(nil)
			reply(tc, opt, nbd.RepInfo, info)
			reply(tc, opt, nbd.RepAck, nil)
			return false
		default:
			reply(tc, opt, nbd.RepErrUnsup, nil)
		}
		return true
	}
	opts := &Options{TLS: &tls.Config{RootCAs: pki.CAPool}}

	t.Run("after NBD_OPT_ABORT", func(t *testing.T) {
		uri := tlsFake(t, pki.ServerConfig(), answer, afterAbort)
		if _, err := List(testContext(t), uri, opts); err != nil {
			t.Fatal(err)
		}
		if err := <-ended; err != nil {
			t.Errorf("after NBD_OPT_ABORT: %v", err)
		}
	})
	t.Run("after NBD_CMD_DISC", func(t *testing.T) {
		uri := tlsFake(t, pki.ServerConfig(), answer, afterGo)
		c, err := Dial(testContext(t), uri, opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if err := <-ended; err != nil {
			t.Errorf("after NBD_CMD_DISC: %v", err)
		}
	})
}

// A TLS handshake that stalls ends when the caller cancels, without a
// deadline.
func TestTLSHandshakeCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	uri := serveRaw(t, func(nc net.Conn) {
		b, _ := nbd.ServerHello{Flags: nbd.FlagFixedNewstyle}.AppendBinary(nil)
		nc.Write(b)
		io.ReadFull(nc, make([]byte, 4+nbd.OptionHeaderSize))
		r, _ := nbd.OptionReplyHeader{Option: nbd.OptStartTLS, Type: nbd.RepAck}.AppendBinary(nil)
		nc.Write(r)
		io.ReadFull(nc, make([]byte, 5)) // the ClientHello's record header: the client is in the handshake
		cancel()
		io.Copy(io.Discard, nc)
	})
	_, err := Dial(ctx, strings.Replace(uri, "nbd://", "nbds://", 1)+"?tls-verify-peer=0", nil)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Dial: %v, want context.Canceled", err)
	}
}

func TestNegotiateRefusesTLS(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	_, err := Negotiate(testContext(t), a, "vm1", &Options{TLS: &tls.Config{}})
	if !errors.Is(err, ErrTLSNotSupported) {
		t.Fatalf("Negotiate with TLS: %v, want ErrTLSNotSupported", err)
	}
}
