package file

import (
	"context"
	"crypto/rand"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/looptest"
	"github.com/lvnbd/lvnbd/volume"
)

// TestSnapshotReflink takes a snapshot where the filesystem shares extents,
// which the usual test directories (ext4, tmpfs) cannot: it makes an XFS
// with reflinks on a loop device (root, losetup and mkfs.xfs; make test
// fails without them), or uses LVNBD_TEST_REFLINK_DIR, a directory on btrfs
// or XFS, when that is set.
func TestSnapshotReflink(t *testing.T) {
	base := os.Getenv("LVNBD_TEST_REFLINK_DIR")
	if base == "" {
		// 320 MiB: mkfs.xfs refuses file systems under 300 MB.
		base = looptest.Mount(t, 320<<20, "xfs", "-q", "-m", "reflink=1")
	}
	dir, err := os.MkdirTemp(base, "lvnbd-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if !reflinks(t, dir) {
		t.Fatalf("%s cannot reflink (FICLONE fails)", dir)
	}
	d, err := New(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	v := mustCreate(t, d, "vm1", 64*mib)
	data := make([]byte, 16*mib)
	rand.Read(data)
	writeAt(t, v.Path, 0, data)

	before := freeBytes(t, dir)
	s, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	if used := before - freeBytes(t, dir); used > 4*mib {
		t.Errorf("a reflinked snapshot of 16 MiB of data took %d bytes", used)
	}
	m, err := d.loadMetadata()
	if err != nil {
		t.Fatal(err)
	}
	if !m.Volumes["vm1"].Snapshots["s1"].Reflink {
		t.Error("lvnbd.json does not record the snapshot as a reflink")
	}
	writeAt(t, v.Path, 0, []byte("changed"))
	if got := readAt(t, s.Path, 0, 16); string(got) != string(data[:16]) {
		t.Errorf("the snapshot changed with the volume")
	}
	if err := d.MergeSnapshot(ctx, "vm1", "s1"); err != nil {
		t.Fatal(err)
	}
	if got := readAt(t, v.Path, 0, 16); string(got) != string(data[:16]) {
		t.Errorf("the merged volume does not hold the snapshot's data")
	}
}

func freeBytes(t testing.TB, dir string) int64 {
	t.Helper()
	unix.Sync() // XFS accounts delayed allocations on writeback
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * st.Bsize
}
