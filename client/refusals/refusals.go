// Package refusals remembers, across restarts of the dom0, the pair legs
// whose exports were refused as not their device's volume (made anew,
// rolled back, shrunk, or served by a storage box that went down), until
// the leg alone is taken down on purpose (lvnbd pair down --leg), or its
// export serves the device's volume again.
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
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/internal/atomicfile"
	"github.com/lvnbd/lvnbd/internal/flock"
)

// DefaultPath is where the refusals are kept.
const DefaultPath = "/var/lib/lvnbd/refused-legs.json"

// Refusal is why and when a leg's export was first refused.
type Refusal struct {
	Pair   string    `json:"pair"`
	Leg    string    `json:"leg"`
	Reason string    `json:"reason"`
	Since  time.Time `json:"since"`
	// Accepts is the volume ID the leg's device was attached to: the
	// export serving it again lifts the refusal. Empty if nothing does
	// (the export shrank under the device: its tail is lost).
	Accepts string `json:"accepts,omitempty"`
}

// Store is the refusals of one host, keyed by the leg's backend (its
// export's canonical URI; another spelling of the same export finds the
// entry too). The pair daemons of the host share the file: every change
// locks it.
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

// Get returns the refusal recorded for backend's export, if any.
func (s *Store) Get(backend string) (Refusal, bool, error) {
	var r Refusal
	var ok bool
	err := s.update(false, func(m map[string]Refusal) bool {
		for _, k := range keysOf(m, backend) {
			r, ok = m[k], true
			break
		}
		return false
	})
	return r, ok, err
}

// All returns every refusal recorded, by the backend it was recorded for.
func (s *Store) All() (map[string]Refusal, error) {
	var all map[string]Refusal
	err := s.update(false, func(m map[string]Refusal) bool {
		all = maps.Clone(m)
		return false
	})
	return all, err
}

// Add records r for backend. A refusal of its export recorded already is
// kept, as the first says best what happened, except that it accepts no
// volume any more once r accepts another (a shrink accepts none): a
// refusal lifted by the device's volume coming back must not lift a later
// shrink of it.
func (s *Store) Add(backend string, r Refusal) error {
	return s.update(true, func(m map[string]Refusal) bool {
		keys := keysOf(m, backend)
		if len(keys) == 0 {
			m[backend] = r
			return true
		}
		changed := false
		for _, k := range keys {
			if old := m[k]; old.Accepts != "" && old.Accepts != r.Accepts {
				old.Accepts = ""
				old.Reason += "; then: " + r.Reason
				m[k] = old
				changed = true
			}
		}
		return changed
	})
}

// Forget drops the refusals of backend's export: its leg was taken down on
// purpose, or the export serves the device's volume again.
func (s *Store) Forget(backend string) error {
	return s.update(true, func(m map[string]Refusal) bool {
		keys := keysOf(m, backend)
		for _, k := range keys {
			delete(m, k)
		}
		return len(keys) > 0
	})
}

// ForgetOnly drops the refusal of backend's export if it is still r, as it
// was when the caller looked, and reports whether it did: a refusal
// recorded since (the export a leg again, and refused) is kept.
func (s *Store) ForgetOnly(backend string, r Refusal) (bool, error) {
	forgot := false
	err := s.update(true, func(m map[string]Refusal) bool {
		keys := keysOf(m, backend)
		if len(keys) == 0 || !m[keys[0]].same(r) {
			return false
		}
		for _, k := range keys {
			delete(m, k)
		}
		forgot = true
		return true
	})
	return forgot, err
}

// same reports whether r and o are one record.
func (r Refusal) same(o Refusal) bool {
	return r.Pair == o.Pair && r.Leg == o.Leg && r.Reason == o.Reason && r.Accepts == o.Accepts && r.Since.Equal(o.Since)
}

// keysOf returns the keys of m that name backend's export: backend itself
// first, then other spellings of it (the host's case, a trailing dot, the
// default port given or not).
func keysOf(m map[string]Refusal, backend string) []string {
	var keys []string
	if _, ok := m[backend]; ok {
		keys = append(keys, backend)
	}
	u, err := client.ParseURI(backend)
	if err != nil {
		return keys
	}
	for k := range m {
		if k == backend {
			continue
		}
		if v, err := client.ParseURI(k); err == nil && v.SameExport(u) {
			keys = append(keys, k)
		}
	}
	return keys
}

// update runs f on the refusals with the file locked (exclusively if
// write), and saves them if f reports a change.
func (s *Store) update(write bool, f func(map[string]Refusal) bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.path == "" {
		f(s.mem)
		return nil
	}
	if !write {
		// Nothing refused yet (most hosts, always): no directory or lock
		// to make, which a read-only /var would refuse.
		if _, err := os.Stat(s.path); errors.Is(err, os.ErrNotExist) {
			f(map[string]Refusal{})
			return nil
		}
	}
	if err := atomicfile.MkdirAll(filepath.Dir(s.path), 0o750); err != nil {
		return fmt.Errorf("refused legs: %w", err)
	}
	how := unix.LOCK_SH
	if write {
		how = unix.LOCK_EX
	}
	// No deadline: the other holders are lvnbd daemons that finish.
	unlock, err := flock.Lock(context.Background(), s.path+".lock", how)
	switch {
	case err != nil && !write && (errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES)):
		// The lock file cannot be opened for writing (/var remounted
		// read-only after an error): nobody can change the file then,
		// so it is read without the lock.
	case err != nil:
		return fmt.Errorf("refused legs: %w", err)
	default:
		defer unlock()
	}
	m := map[string]Refusal{}
	if err := atomicfile.ReadJSON(s.path, &m); errors.Is(err, atomicfile.ErrCorrupt) {
		return fmt.Errorf("refused legs: %s is %w: fix or remove it, knowing that the legs it names "+
			"were refused as not their devices' volumes and must be replaced as new members", s.path, err)
	} else if err != nil {
		return fmt.Errorf("refused legs: %w", err)
	}
	if !f(m) || !write {
		return nil
	}
	if err := atomicfile.WriteJSON(s.path, m); err != nil {
		return fmt.Errorf("refused legs: %w", err)
	}
	return nil
}
