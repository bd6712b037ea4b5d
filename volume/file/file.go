// Package file is the volume driver for a directory of sparse files: NAME.img
// per volume, NAME@SNAPSHOT.img (read-only) per snapshot, and lvnbd.json for
// what a file cannot say itself. It is the default driver (file://./lvnbd-data)
// and the one for development; production storage boxes use volume/lvm.
//
// Every change is crash-safe: data files are made under a temporary name and
// renamed into place, lvnbd.json is replaced atomically, and a merge
// interrupted by a crash is finished by the next change or listing. Changes take an
// exclusive flock on the directory, so lvnbd serve and the lvnbd commands can
// share it.
package file

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/atomicfile"
	"github.com/lvnbd/lvnbd/volume"
)

func init() {
	volume.Register("file", openURL)
}

// blockSize is the unit volume sizes are rounded up to: a page, and the
// block of the filesystems reflinks work on.
const blockSize = 4096

const (
	// Volume files hold guests' data: only the server's user may read
	// them, whatever the directory's mode becomes later.
	volumeMode   = 0o600
	snapshotMode = 0o400 // snapshots are exported read-only and never change
	dirMode      = 0o700
)

// Driver keeps volumes as sparse files in one directory.
type Driver struct {
	dir string
	now func() time.Time
}

var _ volume.Driver = (*Driver)(nil)

// New returns the driver for dir, which is made on the first change if it
// does not exist. A relative dir is made absolute now.
func New(dir string) (*Driver, error) {
	if dir == "" {
		return nil, errors.New("file volumes: empty directory")
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("file volumes: %w", err)
	}
	return &Driver{dir: abs, now: time.Now}, nil
}

// openURL accepts file:///ABSOLUTE/DIR and file://./RELATIVE/DIR.
func openURL(u *url.URL) (volume.Driver, error) {
	if u.RawQuery != "" || u.Fragment != "" || u.User != nil || u.Opaque != "" {
		return nil, errors.New("want file:///ABSOLUTE/DIR or file://./RELATIVE/DIR, with no query or fragment")
	}
	var dir string
	switch u.Host {
	case "", "localhost":
		dir = u.Path
	case ".", "..":
		dir = u.Host + u.Path
	default:
		return nil, fmt.Errorf("file URLs take no host (%q): use file:///ABSOLUTE/DIR, or file://./%s%s for a directory relative to the current one",
			u.Host, u.Host, u.Path)
	}
	if dir == "" {
		return nil, errors.New("no directory: want file:///ABSOLUTE/DIR or file://./RELATIVE/DIR")
	}
	return New(dir)
}

// Dir is the directory the volumes are in.
func (d *Driver) Dir() string { return d.dir }

// String is the driver's URL.
func (d *Driver) String() string { return "file://" + d.dir }

// Path is NAME.img or VOLUME@SNAPSHOT.img in the directory; "" for a name
// that is neither.
func (d *Driver) Path(exportName string) string {
	if !volume.ValidExportName(exportName) {
		return ""
	}
	return d.path(exportName)
}

// path is Path for a name already validated.
func (d *Driver) path(exportName string) string {
	return filepath.Join(d.dir, exportName+".img")
}

func (d *Driver) snapshotPath(vol, snap string) string {
	return d.path(volume.SnapshotRef(vol, snap))
}

// List returns every volume with its snapshots.
func (d *Driver) List(ctx context.Context) ([]volume.Volume, error) {
	var vols []volume.Volume
	err := d.read(ctx, func(m *metadata) error {
		for _, name := range sortedKeys(m.Volumes) {
			vols = append(vols, d.describe(name, m.Volumes[name]))
		}
		return nil
	})
	return vols, err
}

// Get returns one volume with its snapshots.
func (d *Driver) Get(ctx context.Context, name string) (volume.Volume, error) {
	if err := volume.ValidateName(name); err != nil {
		return volume.Volume{}, err
	}
	var v volume.Volume
	err := d.read(ctx, func(m *metadata) error {
		vm, err := d.volumeMeta(m, name)
		if err != nil {
			return err
		}
		v = d.describe(name, vm)
		return v.Err()
	})
	return v, err
}

// describe combines a volume's metadata with its file. A file that cannot
// be looked at (gone, or unreadable) is the volume's Problem, so that List
// goes on to the others.
func (d *Driver) describe(name string, vm *volumeMeta) volume.Volume {
	v := volume.Volume{
		Name:       name,
		Stripes:    max(vm.Stripes, 1),
		StripeSize: vm.StripeSize,
		Path:       d.path(name),
		ID:         volume.RolledBackID(createdID(vm.Created), vm.Rollbacks),
		Snapshots:  []volume.Snapshot{},
	}
	if st, err := os.Stat(v.Path); err != nil {
		v.Problem = fileProblem(err, "volume", name)
	} else {
		v.Size = st.Size()
	}
	for _, sn := range vm.sortedSnapshots() {
		if s, ok := d.describeSnapshot(name, sn.name, sn.meta); ok {
			v.Snapshots = append(v.Snapshots, s)
		}
	}
	return v
}

// fileProblem says why the file of a volume or snapshot (what) named name
// cannot be looked at, and what to do.
func fileProblem(err error, what, name string) string {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Sprintf("its file is gone (%v); lvnbd %s remove %s forgets it", err, what, name)
	}
	return fmt.Sprintf("its file cannot be looked at: %v", err)
}

// createdID is the ID of a volume or snapshot made at t: a file made anew
// under the same name is made later. Empty for one whose time is unknown.
func createdID(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return strconv.FormatInt(t.UnixNano(), 16)
}

// Create makes a sparse file of opts.Size rounded up to 4 KiB. Stripes are
// recorded, so that development mirrors production, but a file has none.
func (d *Driver) Create(ctx context.Context, opts volume.CreateOptions) (volume.Volume, error) {
	opts, err := volume.CheckCreate(opts)
	if err != nil {
		return volume.Volume{}, err
	}
	size := volume.RoundUp(opts.Size, blockSize)
	var v volume.Volume
	err = d.change(ctx, func(m *metadata) error {
		if _, ok := m.Volumes[opts.Name]; ok {
			return fmt.Errorf("volume %s %w in %s", opts.Name, volume.ErrExists, d)
		}
		path := d.path(opts.Name)
		err := d.makeFile(path, volumeMode, func(f *os.File) error { return f.Truncate(size) })
		if err != nil {
			return fmt.Errorf("creating volume %s: %w", opts.Name, err)
		}
		vm := &volumeMeta{Created: d.now().UTC()}
		if opts.Stripes > 1 {
			vm.Stripes, vm.StripeSize = opts.Stripes, opts.StripeSize
		}
		m.Volumes[opts.Name] = vm
		if err := d.commit(m); err != nil {
			// Not recorded, so not a volume: do not leave the file
			// behind. Recorded but not durable, it is one: keep it.
			if !errors.Is(err, atomicfile.ErrNotDurable) {
				os.Remove(path)
			}
			return err
		}
		v = d.describe(opts.Name, vm)
		return v.Err()
	})
	return v, err
}

// Resize truncates the file to size rounded up to 4 KiB. Growing is sparse:
// it takes no space until written.
func (d *Driver) Resize(ctx context.Context, name string, size int64, allowShrink bool) (volume.Volume, error) {
	if err := volume.ValidateName(name); err != nil {
		return volume.Volume{}, err
	}
	if size <= 0 {
		return volume.Volume{}, fmt.Errorf("resizing volume %s: %w: size must be more than zero", name, volume.ErrInvalidSize)
	}
	size = volume.RoundUp(size, blockSize)
	var v volume.Volume
	err := d.change(ctx, func(m *metadata) error {
		vm, err := d.volumeMeta(m, name)
		if err != nil {
			return err
		}
		f, err := os.OpenFile(d.path(name), os.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("resizing volume %s: %w", name, err)
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return fmt.Errorf("resizing volume %s: %w", name, err)
		}
		if size < st.Size() && !allowShrink {
			return &volume.ShrinkError{Volume: name, From: st.Size(), To: size}
		}
		if size < st.Size() {
			// The tail is lost: grown back, the volume would not be what
			// a dom0 last saw under its ID. Counted, and committed,
			// before the truncate: a shrink that then fails only changes
			// the ID for nothing.
			vm.Rollbacks++
			if err := d.commit(m); err != nil && !errors.Is(err, atomicfile.ErrNotDurable) {
				return fmt.Errorf("resizing volume %s: %w", name, err)
			}
		}
		if size != st.Size() {
			if err := f.Truncate(size); err != nil {
				return fmt.Errorf("resizing volume %s: %w", name, err)
			}
			// syncfs, not fsync: an fsync of a fresh descriptor reports
			// a write-back error of a dead server's data once, and marks
			// it seen, so the next server's first flush would succeed
			// and serve the lost writes as healthy. syncfs writes the
			// file back and reports the file system's errors, leaving
			// the file's to the server (see SyncAll).
			if err := unix.Syncfs(int(f.Fd())); err != nil {
				return fmt.Errorf("resizing volume %s: making the new size durable (syncfs %s): %w; check the disk and "+
					"the kernel log", name, d.dir, err)
			}
		}
		v = d.describe(name, vm)
		return v.Err()
	})
	return v, err
}

// CountRollback counts a rollback of a volume whose file was truncated
// behind lvnbd's back (volume.RollbackCounter), if its ID is still id.
func (d *Driver) CountRollback(ctx context.Context, name, id string) (counted bool, err error) {
	if err := volume.ValidateName(name); err != nil {
		return false, err
	}
	err = d.change(ctx, func(m *metadata) error {
		vm, err := d.volumeMeta(m, name)
		if err != nil {
			return err
		}
		if volume.RolledBackID(createdID(vm.Created), vm.Rollbacks) != id {
			return nil
		}
		counted = true
		vm.Rollbacks++
		if err := d.commit(m); err != nil && !errors.Is(err, atomicfile.ErrNotDurable) {
			return fmt.Errorf("counting the rollback of volume %s, which changes its ID: %w", name, err)
		}
		return nil
	})
	return counted, err
}

// Remove deletes a volume that has no snapshots.
func (d *Driver) Remove(ctx context.Context, name string) error {
	if err := volume.ValidateName(name); err != nil {
		return err
	}
	return d.change(ctx, func(m *metadata) error {
		vm, err := d.volumeMeta(m, name)
		if err != nil {
			return err
		}
		if len(vm.Snapshots) > 0 {
			refs := make([]string, 0, len(vm.Snapshots))
			for _, s := range vm.sortedSnapshots() {
				refs = append(refs, volume.SnapshotRef(name, s.name))
			}
			return fmt.Errorf("%s: %w (%s): remove or merge them first", name, volume.ErrHasSnapshots, strings.Join(refs, ", "))
		}
		// Forget the volume first: after a crash, a file nothing lists is
		// only space to reclaim, but a listed volume without a file breaks
		// List.
		delete(m.Volumes, name)
		if err := d.commit(m); err != nil {
			return err
		}
		if err := os.Remove(d.path(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("removing volume %s: %w", name, err)
		}
		return atomicfile.SyncDir(d.dir)
	})
}

// volumeMeta returns the metadata of a volume or ErrNotFound.
func (d *Driver) volumeMeta(m *metadata, name string) (*volumeMeta, error) {
	vm, ok := m.Volumes[name]
	if !ok {
		return nil, fmt.Errorf("volume %s %w in %s", name, volume.ErrNotFound, d)
	}
	return vm, nil
}

// makeFile makes path, crash-safely: fill writes a temporary file, which is
// synced and then renamed into place unless path exists. A file at path that
// lvnbd.json does not list is not overwritten: it may be an admin's.
func (d *Driver) makeFile(path string, mode os.FileMode, fill func(*os.File) error) error {
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("%s exists but is not listed in %s: move it away or remove it", path, metadataName)
	}
	tmp := filepath.Join(d.dir, "."+filepath.Base(path)+".tmp")
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	err = fill(f)
	if err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = renameNoReplace(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if err := atomicfile.SyncDir(d.dir); err != nil {
		// Not listed yet: a file left here would block the name.
		os.Remove(path)
		return err
	}
	return nil
}

// renameNoReplace renames old to new unless new exists.
func renameNoReplace(oldpath, newpath string) error {
	err := unix.Renameat2(unix.AT_FDCWD, oldpath, unix.AT_FDCWD, newpath, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		// The filesystem cannot; the directory lock keeps other lvnbd
		// processes out between the check and the rename.
		if _, err := os.Lstat(newpath); err == nil {
			return &os.LinkError{Op: "rename", Old: oldpath, New: newpath, Err: fs.ErrExist}
		}
		return os.Rename(oldpath, newpath)
	}
	if err != nil {
		return &os.LinkError{Op: "rename", Old: oldpath, New: newpath, Err: err}
	}
	return nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// UpdateRuns changes the servers and crash epoch recorded in lvnbd.json, in
// one commit under the directory's lock (volume.RunKeeper).
func (d *Driver) UpdateRuns(ctx context.Context, f func(*volume.RunState) (bool, error)) error {
	return d.change(ctx, func(m *metadata) error {
		st := volume.RunState{Epoch: m.Epoch, Runs: slices.Clone(m.Runs)}
		changed, err := f(&st)
		if err != nil || !changed {
			return err
		}
		m.Epoch, m.Runs = st.Epoch, st.Runs
		return d.commit(m)
	})
}

// SyncAll makes everything written to the volumes durable (volume.RunKeeper):
// sync(2) writes back every file and waits, and has each file system commit
// and flush its disk's cache. It leaves a write-back error for the next
// opener's fsync to see (see the lvm driver's SyncAll).
func (d *Driver) SyncAll(context.Context) error {
	unix.Sync()
	return nil
}
