package backend

import (
	"fmt"
	"sync"
	"sync/atomic"
)

// WriteBackError is what every I/O of an export returns once a flush or
// durable write of it failed: Linux tells of a failed write-back only once per
// open file, so the server keeps the failure instead (see syncTracker).
// Reads fail too: a page whose write-back failed may be read back from the
// page cache now and from the disk, older, later, and a guest's mirror must
// not take this half back before it is resynced in full.
type WriteBackError struct {
	Path string
	Err  error // the first failure: fdatasync's, an RWF_DSYNC write's or a writeBack's
}

func (e *WriteBackError) Error() string {
	return fmt.Sprintf("%v; data written to %s before then may not be on stable storage, so every read, write "+
		"and flush of it fails from now on, also after a restart: check the disk and the kernel log, and follow "+
		"lvnbd recover --help (a guest's mirror must resync this half in full, not from its bitmap)",
		e.Err, e.Path)
}

func (e *WriteBackError) Unwrap() error { return e.Err }

// syncTracker runs the operations that make an export's data durable
// (fdatasync, writes with RWF_DSYNC), and the others that wait for its
// write-back (File.writeBack), and keeps the first failure for ever.
//
// Linux reports a write-back error to each open file once (errseq_t): the
// first fdatasync after a page failed to reach the disk fails, the next one
// succeeds. Every connection, FUA write, snapshot pause and shutdown flush of
// an export shares one open file, so without this a FLUSH on one connection
// could be told of a failed write-back and the next FLUSH, on any connection,
// be answered with success although data it covers was lost.
//
// Concurrent syncs need one more step. The kernel tells whichever sync gets
// there first; another running alongside succeeds. So a sync that succeeded
// waits, before it believes it, until every sync that started before it
// returned has finished and kept its failure, if it had one.
type syncTracker struct {
	mu      sync.Mutex
	done    sync.Cond           // broadcast when a sync finishes
	next    uint64              // the ticket of the next sync to start
	running map[uint64]struct{} // tickets of the syncs under way
	err     error               // the first failure
	failed  atomic.Bool         // err is set: read without the lock on every I/O
	path    string              // for WriteBackError
	// onFail, when set, is told of a failure before the sync that met it
	// returns, and before any sync that started after it can succeed: the
	// server records the failure there, so that a restart keeps it.
	onFail func(error)
}

func newSyncTracker(path string) *syncTracker {
	t := &syncTracker{running: make(map[uint64]struct{}), path: path}
	t.done.L = &t.mu
	return t
}

// run runs op unless an earlier sync failed. Any failure of op becomes the
// export's, whatever its errno: the kernel reports a failed write-back with
// the device's, which can be any (EOPNOTSUPP included), so none can be
// told apart as op's own.
func (t *syncTracker) run(op func() error) error {
	t.mu.Lock()
	if t.err != nil {
		t.mu.Unlock()
		return &WriteBackError{Path: t.path, Err: t.err}
	}
	ticket := t.next
	t.next++
	t.running[ticket] = struct{}{}
	onFail := t.onFail
	t.mu.Unlock()

	err := op()
	if err != nil && onFail != nil {
		// Still running: a later sync that succeeds waits for this ticket,
		// so none is believed before the failure is recorded.
		onFail(err)
	}

	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.running, ticket)
	t.done.Broadcast()
	if err != nil && t.err == nil {
		t.err = err
		t.failed.Store(true)
	}
	if err == nil {
		for horizon := t.next; t.runningBefore(horizon); {
			t.done.Wait()
		}
	}
	if t.err != nil {
		return &WriteBackError{Path: t.path, Err: t.err}
	}
	return nil
}

// setOnFail sets the function told of a failure (see onFail).
func (t *syncTracker) setOnFail(f func(error)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.onFail = f
}

// fail makes err the kept failure, unless there already is one: a failure
// from before a restart.
func (t *syncTracker) fail(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.err == nil {
		t.err = err
		t.failed.Store(true)
	}
}

// check returns the kept failure, if there is one.
func (t *syncTracker) check() error {
	if !t.failed.Load() {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return &WriteBackError{Path: t.path, Err: t.err}
}

// runningBefore reports whether a sync with a ticket below horizon is under
// way. Few run at once, so a scan is cheap.
func (t *syncTracker) runningBefore(horizon uint64) bool {
	for k := range t.running {
		if k < horizon {
			return true
		}
	}
	return false
}
