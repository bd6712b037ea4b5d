package pair

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/client/kernel"
)

// Legs are the names of a pair's two legs, in order: the export on storage
// box A, then the one on storage box B. They name the stable links
// LinkDir/PAIR/a and LinkDir/PAIR/b.
var Legs = [2]string{"a", "b"}

// Spec is one pair as client.toml describes it (a [[pair]] table); the
// field comments name the keys.
type Spec struct {
	// Name (name) names the pair: the links are LinkDir/NAME/a and /b.
	Name string
	// URIs (a, b) are the two exports of the pair's volume, one on each
	// storage box: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=P.
	URIs [2]string
	// Connections (connections) is the number of connections per leg, 1 to
	// kernel.MaxConnections; more than one needs a multi-conn export.
	Connections int
	// Timeout (timeout) bounds each request; a request unanswered this long
	// is retried on another connection and its connection counted dead.
	// It must be set: with 0, current kernels never time a request out, so
	// a leg whose box went silent would hang the guest instead of failing.
	Timeout time.Duration
	// DeadTimeout (dead_timeout) is how long I/O waits for a reconnect once
	// every connection of a leg is dead, before it fails (and the guest's
	// md drops the leg). 0 fails at once.
	DeadTimeout time.Duration
	// XenDomain (xen_domain), when set, is the domain `lvnbd pair up` gives
	// the legs to with xl block-attach, and `pair down` takes them from.
	XenDomain string
	// Vdevs (vdevs) are the guest's device names for legs a and b, such as
	// ["xvdb", "xvdc"]; needed with XenDomain and for `pair xen-config`.
	Vdevs []string
}

// SpecError is a problem with one key of a pair's specification.
type SpecError struct {
	// Index is the pair's position in the configuration, from 0.
	Index int
	// Pair is the pair's name, possibly empty.
	Pair string
	// Key is the client.toml key: name, a, b, connections, timeout,
	// dead_timeout, xen_domain or vdevs.
	Key string
	// Msg says what is wrong.
	Msg string
}

func (e *SpecError) Error() string {
	if e.Pair == "" {
		return fmt.Sprintf("pair %d: %s: %s", e.Index+1, e.Key, e.Msg)
	}
	return fmt.Sprintf("pair %q: %s: %s", e.Pair, e.Key, e.Msg)
}

// uriKeys are the client.toml keys of the legs' URIs.
var uriKeys = [2]string{"a", "b"}

// ValidateSpecs checks every pair and their relations: unique names, no
// export in two places, a pair's legs on two servers, no guest device used
// twice in a domain. Every
// problem is reported, each a *SpecError, joined.
func ValidateSpecs(specs []Spec) error {
	var errs []error
	names := map[string]int{}
	// By export, not as written: nbd://BOXA/vm1 and nbd://boxa./vm1 are
	// one volume, which two guests would write at once.
	type use struct {
		where string // "pair.leg"
		uri   client.URI
	}
	exports := map[client.ExportKey]use{}
	vdevs := map[string]string{} // domain/vdev -> pair
	for i, s := range specs {
		bad := func(key, format string, args ...any) {
			errs = append(errs, &SpecError{Index: i, Pair: s.Name, Key: key, Msg: fmt.Sprintf(format, args...)})
		}
		if err := validName(s.Name); err != nil {
			bad("name", "%v", err)
		} else if j, dup := names[s.Name]; dup {
			bad("name", "pair %d has the same name", j+1)
		} else {
			names[s.Name] = i
		}
		var parsed [2]*client.URI
		for leg, raw := range s.URIs {
			key := uriKeys[leg]
			if raw == "" {
				bad(key, "missing: want the export's URI, such as nbd://storage-%s/%s", key, s.Name)
				continue
			}
			u, err := client.ParseURI(raw)
			if err != nil {
				bad(key, "%v", err)
				continue
			}
			if u.IsTLS() {
				bad(key, "%s: the kernel cannot speak TLS: use nbd:// or nbd+unix://", raw)
				continue
			}
			parsed[leg] = &u
			where := s.Name + "." + key
			if other, dup := exports[u.ExportKey()]; dup {
				spelt := ""
				if other.uri.String() != u.String() {
					spelt = fmt.Sprintf(" (written %s there)", other.uri)
				}
				bad(key, "%s is also %s%s: each leg needs its own export", u, other.where, spelt)
				continue
			}
			exports[u.ExportKey()] = use{where: where, uri: u}
		}
		// Two exports on one server are two volumes on one storage box:
		// the guest's mirror would lose both halves with that box. Names
		// are compared as written, not resolved: this runs at every
		// configuration load, which must not wait on DNS.
		if a, b := parsed[0], parsed[1]; a != nil && b != nil && !a.SameExport(*b) && a.Server() == b.Server() {
			bad("b", "%s is on the same server as a (%s): the mirror would have both halves on one storage box; "+
				"give b the URI of the volume on the other box", b, a.Address())
		}
		if s.Connections < 1 || s.Connections > kernel.MaxConnections {
			bad("connections", "%d: want 1 to %d", s.Connections, kernel.MaxConnections)
		}
		switch {
		case s.Timeout < 0:
			bad("timeout", "negative")
		case s.Timeout == 0:
			// Not "the kernel's default": with a zero timeout,
			// nbd_xmit_timeout (drivers/block/nbd.c) only logs "Possible
			// stuck request" and resets the timer, for ever.
			bad("timeout", "0 means no request ever times out, so a storage box that goes silent hangs the guest "+
				"instead of failing the leg: give one, such as %q (the default), or shorter for faster failover", "30s")
		}
		if s.DeadTimeout < 0 {
			bad("dead_timeout", "negative")
		}
		if s.XenDomain != "" && strings.ContainsAny(s.XenDomain, " \t\n'\",") {
			bad("xen_domain", "%q: a domain name has no spaces, quotes or commas", s.XenDomain)
		}
		switch {
		case len(s.Vdevs) == 0 && s.XenDomain != "":
			bad("vdevs", "missing: xen_domain needs the guest's device names for legs a and b, such as [\"xvdb\", \"xvdc\"]")
		case len(s.Vdevs) != 0 && len(s.Vdevs) != 2:
			bad("vdevs", "%d names: want two, for legs a and b, such as [\"xvdb\", \"xvdc\"]", len(s.Vdevs))
		case len(s.Vdevs) == 2:
			for _, v := range s.Vdevs {
				if v == "" || strings.ContainsAny(v, " \t\n,=:'\"/") {
					bad("vdevs", "%q is not a guest device name such as xvdb", v)
				}
			}
			if s.Vdevs[0] == s.Vdevs[1] {
				bad("vdevs", "both legs are %q: each needs its own", s.Vdevs[0])
			}
			if s.XenDomain != "" {
				for _, v := range s.Vdevs {
					k := s.XenDomain + "/" + v
					if other, dup := vdevs[k]; dup && other != s.Name {
						bad("vdevs", "%s is also pair %q's device in domain %s", v, other, s.XenDomain)
					}
					vdevs[k] = s.Name
				}
			}
		}
	}
	return errors.Join(errs...)
}

// validName accepts names that make one safe path component.
func validName(name string) error {
	switch {
	case name == "":
		return errors.New("missing: every pair needs a name")
	case name == "." || name == "..":
		return fmt.Errorf("%q cannot name a directory", name)
	case len(name) > 64:
		return fmt.Errorf("%d bytes: at most 64", len(name))
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.' || r == '@') {
			return fmt.Errorf("%q: use letters, digits, '-', '_', '.' and '@'", name)
		}
	}
	return nil
}

// LinkPath is the stable name of a leg: linkDir/PAIR/LEG.
func LinkPath(linkDir, pair, leg string) string {
	return filepath.Join(linkDir, pair, leg)
}

// XenDisks returns the xl disk specifications of s's legs, in the order of
// Legs, for the domain's configuration file (disk = [...]) or xl
// block-attach: format=raw, vdev=VDEV, access=rw, target=LINK.
func (s Spec) XenDisks(linkDir string) ([]string, error) {
	if len(s.Vdevs) != 2 {
		return nil, &SpecError{Pair: s.Name, Key: "vdevs", Msg: "missing: the guest's device names for legs a and b, such as [\"xvdb\", \"xvdc\"]"}
	}
	out := make([]string, len(Legs))
	for i, leg := range Legs {
		out[i] = fmt.Sprintf("format=raw, vdev=%s, access=rw, target=%s", s.Vdevs[i], LinkPath(linkDir, s.Name, leg))
	}
	return out, nil
}
