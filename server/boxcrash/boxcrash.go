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
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/atomicfile"
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
	BootID  string    `json:"boot_id"`
	Noticed time.Time `json:"noticed"`
}

// Run is one lvnbd serve that runs, or ran until a crash.
type Run struct {
	// ID tells this run from any other, also of the same process.
	ID      string    `json:"id"`
	PID     int       `json:"pid"`
	BootID  string    `json:"boot_id"`
	Started time.Time `json:"started"`
}

// maxCrashes bounds the crashes the file keeps: the latest tell enough.
const maxCrashes = 16

// Tracker is one server's record in the file, from Start to Stop.
type Tracker struct {
	path    string
	run     Run
	epoch   string
	crashed *Crash
	mu      sync.Mutex
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
	t.run = Run{ID: hex.EncodeToString(id), PID: os.Getpid(), BootID: boot, Started: time.Now().UTC()}
	err = update(path, func(s *State) error {
		var gone []Run
		s.Running, gone = split(s.Running, boot)
		if len(gone) > 0 {
			c := Crash{Epoch: epochOf(boot), BootID: gone[0].BootID, Noticed: t.run.Started}
			s.Epoch = c.Epoch
			s.Crashes = append(s.Crashes, c)
			if n := len(s.Crashes); n > maxCrashes {
				s.Crashes = slices.Clone(s.Crashes[n-maxCrashes:])
			}
			t.crashed = &c
		}
		s.Running = append(s.Running, t.run)
		t.epoch = s.Epoch
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("crash file %s: %w: without it a crash of this box would go unnoticed and "+
			"the dom0s would take its volumes back as they are; fix it, or set crash_file empty (--crash-file=) "+
			"to serve without noticing crashes", path, err)
	}
	return t, nil
}

// split keeps the runs of servers still running in this boot, and returns
// apart those of earlier boots, which the box went down under. A run of
// this boot whose process is gone died without a crash of the box, and is
// dropped: the page cache outlived it.
func split(runs []Run, boot string) (running, gone []Run) {
	for _, r := range runs {
		switch {
		case r.BootID != boot:
			gone = append(gone, r)
		case alive(r.PID):
			running = append(running, r)
		}
	}
	return running, gone
}

// alive reports whether a process pid exists. A pid reused by another
// process keeps a dead server's run: at worst a later crash is counted
// once more, which only asks for a resync that was not needed.
func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := unix.Kill(pid, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}

// epochOf makes an epoch of a boot ID: its first 8 hex digits, as random
// as the boot ID is, so that no two crashes draw the same one, even after
// the file was removed.
func epochOf(boot string) string {
	return strings.ReplaceAll(boot, "-", "")[:8]
}

// Epoch is the box's epoch: "" until its first crash under a server.
func (t *Tracker) Epoch() string { return t.epoch }

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
	for _, r := range s.Running {
		if r.ID == "" || r.BootID == "" {
			return fmt.Errorf("corrupt: a running server without an ID or boot ID")
		}
	}
	return nil
}

func validEpoch(e string) bool {
	if len(e) != 8 {
		return false
	}
	_, err := hex.DecodeString(e)
	return err == nil && strings.ToLower(e) == e
}

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
		return fmt.Errorf("%w: remove it only once this box's volumes were all replaced in their "+
			"mirrors, or the box is known not to have crashed since", err)
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
