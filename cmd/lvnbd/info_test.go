package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lvnbd/lvnbd/internal/testpki"
	"github.com/lvnbd/lvnbd/internal/tlscrl"
	"github.com/lvnbd/lvnbd/server"
)

const infoTestSize = 8 << 20

// infoTestServer serves two exports on a loopback port until the test ends:
// vm1, a sparse file with 64 KiB of data at 1 MiB, and golden, read-only. It
// returns the base URI (nbd://127.0.0.1:PORT) and vm1's backing path.
func infoTestServer(t *testing.T) (string, string) {
	t.Helper()
	return infoTestServerWith(t, nil, server.Access{})
}

// infoTestServerWith is infoTestServer with TLS and both exports' access.
func infoTestServerWith(t *testing.T, tlsConfig *tls.Config, access server.Access) (string, string) {
	t.Helper()
	dir := t.TempDir()
	vm1 := filepath.Join(dir, "vm1.img")
	f, err := os.Create(vm1)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(infoTestSize); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xab}, 64<<10), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join(dir, "golden.img")
	if err := os.WriteFile(golden, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}

	reg := server.NewRegistry()
	for _, spec := range []server.ExportSpec{{Name: "vm1", Path: vm1}, {Name: "golden", Path: golden, ReadOnly: true}} {
		e, err := server.OpenExport(spec)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.Backend.Close() })
		e.Access = access
		if err := reg.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	srv := server.New(&server.Config{Exports: reg, TLS: tlsConfig})
	go func() { served <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("server: %v", err)
		}
	})
	return "nbd://" + ln.Addr().String(), vm1
}

// runLvnbd runs the command line args and returns what it printed.
func runInfoCmd(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	root := newRootCmd(&out, &errOut)
	root.SetArgs(args)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := root.ExecuteContext(ctx)
	return out.String(), err
}

func TestInfoText(t *testing.T) {
	base, vm1 := infoTestServer(t)
	got, err := runInfoCmd(t, "info", base+"/vm1")
	if err != nil {
		t.Fatal(err)
	}
	host := strings.TrimPrefix(base, "nbd://")
	want := fmt.Sprintf(`export:              vm1
uri:                 nbd://%s/vm1
description:         %s
size:                8388608 (8.0 MiB)
flags:               HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES SEND_DF CAN_MULTI_CONN SEND_CACHE SEND_FAST_ZERO
read-only:           no
block sizes:         minimum 1, preferred 4096, maximum payload 33554432 (32 MiB)
meta contexts:       base:allocation
structured replies:  yes
tls:                 no
`, host, vm1)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("lvnbd info (-want +got):\n%s", diff)
	}
}

func TestInfoJSON(t *testing.T) {
	base, _ := infoTestServer(t)
	out, err := runInfoCmd(t, "info", "--json", base+"/golden")
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("output is not one JSON object: %v\n%s", err, out)
	}
	delete(got, "description") // the temporary path
	want := map[string]any{
		"uri":                    base + "/golden",
		"export_name":            "golden",
		"size":                   float64(1 << 20),
		"transmission_flags":     []any{"HAS_FLAGS", "READ_ONLY", "SEND_FLUSH", "SEND_DF", "CAN_MULTI_CONN", "SEND_CACHE"},
		"transmission_flags_raw": float64(1 | 2 | 4 | 128 | 256 | 1024),
		"read_only":              true,
		"can_multi_conn":         true,
		"block_size":             map[string]any{"minimum": float64(1), "preferred": float64(4096), "maximum_payload": float64(32 << 20), "advertised": true},
		"meta_contexts":          []any{"base:allocation"},
		"structured_replies":     true,
		"tls":                    false,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("lvnbd info --json (-want +got):\n%s", diff)
	}
}

func TestInfoList(t *testing.T) {
	base, vm1 := infoTestServer(t)
	golden := filepath.Join(filepath.Dir(vm1), "golden.img")
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"info", "--list", base}, fmt.Sprintf("NAME    DESCRIPTION\ngolden  %s\nvm1     %s\n", golden, vm1)},
		{[]string{"info", "--list", "--json", base + "/ignored"}, fmt.Sprintf(`[
  {
    "name": "golden",
    "description": %q
  },
  {
    "name": "vm1",
    "description": %q
  }
]
`, golden, vm1)},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args[1:len(tt.args)-1], " "), func(t *testing.T) {
			got, err := runInfoCmd(t, tt.args...)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("lvnbd %s (-want +got):\n%s", strings.Join(tt.args, " "), diff)
			}
		})
	}
}

func TestInfoMap(t *testing.T) {
	base, _ := infoTestServer(t)
	got, err := runInfoCmd(t, "info", "--map", base+"/vm1")
	if err != nil {
		t.Fatal(err)
	}
	want := ` OFFSET   LENGTH  FLAGS  DESCRIPTION
      0  1048576      3  hole,zero
1048576    65536      0  data
1114112  7274496      3  hole,zero
`
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("lvnbd info --map (-want +got):\n%s", diff)
	}

	out, err := runInfoCmd(t, "info", "--map", "--json", base+"/vm1")
	if err != nil {
		t.Fatal(err)
	}
	var m mapJSON
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("--map --json output: %v\n%s", err, out)
	}
	wantMap := mapJSON{URI: base + "/vm1", ExportName: "vm1", Size: infoTestSize, Map: []extentJSON{
		{Offset: 0, Length: 1 << 20, Flags: 3, Description: "hole,zero"},
		{Offset: 1 << 20, Length: 64 << 10, Flags: 0, Description: "data"},
		{Offset: 1<<20 + 64<<10, Length: infoTestSize - (1<<20 + 64<<10), Flags: 3, Description: "hole,zero"},
	}}
	if diff := cmp.Diff(wantMap, m); diff != "" {
		t.Errorf("lvnbd info --map --json (-want +got):\n%s", diff)
	}
}

func TestInfoErrors(t *testing.T) {
	base, _ := infoTestServer(t)
	host := strings.TrimPrefix(base, "nbd://")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := ln.Addr().String()
	ln.Close()
	tests := []struct {
		name string
		args []string
		want string // the whole message, or its start if it ends in "…"
	}{
		{"unreachable", []string{"info", "nbd://" + refused + "/vm1"},
			"cannot connect to " + refused + ": connection refused — is lvnbd serve running?"},
		{"unreachable list", []string{"info", "--list", "nbd://" + refused},
			"cannot connect to " + refused + ": connection refused — is lvnbd serve running?"},
		{"no socket", []string{"info", "nbd+unix:///vm1?socket=/nonexistent/lvnbd.sock"},
			"cannot connect to /nonexistent/lvnbd.sock: no such file or directory — is lvnbd serve running?"},
		{"unknown export", []string{"info", base + "/nope"},
			`export "nope" not found on ` + host + `: no export "nope" on this server…`},
		{"unknown export map", []string{"info", "--map", base + "/nope"},
			`export "nope" not found on ` + host + `: no export "nope" on this server…`},
		{"tls from a server without", []string{"info", "nbds://" + host + "/vm1?tls-verify-peer=0"},
			host + " refused to start TLS (NBD_OPT_STARTTLS answered with NBD_REP_ERR_POLICY): TLS is not configured on this server" +
				" — it has no TLS to offer: use nbd:// if plain text will do, or give the server a certificate (lvnbd serve --tls-cert, --tls-key)"},
		{"tls flags for plain text", []string{"info", "--tls-ca", "/etc/ssl/certs/ca-certificates.crt", base + "/vm1"},
			"--tls-ca, --tls-cert, --tls-key and --tls-crl are for nbds:// URIs, and " + base + "/vm1 is plain text: write nbds:// for TLS, or leave them out"},
		{"tls parameter in a plain-text URI", []string{"info", base + "/vm1?tls-hostname=storage-a"},
			base + "/vm1?tls-hostname=storage-a is a plain-text URI, yet it has tls-hostname: write nbds:// (or nbds+unix://) for TLS"},
		{"tls certificates named twice", []string{"info", "--tls-ca", "/etc/ssl/certs/ca-certificates.crt", "nbds://" + host + "/vm1?tls-certificates=/etc/lvnbd/pki"},
			"nbds://" + host + "/vm1?tls-certificates=/etc/lvnbd/pki names its certificates (tls-certificates=/etc/lvnbd/pki): give them either so or with --tls-ca, --tls-cert, --tls-key and --tls-crl, not both"},
		{"tls certificate without key", []string{"info", "--tls-cert", "/nonexistent/c.pem", "nbds://" + host + "/vm1"},
			"--tls-ca/--tls-cert/--tls-key: TLS client certificate /nonexistent/c.pem has no key file: give both"},
		{"tls crl with the URI's certificates", []string{"info", "--tls-crl", "/etc/lvnbd/crl.pem", "nbds://" + host + "/vm1?tls-certificates=/etc/lvnbd/pki"},
			"nbds://" + host + "/vm1?tls-certificates=/etc/lvnbd/pki names its certificates (tls-certificates=/etc/lvnbd/pki): put the CRL there as /etc/lvnbd/pki/ca-crl.pem instead of --tls-crl"},
		{"tls crl without verification", []string{"info", "--tls-crl", "/etc/lvnbd/crl.pem", "nbds://" + host + "/vm1?tls-verify-peer=0"},
			"nbds://" + host + "/vm1?tls-verify-peer=0 does not verify the server's certificate (tls-verify-peer=0), so --tls-crl could refuse nothing: leave one of them out"},
		{"tls crl missing", []string{"info", "--tls-crl", "/nonexistent/crl.pem", "nbds://" + host + "/vm1"},
			"--tls-crl: reading the CRL: open /nonexistent/crl.pem: no such file or directory"},
		{"bad uri", []string{"info", "storage-a/vm1"}, `invalid NBD URI "storage-a/vm1": no scheme…`},
		{"list and map", []string{"info", "--list", "--map", base}, "--list and --map cannot be combined"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := runInfoCmd(t, tt.args...)
			if err == nil {
				t.Fatal("no error")
			}
			if prefix, ok := strings.CutSuffix(tt.want, "…"); ok {
				if !strings.HasPrefix(err.Error(), prefix) {
					t.Errorf("error %q, want it to start with %q", err, prefix)
				}
			} else if err.Error() != tt.want {
				t.Errorf("error %q, want %q", err, tt.want)
			}
		})
	}
}

// Export names come from the server: text output quotes any that a terminal
// would act on, so a server cannot write escape sequences to it.
func TestShowName(t *testing.T) {
	for _, tc := range []struct{ name, want string }{
		{"", `""`},
		{"vm1", "vm1"},
		{"vm1-snap 2026", "vm1-snap 2026"},
		{"été", "été"},
		{"\x1b[2J\x1b[Hvm1", `"\x1b[2J\x1b[Hvm1"`},
		{"vm1\n", `"vm1\n"`},
		{"bad\xffutf8", `"bad\xffutf8"`},
		{"\u202evm1", `"\u202evm1"`}, // right-to-left override: not printable
	} {
		if got := showName(tc.name); got != tc.want {
			t.Errorf("showName(%q) = %s, want %s", tc.name, got, tc.want)
		}
	}
}

// nbdkitURI runs nbdkit with args on a Unix socket until the test ends and
// returns its URI. nbdkit starts the --run command once it listens, and
// exits when that does: the command prints the URI and waits for its
// standard input, which closes when the test ends.
func nbdkitURI(t *testing.T, args ...string) string {
	t.Helper()
	return startNbdkit(t, false, args...)
}

// nbdkitStalling is nbdkitURI for a server made to stall (the delay filter)
// that the test hangs up on with requests in flight: nbdkit 1.32 may then
// abort (an assertion in raw_send_socket, as its delayed reply meets the
// closed socket), which is nbdkit's end, not the test's.
func nbdkitStalling(t *testing.T, args ...string) string {
	t.Helper()
	return startNbdkit(t, true, args...)
}

func startNbdkit(t *testing.T, abortOK bool, args ...string) string {
	t.Helper()
	path, err := exec.LookPath("nbdkit")
	if err != nil {
		if os.Getenv("LVNBD_REQUIRE_INTEROP") == "1" {
			t.Fatalf("nbdkit is not installed (Debian package nbdkit) and LVNBD_REQUIRE_INTEROP=1")
		}
		t.Skip("nbdkit is not installed (Debian package nbdkit); set LVNBD_REQUIRE_INTEROP=1 to fail instead")
	}
	cmd := exec.Command(path, append([]string{"-U", "-", "--run", `echo "$uri"; cat >/dev/null`}, args...)...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		err := cmd.Wait()
		var ee *exec.ExitError
		if abortOK && errors.As(err, &ee) && ee.ExitCode() == 128+int(syscall.SIGABRT) {
			return
		}
		if err != nil {
			t.Errorf("nbdkit: %v\n%s", err, stderr.String())
		}
	})
	uri, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("nbdkit %q printed no URI: %v\n%s", args, err, stderr.String())
	}
	return strings.TrimSpace(uri)
}

// An export whose size is not a multiple of the server's minimum block size:
// the map covers what requests may ask about, and says how long the rest is.
func TestInfoMapUnalignedTail(t *testing.T) {
	uri := nbdkitURI(t, "--filter=blocksize-policy", "memory", "size=5000", "blocksize-minimum=512")
	got, err := runInfoCmd(t, "info", "--map", uri)
	if err != nil {
		t.Fatal(err)
	}
	want := `OFFSET  LENGTH  FLAGS  DESCRIPTION
     0    4608      3  hole,zero
(not mapped: the last 392 bytes, past the last multiple of the server's minimum block size of 512 bytes, which no request may ask about)
`
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("lvnbd info --map (-want +got):\n%s", diff)
	}
	out, err := runInfoCmd(t, "info", "--map", "--json", uri)
	if err != nil {
		t.Fatal(err)
	}
	var m mapJSON
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("--map --json output: %v\n%s", err, out)
	}
	wantMap := []extentJSON{{Offset: 0, Length: 4608, Flags: 3, Description: "hole,zero"}}
	if diff := cmp.Diff(wantMap, m.Map); diff != "" || m.Size != 5000 || m.Unmapped != 392 {
		t.Errorf("lvnbd info --map --json: size %d, unmapped %d, map (-want +got):\n%s", m.Size, m.Unmapped, diff)
	}
}

// TestInfoOverTLS: info, --list and --map over nbds://, the certificates
// named by flags or by the URI, and the hints a failed TLS handshake gets.
func TestInfoOverTLS(t *testing.T) {
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	base, _ := infoTestServerWith(t, pki.ServerConfig(), server.Access{TLS: server.TLSRequired, AllowNames: []string{"dom0-a"}})
	host := strings.TrimPrefix(base, "nbd://")
	// A server that wants a client certificate in the TLS handshake itself,
	// as nbdkit --tls-verify-peer and qemu-nbd do.
	strict := pki.ServerConfig()
	strict.ClientAuth = tls.RequireAndVerifyClientCert
	strictBase, _ := infoTestServerWith(t, strict, server.Access{TLS: server.TLSRequired})
	strictHost := strings.TrimPrefix(strictBase, "nbd://")

	file := func(name string) string { return filepath.Join(pki.Dir, name) }
	flags := []string{"--tls-ca", file("ca-cert.pem"), "--tls-cert", file("client-cert.pem"), "--tls-key", file("client-key.pem")}
	uri := "nbds://" + host + "/vm1"

	t.Run("flags", func(t *testing.T) {
		out, err := runInfoCmd(t, append([]string{"info", uri}, flags...)...)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "size:                8388608") || !strings.Contains(out, "tls:                 yes") {
			t.Errorf("lvnbd info over TLS:\n%s", out)
		}
	})
	t.Run("the URI's tls-certificates, --json", func(t *testing.T) {
		out, err := runInfoCmd(t, "info", "--json", uri+"?tls-certificates="+pki.Dir)
		if err != nil {
			t.Fatal(err)
		}
		var got struct {
			URI string `json:"uri"`
			TLS bool   `json:"tls"`
		}
		if err := json.Unmarshal([]byte(out), &got); err != nil || !got.TLS || got.URI != uri+"?tls-certificates="+pki.Dir {
			t.Errorf("lvnbd info --json over TLS: %+v, %v\n%s", got, err, out)
		}
	})
	t.Run("list", func(t *testing.T) {
		out, err := runInfoCmd(t, append([]string{"info", "--list", "nbds://" + host}, flags...)...)
		if err != nil || !strings.Contains(out, "vm1") || !strings.Contains(out, "golden") {
			t.Errorf("lvnbd info --list over TLS: %v\n%s", err, out)
		}
	})
	t.Run("map", func(t *testing.T) {
		out, err := runInfoCmd(t, append([]string{"info", "--map", uri}, flags...)...)
		if err != nil || !strings.Contains(out, "data") {
			t.Errorf("lvnbd info --map over TLS: %v\n%s", err, out)
		}
	})
	// --tls-crl: a CRL that revokes another certificate lets the server
	// in, one that revokes its certificate does not.
	crl := func(revoked *x509.Certificate) string {
		t.Helper()
		if err := pki.WriteCRL(revoked); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "crl.pem")
		if err := os.Rename(file("ca-crl.pem"), path); err != nil {
			t.Fatal(err)
		}
		return path
	}
	t.Run("a CRL revoking another certificate", func(t *testing.T) {
		if _, err := runInfoCmd(t, append([]string{"info", uri, "--tls-crl", crl(pki.Client.Leaf)}, flags...)...); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("a CRL revoking the server's certificate", func(t *testing.T) {
		revoked := crl(pki.Server.Leaf)
		_, err := runInfoCmd(t, append([]string{"info", uri, "--tls-crl", revoked}, flags...)...)
		var re *tlscrl.RevokedError
		if !errors.As(err, &re) || re.Whose != "server" || re.CRL != revoked {
			t.Fatalf("lvnbd info with the server's certificate revoked: %v", err)
		}
	})

	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no CA", []string{"info", uri},
			"give the CA that signed the server's certificate: --tls-ca FILE, or tls-certificates=DIR in the URI"},
		{"a name not in the certificate", []string{"info", "nbds://" + host + "/vm1?tls-hostname=storage-b", "--tls-ca", file("ca-cert.pem")},
			"the server's certificate does not name storage-b: connect by a name it has, or give one with tls-hostname=NAME in the URI"},
		{"no client certificate for a server that wants one in the handshake", []string{"info", "nbds://" + strictHost + "/vm1", "--tls-ca", file("ca-cert.pem")},
			"no client certificate was given: it may want one) — give one: --tls-cert FILE --tls-key FILE, or tls-certificates=DIR in the URI"},
		{"no client certificate for an export that names its clients", []string{"info", uri, "--tls-ca", file("ca-cert.pem")},
			"a client certificate with an allowed name is required"},
		{"plain text", []string{"info", base + "/vm1"}, `requires TLS for export "vm1": use an nbds:// URI`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := runInfoCmd(t, tt.args...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want it to say %q", err, tt.want)
			}
		})
	}
}

// --tls-crl warns of what its CRL cannot do: a stale list still counts,
// but lacks what was revoked since.
func TestClientTLSWarnsOfAStaleCRL(t *testing.T) {
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := pki.SignCRL(&x509.RevocationList{ThisUpdate: time.Now().Add(-48 * time.Hour), NextUpdate: time.Now().Add(-24 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	crl := filepath.Join(t.TempDir(), "crl.pem")
	if err := os.WriteFile(crl, b, 0o600); err != nil {
		t.Fatal(err)
	}
	var warn bytes.Buffer
	c := clientTLS{ca: filepath.Join(pki.Dir, "ca-cert.pem"), crl: crl}
	opts, err := c.options(&warn, "nbds://127.0.0.1/vm1")
	if err != nil || opts == nil || opts.TLS.VerifyConnection == nil {
		t.Fatalf("options: %+v, %v; want a TLS configuration that checks the CRL", opts, err)
	}
	if want := "lvnbd: warning: the CRL " + crl + ` of "CN=lvnbd test CA" was due to be replaced on `; !strings.HasPrefix(warn.String(), want) {
		t.Errorf("warned %q, want %q…", warn.String(), want)
	}
}
