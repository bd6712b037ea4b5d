package server

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

// DefaultListen is where the server listens with no configuration: loopback
// on the IANA NBD port.
const DefaultListen = "tcp://127.0.0.1:10809"

// ListenAddr is a parsed listen URL.
type ListenAddr struct {
	Network string // "tcp" or "unix"
	Address string // host:port or socket path
}

// String is the listen URL, escaped so that ParseListenURL parses it back to
// a: a socket path may hold '?', '#' or '%'.
func (a ListenAddr) String() string {
	if a.Network == "unix" {
		return (&url.URL{Scheme: "unix", Path: a.Address}).String()
	}
	return "tcp://" + a.Address
}

// maxSocketPath is the longest Unix socket path bind(2) takes: sun_path's
// 108 bytes less the terminating NUL.
const maxSocketPath = 107

// ParseListenURL parses tcp://HOST:PORT or unix:///PATH.
func ParseListenURL(s string) (ListenAddr, error) {
	u, err := url.Parse(s)
	if err != nil || u.Scheme == "" {
		return ListenAddr{}, fmt.Errorf("listen address %q: want tcp://HOST:PORT or unix:///PATH", s)
	}
	// Nothing is dropped silently: a listen URL has no user, query or fragment.
	if u.User != nil || u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || u.Opaque != "" {
		return ListenAddr{}, fmt.Errorf("listen address %q: want tcp://HOST:PORT or unix:///PATH, without user@, ?query or #fragment", s)
	}
	switch u.Scheme {
	case "tcp":
		host, port, err := net.SplitHostPort(u.Host)
		if err != nil {
			return ListenAddr{}, fmt.Errorf("listen address %q: want tcp://HOST:PORT (e.g. tcp://0.0.0.0:10809): %w", s, err)
		}
		if p, err := strconv.ParseUint(port, 10, 16); err != nil || (p == 0 && port != "0") {
			return ListenAddr{}, fmt.Errorf("listen address %q: port %q is not a number from 0 to 65535", s, port)
		}
		if u.Path != "" && u.Path != "/" {
			return ListenAddr{}, fmt.Errorf("listen address %q: a tcp address has no path", s)
		}
		return ListenAddr{Network: "tcp", Address: net.JoinHostPort(host, port)}, nil
	case "unix":
		if u.Host != "" || u.Path == "" {
			return ListenAddr{}, fmt.Errorf("listen address %q: want unix:///ABSOLUTE/PATH (three slashes)", s)
		}
		if strings.IndexByte(u.Path, 0) >= 0 {
			return ListenAddr{}, fmt.Errorf("listen address %q: a socket path cannot contain NUL (abstract sockets are not supported)", s)
		}
		if len(u.Path) > maxSocketPath {
			return ListenAddr{}, fmt.Errorf("listen address %q: the socket path is %d bytes, Unix sockets take at most %d: choose a shorter one", s, len(u.Path), maxSocketPath)
		}
		return ListenAddr{Network: "unix", Address: u.Path}, nil
	default:
		return ListenAddr{}, fmt.Errorf("listen address %q: unknown scheme %q (want tcp or unix)", s, u.Scheme)
	}
}

// Listen opens a listener on a. A stale Unix socket left by a crashed server
// is replaced; one a live server still answers on is an error.
func Listen(a ListenAddr) (net.Listener, error) {
	if a.Network == "unix" {
		if err := removeStaleSocket(a.Address); err != nil {
			return nil, err
		}
	}
	ln, err := net.Listen(a.Network, a.Address)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", a, err)
	}
	return ln, nil
}

func removeStaleSocket(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("checking socket path %s: %w", path, err)
	}
	if st.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("socket path %s exists and is not a socket: remove it or choose another path", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("socket %s is in use by a running server", path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("removing stale socket %s: %w", path, err)
	}
	return nil
}
