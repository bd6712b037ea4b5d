// Package refusals remembers, across restarts of the dom0, the pair legs
// whose exports were refused as not their device's volume (made anew,
// rolled back, shrunk, or served by a storage box that went down), until
// the leg is taken down on purpose (lvnbd pair down --leg).
//
// The volume IDs that make those refusals (package volumeid) live in /run,
// as long as the devices they describe. After a reboot of the dom0 there is
// no device and no ID, and a leg would attach whatever its export serves and
// give it to the guest at its next start. A rolled-back half carries the
// guest's own md superblock with an older event count, and md re-adds such a
// member from its bitmap when the bitmap seems to cover the gap, which it
// does not when the writes md lacks were made before the rollback. So a
// refused leg stays refused, here in /var/lib, until its administrator
// replaces it as a new member.
package refusals

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/lvnbd/lvnbd/internal/atomicfile"
)

// DefaultPath is where the refusals are kept.
const DefaultPath = "/var/lib/lvnbd/refused-legs.json"

// Refusal is why and when a leg's export was first refused.
type Refusal struct {
	Pair   string    `json:"pair"`
	Leg    string    `json:"leg"`
	Reason string    `json:"reason"`
	Since  time.Time `json:"since"`
}

// Store is the refusals of one host, keyed by the leg's backend (its
// export's canonical URI). Only the pair daemon uses it, one per host (its
// control socket sees to that), so a mutex is enough.
type Store struct {
	path string
	mu   sync.Mutex
	mem  map[string]Refusal // when path is empty
}

// Open returns the store at path; an empty path keeps the refusals in
// memory.
func Open(path string) *Store {
	return &Store{path: path, mem: map[string]Refusal{}}
}

// Path is the file the refusals are kept in, "" for memory.
func (s *Store) Path() string { return s.path }

// Get returns the refusal recorded for backend, if any.
func (s *Store) Get(backend string) (Refusal, bool, error) {
	var r Refusal
	var ok bool
	err := s.update(func(m map[string]Refusal) bool {
		r, ok = m[backend]
		return false
	})
	return r, ok, err
}

// Add records r for backend unless a refusal is recorded already: the
// first one says best what happened.
func (s *Store) Add(backend string, r Refusal) error {
	return s.update(func(m map[string]Refusal) bool {
		if _, ok := m[backend]; ok {
			return false
		}
		m[backend] = r
		return true
	})
}

// Forget drops backend's refusal: its leg was taken down on purpose.
func (s *Store) Forget(backend string) error {
	return s.update(func(m map[string]Refusal) bool {
		if _, ok := m[backend]; !ok {
			return false
		}
		delete(m, backend)
		return true
	})
}

// update runs f on the refusals and saves them if f reports a change.
func (s *Store) update(f func(map[string]Refusal) bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.path == "" {
		f(s.mem)
		return nil
	}
	m := map[string]Refusal{}
	b, err := os.ReadFile(s.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("refused legs: %w", err)
	default:
		if err := json.Unmarshal(b, &m); err != nil {
			return fmt.Errorf("refused legs: %s is corrupt (%w): fix or remove it, knowing that the legs it names "+
				"were refused as not their devices' volumes and must be replaced as new members", s.path, err)
		}
	}
	if !f(m) {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(s.path), 0o750); err != nil {
		return fmt.Errorf("refused legs: %w", err)
	}
	b, err = json.MarshalIndent(m, "", "  ")
	if err == nil {
		err = atomicfile.Write(s.path, append(b, '\n'), 0o600)
	}
	if err != nil {
		return fmt.Errorf("refused legs: %w", err)
	}
	return nil
}
