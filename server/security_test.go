package server

import (
	"bufio"
	"context"
	"crypto/tls"
	"net"
	"net/netip"
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
	ts := startServer(t, &Config{TLS: pki.ServerConfig()}, plain, secret, named, elsewhere, open)

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
		{"TLS client with certificate, named export", true, true, "named", nbd.RepAck, []string{"named", "open", "secret"}},
		{"address not allowed", false, false, "elsewhere", nbd.RepErrPolicy, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dialRaw(t, ts.addr)
			c.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
			if tt.tls {
				if err := c.startTLS(pki.ClientConfig(tt.cert)); err != nil {
					t.Fatal(err)
				}
			}
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
		c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: uint64(10 + i), Offset: 4096 * uint64(i+1), Length: 4}, []byte("late"))
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
	for _, s := range []string{"192.0.2.7", "10.0.0.0/24", "fd00::1", "dom0-a"} {
		if err := ValidateFenceClient(s); err != nil {
			t.Errorf("%q: %v", s, err)
		}
	}
	for _, s := range []string{"", "a b", "x/y", strings.Repeat("a", 300)} {
		if err := ValidateFenceClient(s); err == nil {
			t.Errorf("%q accepted", s)
		}
	}
}
