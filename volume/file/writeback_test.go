package file

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/looptest"
)

// failingWriteBack returns a directory on a file system whose disk runs out
// of room for data, and shrink, which takes the room away: ext4 without
// a journal, all of its metadata written by mkfs, on a loop device over a
// file on a tmpfs that shrink makes just large enough for what is allocated
// so far. Data written afterwards is taken into the page cache, and its
// write-back fails (the loop device gets ENOSPC from the tmpfs), while the
// file system goes on working, as over a disk with bad sectors.
func failingWriteBack(t *testing.T) (dir string, shrink func()) {
	t.Helper()
	looptest.Require(t, "mkfs.ext4", "mount", "umount")
	tmpfs := t.TempDir()
	if err := unix.Mount("tmpfs", tmpfs, "tmpfs", 0, "size=64m"); err != nil {
		t.Fatalf("mounting a tmpfs on %s: %v", tmpfs, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(tmpfs, 0); err != nil {
			t.Errorf("unmounting the tmpfs %s: %v", tmpfs, err)
		}
	})
	backing := filepath.Join(tmpfs, "disk.img")
	if err := os.WriteFile(backing, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(backing, 48<<20); err != nil {
		t.Fatal(err)
	}
	dir = looptest.MountFile(t, backing, "ext4", "-q", "-O", "^has_journal", "-E", "lazy_itable_init=0,nodiscard")
	shrink = func() {
		t.Helper()
		unix.Sync()
		var st unix.Statfs_t
		if err := unix.Statfs(tmpfs, &st); err != nil {
			t.Fatal(err)
		}
		used := int64(st.Blocks-st.Bfree) * st.Bsize
		if err := unix.Mount("tmpfs", tmpfs, "tmpfs", unix.MS_REMOUNT, fmt.Sprintf("size=%d", used+1<<20)); err != nil {
			t.Fatalf("shrinking the tmpfs %s: %v", tmpfs, err)
		}
	}
	return dir, shrink
}

// A server killed with writes in the page cache whose write-back then
// fails: the next server's first flush of the volume must fail, and so the
// export (README "Guarantees"). A volume resize run meanwhile without a
// server must not take that error for itself: an fsync of the volume
// reports it once, and marks it seen for every later opener.
func TestResizeLeavesAWriteBackErrorToTheNextServer(t *testing.T) {
	base, shrink := failingWriteBack(t)
	d, err := New(filepath.Join(base, "volumes"))
	if err != nil {
		t.Fatal(err)
	}
	v := mustCreate(t, d, "vm1", 16*mib)
	shrink()

	// The dead server: its writes in the page cache, their write-back
	// failing after it is gone.
	f, err := os.OpenFile(v.Path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, 8*mib), 0); err != nil {
		t.Fatalf("writing into the page cache: %v", err)
	}
	f.Close()
	unix.Sync() // as SyncAll: it reports nothing, and leaves the error

	_, err = d.Resize(context.Background(), "vm1", 32*mib, false)
	t.Logf("resize: %v", err) // may fail: its file system had an error

	// The next server opens the volume, then flushes.
	next, err := os.OpenFile(v.Path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	if err := unix.Fdatasync(int(next.Fd())); !errors.Is(err, unix.ENOSPC) && !errors.Is(err, unix.EIO) {
		t.Fatalf("the next server's first flush: %v, want the failed write-back's error: the writes it "+
			"lost would be served as healthy", err)
	}
}
