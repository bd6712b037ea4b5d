// Package volumeid remembers, for each nbd device attached on this host,
// the ID of the volume its export served when it was attached (see
// nbd.DescriptionID), so that every later reconnect can refuse an export
// whose volume was removed and made anew under the same name: the device's
// users (a guest's md mirror) would read another volume's data as their own.
//
// The IDs are kept in a file under /run, keyed by the device's backend (its
// export's URI). /run lives exactly as long as the kernel's devices: a
// reboot clears both, while the pair daemon's reloads and restarts, and
// lvnbd reconnect run by hand, all find what the attach recorded.
package volumeid

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/atomicfile"
)

// DefaultPath is where the IDs are kept.
const DefaultPath = "/run/lvnbd/volume-ids.json"

// ErrReplaced means an export now serves another volume than the one a
// device was attached to, or the same volume rolled back by a snapshot
// merge (see volume.RolledBackID).
var ErrReplaced = errors.New("the export's volume was made anew or rolled back")

// Store is the IDs of one host's devices. Several processes may use one file
// at once (the pair daemon, lvnbd attach and reconnect): every change locks
// it.
type Store struct {
	path string
	mu   sync.Mutex
	mem  map[string]string // when path is empty
}

// Open returns the store at path; an empty path keeps the IDs in memory.
func Open(path string) *Store { return &Store{path: path, mem: map[string]string{}} }

// Get returns the ID recorded for backend, "" if none is.
func (s *Store) Get(backend string) (string, error) {
	var id string
	err := s.locked(false, func(ids map[string]string) bool {
		id = ids[backend]
		return false
	})
	return id, err
}

// Set records id for backend; an empty id records nothing.
func (s *Store) Set(backend, id string) error {
	if id == "" {
		return nil
	}
	return s.locked(true, func(ids map[string]string) bool {
		if ids[backend] == id {
			return false
		}
		ids[backend] = id
		return true
	})
}

// Forget drops backend's ID: its device was detached.
func (s *Store) Forget(backend string) error {
	return s.locked(true, func(ids map[string]string) bool {
		if _, ok := ids[backend]; !ok {
			return false
		}
		delete(ids, backend)
		return true
	})
}

// Check returns an ErrReplaced error if id is not the one recorded for
// backend, and records id if none is: the device was attached before IDs
// were recorded.
func (s *Store) Check(backend, id string) error { return s.compare(backend, id, true) }

// Verify is Check without recording anything: for an export about to be
// attached anew, whose ID is recorded once it is.
func (s *Store) Verify(backend, id string) error { return s.compare(backend, id, false) }

// compare returns an ErrReplaced error unless id is the one recorded for
// backend or none is; with learn, it records id if none is, under the same
// lock as the look.
func (s *Store) compare(backend, id string, learn bool) error {
	var known string
	err := s.locked(learn, func(ids map[string]string) bool {
		known = ids[backend]
		if known == "" && learn && id != "" {
			ids[backend] = id
			return true
		}
		return false
	})
	if err != nil || known == "" || id == known {
		return err
	}
	if id == "" {
		id = "none"
	}
	return fmt.Errorf("%w: the volume behind %s is not the one its device was attached to (volume id %s, now %s), "+
		"and its data is not the device's", ErrReplaced, backend, known, id)
}

// locked runs f on the IDs with the file locked (exclusively if write),
// and saves them if f reports a change.
func (s *Store) locked(write bool, f func(ids map[string]string) bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.path == "" {
		f(s.mem)
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(s.path), 0o700); err != nil {
		return fmt.Errorf("volume IDs: %w", err)
	}
	lock, err := os.OpenFile(s.path+".lock", os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("volume IDs: %w", err)
	}
	defer lock.Close()
	how := unix.LOCK_SH
	if write {
		how = unix.LOCK_EX
	}
	for {
		err = unix.Flock(int(lock.Fd()), how)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("volume IDs: locking %s: %w", lock.Name(), err)
	}
	ids := map[string]string{}
	b, err := os.ReadFile(s.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("volume IDs: %w", err)
	default:
		if err := json.Unmarshal(b, &ids); err != nil {
			return fmt.Errorf("volume IDs: %s is corrupt (%w): remove it; devices attached until now are then "+
				"not checked at their next reconnect", s.path, err)
		}
	}
	if !f(ids) || !write {
		return nil
	}
	b, err = json.MarshalIndent(ids, "", "  ")
	if err == nil {
		err = atomicfile.Write(s.path, append(b, '\n'), 0o600)
	}
	if err != nil {
		return fmt.Errorf("volume IDs: %w", err)
	}
	return nil
}
