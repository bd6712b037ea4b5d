package server

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server/backend"
)

// Failure records an export whose write-back failed (backend.WriteBackError).
type Failure struct {
	Export string `json:"export"`
	// Description is the export's (its file, device or volume).
	Description string `json:"description"`
	Error       string `json:"error"`
	// Errno is the failure's error number, which clients keep getting.
	Errno int       `json:"errno,omitempty"`
	Since time.Time `json:"since"`
}

// err is the failure as a backend keeps it after a restart.
func (f Failure) err() error {
	errno := syscall.EIO
	if f.Errno != 0 {
		errno = syscall.Errno(f.Errno)
	}
	return fmt.Errorf("%s (recorded %s): %w", f.Error, f.Since.Format(time.RFC3339), errno)
}

// ErrNotFailed is returned by Recover for an export that has not failed.
var ErrNotFailed = errors.New("has not failed")

// Failures are the exports whose write-back failed, persisted: the data
// acknowledged before the failure may be lost, and a restarted server that
// served the export as if nothing had happened would let a guest's mirror
// take this half back from its bitmap, which does not cover what was lost.
// So a failed export stays failed across restarts until an admin recovers
// it (Registry.Recover) or removes its volume.
type Failures struct {
	path string
	log  *zap.Logger
	// save serialises writing the file. It is taken before mu and held
	// across the write and its fsyncs, which mu never is: a write hung on
	// a failing disk must not stop lookups, which every new export makes
	// with the registry locked.
	save sync.Mutex
	mu   sync.Mutex
	list []Failure
	// unsaved: the file does not hold list, because writing it failed
	// (the disk of /var/lib is full or failing too). Every later record
	// and Retry tries again.
	unsaved error
}

// writeFailures writes the records to path; tests replace it.
var writeFailures = func(path string, list []Failure) error { return saveJSON(path, list) }

// LoadFailures reads the failures recorded at path; a missing file is none.
// An empty path keeps them in memory only.
func LoadFailures(path string, log *zap.Logger) (*Failures, error) {
	if log == nil {
		log = zap.NewNop()
	}
	f := &Failures{path: path, log: log}
	if err := loadJSON(path, &f.list); err != nil {
		return nil, fmt.Errorf("failure file %s: %w: fix or remove it, but only once every export it may list "+
			"was checked (see lvnbd recover --help)", path, err)
	}
	return f, nil
}

// List returns the recorded failures.
func (f *Failures) List() []Failure {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.list)
}

func (f *Failures) lookup(export string) (Failure, bool) {
	return f.lookupVolume(export, "")
}

// lookupVolume finds the record of export's volume that description names
// (see sameVolume; "" matches any).
func (f *Failures) lookupVolume(export, description string) (Failure, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := f.indexLocked(export, description)
	if i < 0 {
		return Failure{}, false
	}
	return f.list[i], true
}

// indexLocked is the index of the record of export's volume that
// description names, -1 if there is none.
func (f *Failures) indexLocked(export, description string) int {
	return slices.IndexFunc(f.list, func(x Failure) bool {
		return x.Export == export && sameVolume(x.Description, description)
	})
}

// record keeps the first failure of an export's volume, in memory at once
// (lookups see it while it is written) and in the file before it returns. It
// is kept in memory even when the file cannot be written, and that is logged
// as the emergency it is: a restart would serve the export again. Writing
// the file is tried again on every later record and Retry. Records are one
// per export name and volume (see sameVolume): a volume removed and made
// anew under the name keeps its own, whichever of the two fails first.
func (f *Failures) record(export, description string, err error) {
	f.mu.Lock()
	if f.indexLocked(export, description) >= 0 {
		unsaved := f.unsaved != nil
		f.mu.Unlock()
		if unsaved {
			_ = f.persist() // logged
		}
		return
	}
	x := Failure{Export: export, Description: description, Error: err.Error(), Since: time.Now().UTC()}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		x.Errno = int(errno)
	}
	f.list = append(f.list, x)
	f.mu.Unlock()
	if f.persist() == nil {
		f.log.Error("write-back failed: every request to the export fails from now on, also after a restart, "+
			"until lvnbd recover", zap.String("export", export), zap.String("description", description),
			zap.String("recorded_in", f.path), zap.Error(err))
	}
}

// persist writes the records as they are now, logging a failure as the
// emergency it is.
func (f *Failures) persist() error {
	f.save.Lock()
	defer f.save.Unlock()
	f.mu.Lock()
	list, was := slices.Clone(f.list), f.unsaved
	f.mu.Unlock()
	err := writeFailures(f.path, list)
	if err != nil {
		f.log.Error("a failed write-back could not be recorded: if lvnbd restarts now, it will serve the failed "+
			"exports again as if nothing had happened; free space or mend the disk holding the file, and do not "+
			"restart lvnbd until this is written (it is retried) or the guests' mirrors have dropped those halves",
			zap.String("file", f.path), zap.Error(err))
	} else if was != nil {
		f.log.Info("the recorded write-back failures are written at last", zap.String("file", f.path))
	}
	// Records added meanwhile are written by their own persist, waiting
	// on save now.
	f.mu.Lock()
	f.unsaved = err
	f.mu.Unlock()
	return err
}

// Retry writes the records again if writing them failed before; it returns
// the error of the last attempt, nil once they are written.
func (f *Failures) Retry() error {
	f.mu.Lock()
	unsaved := f.unsaved != nil
	f.mu.Unlock()
	if !unsaved {
		return nil
	}
	if err := f.persist(); err != nil {
		return fmt.Errorf("recording write-back failures in %s: %w", f.path, err)
	}
	return nil
}

// clear forgets export's failures (of every volume under the name),
// persisted before it returns; it returns those it forgot. Until the file
// is written, lookups still find them.
func (f *Failures) clear(export string) ([]Failure, error) {
	f.save.Lock()
	defer f.save.Unlock()
	var gone []Failure // every volume's under the name
	f.mu.Lock()
	next := slices.DeleteFunc(slices.Clone(f.list), func(x Failure) bool {
		if x.Export == export {
			gone = append(gone, x)
			return true
		}
		return false
	})
	f.mu.Unlock()
	if len(gone) == 0 {
		return nil, nil
	}
	if err := writeFailures(f.path, next); err != nil {
		return nil, fmt.Errorf("clearing the failure of %q: %w", export, err)
	}
	f.mu.Lock()
	// Only these records go: one added meanwhile waits on save to be
	// written, with the list it is in.
	f.list = slices.DeleteFunc(f.list, func(x Failure) bool { return slices.Contains(gone, x) })
	if len(f.list) == len(next) {
		f.unsaved = nil
	}
	f.mu.Unlock()
	return gone, nil
}

// restore records again failures clear forgot, for an operation that could
// not go on after clearing them; persisted (or logged) before it returns.
func (f *Failures) restore(gone []Failure) {
	if len(gone) == 0 {
		return
	}
	f.mu.Lock()
	for _, x := range gone {
		if f.indexLocked(x.Export, x.Description) < 0 {
			f.list = append(f.list, x)
		}
	}
	f.mu.Unlock()
	_ = f.persist() // logged
}

// failureKeeper is a backend that can be told of its failure from before a
// restart and reports new ones (backend.File).
type failureKeeper interface {
	MarkFailed(error)
	OnFailure(func(error))
}

// keepFailuresLocked makes e fail if a failure of its volume is recorded
// under its name, and records its failures from now on. Called before e is offered.
func (r *Registry) keepFailuresLocked(e *Export) {
	b, ok := e.Backend.(failureKeeper)
	if !ok || r.failures == nil {
		return
	}
	if x, ok := r.failures.lookupVolume(e.Name, e.Description); ok {
		b.MarkFailed(x.err())
	} else if x, ok := r.failures.lookup(e.Name); ok {
		r.failures.log.Warn("a failure recorded under this export's name was of another volume, removed since and made anew: not applied (volume create, volume remove or lvnbd recover clears the record)",
			zap.String("export", e.Name), zap.String("recorded_for", x.Description), zap.String("now", e.Description))
	}
	failures := r.failures
	b.OnFailure(func(err error) {
		if e.recovered.Load() {
			// A sync that was under way on the failed export when lvnbd
			// recover replaced it: the admin already gave up what it
			// covered (the half is resynced in full), and the new export's
			// own descriptor is told of any failure from after its opening.
			// Recording it would fail the recovered export again.
			failures.log.Warn("a write-back of the export that lvnbd recover replaced failed late; the recovered export is not affected",
				zap.String("export", e.Name), zap.Error(err))
			return
		}
		failures.record(e.Name, e.Description, err)
		r.failCurrent(e, err)
	})
}

// failCurrent fails the export offered under failed's name now, if another
// replaced it (a reload, a rescan) before failed's write-back failed: the
// record names the export, so it fails now as it would after a restart.
func (r *Registry) failCurrent(failed *Export, err error) {
	r.mu.RLock()
	cur := r.exports[failed.Name]
	r.mu.RUnlock()
	if cur == nil || cur == failed || !sameVolume(cur.Description, failed.Description) {
		return // a volume made anew shares only the name
	}
	if b, ok := cur.Backend.(failureKeeper); ok {
		b.MarkFailed(err)
	}
}

// sameVolume reports whether two export descriptions may be of the same
// volume: their volume IDs (nbd.DescriptionID) are equal, or one has none
// (an --export of a file or device), when only the name tells. The box's
// epoch is left out (nbd.SplitEpoch): a crash of the box does not undo a
// failed write-back, while a volume made anew or rolled back has another
// ID of its own.
func sameVolume(a, b string) bool {
	ia, _ := nbd.SplitEpoch(nbd.DescriptionID(a))
	ib, _ := nbd.SplitEpoch(nbd.DescriptionID(b))
	return ia == "" || ib == "" || ia == ib
}

// KeepFailures makes the registry record exports' failed write-backs in f,
// and fail exports added under a recorded name. Call it before adding any.
func (r *Registry) KeepFailures(f *Failures) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failures = f
}

// Failures returns the recorded failures, nil if none are kept.
func (r *Registry) Failures() *Failures {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.failures
}

// ForgetFailure clears the recorded failure of an export whose storage was
// removed or made anew on purpose: nothing of the failed data is left.
func (r *Registry) ForgetFailure(export string) (bool, error) {
	f := r.Failures()
	if f == nil {
		return false, nil
	}
	gone, err := f.clear(export)
	return len(gone) > 0, err
}

// openBackend opens a recovered export's storage; tests replace it.
var openBackend = func(path string, readOnly bool) (Backend, error) { return backend.Open(path, readOnly) }

// RecoverResult is what Recover did.
type RecoverResult struct {
	Export string `json:"export"`
	// Failure is the failure that was cleared.
	Failure string `json:"failure"`
	// Reopened is true when the export was opened anew and is served
	// again; false when it is not exported now (its volume is missing),
	// and only the record was cleared.
	Reopened bool `json:"reopened"`
	// ClientsCut counts the connections to the failed export that were
	// closed; their clients reconnect to the reopened one.
	ClientsCut int `json:"clients_cut"`
}

// Recover serves a failed export again: it opens the export's file or
// device anew, clears the recorded failure, offers the new export under the
// same name and disconnects the clients of the failed one. The caller must
// know that the storage works again, and that whatever mirrors this export
// will copy it in full: the data acknowledged before the failure may be
// lost. The reopened export keeps the failed one's description; an export
// made from a volume is recovered through Volumes.Recover, which reads it
// from the volume.
func (r *Registry) Recover(name string) (RecoverResult, error) {
	return r.recover(name, nil)
}

// recover is Recover. When describe is not nil, it gives the reopened
// export's description, and is called after the storage is opened anew:
// what it tells is then never older than what was opened.
func (r *Registry) recover(name string, describe func() (string, error)) (RecoverResult, error) {
	res := RecoverResult{Export: name}
	r.mu.RLock()
	old, exported := r.exports[name]
	r.mu.RUnlock()
	if exported {
		if f, ok := old.Backend.(failer); ok {
			if err := f.Failed(); err != nil {
				res.Failure = err.Error()
			}
		}
	}
	if x, ok := r.lookupFailure(name); ok && res.Failure == "" {
		res.Failure = x.Error
	}
	if res.Failure == "" {
		if !exported {
			return res, fmt.Errorf("export %q: %w", name, ErrNoExport)
		}
		return res, fmt.Errorf("export %q %w: nothing to recover", name, ErrNotFailed)
	}
	if !exported {
		_, err := r.ForgetFailure(name)
		return res, err
	}
	p, ok := old.Backend.(interface{ Path() string })
	if !ok {
		return res, fmt.Errorf("export %q cannot be opened anew (its backend has no path)", name)
	}
	b, err := openBackend(p.Path(), old.ReadOnly)
	if err != nil {
		return res, fmt.Errorf("recovering export %q: %w", name, err)
	}
	desc := old.Description
	if describe != nil {
		if desc, err = describe(); err != nil {
			b.Close()
			return res, fmt.Errorf("recovering export %q: %w", name, err)
		}
	}
	changed := fmt.Errorf("export %q changed while it was being recovered: look at lvnbd status and try again", name)
	r.mu.RLock()
	current := r.exports[name] == old
	r.mu.RUnlock()
	if !current {
		b.Close()
		return res, changed
	}
	// Set before the record is cleared: a late failure of the old export's
	// syncs recorded in between would fail the new one (keepFailuresLocked).
	old.recovered.Store(true)
	// Cleared before the swap, so the new export is not marked failed by
	// the record; and without the registry's lock, as the file's write
	// (fsyncs, on a disk that may be the failing one) must not hold every
	// handshake's lookup. Until the swap the old export, failed in memory,
	// is the one looked up.
	var gone []Failure
	if r.failures != nil {
		var err error
		if gone, err = r.failures.clear(name); err != nil {
			old.recovered.Store(false) // still the export, and still failed
			b.Close()
			return res, err
		}
	}
	r.mu.Lock()
	if r.exports[name] != old {
		// Replaced meanwhile (a reload, a rescan): the record goes back,
		// for whichever export it applies to.
		r.mu.Unlock()
		old.recovered.Store(false)
		if r.failures != nil {
			r.failures.restore(gone)
			// The export added meanwhile may have found no record.
			r.mu.RLock()
			if cur, ok := r.exports[name]; ok {
				if kb, ok := cur.Backend.(failureKeeper); ok {
					if x, ok := r.failures.lookupVolume(cur.Name, cur.Description); ok {
						kb.MarkFailed(x.err())
					}
				}
			}
			r.mu.RUnlock()
		}
		b.Close()
		return res, changed
	}
	e := &Export{Name: name, Description: desc, ReadOnly: old.ReadOnly, Backend: b,
		Access: *old.currentAccess(), onShrink: old.onShrink}
	// The old clients are cut, but a write of theirs may still be under
	// way: a copy resent on e waits for it (see hangup.go).
	e.writes.Store(old.ranges())
	r.exports[name] = e
	r.keepFailuresLocked(e)
	_, last := r.retireLocked(old)
	r.mu.Unlock()
	if last {
		r.closeRetired(old)
	}
	res.Reopened, res.ClientsCut = true, len(old.Clients())
	old.kickClients()
	return res, nil
}

func (r *Registry) lookupFailure(name string) (Failure, bool) {
	if f := r.Failures(); f != nil {
		return f.lookup(name)
	}
	return Failure{}, false
}
