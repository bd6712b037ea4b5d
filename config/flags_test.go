package config

import (
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

// serveFlags defines lvnbd serve's flags as cmd/lvnbd/serve.go does, with
// the types it uses, plus the ones it is expected to gain.
func serveFlags() *pflag.FlagSet {
	f := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	f.StringArray("listen", []string{"tcp://127.0.0.1:10809"}, "")
	f.StringArray("export", nil, "")
	f.String("volumes", "", "")
	f.String("control", "/run/lvnbd/control.sock", "")
	f.Duration("rescan", 10*time.Second, "")
	f.String("tls-cert", "", "")
	f.String("tls-key", "", "")
	f.String("tls-ca", "", "")
	f.String("tls", "optional", "")
	f.StringArray("allow", nil, "")
	f.StringArray("allow-name", nil, "")
	f.String("fence-file", "/var/lib/lvnbd/fences.json", "")
	f.Int("max-connections", 1024, "")
	f.Int("max-connections-per-client", 64, "")
	f.String("log-level", "info", "")
	f.String("log-format", "console", "")
	// Not in serve yet.
	f.Duration("handshake-timeout", 30*time.Second, "")
	f.Duration("drain-timeout", 30*time.Second, "")
	f.Int("max-inflight-requests", 256, "")
	f.String("max-inflight-bytes", "128MiB", "")
	f.String("metrics-listen", "", "")
	return f
}

const fileWithExports = `
[server]
listen = ["tcp://10.0.0.1:10809"]
volumes = "lvm://vg0"
rescan = "1m"
[log]
level = "warn"
[tls]
cert = "/etc/lvnbd/server.crt"
key = "/etc/lvnbd/server.key"
ca = "/etc/lvnbd/ca.crt"
[volume_exports]
allow = ["10.0.0.0/24"]
[[export]]
name = "vm1"
path = "/dev/vg0/vm1"
tls = "required"
allow_names = ["dom0-a"]
`

func TestApplyFlags(t *testing.T) {
	tests := []struct {
		name string
		file string
		args []string
		want func(c *Config)
	}{
		{"no flags keep the file", fileWithExports, nil, func(*Config) {}},
		{"flags at their defaults keep the file", fileWithExports, []string{"--rescan=10s"}, func(c *Config) {
			c.Server.Rescan = 10 * time.Second // given explicitly, so it counts
		}},
		{"scalars", fileWithExports, []string{"--volumes", "file:///srv/lvnbd", "--control=", "--log-level", "debug",
			"--log-format=json", "--max-connections", "7", "--max-inflight-bytes", "64MiB", "--drain-timeout", "1m",
			"--metrics-listen", "127.0.0.1:9809", "--fence-file", "/tmp/f.json"},
			func(c *Config) {
				c.Server.Volumes = "file:///srv/lvnbd"
				c.Server.Control = ""
				c.Log = Log{Level: "debug", Format: "json"}
				c.Server.MaxConnections = 7
				c.Server.MaxInflightBytes = 64 << 20
				c.Server.DrainTimeout = time.Minute
				c.Metrics.Listen = "127.0.0.1:9809"
				c.Server.FenceFile = "/tmp/f.json"
			}},
		{"listen replaces the file's list", fileWithExports, []string{"--listen", "tcp://0.0.0.0:1", "--listen", "unix:///tmp/s"}, func(c *Config) {
			c.Server.Listen = []string{"tcp://0.0.0.0:1", "unix:///tmp/s"}
		}},
		{"export replaces the file's exports", fileWithExports, []string{"--export", "a=/x", "--export", "b=/y:ro"}, func(c *Config) {
			c.Exports = []Export{{Name: "a", Path: "/x"}, {Name: "b", Path: "/y", ReadOnly: true}}
		}},
		{"allow applies to every export", fileWithExports, []string{"--allow", "192.0.2.7", "--allow-name", "dom0-b"}, func(c *Config) {
			c.VolumeExports.Allow = []string{"192.0.2.7"}
			c.VolumeExports.AllowNames = []string{"dom0-b"}
			c.Exports[0].Allow = []string{"192.0.2.7"}
			c.Exports[0].AllowNames = []string{"dom0-b"}
		}},
		{"tls sets the default for every export", fileWithExports, []string{"--tls", "off"}, func(c *Config) {
			c.TLS.Default = "off"
			c.Exports[0].TLS = ""
		}},
		{"flags alone", "", []string{"--export", "vm1=/dev/vg0/vm1", "--allow", "10.0.0.0/8", "--tls-cert", "/c", "--tls-key", "/k", "--tls", "required"}, func(c *Config) {
			c.Exports = []Export{{Name: "vm1", Path: "/dev/vg0/vm1", Access: Access{Allow: []string{"10.0.0.0/8"}}}}
			c.VolumeExports.Allow = []string{"10.0.0.0/8"}
			c.TLS = TLS{Cert: "/c", Key: "/k", Default: "required"}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want, err := Parse([]byte(tt.file), "")
			if err != nil {
				t.Fatal(err)
			}
			tt.want(want)
			got, err := Parse([]byte(tt.file), "")
			if err != nil {
				t.Fatal(err)
			}
			fs := serveFlags()
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			if err := got.ApplyFlags(fs); err != nil {
				t.Fatal(err)
			}
			if d := diff(want, got); d != "" {
				t.Errorf("(-want +got)\n%s", d)
			}
		})
	}
}

func TestApplyFlagsErrors(t *testing.T) {
	tests := []struct {
		name string
		file string
		args []string
		want string
	}{
		{"bad size", "", []string{"--max-inflight-bytes", "lots"}, "--max-inflight-bytes: "},
		{"bad export", "", []string{"--export", "vm1"}, "--export: "},
		{"invalid together", "", []string{"--tls", "required"}, "tls.default: \"required\" needs a server certificate"},
		{"names need the file's CA", "", []string{"--allow-name", "dom0-a"}, "set tls.ca"},
		{"file's names lose their CA", fileWithExports, []string{"--tls-ca="}, "export[0].allow_names"},
		{"bad listen", "", []string{"--listen", "tcp://nowhere"}, "server.listen[0]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.file), "")
			if err != nil {
				t.Fatal(err)
			}
			fs := serveFlags()
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			err = c.ApplyFlags(fs)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ApplyFlags = %v, want an error with %q", err, tt.want)
			}
		})
	}
}

// TestApplyFlagsSkipsUnknownFlags: serve without the newer flags still works.
func TestApplyFlagsSkipsUnknownFlags(t *testing.T) {
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	fs.String("log-level", "info", "")
	if err := fs.Parse([]string{"--log-level", "error"}); err != nil {
		t.Fatal(err)
	}
	c := Default()
	if err := c.ApplyFlags(fs); err != nil {
		t.Fatal(err)
	}
	if c.Log.Level != "error" {
		t.Errorf("log.level = %q", c.Log.Level)
	}
}
