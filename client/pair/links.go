package pair

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// setLink makes path a symlink to target, replacing whatever link is there
// in one rename, so that a reader never finds the name missing or half
// made.
func setLink(path, target string) error {
	if cur, err := os.Readlink(path); err == nil && cur == target {
		return nil
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	tmp := filepath.Join(dir, "."+filepath.Base(path)+".tmp")
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := os.Symlink(target, tmp); err != nil {
		return fmt.Errorf("linking %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("linking %s: %w", path, err)
	}
	return nil
}

// removeLink removes the symlink at path, and its directory once empty.
func removeLink(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	// Fails, as it should, while the other leg's link is still there.
	_ = os.Remove(filepath.Dir(path))
	return nil
}

// RemovePairLinks removes the links of both legs of pair under dir, for a
// pair no longer configured: its devices stay attached, and lvnbd detach
// refuses a device a pair's link points at.
func RemovePairLinks(dir, pair string) error {
	var errs []error
	for _, leg := range []string{"a", "b"} {
		errs = append(errs, removeLink(LinkPath(dir, pair, leg)))
	}
	return errors.Join(errs...)
}
