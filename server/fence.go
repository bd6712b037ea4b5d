package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/internal/atomicfile"
)

// Fence cuts a client off one export, or off all of them: GNBD's fencing,
// which plain NBD lacks. A cluster fences a failed host so it cannot write
// to a volume after another host took over.
type Fence struct {
	// Client is an address (192.0.2.7), a CIDR (10.0.0.0/24) or a client
	// certificate name.
	Client string `json:"client"`
	// Export limits the fence to one export; empty fences every export.
	Export string    `json:"export,omitempty"`
	Since  time.Time `json:"since"`
}

// matches reports whether the fence covers peer p using export name.
func (f Fence) matches(p peer, export string) bool {
	if f.Export != "" && f.Export != export {
		return false
	}
	if pr, err := parseClient(f.Client); err == nil {
		return p.addr.IsValid() && pr.Contains(p.addr)
	}
	return slices.Contains(p.names, f.Client)
}

func parseClient(s string) (netip.Prefix, error) {
	pr, err := ParseAllow([]string{s})
	if err != nil {
		return netip.Prefix{}, err
	}
	return pr[0], nil
}

// ValidateFenceClient checks a fence's client: an address, a CIDR, or a
// certificate name (no spaces or slashes).
func ValidateFenceClient(s string) error {
	if _, err := parseClient(s); err == nil {
		return nil
	}
	if s == "" || len(s) > 255 || strings.ContainsAny(s, " /\t\n") {
		return fmt.Errorf("fence client %q: want an address (192.0.2.7), a CIDR (10.0.0.0/24) or a certificate name", s)
	}
	return nil
}

// Fences is the server's fence list, persisted so that a fence survives a
// server restart: a fenced host must not get back in because the storage
// box rebooted.
type Fences struct {
	path string
	mu   sync.Mutex
	list []Fence
}

// LoadFences reads the fence list at path; a missing file is an empty list.
// An empty path keeps the list in memory only.
func LoadFences(path string) (*Fences, error) {
	f := &Fences{path: path}
	if err := loadJSON(path, &f.list); err != nil {
		return nil, fmt.Errorf("fence file %s: %w: fix or remove it; until then no client can be trusted", path, err)
	}
	return f, nil
}

// loadJSON reads the JSON file at path into v; a missing file or an empty
// path leaves v as it is.
func loadJSON(path string, v any) error {
	if path == "" {
		return nil
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("corrupt: %w", err)
	}
	return nil
}

// saveJSON writes v to path atomically (temp file, fsync, rename, fsync the
// directory), so a crash leaves the old contents or the new, never half;
// an empty path saves nothing.
func saveJSON(path string, v any) error {
	if path == "" {
		return nil
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return atomicfile.Write(path, append(b, '\n'), 0o600)
}

// List returns the fences.
func (f *Fences) List() []Fence {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.list)
}

func (f *Fences) matches(p peer, export string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.ContainsFunc(f.list, func(x Fence) bool { return x.matches(p, export) })
}

// add records a fence, persisted before it returns.
func (f *Fences) add(x Fence) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if slices.ContainsFunc(f.list, func(y Fence) bool { return y.Client == x.Client && y.Export == x.Export }) {
		return nil
	}
	return f.saveLocked(append(slices.Clone(f.list), x))
}

// remove drops a fence; it reports whether there was one.
func (f *Fences) remove(client, export string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	next := slices.DeleteFunc(slices.Clone(f.list), func(y Fence) bool { return y.Client == client && y.Export == export })
	if len(next) == len(f.list) {
		return false, nil
	}
	return true, f.saveLocked(next)
}

// saveLocked writes the list atomically (temp file, fsync, rename, fsync the
// directory) and only then adopts it, so a crash leaves the old list or the
// new one, never half of one.
func (f *Fences) saveLocked(list []Fence) error {
	if err := saveJSON(f.path, list); err != nil {
		return fmt.Errorf("saving fences: %w", err)
	}
	f.list = list
	return nil
}

func (s *Server) fenced(p peer, export string) bool {
	return s.cfg.Fences != nil && s.cfg.Fences.matches(p, export)
}

// Fences is the server's fence list.
func (s *Server) Fences() *Fences { return s.cfg.Fences }

// FenceClient fences a client: the fence is persisted, new connections from
// it are refused, and its open connections are cut. When FenceClient
// returns, no write from those connections will reach the storage any more:
// writes already executing have finished and the rest are refused.
func (s *Server) FenceClient(ctx context.Context, f Fence) (cut int, err error) {
	if s.cfg.Fences == nil {
		return 0, errors.New("this server has no fence list")
	}
	if err := ValidateFenceClient(f.Client); err != nil {
		return 0, err
	}
	if f.Since.IsZero() {
		f.Since = time.Now().UTC()
	}
	if err := s.cfg.Fences.add(f); err != nil {
		return 0, err
	}
	var victims []*clientConn
	// Removed exports too: their clients keep them until they hang up.
	for _, e := range s.cfg.Exports.inUse() {
		if f.Export != "" && f.Export != e.Name {
			continue
		}
		e.mu.Lock()
		for _, c := range e.clients {
			if f.matches(c.who, e.Name) {
				victims = append(victims, c)
			}
		}
		e.mu.Unlock()
	}
	for _, c := range victims {
		if err := c.fence(ctx); err != nil {
			return cut, err
		}
		cut++
	}
	s.log.Warn("client fenced", zap.String("client", f.Client), zap.String("export", f.Export), zap.Int("connections_cut", cut))
	return cut, nil
}

// UnfenceClient lifts a fence; it reports whether there was one.
func (s *Server) UnfenceClient(client, export string) (bool, error) {
	if s.cfg.Fences == nil {
		return false, errors.New("this server has no fence list")
	}
	ok, err := s.cfg.Fences.remove(client, export)
	if ok && err == nil {
		s.log.Info("client unfenced", zap.String("client", client), zap.String("export", export))
	}
	return ok, err
}
