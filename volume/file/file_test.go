package file

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/atomicfile"
	"github.com/lvnbd/lvnbd/volume"
)

const (
	mib = int64(1) << 20
	gib = int64(1) << 30
)

// newDriver returns a driver on a fresh directory with a clock that ticks a
// second per call, so snapshot order is deterministic.
func newDriver(t testing.TB) *Driver {
	t.Helper()
	d, err := New(filepath.Join(t.TempDir(), "volumes"))
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	now := time.Date(2026, 11, 22, 3, 15, 0, 0, time.UTC)
	d.now = func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		now = now.Add(time.Second)
		return now
	}
	return d
}

func mustCreate(t testing.TB, d *Driver, name string, size int64) volume.Volume {
	t.Helper()
	v, err := d.Create(context.Background(), volume.CreateOptions{Name: name, Size: size})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// writeAt writes b at off in path.
func writeAt(t testing.TB, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func readAt(t testing.TB, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func allocated(t testing.TB, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestOpenURL(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		url  string
		want string // the directory; "" for an error
	}{
		{"file:///var/lib/lvnbd", "/var/lib/lvnbd"},
		{"file://localhost/var/lib/lvnbd", "/var/lib/lvnbd"},
		{"file://./lvnbd-data", filepath.Join(wd, "lvnbd-data")},
		{"file://../data", filepath.Join(filepath.Dir(wd), "data")},
		{"file://storage/var/lib/lvnbd", ""},
		{"file://", ""},
		{"file:relative", ""},
		{"file:///x?y=z", ""},
	}
	for _, tt := range tests {
		t.Run(tt.url, func(t *testing.T) {
			u, err := url.Parse(tt.url)
			if err != nil {
				t.Fatal(err)
			}
			d, err := openURL(u)
			if tt.want == "" {
				if err == nil {
					t.Fatalf("openURL(%q) = %v, want an error", tt.url, d)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := d.(*Driver).Dir(); got != tt.want {
				t.Errorf("openURL(%q) dir = %q, want %q", tt.url, got, tt.want)
			}
		})
	}
}

func TestListEmptyDoesNotMakeDirectory(t *testing.T) {
	d := newDriver(t)
	vols, err := d.List(context.Background())
	if err != nil || len(vols) != 0 {
		t.Fatalf("List = %v, %v, want nothing", vols, err)
	}
	if _, err := os.Stat(d.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("List made %s: %v", d.Dir(), err)
	}
	if _, err := d.Get(context.Background(), "vm1"); !errors.Is(err, volume.ErrNotFound) {
		t.Errorf("Get on an empty directory: %v, want ErrNotFound", err)
	}
}

func TestCreate(t *testing.T) {
	ctx := context.Background()
	d := newDriver(t)
	v, err := d.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 10*gib + 1, Stripes: 2})
	if err != nil {
		t.Fatal(err)
	}
	want := volume.Volume{
		Name:       "vm1",
		Size:       10*gib + 4096, // rounded up to 4 KiB
		Stripes:    2,
		StripeSize: volume.DefaultStripeSize,
		Path:       filepath.Join(d.Dir(), "vm1.img"),
		ID:         createdID(time.Date(2026, 11, 22, 3, 15, 1, 0, time.UTC)), // the test clock's first tick
		Snapshots:  []volume.Snapshot{},
	}
	if diff := cmp.Diff(want, v); diff != "" {
		t.Errorf("Create (-want +got):\n%s", diff)
	}
	st, err := os.Stat(v.Path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != want.Size || st.Mode().Perm() != 0o600 {
		t.Errorf("%s: size %d mode %v, want %d %v", v.Path, st.Size(), st.Mode().Perm(), want.Size, os.FileMode(0o600))
	}
	if a := allocated(t, v.Path); a != 0 {
		t.Errorf("a new volume allocates %d bytes, want a sparse file", a)
	}
	mustCreate(t, d, "a", mib)
	vols, err := d.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := []string{vols[0].Name, vols[1].Name}; len(vols) != 2 || got[0] != "a" || got[1] != "vm1" {
		t.Errorf("List = %+v, want a and vm1", vols)
	}
	got, err := d.Get(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Get (-want +got):\n%s", diff)
	}
	assertNoTempFiles(t, d)
}

func TestCreateErrors(t *testing.T) {
	ctx := context.Background()
	d := newDriver(t)
	mustCreate(t, d, "vm1", mib)
	tests := []struct {
		name string
		opts volume.CreateOptions
		want error
	}{
		{"exists", volume.CreateOptions{Name: "vm1", Size: mib}, volume.ErrExists},
		{"bad name", volume.CreateOptions{Name: "../vm1", Size: mib}, volume.ErrInvalidName},
		{"dot name", volume.CreateOptions{Name: ".lock", Size: mib}, volume.ErrInvalidName},
		{"no size", volume.CreateOptions{Name: "vm2"}, volume.ErrInvalidSize},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := d.Create(ctx, tt.opts); !errors.Is(err, tt.want) {
				t.Errorf("Create(%+v) = %v, want %v", tt.opts, err, tt.want)
			}
		})
	}
}

func TestCreateKeepsUnlistedFile(t *testing.T) {
	d := newDriver(t)
	if err := os.MkdirAll(d.Dir(), 0o700); err != nil {
		t.Fatal(err)
	}
	stray := filepath.Join(d.Dir(), "vm1.img")
	if err := os.WriteFile(stray, []byte("an admin's image"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := d.Create(context.Background(), volume.CreateOptions{Name: "vm1", Size: mib})
	if err == nil || !strings.Contains(err.Error(), "not listed") {
		t.Fatalf("Create over an unlisted file: %v, want a refusal", err)
	}
	if got := readFile(t, stray); string(got) != "an admin's image" {
		t.Errorf("the unlisted file was changed to %q", got)
	}
	assertNoTempFiles(t, d)
}

func TestResize(t *testing.T) {
	ctx := context.Background()
	d := newDriver(t)
	v := mustCreate(t, d, "vm1", 10*gib)
	id := v.ID
	writeAt(t, v.Path, 0, []byte("head"))

	v, err := d.Resize(ctx, "vm1", 20*gib, false)
	if err != nil || v.Size != 20*gib || v.ID != id {
		t.Fatalf("grow: %+v, %v (a grow keeps the ID %s)", v, err, id)
	}
	if a := allocated(t, v.Path); a > 64<<10 {
		t.Errorf("growing allocated %d bytes", a)
	}

	_, err = d.Resize(ctx, "vm1", 10*gib, false)
	var se *volume.ShrinkError
	if !errors.As(err, &se) || !errors.Is(err, volume.ErrShrink) {
		t.Fatalf("shrink without allowShrink: %v, want a ShrinkError", err)
	}
	if want := "shrinking vm1 from 20 GiB to 10 GiB discards the last 10 GiB"; err.Error() != want {
		t.Errorf("error = %q, want %q", err, want)
	}
	if v, _ := d.Get(ctx, "vm1"); v.Size != 20*gib {
		t.Errorf("refused shrink changed the size to %d", v.Size)
	}

	v, err = d.Resize(ctx, "vm1", 5*gib, true)
	if err != nil || v.Size != 5*gib {
		t.Fatalf("shrink: %+v, %v", v, err)
	}
	// The tail is lost: grown back, it is not what a dom0 saw under the ID.
	if v.ID != id+"-r1" {
		t.Errorf("ID after a shrink %q, want %q", v.ID, id+"-r1")
	}
	if got := readAt(t, v.Path, 0, 4); string(got) != "head" {
		t.Errorf("data lost on resize: %q", got)
	}

	if _, err := d.Resize(ctx, "nope", gib, false); !errors.Is(err, volume.ErrNotFound) {
		t.Errorf("resize of a missing volume: %v", err)
	}
	if _, err := d.Resize(ctx, "vm1", 0, true); !errors.Is(err, volume.ErrInvalidSize) {
		t.Errorf("resize to 0: %v", err)
	}
}

// The server counts a shrink made behind lvnbd's back (a truncate) once it
// sees it, only while the volume still has the ID it served.
func TestCountRollback(t *testing.T) {
	ctx := context.Background()
	d := newDriver(t)
	v := mustCreate(t, d, "vm1", gib)
	id := v.ID
	if counted, err := d.CountRollback(ctx, "vm1", id); err != nil || !counted {
		t.Fatalf("CountRollback = %v, %v; want counted", counted, err)
	}
	if v, _ := d.Get(ctx, "vm1"); v.ID != id+"-r1" {
		t.Fatalf("ID after a counted rollback %q, want %q", v.ID, id+"-r1")
	}
	// Counted already: the server asks again with the ID it served.
	if counted, err := d.CountRollback(ctx, "vm1", id); err != nil || counted {
		t.Fatalf("CountRollback for the old ID = %v, %v; want not counted", counted, err)
	}
	if v, _ := d.Get(ctx, "vm1"); v.ID != id+"-r1" {
		t.Errorf("ID after a second count for the same ID %q, want %q", v.ID, id+"-r1")
	}
	if _, err := d.CountRollback(ctx, "nope", id); !errors.Is(err, volume.ErrNotFound) {
		t.Errorf("count for a missing volume: %v", err)
	}
}

func TestRemove(t *testing.T) {
	ctx := context.Background()
	d := newDriver(t)
	v := mustCreate(t, d, "vm1", mib)
	if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	err := d.Remove(ctx, "vm1")
	if !errors.Is(err, volume.ErrHasSnapshots) || !strings.Contains(err.Error(), "vm1@s1") {
		t.Fatalf("Remove with a snapshot: %v, want ErrHasSnapshots naming vm1@s1", err)
	}
	if err := d.RemoveSnapshot(ctx, "vm1", "s1"); err != nil {
		t.Fatal(err)
	}
	if err := d.Remove(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(v.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s still exists: %v", v.Path, err)
	}
	if _, err := d.Get(ctx, "vm1"); !errors.Is(err, volume.ErrNotFound) {
		t.Errorf("Get after Remove: %v", err)
	}
	if err := d.Remove(ctx, "vm1"); !errors.Is(err, volume.ErrNotFound) {
		t.Errorf("second Remove: %v", err)
	}
	// A volume of the same name can be made again.
	mustCreate(t, d, "vm1", mib)
}

func TestSnapshot(t *testing.T) {
	ctx := context.Background()
	d := newDriver(t)
	v := mustCreate(t, d, "vm1", 64*mib)
	writeAt(t, v.Path, 0, []byte("before"))
	writeAt(t, v.Path, 32*mib, []byte("middle"))

	s, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s1", COWSize: gib})
	if err != nil {
		t.Fatal(err)
	}
	want := volume.Snapshot{
		Volume:  "vm1",
		Name:    "s1",
		Size:    64 * mib,
		Created: time.Date(2026, 11, 22, 3, 15, 2, 0, time.UTC),
		Path:    filepath.Join(d.Dir(), "vm1@s1.img"),
		ID:      createdID(time.Date(2026, 11, 22, 3, 15, 2, 0, time.UTC)),
	}
	if diff := cmp.Diff(want, s); diff != "" {
		t.Errorf("Snapshot (-want +got):\n%s", diff)
	}
	if d.Path("../vm1") != "" || d.Path("vm1@../s1") != "" {
		t.Errorf("Path of names that are not volumes or snapshots: %q, %q", d.Path("../vm1"), d.Path("vm1@../s1"))
	}
	if s.Path != d.Path("vm1@s1") {
		t.Errorf("Path(vm1@s1) = %s, snapshot is at %s", d.Path("vm1@s1"), s.Path)
	}
	st, err := os.Stat(s.Path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o400 {
		t.Errorf("snapshot mode %v, want read-only 0400", st.Mode().Perm())
	}
	if a := allocated(t, s.Path); a > 4*mib {
		t.Errorf("snapshot of 12 written bytes allocates %d bytes: not sparse", a)
	}

	writeAt(t, v.Path, 0, []byte("after!"))
	snap := readFile(t, s.Path)
	if string(snap[:6]) != "before" || string(snap[32*mib:32*mib+6]) != "middle" {
		t.Errorf("snapshot content changed with the volume: %q %q", snap[:6], snap[32*mib:32*mib+6])
	}

	if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s1"}); !errors.Is(err, volume.ErrExists) {
		t.Errorf("second s1: %v, want ErrExists", err)
	}
	if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "nope", Name: "s1"}); !errors.Is(err, volume.ErrNotFound) {
		t.Errorf("snapshot of a missing volume: %v, want ErrNotFound", err)
	}
	if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "a@b"}); !errors.Is(err, volume.ErrInvalidName) {
		t.Errorf("snapshot named a@b: %v, want ErrInvalidName", err)
	}

	if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s0"}); err != nil {
		t.Fatal(err)
	}
	mustCreate(t, d, "a", mib)
	if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "a", Name: "x"}); err != nil {
		t.Fatal(err)
	}
	all, err := d.Snapshots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var refs []string
	for _, s := range all {
		refs = append(refs, s.Ref())
	}
	// By volume, then oldest first: s1 was taken before s0.
	if diff := cmp.Diff([]string{"a@x", "vm1@s1", "vm1@s0"}, refs); diff != "" {
		t.Errorf("Snapshots (-want +got):\n%s", diff)
	}
	got, err := d.Get(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Snapshots) != 2 || got.Snapshots[0].Name != "s1" {
		t.Errorf("Get(vm1).Snapshots = %+v", got.Snapshots)
	}
	assertNoTempFiles(t, d)
}

func TestRemoveSnapshot(t *testing.T) {
	ctx := context.Background()
	d := newDriver(t)
	mustCreate(t, d, "vm1", mib)
	s, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.RemoveSnapshot(ctx, "vm1", "s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s still exists: %v", s.Path, err)
	}
	if err := d.RemoveSnapshot(ctx, "vm1", "s1"); !errors.Is(err, volume.ErrNotFound) {
		t.Errorf("second RemoveSnapshot: %v, want ErrNotFound", err)
	}
	if err := d.RemoveSnapshot(ctx, "vm1", "../x"); !errors.Is(err, volume.ErrInvalidName) {
		t.Errorf("RemoveSnapshot(../x): %v, want ErrInvalidName", err)
	}
}

func TestMergeSnapshot(t *testing.T) {
	ctx := context.Background()
	d := newDriver(t)
	v := mustCreate(t, d, "vm1", 8*mib)
	writeAt(t, v.Path, 4096, []byte("original"))
	if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "keep"}); err != nil {
		t.Fatal(err)
	}
	writeAt(t, v.Path, 4096, []byte("changed!"))
	writeAt(t, v.Path, 6*mib, []byte("more"))
	if _, err := d.Resize(ctx, "vm1", 16*mib, false); err != nil {
		t.Fatal(err)
	}

	if err := d.MergeSnapshot(ctx, "vm1", "s1"); err != nil {
		t.Fatal(err)
	}
	got, err := d.Get(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if got.Size != 8*mib {
		t.Errorf("merged volume is %d bytes, want the snapshot's %d", got.Size, 8*mib)
	}
	// Rolled back, the volume is not what a dom0 last saw under its ID.
	if want := v.ID + "-r1"; got.ID != want {
		t.Errorf("merged volume's ID %q, want %q", got.ID, want)
	}
	b := readFile(t, got.Path)
	if string(b[4096:4104]) != "original" || !bytes.Equal(b[6*mib:6*mib+4], make([]byte, 4)) {
		t.Errorf("merged volume does not hold the snapshot's data: %q %q", b[4096:4104], b[6*mib:6*mib+4])
	}
	st, err := os.Stat(got.Path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != volumeMode {
		t.Errorf("merged volume mode %v, want %v", st.Mode().Perm(), os.FileMode(volumeMode))
	}
	if len(got.Snapshots) != 1 || got.Snapshots[0].Name != "keep" {
		t.Errorf("snapshots after merge: %+v, want only keep", got.Snapshots)
	}
	writeAt(t, got.Path, 0, []byte("writable"))
	if err := d.MergeSnapshot(ctx, "vm1", "s1"); !errors.Is(err, volume.ErrNotFound) {
		t.Errorf("second merge: %v, want ErrNotFound", err)
	}
	if err := d.MergeSnapshot(ctx, "vm1", "keep"); err != nil {
		t.Fatal(err)
	}
	if got, err := d.Get(ctx, "vm1"); err != nil || got.ID != v.ID+"-r2" {
		t.Errorf("ID after a second merge: %q, %v; want %q", got.ID, err, v.ID+"-r2")
	}
	assertNoTempFiles(t, d)
}

// TestMergeAfterCrash starts from the states a crash can leave a merge in:
// recorded but not renamed, and renamed but not forgotten.
// TestMergeAfterCrash: a merge recorded, then a crash before or after the
// rename. Whatever reads the volumes next, as a restarted server does
// before exporting them, finishes the merge, so that what it sees (and
// exports) is the merged volume, not a file the merge would rename away.
func TestMergeAfterCrash(t *testing.T) {
	reads := map[string]func(ctx context.Context, d *Driver) error{
		"List": func(ctx context.Context, d *Driver) error { _, err := d.List(ctx); return err },
		"Get":  func(ctx context.Context, d *Driver) error { _, err := d.Get(ctx, "vm1"); return err },
		"Snapshots": func(ctx context.Context, d *Driver) error {
			snaps, err := d.Snapshots(ctx)
			if err == nil && len(snaps) != 0 {
				err = fmt.Errorf("snapshots %+v, want none", snaps)
			}
			return err
		},
		"a change": func(ctx context.Context, d *Driver) error {
			_, err := d.Create(ctx, volume.CreateOptions{Name: "other", Size: mib})
			return err
		},
	}
	for _, renamed := range []bool{false, true} {
		for readName, read := range reads {
			t.Run(fmt.Sprintf("renamed=%v/%s", renamed, readName), func(t *testing.T) {
				ctx := context.Background()
				d := newDriver(t)
				v := mustCreate(t, d, "vm1", mib)
				writeAt(t, v.Path, 0, []byte("snap"))
				s, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s1"})
				if err != nil {
					t.Fatal(err)
				}
				writeAt(t, v.Path, 0, []byte("live"))
				m, err := d.loadMetadata()
				if err != nil {
					t.Fatal(err)
				}
				m.Volumes["vm1"].Snapshots["s1"].Merging = true
				if err := d.commit(m); err != nil {
					t.Fatal(err)
				}
				if renamed {
					if err := os.Rename(s.Path, v.Path); err != nil {
						t.Fatal(err)
					}
				}

				if err := read(ctx, d); err != nil {
					t.Fatal(err)
				}
				if b := readFile(t, v.Path); string(b[:4]) != "snap" {
					t.Errorf("volume after %s starts %q, want the snapshot's %q", readName, b[:4], "snap")
				}
				if _, err := os.Stat(s.Path); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("the snapshot's file after %s: %v, want it renamed over the volume", readName, err)
				}
				m, err = d.loadMetadata()
				if err != nil {
					t.Fatal(err)
				}
				if snaps := m.Volumes["vm1"].Snapshots; len(snaps) != 0 {
					t.Errorf("lvnbd.json after %s still has snapshots %v", readName, snaps)
				}
				if n := m.Volumes["vm1"].Rollbacks; n != 1 {
					t.Errorf("lvnbd.json after %s counts %d rollbacks, want 1: the volume's ID must change once", readName, n)
				}
			})
		}
	}
}

func TestMetadataFile(t *testing.T) {
	ctx := context.Background()
	d := newDriver(t)
	if _, err := d.Create(ctx, volume.CreateOptions{Name: "vm1", Size: mib, Stripes: 4, StripeSize: 128 << 10}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(readFile(t, filepath.Join(d.Dir(), metadataName)), &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"version": 1.0,
		"volumes": map[string]any{
			"vm1": map[string]any{
				"created":     "2026-11-22T03:15:01Z",
				"stripes":     4.0,
				"stripe_size": 131072.0,
				"snapshots": map[string]any{
					"s1": map[string]any{"created": "2026-11-22T03:15:02Z", "reflink": reflinks(t, d.Dir())},
				},
			},
		},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("%s (-want +got):\n%s", metadataName, diff)
	}

	if err := os.WriteFile(filepath.Join(d.Dir(), metadataName), []byte(`{"version":2,"volumes":{}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := d.List(ctx); err == nil || !strings.Contains(err.Error(), "newer lvnbd") {
		t.Errorf("List with a version 2 %s: %v, want a refusal", metadataName, err)
	}
}

// TestConcurrentChanges runs changes from many goroutines, each with its own
// lock file descriptor, as separate processes would.
func TestConcurrentChanges(t *testing.T) {
	ctx := context.Background()
	d := newDriver(t)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 16 {
		wg.Go(func() {
			name := fmt.Sprintf("vm%d", i)
			if _, err := d.Create(ctx, volume.CreateOptions{Name: name, Size: mib}); err != nil {
				errs <- err
				return
			}
			if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: name, Name: "s"}); err != nil {
				errs <- err
				return
			}
			if _, err := d.List(ctx); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	snaps, err := d.Snapshots(ctx)
	if err != nil || len(snaps) != 16 {
		t.Errorf("Snapshots = %d, %v, want 16", len(snaps), err)
	}
}

func TestLockHonoursContext(t *testing.T) {
	d := newDriver(t)
	mustCreate(t, d, "vm1", mib)
	unlock, err := d.lock(context.Background(), unix.LOCK_EX)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := d.Create(ctx, volume.CreateOptions{Name: "vm2", Size: mib}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Create while locked: %v, want DeadlineExceeded", err)
	}
}

func assertNoTempFiles(t testing.TB, d *Driver) {
	t.Helper()
	ents, err := os.ReadDir(d.Dir())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".tmp") || strings.HasPrefix(e.Name(), "."+metadataName+".") {
			t.Errorf("temporary file left behind: %s", e.Name())
		}
	}
}

// reflinks reports whether the filesystem of dir can FICLONE.
func reflinks(t testing.TB, dir string) bool {
	t.Helper()
	a, err := os.CreateTemp(dir, ".probe")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(a.Name())
	defer a.Close()
	b, err := os.CreateTemp(dir, ".probe")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(b.Name())
	defer b.Close()
	return unix.IoctlFileClone(int(b.Fd()), int(a.Fd())) == nil
}

// A volume made anew under the name of a removed one has another ID, so a
// dom0 can tell it from the one its leg was attached to.
func TestIDChangesWhenMadeAnew(t *testing.T) {
	d := newDriver(t)
	first := mustCreate(t, d, "vm1", mib)
	if err := d.Remove(context.Background(), "vm1"); err != nil {
		t.Fatal(err)
	}
	second := mustCreate(t, d, "vm1", mib)
	if first.ID == "" || first.ID == second.ID {
		t.Errorf("IDs %q then %q: want two, and different", first.ID, second.ID)
	}
}

// notDurableOnce makes the next metadata write land but report that its
// directory sync failed, as a full or failing disk can.
func notDurableOnce(t *testing.T) {
	t.Helper()
	var once sync.Once
	writeFile = func(path string, b []byte, perm os.FileMode) error {
		err := atomicfile.Write(path, b, perm)
		once.Do(func() {
			if err == nil {
				err = fmt.Errorf("writing %s: %w: syncing directory: %w", path, atomicfile.ErrNotDurable, unix.EIO)
			}
		})
		return err
	}
	t.Cleanup(func() { writeFile = atomicfile.Write })
}

// A change whose metadata was written but not made durable is kept, as the
// metadata says: the file it lists is not removed (every List would fail
// after), and a merge on record is finished.
func TestMetadataWrittenButNotDurable(t *testing.T) {
	ctx := context.Background()
	d := newDriver(t)

	notDurableOnce(t)
	if _, err := d.Create(ctx, volume.CreateOptions{Name: "vm1", Size: mib}); !errors.Is(err, atomicfile.ErrNotDurable) {
		t.Fatalf("Create: %v, want ErrNotDurable", err)
	}
	if vols, err := d.List(ctx); err != nil || len(vols) != 1 {
		t.Fatalf("List after a create not made durable: %v, %v; want vm1", vols, err)
	}

	notDurableOnce(t)
	if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s"}); !errors.Is(err, atomicfile.ErrNotDurable) {
		t.Fatalf("Snapshot: %v, want ErrNotDurable", err)
	}
	if snaps, err := d.Snapshots(ctx); err != nil || len(snaps) != 1 {
		t.Fatalf("Snapshots after one not made durable: %v, %v; want vm1@s", snaps, err)
	}

	vol, err := d.Get(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(vol.Path, []byte("after the snapshot"), 0); err != nil {
		t.Fatal(err)
	}
	notDurableOnce(t)
	if err := d.MergeSnapshot(ctx, "vm1", "s"); err != nil {
		t.Fatalf("MergeSnapshot whose first record was not made durable: %v, want it finished", err)
	}
	got, err := os.ReadFile(vol.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, mib)) {
		t.Errorf("vm1 after the merge starts %q, want the snapshot's zeroes", got[:min(len(got), 32)])
	}
	if snaps, err := d.Snapshots(ctx); err != nil || len(snaps) != 0 {
		t.Errorf("Snapshots after the merge: %v, %v; want none", snaps, err)
	}
}

// TestFileGoneIsAProblemNotAFailedListing: a volume or snapshot whose file
// was deleted by hand is listed with its Problem, and the others are listed
// as ever: a listing that failed for one would stop a server's rescans for
// every volume. Get names the problem; remove forgets the entry.
func TestFileGoneIsAProblemNotAFailedListing(t *testing.T) {
	ctx := context.Background()
	d := newDriver(t)
	gone := mustCreate(t, d, "gone", mib)
	mustCreate(t, d, "vm1", mib)
	snap, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{gone.Path, snap.Path} {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
	}
	vols, err := d.List(ctx)
	if err != nil {
		t.Fatalf("List: %v, want the volumes with the problems", err)
	}
	if len(vols) != 2 || vols[0].Name != "gone" || vols[1].Name != "vm1" {
		t.Fatalf("List = %+v, want gone and vm1", vols)
	}
	if p := vols[0].Problem; !strings.Contains(p, "file is gone") || !strings.Contains(p, "lvnbd volume remove gone") {
		t.Errorf("gone's problem %q, want the file gone and how to forget it", p)
	}
	if vols[0].ID != gone.ID {
		t.Errorf("gone's ID %q, want %q as made", vols[0].ID, gone.ID)
	}
	if vols[1].Problem != "" || vols[1].Size != mib {
		t.Errorf("vm1 = %+v, want it whole", vols[1])
	}
	if len(vols[1].Snapshots) != 1 || !strings.Contains(vols[1].Snapshots[0].Problem, "lvnbd snapshot remove vm1@s1") {
		t.Errorf("vm1's snapshots %+v, want s1 with its problem", vols[1].Snapshots)
	}
	snaps, err := d.Snapshots(ctx)
	if err != nil || len(snaps) != 1 || snaps[0].Problem == "" {
		t.Errorf("Snapshots = %+v, %v, want s1 with its problem", snaps, err)
	}
	if _, err := d.Get(ctx, "gone"); !errors.Is(err, volume.ErrUnreadable) || !strings.Contains(err.Error(), "file is gone") {
		t.Errorf("Get(gone): %v, want ErrUnreadable saying the file is gone", err)
	}
	if _, err := d.Resize(ctx, "gone", 2*mib, false); err == nil {
		t.Error("Resize of a volume whose file is gone succeeded")
	}
	if err := d.RemoveSnapshot(ctx, "vm1", "s1"); err != nil {
		t.Errorf("RemoveSnapshot of a snapshot whose file is gone: %v", err)
	}
	if err := d.Remove(ctx, "gone"); err != nil {
		t.Errorf("Remove of a volume whose file is gone: %v", err)
	}
	if vols, err := d.List(ctx); err != nil || len(vols) != 1 || vols[0].Problem != "" || len(vols[0].Snapshots) != 0 {
		t.Errorf("List after removing both: %+v, %v, want vm1 alone and whole", vols, err)
	}
}

// The servers and the crash epoch are kept in lvnbd.json, beside the
// volumes, read by a driver opened anew; an update that changes nothing
// writes nothing, and one that fails changes nothing.
func TestUpdateRuns(t *testing.T) {
	ctx := context.Background()
	d := newDriver(t)
	if _, err := d.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	run := volume.Run{Boot: strings.Repeat("ab", 16), PID: 42, PIDStart: 7}
	want := volume.RunState{Epoch: "3fa2b1c9", Runs: []volume.Run{run}}
	if err := d.UpdateRuns(ctx, func(s *volume.RunState) (bool, error) {
		if s.Epoch != "" || len(s.Runs) != 0 {
			t.Errorf("a new directory's runs: %+v, want none", s)
		}
		*s = want
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	meta := filepath.Join(d.dir, metadataName)
	before, _ := os.ReadFile(meta)
	again, err := New(d.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []func(*volume.RunState) (bool, error){
		func(s *volume.RunState) (bool, error) { s.Epoch = "00000000"; return false, nil },
		func(s *volume.RunState) (bool, error) { s.Epoch = "00000000"; return true, errors.New("no") },
	} {
		_ = again.UpdateRuns(ctx, f)
	}
	var got volume.RunState
	if err := again.UpdateRuns(ctx, func(s *volume.RunState) (bool, error) { got = *s; return false, nil }); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("runs read back (-want +got):\n%s", diff)
	}
	if after, _ := os.ReadFile(meta); string(after) != string(before) {
		t.Errorf("an update that changed nothing, or failed, rewrote lvnbd.json")
	}
	if _, err := d.Get(ctx, "vm1"); err != nil {
		t.Errorf("vm1 after the runs were kept: %v", err)
	}
	// Every other change of lvnbd.json keeps them.
	if _, err := d.Create(ctx, volume.CreateOptions{Name: "vm2", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm2", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	if err := d.RemoveSnapshot(ctx, "vm2", "s1"); err != nil {
		t.Fatal(err)
	}
	if err := d.Remove(ctx, "vm2"); err != nil {
		t.Fatal(err)
	}
	if err := again.UpdateRuns(ctx, func(s *volume.RunState) (bool, error) { got = *s; return false, nil }); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("runs after volumes and snapshots changed (-want +got):\n%s", diff)
	}
	if err := d.SyncAll(ctx); err != nil {
		t.Errorf("SyncAll: %v", err)
	}
}
