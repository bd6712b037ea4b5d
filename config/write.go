package config

import (
	"io"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// The documents WriteTOML prints: the schema's key names, with durations
// and sizes as the strings an administrator writes.
type (
	serverDoc struct {
		Server        serverTable   `toml:"server"`
		Log           logTable      `toml:"log"`
		TLS           tlsTable      `toml:"tls"`
		Metrics       metricsTable  `toml:"metrics"`
		VolumeExports accessTable   `toml:"volume_exports"`
		Export        []exportTable `toml:"export,omitempty"`
	}
	serverTable struct {
		Listen                  []string `toml:"listen"`
		Volumes                 string   `toml:"volumes"`
		Control                 string   `toml:"control"`
		Rescan                  string   `toml:"rescan"`
		HandshakeTimeout        string   `toml:"handshake_timeout"`
		DrainTimeout            string   `toml:"drain_timeout"`
		MaxConnections          int      `toml:"max_connections"`
		MaxConnectionsPerClient int      `toml:"max_connections_per_client"`
		MaxInflightRequests     int      `toml:"max_inflight_requests"`
		MaxInflightBytes        string   `toml:"max_inflight_bytes"`
		FenceFile               string   `toml:"fence_file"`
		FailureFile             string   `toml:"failure_file"`
	}
	logTable struct {
		Level  string `toml:"level"`
		Format string `toml:"format"`
	}
	tlsTable struct {
		Cert    string `toml:"cert"`
		Key     string `toml:"key"`
		CA      string `toml:"ca"`
		CRL     string `toml:"crl"`
		Default string `toml:"default"`
	}
	metricsTable struct {
		Listen string `toml:"listen"`
	}
	accessTable struct {
		TLS        string   `toml:"tls,omitempty"`
		Allow      []string `toml:"allow"`
		AllowNames []string `toml:"allow_names"`
	}
	exportTable struct {
		Name       string   `toml:"name"`
		Path       string   `toml:"path"`
		ReadOnly   bool     `toml:"read_only"`
		TLS        string   `toml:"tls,omitempty"`
		Allow      []string `toml:"allow"`
		AllowNames []string `toml:"allow_names"`
	}
)

// WriteTOML prints the configuration as server.toml, every key included;
// Parse reads it back to an equal Config. Print Effective() to show what
// lvnbd serve will do.
func (c *Config) WriteTOML(w io.Writer) error {
	s := c.Server
	doc := serverDoc{
		Server: serverTable{
			Listen:                  nonNil(s.Listen),
			Volumes:                 s.Volumes,
			Control:                 s.Control,
			Rescan:                  formatDuration(s.Rescan),
			HandshakeTimeout:        formatDuration(s.HandshakeTimeout),
			DrainTimeout:            formatDuration(s.DrainTimeout),
			MaxConnections:          s.MaxConnections,
			MaxConnectionsPerClient: s.MaxConnectionsPerClient,
			MaxInflightRequests:     s.MaxInflightRequests,
			MaxInflightBytes:        formatSize(s.MaxInflightBytes),
			FenceFile:               s.FenceFile,
			FailureFile:             s.FailureFile,
		},
		Log:           logTable(c.Log),
		TLS:           tlsTable(c.TLS),
		Metrics:       metricsTable(c.Metrics),
		VolumeExports: accessTable{TLS: c.VolumeExports.TLS, Allow: nonNil(c.VolumeExports.Allow), AllowNames: nonNil(c.VolumeExports.AllowNames)},
	}
	for _, e := range c.Exports {
		doc.Export = append(doc.Export, exportTable{Name: e.Name, Path: e.Path, ReadOnly: e.ReadOnly,
			TLS: e.TLS, Allow: nonNil(e.Allow), AllowNames: nonNil(e.AllowNames)})
	}
	return encode(w, doc)
}

func encode(w io.Writer, doc any) error {
	enc := toml.NewEncoder(w)
	enc.SetIndentTables(false)
	return enc.Encode(doc)
}

// formatDuration writes d so that time.ParseDuration gives it back: "30s",
// "1m30s", "0s".
func formatDuration(d time.Duration) string { return d.String() }

// nonNil makes an empty list print as [] rather than disappear, so that the
// printed configuration shows every key.
func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}
