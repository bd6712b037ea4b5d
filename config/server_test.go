package config

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/control"
	"github.com/lvnbd/lvnbd/internal/testpki"
	"github.com/lvnbd/lvnbd/internal/tlscrl"
	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/volume"
)

// validServer are configurations that parse, with what they must give.
var validServer = []struct {
	name string
	doc  string
	want func(c *Config)
}{
	{"empty", ``, func(*Config) {}},
	{"comments only", "# nothing set\n\n", func(*Config) {}},
	{"server table", `
[server]
listen = ["tcp://0.0.0.0:10809", "unix:///run/lvnbd/nbd.sock", "tcp://[::]:10810"]
volumes = "lvm://vg0"
control = ""
rescan = "0s"
handshake_timeout = "10s"
drain_timeout = "2m30s"
max_connections = 10
max_connections_per_client = 2
max_inflight_requests = 32
max_inflight_bytes = "64MiB"
fence_file = ""
failure_file = "/srv/lvnbd/failures.json"
`, func(c *Config) {
		c.Server = Server{
			Listen:  []string{"tcp://0.0.0.0:10809", "unix:///run/lvnbd/nbd.sock", "tcp://[::]:10810"},
			Volumes: "lvm://vg0", Rescan: 0, HandshakeTimeout: 10 * time.Second, DrainTimeout: 150 * time.Second,
			MaxConnections: 10, MaxConnectionsPerClient: 2, MaxInflightRequests: 32, MaxInflightBytes: 64 << 20,
			FailureFile: "/srv/lvnbd/failures.json",
		}
	}},
	{"size as bytes", "[server]\nmax_inflight_bytes = 67108864\n", func(c *Config) { c.Server.MaxInflightBytes = 64 << 20 }},
	{"size like lvm", "[server]\nmax_inflight_bytes = \"1G\"\n", func(c *Config) { c.Server.MaxInflightBytes = 1 << 30 }},
	{"log", "[log]\nlevel = \"debug\"\nformat = \"json\"\n", func(c *Config) { c.Log = Log{Level: "debug", Format: "json"} }},
	{"metrics", "[metrics]\nlisten = \"127.0.0.1:9809\"\n", func(c *Config) { c.Metrics.Listen = "127.0.0.1:9809" }},
	{"tls with client certificates", `
[tls]
cert = "/etc/lvnbd/server.crt"
key = "/etc/lvnbd/server.key"
ca = "/etc/lvnbd/ca.crt"
crl = "/etc/lvnbd/ca-crl.pem"
default = "required"
[volume_exports]
tls = "optional"
allow = ["10.0.0.0/24"]
allow_names = ["dom0-a", "dom0-b"]
`, func(c *Config) {
		c.TLS = TLS{Cert: "/etc/lvnbd/server.crt", Key: "/etc/lvnbd/server.key", CA: "/etc/lvnbd/ca.crt", CRL: "/etc/lvnbd/ca-crl.pem", Default: "required"}
		c.VolumeExports = Access{TLS: "optional", Allow: []string{"10.0.0.0/24"}, AllowNames: []string{"dom0-a", "dom0-b"}}
	}},
	{"exports", `
[[export]]
name = "vm1"
path = "/dev/vg0/vm1"

[[export]]
name = "golden"
path = "/srv/golden.img"
read_only = true
tls = "off"
allow = ["192.0.2.7", "fd00::/64"]
`, func(c *Config) {
		c.Exports = []Export{
			{Name: "vm1", Path: "/dev/vg0/vm1"},
			{Name: "golden", Path: "/srv/golden.img", ReadOnly: true, Access: Access{TLS: "off", Allow: []string{"192.0.2.7", "fd00::/64"}}},
		}
	}},
	{"inline export tables", `export = [{name = "vm1", path = "/dev/vg0/vm1"}]`, func(c *Config) {
		c.Exports = []Export{{Name: "vm1", Path: "/dev/vg0/vm1"}}
	}},
	{"dotted keys", "server.rescan = \"1m\"\nlog.level = \"warn\"\n", func(c *Config) {
		c.Server.Rescan = time.Minute
		c.Log.Level = "warn"
	}},
	{"quotes and escapes", "[[export]]\nname = 'x@snap'\npath = \"/srv/a \\\"b\\\"\\u00e9.img\"\n", func(c *Config) {
		c.Exports = []Export{{Name: "x@snap", Path: `/srv/a "b"é.img`}}
	}},
}

func TestParseValid(t *testing.T) {
	for _, tt := range validServer {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse([]byte(tt.doc), "server.toml")
			if err != nil {
				t.Fatal(err)
			}
			want := Default()
			tt.want(want)
			if d := diff(want, got); d != "" {
				t.Errorf("(-want +got)\n%s", d)
			}
		})
	}
}

// invalidServer are configurations that must be refused, with the key the
// problem is reported on, part of its message and its line (0: not checked).
var invalidServer = []struct {
	name, doc, key, msg string
	line                int
}{
	{"unknown top-level key", "\nlisen = 1\n", "lisen", "unknown key", 2},
	{"unknown table", "[servr]\nlisten = []\n", "servr", "did you mean server?", 1},
	{"unknown server key", "[server]\nrescan = \"1s\"\nlisen = [\"tcp://0.0.0.0:1\"]\n", "server.lisen", "did you mean listen?", 3},
	{"unknown export key", "[[export]]\nname = \"a\"\npath = \"/x\"\nreadonly = true\n", "export[0].readonly", "did you mean read_only?", 4},
	{"unknown key in second export", "[[export]]\nname = \"a\"\npath = \"/x\"\n[[export]]\nname = \"b\"\npath = \"/y\"\nacl = []\n", "export[1].acl", "[[export]] takes", 7},
	{"unknown volume_exports key", "[volume_exports]\nallow_name = []\n", "volume_exports.allow_name", "did you mean allow_names?", 2},
	{"quoted unknown key", "[server]\n\"max connections\" = 1\n", `server."max connections"`, "unknown key", 2},
	{"table as value", "server = 1\n", "server", "want a table", 1},
	{"export as table", "[export]\nname = \"a\"\n", "export", "[[export]]", 1},
	{"export list of strings", "export = [\"vm1=/dev/vg0/vm1\"]\n", "export[0]", "[[export]]", 1},
	{"key set twice", "[server]\nrescan = \"1s\"\n\nrescan = \"2s\"\n", "server.rescan", "set twice", 4},
	{"table twice", "[log]\nlevel = \"info\"\n[log]\nformat = \"json\"\n", "log", "defined twice", 3},
	{"syntax error", "[server]\nrescan = \"1s\n", "", "TOML syntax", 2},
	{"duration as number", "[server]\n\nrescan = 10\n", "server.rescan", `such as "30s"`, 3},
	{"duration without unit", "[server]\nrescan = \"10\"\n", "server.rescan", "not a duration", 2},
	{"negative duration", "[server]\ndrain_timeout = \"-1s\"\n", "server.drain_timeout", "negative", 2},
	{"zero handshake timeout", "[server]\nhandshake_timeout = \"0s\"\n", "server.handshake_timeout", "more than zero", 2},
	{"zero drain timeout", "[server]\ndrain_timeout = \"0s\"\n", "server.drain_timeout", "more than zero", 2},
	{"listen not a list", "[server]\nlisten = \"tcp://0.0.0.0:10809\"\n", "server.listen", `write ["tcp://0.0.0.0:10809"]`, 2},
	{"listen list of numbers", "[server]\nlisten = [10809]\n", "server.listen", "element 0", 2},
	{"listen empty", "[server]\nlisten = []\n", "server.listen", "at least one", 2},
	{"listen bad URL", "[server]\nlisten = [\"tcp://0.0.0.0:10809\",\n  \"http://0.0.0.0:80\"]\n", "server.listen[1]", "unknown scheme", 3},
	{"listen without port", "[server]\nlisten = [\"tcp://0.0.0.0\"]\n", "server.listen[0]", "tcp://HOST:PORT", 2},
	{"listen twice", "[server]\nlisten = [\"tcp://0.0.0.0:1\", \"tcp://0.0.0.0:1\"]\n", "server.listen[1]", "listed twice", 2},
	{"volumes without scheme", "[server]\nvolumes = \"vg0\"\n", "server.volumes", "lvm://VG", 2},
	{"control too long", "[server]\ncontrol = \"/" + strings.Repeat("x", 200) + "\"\n", "server.control", "shorter", 2},
	{"zero connections", "[server]\nmax_connections = 0\n", "server.max_connections", "more than zero", 2},
	{"negative per-client", "[server]\nmax_connections_per_client = -1\n", "server.max_connections_per_client", "more than zero", 2},
	{"zero inflight", "[server]\nmax_inflight_requests = 0\n", "server.max_inflight_requests", "more than zero", 2},
	{"fractional connections", "[server]\nmax_connections = 1.5\n", "server.max_connections", "whole number", 2},
	{"huge connections", "[server]\nmax_connections = 99999999999\n", "server.max_connections", "out of range", 2},
	{"inflight bytes below a request", "[server]\nmax_inflight_bytes = \"1MiB\"\n", "server.max_inflight_bytes", `give at least "32MiB"`, 2},
	{"inflight bytes not a size", "[server]\nmax_inflight_bytes = \"lots\"\n", "server.max_inflight_bytes", "not a size", 2},
	{"inflight bytes zero", "[server]\nmax_inflight_bytes = 0\n", "server.max_inflight_bytes", "more than zero", 2},
	{"inflight bytes bool", "[server]\nmax_inflight_bytes = true\n", "server.max_inflight_bytes", "number of bytes", 2},
	{"log level", "[log]\nlevel = \"verbose\"\n", "log.level", "debug, info, warn or error", 2},
	{"log format", "[log]\nformat = \"xml\"\n", "log.format", "console", 2},
	{"metrics without port", "[metrics]\nlisten = \"9809\"\n", "metrics.listen", "HOST:PORT", 2},
	{"tls mode", "[tls]\ndefault = \"maybe\"\n", "tls.default", "off, optional or required", 2},
	{"tls mode empty", "[tls]\ndefault = \"\"\n", "tls.default", "want", 2},
	{"cert without key", "[tls]\ncert = \"/a.crt\"\n", "tls.key", "private key", 0},
	{"key without cert", "[tls]\nkey = \"/a.key\"\n", "tls.cert", "certificate", 0},
	{"ca without cert", "[tls]\nca = \"/ca.crt\"\n", "tls.ca", "set tls.cert and tls.key", 2},
	{"crl without ca", "[tls]\ncert = \"/a.crt\"\nkey = \"/a.key\"\ncrl = \"/ca-crl.pem\"\n", "tls.crl", "set tls.ca", 4},
	{"required without cert", "[tls]\ndefault = \"required\"\n", "tls.default", "needs a server certificate", 2},
	{"export required without cert", "[[export]]\nname = \"a\"\npath = \"/x\"\ntls = \"required\"\n", "export[0].tls", "needs a server certificate", 4},
	{"volume exports required without cert", "[volume_exports]\ntls = \"required\"\n", "volume_exports.tls", "needs a server certificate", 2},
	{"volume exports bad mode", "[volume_exports]\ntls = \"yes\"\n", "volume_exports.tls", "tls.default", 2},
	{"export without name", "[[export]]\npath = \"/x\"\n", "export[0].name", "needs a name", 1},
	{"export without path", "[[export]]\nname = \"vm1\"\n", "export[0].path", "block device", 1},
	{"export bad name", "[[export]]\nname = \"vm 1\"\npath = \"/x\"\n", "export[0].name", "only letters", 2},
	{"export names twice", "[[export]]\nname = \"vm1\"\npath = \"/x\"\n[[export]]\nname = \"vm1\"\npath = \"/y\"\n", "export[1].name", "unique", 5},
	{"read_only string", "[[export]]\nname = \"a\"\npath = \"/x\"\nread_only = \"yes\"\n", "export[0].read_only", "true or false", 4},
	{"allow bad CIDR", "[[export]]\nname = \"a\"\npath = \"/x\"\nallow = [\"10.0.0.0/24\",\n \"10.0.0.300\"]\n", "export[0].allow[1]", "not an address or CIDR", 5},
	{"allow in inline table", "export = [{name = \"a\", path = \"/x\", allow = [\"nope\"]}]\n", "export[0].allow[0]", "not an address or CIDR", 1},
	{"allow_names without ca", "[[export]]\nname = \"a\"\npath = \"/x\"\nallow_names = [\"dom0-a\"]\n", "export[0].allow_names", "set tls.ca", 4},
	{"volume allow_names without ca", "[volume_exports]\nallow_names = [\"dom0-a\"]\n", "volume_exports.allow_names", "set tls.ca", 2},
	{"empty allow name", "[tls]\ncert = \"/c\"\nkey = \"/k\"\nca = \"/ca\"\n[volume_exports]\nallow_names = [\" \"]\n", "volume_exports.allow_names[0]", "certificate CN", 6},
}

func TestParseInvalid(t *testing.T) {
	for _, tt := range invalidServer {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.doc), "server.toml")
			if err == nil {
				t.Fatalf("parsed: %+v", c)
			}
			wantProblem(t, err, tt.key, tt.msg, tt.line)
			if !strings.HasPrefix(err.Error(), "server.toml:") {
				t.Errorf("error %q does not start with the file name", err)
			}
		})
	}
}

func TestParseReportsEveryProblem(t *testing.T) {
	doc := `
[server]
max_connections = 0
[log]
level = "loud"
[[export]]
name = "a b"
path = "/x"
`
	_, err := Parse([]byte(doc), "server.toml")
	wantProblem(t, err, "server.max_connections", "more than zero", 3)
	wantProblem(t, err, "log.level", "want", 5)
	wantProblem(t, err, "export[0].name", "only letters", 7)
}

func TestDefaults(t *testing.T) {
	c := Default()
	checks := []struct {
		what      string
		got, want any
	}{
		{"listen", c.Server.Listen, []string{server.DefaultListen}},
		{"control", c.Server.Control, control.DefaultPath},
		{"rescan", c.Server.Rescan, 10 * time.Second},
		{"handshake_timeout", c.Server.HandshakeTimeout, server.DefaultHandshakeTimeout},
		{"drain_timeout", c.Server.DrainTimeout, server.DefaultDrainTimeout},
		{"max_connections", c.Server.MaxConnections, server.DefaultMaxConnections},
		{"max_connections_per_client", c.Server.MaxConnectionsPerClient, server.DefaultMaxPerClient},
		{"max_inflight_requests", c.Server.MaxInflightRequests, server.DefaultMaxInFlight},
		{"max_inflight_bytes", c.Server.MaxInflightBytes, int64(server.DefaultMaxInFlightBytes)},
		{"fence_file", c.Server.FenceFile, "/var/lib/lvnbd/fences.json"},
		{"failure_file", c.Server.FailureFile, "/var/lib/lvnbd/failures.json"},
		{"log", c.Log, Log{Level: "info", Format: "console"}},
		{"tls.default", c.TLS.Default, "optional"},
		{"metrics", c.Metrics.Listen, ""},
	}
	for _, ch := range checks {
		if d := diff(ch.want, ch.got); d != "" {
			t.Errorf("%s (-want +got)\n%s", ch.what, d)
		}
	}
	if err := c.Validate(); err != nil {
		t.Errorf("the defaults do not validate: %v", err)
	}
}

func TestEffective(t *testing.T) {
	t.Run("no exports: the default volume directory", func(t *testing.T) {
		e := Default().Effective()
		if e.Server.Volumes != volume.DefaultURL {
			t.Errorf("volumes = %q, want %q", e.Server.Volumes, volume.DefaultURL)
		}
		if e.VolumeExports.TLS != "optional" {
			t.Errorf("volume_exports.tls = %q, want the default", e.VolumeExports.TLS)
		}
	})
	t.Run("exports: no volumes, TLS defaults filled in", func(t *testing.T) {
		c, err := Parse([]byte("[tls]\ndefault = \"off\"\n[[export]]\nname = \"a\"\npath = \"/x\"\n[[export]]\nname = \"b\"\npath = \"/y\"\ntls = \"optional\"\n"), "")
		if err != nil {
			t.Fatal(err)
		}
		e := c.Effective()
		if e.Server.Volumes != "" {
			t.Errorf("volumes = %q, want none", e.Server.Volumes)
		}
		if got := []string{e.Exports[0].TLS, e.Exports[1].TLS, e.VolumeExports.TLS}; diff([]string{"off", "optional", "off"}, got) != "" {
			t.Errorf("export TLS modes = %q", got)
		}
		if c.Exports[0].TLS != "" {
			t.Error("Effective changed the configuration it was called on")
		}
	})
}

func TestWriteTOMLRoundTrip(t *testing.T) {
	for _, tt := range validServer {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.doc), "")
			if err != nil {
				t.Fatal(err)
			}
			for _, cfg := range []*Config{c, c.Effective()} {
				var buf bytes.Buffer
				if err := cfg.WriteTOML(&buf); err != nil {
					t.Fatal(err)
				}
				back, err := Parse(buf.Bytes(), "printed")
				if err != nil {
					t.Fatalf("printed configuration does not parse: %v\n%s", err, buf.String())
				}
				if d := diff(cfg, back); d != "" {
					t.Errorf("round trip (-printed +parsed)\n%s\n%s", d, buf.String())
				}
			}
		})
	}
}

func TestWriteTOMLShowsEveryKey(t *testing.T) {
	var buf bytes.Buffer
	if err := Default().Effective().WriteTOML(&buf); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, t2 := range tableSettings {
		if !strings.Contains(out, "["+t2.table+"]") {
			t.Errorf("no [%s] in\n%s", t2.table, out)
		}
		for _, s := range t2.settings {
			if !strings.Contains(out, "\n"+s.key+" = ") {
				t.Errorf("no %s.%s in\n%s", t2.table, s.key, out)
			}
		}
	}
	for _, want := range []string{`max_inflight_bytes = '128MiB'`, `rescan = '10s'`, `volumes = 'file://./lvnbd-data'`} {
		if !strings.Contains(out, want) {
			t.Errorf("no %s in\n%s", want, out)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for n, want := range map[int64]string{
		1:                  "1",
		1023:               "1023",
		1024:               "1KiB",
		1536:               "1536",
		128 << 20:          "128MiB",
		3 << 30:            "3GiB",
		1<<40 + 1<<20:      "1048577MiB",
		1 << 62:            "4EiB",
		1<<63 - 1:          "9223372036854775807",
		int64(32 << 20):    "32MiB",
		int64(1<<30 + 1):   "1073741825",
		int64(5 << 10):     "5KiB",
		int64(7 << 50):     "7PiB",
		int64(9 << 40):     "9TiB",
		int64(1<<20 + 512): "1049088",
	} {
		if got := formatSize(n); got != want {
			t.Errorf("formatSize(%d) = %q, want %q", n, got, want)
		}
		var back size
		if err := parseSize(&back, formatSize(n)); err != nil || int64(back) != n {
			t.Errorf("parseSize(%q) = %d, %v; want %d", formatSize(n), back, err, n)
		}
	}
}

func TestServerHelpers(t *testing.T) {
	c, err := Parse([]byte(`
[server]
listen = ["tcp://0.0.0.0:10809", "unix:///run/lvnbd/nbd.sock"]
max_inflight_requests = 8
max_inflight_bytes = "64MiB"
[tls]
default = "off"
[[export]]
name = "vm1"
path = "/dev/vg0/vm1"
read_only = true
allow = ["192.0.2.7", "10.0.0.1/24"]
`), "")
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := c.ListenAddrs()
	if err != nil {
		t.Fatal(err)
	}
	if d := diff([]server.ListenAddr{{Network: "tcp", Address: "0.0.0.0:10809"}, {Network: "unix", Address: "/run/lvnbd/nbd.sock"}}, addrs); d != "" {
		t.Errorf("ListenAddrs (-want +got)\n%s", d)
	}
	if d := diff(server.ExportSpec{Name: "vm1", Path: "/dev/vg0/vm1", ReadOnly: true}, c.Exports[0].Spec()); d != "" {
		t.Errorf("Spec (-want +got)\n%s", d)
	}
	a, err := c.ServerAccess(c.Exports[0].Access)
	if err != nil {
		t.Fatal(err)
	}
	if a.TLS != server.TLSOff || len(a.Allow) != 2 || a.Allow[1].String() != "10.0.0.0/24" {
		t.Errorf("ServerAccess = %+v, want TLS off and two masked prefixes", a)
	}
	sc := c.ServerConfig()
	if sc.MaxInFlight != 8 || sc.MaxInFlightBytes != 64<<20 || sc.MaxConnections != server.DefaultMaxConnections || sc.HandshakeTimeout != server.DefaultHandshakeTimeout {
		t.Errorf("ServerConfig = %+v", sc)
	}
}

// tls.crl refuses the client certificates it revokes; a CRL that cannot be
// read fails the configuration (at start and at reload), naming the key.
func TestTLSConfigCRL(t *testing.T) {
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	if err := pki.WriteCRL(pki.Client.Leaf); err != nil {
		t.Fatal(err)
	}
	c := Default()
	c.Server.Volumes = ""
	c.Exports = []Export{{Name: "vm1", Path: "/dev/vg0/vm1", Access: Access{AllowNames: []string{"dom0-a"}}}}
	c.TLS = TLS{Cert: filepath.Join(pki.Dir, "server-cert.pem"), Key: filepath.Join(pki.Dir, "server-key.pem"),
		CA: filepath.Join(pki.Dir, "ca-cert.pem"), CRL: filepath.Join(pki.Dir, "ca-crl.pem"), Default: "optional"}
	cfg, warnings, err := c.TLSConfig()
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 0 {
		t.Errorf("warnings %q for a current CRL and exports that name their clients", warnings)
	}
	revoked := tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{pki.Client.Leaf, pki.CA}}}
	var re *tlscrl.RevokedError
	if cfg.VerifyConnection == nil || !errors.As(cfg.VerifyConnection(revoked), &re) {
		t.Fatal("the revoked client certificate is let through")
	}
	if err := cfg.VerifyConnection(tls.ConnectionState{}); err != nil {
		t.Errorf("a client without a certificate: %v", err)
	}

	// Exports that take clients without a certificate are warned of: a
	// revoked host still reaches them.
	c.Server.Volumes = "lvm://vg0"
	c.Exports = append(c.Exports, Export{Name: "golden", Path: "/srv/golden.img"})
	if _, warnings, err = c.TLSConfig(); err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 1 || !strings.HasPrefix(warnings[0], `tls.crl: the volume exports, "golden" have no allow_names`) {
		t.Errorf("warnings %q, want one naming the volume exports and golden", warnings)
	}

	c.TLS.CRL = filepath.Join(pki.Dir, "nosuch.pem")
	if _, _, err := c.TLSConfig(); err == nil || !strings.HasPrefix(err.Error(), "tls.crl: ") {
		t.Errorf("a missing CRL: %v, want an error naming tls.crl", err)
	}
}
