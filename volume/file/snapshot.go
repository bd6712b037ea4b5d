package file

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/atomicfile"
	"github.com/lvnbd/lvnbd/volume"
)

// Snapshot makes VOLUME@NAME.img, read-only: a reflink (FICLONE) where the
// filesystem shares extents (btrfs, XFS), else a copy of the volume's data
// regions, which needs that much free space. opts.COWSize is ignored: a file
// snapshot needs no COW space.
//
// A reflink is atomic. A copy is not: writes to the volume while it runs may
// or may not be in the snapshot, so the server quiesces the volume around it.
func (d *Driver) Snapshot(ctx context.Context, opts volume.SnapshotOptions) (volume.Snapshot, error) {
	if err := volume.ValidateName(opts.Volume); err != nil {
		return volume.Snapshot{}, err
	}
	if err := volume.ValidateName(opts.Name); err != nil {
		return volume.Snapshot{}, fmt.Errorf("snapshot name: %w", err)
	}
	ref := volume.SnapshotRef(opts.Volume, opts.Name)
	var s volume.Snapshot
	err := d.change(ctx, func(m *metadata) error {
		vm, err := d.volumeMeta(m, opts.Volume)
		if err != nil {
			return err
		}
		if _, ok := vm.Snapshots[opts.Name]; ok {
			return fmt.Errorf("snapshot %s %w", ref, volume.ErrExists)
		}
		src, err := os.Open(d.path(opts.Volume))
		if err != nil {
			return fmt.Errorf("snapshot %s: %w", ref, err)
		}
		defer src.Close()
		sm := &snapshotMeta{Created: d.now().UTC()}
		path := d.snapshotPath(opts.Volume, opts.Name)
		err = d.makeFile(path, snapshotMode, func(dst *os.File) error {
			if unix.IoctlFileClone(int(dst.Fd()), int(src.Fd())) == nil {
				sm.Reflink = true
				return nil
			}
			if err := d.checkSpaceForCopy(opts.Volume, src); err != nil {
				return err
			}
			return copySparse(ctx, dst, src)
		})
		if err != nil {
			return fmt.Errorf("snapshot %s: %w", ref, err)
		}
		if vm.Snapshots == nil {
			vm.Snapshots = map[string]*snapshotMeta{}
		}
		vm.Snapshots[opts.Name] = sm
		if err := d.commit(m); err != nil {
			if !errors.Is(err, atomicfile.ErrNotDurable) {
				os.Remove(path) // not recorded: not a snapshot
			}
			return err
		}
		var ok bool
		if s, ok = d.describeSnapshot(opts.Volume, opts.Name, sm); !ok {
			return fmt.Errorf("snapshot %s: file vanished", ref)
		}
		return s.Err()
	})
	return s, err
}

// checkSpaceForCopy fails with ErrNoSpace, before copying anything, if the
// filesystem cannot hold a copy of the volume's data.
func (d *Driver) checkSpaceForCopy(name string, src *os.File) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(src.Fd()), &st); err != nil {
		return err
	}
	var fsst unix.Statfs_t
	if err := unix.Statfs(d.dir, &fsst); err != nil {
		return err
	}
	need := st.Blocks * 512
	free := int64(fsst.Bavail) * fsst.Bsize
	if need > free {
		return fmt.Errorf("%w: %s has %s free, %s needed to copy %s (this filesystem cannot reflink; btrfs or XFS can, in no time and no space)",
			volume.ErrNoSpace, d.dir, volume.FormatSize(free), volume.FormatSize(need), name)
	}
	return nil
}

// Snapshots returns every snapshot of every volume.
func (d *Driver) Snapshots(ctx context.Context) ([]volume.Snapshot, error) {
	var out []volume.Snapshot
	err := d.read(ctx, func(m *metadata) error {
		for _, name := range sortedKeys(m.Volumes) {
			for _, sn := range m.Volumes[name].sortedSnapshots() {
				if s, ok := d.describeSnapshot(name, sn.name, sn.meta); ok {
					out = append(out, s)
				}
			}
		}
		return nil
	})
	return out, err
}

// describeSnapshot combines a snapshot's metadata with its file. It reports
// false for a merge that has renamed the file but not yet been recorded. A
// file that cannot be looked at is the snapshot's Problem.
func (d *Driver) describeSnapshot(vol, name string, sm *snapshotMeta) (volume.Snapshot, bool) {
	s := volume.Snapshot{
		Volume:  vol,
		Name:    name,
		Merging: sm.Merging,
		Created: sm.Created,
		Path:    d.snapshotPath(vol, name),
		ID:      createdID(sm.Created),
	}
	st, err := os.Stat(s.Path)
	switch {
	case errors.Is(err, fs.ErrNotExist) && sm.Merging:
		return volume.Snapshot{}, false
	case err != nil:
		s.Problem = fileProblem(err, "snapshot", s.Ref())
	default:
		s.Size = st.Size()
	}
	return s, true
}

// snapshotMeta returns a snapshot's metadata or ErrNotFound.
func (d *Driver) snapshotMeta(m *metadata, vol, snap string) (*volumeMeta, *snapshotMeta, error) {
	vm, err := d.volumeMeta(m, vol)
	if err != nil {
		return nil, nil, err
	}
	sm, ok := vm.Snapshots[snap]
	if !ok {
		return nil, nil, fmt.Errorf("snapshot %s %w in %s", volume.SnapshotRef(vol, snap), volume.ErrNotFound, d)
	}
	return vm, sm, nil
}

// RemoveSnapshot deletes a snapshot's file.
func (d *Driver) RemoveSnapshot(ctx context.Context, vol, snap string) error {
	if _, _, err := volume.ParseSnapshotRef(volume.SnapshotRef(vol, snap)); err != nil {
		return err
	}
	return d.change(ctx, func(m *metadata) error {
		vm, _, err := d.snapshotMeta(m, vol, snap)
		if err != nil {
			return err
		}
		delete(vm.Snapshots, snap)
		if err := d.commit(m); err != nil {
			return err
		}
		if err := os.Remove(d.snapshotPath(vol, snap)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("removing snapshot %s: %w", volume.SnapshotRef(vol, snap), err)
		}
		return atomicfile.SyncDir(d.dir)
	})
}

// MergeSnapshot makes the snapshot the volume again, as lvconvert --merge
// does: the snapshot's file is renamed over the volume's, which is atomic,
// instant and keeps the snapshot's holes. The volume takes the snapshot's
// size. Whoever has the volume's file open keeps the old one, so the server
// closes the export first.
func (d *Driver) MergeSnapshot(ctx context.Context, vol, snap string) error {
	if _, _, err := volume.ParseSnapshotRef(volume.SnapshotRef(vol, snap)); err != nil {
		return err
	}
	return d.change(ctx, func(m *metadata) error {
		_, sm, err := d.snapshotMeta(m, vol, snap)
		if err != nil {
			return err
		}
		sm.Merging = true
		// Recorded but not durable, the merge is on record all the same,
		// and the next read would finish it: finish it now, and its
		// last commit makes the record durable.
		if err := d.commit(m); err != nil && !errors.Is(err, atomicfile.ErrNotDurable) {
			return err
		}
		return d.finishMerges(m)
	})
}

// finishMerges completes every merge recorded in m: renames the snapshot
// over its volume if that has not happened, then forgets the snapshot.
func (d *Driver) finishMerges(m *metadata) error {
	changed := false
	for _, name := range sortedKeys(m.Volumes) {
		vm := m.Volumes[name]
		for _, sn := range vm.sortedSnapshots() {
			if !sn.meta.Merging {
				continue
			}
			ref := volume.SnapshotRef(name, sn.name)
			path := d.snapshotPath(name, sn.name)
			switch err := os.Chmod(path, volumeMode); {
			case errors.Is(err, fs.ErrNotExist):
				// Renamed before a crash; only the record is left.
			case err != nil:
				return fmt.Errorf("merging %s: %w", ref, err)
			default:
				if err := os.Rename(path, d.path(name)); err != nil {
					return fmt.Errorf("merging %s: %w", ref, err)
				}
				if err := atomicfile.SyncDir(d.dir); err != nil {
					return fmt.Errorf("merging %s: %w", ref, err)
				}
			}
			// The volume is now older than its ID says: counted in the
			// commit that forgets the snapshot, so once for each merge,
			// also one a crash interrupted after the rename.
			delete(vm.Snapshots, sn.name)
			vm.Rollbacks++
			changed = true
		}
	}
	if !changed {
		return nil
	}
	return d.commit(m)
}
