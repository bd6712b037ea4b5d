package client

import (
	"context"
	"errors"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lvnbd/lvnbd/nbd"
)

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func dialT(t testing.TB, uri string, opts *Options) *Conn {
	t.Helper()
	c, err := Dial(testContext(t), uri, opts)
	if err != nil {
		t.Fatalf("Dial(%s): %v", uri, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestDialHandshakeVariants(t *testing.T) {
	const size = 1 << 20
	base := newFakeExport(size, "a test disk").flags
	tests := []struct {
		name        string
		server      *fakeServer
		opts        *Options
		wantOptions []nbd.Option
		want        ExportInfo
	}{
		{
			name:        "go with structured replies and base:allocation",
			wantOptions: []nbd.Option{nbd.OptStructuredReply, nbd.OptSetMetaContext, nbd.OptGo},
			want: ExportInfo{Name: "disk", Description: "a test disk", Size: size, Flags: base | nbd.FlagSendDF,
				BlockSizes: DefaultBlockSizes, StructuredReplies: true,
				MetaContexts: []nbd.MetaContext{{ID: fakeMetaID, Name: "base:allocation"}}},
		},
		{
			name:        "kernel path: no structured replies",
			opts:        &Options{NoStructuredReplies: true},
			wantOptions: []nbd.Option{nbd.OptGo},
			want:        ExportInfo{Name: "disk", Description: "a test disk", Size: size, Flags: base, BlockSizes: DefaultBlockSizes},
		},
		{
			name:        "no meta context asked",
			opts:        &Options{NoMetaContext: true},
			wantOptions: []nbd.Option{nbd.OptStructuredReply, nbd.OptGo},
			want: ExportInfo{Name: "disk", Description: "a test disk", Size: size, Flags: base | nbd.FlagSendDF,
				BlockSizes: DefaultBlockSizes, StructuredReplies: true},
		},
		{
			name:        "server without structured replies",
			server:      &fakeServer{noStructured: true},
			wantOptions: []nbd.Option{nbd.OptStructuredReply, nbd.OptGo},
			want:        ExportInfo{Name: "disk", Description: "a test disk", Size: size, Flags: base, BlockSizes: DefaultBlockSizes},
		},
		{
			name:        "server without meta contexts",
			server:      &fakeServer{noMeta: true},
			wantOptions: []nbd.Option{nbd.OptStructuredReply, nbd.OptSetMetaContext, nbd.OptGo},
			want: ExportInfo{Name: "disk", Description: "a test disk", Size: size, Flags: base | nbd.FlagSendDF,
				BlockSizes: DefaultBlockSizes, StructuredReplies: true},
		},
		{
			name:        "server without GO falls back to EXPORT_NAME",
			server:      &fakeServer{noGo: true},
			wantOptions: []nbd.Option{nbd.OptStructuredReply, nbd.OptSetMetaContext, nbd.OptGo, nbd.OptExportName},
			want: ExportInfo{Name: "disk", Size: size, Flags: base | nbd.FlagSendDF, BlockSizes: DefaultBlockSizes,
				StructuredReplies: true, MetaContexts: []nbd.MetaContext{{ID: fakeMetaID, Name: "base:allocation"}}},
		},
		{
			name:        "EXPORT_NAME fallback with zero padding",
			server:      &fakeServer{noGo: true, noZeroes: true, noStructured: true},
			wantOptions: []nbd.Option{nbd.OptStructuredReply, nbd.OptGo, nbd.OptExportName},
			want:        ExportInfo{Name: "disk", Size: size, Flags: base, BlockSizes: DefaultBlockSizes},
		},
		{
			name:        "plain newstyle server",
			server:      &fakeServer{noFixed: true, noZeroes: true},
			wantOptions: []nbd.Option{nbd.OptExportName},
			want:        ExportInfo{Name: "disk", Size: size, Flags: base, BlockSizes: DefaultBlockSizes},
		},
		{
			name:        "advertised block sizes",
			server:      &fakeServer{blockSizes: &BlockSizes{Minimum: 512, Preferred: 4096, MaxPayload: 64 << 10}},
			wantOptions: []nbd.Option{nbd.OptStructuredReply, nbd.OptSetMetaContext, nbd.OptGo},
			want: ExportInfo{Name: "disk", Description: "a test disk", Size: size, Flags: base | nbd.FlagSendDF,
				BlockSizes: BlockSizes{512, 4096, 64 << 10}, BlockSizesAdvertised: true, StructuredReplies: true,
				MetaContexts: []nbd.MetaContext{{ID: fakeMetaID, Name: "base:allocation"}}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := tt.server
			if s == nil {
				s = &fakeServer{}
			}
			s.exports = map[string]*fakeExport{"disk": newFakeExport(size, "a test disk")}
			c := dialT(t, s.start(t, "disk"), tt.opts)
			if diff := cmp.Diff(tt.want, c.Export()); diff != "" {
				t.Errorf("ExportInfo (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.wantOptions, s.seenOptions()); diff != "" {
				t.Errorf("options sent (-want +got):\n%s", diff)
			}
			// Transmission works whatever was negotiated.
			ctx := testContext(t)
			data := pattern(8192, 3)
			if err := c.WriteAt(ctx, data, 4096, 0); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(data))
			if err := c.ReadAt(ctx, got, 4096); err != nil {
				t.Fatal(err)
			}
			mustEqual(t, "read back", data, got)
			_, err := c.BlockStatus(ctx, 0, size, 0)
			if hasMeta := len(tt.want.MetaContexts) > 0; hasMeta != (err == nil) {
				t.Errorf("BlockStatus: %v, want success %v", err, hasMeta)
			}
			if err != nil && !errors.Is(err, ErrUnsupported) {
				t.Errorf("BlockStatus without a context: %v, want ErrUnsupported", err)
			}
		})
	}
}

func TestDialUnknownExport(t *testing.T) {
	tests := []struct {
		name       string
		server     *fakeServer
		wantMsg    string
		wantOption []nbd.Option
	}{
		{
			name:    "GO says unknown",
			wantMsg: `export "nope" not found on 127.0.0.1:PORT: no export called "nope" here`,
			// The client aborts softly after the refusal.
			wantOption: []nbd.Option{nbd.OptStructuredReply, nbd.OptSetMetaContext, nbd.OptGo, nbd.OptAbort},
		},
		{
			name:       "EXPORT_NAME hangs up",
			server:     &fakeServer{noGo: true},
			wantMsg:    `export "nope" not found on 127.0.0.1:PORT: the server closed the connection after NBD_OPT_EXPORT_NAME`,
			wantOption: []nbd.Option{nbd.OptStructuredReply, nbd.OptSetMetaContext, nbd.OptGo, nbd.OptExportName},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := tt.server
			if s == nil {
				s = &fakeServer{}
			}
			s.exports = map[string]*fakeExport{"disk": newFakeExport(4096, "")}
			uri := s.start(t, "nope")
			_, err := Dial(testContext(t), uri, nil)
			if !errors.Is(err, ErrExportNotFound) {
				t.Fatalf("Dial: %v, want ErrExportNotFound", err)
			}
			var oe *OptionError
			if !errors.As(err, &oe) {
				t.Fatalf("Dial: %T, want *OptionError", err)
			}
			want := strings.ReplaceAll(tt.wantMsg, "127.0.0.1:PORT", s.ln.Addr().String())
			if !strings.HasPrefix(err.Error(), want) {
				t.Errorf("error %q, want it to start with %q", err, want)
			}
			if diff := cmp.Diff(tt.wantOption, s.seenOptions()); diff != "" {
				t.Errorf("options (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDialErrors(t *testing.T) {
	// A port nobody listens on.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := ln.Addr().String()
	ln.Close()

	tests := []struct {
		name    string
		uri     string
		is      error
		wantMsg string
	}{
		{"refused", "nbd://" + refused + "/x", syscall.ECONNREFUSED, "cannot connect to " + refused + ": connection refused"},
		{"no socket", "nbd+unix:///x?socket=" + t.TempDir() + "/none", syscall.ENOENT, "cannot connect to "},
		{"tls refused", "nbds://" + refused + "/x", syscall.ECONNREFUSED, "cannot connect to " + refused + ": connection refused"},
		{"tls-type psk", "nbds://" + refused + "/x?tls-type=psk", ErrTLSNotSupported, "X.509 TLS only"},
		{"bad uri", "nbd:/x", ErrBadURI, "invalid NBD URI"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Dial(testContext(t), tt.uri, nil)
			if !errors.Is(err, tt.is) || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("Dial(%s): %v, want %v containing %q", tt.uri, err, tt.is, tt.wantMsg)
			}
			if _, err := List(testContext(t), tt.uri, nil); !errors.Is(err, tt.is) {
				t.Errorf("List(%s): %v, want %v", tt.uri, err, tt.is)
			}
			if _, err := Info(testContext(t), tt.uri, nil); !errors.Is(err, tt.is) {
				t.Errorf("Info(%s): %v, want %v", tt.uri, err, tt.is)
			}
		})
	}
}

func TestListAndInfo(t *testing.T) {
	s := &fakeServer{exports: map[string]*fakeExport{
		"b": newFakeExport(4096, "second"), "a": newFakeExport(8192, "first\x07 with a bell"),
	}}
	uri := s.start(t, "a")
	ctx := testContext(t)
	list, err := List(ctx, uri, nil)
	if err != nil {
		t.Fatal(err)
	}
	wantList := []nbd.ServerEntry{{Name: "a", Description: "first  with a bell"}, {Name: "b", Description: "second"}}
	if diff := cmp.Diff(wantList, list); diff != "" {
		t.Errorf("List (-want +got):\n%s", diff)
	}
	info, err := Info(ctx, uri, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := ExportInfo{Name: "a", Description: "first  with a bell", Size: 8192,
		Flags: s.exports["a"].flags | nbd.FlagSendDF, BlockSizes: DefaultBlockSizes, StructuredReplies: true,
		MetaContexts: []nbd.MetaContext{{ID: fakeMetaID, Name: "base:allocation"}}}
	if diff := cmp.Diff(want, info); diff != "" {
		t.Errorf("Info (-want +got):\n%s", diff)
	}

	if _, err := Info(ctx, strings.TrimSuffix(uri, "a")+"zz", nil); !errors.Is(err, ErrExportNotFound) {
		t.Errorf("Info of a missing export: %v, want ErrExportNotFound", err)
	}

	old := &fakeServer{noGo: true, exports: map[string]*fakeExport{"a": newFakeExport(8192, "")}}
	info, err = Info(ctx, old.start(t, "a"), nil)
	if err != nil {
		t.Fatalf("Info on a server without NBD_OPT_INFO: %v", err)
	}
	if info.Size != 8192 {
		t.Errorf("Info fallback size %d, want 8192", info.Size)
	}
	wantOpts := []nbd.Option{nbd.OptStructuredReply, nbd.OptInfo, nbd.OptListMetaContext, nbd.OptExportName}
	if diff := cmp.Diff(wantOpts, old.seenOptions()); diff != "" {
		t.Errorf("fallback options (-want +got):\n%s", diff)
	}
}

// Negotiate leaves the socket at the start of transmission, as the kernel
// attach path needs.
func TestNegotiateThenNewConn(t *testing.T) {
	s := &fakeServer{exports: map[string]*fakeExport{"k": newFakeExport(1<<16, "")}}
	uri := s.start(t, "k")
	u, err := ParseURI(uri)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := net.Dial(u.Network(), u.Address())
	if err != nil {
		t.Fatal(err)
	}
	ctx := testContext(t)
	info, err := Negotiate(ctx, nc, "k", &Options{NoStructuredReplies: true})
	if err != nil {
		t.Fatal(err)
	}
	if info.StructuredReplies || info.Size != 1<<16 {
		t.Fatalf("Negotiate: %+v", info)
	}
	c := NewConn(nc, info, nil)
	defer c.Close()
	data := pattern(1000, 9)
	if err := c.WriteAt(ctx, data, 100, nbd.CmdFlagFUA); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1000)
	if err := c.ReadAt(ctx, got, 100); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "read back", data, got)
}

func TestHandshakeContext(t *testing.T) {
	// A server that accepts and never speaks.
	block := make(chan struct{})
	uri := serveRaw(t, func(nc net.Conn) { <-block })
	defer close(block)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := Dial(ctx, uri, nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Dial to a silent server: %v, want DeadlineExceeded", err)
	}
}
