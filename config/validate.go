package config

import (
	"fmt"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server"
)

// nameFix is how to write an export or pair name.
const nameFix = "use letters, digits and . _ - @, at most 64 characters, not starting with - or ."

// maxSocketPath is the longest path a Unix socket address holds
// (sizeof(sun_path) - 1).
const maxSocketPath = 107

// Validate checks the configuration as a whole: every value, and the
// settings that depend on each other (TLS, certificate names).
func (c *Config) Validate() error {
	p := &problems{}
	c.validate(p)
	return p.err()
}

func (c *Config) validate(p *problems) {
	s := &c.Server
	if len(s.Listen) == 0 {
		p.add("server.listen", "empty: give at least one listen URL, such as [%q], or remove the key for the default", server.DefaultListen)
	}
	for i, l := range s.Listen {
		key := fmt.Sprintf("server.listen[%d]", i)
		if _, err := server.ParseListenURL(l); err != nil {
			p.add(key, "%s", withFix(err, "write tcp://HOST:PORT or unix:///PATH"))
		} else if slices.Index(s.Listen, l) < i {
			p.add(key, "%q is listed twice: remove one", l)
		}
	}
	if s.Volumes != "" {
		if u, err := url.Parse(s.Volumes); err != nil || u.Scheme == "" || !strings.Contains(s.Volumes, "://") {
			p.add("server.volumes", "%q is not a volume URL: want file:///DIR or lvm://VG, such as \"lvm://vg0\"", s.Volumes)
		}
	}
	if len(s.Control) > maxSocketPath {
		p.add("server.control", "the path is %d bytes, more than a Unix socket path may have (%d): choose a shorter one", len(s.Control), maxSocketPath)
	}
	positive := func(key string, ok bool, example string) {
		if !ok {
			p.add(key, "must be more than zero, such as %s", example)
		}
	}
	positive("server.handshake_timeout", s.HandshakeTimeout > 0, `"30s"`)
	positive("server.drain_timeout", s.DrainTimeout > 0, `"30s"`)
	positive("server.max_connections", s.MaxConnections > 0, strconv.Itoa(server.DefaultMaxConnections))
	positive("server.max_connections_per_client", s.MaxConnectionsPerClient > 0, strconv.Itoa(server.DefaultMaxPerClient))
	positive("server.max_inflight_requests", s.MaxInflightRequests > 0, strconv.Itoa(server.DefaultMaxInFlight))
	if s.MaxInflightBytes < nbd.DefaultMaxPayload {
		// The server would otherwise quietly use its default: a connection
		// must be able to hold its largest request.
		p.add("server.max_inflight_bytes", "%s is less than the largest request a client may send (%s): give at least %q",
			formatSize(s.MaxInflightBytes), formatSize(nbd.DefaultMaxPayload), formatSize(nbd.DefaultMaxPayload))
	}

	if !slices.Contains([]string{"debug", "info", "warn", "error"}, c.Log.Level) {
		p.add("log.level", "%q: want debug, info, warn or error", c.Log.Level)
	}
	if !slices.Contains([]string{"console", "json"}, c.Log.Format) {
		p.add("log.format", "%q: want console (for people) or json (for log collectors)", c.Log.Format)
	}

	if c.Metrics.Listen != "" {
		if _, port, err := net.SplitHostPort(c.Metrics.Listen); err != nil || !validPort(port) {
			p.add("metrics.listen", "%q: want HOST:PORT such as \"127.0.0.1:9809\", or \"\" for no metrics", c.Metrics.Listen)
		}
	}

	c.validateTLS(p)
	c.validateAccess(p, "volume_exports", c.VolumeExports)
	names := map[string]int{}
	for i, e := range c.Exports {
		key := fmt.Sprintf("export[%d]", i)
		switch {
		case e.Name == "":
			p.add(key+".name", `missing: every [[export]] needs a name, such as name = "vm1"`)
		default:
			if err := server.ValidateExportName(e.Name); err != nil {
				p.add(key+".name", "%s", withFix(err, nameFix))
			}
			if j, dup := names[e.Name]; dup {
				p.add(key+".name", "%q is also the name of export[%d]: export names must be unique", e.Name, j)
			} else {
				names[e.Name] = i
			}
		}
		if e.Path == "" {
			p.add(key+".path", `missing: give the file or block device to export, such as path = "/dev/vg0/vm1"`)
		}
		c.validateAccess(p, key, e.Access)
	}
}

func validPort(s string) bool {
	n, err := strconv.ParseUint(s, 10, 16)
	return err == nil && (n > 0 || s == "0")
}

// validateTLS checks the [tls] table against what the exports ask of it.
func (c *Config) validateTLS(p *problems) {
	t := c.TLS
	if _, err := parseMode(t.Default); err != nil {
		p.add("tls.default", "%v", err)
	}
	switch {
	case t.Cert != "" && t.Key == "":
		p.add("tls.key", "missing: tls.cert is set, so give the private key that goes with it")
	case t.Key != "" && t.Cert == "":
		p.add("tls.cert", "missing: tls.key is set, so give the certificate that goes with it")
	}
	if t.CRL != "" && t.CA == "" {
		p.add("tls.crl", "a CRL revokes client certificates, which are verified only against tls.ca: set tls.ca to the CA that signed them")
	}
	if t.Cert != "" {
		return
	}
	if t.CA != "" {
		p.add("tls.ca", "verifying client certificates needs TLS: set tls.cert and tls.key too")
	}
	need := func(key, mode string) {
		if mode == "required" {
			p.add(key, `"required" needs a server certificate: set tls.cert and tls.key, or use "optional"`)
		}
	}
	need("tls.default", t.Default)
	need("volume_exports.tls", c.VolumeExports.TLS)
	for i, e := range c.Exports {
		need(fmt.Sprintf("export[%d].tls", i), e.TLS)
	}
}

// validateAccess checks the access rules of the export(s) at key.
func (c *Config) validateAccess(p *problems, key string, a Access) {
	if a.TLS != "" {
		if _, err := parseMode(a.TLS); err != nil {
			p.add(key+".tls", "%v (or leave it out for tls.default)", err)
		}
	}
	for i, s := range a.Allow {
		if _, err := server.ParseAllow([]string{s}); err != nil {
			p.add(fmt.Sprintf("%s.allow[%d]", key, i), "%s", withFix(err, "want an address or CIDR such as 10.0.0.0/24"))
		}
	}
	for i, n := range a.AllowNames {
		if strings.TrimSpace(n) == "" {
			p.add(fmt.Sprintf("%s.allow_names[%d]", key, i), "empty: give a certificate CN or DNS name, such as \"dom0-a\"")
		}
	}
	if len(a.AllowNames) > 0 && c.TLS.CA == "" {
		p.add(key+".allow_names", "client certificate names are only trusted once verified: set tls.ca to the CA that signs the clients' certificates")
	}
}

// parseMode is server.ParseTLSMode without its "" shorthand, which in a
// file would hide a mistake.
func parseMode(s string) (server.TLSMode, error) {
	if s == "" {
		return 0, fmt.Errorf(`empty: want "off", "optional" or "required"`)
	}
	m, err := server.ParseTLSMode(s)
	if err != nil {
		return 0, fmt.Errorf("%q: want off, optional or required", s)
	}
	return m, nil
}
