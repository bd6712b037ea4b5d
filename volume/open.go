package volume

import (
	"fmt"
	"net/url"
	"slices"
	"strings"
	"sync"
)

// DefaultURL is where volumes live when no URL is given: sparse files in
// ./lvnbd-data, so that lvnbd works with no set-up.
const DefaultURL = "file://./lvnbd-data"

// Opener opens the driver for a URL of its scheme.
type Opener func(u *url.URL) (Driver, error)

// The schemes registered by driver packages from their init functions, as
// database/sql drivers are: volume cannot import its drivers, which import it.
var (
	openersMu sync.RWMutex
	openers   = map[string]Opener{}
)

// Register makes a driver available to Open under a URL scheme. Driver
// packages call it from init; it panics if the scheme is taken, which is a
// programming error.
func Register(scheme string, open Opener) {
	openersMu.Lock()
	defer openersMu.Unlock()
	if _, dup := openers[scheme]; dup {
		panic("volume: driver for scheme " + scheme + " registered twice")
	}
	openers[scheme] = open
}

// Open returns the driver for a volume URL: file:///DIR or file://./DIR for
// a directory of sparse files (volume/file), lvm://VG for a volume group
// (volume/lvm). An empty URL is DefaultURL. The driver's package must be
// imported, for instance with import _ "github.com/lvnbd/lvnbd/volume/lvm".
func Open(rawURL string) (Driver, error) {
	if rawURL == "" {
		rawURL = DefaultURL
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("volume URL %q: %w (want file:///DIR or lvm://VG)", rawURL, err)
	}
	openersMu.RLock()
	open, ok := openers[u.Scheme]
	schemes := make([]string, 0, len(openers))
	for s := range openers {
		schemes = append(schemes, s+"://")
	}
	openersMu.RUnlock()
	if !ok {
		slices.Sort(schemes)
		what := fmt.Sprintf("unknown scheme %q", u.Scheme)
		if u.Scheme == "" {
			what = "no scheme"
		}
		return nil, fmt.Errorf("volume URL %q: %w: %s (this lvnbd knows %s; such as file:///var/lib/lvnbd or lvm://vg0)",
			rawURL, ErrUnsupported, what, strings.Join(schemes, ", "))
	}
	d, err := open(u)
	if err != nil {
		return nil, fmt.Errorf("volume URL %q: %w", rawURL, err)
	}
	return d, nil
}
