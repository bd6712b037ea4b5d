package backend

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/looptest"
)

// TestSameFile checks what a server compares to notice that the file behind
// an export was replaced: the open inode against the one the path names now.
func TestSameFile(t *testing.T) {
	tests := []struct {
		name string
		// change does something to path, the file the backend opened,
		// and returns the path to ask about.
		change func(t *testing.T, path string) string
		want   bool
	}{
		{"unchanged", func(t *testing.T, path string) string { return path }, true},
		{"grown in place", func(t *testing.T, path string) string {
			must(t, os.Truncate(path, 1<<20))
			return path
		}, true},
		{"a symlink to it", func(t *testing.T, path string) string {
			link := filepath.Join(filepath.Dir(path), "link")
			must(t, os.Symlink(path, link))
			return link
		}, true},
		{"a hard link to it", func(t *testing.T, path string) string {
			link := filepath.Join(filepath.Dir(path), "hard")
			must(t, os.Link(path, link))
			return link
		}, true},
		{"removed and made again", func(t *testing.T, path string) string {
			must(t, os.Remove(path))
			must(t, os.WriteFile(path, make([]byte, 4096), 0o600))
			return path
		}, false},
		{"another file renamed over it", func(t *testing.T, path string) string {
			other := filepath.Join(filepath.Dir(path), "other")
			must(t, os.WriteFile(other, make([]byte, 4096), 0o600))
			must(t, os.Rename(other, path))
			return path
		}, false},
		{"a directory now", func(t *testing.T, path string) string {
			must(t, os.Remove(path))
			must(t, os.Mkdir(path, 0o700))
			return path
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, path := sparseFile(t, 4096)
			got, err := b.SameFile(tt.change(t, path))
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("SameFile = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestSameFileGone(t *testing.T) {
	b, path := sparseFile(t, 4096)
	must(t, os.Remove(path))
	if same, err := b.SameFile(path); err == nil {
		t.Errorf("SameFile of a removed file = %v, nil; want an error", same)
	}
}

// TestSameFileDevice compares block devices by device number, as a device
// node made anew (udev does, for an LV) is the same device; another loop
// device, or the file behind this one, is not.
func TestSameFileDevice(t *testing.T) {
	b, backing := loopDevice(t, 1<<20)
	other, _ := looptest.Attach(t, 1<<20, 0)
	var st unix.Stat_t
	must(t, unix.Stat(b.path, &st))
	node := filepath.Join(t.TempDir(), "node")
	must(t, unix.Mknod(node, unix.S_IFBLK|0o600, int(st.Rdev)))
	for path, want := range map[string]bool{b.path: true, node: true, other: false, backing: false} {
		got, err := b.SameFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("SameFile(%s) of %s = %v, want %v", path, b.path, got, want)
		}
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
