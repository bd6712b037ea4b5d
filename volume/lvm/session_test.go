package lvm

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/lvnbd/lvnbd/volume"
)

// The session below runs for real in the VM suite, against a scratch volume
// group made like this (test/vm/scenarios, or by hand on a spare machine):
//
//	pvcreate /dev/ram0 /dev/ram1 /dev/ram2         # 3 PVs of 256 MiB
//	vgcreate vg0 /dev/ram0 /dev/ram1 /dev/ram2     # 4 MiB extents
//	lvcreate -L 64m -T vg0/pool                    # a thin pool
//	lvcreate -n thin1 -V 64m -T vg0/pool --addtag lvnbd
//	lvcreate -n root -L 8m vg0                     # not lvnbd's
//	LVNBD_TEST_LVM_VG=vg0 LVNBD_TEST_LVM_RECORD=session.json go test -run TestSessionReal ./volume/lvm
//
// With LVNBD_TEST_LVM_RECORD it saves every lvm2 command it ran with its
// output: testdata/session.json is such a recording, and TestSessionReplay
// replays it, so the driver's commands and parsers are checked against real
// lvm2 2.03 on every go test.

const sessionFile = "session.json"

// sessionEnv does what the session needs outside the driver: I/O on the
// devices, holding one open, lvchange --refresh. The replay does none.
type sessionEnv interface {
	write(path string, off, n int64)
	sum(path string, n int64) string
	open(path string) (close func())
	refresh(vg, lv string)
}

func TestSessionReplay(t *testing.T) {
	d := &Driver{vg: "vg0", run: newFakeRunner(t, loadSession(t, sessionFile)...)}
	runSession(t, d, replayEnv{})
}

func TestSessionReal(t *testing.T) {
	vg := os.Getenv("LVNBD_TEST_LVM_VG")
	if vg == "" {
		t.Skip("needs a scratch LVM volume group (see session_test.go): set LVNBD_TEST_LVM_VG, as the VM suite does")
	}
	if vg != "vg0" {
		t.Fatalf("LVNBD_TEST_LVM_VG=%s: the session expects vg0", vg)
	}
	rec := &recordingRunner{r: execRunner{}}
	d := &Driver{vg: vg, run: rec}
	runSession(t, d, realEnv{t})
	if path := os.Getenv("LVNBD_TEST_LVM_RECORD"); path != "" && !t.Failed() {
		b, err := json.MarshalIndent(rec.calls, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func runSession(t *testing.T, d *Driver, env sessionEnv) {
	ctx := context.Background()
	const mib = int64(1) << 20
	expectErr := func(step string, err, target error, text string) {
		t.Helper()
		if err == nil || (target != nil && !errors.Is(err, target)) || !strings.Contains(err.Error(), text) {
			t.Fatalf("%s: error %v, want %v containing %q", step, err, target, text)
		}
	}
	// IDs are the recorded LVs' UUIDs: checked to be there, not compared.
	ignoreTime := cmpopts.IgnoreFields(volume.Snapshot{}, "Created", "UsagePercent", "ID")
	ignoreID := cmpopts.IgnoreFields(volume.Volume{}, "ID")

	vols, err := d.List(ctx)
	if err != nil || len(vols) != 1 || vols[0].Name != "thin1" || !vols[0].Thin {
		t.Fatalf("List at start = %+v, %v, want the thin volume thin1 only", vols, err)
	}
	_, err = d.Get(ctx, "root")
	expectErr("Get(root)", err, volume.ErrNotFound, "lvchange --addtag lvnbd vg0/root")

	// 100 MiB over 2 stripes of 4 MiB extents rounds up to 104 MiB.
	v, err := d.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 100 * mib, Stripes: 2, StripeSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	want := volume.Volume{Name: "vm1", Size: 104 * mib, Stripes: 2, StripeSize: 64 << 10, Path: "/dev/vg0/vm1", Snapshots: []volume.Snapshot{}}
	if diff := cmp.Diff(want, v, ignoreID); diff != "" || v.ID == "" {
		t.Fatalf("Create vm1 (-want +got), ID %q:\n%s", v.ID, diff)
	}
	vm1ID := v.ID // its UUID: every rollback (a shrink, a merge) adds -rN to it
	_, err = d.Create(ctx, volume.CreateOptions{Name: "vm1", Size: mib})
	expectErr("Create vm1 again", err, volume.ErrExists, "vm1")
	_, err = d.Create(ctx, volume.CreateOptions{Name: "big", Size: 10 << 30})
	expectErr("Create 10G", err, volume.ErrNoSpace, "needed")
	_, err = d.Create(ctx, volume.CreateOptions{Name: "wide", Size: 16 * mib, Stripes: 4})
	expectErr("Create 4 stripes", err, nil, "4 stripes need 4 physical volumes, volume group vg0 has 3")
	if _, err := d.Create(ctx, volume.CreateOptions{Name: "vm2", Size: 32 * mib}); err != nil {
		t.Fatal(err)
	}

	if v, err = d.Resize(ctx, "vm1", 120*mib, false); err != nil || v.Size != 120*mib || v.Stripes != 2 || v.ID != vm1ID {
		t.Fatalf("grow vm1 to 120 MiB: %+v, %v (a grow keeps the ID %s)", v, err, vm1ID)
	}
	_, err = d.Resize(ctx, "vm1", 64*mib, false)
	expectErr("shrink vm1 refused", err, volume.ErrShrink, "shrinking vm1 from 120 MiB to 64 MiB discards the last 56 MiB")
	if v, err = d.Resize(ctx, "vm1", 64*mib, true); err != nil || v.Size != 64*mib || v.ID != vm1ID+"-r1" {
		t.Fatalf("shrink vm1 to 64 MiB: %+v, %v, want ID %s-r1 (its tail is lost)", v, err, vm1ID)
	}
	if v, err = d.Resize(ctx, "vm2", 30*mib, false); err != nil || v.Size != 32*mib {
		t.Fatalf("resize vm2 to a size that rounds to its own: %+v, %v", v, err)
	}

	env.write("/dev/vg0/vm1", 0, 2*mib)
	before := env.sum("/dev/vg0/vm1", 4*mib)
	s, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s1", COWSize: 8 * mib})
	if err != nil {
		t.Fatal(err)
	}
	wantSnap := volume.Snapshot{Volume: "vm1", Name: "s1", Size: 64 * mib, COWSize: 8 * mib, Path: "/dev/vg0/vm1+s1"}
	if diff := cmp.Diff(wantSnap, s, ignoreTime); diff != "" || s.ID == "" || s.ID == v.ID {
		t.Fatalf("Snapshot vm1@s1 (-want +got):\n%s", diff)
	}
	_, err = d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s1"})
	expectErr("Snapshot vm1@s1 again", err, volume.ErrExists, "vm1@s1")
	env.write("/dev/vg0/vm1", 0, 2*mib)

	if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm2", Name: "full", COWSize: 4 * mib}); err != nil {
		t.Fatal(err)
	}
	env.write("/dev/vg0/vm2", 0, 8*mib) // overflows its 4 MiB of COW space
	ts, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "thin1", Name: "t1"})
	if err != nil {
		t.Fatal(err)
	}
	if !ts.Thin || ts.COWSize != 0 || ts.Size != 64*mib || ts.Path != "/dev/vg0/thin1+t1" {
		t.Fatalf("thin snapshot thin1@t1 = %+v", ts)
	}

	snaps, err := d.Snapshots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var refs []string
	for _, s := range snaps {
		refs = append(refs, s.Ref())
	}
	if diff := cmp.Diff([]string{"thin1@t1", "vm1@s1", "vm2@full"}, refs); diff != "" {
		t.Fatalf("Snapshots (-want +got):\n%s", diff)
	}
	if s := snaps[1]; s.Invalid || s.UsagePercent <= 0 || s.UsagePercent >= 100 {
		t.Errorf("vm1@s1 after 2 MiB of writes: %+v, want a partly used valid snapshot", s)
	}
	if s := snaps[2]; !s.Invalid {
		t.Errorf("vm2@full after overflowing: %+v, want invalid", s)
	}
	err = d.MergeSnapshot(ctx, "vm2", "full")
	expectErr("merge an invalid snapshot", err, nil, "only removed")
	_, err = d.Resize(ctx, "vm1", 128*mib, false)
	expectErr("grow an origin", err, nil, "merge or remove its snapshots first (vm1@s1)")
	err = d.Remove(ctx, "vm1")
	expectErr("remove an origin", err, volume.ErrHasSnapshots, "vm1@s1")

	// A merge rolls the volume back under the same LV and UUID, a thin
	// one too: the ID counts the rollbacks (vm1's shrink was the first).
	ids := map[string]string{"vm1": vm1ID}
	if v, err := d.Get(ctx, "thin1"); err != nil || v.ID == "" {
		t.Fatalf("thin1 before merging: %+v, %v", v, err)
	} else {
		ids["thin1"] = v.ID
	}
	if err := d.MergeSnapshot(ctx, "vm1", "s1"); err != nil {
		t.Fatal(err)
	}
	if got := env.sum("/dev/vg0/vm1", 4*mib); got != before {
		t.Errorf("vm1 after merging s1 does not hold the snapshot's data")
	}
	if v, err := d.Get(ctx, "vm1"); err != nil || len(v.Snapshots) != 0 || v.ID != ids["vm1"]+"-r2" {
		t.Fatalf("vm1 after merge: %+v, %v, want ID %s-r2", v, err, ids["vm1"])
	}

	// A merge while the volume is open waits for it to close.
	if _, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s2", COWSize: 8 * mib}); err != nil {
		t.Fatal(err)
	}
	closeVM1 := env.open("/dev/vg0/vm1")
	err = d.MergeSnapshot(ctx, "vm1", "s2")
	expectErr("merge with the origin open", err, volume.ErrMergePending, "lvchange --refresh vg0/vm1")
	if v, err := d.Get(ctx, "vm1"); err != nil || !v.MergePending || len(v.Snapshots) != 1 || !v.Snapshots[0].Merging {
		t.Fatalf("vm1 with a pending merge: %+v, %v, want MergePending and its merging snapshot", v, err)
	}
	err = d.MergeSnapshot(ctx, "vm1", "s2")
	expectErr("merge again", err, volume.ErrMergePending, "")
	err = d.Remove(ctx, "vm1")
	expectErr("remove with a pending merge", err, volume.ErrHasSnapshots, "vm1@s2")
	closeVM1()
	env.refresh("vg0", "vm1")
	if v, err := d.Get(ctx, "vm1"); err != nil || v.MergePending || len(v.Snapshots) != 0 || v.ID != ids["vm1"]+"-r3" {
		t.Fatalf("vm1 after the pending merge: %+v, %v, want ID %s-r3 (counted once, not again by the second try)", v, err, ids["vm1"])
	}

	// A thin merge waits for an open origin too.
	closeThin := env.open("/dev/vg0/thin1")
	err = d.MergeSnapshot(ctx, "thin1", "t1")
	expectErr("thin merge with the origin open", err, volume.ErrMergePending, "lvchange --refresh vg0/thin1")
	if v, err := d.Get(ctx, "thin1"); err != nil || !v.MergePending || len(v.Snapshots) != 1 || !v.Snapshots[0].Merging {
		t.Fatalf("thin1 with a pending merge: %+v, %v, want MergePending and its merging snapshot", v, err)
	}
	closeThin()
	env.refresh("vg0", "thin1")
	if v, err := d.Get(ctx, "thin1"); err != nil || v.MergePending || len(v.Snapshots) != 0 || v.ID != ids["thin1"]+"-r1" {
		t.Fatalf("thin1 after the pending merge: %+v, %v, want ID %s-r1", v, err, ids["thin1"])
	}
	if err := d.RemoveSnapshot(ctx, "vm2", "full"); err != nil {
		t.Fatal(err)
	}
	err = d.RemoveSnapshot(ctx, "vm2", "full")
	expectErr("remove a removed snapshot", err, volume.ErrNotFound, "vm2@full")

	closeVM2 := env.open("/dev/vg0/vm2")
	err = d.Remove(ctx, "vm2")
	expectErr("remove an open volume", err, nil, "in use")
	closeVM2()
	for _, name := range []string{"vm1", "vm2"} {
		if err := d.Remove(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	vols, err = d.List(ctx)
	if err != nil || len(vols) != 1 || vols[0].Name != "thin1" || len(vols[0].Snapshots) != 0 {
		t.Fatalf("List at the end = %+v, %v, want thin1 only", vols, err)
	}
}

type replayEnv struct{}

func (replayEnv) write(string, int64, int64) {}
func (replayEnv) sum(string, int64) string   { return "" }
func (replayEnv) open(string) func()         { return func() {} }
func (replayEnv) refresh(string, string)     {}

type realEnv struct{ t *testing.T }

func (e realEnv) write(path string, off, n int64) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_SYNC, 0)
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.CopyN(io.NewOffsetWriter(f, off), rand.Reader, n); err != nil {
		e.t.Fatal(err)
	}
}

func (e realEnv) sum(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.CopyN(h, f, n); err != nil {
		e.t.Fatal(err)
	}
	return string(h.Sum(nil))
}

func (e realEnv) open(path string) func() {
	f, err := os.Open(path)
	if err != nil {
		e.t.Fatal(err)
	}
	return func() { f.Close() }
}

func (e realEnv) refresh(vg, lv string) {
	out, err := exec.Command("lvm", "lvchange", "--refresh", filepath.Join(vg, lv)).CombinedOutput()
	if err != nil {
		e.t.Fatalf("lvchange --refresh: %v\n%s", err, out)
	}
}
