// Package atomicfile replaces small files (metadata, the fence list) so that
// a crash or power loss leaves the old contents or the new, never a mix or
// nothing.
package atomicfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// ErrNotDurable means the file was replaced, but syncing its directory
// failed: readers see the new contents, and a crash may bring back the old.
// A caller that undoes what the file describes on failure must not for
// this one.
var ErrNotDurable = errors.New("replaced, but the rename may not survive a crash")

// Write replaces path with data, mode perm: it writes a temporary file in the
// same directory, syncs it, renames it over path and syncs the directory, so
// the rename itself is durable when Write returns. The directory must exist.
func Write(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // after a failure; gone after the rename
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(perm)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := SyncDir(dir); err != nil {
		return fmt.Errorf("writing %s: %w: %w", path, ErrNotDurable, err)
	}
	return nil
}

// SyncDir makes the entries of dir (a file created, renamed or removed in it)
// durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	return nil
}

// MkdirAll makes dir and any missing parents, as os.MkdirAll does, and syncs
// the parent of each directory it made: a file later written in dir with
// Write survives a crash only if the directories leading to it do too.
func MkdirAll(dir string, perm os.FileMode) error {
	dir = filepath.Clean(dir)
	if fi, err := os.Stat(dir); err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("%s: not a directory", dir)
		}
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	parent := filepath.Dir(dir)
	if parent != dir {
		if err := MkdirAll(parent, perm); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, perm); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return SyncDir(parent)
}
