package pair

import (
	"os"
	"path/filepath"
	"testing"
)

func TestLinks(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "lvnbd")
	a, b := LinkPath(dir, "vm1", "a"), LinkPath(dir, "vm1", "b")
	check := func(path, want string) {
		t.Helper()
		got, err := os.Readlink(path)
		if err != nil || got != want {
			t.Errorf("%s -> %q (%v), want %q", path, got, err, want)
		}
	}
	for _, step := range []struct{ path, target string }{
		{a, "/dev/nbd0"}, {b, "/dev/nbd1"}, {a, "/dev/nbd0"}, {a, "/dev/nbd5"},
	} {
		if err := setLink(step.path, step.target); err != nil {
			t.Fatal(err)
		}
		check(step.path, step.target)
	}
	check(b, "/dev/nbd1")
	// No temporary names are left behind.
	entries, _ := os.ReadDir(filepath.Dir(a))
	if len(entries) != 2 {
		t.Errorf("%d entries in %s, want a and b", len(entries), filepath.Dir(a))
	}

	// A regular file in the way is replaced too: the name is ours.
	os.Remove(b)
	os.WriteFile(b, nil, 0o644)
	if err := setLink(b, "/dev/nbd1"); err != nil {
		t.Fatal(err)
	}
	check(b, "/dev/nbd1")

	if err := removeLink(a); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Dir(a)); err != nil {
		t.Errorf("the pair's directory went with b still in it: %v", err)
	}
	if err := removeLink(b); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Dir(a)); !os.IsNotExist(err) {
		t.Errorf("the empty pair directory stays: %v", err)
	}
	if err := removeLink(b); err != nil {
		t.Errorf("removing a missing link: %v", err)
	}
}
