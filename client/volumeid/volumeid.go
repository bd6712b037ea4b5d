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
//
// A record also says when the export shrank under its device (Store.Shrank):
// the device never shrinks, and the export's tail is lost, so that export is
// refused from then on like a volume made anew, even once grown back to the
// device's size under the same ID.
package volumeid

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/atomicfile"
	"github.com/lvnbd/lvnbd/internal/flock"
	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/volume"
)

// DefaultPath is where the IDs are kept.
const DefaultPath = "/run/lvnbd/volume-ids.json"

// ErrReplaced means an export now serves another volume than the one a
// device was attached to, the same volume rolled back by a snapshot merge
// (see volume.RolledBackID), one that shrank under the device
// (ShrankError), or one whose storage box went down since (nbd.WithEpoch).
var ErrReplaced = errors.New("the export's volume was made anew or rolled back")

// ShrankError is the refusal of an export that shrank under its device
// (Store.Shrank): it wraps ErrReplaced.
type ShrankError struct {
	Backend string
	// From is the device's size and To the export's when it shrank, in
	// bytes; both 0 if the record does not say.
	From, To uint64
}

// Error says what the device lost and how to replace it.
func (e *ShrankError) Error() string {
	sizes := ""
	if e.From != 0 {
		sizes = fmt.Sprintf(" (from %d to %d bytes)", e.From, e.To)
	}
	return fmt.Sprintf("%v: the export %s shrank under the device%s, its tail is lost, so this half must be "+
		"replaced as a new member: take the leg down and up and add it in full (see lvnbd pair down --help)",
		ErrReplaced, e.Backend, sizes)
}

// Unwrap returns ErrReplaced: the export is refused as a volume made anew is.
func (e *ShrankError) Unwrap() error { return ErrReplaced }

// record is what the file holds for a backend: the volume ID, followed, once
// the export shrank under the device, by a space and shrankFormat. An ID has
// no spaces (nbd.DescriptionID), so the value stays one string, as in the
// files of an lvnbd from before the mark, which load as they are. Such an
// lvnbd reads a marked value whole as the ID, which no export has: it
// refuses the export as made anew, as the mark asks, and its Forget drops
// the mark with the ID. Anything after a space is a mark, even one this
// lvnbd cannot read: a later lvnbd's refuses too.
type record struct {
	id       string
	shrank   bool
	from, to uint64
}

const shrankFormat = "(shrank from %d to %d bytes)"

func parseRecord(v string) record {
	id, mark, shrank := strings.Cut(v, " ")
	r := record{id: id, shrank: shrank}
	if shrank {
		if _, err := fmt.Sscanf(mark, shrankFormat, &r.from, &r.to); err != nil {
			r.from, r.to = 0, 0
		}
	}
	return r
}

func (r record) String() string {
	if !r.shrank {
		return r.id
	}
	return r.id + " " + fmt.Sprintf(shrankFormat, r.from, r.to)
}

// Store is the IDs of one host's devices. Several processes may use one file
// at once (the pair daemon, lvnbd attach and reconnect): every change locks
// it.
type Store struct {
	path string
	mu   sync.Mutex
	mem  map[string]string // when path is empty
	// unsaved holds the IDs a Set could not write to the file: this
	// process still checks them, and writes them there at its next
	// change, so that a reconnect after the file works again does not
	// take whatever volume it finds for the device's.
	unsaved map[string]string
}

// Open returns the store at path; an empty path keeps the IDs in memory.
func Open(path string) *Store {
	return &Store{path: path, mem: map[string]string{}, unsaved: map[string]string{}}
}

// Get returns the ID recorded for backend, "" if none is.
func (s *Store) Get(backend string) (string, error) {
	var id string
	err := s.locked(false, func(ids map[string]string) bool {
		id = parseRecord(ids[backend]).id
		return false
	})
	return id, err
}

// Set records id for backend; an empty id records nothing. A shrink
// recorded stays until Forget.
//
// If the file cannot be written, this Store still checks id (Check and
// Verify compare with it, Get returns it) and writes it at its next
// change; another process does not see it.
func (s *Store) Set(backend, id string) error {
	if id == "" {
		return nil
	}
	err := s.locked(true, func(ids map[string]string) bool {
		r := parseRecord(ids[backend])
		if r.id == id {
			return false
		}
		r.id = id
		ids[backend] = r.String()
		return true
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.unsaved[backend] = id
		return err
	}
	delete(s.unsaved, backend)
	return nil
}

// Shrank records that backend's export shrank under its device, from the
// device's from bytes to the export's to, and returns the *ShrankError that
// Check and Verify return from then on, until Forget: even grown back, the
// export has lost what the device held in its tail. id is recorded too if
// none is; a shrink recorded before is kept. Any other error means nothing
// was recorded.
func (s *Store) Shrank(backend, id string, from, to uint64) error {
	var r record
	err := s.locked(true, func(ids map[string]string) bool {
		r = parseRecord(ids[backend])
		if r.shrank {
			return false
		}
		if r.id == "" {
			r.id = id
		}
		r.shrank, r.from, r.to = true, from, to
		ids[backend] = r.String()
		return true
	})
	if err != nil {
		return err
	}
	return &ShrankError{Backend: backend, From: r.from, To: r.to}
}

// Forget drops backend's ID, and a shrink recorded: its device was detached.
func (s *Store) Forget(backend string) error {
	return s.locked(true, func(ids map[string]string) bool {
		delete(s.unsaved, backend)
		if _, ok := ids[backend]; !ok {
			return false
		}
		delete(ids, backend)
		return true
	})
}

// Check returns an ErrReplaced error if id is not the one recorded for
// backend, or the export shrank under the device (a *ShrankError), and
// records id if none is: the device was attached before IDs were recorded.
func (s *Store) Check(backend, id string) error { return s.compare(backend, id, true) }

// Verify is Check without recording anything: for an export about to be
// attached anew, whose ID is recorded once it is.
func (s *Store) Verify(backend, id string) error { return s.compare(backend, id, false) }

// compare returns an ErrReplaced error if the export shrank under the
// device, or unless id is the one recorded for backend or none is; with
// learn, it records id if nothing is, under the same lock as the look.
func (s *Store) compare(backend, id string, learn bool) error {
	var r record
	err := s.locked(learn, func(ids map[string]string) bool {
		r = parseRecord(ids[backend])
		if r == (record{}) && learn && id != "" {
			ids[backend] = id
			return true
		}
		return false
	})
	if err != nil {
		return err
	}
	if r.shrank {
		return &ShrankError{Backend: backend, From: r.from, To: r.to}
	}
	known := r.id
	if known == "" || id == known {
		return nil
	}
	if id == "" {
		id = "none"
	}
	if crashedSince(known, id) {
		return fmt.Errorf("%w: the storage box serving %s went down under its server (power loss, panic or "+
			"reset) since the device was attached (volume id %s, now %s): the writes it had acknowledged but "+
			"not flushed are lost on this half", ErrReplaced, backend, known, id)
	}
	if rolledBackSince(known, id) {
		return fmt.Errorf("%w: the volume behind %s was rolled back since the device was attached (a snapshot "+
			"merged into it, or it shrank and lost its tail, even if grown back since; volume id %s, now %s), "+
			"and its data is not the device's", ErrReplaced, backend, known, id)
	}
	return fmt.Errorf("%w: the volume behind %s is not the one its device was attached to (volume id %s, now %s), "+
		"and its data is not the device's", ErrReplaced, backend, known, id)
}

// rolledBackSince reports whether now is the volume of known, rolled back
// since (more rollbacks counted: volume.RolledBackID), on the same epoch.
func rolledBackSince(known, now string) bool {
	kb, ke := nbd.SplitEpoch(known)
	nb, ne := nbd.SplitEpoch(now)
	kbase, kn := volume.SplitRollbacks(kb)
	nbase, nn := volume.SplitRollbacks(nb)
	return ke == ne && kbase == nbase && nn > kn
}

// crashedSince reports whether now is the volume of known, served by a box
// that went down since (another epoch: nbd.WithEpoch).
func crashedSince(known, now string) bool {
	kb, ke := nbd.SplitEpoch(known)
	nb, ne := nbd.SplitEpoch(now)
	return kb == nb && ke != ne
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
	how := unix.LOCK_SH
	if write {
		how = unix.LOCK_EX
	}
	// No deadline: the other holders are lvnbd commands that finish.
	unlock, err := flock.Lock(context.Background(), s.path+".lock", how)
	if err != nil {
		return fmt.Errorf("volume IDs: %w", err)
	}
	defer unlock()
	ids := map[string]string{}
	if err := atomicfile.ReadJSON(s.path, &ids); errors.Is(err, atomicfile.ErrCorrupt) {
		return fmt.Errorf("volume IDs: %s is %w: remove it; devices attached until now are then "+
			"not checked at their next reconnect", s.path, err)
	} else if err != nil {
		return fmt.Errorf("volume IDs: %w", err)
	}
	// f sees the IDs a Set could not save where the file has none, and
	// a change saves them.
	unsaved := false
	for b, id := range s.unsaved {
		if _, ok := ids[b]; !ok {
			ids[b], unsaved = id, true
		}
	}
	if changed := f(ids); !write || !changed && !unsaved {
		return nil
	}
	if err := atomicfile.WriteJSON(s.path, ids); err != nil {
		return fmt.Errorf("volume IDs: %w", err)
	}
	clear(s.unsaved) // saved now, or the file's own record won
	return nil
}
