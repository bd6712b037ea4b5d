package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server/backend"
)

// hookedBackend is a real backend whose failures the test makes: fail calls
// what the registry gave OnFailure, as a failed fdatasync does.
type hookedBackend struct {
	*backend.File
	onFail func(error)
}

func (h *hookedBackend) OnFailure(f func(error)) { h.onFail = f; h.File.OnFailure(f) }

// fail makes the backend fail as a failed write-back does: recorded first,
// then kept.
func (h *hookedBackend) fail(err error) {
	h.onFail(err)
	h.File.MarkFailed(err)
}

// failureRegistry returns a registry keeping failures in a file of the
// test's, and that file's path.
func failureRegistry(t *testing.T, path string) *Registry {
	t.Helper()
	f, err := LoadFailures(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	reg := NewRegistry()
	reg.KeepFailures(f)
	return reg
}

// addAgain opens img anew as export name and adds it to reg, as a restart
// or a volume rescan does.
func addAgain(t *testing.T, reg *Registry, name, img string) *Export {
	t.Helper()
	e, err := OpenExport(ExportSpec{Name: name, Path: img})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Backend.Close() })
	if err := reg.Add(e); err != nil {
		t.Fatal(err)
	}
	return e
}

// addHooked adds to reg a 1 MiB file export vm1 whose failures the test
// triggers (hookedBackend.fail); it returns the export, its backend and its
// file.
func addHooked(t *testing.T, reg *Registry) (*Export, *hookedBackend, string) {
	t.Helper()
	e, img := fileExport(t, "vm1", 1<<20, false)
	hb := &hookedBackend{File: e.Backend.(*backend.File)}
	e.Backend = hb
	if err := reg.Add(e); err != nil {
		t.Fatal(err)
	}
	return e, hb, img
}

// readErrno reports the errno a read of e gets.
func readErrno(e *Export) nbd.Errno {
	err := e.Backend.ReadAt(make([]byte, 512), 0)
	if err == nil {
		return 0
	}
	return errnoOf(err)
}

// A failed write-back is recorded, and an export added under its name after
// a restart (a new registry reading the same file) fails as the old one
// did, until recovered: with EIO on the wire whatever the first failure
// was (see errnoOf), and the recorded error in status.
func TestFailureSurvivesRestart(t *testing.T) {
	for _, tc := range []struct {
		name  string
		err   error
		errno nbd.Errno
	}{
		{"EIO", fmt.Errorf("fdatasync /dev/vg0/vm1: %w", syscall.EIO), nbd.EIO},
		{"ENOSPC", fmt.Errorf("pwrite /srv/vm1.img at 0: %w", syscall.ENOSPC), nbd.EIO},
		{"no errno", errors.New("something odd"), nbd.EIO},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state", "failures.json")
			reg := failureRegistry(t, path)
			e, hb, img := addHooked(t, reg)
			if got := readErrno(e); got != 0 {
				t.Fatalf("a read before any failure got errno %d", got)
			}
			hb.fail(tc.err)
			var recorded []Failure
			b, err := os.ReadFile(path)
			if err == nil {
				err = json.Unmarshal(b, &recorded)
			}
			if err != nil || len(recorded) != 1 || recorded[0].Export != "vm1" || recorded[0].Error != tc.err.Error() {
				t.Fatalf("failure file holds %s (%v), want vm1's failure", b, err)
			}

			// The restart: the same file, a new registry, the export opened anew.
			reg2 := failureRegistry(t, path)
			e2 := addAgain(t, reg2, "vm1", img)
			if got := readErrno(e2); got != tc.errno {
				t.Errorf("a read after the restart got errno %d, want %d", got, tc.errno)
			}
			if err := e2.Backend.Flush(); !strings.Contains(fmt.Sprint(err), "recorded") {
				t.Errorf("a flush after the restart returned %v, want the recorded failure", err)
			}
			st := reg2.Status()
			if len(st) != 1 || !strings.Contains(st[0].Failed, tc.err.Error()) || !strings.Contains(st[0].Failed, "lvnbd recover") {
				t.Errorf("status after the restart: %+v, want vm1 failed with the recorded error and what to do", st)
			}
			// Another name is not touched.
			other, _ := fileExport(t, "vm2", 1<<20, false)
			if err := reg2.Add(other); err != nil {
				t.Fatal(err)
			}
			if got := readErrno(other); got != 0 {
				t.Errorf("an export with another name got errno %d", got)
			}
		})
	}
}

// A backend marked failed at Add (the restart) runs no more syncs, so its
// OnFailure is not told again: the first record stays.
func TestKeptFailureIsNotToldAgain(t *testing.T) {
	e, _ := fileExport(t, "vm1", 1<<20, false)
	b := e.Backend.(*backend.File)
	b.MarkFailed(syscall.EIO)
	called := false
	b.OnFailure(func(error) { called = true })
	if err := b.Flush(); err == nil {
		t.Fatal("a flush of a failed backend succeeded")
	}
	if called {
		t.Error("OnFailure was told again of a failure already kept")
	}
}

// The failure stays in memory when the file cannot be written, so the
// export stays failed while this server runs.
func TestFailureKeptWhenTheFileCannotBeWritten(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	reg := failureRegistry(t, filepath.Join(state, "failures.json"))
	// Its directory cannot be made now (root ignores permissions).
	if err := os.WriteFile(state, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, hb, img := addHooked(t, reg)
	hb.fail(syscall.EIO)
	if _, ok := reg.Failures().lookup("vm1"); !ok {
		t.Fatal("the failure was dropped because its file could not be written")
	}
	// Removed and added again (a volume rescan), it is still failed.
	removeAndWait(t, reg, "vm1")
	e2 := addAgain(t, reg, "vm1", img)
	if got := readErrno(e2); got != nbd.EIO {
		t.Errorf("the export added again got errno %d, want EIO", got)
	}
	// Writing is tried again until it works.
	if err := reg.Failures().Retry(); err == nil {
		t.Fatal("Retry succeeded while the directory cannot be made")
	}
	if err := os.Remove(state); err != nil {
		t.Fatal(err)
	}
	if err := reg.Failures().Retry(); err != nil {
		t.Fatalf("Retry once the directory can be made: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(state, "failures.json")); err != nil || !strings.Contains(string(b), `"vm1"`) {
		t.Errorf("after Retry the file holds %q (%v), want vm1's failure", b, err)
	}
}

// An export replaced under the same name (a reload, a rescan) before the
// old one's write-back failed fails too: the record names it.
func TestFailureOfAReplacedExport(t *testing.T) {
	reg := failureRegistry(t, filepath.Join(t.TempDir(), "failures.json"))
	_, hb, img := addHooked(t, reg)
	removeAndWait(t, reg, "vm1")
	e2 := addAgain(t, reg, "vm1", img)
	hb.fail(syscall.EIO) // the old one's drained flush
	if got := readErrno(e2); got != nbd.EIO {
		t.Errorf("the export now offered as vm1 got errno %d, want EIO", got)
	}
}

// addVolume offers img as export vm1 of volume id in reg, with a backend the
// test can fail.
func addVolume(t *testing.T, reg *Registry, img, id string) (*Export, *hookedBackend) {
	t.Helper()
	e, err := OpenExport(ExportSpec{Name: "vm1", Path: img})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Backend.Close() })
	e.Description = nbd.WithID("volume vm1", id)
	hb := &hookedBackend{File: e.Backend.(*backend.File)}
	e.Backend = hb
	if err := reg.Add(e); err != nil {
		t.Fatal(err)
	}
	return e, hb
}

// restartRegistry removes vm1 from reg and returns a registry as a server
// restarted with the failure file at path has it.
func restartRegistry(t *testing.T, reg *Registry, path string) *Registry {
	t.Helper()
	removeAndWait(t, reg, "vm1")
	return failureRegistry(t, path)
}

// removeAndWait removes export name from reg and waits until it is flushed
// and closed, as a stop does: a flush after the test's end would write to
// its files while they are removed.
func removeAndWait(t *testing.T, reg *Registry, name string) {
	t.Helper()
	_, closed, err := reg.Remove(name)
	if err != nil {
		t.Fatal(err)
	}
	<-closed
}

// volumeImage makes a 1 MiB image for addVolume.
func volumeImage(t *testing.T) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "vm1.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	return img
}

// A volume made anew under a failed one's name shares only the name: the
// old one's late failure does not fail it, nor does the record after a
// restart; the same volume added again does fail.
func TestFailureOfAnotherVolumeOfTheName(t *testing.T) {
	path := filepath.Join(t.TempDir(), "failures.json")
	img := volumeImage(t)
	reg := failureRegistry(t, path)
	_, old := addVolume(t, reg, img, "uuid-1")
	removeAndWait(t, reg, "vm1")
	anew, _ := addVolume(t, reg, img, "uuid-2")
	old.fail(syscall.EIO) // the old volume's drained flush
	if got := readErrno(anew); got != 0 {
		t.Errorf("the volume made anew got errno %d from the old one's failure", got)
	}
	if recs := reg.Failures().List(); len(recs) != 1 || nbd.DescriptionID(recs[0].Description) != "uuid-1" {
		t.Fatalf("records: %+v, want the old volume's", recs)
	}

	// After a restart the record is the old volume's, not the new one's.
	for _, tt := range []struct {
		id   string
		want nbd.Errno
	}{{"uuid-2", 0}, {"uuid-1", nbd.EIO}} {
		reg = restartRegistry(t, reg, path)
		if e, _ := addVolume(t, reg, img, tt.id); readErrno(e) != tt.want {
			t.Errorf("after a restart, vm1 with ID %s got errno %d, want %d", tt.id, readErrno(e), tt.want)
		}
	}

	// The volume made anew fails too: it has a record of its own, and
	// stays failed after a restart.
	reg = restartRegistry(t, reg, path)
	_, hb := addVolume(t, reg, img, "uuid-2")
	hb.fail(syscall.EIO)
	if recs := reg.Failures().List(); len(recs) != 2 {
		t.Errorf("records after the new volume failed: %+v, want both volumes'", recs)
	}
	if e, _ := addVolume(t, restartRegistry(t, reg, path), img, "uuid-2"); readErrno(e) != nbd.EIO {
		t.Errorf("after a restart, the new volume that failed got errno %d, want EIO", readErrno(e))
	}
}

// A crash of the box gives the volume's ID the box's epoch
// (nbd.WithEpoch), and the volume's failure record still holds: the crash
// did not bring back what its write-back lost. Either way round, and over
// two crashes.
func TestFailureOutlivesABoxCrash(t *testing.T) {
	for _, tc := range []struct{ failedAs, restartedAs string }{
		{"uuid-1", "uuid-1--c00112233"},
		{"uuid-1--c00112233", "uuid-1--c44556677"},
		{"uuid-1--c00112233", "uuid-1"},
	} {
		t.Run(tc.failedAs+" to "+tc.restartedAs, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "failures.json")
			img := volumeImage(t)
			reg := failureRegistry(t, path)
			_, hb := addVolume(t, reg, img, tc.failedAs)
			hb.fail(syscall.EIO)
			reg = restartRegistry(t, reg, path)
			e, _ := addVolume(t, reg, img, tc.restartedAs)
			if got := readErrno(e); got != nbd.EIO {
				t.Errorf("after the crash, vm1 with ID %s got errno %d, want EIO", tc.restartedAs, got)
			}
		})
	}
}

// The new volume fails first, then the old one's last flush: each keeps
// its own record, and the new one stays failed after a restart.
func TestFailureOfTheOldVolumeAfterTheNew(t *testing.T) {
	path := filepath.Join(t.TempDir(), "failures.json")
	img := volumeImage(t)
	reg := failureRegistry(t, path)
	_, old := addVolume(t, reg, img, "uuid-1")
	removeAndWait(t, reg, "vm1")
	_, hb := addVolume(t, reg, img, "uuid-2")
	hb.fail(syscall.EIO)
	old.fail(syscall.EIO)
	if e, _ := addVolume(t, restartRegistry(t, reg, path), img, "uuid-2"); readErrno(e) != nbd.EIO {
		t.Errorf("after a restart, the new volume that failed first got errno %d, want EIO", readErrno(e))
	}
}

func TestLoadFailuresCorrupt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "failures.json")
	if err := os.WriteFile(path, []byte("[{"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := LoadFailures(path, nil)
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "lvnbd recover") {
		t.Errorf("LoadFailures of a corrupt file returned %v, want an error naming it and what to do", err)
	}
	if f, err := LoadFailures(filepath.Join(t.TempDir(), "none.json"), nil); err != nil || len(f.List()) != 0 {
		t.Errorf("LoadFailures of a missing file: %v, %v; want none", f, err)
	}
}

// Recover opens a failed export anew, clears its record and cuts the failed
// one's clients; it refuses an export that has not failed.
func TestRecover(t *testing.T) {
	path := filepath.Join(t.TempDir(), "failures.json")
	reg := failureRegistry(t, path)
	var reopened *hookedBackend
	open := openBackend
	openBackend = func(path string, readOnly bool) (Backend, error) {
		b, err := backend.Open(path, readOnly)
		if err != nil {
			return nil, err
		}
		reopened = &hookedBackend{File: b}
		return reopened, nil
	}
	t.Cleanup(func() { openBackend = open })
	e, _ := fileExport(t, "vm1", 1<<20, false)
	hb := &hookedBackend{File: e.Backend.(*backend.File)}
	e.Backend = hb
	e.SetAccess(Access{Allow: mustAllow(t, "10.0.0.0/24")})
	if err := reg.Add(e); err != nil {
		t.Fatal(err)
	}
	kicked := 0
	e.attach(&clientConn{id: 1, peer: "10.0.0.21:40000", kick: func() { kicked++ }})

	if _, err := reg.Recover("vm1"); !errors.Is(err, ErrNotFailed) {
		t.Errorf("Recover of a working export returned %v, want ErrNotFailed", err)
	}
	if _, err := reg.Recover("nope"); !errors.Is(err, ErrNoExport) {
		t.Errorf("Recover of an unknown export returned %v, want ErrNoExport", err)
	}

	hb.fail(fmt.Errorf("fdatasync: %w", syscall.EIO))
	res, err := reg.Recover("vm1")
	if err != nil {
		t.Fatal(err)
	}
	if !res.Reopened || res.ClientsCut != 1 || kicked != 1 || !strings.Contains(res.Failure, "fdatasync") {
		t.Errorf("Recover: %+v, %d kicked; want reopened, 1 client cut, the failure named", res, kicked)
	}
	now, ok := reg.Lookup("vm1")
	if !ok || now == e {
		t.Fatal("the registry does not offer a new vm1")
	}
	t.Cleanup(func() { now.Backend.Close() })
	if now.ranges() != e.ranges() {
		t.Error("the recovered export does not share the old one's range lock: a write of a cut client may land after its resent copy")
	}
	if got := readErrno(now); got != 0 {
		t.Errorf("a read of the recovered export got errno %d", got)
	}
	if err := now.Backend.WriteAt([]byte("x"), 0, true); err != nil {
		t.Errorf("a FUA write to the recovered export: %v", err)
	}
	if now.currentAccess().Allow == nil || now.ReadOnly != e.ReadOnly || now.Description != e.Description {
		t.Errorf("the recovered export lost its settings: %+v", now)
	}
	if got := reg.Failures().List(); len(got) != 0 {
		t.Errorf("records after Recover: %+v", got)
	}
	if b, _ := os.ReadFile(path); strings.Contains(string(b), "vm1") {
		t.Errorf("the failure file still names vm1: %s", b)
	}
	// The cut clients may still be leaving: fences must reach them.
	inUse := reg.inUse()
	if !slices.Contains(inUse, e) {
		t.Error("the failed export, its client not gone yet, is not among the exports fences reach")
	}
	if _, err := reg.Recover("vm1"); !errors.Is(err, ErrNotFailed) {
		t.Errorf("a second Recover returned %v, want ErrNotFailed", err)
	}
	// A sync that was under way on the failed export and fails only now
	// neither records the failure again nor fails the recovered export.
	hb.onFail(fmt.Errorf("fdatasync, late: %w", syscall.EIO))
	if got := reg.Failures().List(); len(got) != 0 {
		t.Errorf("records after a late failure of the replaced export: %+v", got)
	}
	if got := readErrno(now); got != 0 {
		t.Errorf("after a late failure of the replaced export, a read of the recovered one got errno %d", got)
	}
	// The recovered export records its own failures.
	reopened.fail(syscall.EIO)
	if _, ok := reg.Failures().lookup("vm1"); !ok {
		t.Error("a failure of the recovered export was not recorded")
	}
}

// A read-only export (a snapshot) is recovered read-only.
func TestRecoverReadOnly(t *testing.T) {
	reg := failureRegistry(t, filepath.Join(t.TempDir(), "failures.json"))
	e, _ := fileExport(t, "vm1@snap", 1<<20, true)
	if err := reg.Add(e); err != nil {
		t.Fatal(err)
	}
	e.Backend.(*backend.File).MarkFailed(syscall.EIO)
	if _, err := reg.Recover("vm1@snap"); err != nil {
		t.Fatal(err)
	}
	now, _ := reg.Lookup("vm1@snap")
	t.Cleanup(func() { now.Backend.Close() })
	if !now.ReadOnly {
		t.Error("the recovered snapshot export is writable")
	}
	if err := now.Backend.WriteAt([]byte("x"), 0, false); err == nil {
		t.Error("a write reached the recovered snapshot's storage")
	}
}

// A record whose export is not served now (its volume is missing) is
// cleared by Recover, which says it opened nothing.
func TestRecoverRecordOnly(t *testing.T) {
	path := filepath.Join(t.TempDir(), "failures.json")
	rec := []Failure{{Export: "gone", Description: "volume gone on lvm://vg0", Error: "fdatasync: input/output error",
		Errno: int(syscall.EIO), Since: time.Now().UTC()}}
	b, _ := json.Marshal(rec)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	reg := failureRegistry(t, path)
	res, err := reg.Recover("gone")
	if err != nil || res.Reopened || res.Failure != rec[0].Error {
		t.Errorf("Recover of a record only: %+v, %v", res, err)
	}
	if got := reg.Failures().List(); len(got) != 0 {
		t.Errorf("records after Recover: %+v", got)
	}
}

func mustAllow(t *testing.T, s ...string) []netip.Prefix {
	t.Helper()
	p, err := ParseAllow(s)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// A record's write hung on a failing disk stops no lookup (every new export
// makes one with the registry locked): the record is in memory at once.
func TestHungRecordWriteBlocksNoLookup(t *testing.T) {
	f, err := LoadFailures(filepath.Join(t.TempDir(), "failures.json"), nil)
	if err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan struct{}), make(chan struct{})
	write := writeFailures
	writeFailures = func(path string, list []Failure) error {
		close(entered)
		<-release
		return write(path, list)
	}
	t.Cleanup(func() { writeFailures = write })
	recorded := make(chan struct{})
	go func() { f.record("vm1", "volume vm1", syscall.EIO); close(recorded) }()
	<-entered
	var found bool
	returnsWithoutWaiting(t, "a lookup waited for the record's write", func() { _, found = f.lookup("vm1") })
	if !found {
		t.Error("the record being written is not found")
	}
	close(release)
	<-recorded
}

// flushRecorder is a backend whose flushes fail as a failed write-back does
// (told to the registry, then kept), recording flushes and the close.
type flushRecorder struct {
	*hookedBackend
	events []string
}

func (f *flushRecorder) Flush() error {
	f.events = append(f.events, "flush")
	f.fail(syscall.EIO)
	return syscall.EIO
}

func (f *flushRecorder) Close() error {
	f.events = append(f.events, "close")
	return f.hookedBackend.Close()
}

// A withdrawn export (a reload, a rescan, a recovery) is flushed before its
// backend is closed, once its last client is gone: the server's shutdown
// flushes only the exports it still offers, and writes acknowledged to the
// old export's clients may be only in the page cache. A failed flush is
// recorded, as any failed write-back.
func TestRetiredExportIsFlushedBeforeItCloses(t *testing.T) {
	for _, clients := range []int{0, 1} {
		t.Run(fmt.Sprintf("%d clients", clients), func(t *testing.T) {
			reg := failureRegistry(t, filepath.Join(t.TempDir(), "failures.json"))
			e, _ := fileExport(t, "vm1", 1<<20, false)
			fr := &flushRecorder{hookedBackend: &hookedBackend{File: e.Backend.(*backend.File)}}
			e.Backend = fr
			if err := reg.Add(e); err != nil {
				t.Fatal(err)
			}
			if clients > 0 && !e.attach(&clientConn{id: 1}) {
				t.Fatal("attach refused")
			}
			_, closed, err := reg.Remove("vm1")
			if err != nil {
				t.Fatal(err)
			}
			if clients > 0 {
				if len(fr.events) != 0 {
					t.Fatalf("events with a client still attached: %v", fr.events)
				}
				e.detach(1)
			}
			<-closed
			if !slices.Equal(fr.events, []string{"flush", "close"}) {
				t.Errorf("backend events %v, want a flush, then the close", fr.events)
			}
			if _, ok := reg.Failures().lookup("vm1"); !ok {
				t.Error("the retired export's failed flush was not recorded")
			}
		})
	}
}

// blockingFlush is a backend whose Flush waits for release, as one on a
// slow or failing device does.
type blockingFlush struct {
	Backend
	entered chan struct{}
	release chan struct{}
}

func (b *blockingFlush) Flush() error {
	close(b.entered)
	<-b.release
	return b.Backend.Flush()
}

// Removing an export with no client left returns without waiting for its
// closing flush, which may take long (a rescan holds the volumes' lock
// meanwhile); the registry's WaitClosed, which a server's shutdown calls,
// waits for it.
func TestRetiredExportFlushesInTheBackground(t *testing.T) {
	reg := NewRegistry()
	e, _ := fileExport(t, "vm1", 1<<20, false)
	bf := &blockingFlush{Backend: e.Backend, entered: make(chan struct{}), release: make(chan struct{})}
	e.Backend = bf
	if err := reg.Add(e); err != nil {
		t.Fatal(err)
	}
	removed := make(chan (<-chan struct{}), 1)
	go func() {
		_, closed, err := reg.Remove("vm1")
		if err != nil {
			t.Error(err)
		}
		removed <- closed
	}()
	<-bf.entered
	var closed <-chan struct{}
	select {
	case closed = <-removed:
	case <-time.After(10 * time.Second):
		close(bf.release)
		t.Fatal("Remove waited for the retired export's flush")
	}
	select {
	case <-closed:
		t.Fatal("the backend was closed before its flush ended")
	default:
	}
	close(bf.release)
	reg.WaitClosed()
	select {
	case <-closed:
	default:
		t.Error("WaitClosed returned before the backend was closed")
	}
}

// closeAfterFlush is a backend that fails a Flush running when, or arriving
// after, it was closed: the descriptor would be gone (EBADF), or be another
// file's.
type closeAfterFlush struct {
	*blockingFlush
	mu       sync.Mutex
	flushing int
	blocked  bool // the first Flush, the shutdown's, waited for release
	closed   bool
	misuse   []string
}

func (b *closeAfterFlush) Flush() error {
	b.mu.Lock()
	if b.closed {
		b.misuse = append(b.misuse, "flush after close")
	}
	b.flushing++
	first := !b.blocked
	b.blocked = true
	b.mu.Unlock()
	var err error
	if first {
		err = b.blockingFlush.Flush() // the shutdown's: waits for release
	} else {
		err = b.blockingFlush.Backend.Flush()
	}
	b.mu.Lock()
	b.flushing--
	b.mu.Unlock()
	return err
}

func (b *closeAfterFlush) Close() error {
	b.mu.Lock()
	if b.flushing > 0 {
		b.misuse = append(b.misuse, "close during a flush")
	}
	b.closed = true
	b.mu.Unlock()
	return b.blockingFlush.Backend.Close()
}

// An export retired while the server's shutdown flushes it (a reload or a
// rescan landing as the server stops) is not closed under that flush: the
// flush would fail on a closed descriptor, and a healthy export be recorded
// as failed.
func TestShutdownFlushHoldsOffARetiredExportsClose(t *testing.T) {
	e, _ := fileExport(t, "vm1", 1<<20, false)
	b := &closeAfterFlush{blockingFlush: &blockingFlush{Backend: e.Backend,
		entered: make(chan struct{}), release: make(chan struct{})}}
	e.Backend = b
	ts := startServer(t, nil, e)
	stopped := make(chan error, 1)
	go func() { stopped <- ts.stop(t) }()
	<-b.blockingFlush.entered // the shutdown flush runs
	_, closed, err := ts.reg.Remove("vm1")
	if err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	closing := e.closing
	e.mu.Unlock()
	if closing {
		t.Error("the retired export began to close while the shutdown flushed it")
	}
	close(b.release)
	if err := <-stopped; err != nil {
		t.Errorf("Serve: %v", err)
	}
	<-closed
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.misuse) > 0 || !b.closed {
		t.Errorf("backend misused: %v (closed %v)", b.misuse, b.closed)
	}
}

// failingFlush is a backend whose flush fails now, and which had not failed
// before.
type failingFlush struct{ Backend }

func (failingFlush) Flush() error  { return &backend.WriteBackError{Path: "vm1", Err: syscall.EIO} }
func (failingFlush) Failed() error { return nil }

// The server's exit tells of a write-back that fails at the shutdown flush,
// not of one that failed before: that one is recorded and reported already,
// and would make every stop look like a failure.
func TestShutdownReportsOnlyNewFailures(t *testing.T) {
	old, _ := fileExport(t, "old", 1<<20, false)
	old.Backend.(*backend.File).MarkFailed(syscall.ENOSPC)
	if err := startServer(t, nil, old).stop(t); err != nil {
		t.Errorf("Serve with an export that failed before the shutdown: %v, want nil", err)
	}
	now, _ := fileExport(t, "now", 1<<20, false)
	now.Backend = failingFlush{now.Backend}
	if err := startServer(t, nil, now).stop(t); err == nil {
		t.Error("Serve whose shutdown flush failed returned nil")
	}
}

// lvnbd recover writes the cleared record without the registry's lock: a
// write hung on a failing disk stops no other export's handshake. And an
// export replaced while the record was being cleared (a reload, a rescan)
// gets the record back, applied to it if it is the same volume.
func TestRecoverWritesTheRecordUnlocked(t *testing.T) {
	for _, replaced := range []bool{false, true} {
		t.Run(fmt.Sprintf("replaced meanwhile %v", replaced), func(t *testing.T) {
			reg := failureRegistry(t, filepath.Join(t.TempDir(), "failures.json"))
			_, hb, img := addHooked(t, reg)
			other, _ := fileExport(t, "vm2", 1<<20, false)
			if err := reg.Add(other); err != nil {
				t.Fatal(err)
			}
			hb.fail(fmt.Errorf("fdatasync: %w", syscall.EIO))

			entered, release := make(chan struct{}), make(chan struct{})
			write := writeFailures
			var once sync.Once
			writeFailures = func(path string, list []Failure) error {
				once.Do(func() { close(entered); <-release })
				return write(path, list)
			}
			t.Cleanup(func() { writeFailures = write })
			recovered := make(chan error, 1)
			go func() { _, err := reg.Recover("vm1"); recovered <- err }()
			<-entered
			returnsWithoutWaiting(t, "a lookup of another export waited for lvnbd recover's record write",
				func() { reg.Lookup("vm2") })
			var again *Export
			if replaced {
				_, closed, err := reg.Remove("vm1")
				if err != nil {
					t.Fatal(err)
				}
				<-closed
				again = addAgain(t, reg, "vm1", img)
			}
			close(release)
			err := <-recovered
			if !replaced {
				if err != nil {
					t.Fatal(err)
				}
				if got := reg.Failures().List(); len(got) != 0 {
					t.Errorf("records after the recovery: %v", got)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), "changed while it was being recovered") {
				t.Errorf("recover of an export replaced meanwhile: %v", err)
			}
			if got := reg.Failures().List(); len(got) != 1 {
				t.Errorf("records after the refused recovery: %v, want the failure back", got)
			}
			if readErrno(again) == 0 {
				t.Error("the export that replaced the failed one during the recovery is served as healthy")
			}
		})
	}
}
