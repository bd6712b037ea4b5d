package server

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lvnbd/lvnbd/internal/testpki"
	"github.com/lvnbd/lvnbd/nbd"
)

// startTLS upgrades a raw client after its greeting.
func (c *rawClient) startTLS(cfg *tls.Config) error {
	c.t.Helper()
	if r := c.option(nbd.OptStartTLS, nil); r[0].typ != nbd.RepAck {
		c.t.Fatalf("STARTTLS: %v %s", r[0].typ, r[0].data)
	}
	tc := tls.Client(c.nc, cfg)
	if err := tc.Handshake(); err != nil {
		return err
	}
	c.nc, c.r = tc, bufio.NewReader(tc)
	return nil
}

func (c *rawClient) goReply(name string) (nbd.OptionReplyType, string) {
	c.t.Helper()
	r := c.option(nbd.OptGo, nbd.InfoRequest{Name: name})
	last := r[len(r)-1]
	return last.typ, string(last.data)
}

func listNames(c *rawClient) []string {
	var names []string
	for _, r := range c.option(nbd.OptList, nil) {
		var e nbd.ServerEntry
		if r.typ == nbd.RepServer && e.UnmarshalBinary(r.data) == nil {
			names = append(names, e.Name)
		}
	}
	return names
}

func TestTLSAndAccessControl(t *testing.T) {
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	plain, _ := fileExport(t, "plain", 1<<20, false)
	plain.Access = Access{TLS: TLSOff}
	secret, _ := fileExport(t, "secret", 1<<20, false)
	secret.Access = Access{TLS: TLSRequired}
	named, _ := fileExport(t, "named", 1<<20, false)
	named.Access = Access{TLS: TLSRequired, AllowNames: []string{"dom0-a"}}
	elsewhere, _ := fileExport(t, "elsewhere", 1<<20, false)
	elsewhere.Access = Access{Allow: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}}
	open, _ := fileExport(t, "open", 1<<20, false)
	// allow_names with TLS left optional: only TLS can bring the
	// certificate, so it is TLS-only as the spec means it.
	namedOptional, _ := fileExport(t, "named-optional", 1<<20, false)
	namedOptional.Access = Access{AllowNames: []string{"dom0-a"}}
	namedElsewhere, _ := fileExport(t, "named-elsewhere", 1<<20, false)
	namedElsewhere.Access = Access{Allow: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}, AllowNames: []string{"dom0-a"}}
	ts := startServer(t, &Config{TLS: pki.ServerConfig()}, plain, secret, named, elsewhere, open, namedOptional, namedElsewhere)

	tests := []struct {
		name     string
		tls      bool
		cert     bool
		export   string
		want     nbd.OptionReplyType
		wantList []string
	}{
		{"plain client, plain export", false, false, "plain", nbd.RepAck, []string{"open", "plain"}},
		{"plain client, TLS-only export", false, false, "secret", nbd.RepErrTLSReqd, nil},
		{"plain client, open export", false, false, "open", nbd.RepAck, nil},
		{"TLS client, TLS-only export", true, false, "secret", nbd.RepAck, []string{"open", "secret"}},
		{"TLS client, plain-only export", true, false, "plain", nbd.RepErrPolicy, nil},
		{"TLS client without certificate, named export", true, false, "named", nbd.RepErrPolicy, nil},
		{"TLS client with certificate, named export", true, true, "named", nbd.RepAck,
			[]string{"named", "named-optional", "open", "secret"}},
		{"address not allowed", false, false, "elsewhere", nbd.RepErrPolicy, nil},
		{"plain client, named export with TLS optional", false, false, "named-optional", nbd.RepErrTLSReqd, nil},
		{"TLS client without certificate, named export with TLS optional", true, false, "named-optional", nbd.RepErrPolicy, nil},
		{"TLS client with certificate, named export with TLS optional", true, true, "named-optional", nbd.RepAck, nil},
		// TLS would not let this client in: its address is refused.
		{"plain client, named export at another address", false, false, "named-elsewhere", nbd.RepErrPolicy, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dial := func() *rawClient {
				c := dialRaw(t, ts.addr)
				c.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
				if tt.tls {
					if err := c.startTLS(pki.ClientConfig(tt.cert)); err != nil {
						t.Fatal(err)
					}
				}
				return c
			}
			// The meta-context options are refused as GO is: they must not
			// tell a client about an export it may not use. (On a
			// connection of their own: structured replies would change the
			// transmission checks below.)
			m := dial()
			if r := m.option(nbd.OptStructuredReply, nil); r[0].typ != nbd.RepAck {
				t.Fatalf("STRUCTURED_REPLY: %v", r[0].typ)
			}
			for _, opt := range []nbd.Option{nbd.OptListMetaContext, nbd.OptSetMetaContext} {
				r := m.option(opt, nbd.MetaContextRequest{Export: tt.export, Queries: []string{nbd.MetaContextBaseAllocation}})
				want := []nbd.OptionReplyType{tt.want}
				if tt.want == nbd.RepAck {
					want = []nbd.OptionReplyType{nbd.RepMetaContext, nbd.RepAck}
				}
				var got []nbd.OptionReplyType
				for _, reply := range r {
					got = append(got, reply.typ)
				}
				if diff := cmp.Diff(want, got); diff != "" {
					t.Errorf("%v %q (-want +got):\n%s", opt, tt.export, diff)
				}
			}
			c := dial()
			if tt.wantList != nil {
				if diff := cmp.Diff(tt.wantList, listNames(c)); diff != "" {
					t.Errorf("LIST (-want +got):\n%s", diff)
				}
			}
			got, msg := c.goReply(tt.export)
			if got != tt.want {
				t.Fatalf("GO %q: %v (%s), want %v", tt.export, got, msg, tt.want)
			}
			if got != nbd.RepAck {
				return
			}
			// Transmission works over whatever the handshake ended on.
			c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 1, Offset: 0, Length: 5}, []byte("hello"))
			if res := c.simpleReply(0); res.errno != 0 {
				t.Fatalf("write: %v", res.errno)
			}
			c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: 2, Offset: 0, Length: 5}, nil)
			if res := c.simpleReply(5); string(res.whole) != "hello" {
				t.Fatalf("read %q", res.whole)
			}
		})
	}

	t.Run("STARTTLS twice", func(t *testing.T) {
		c := dialRaw(t, ts.addr)
		c.greet(nbd.ClientFlagFixedNewstyle)
		if err := c.startTLS(pki.ClientConfig(false)); err != nil {
			t.Fatal(err)
		}
		if r := c.option(nbd.OptStartTLS, nil); r[0].typ != nbd.RepErrInvalid {
			t.Fatalf("second STARTTLS: %v", r[0].typ)
		}
	})
	t.Run("structured replies do not survive STARTTLS", func(t *testing.T) {
		c := dialRaw(t, ts.addr)
		c.greet(nbd.ClientFlagFixedNewstyle)
		c.option(nbd.OptStructuredReply, nil)
		if err := c.startTLS(pki.ClientConfig(false)); err != nil {
			t.Fatal(err)
		}
		r := c.option(nbd.OptSetMetaContext, nbd.MetaContextRequest{Export: "open", Queries: []string{nbd.MetaContextBaseAllocation}})
		if r[0].typ != nbd.RepErrInvalid {
			t.Fatalf("meta context after STARTTLS without structured replies: %v", r[0].typ)
		}
	})
	// An unknown name's error names only what LIST shows this client: not
	// the exports its address, its lack of TLS or of a certificate keeps
	// it from.
	for _, tt := range []struct {
		name      string
		tls, cert bool
		want      string
	}{
		{"plain client", false, false, `no export "nope" on this server (exports: "open", "plain")`},
		{"TLS client with certificate", true, true,
			`no export "nope" on this server (exports: "named", "named-optional", "open", "secret")`},
	} {
		t.Run("unknown export, "+tt.name, func(t *testing.T) {
			c := dialRaw(t, ts.addr)
			c.greet(nbd.ClientFlagFixedNewstyle)
			if tt.tls {
				if err := c.startTLS(pki.ClientConfig(tt.cert)); err != nil {
					t.Fatal(err)
				}
			}
			for _, opt := range []nbd.Option{nbd.OptInfo, nbd.OptGo} {
				r := c.option(opt, nbd.InfoRequest{Name: "nope"})
				if got := r[len(r)-1]; got.typ != nbd.RepErrUnknown || string(got.data) != tt.want {
					t.Errorf("%v \"nope\": %v %q, want %v %q", opt, got.typ, got.data, nbd.RepErrUnknown, tt.want)
				}
			}
		})
	}
	t.Run("EXPORT_NAME of a TLS-only export hangs up", func(t *testing.T) {
		c := dialRaw(t, ts.addr)
		c.greet(nbd.ClientFlagFixedNewstyle)
		c.sendOption(nbd.OptExportName, []byte("secret"))
		c.expectClosed()
	})
}

func TestStartTLSWithoutConfig(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	ts := startServer(t, nil, disk)
	c := dialRaw(t, ts.addr)
	c.greet(nbd.ClientFlagFixedNewstyle)
	if r := c.option(nbd.OptStartTLS, nil); r[0].typ != nbd.RepErrPolicy {
		t.Fatalf("STARTTLS unconfigured: %v", r[0].typ)
	}
}

func TestConnectionLimits(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	ts := startServer(t, &Config{MaxConnectionsPerClient: 2}, disk)
	a, b := dialRaw(t, ts.addr), dialRaw(t, ts.addr)
	a.open("disk", false)
	b.open("disk", false)
	c := dialRaw(t, ts.addr)
	c.expectClosed() // a third from the same address is refused at once
	// When one leaves, a new one is admitted.
	a.request(nbd.RequestHeader{Command: nbd.CmdDisc}, nil)
	a.expectClosed()
	var d *rawClient
	deadline := time.Now().Add(10 * time.Second)
	for {
		// The server releases the slot when its side of a finishes, which
		// may be just after our read of EOF: retry, bounded.
		d = dialRaw(t, ts.addr)
		d.nc.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := d.r.Peek(1); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no connection admitted after one closed")
		}
	}
	d.nc.SetReadDeadline(time.Time{})
	d.open("disk", false)
}

func TestFencing(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	other, _ := fileExport(t, "other", 1<<20, false)
	fencePath := filepath.Join(t.TempDir(), "fences.json")
	fences, err := LoadFences(fencePath)
	if err != nil {
		t.Fatal(err)
	}
	entered := make(chan struct{}, 1)
	release := make(chan struct{})
	var once sync.Once
	hb := &hookBackend{Backend: disk.Backend, onWrite: func(off int64) error {
		if off == 0 {
			once.Do(func() { entered <- struct{}{}; <-release })
		}
		return nil
	}}
	disk.Backend = hb
	reg := NewRegistry()
	reg.Add(disk)
	reg.Add(other)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := New(&Config{Exports: reg, Fences: fences})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-done })
	addr := ln.Addr().String()

	c := dialRaw(t, addr)
	c.open("disk", false)
	o := dialRaw(t, addr)
	o.open("other", false)
	// A write is executing when the fence comes; more arrive while the
	// fence waits for it.
	c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 1, Offset: 0, Length: 4}, []byte("aaaa"))
	<-entered
	fenced := make(chan error, 1)
	go func() {
		_, err := srv.FenceClient(context.Background(), Fence{Client: "127.0.0.1", Export: "disk"})
		fenced <- err
	}()
	select {
	case err := <-fenced:
		t.Fatalf("fence returned while a write was executing: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	for i := range 8 {
		late, _ := nbd.RequestHeader{Command: nbd.CmdWrite, Handle: uint64(10 + i), Offset: 4096 * uint64(i+1), Length: 4}.AppendBinary(nil)
		c.nc.Write(append(late, "late"...)) // fails once the fence has closed the connection
	}
	close(release)
	if err := <-fenced; err != nil {
		t.Fatal(err)
	}
	hb.mu.Lock()
	atFence := append([]string(nil), hb.events...)
	hb.mu.Unlock()
	if len(atFence) == 0 || atFence[0] != "write 0" {
		t.Fatalf("the executing write did not finish before the fence returned: %v", atFence)
	}
	c.drainUntilClosed()
	deadline := time.Now().Add(10 * time.Second)
	for len(disk.Clients()) > 0 {
		if time.Now().After(deadline) {
			t.Fatal("the fenced connection did not end")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Nothing reached the storage after the fence returned.
	hb.mu.Lock()
	if diff := cmp.Diff(atFence, hb.events); diff != "" {
		t.Errorf("backend calls after the fence returned (-at fence +later):\n%s", diff)
	}
	hb.mu.Unlock()

	// New connections to the fenced export are refused; others are not.
	n := dialRaw(t, addr)
	n.greet(nbd.ClientFlagFixedNewstyle)
	if got, msg := n.goReply("disk"); got != nbd.RepErrPolicy || !strings.Contains(msg, "fenced") {
		t.Fatalf("GO after fence: %v %q", got, msg)
	}
	o.request(nbd.RequestHeader{Command: nbd.CmdFlush, Handle: 3}, nil)
	if res := o.simpleReply(0); res.errno != 0 {
		t.Fatalf("the other export's client was cut: %v", res.errno)
	}

	// The fence survives a restart: it is in the file.
	again, err := LoadFences(fencePath)
	if err != nil {
		t.Fatal(err)
	}
	if l := again.List(); len(l) != 1 || l[0].Client != "127.0.0.1" || l[0].Export != "disk" {
		t.Fatalf("reloaded fences: %+v", l)
	}
	if ok, err := srv.UnfenceClient("127.0.0.1", "disk"); !ok || err != nil {
		t.Fatalf("unfence: %v %v", ok, err)
	}
	u := dialRaw(t, addr)
	u.open("disk", false)
}

func TestValidateFenceClient(t *testing.T) {
	for _, s := range []string{"192.0.2.7", "10.0.0.0/24", "fd00::1", "dom0-a",
		"fe80::1%eth0", "::ffff:10.0.1.21", "::ffff:10.0.0.0/104"} {
		if err := ValidateFenceClient(s); err != nil {
			t.Errorf("%q: %v", s, err)
		}
	}
	// Not a name either: what looks like an address but is none would be
	// a fence that matches nothing.
	for _, s := range []string{"", "a b", "x/y", strings.Repeat("a", 300),
		"10.0.1.300", "10.0.0.0/33", "fe80::1%", "fe80::zz", "::ffff:0:0/95"} {
		if err := ValidateFenceClient(s); err == nil {
			t.Errorf("%q accepted", s)
		}
	}
}

// A fence that cannot be saved is enforced all the same, and says so; an
// unfence that cannot be saved is too, so that memory and file agree when
// the file was replaced after all (atomicfile.ErrNotDurable).
func TestFenceThatCannotBeSavedIsEnforced(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	hb := &hookBackend{Backend: disk.Backend}
	disk.Backend = hb
	path := filepath.Join(t.TempDir(), "fences.json")
	fences, err := LoadFences(path)
	if err != nil {
		t.Fatal(err)
	}
	ts := fenceServerWith(t, Config{Fences: fences}, disk, nil)
	c := dialRaw(t, ts.addr)
	c.open("disk", false)

	// A non-empty directory where the file goes: renaming over it fails.
	if err := os.MkdirAll(filepath.Join(path, "in-the-way"), 0o700); err != nil {
		t.Fatal(err)
	}
	cut, err := ts.srv.FenceClient(context.Background(), Fence{Client: "127.0.0.1", Export: "disk"})
	if cut != 1 || !errors.Is(err, ErrFenceNotSaved) {
		t.Fatalf("FenceClient = %d, %v; want the connection cut and ErrFenceNotSaved", cut, err)
	}
	if l := fences.List(); len(l) != 1 || l[0].Client != "127.0.0.1" {
		t.Fatalf("fences in force: %+v", l)
	}
	late, _ := nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 1, Offset: 0, Length: 4}.AppendBinary(nil)
	c.nc.Write(append(late, "late"...)) // fails if the server closed the connection already
	c.drainUntilClosed()
	n := dialRaw(t, ts.addr)
	n.greet(nbd.ClientFlagFixedNewstyle)
	if got, msg := n.goReply("disk"); got != nbd.RepErrPolicy {
		t.Fatalf("GO after a fence that was not saved: %v %q, want NBD_REP_ERR_POLICY", got, msg)
	}

	ok, err := ts.srv.UnfenceClient("127.0.0.1", "disk")
	if !ok || !errors.Is(err, ErrFenceNotSaved) {
		t.Fatalf("UnfenceClient = %v, %v; want the fence lifted and ErrFenceNotSaved", ok, err)
	}
	if l := fences.List(); len(l) != 0 {
		t.Fatalf("fences in force after unfencing: %+v", l)
	}
	u := dialRaw(t, ts.addr)
	u.open("disk", false)
	if writes := writesDone(t, ts, hb); len(writes) > 0 {
		t.Errorf("writes reached the storage: %v", writes)
	}
}

// Without a client CA no client has a certificate name: a fence by name
// would cut nothing, so it is refused.
func TestFenceByNameNeedsAClientCA(t *testing.T) {
	pki, err := testpki.New(t.TempDir(), "hv1")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		tls  *tls.Config
	}{
		{"no TLS", nil},
		{"TLS without a client CA", &tls.Config{Certificates: []tls.Certificate{pki.Server}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			disk, _ := fileExport(t, "disk", 1<<20, false)
			ts := fenceServerWith(t, Config{TLS: tt.tls}, disk, nil)
			c := dialRaw(t, ts.addr)
			c.open("disk", false)
			cut, err := ts.srv.FenceClient(context.Background(), Fence{Client: "hv1"})
			if !errors.Is(err, ErrFenceNameNeedsCA) {
				t.Fatalf("FenceClient by name = %d, %v; want ErrFenceNameNeedsCA", cut, err)
			}
			if l := ts.srv.Fences().List(); len(l) != 0 {
				t.Errorf("a refused fence was recorded: %+v", l)
			}
		})
	}
}

// A fence by certificate name covers the clients that show that name, over
// TLS, and no other: not those with another name, and not those that show
// none (plain text, TLS without a certificate), whose hosts it may not
// be: cutting them all would take the disks of every host that uses no
// certificate. A host that can connect without one is fenced by address.
func TestFenceByNameCoversTheClientsShowingIt(t *testing.T) {
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	other, err := testpki.New(t.TempDir(), "dom0-b")
	if err != nil {
		t.Fatal(err)
	}
	serverTLS := pki.ServerConfig()
	serverTLS.ClientCAs.AddCert(other.CA)
	disk, _ := fileExport(t, "disk", 1<<20, false) // TLS optional
	ts := fenceServerWith(t, Config{TLS: serverTLS}, disk, nil)
	dial := func(t *testing.T, cfg *tls.Config) *rawClient {
		t.Helper()
		c := dialRaw(t, ts.addr)
		c.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
		if cfg != nil {
			if err := c.startTLS(cfg); err != nil {
				t.Fatal(err)
			}
		}
		return c
	}
	tests := []struct {
		name   string
		tls    *tls.Config
		fenced bool
	}{
		{"plain text", nil, false},
		{"TLS without a certificate", pki.ClientConfig(false), false},
		{"certificate dom0-a", pki.ClientConfig(true), true},
		{"certificate dom0-b", &tls.Config{RootCAs: pki.CAPool, ServerName: "localhost",
			Certificates: []tls.Certificate{other.Client}}, false},
	}
	conns := map[string]*rawClient{}
	for _, tt := range tests {
		c := dial(t, tt.tls)
		if got, msg := c.goReply("disk"); got != nbd.RepAck {
			t.Fatalf("%s: GO before the fence: %v %q", tt.name, got, msg)
		}
		conns[tt.name] = c
	}
	cut, err := ts.srv.FenceClient(context.Background(), Fence{Client: "dom0-a"})
	if err != nil || cut != 1 {
		t.Fatalf("FenceClient(dom0-a) = %d, %v; want dom0-a's one connection cut", cut, err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := conns[tt.name]
			c.t = t
			if tt.fenced {
				c.expectClosed()
			} else {
				c.request(nbd.RequestHeader{Command: nbd.CmdFlush, Handle: 1}, nil)
				if res := c.simpleReply(0); res.errno != 0 {
					t.Fatalf("flush: %v", res.errno)
				}
			}
			want := nbd.RepAck
			if tt.fenced {
				want = nbd.RepErrPolicy
			}
			if got, msg := dial(t, tt.tls).goReply("disk"); got != want {
				t.Errorf("GO of a new connection: %v %q, want %v", got, msg, want)
			}
		})
	}
}

// recordingConn keeps a copy of every byte read through it.
type recordingConn struct {
	net.Conn
	mu   sync.Mutex
	read []byte
}

func (c *recordingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.mu.Lock()
	c.read = append(c.read, b[:n]...)
	c.mu.Unlock()
	return n, err
}

// startTLSRecording is startTLS, keeping the TLS records the server sends.
func (c *rawClient) startTLSRecording(cfg *tls.Config) *recordingConn {
	c.t.Helper()
	if r := c.option(nbd.OptStartTLS, nil); r[0].typ != nbd.RepAck {
		c.t.Fatalf("STARTTLS: %v %s", r[0].typ, r[0].data)
	}
	rec := &recordingConn{Conn: c.nc}
	tc := tls.Client(rec, cfg)
	if err := tc.Handshake(); err != nil {
		c.t.Fatal(err)
	}
	c.nc, c.r = tc, bufio.NewReader(tc)
	return rec
}

// lastRecordType is the content type of the last TLS record in stream, or 0
// if there is none or the stream ends inside one.
func lastRecordType(stream []byte) byte {
	var typ byte
	for len(stream) > 0 {
		if len(stream) < 5 {
			return 0
		}
		n := 5 + (int(stream[3])<<8 | int(stream[4]))
		if len(stream) < n {
			return 0
		}
		typ, stream = stream[0], stream[n:]
	}
	return typ
}

// The server ends a TLS session with a close_notify before it closes the
// connection: at NBD_CMD_DISC, as the spec says it MUST, and when it ends a
// handshake, as it SHOULD. Without the alert, a client cannot tell the end
// from a cut connection (gnutls logs "non-properly terminated").
func TestTLSSessionEndsWithCloseNotify(t *testing.T) {
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	disk, _ := fileExport(t, "disk", 1<<20, false)
	ts := startServer(t, &Config{TLS: pki.ServerConfig()}, disk)
	// TLS 1.2, whose record headers show an alert as one: TLS 1.3 labels
	// every record application data.
	cfg := pki.ClientConfig(false)
	cfg.MaxVersion = tls.VersionTLS12
	const alert = 21 // TLS ContentType alert

	tests := []struct {
		name string
		end  func(c *rawClient)
	}{
		{"NBD_CMD_DISC", func(c *rawClient) {
			if typ, msg := c.goReply("disk"); typ != nbd.RepAck {
				t.Fatalf("GO: %v %s", typ, msg)
			}
			c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: 1, Length: 512}, nil)
			if res := c.simpleReply(512); res.errno != 0 {
				t.Fatalf("read: %v", res.errno)
			}
			c.request(nbd.RequestHeader{Command: nbd.CmdDisc, Handle: 2}, nil)
		}},
		{"NBD_OPT_ABORT", func(c *rawClient) {
			if r := c.option(nbd.OptAbort, nil); r[0].typ != nbd.RepAck {
				t.Fatalf("ABORT: %v", r[0].typ)
			}
		}},
		{"refused NBD_OPT_EXPORT_NAME", func(c *rawClient) {
			c.sendOption(nbd.OptExportName, []byte("nope"))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dialRaw(t, ts.addr)
			c.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
			rec := c.startTLSRecording(cfg)
			tt.end(c)
			c.drainUntilClosed()
			rec.mu.Lock()
			defer rec.mu.Unlock()
			if got := lastRecordType(rec.read); got != alert {
				t.Errorf("the server's last TLS record has type %d, want %d (its close_notify)", got, alert)
			}
		})
	}
}

// tlsOverPipe returns the server end of a TLS 1.2 session over a pipe, its
// handshake done, and the pipe's server side. A pipe has no buffer: a write
// waits for the peer to read, and the client reads nothing after the
// handshake (TLS 1.2 sends nothing more), so an alert the server sends
// waits. The client's end is closed when the test ends.
func tlsOverPipe(t *testing.T) (*tls.Conn, net.Conn) {
	t.Helper()
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	t.Cleanup(func() { b.Close() })
	srv := tls.Server(a, pki.ServerConfig())
	cfg := pki.ClientConfig(false)
	cfg.MaxVersion = tls.VersionTLS12
	cli := tls.Client(b, cfg)
	handshake := make(chan error, 1)
	go func() { handshake <- cli.Handshake() }()
	if err := srv.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-handshake; err != nil {
		t.Fatal(err)
	}
	return srv, a
}

// A client that does not read holds the server's close_notify, and with it
// the close of its connection, for no more than closeNotifyTimeout.
func TestCloseTLSIsBounded(t *testing.T) {
	defer func(d time.Duration) { closeNotifyTimeout = d }(closeNotifyTimeout)
	closeNotifyTimeout = 100 * time.Millisecond
	srv, a := tlsOverPipe(t)

	// The client reads nothing from here on.
	start := time.Now()
	closeTLS(srv)
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("closing a TLS connection whose peer does not read took %v, want about %v", took, closeNotifyTimeout)
	}
	if _, err := a.Write([]byte{0}); !errors.Is(err, net.ErrClosed) && !errors.Is(err, io.ErrClosedPipe) {
		t.Errorf("after closeTLS, a write to the connection returned %v, want it closed", err)
	}
}

// A fence or a kick cuts a TLS connection at once: no close_notify, which a
// client that does not read would hold for crypto/tls's 5 s.
func TestCutDoesNotWaitForTheClient(t *testing.T) {
	defer func(d time.Duration) { closeNotifyTimeout = d }(closeNotifyTimeout)
	closeNotifyTimeout = time.Hour // a cut that waited for the alert would show
	srv, a := tlsOverPipe(t)

	cutDone := make(chan struct{})
	go func() { cut(srv); close(cutDone) }()
	select {
	case <-cutDone:
	case <-time.After(3 * time.Second): // the alert would hold it 5 s
		t.Fatal("cut waited for a client that does not read")
	}
	if _, err := a.Write([]byte{0}); !errors.Is(err, net.ErrClosed) && !errors.Is(err, io.ErrClosedPipe) {
		t.Errorf("after cut, a write to the connection returned %v, want it closed", err)
	}
}
