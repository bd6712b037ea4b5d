// Package snapshot is the lifecycle of volume snapshots on top of a
// volume.Driver, as the lvnbd snapshot commands use it: default names,
// VOLUME@NAME references, creation, listing with COW usage, merge and
// removal.
//
// Given the driver of a running server (control.OpenDriver), the server
// quiesces the volume around a snapshot and closes exports around a merge or
// removal; given a driver directly, nothing serves the volumes to consider.
package snapshot

import (
	"context"
	"time"

	"github.com/lvnbd/lvnbd/volume"
)

// Manager runs snapshot operations on a driver.
type Manager struct {
	Driver volume.Driver
	// Now is the clock for default names; nil is time.Now.
	Now func() time.Time
}

// DefaultName is the name of a snapshot taken at t when none is given: the
// UTC time to the second, such as 20261122T031500Z, so names sort by age.
func DefaultName(t time.Time) string { return t.UTC().Format("20060102T150405Z") }

// ParseRef parses VOLUME@NAME or, when the name is optional, VOLUME alone,
// for which the name returned is "".
func ParseRef(ref string, nameOptional bool) (vol, name string, err error) {
	if nameOptional {
		if err := volume.ValidateName(ref); err == nil {
			return ref, "", nil
		}
	}
	return volume.ParseSnapshotRef(ref)
}

// Create snapshots a volume. ref is VOLUME@NAME, or VOLUME for a name from
// DefaultName; cowSize is for drivers with COW space (0: the driver's
// default).
func (m *Manager) Create(ctx context.Context, ref string, cowSize int64) (volume.Snapshot, error) {
	vol, name, err := ParseRef(ref, true)
	if err != nil {
		return volume.Snapshot{}, err
	}
	if name == "" {
		now := time.Now
		if m.Now != nil {
			now = m.Now
		}
		name = DefaultName(now())
	}
	return m.Driver.Snapshot(ctx, volume.SnapshotOptions{Volume: vol, Name: name, COWSize: cowSize})
}

// List returns the snapshots of one volume, or of every volume if vol is "".
func (m *Manager) List(ctx context.Context, vol string) ([]volume.Snapshot, error) {
	if vol == "" {
		return m.Driver.Snapshots(ctx)
	}
	v, err := m.Driver.Get(ctx, vol)
	if err != nil {
		return nil, err
	}
	return v.Snapshots, nil
}

// Remove deletes the snapshot VOLUME@NAME.
func (m *Manager) Remove(ctx context.Context, ref string) error {
	vol, name, err := ParseRef(ref, false)
	if err != nil {
		return err
	}
	return m.Driver.RemoveSnapshot(ctx, vol, name)
}

// Merge reverts VOLUME to the snapshot VOLUME@NAME and removes the
// snapshot.
func (m *Manager) Merge(ctx context.Context, ref string) error {
	vol, name, err := ParseRef(ref, false)
	if err != nil {
		return err
	}
	return m.Driver.MergeSnapshot(ctx, vol, name)
}
