// Package config reads lvnbd's configuration files: /etc/lvnbd/server.toml
// for lvnbd serve and /etc/lvnbd/client.toml for the dom0 pair daemon.
//
// Decoding is strict: an unknown key, a value of the wrong type or a value
// that does not make sense is an *Error naming the key, its line and the
// fix. The problems of a file are reported together (errors.Join): unknown
// keys and wrong types first, then invalid values. Command-line flags
// override the file (Config.ApplyFlags); Effective resolves the defaults
// that depend on other settings, and WriteTOML prints the result.
package config

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/lvnbd/lvnbd/control"
	"github.com/lvnbd/lvnbd/internal/tlscrl"
	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/volume"
)

// DefaultServerPath is where the packaged lvnbd serve reads its
// configuration.
const DefaultServerPath = "/etc/lvnbd/server.toml"

// DefaultFenceFile is where fences are kept across restarts.
const DefaultFenceFile = "/var/lib/lvnbd/fences.json"

// DefaultFailureFile is where exports whose write-back failed are recorded,
// so that they stay failed across restarts.
const DefaultFailureFile = "/var/lib/lvnbd/failures.json"

// DefaultRescan is how often the server re-reads its volumes.
const DefaultRescan = 10 * time.Second

// Config is the configuration of lvnbd serve: everything its flags say, as
// written in server.toml.
type Config struct {
	Server  Server
	Log     Log
	TLS     TLS
	Metrics Metrics
	// Exports are the [[export]] tables: files and block devices exported
	// under a name.
	Exports []Export
	// VolumeExports are the access rules of the exports made from the
	// volumes of Server.Volumes.
	VolumeExports Access
}

// Server is the [server] table.
type Server struct {
	// Listen are listen URLs, tcp://HOST:PORT or unix:///PATH. A socket
	// passed by systemd (LISTEN_FDS) is used instead.
	Listen []string
	// Volumes is a volume driver URL, file:///DIR or lvm://VG; empty exports
	// no volumes, unless there are no Exports either (see Effective).
	Volumes string
	// Control is the control socket's path; empty disables it.
	Control string
	// Rescan is how often volumes are re-read; 0 disables it.
	Rescan time.Duration
	// HandshakeTimeout bounds a client's whole negotiation.
	HandshakeTimeout time.Duration
	// DrainTimeout bounds how long shutdown waits for in-flight requests.
	DrainTimeout time.Duration
	// MaxConnections bounds the connections served at once.
	MaxConnections int
	// MaxConnectionsPerClient bounds the connections from one address.
	MaxConnectionsPerClient int
	// MaxInflightRequests bounds the requests outstanding per connection.
	MaxInflightRequests int
	// MaxInflightBytes bounds the payload bytes held per connection.
	MaxInflightBytes int64
	// FenceFile is where fences are kept; empty keeps them in memory only.
	FenceFile string
	// FailureFile is where failed write-backs are recorded; empty keeps
	// them in memory only, and a restart serves such an export again.
	FailureFile string
}

// Log is the [log] table.
type Log struct {
	Level  string // debug, info, warn or error
	Format string // console or json
}

// TLS is the [tls] table.
type TLS struct {
	Cert, Key string // PEM files; both or neither
	// CA, when set, is the PEM file client certificates are verified
	// against; it is what makes AllowNames trustworthy.
	CA string
	// CRL, when set, is a PEM file of certificate revocation lists: a
	// client certificate one of them revokes is refused. Needs CA.
	CRL string
	// Default is the TLS mode of exports that do not set their own: off,
	// optional or required.
	Default string
}

// Metrics is the [metrics] table.
type Metrics struct {
	// Listen is the HOST:PORT of the Prometheus endpoint; empty is off.
	Listen string
}

// Access is who may use an export.
type Access struct {
	// TLS is off, optional or required; empty means the [tls] default.
	TLS string
	// Allow are client addresses and CIDRs; empty allows every address.
	Allow []string
	// AllowNames are client certificate names (CN or DNS SAN); empty
	// allows any client. Needs TLS.CA.
	AllowNames []string
}

// Export is one [[export]] table.
type Export struct {
	Name     string
	Path     string // a regular file or block device
	ReadOnly bool
	Access
}

// Default is the configuration with nothing set: what lvnbd serve does with
// no configuration file and no flags.
func Default() *Config {
	return &Config{
		Server: Server{
			Listen:                  []string{server.DefaultListen},
			Control:                 control.DefaultPath,
			Rescan:                  DefaultRescan,
			HandshakeTimeout:        server.DefaultHandshakeTimeout,
			DrainTimeout:            server.DefaultDrainTimeout,
			MaxConnections:          server.DefaultMaxConnections,
			MaxConnectionsPerClient: server.DefaultMaxPerClient,
			MaxInflightRequests:     server.DefaultMaxInFlight,
			MaxInflightBytes:        server.DefaultMaxInFlightBytes,
			FenceFile:               DefaultFenceFile,
			FailureFile:             DefaultFailureFile,
		},
		Log: Log{Level: "info", Format: "console"},
		// optional is what --tls defaults to: with no certificate it
		// simply means plain text.
		TLS: TLS{Default: "optional"},
	}
}

// Load reads and validates the server configuration file at path.
func Load(path string) (*Config, error) {
	doc, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the configuration: %w", err)
	}
	return Parse(doc, path)
}

// Parse decodes and validates a server configuration; keys it does not set
// keep their defaults. file names the document in error messages and may be
// empty.
func Parse(doc []byte, file string) (*Config, error) {
	tree, pos, err := decodeDocument(doc, file)
	if err != nil {
		return nil, err
	}
	p := &problems{file: file, pos: pos}
	c := Default()
	c.read(reader{p}, tree)
	if err := p.err(); err != nil {
		return nil, err
	}
	c.validate(p)
	if err := p.err(); err != nil {
		return nil, err
	}
	return c, nil
}

// setting is one scalar key of a table, the flag of lvnbd serve that
// overrides it, and where its value lives.
type setting struct {
	key  string
	flag string
	ref  func(c *Config) any
}

// tableSettings are the plain tables of server.toml, in the order
// WriteTOML prints them.
var tableSettings = []struct {
	table    string
	settings []setting
}{
	{"server", []setting{
		{"listen", "listen", func(c *Config) any { return &c.Server.Listen }},
		{"volumes", "volumes", func(c *Config) any { return &c.Server.Volumes }},
		{"control", "control", func(c *Config) any { return &c.Server.Control }},
		{"rescan", "rescan", func(c *Config) any { return &c.Server.Rescan }},
		{"handshake_timeout", "handshake-timeout", func(c *Config) any { return &c.Server.HandshakeTimeout }},
		{"drain_timeout", "drain-timeout", func(c *Config) any { return &c.Server.DrainTimeout }},
		{"max_connections", "max-connections", func(c *Config) any { return &c.Server.MaxConnections }},
		{"max_connections_per_client", "max-connections-per-client", func(c *Config) any { return &c.Server.MaxConnectionsPerClient }},
		{"max_inflight_requests", "max-inflight-requests", func(c *Config) any { return &c.Server.MaxInflightRequests }},
		{"max_inflight_bytes", "max-inflight-bytes", func(c *Config) any { return (*size)(&c.Server.MaxInflightBytes) }},
		{"fence_file", "fence-file", func(c *Config) any { return &c.Server.FenceFile }},
		{"failure_file", "failure-file", func(c *Config) any { return &c.Server.FailureFile }},
	}},
	{"log", []setting{
		{"level", "log-level", func(c *Config) any { return &c.Log.Level }},
		{"format", "log-format", func(c *Config) any { return &c.Log.Format }},
	}},
	{"tls", []setting{
		{"cert", "tls-cert", func(c *Config) any { return &c.TLS.Cert }},
		{"key", "tls-key", func(c *Config) any { return &c.TLS.Key }},
		{"ca", "tls-ca", func(c *Config) any { return &c.TLS.CA }},
		{"crl", "tls-crl", func(c *Config) any { return &c.TLS.CRL }},
		{"default", "tls", func(c *Config) any { return &c.TLS.Default }},
	}},
	{"metrics", []setting{
		{"listen", "metrics-listen", func(c *Config) any { return &c.Metrics.Listen }},
	}},
}

var (
	topKeys    = []string{"server", "log", "tls", "metrics", "export", "volume_exports"}
	accessKeys = []string{"tls", "allow", "allow_names"}
	exportKeys = []string{"name", "path", "read_only", "tls", "allow", "allow_names"}
)

func (c *Config) read(r reader, tree map[string]any) {
	r.table(tree, "", topKeys)
	for _, t := range tableSettings {
		m, ok := r.subtable(tree, "", t.table)
		if !ok {
			continue
		}
		known := make([]string, len(t.settings))
		for i, s := range t.settings {
			known[i] = s.key
		}
		r.table(m, t.table, known)
		for _, s := range t.settings {
			r.value(m, t.table, s.key, s.ref(c))
		}
	}
	if m, ok := r.subtable(tree, "", "volume_exports"); ok {
		r.table(m, "volume_exports", accessKeys)
		readAccess(r, m, "volume_exports", &c.VolumeExports)
	}
	for i, m := range r.tables(tree, "export") {
		path := fmt.Sprintf("export[%d]", i)
		r.table(m, path, exportKeys)
		var e Export
		r.value(m, path, "name", &e.Name)
		r.value(m, path, "path", &e.Path)
		r.value(m, path, "read_only", &e.ReadOnly)
		readAccess(r, m, path, &e.Access)
		c.Exports = append(c.Exports, e)
	}
}

func readAccess(r reader, m map[string]any, path string, a *Access) {
	r.value(m, path, "tls", &a.TLS)
	r.value(m, path, "allow", &a.Allow)
	r.value(m, path, "allow_names", &a.AllowNames)
}

// Effective is the configuration with the defaults that depend on other
// settings filled in, as lvnbd serve runs it: the default volume directory
// when there is nothing else to export, and each export's TLS mode.
func (c *Config) Effective() *Config {
	e := c.clone()
	if e.Server.Volumes == "" && len(e.Exports) == 0 {
		e.Server.Volumes = volume.DefaultURL
	}
	if e.VolumeExports.TLS == "" {
		e.VolumeExports.TLS = e.TLS.Default
	}
	for i := range e.Exports {
		if e.Exports[i].TLS == "" {
			e.Exports[i].TLS = e.TLS.Default
		}
	}
	return e
}

func (c *Config) clone() *Config {
	e := *c
	e.Server.Listen = clone(c.Server.Listen)
	e.VolumeExports = c.VolumeExports.clone()
	e.Exports = make([]Export, len(c.Exports))
	for i, x := range c.Exports {
		x.Access = x.Access.clone()
		e.Exports[i] = x
	}
	if c.Exports == nil {
		e.Exports = nil
	}
	return &e
}

func (a Access) clone() Access {
	a.Allow = clone(a.Allow)
	a.AllowNames = clone(a.AllowNames)
	return a
}

func clone(s []string) []string {
	if s == nil {
		return nil
	}
	return append([]string(nil), s...)
}

// ListenAddrs parses Server.Listen.
func (c *Config) ListenAddrs() ([]server.ListenAddr, error) {
	out := make([]server.ListenAddr, 0, len(c.Server.Listen))
	for _, l := range c.Server.Listen {
		a, err := server.ParseListenURL(l)
		if err != nil {
			return nil, err
		}
		out = append(out, a)
	}
	return out, nil
}

// ServerAccess is the server's form of an export's access rules, with the
// [tls] default applied.
func (c *Config) ServerAccess(a Access) (server.Access, error) {
	var out server.Access
	mode := a.TLS
	if mode == "" {
		mode = c.TLS.Default
	}
	var err error
	if out.TLS, err = server.ParseTLSMode(mode); err != nil {
		return out, err
	}
	if out.Allow, err = server.ParseAllow(a.Allow); err != nil {
		return out, err
	}
	out.AllowNames = clone(a.AllowNames)
	return out, nil
}

// Spec is the export as server.OpenExport takes it.
func (e Export) Spec() server.ExportSpec {
	return server.ExportSpec{Name: e.Name, Path: e.Path, ReadOnly: e.ReadOnly}
}

// ServerConfig is a server.Config with the limits and timeouts of the
// [server] table; the caller adds Exports, Logger, TLS and Fences.
func (c *Config) ServerConfig() server.Config {
	return server.Config{
		HandshakeTimeout:        c.Server.HandshakeTimeout,
		MaxInFlight:             c.Server.MaxInflightRequests,
		MaxInFlightBytes:        c.Server.MaxInflightBytes,
		DrainTimeout:            c.Server.DrainTimeout,
		MaxConnections:          c.Server.MaxConnections,
		MaxConnectionsPerClient: c.Server.MaxConnectionsPerClient,
	}
}

// TLSConfig loads the certificate, key, CA and CRL of the [tls] table; it
// is nil when no certificate is configured. Client certificates are
// verified when given, and required by the exports' access rules, not by
// the handshake. The warnings are for the log: what the CRL cannot do.
func (c *Config) TLSConfig() (_ *tls.Config, warnings []string, _ error) {
	if c.TLS.Cert == "" {
		return nil, nil, nil
	}
	pair, err := tls.LoadX509KeyPair(c.TLS.Cert, c.TLS.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("tls.cert, tls.key: loading the certificate: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	var cas []*x509.Certificate
	if c.TLS.CA != "" {
		pem, err := os.ReadFile(c.TLS.CA)
		if err != nil {
			return nil, nil, fmt.Errorf("tls.ca: %w", err)
		}
		cfg.ClientCAs = x509.NewCertPool()
		if !cfg.ClientCAs.AppendCertsFromPEM(pem) {
			return nil, nil, fmt.Errorf("tls.ca %s: no PEM certificates in it", c.TLS.CA)
		}
		cfg.ClientAuth = tls.VerifyClientCertIfGiven
		cas = tlscrl.CertificatesIn(pem)
	}
	if c.TLS.CRL != "" {
		// Checked after the chain is verified; a client without a
		// certificate has none to revoke.
		crl, err := tlscrl.Load(c.TLS.CRL, "client", cas)
		if err != nil {
			return nil, nil, fmt.Errorf("tls.crl: %w", err)
		}
		cfg.VerifyConnection = crl.Check
		warnings = append(crl.Warnings, c.exportsWithoutNames()...)
	}
	return cfg, warnings, nil
}

// exportsWithoutNames warns of the exports a revoked client still reaches:
// without allow_names an export takes a client without a certificate, so a
// CRL keeps a host only out of exports that name their clients.
func (c *Config) exportsWithoutNames() []string {
	var open []string
	if c.Server.Volumes != "" && len(c.VolumeExports.AllowNames) == 0 {
		open = append(open, "the volume exports")
	}
	for _, e := range c.Exports {
		if len(e.AllowNames) == 0 {
			open = append(open, fmt.Sprintf("%q", e.Name))
		}
	}
	if len(open) == 0 {
		return nil
	}
	return []string{fmt.Sprintf("tls.crl: %s have no allow_names, so they take clients without a certificate: "+
		"a host whose certificate is revoked still reaches them without it (or in plain text where TLS is not "+
		"required); give them allow_names to keep revoked hosts out", strings.Join(open, ", "))}
}
