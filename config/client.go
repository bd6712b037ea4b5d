package config

import (
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"time"
	"unicode"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/server"
)

// DefaultClientPath is where the packaged pair daemon (lvnbd client) reads
// its configuration.
const DefaultClientPath = "/etc/lvnbd/client.toml"

// Defaults of a [[pair]], the same as lvnbd attach's.
const (
	DefaultConnections = 1
	DefaultTimeout     = 30 * time.Second
	DefaultDeadTimeout = 60 * time.Second
	// MaxConnections bounds a pair's connections per leg: more do not
	// help one GbE link, and each is a slot in the server's per-client
	// limit.
	MaxConnections = 16
)

// ClientConfig is the configuration of the dom0 pair daemon: client.toml.
type ClientConfig struct {
	Pairs []Pair
}

// Pair is one [[pair]] table: a volume attached from two storage boxes,
// A and B, as two kernel devices that the guest mirrors.
type Pair struct {
	// Name identifies the pair in logs and commands.
	Name string
	// A and B are the NBD URIs of the two legs.
	A, B string
	// Connections is the number of connections per leg.
	Connections int
	// Timeout bounds each request. It cannot be 0, which on current
	// kernels means requests never time out: no failover to the other leg.
	Timeout time.Duration
	// DeadTimeout is how long I/O waits for a dead leg to reconnect before
	// failing, so that md drops the leg (0: at once).
	DeadTimeout time.Duration
	// XenDomain is the guest the devices are given to with xl block-attach;
	// empty when they are not.
	XenDomain string
	// Vdevs are the guest's device names for legs A and B, such as xvdb and
	// xvdc; empty when the devices are not attached to a guest.
	Vdevs []string
}

var (
	clientTopKeys = []string{"pair"}
	pairKeys      = []string{"name", "a", "b", "connections", "timeout", "dead_timeout", "xen_domain", "vdevs"}
	// vdevPattern is the Linux-style virtual disk names xl accepts for a
	// whole disk.
	vdevPattern = regexp.MustCompile(`^(xvd|hd|sd)[a-z]{1,3}$`)
)

// LoadClient reads and validates the client configuration at path.
func LoadClient(path string) (*ClientConfig, error) {
	doc, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the configuration: %w", err)
	}
	return ParseClient(doc, path)
}

// ParseClient decodes and validates a client configuration. file names the
// document in error messages and may be empty.
func ParseClient(doc []byte, file string) (*ClientConfig, error) {
	tree, pos, err := decodeDocument(doc, file)
	if err != nil {
		return nil, err
	}
	p := &problems{file: file, pos: pos}
	r := reader{p}
	r.table(tree, "", clientTopKeys)
	c := &ClientConfig{}
	for i, m := range r.tables(tree, "pair") {
		path := fmt.Sprintf("pair[%d]", i)
		r.table(m, path, pairKeys)
		pr := Pair{Connections: DefaultConnections, Timeout: DefaultTimeout, DeadTimeout: DefaultDeadTimeout}
		r.value(m, path, "name", &pr.Name)
		r.value(m, path, "a", &pr.A)
		r.value(m, path, "b", &pr.B)
		r.value(m, path, "connections", &pr.Connections)
		r.value(m, path, "timeout", &pr.Timeout)
		r.value(m, path, "dead_timeout", &pr.DeadTimeout)
		r.value(m, path, "xen_domain", &pr.XenDomain)
		r.value(m, path, "vdevs", &pr.Vdevs)
		c.Pairs = append(c.Pairs, pr)
	}
	if err := p.err(); err != nil {
		return nil, err
	}
	c.validate(p)
	if err := p.err(); err != nil {
		return nil, err
	}
	return c, nil
}

// Validate checks every pair and that pairs do not collide.
func (c *ClientConfig) Validate() error {
	p := &problems{}
	c.validate(p)
	return p.err()
}

func (c *ClientConfig) validate(p *problems) {
	names := map[string]int{}
	vdevs := map[string]string{} // domain/vdev -> key that uses it
	for i, pr := range c.Pairs {
		key := fmt.Sprintf("pair[%d]", i)
		switch {
		case pr.Name == "":
			p.add(key+".name", `missing: every [[pair]] needs a name, such as name = "vm1"`)
		default:
			if err := server.ValidateExportName(pr.Name); err != nil {
				p.add(key+".name", "%s", strings.Replace(withFix(err, nameFix), "export name", "pair name", 1))
			}
			if j, dup := names[pr.Name]; dup {
				p.add(key+".name", "%q is also the name of pair[%d]: pair names must be unique", pr.Name, j)
			} else {
				names[pr.Name] = i
			}
		}
		var legs [2]*client.URI
		for i, leg := range []struct{ key, uri string }{{"a", pr.A}, {"b", pr.B}} {
			if leg.uri == "" {
				p.add(key+"."+leg.key, "missing: give the NBD URI of this leg, such as \"nbd://10.0.1.1/vm1\"")
			} else if u, err := client.ParseURI(leg.uri); err != nil {
				p.add(key+"."+leg.key, "%s", withFix(err, "write nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"))
			} else {
				legs[i] = &u
			}
		}
		switch a, b := legs[0], legs[1]; {
		case a == nil || b == nil:
		case a.String() == b.String():
			p.add(key+".b", "the same URI as a: give the URI of the same volume on the other storage box")
		case a.Server() == b.Server():
			// Names are compared as written, not resolved: a
			// configuration load must not wait on DNS.
			p.add(key+".b", "%s is on the same server as a (%s): the mirror would have both halves on one storage box; "+
				"give b the URI of the volume on the other box", pr.B, a.Address())
		}
		if pr.Timeout == 0 {
			// The kernel then never fails a request to a box gone silent,
			// so md never drops the leg and the guest hangs.
			p.add(key+".timeout", "0 means no request ever times out, so a storage box that goes silent hangs the guest "+
				"instead of failing the leg: want a timeout such as %q (the default), or shorter for faster failover", formatDuration(DefaultTimeout))
		}
		if pr.Connections < 1 || pr.Connections > MaxConnections {
			p.add(key+".connections", "%d: want 1 to %d connections per leg", pr.Connections, MaxConnections)
		}
		if pr.XenDomain != "" && strings.IndexFunc(pr.XenDomain, func(r rune) bool { return unicode.IsSpace(r) || !unicode.IsPrint(r) || r == '/' }) >= 0 {
			p.add(key+".xen_domain", "%q: a Xen domain name has no spaces, slashes or control characters; use the name xl list shows", pr.XenDomain)
		}
		if len(pr.Vdevs) == 0 {
			continue
		}
		// vdevs without xen_domain is how disks go into a domain's own
		// configuration file (lvnbd pair xen-config) without pair up
		// attaching them a second time.
		if len(pr.Vdevs) != 2 {
			p.add(key+".vdevs", "%d names: want two, for legs a and b, such as [\"xvdb\", \"xvdc\"]", len(pr.Vdevs))
		}
		for j, v := range pr.Vdevs {
			vkey := fmt.Sprintf("%s.vdevs[%d]", key, j)
			if !vdevPattern.MatchString(v) {
				p.add(vkey, "%q: want a guest disk name such as \"xvdb\"", v)
				continue
			}
			slot := pr.XenDomain + "/" + v
			if other, dup := vdevs[slot]; dup {
				p.add(vkey, "%q is already used by %s for domain %q: choose another", v, other, pr.XenDomain)
			} else {
				vdevs[slot] = vkey
			}
		}
	}
}

type (
	clientDoc struct {
		Pair []pairTable `toml:"pair,omitempty"`
	}
	pairTable struct {
		Name        string   `toml:"name"`
		A           string   `toml:"a"`
		B           string   `toml:"b"`
		Connections int      `toml:"connections"`
		Timeout     string   `toml:"timeout"`
		DeadTimeout string   `toml:"dead_timeout"`
		XenDomain   string   `toml:"xen_domain,omitempty"`
		Vdevs       []string `toml:"vdevs,omitempty"`
	}
)

// WriteTOML prints the configuration as client.toml, defaults included;
// ParseClient reads it back to an equal ClientConfig.
func (c *ClientConfig) WriteTOML(w io.Writer) error {
	var doc clientDoc
	for _, p := range c.Pairs {
		doc.Pair = append(doc.Pair, pairTable{Name: p.Name, A: p.A, B: p.B, Connections: p.Connections,
			Timeout: formatDuration(p.Timeout), DeadTimeout: formatDuration(p.DeadTimeout),
			XenDomain: p.XenDomain, Vdevs: p.Vdevs})
	}
	return encode(w, doc)
}
