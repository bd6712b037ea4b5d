// Package boxcrash notices that a storage box went down (power loss, panic,
// reset) while lvnbd serve ran on it, so that the volumes it served stop
// passing for what they were.
//
// The server acknowledges writes once they are in the page cache (a FLUSH or
// FUA write is what makes them durable), so such a crash loses the writes it
// acknowledged since the last flush. A dom0 would reconnect the volumes under
// the same ID, and the guest's md could not tell: it either never saw an
// error, or it re-adds the half from its bitmap, whose bits it clears a few
// seconds after a write completes, not after it is flushed. The mirror's
// halves would differ without anyone knowing.
//
// So each lvnbd serve records in a file (under /var/lib) that it runs, with
// the kernel's boot ID, and takes that record out again when it stops
// cleanly, after its final flushes. A record left from an earlier boot means
// the box went down under a running server: the next start draws a new
// epoch, which the server adds to every volume's ID (nbd.WithEpoch). Dom0s
// then refuse those halves as they refuse a volume made anew, and they must
// be added to their mirrors in full.
//
// A server that died while the box stayed up loses nothing (the page cache
// outlives it) and changes nothing here. Several servers may share the file:
// each has its own record, and the file is locked while it changes.
package boxcrash

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/atomicfile"
	"github.com/lvnbd/lvnbd/volume"
)

// bootIDPath is where the kernel says which boot this is: a random UUID
// drawn at every boot. Tests replace it.
var bootIDPath = "/proc/sys/kernel/random/boot_id"

// State is what the file holds.
type State struct {
	// Epoch is drawn at the first start after each crash (see Crash) and
	// kept until the next: "" until the box's first crash under a server.
	Epoch string `json:"epoch,omitempty"`
	// Crashes are the crashes noticed, oldest first; at most maxCrashes.
	Crashes []Crash `json:"crashes,omitempty"`
	// Running are the servers that started in some boot and have not
	// stopped cleanly.
	Running []Run `json:"running,omitempty"`
}

// Crash is one crash noticed.
type Crash struct {
	// Epoch is the epoch the crash drew.
	Epoch string `json:"epoch"`
	// BootID is the boot that went down; Noticed when a server started
	// after it.
	BootID  string    `json:"boot_id,omitempty"`
	Noticed time.Time `json:"noticed"`
	// Reason is why an epoch was drawn without a crash (Tracker.Renew).
	Reason string `json:"reason,omitempty"`
}

// Run is one lvnbd serve that runs, or ran until a crash.
type Run struct {
	// ID tells this run from any other, also of the same process.
	ID  string `json:"id"`
	PID int    `json:"pid"`
	// PIDStart is when the process started, in clock ticks after boot
	// (/proc/PID/stat): with PID, it tells the server from a later
	// process given its pid. 0 if unknown.
	PIDStart uint64 `json:"pid_start,omitempty"`
	// PIDNamespace is the pid namespace PID is in (/proc/self/ns/pid):
	// a server in another cannot be looked up, and is taken to run.
	PIDNamespace string    `json:"pid_namespace,omitempty"`
	BootID       string    `json:"boot_id"`
	Started      time.Time `json:"started"`
}

// maxCrashes bounds the crashes the file keeps: the latest tell enough.
const maxCrashes = 16

// Tracker is one server's record in the file, from Start to Stop.
type Tracker struct {
	path    string
	run     Run
	crashed *Crash
	mu      sync.Mutex
	epoch   string
	known   []string // every epoch the file records
	stopped bool
}

// Start records in the file at path that this server runs, and draws a new
// epoch if a server ran there when the box last went down. It fails if that
// cannot be made durable: a crash would then go unnoticed. An empty path
// tracks nothing, and the epoch is "".
func Start(path string) (*Tracker, error) {
	t := &Tracker{path: path}
	if path == "" {
		return t, nil
	}
	boot, err := bootID()
	if err != nil {
		return nil, err
	}
	id := make([]byte, 8)
	if _, err := rand.Read(id); err != nil {
		return nil, fmt.Errorf("crash file: %w", err)
	}
	self := os.Getpid()
	t.run = Run{ID: hex.EncodeToString(id), PID: self, PIDStart: pidStart(self), PIDNamespace: pidNamespace(),
		BootID: boot, Started: time.Now().UTC()}
	err = update(path, func(s *State) error {
		var gone []Run
		s.Running, gone = split(s.Running, boot)
		if len(gone) > 0 {
			c := Crash{Epoch: epochOf(boot), BootID: gone[0].BootID, Noticed: t.run.Started}
			s.Epoch = c.Epoch
			s.Crashes = appendCrash(s.Crashes, c)
			t.crashed = &c
		}
		s.Running = append(s.Running, t.run)
		t.epoch = s.Epoch
		t.known = knownEpochs(s)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("crash file %s: %w; lvnbd serve does not start without it, as a crash of this "+
			"box would go unnoticed and the dom0s would take its volumes back as they are", path, err)
	}
	return t, nil
}

// split keeps the runs of servers still running in this boot, and returns
// apart those of earlier boots, which the box went down under. A run of
// this boot whose process is gone died without a crash of the box, and the
// page cache outlived it: it is dropped once what it wrote is written back
// (sync(2)), as no later stop of another server would write back its
// exports: from then on, a crash loses none of its writes.
func split(runs []Run, boot string) (running, gone []Run) {
	synced := false
	for _, r := range runs {
		switch {
		case r.BootID != boot:
			gone = append(gone, r)
		case alive(r):
			running = append(running, r)
		case !synced:
			unix.Sync()
			synced = true
		}
	}
	return running, gone
}

// alive reports whether r's process may still run: a process has its pid
// and start time, or r is of another pid namespace, where its pid cannot
// be looked up. A run taken for alive wrongly stays in the file, and makes
// the next boot count a crash: only a resync that was not needed.
func alive(r Run) bool {
	if r.PID <= 0 {
		return false
	}
	if ns := pidNamespace(); r.PIDNamespace != "" && ns != "" && r.PIDNamespace != ns {
		return true
	}
	err := unix.Kill(r.PID, 0)
	if err != nil && !errors.Is(err, unix.EPERM) {
		return false
	}
	start := pidStart(r.PID)
	return r.PIDStart == 0 || start == 0 || start == r.PIDStart
}

// procRoot is where /proc is; tests replace it.
var procRoot = "/proc"

// pidStart returns when process pid started, in clock ticks after boot
// (field 22 of /proc/PID/stat), 0 if it cannot tell.
func pidStart(pid int) uint64 {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0
	}
	// The command name, field 2, is in parentheses and may hold anything:
	// the fields are counted after its closing one.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	fields := strings.Fields(string(b[i+1:]))
	const startField = 22 - 3 // fields 3 onwards
	if len(fields) <= startField {
		return 0
	}
	n, err := strconv.ParseUint(fields[startField], 10, 64)
	if err != nil {
		return 0
	}
	return n
}

// pidNamespace names the pid namespace of this process, "" if it cannot
// tell.
func pidNamespace() string {
	ns, err := os.Readlink(filepath.Join(procRoot, "self", "ns", "pid"))
	if err != nil {
		return ""
	}
	return ns
}

// epochOf makes an epoch of a boot ID: its first 8 hex digits, as random
// as the boot ID is, so that no two crashes draw the same one, even after
// the file was removed.
func epochOf(boot string) string {
	return strings.ReplaceAll(boot, "-", "")[:epochLen]
}

// knownEpochs are the epochs s records.
func knownEpochs(s *State) []string {
	var known []string
	if s.Epoch != "" {
		known = append(known, s.Epoch)
	}
	for _, c := range s.Crashes {
		known = append(known, c.Epoch)
	}
	return known
}

// Epoch is the box's epoch: "" until its first crash under a server.
func (t *Tracker) Epoch() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.epoch
}

// Known reports whether the file records epoch as the box's, or as one
// drawn before: the volumes kept it from then.
func (t *Tracker) Known(epoch string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return epoch != "" && slices.Contains(t.known, epoch)
}

// Renew draws a new epoch at random, not from a crash, and records it with
// why: for volumes whose epoch the file does not know, where neither can
// tell which is newer. An empty path records nothing.
func (t *Tracker) Renew(why string) (string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	b := make([]byte, epochLen/2)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("drawing an epoch: %w", err)
	}
	c := Crash{Epoch: hex.EncodeToString(b), Noticed: time.Now().UTC(), Reason: why}
	if t.path != "" {
		err := update(t.path, func(s *State) error {
			s.Epoch = c.Epoch
			s.Crashes = appendCrash(s.Crashes, c)
			t.known = knownEpochs(s)
			return nil
		})
		if err != nil {
			return "", fmt.Errorf("crash file %s: recording a new epoch: %w", t.path, err)
		}
	}
	t.epoch = c.Epoch
	return c.Epoch, nil
}

// appendCrash appends c to crashes, keeping the latest maxCrashes.
func appendCrash(crashes []Crash, c Crash) []Crash {
	crashes = append(crashes, c)
	if n := len(crashes); n > maxCrashes {
		crashes = slices.Clone(crashes[n-maxCrashes:])
	}
	return crashes
}

// Crashed returns the crash this start noticed, nil if none.
func (t *Tracker) Crashed() *Crash { return t.crashed }

// Stop takes this server's record out of the file: call it once every
// export was flushed and closed. Until then, or if this fails, a crash of
// the box is noticed at the next start.
func (t *Tracker) Stop() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.path == "" || t.stopped {
		return nil
	}
	err := update(t.path, func(s *State) error {
		s.Running = slices.DeleteFunc(s.Running, func(r Run) bool { return r.ID == t.run.ID })
		// Servers of this boot that died are dropped as at a start;
		// those of another boot (none, unless the file was copied) are
		// a crash still to be noticed.
		running, gone := split(s.Running, t.run.BootID)
		s.Running = append(running, gone...)
		return nil
	})
	if err != nil {
		return fmt.Errorf("crash file %s: recording a clean stop: %w", t.path, err)
	}
	t.stopped = true
	return nil
}

// Load reads the state at path, for a look: a missing file is an empty one.
func Load(path string) (State, error) {
	var s State
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return s, err
	}
	return s, Parse(b, &s)
}

// Parse decodes a crash file, refusing what this lvnbd did not write: a
// damaged file must stop the server rather than hide a crash.
func Parse(b []byte, s *State) error {
	if err := json.Unmarshal(b, s); err != nil {
		return fmt.Errorf("corrupt (%w)", err)
	}
	if s.Epoch != "" && !validEpoch(s.Epoch) {
		return fmt.Errorf("corrupt: epoch %q is not 8 hex digits", s.Epoch)
	}
	for _, c := range s.Crashes {
		if !validEpoch(c.Epoch) {
			return fmt.Errorf("corrupt: a crash's epoch %q is not 8 hex digits", c.Epoch)
		}
	}
	for _, r := range s.Running {
		if r.ID == "" || r.BootID == "" {
			return fmt.Errorf("corrupt: a running server without an ID or boot ID")
		}
	}
	return nil
}

// epochLen is the length of an epoch: 8 hex digits.
const epochLen = 8

func validEpoch(e string) bool { return volume.ValidEpoch(e) }

// update changes the file under its lock: reads it, lets f change it, and
// replaces it durably.
func update(path string, f func(*State) error) error {
	if err := atomicfile.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	lock, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	for {
		err = unix.Flock(int(lock.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("locking %s: %w", lock.Name(), err)
	}
	s, err := Load(path)
	if err != nil {
		return fmt.Errorf("%w: it tells whether the box went down under a running server; remove it only if "+
			"it did not (every server stopped cleanly before the box last shut down), or else replace every "+
			"half this box serves in full", err)
	}
	if err := f(&s); err != nil {
		return err
	}
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, append(b, '\n'), 0o600)
}

// bootID reads the kernel's boot ID.
func bootID() (string, error) {
	b, err := os.ReadFile(bootIDPath)
	if err != nil {
		return "", fmt.Errorf("reading the boot ID: %w", err)
	}
	id := strings.TrimSpace(string(b))
	if len(strings.ReplaceAll(id, "-", "")) < 8 || !validEpoch(epochOf(id)) {
		return "", fmt.Errorf("boot ID %q in %s is not a UUID", id, bootIDPath)
	}
	return id, nil
}
