package file

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/atomicfile"
	"github.com/lvnbd/lvnbd/internal/flock"
	"github.com/lvnbd/lvnbd/volume"
)

const (
	metadataName    = "lvnbd.json"
	metadataVersion = 1
	lockName        = "lvnbd.lock"
)

// metadata is lvnbd.json: which volumes and snapshots exist, and what their
// files cannot record. It, not the directory listing, says what exists.
type metadata struct {
	Version int                    `json:"version"`
	Volumes map[string]*volumeMeta `json:"volumes"`
	// Epoch and Runs are the volume.RunState: the servers that serve the
	// volumes, and the box's crash epoch.
	Epoch string       `json:"epoch,omitempty"`
	Runs  []volume.Run `json:"runs,omitempty"`
}

type volumeMeta struct {
	Created time.Time `json:"created"`
	// Rollbacks counts the times the volume was rolled back, by a snapshot
	// merged into it: each gives it another ID (volume.RolledBackID).
	Rollbacks int `json:"rollbacks,omitempty"`
	// Stripes and StripeSize are as asked for at creation, 0 if linear.
	Stripes    int                      `json:"stripes,omitempty"`
	StripeSize int64                    `json:"stripe_size,omitempty"`
	Snapshots  map[string]*snapshotMeta `json:"snapshots,omitempty"`
}

type snapshotMeta struct {
	Created time.Time `json:"created"`
	// Reflink records whether the snapshot shares extents with the volume
	// or is a copy.
	Reflink bool `json:"reflink"`
	// Merging is set, and committed, before a merge renames the snapshot
	// over the volume, so that a merge a crash interrupts is finished.
	Merging bool `json:"merging,omitempty"`
}

type namedSnapshot struct {
	name string
	meta *snapshotMeta
}

// sortedSnapshots returns the snapshots oldest first.
func (vm *volumeMeta) sortedSnapshots() []namedSnapshot {
	out := make([]namedSnapshot, 0, len(vm.Snapshots))
	for name, sm := range vm.Snapshots {
		out = append(out, namedSnapshot{name, sm})
	}
	slices.SortFunc(out, func(a, b namedSnapshot) int {
		if c := a.meta.Created.Compare(b.meta.Created); c != 0 {
			return c
		}
		return strings.Compare(a.name, b.name)
	})
	return out
}

// loadMetadata reads lvnbd.json; a directory without one has no volumes.
func (d *Driver) loadMetadata() (*metadata, error) {
	path := filepath.Join(d.dir, metadataName)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return &metadata{Version: metadataVersion, Volumes: map[string]*volumeMeta{}}, nil
	}
	if err != nil {
		return nil, err
	}
	var m metadata
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if m.Version != metadataVersion {
		return nil, fmt.Errorf("%s: version %d, this lvnbd reads version %d (written by a newer lvnbd?)", path, m.Version, metadataVersion)
	}
	if m.Volumes == nil {
		m.Volumes = map[string]*volumeMeta{}
	}
	return &m, nil
}

// commit replaces lvnbd.json atomically: a crash leaves the old or the new
// one, never a mix.
func (d *Driver) commit(m *metadata) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	return writeFile(filepath.Join(d.dir, metadataName), b, 0o600)
}

// writeFile replaces the metadata file; tests replace it. An error that is
// atomicfile.ErrNotDurable means the new metadata is in place all the same.
var writeFile = atomicfile.Write

// read runs fn on the metadata under a shared lock. A directory that does
// not exist yet has no volumes, and is not made.
//
// A merge a crash interrupted is finished first, as change does: a merge
// holds the lock exclusively from start to end, so one seen here is not
// running. Otherwise a server would export the volume's pre-merge file,
// which the next change renames the snapshot over, taking every write
// made through the export since with it.
func (d *Driver) read(ctx context.Context, fn func(*metadata) error) error {
	if _, err := os.Stat(d.dir); errors.Is(err, fs.ErrNotExist) {
		return fn(&metadata{Version: metadataVersion, Volumes: map[string]*volumeMeta{}})
	}
	unlock, err := d.lock(ctx, unix.LOCK_SH)
	if err != nil {
		return err
	}
	m, err := d.loadMetadata()
	if err == nil && m.mergeInterrupted() {
		unlock()
		return d.change(ctx, fn)
	}
	defer unlock()
	if err != nil {
		return err
	}
	return fn(m)
}

// mergeInterrupted reports whether a merge is recorded as under way.
func (m *metadata) mergeInterrupted() bool {
	for _, vm := range m.Volumes {
		for _, sm := range vm.Snapshots {
			if sm.Merging {
				return true
			}
		}
	}
	return false
}

// change runs fn on the metadata under an exclusive lock, after finishing
// any merge a crash interrupted. fn commits what it changes.
func (d *Driver) change(ctx context.Context, fn func(*metadata) error) error {
	// Synced, the directory made: lvnbd.json and the volumes in it must
	// not vanish with its entry in a crash.
	if err := atomicfile.MkdirAll(d.dir, dirMode); err != nil {
		return fmt.Errorf("volume directory: %w", err)
	}
	unlock, err := d.lock(ctx, unix.LOCK_EX)
	if err != nil {
		return err
	}
	defer unlock()
	m, err := d.loadMetadata()
	if err != nil {
		return err
	}
	if err := d.finishMerges(m); err != nil {
		return err
	}
	return fn(m)
}

// lock takes a flock on the directory's lock file (flock.Lock).
func (d *Driver) lock(ctx context.Context, how int) (unlock func(), err error) {
	return flock.Lock(ctx, filepath.Join(d.dir, lockName), how)
}
