package lvm

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/flock"
	"github.com/lvnbd/lvnbd/volume"
)

const mib = int64(1) << 20

func newTestDriver(t *testing.T, calls ...call) *Driver {
	return &Driver{vg: "vg0", run: newFakeRunner(t, calls...), lockDir: t.TempDir()}
}

func TestOpenURL(t *testing.T) {
	tests := []struct {
		url, vg string // vg "" for an error
	}{
		{"lvm://vg0", "vg0"},
		{"lvm://vg0/", "vg0"},
		{"lvm://storage_vg.1", "storage_vg.1"},
		{"lvm://", ""},
		{"lvm://vg0/vm1", ""},
		{"lvm://vg0:1", ""},
		{"lvm://vg0?x=1", ""},
		{"lvm:vg0", ""},
		{"lvm://-vg", ""},
	}
	for _, tt := range tests {
		t.Run(tt.url, func(t *testing.T) {
			u, err := url.Parse(tt.url)
			if err != nil {
				t.Fatal(err)
			}
			d, err := openURL(u)
			if tt.vg == "" {
				if err == nil {
					t.Fatalf("openURL(%q) = %v, want an error", tt.url, d)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := d.String(); got != "lvm://"+tt.vg {
				t.Errorf("openURL(%q) = %s", tt.url, got)
			}
		})
	}
	if d, err := volume.Open("lvm://vg0"); err != nil || d.String() != "lvm://vg0" {
		t.Errorf("volume.Open(lvm://vg0) = %v, %v", d, err)
	}
}

func TestPath(t *testing.T) {
	d := newTestDriver(t)
	for name, want := range map[string]string{"vm1": "/dev/vg0/vm1", "vm1@s1": "/dev/vg0/vm1+s1", "../x": "", "vm1@s@t": ""} {
		if got := d.Path(name); got != want {
			t.Errorf("Path(%q) = %q, want %q", name, got, want)
		}
	}
}

// TestList reads a VG where merges wait for their origins to close: the
// merging snapshots are hidden but listed, their origins are MergePending
// (classic vm1 by lv_merging and its O attribute, thin1 by the attribute
// alone), and the snapshot an admin made (untagged) and the LVs that are not
// lvnbd's are not listed.
func TestList(t *testing.T) {
	d := newTestDriver(t, lvsCall(t, "lvs-merging.json"))
	vols, err := d.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	at := func(s int) time.Time { return time.Date(2026, 11, 22, 3, 40, s, 0, time.UTC) }
	want := []volume.Volume{
		{Name: "lin", Size: 32 * mib, Stripes: 1, Path: "/dev/vg0/lin", ID: "XlQrvG-wkP9-3gNB-lvVj-c9br-LuZG-dtOQv4",
			Snapshots: []volume.Snapshot{
				{Volume: "lin", Name: "full", Size: 32 * mib, COWSize: 4 * mib, UsagePercent: 100, Invalid: true,
					Created: time.Date(2026, 11, 22, 3, 41, 0, 0, time.UTC), Path: "/dev/vg0/lin+full",
					ID: "zVHpzu-D5DY-u0aE-jOX4-Vw5K-uf4o-vaFcDw"},
			}},
		{Name: "thin1", Size: 64 * mib, Stripes: 1, Thin: true, Path: "/dev/vg0/thin1", MergePending: true,
			ID: "s7N5k0-DDya-FreY-PwL5-2cwU-RVIM-StxHId", Snapshots: []volume.Snapshot{
				{Volume: "thin1", Name: "t1", Size: 64 * mib, Thin: true, Merging: true, Created: at(57), Path: "/dev/vg0/thin1+t1",
					ID: "WD4dAX-yfC7-QRcB-JfvY-rfzX-JaQ6-W2G5Rd"},
			}},
		{Name: "vm1", Size: 128 * mib, Stripes: 2, StripeSize: 64 << 10, Path: "/dev/vg0/vm1", MergePending: true,
			ID: "N2rCXI-bdIi-0s83-f1kJ-NiKY-r36V-EsR2zC", Snapshots: []volume.Snapshot{
				{Volume: "vm1", Name: "s1", Size: 128 * mib, COWSize: 8 * mib, UsagePercent: 12.65, Merging: true, Created: at(58),
					Path: "/dev/vg0/vm1+s1", ID: "ILs76e-14Bz-nyqP-WMKN-n4jM-Itvp-1MsU52"},
				{Volume: "vm1", Name: "s2", Size: 128 * mib, COWSize: 8 * mib, UsagePercent: 12.65, Created: at(59),
					Path: "/dev/vg0/vm1+s2", ID: "wIE21K-Ngv2-t1I3-Kdq2-KvlI-sG05-PUA8gz"},
			}},
	}
	if diff := cmp.Diff(want, vols); diff != "" {
		t.Errorf("List (-want +got):\n%s", diff)
	}
}

// TestListGoesPastAnOddLV: an LV whose report has a field that does not
// parse is listed with its Problem when it is an lvnbd volume, and does not
// matter when it is not; every other volume is listed as ever.
func TestListGoesPastAnOddLV(t *testing.T) {
	odd := func(t *testing.T, lv, field, value string) call {
		c := lvsCall(t, "lvs.json")
		row := `{"lv_name":"` + lv + `", `
		at := strings.Index(c.Stdout, row)
		if at < 0 {
			t.Fatalf("no row of %s in lvs.json", lv)
		}
		end := at + strings.Index(c.Stdout[at:], "}")
		was := regexp.MustCompile(`"` + field + `":"[^"]*"`)
		c.Stdout = c.Stdout[:at] + was.ReplaceAllString(c.Stdout[at:end], `"`+field+`":"`+value+`"`) + c.Stdout[end:]
		return c
	}
	names := func(vols []volume.Volume) (out []string) {
		for _, v := range vols {
			out = append(out, v.Name)
			for _, s := range v.Snapshots {
				out = append(out, s.Ref())
			}
		}
		return out
	}
	all := []string{"lin", "lin@full", "thin1", "thin1@t1", "vm1", "vm1@s1", "vm1@s2"}
	ctx := context.Background()

	d := newTestDriver(t, odd(t, "manual", "snap_percent", "lots"))
	vols, err := d.List(ctx)
	if err != nil || !slices.Equal(names(vols), all) {
		t.Errorf("List with an admin's snapshot reported oddly = %v, %v; want %v", names(vols), err, all)
	}

	d = newTestDriver(t, odd(t, "vm1", "lv_size", "128.00m"), odd(t, "vm1", "lv_size", "128.00m"))
	vols, err = d.List(ctx)
	if err != nil || !slices.Equal(names(vols), all) {
		t.Fatalf("List with vm1 reported oddly = %v, %v; want %v", names(vols), err, all)
	}
	for _, v := range vols {
		if got := v.Problem != ""; got != (v.Name == "vm1") || v.Name == "vm1" && !strings.Contains(v.Problem, `lv_size "128.00m"`) {
			t.Errorf("volume %s: problem %q", v.Name, v.Problem)
		}
	}
	if _, err := d.Get(ctx, "vm1"); !errors.Is(err, volume.ErrUnreadable) || !strings.Contains(err.Error(), "lv_size") {
		t.Errorf("Get(vm1): %v, want ErrUnreadable naming lv_size", err)
	}

	d = newTestDriver(t, odd(t, "vm1+s1", "snap_percent", "lots"))
	vols, err = d.List(ctx)
	if err != nil || !slices.Equal(names(vols), all) {
		t.Fatalf("List with vm1@s1 reported oddly = %v, %v; want %v", names(vols), err, all)
	}
	for _, v := range vols {
		for _, s := range v.Snapshots {
			if got := s.Problem != ""; got != (s.Ref() == "vm1@s1") {
				t.Errorf("snapshot %s: problem %q", s.Ref(), s.Problem)
			}
		}
	}
}

func TestSnapshots(t *testing.T) {
	d := newTestDriver(t, lvsCall(t, "lvs.json"))
	snaps, err := d.Snapshots(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, s := range snaps {
		got = append(got, s.Ref())
	}
	if diff := cmp.Diff([]string{"lin@full", "thin1@t1", "vm1@s1", "vm1@s2"}, got); diff != "" {
		t.Errorf("Snapshots (-want +got):\n%s", diff)
	}
}

func TestErrorsBeforeAnyCommand(t *testing.T) {
	ctx := context.Background()
	long := &Driver{vg: strings.Repeat("v-", 20), run: newFakeRunner(t)}
	d := newTestDriver(t) // runs nothing: any call fails the test
	tests := []struct {
		name string
		err  error
		want error
	}{
		{"create bad name", func() error {
			_, err := d.Create(ctx, volume.CreateOptions{Name: "vm@1", Size: mib})
			return err
		}(), volume.ErrInvalidName},
		{"create dm name too long", func() error {
			_, err := long.Create(ctx, volume.CreateOptions{Name: strings.Repeat("a-", 30), Size: mib})
			return err
		}(), volume.ErrInvalidName},
		{"create no size", func() error {
			_, err := d.Create(ctx, volume.CreateOptions{Name: "vm1"})
			return err
		}(), volume.ErrInvalidSize},
		{"snapshot bad name", func() error {
			_, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "a b"})
			return err
		}(), volume.ErrInvalidName},
		{"snapshot negative COW", func() error {
			_, err := d.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s", COWSize: -1})
			return err
		}(), volume.ErrInvalidSize},
		{"resize to 0", func() error {
			_, err := d.Resize(ctx, "vm1", 0, true)
			return err
		}(), volume.ErrInvalidSize},
		{"remove bad name", d.Remove(ctx, "../x"), volume.ErrInvalidName},
		{"merge bad name", d.MergeSnapshot(ctx, "vm1", "-s"), volume.ErrInvalidName},
		{"remove snapshot bad name", d.RemoveSnapshot(ctx, "vm1", ""), volume.ErrInvalidName},
	}
	for _, tt := range tests {
		if !errors.Is(tt.err, tt.want) {
			t.Errorf("%s: %v, want %v", tt.name, tt.err, tt.want)
		}
	}
}

func TestCreateNoSpace(t *testing.T) {
	d := newTestDriver(t, lvsCall(t, "lvs-empty.json"), vgsCall(t, "vgs-full.json"))
	_, err := d.Create(context.Background(), volume.CreateOptions{Name: "vm1", Size: 5 * mib})
	if !errors.Is(err, volume.ErrNoSpace) || !strings.Contains(err.Error(), "vg0 has 0 B free, 8 MiB needed for vm1") {
		t.Errorf("Create in a full VG: %v", err)
	}
}

// TestCreatePassesLVMReason checks that lvm2's reason reaches the user when
// it refuses what the checks here let through.
func TestCreatePassesLVMReason(t *testing.T) {
	args := []string{"lvcreate", "--yes", "-W", "y", "-Z", "y", "-n", "vm9", "-L", "268435456b",
		"-i", "2", "-I", "128k", "--addtag", "lvnbd", "vg0"}
	reason := "  Insufficient suitable allocatable extents for logical volume vm9: 32 more required"
	d := newTestDriver(t, lvsCall(t, "lvs.json"), vgsCall(t, "vgs.json"), call{Args: args, Err: lvmError(args, reason)})
	_, err := d.Create(context.Background(), volume.CreateOptions{Name: "vm9", Size: 256 * mib, Stripes: 2, StripeSize: 128 << 10})
	if err == nil || !strings.HasPrefix(err.Error(), "creating volume vm9: running") || !strings.Contains(err.Error(), strings.TrimSpace(reason)) {
		t.Errorf("Create: %v, want lvm2's reason", err)
	}
}

func TestResizeGrowNoSpace(t *testing.T) {
	d := newTestDriver(t, lvsCall(t, "lvs-volumes.json"), vgsCall(t, "vgs-full.json"))
	_, err := d.Resize(context.Background(), "vm2", 40*mib, false)
	if !errors.Is(err, volume.ErrNoSpace) || !strings.Contains(err.Error(), "vg0 has 0 B free, 8 MiB needed to grow vm2 to 40 MiB") {
		t.Errorf("Resize: %v", err)
	}
}

func TestResizeThinNeedsNoFreeExtents(t *testing.T) {
	args := []string{"lvextend", "-L", "134217728b", "vg0/thin1"}
	d := newTestDriver(t, lvsCall(t, "lvs-end.json"), vgsCall(t, "vgs-full.json"),
		call{Args: args}, lvsCall(t, "lvs-end.json"))
	if _, err := d.Resize(context.Background(), "thin1", 128*mib, false); err != nil {
		t.Fatal(err)
	}
}

func TestResizeOriginRefused(t *testing.T) {
	d := newTestDriver(t, lvsCall(t, "lvs.json"), vgsCall(t, "vgs.json"))
	_, err := d.Resize(context.Background(), "lin", 40*mib, false)
	if err == nil || !strings.Contains(err.Error(), "merge or remove its snapshots first (lin@full, vg0/manual (not lvnbd's))") {
		t.Errorf("Resize of an origin: %v", err)
	}
}

// The server counts a shrink made behind lvnbd's back (lvreduce) once it
// sees it, only while the volume still has the ID it served.
func TestCountRollback(t *testing.T) {
	id := "hq8gg9-9iyh-kGL4-ARhw-cQ0h-Msl8-EfZ81I"
	d := newTestDriver(t, lvsCall(t, "lvs-volumes.json"),
		call{Args: []string{"lvchange", "--addtag", "lvnbd-rollbacks-1", "vg0/vm1"}})
	if counted, err := d.CountRollback(context.Background(), "vm1", id); err != nil || !counted {
		t.Fatalf("CountRollback = %v, %v; want counted", counted, err)
	}
	// Another ID (counted already, or made anew): no lvchange.
	d = newTestDriver(t, lvsCall(t, "lvs-volumes.json"))
	if counted, err := d.CountRollback(context.Background(), "vm1", id+"-r1"); err != nil || counted {
		t.Fatalf("CountRollback for another ID = %v, %v; want not counted", counted, err)
	}
	d = newTestDriver(t, lvsCall(t, "lvs-volumes.json"))
	if _, err := d.CountRollback(context.Background(), "nope", id); !errors.Is(err, volume.ErrNotFound) {
		t.Errorf("count for a missing volume: %v", err)
	}
}

func TestRemoveCountsSnapshotsNotLvnbds(t *testing.T) {
	d := newTestDriver(t, lvsCall(t, "lvs.json"))
	err := d.Remove(context.Background(), "lin")
	if !errors.Is(err, volume.ErrHasSnapshots) || !strings.Contains(err.Error(), "vg0/manual (not lvnbd's)") {
		t.Errorf("Remove(lin): %v, want ErrHasSnapshots naming vg0/manual", err)
	}
	// The same answer without removing anything, for the server to ask
	// before it disconnects the volume's clients.
	var rc volume.RemoveChecker = newTestDriver(t, lvsCall(t, "lvs.json"))
	if err := rc.CheckRemove(context.Background(), "lin"); !errors.Is(err, volume.ErrHasSnapshots) {
		t.Errorf("CheckRemove(lin): %v, want ErrHasSnapshots", err)
	}
	if err := newTestDriver(t, lvsCall(t, "lvs.json")).CheckRemove(context.Background(), "root"); err == nil {
		t.Error("CheckRemove(root), an LV not lvnbd's: nil")
	}
}

// A snapshot an admin made and tagged keeps its LV name, which is its name:
// listed as VOLUME@LV, and found by that to be removed.
func TestSnapshotTaggedByAnAdmin(t *testing.T) {
	tagged := strings.Replace(testdata(t, "lvs.json"), `"lv_name":"manual", "lv_uuid":"D3O3pI-fR12-0Fmc-aZca-fXTs-df5f-G6rqXE", "lv_size":"8388608", "lv_attr":"swi-I-s---", "lv_path":"/dev/vg0/manual", "lv_tags":""`,
		`"lv_name":"manual", "lv_uuid":"D3O3pI-fR12-0Fmc-aZca-fXTs-df5f-G6rqXE", "lv_size":"8388608", "lv_attr":"swi-I-s---", "lv_path":"/dev/vg0/manual", "lv_tags":"lvnbd"`, 1)
	if tagged == testdata(t, "lvs.json") {
		t.Fatal("the fixture no longer has the untagged snapshot manual")
	}
	lvs := call{Args: lvsArgs("vg0"), Stdout: tagged}
	d := newTestDriver(t, lvs, lvs, call{Args: []string{"lvremove", "--yes", "vg0/manual"}})
	snaps, err := d.Snapshots(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(snaps, func(s volume.Snapshot) bool { return s.Ref() == "lin@manual" }) {
		t.Fatalf("snapshots %+v: no lin@manual", snaps)
	}
	if err := d.RemoveSnapshot(context.Background(), "lin", "manual"); err != nil {
		t.Errorf("RemoveSnapshot(lin@manual): %v", err)
	}
}

// A resize of a classic snapshot's origin is refused before the shrink
// check: the server disconnects clients after a ShrinkError, to shrink,
// and must not for a resize that fails anyway.
func TestShrinkOfAnOriginRefusedFirst(t *testing.T) {
	d := newTestDriver(t, lvsCall(t, "lvs.json"), vgsCall(t, "vgs.json"))
	_, err := d.Resize(context.Background(), "lin", 8*mib, false)
	if errors.Is(err, volume.ErrShrink) || err == nil || !strings.Contains(err.Error(), "merge or remove its snapshots first") {
		t.Errorf("shrink of an origin without allowShrink: %v, want the snapshots named, not ErrShrink", err)
	}
}

func TestMergeAlreadyPending(t *testing.T) {
	for _, ref := range [][2]string{{"vm1", "s1"}, {"thin1", "t1"}} {
		d := newTestDriver(t, lvsCall(t, "lvs-merging.json"))
		err := d.MergeSnapshot(context.Background(), ref[0], ref[1])
		// The server stops exporting the volume: the message must not ask
		// the admin to.
		want := fmt.Sprintf("lvnbd serve does not export %s until the merge is done; close every other user of /dev/vg0/%s, then run lvchange --refresh vg0/%s",
			ref[0], ref[0], ref[0])
		if !errors.Is(err, volume.ErrMergePending) || !strings.Contains(err.Error(), want) {
			t.Errorf("MergeSnapshot(%s@%s): %v, want ErrMergePending saying %q", ref[0], ref[1], err, want)
		}
	}
}

func TestMergeInvalidRefused(t *testing.T) {
	d := newTestDriver(t, lvsCall(t, "lvs.json"))
	err := d.MergeSnapshot(context.Background(), "lin", "full")
	if err == nil || !strings.Contains(err.Error(), "snapshot lin@full is invalid") {
		t.Errorf("MergeSnapshot(lin@full): %v", err)
	}
}

func TestNotVolumes(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name, want string
	}{
		{"root", "adopt it with lvchange --addtag lvnbd vg0/root"},
		{"pool", "internal, pool or snapshot LV"},
		{"manual", "internal, pool or snapshot LV"},
		{"vm1+s2", ""}, // not a valid volume name at all
		{"nope", "not found in volume group vg0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.want == "" {
				_, err := newTestDriver(t).Get(ctx, tt.name)
				if !errors.Is(err, volume.ErrInvalidName) {
					t.Errorf("Get(%s): %v, want ErrInvalidName", tt.name, err)
				}
				return
			}
			_, err := newTestDriver(t, lvsCall(t, "lvs.json")).Get(ctx, tt.name)
			if !errors.Is(err, volume.ErrNotFound) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Get(%s): %v, want ErrNotFound saying %q", tt.name, err, tt.want)
			}
		})
	}
}

// stubFlush replaces flushDevices for the test: it records the devices
// flushed, and fails with err.
func stubFlush(t *testing.T, err error) *[][]string {
	t.Helper()
	var flushed [][]string
	old := flushDevices
	flushDevices = func(paths []string) error { flushed = append(flushed, paths); return err }
	t.Cleanup(func() { flushDevices = old })
	return &flushed
}

// The servers and crash epoch are tags on the VG: read, and changed in one
// vgchange that adds and removes tags, after which every PV's cache is
// flushed; a change to nothing runs none; what cannot be recorded is
// refused before any vgchange.
func TestUpdateRuns(t *testing.T) {
	ctx := context.Background()
	flushed := stubFlush(t, nil)
	tags := func(file string) call {
		return call{Args: vgTagsArgs("vg0"), Stdout: testdata(t, file)}
	}
	run1 := volume.Run{Boot: "0123456789abcdef0123456789abcdef", PID: 4242, PIDStart: 12345}
	run3 := volume.Run{Boot: "00000000000000000000000000000003", PID: 3, PIDStart: 3}
	d := newTestDriver(t,
		tags("vgs-tags-none.json"),
		call{Args: []string{"vgchange", "--addtag", "lvnbd-run-00000000000000000000000000000003-3-3", "vg0"}},
		tags("vgs-tags.json"),
		call{Args: []string{"vgchange", "--addtag", "lvnbd-epoch-44556677", "--addtag",
			"lvnbd-run-00000000000000000000000000000003-3-3", "--deltag", "lvnbd-epoch-00112233", "--deltag",
			"lvnbd-run-fedcba9876543210fedcba9876543210-77-999", "vg0"}},
		tags("vgs-tags.json"),
		tags("vgs-tags-odd.json"),
		call{Args: []string{"vgchange", "--deltag", "lvnbd-epoch-00112233", "--deltag", "lvnbd-epoch-44556677",
			"--deltag", "lvnbd-run-fedcba9876543210fedcba9876543210-77-999", "--deltag", "lvnbd-run-garbage", "vg0"},
			Err: "running vgchange: exit status 5"},
		tags("vgs-tags.json"),
	)
	update := func(f func(*volume.RunState) (bool, error)) error { return d.UpdateRuns(ctx, f) }
	if err := update(func(s *volume.RunState) (bool, error) {
		s.Runs = append(s.Runs, run3)
		return true, nil
	}); err != nil {
		t.Errorf("adding a run to an untagged VG: %v", err)
	}
	if err := update(func(s *volume.RunState) (bool, error) {
		s.Epoch = "44556677"
		s.Runs = []volume.Run{run1, run3}
		return true, nil
	}); err != nil {
		t.Errorf("a new epoch, a run added and one removed: %v", err)
	}
	if err := update(func(s *volume.RunState) (bool, error) { return true, nil }); err != nil {
		t.Errorf("a change to nothing: %v", err)
	}
	err := update(func(s *volume.RunState) (bool, error) {
		s.Epoch, s.Runs = "", []volume.Run{run1}
		return true, nil
	})
	if err == nil || !strings.Contains(err.Error(), "recording the servers and crash epoch on volume group vg0") {
		t.Errorf("an update whose vgchange failed: %v", err)
	}
	if err := update(func(s *volume.RunState) (bool, error) {
		s.Runs = append(s.Runs, volume.Run{Boot: "not hex", PID: 1})
		return true, nil
	}); err == nil {
		t.Error("UpdateRuns recorded a run that is not one")
	}
	pvs := []string{"/dev/ram0", "/dev/ram1", "/dev/ram2"}
	if diff := cmp.Diff([][]string{pvs, pvs}, *flushed); diff != "" {
		t.Errorf("PVs flushed after the two vgchanges that succeeded (-want +got):\n%s", diff)
	}
}

// UpdateRuns waits for another's turn (another server of the VG on this
// host) before it reads the tags, gives up when its context ends, and holds
// its turn until the tags are changed.
func TestUpdateRunsTakesTurns(t *testing.T) {
	d := newTestDriver(t) // no lvm command may run while the lock is held
	unlock, err := flock.Lock(context.Background(), filepath.Join(d.lockDir, "lvm-vg0.runs.lock"), unix.LOCK_EX)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err = d.UpdateRuns(ctx, func(*volume.RunState) (bool, error) { return true, nil })
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "volume group vg0") {
		t.Errorf("UpdateRuns while another holds the lock: %v, want DeadlineExceeded naming vg0", err)
	}
	unlock()
	dir := d.lockDir
	// Held from the read until the change is durable: tried while f runs,
	// and while the PVs are flushed after the vgchange.
	d = newTestDriver(t, call{Args: vgTagsArgs("vg0"), Stdout: testdata(t, "vgs-tags-none.json")},
		call{Args: []string{"vgchange", "--addtag", "lvnbd-epoch-00000001", "vg0"}})
	d.lockDir = dir
	var tried []error
	try := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		unlock, err := flock.Lock(ctx, filepath.Join(dir, "lvm-vg0.runs.lock"), unix.LOCK_EX)
		if err == nil {
			unlock()
		}
		tried = append(tried, err)
	}
	old := flushDevices
	flushDevices = func([]string) error { try(); return nil }
	t.Cleanup(func() { flushDevices = old })
	if err := d.UpdateRuns(context.Background(), func(s *volume.RunState) (bool, error) {
		try()
		s.Epoch = "00000001"
		return true, nil
	}); err != nil {
		t.Errorf("UpdateRuns once released: %v", err)
	}
	if len(tried) != 2 {
		t.Fatalf("lock tried %d times, want 2 (in f, at the flush)", len(tried))
	}
	for i, err := range tried {
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("locking while UpdateRuns runs (%d): %v, want DeadlineExceeded", i, err)
		}
	}
}

// A record whose PVs cannot be flushed may not survive a power loss: the
// update fails. SyncAll writes back and flushes every PV.
func TestUpdateRunsFlush(t *testing.T) {
	ctx := context.Background()
	tags := call{Args: vgTagsArgs("vg0"), Stdout: testdata(t, "vgs-tags-none.json")}
	d := newTestDriver(t, tags,
		call{Args: []string{"vgchange", "--addtag", "lvnbd-run-00000000000000000000000000000003-3-3", "vg0"}},
		tags)
	flushed := stubFlush(t, errors.New("flushing PV /dev/ram1: input/output error"))
	err := d.UpdateRuns(ctx, func(s *volume.RunState) (bool, error) {
		s.Runs = []volume.Run{{Boot: "00000000000000000000000000000003", PID: 3, PIDStart: 3}}
		return true, nil
	})
	if err == nil || !strings.Contains(err.Error(), "/dev/ram1") {
		t.Errorf("UpdateRuns whose flush failed: %v", err)
	}
	if err := d.SyncAll(ctx); err == nil || len(*flushed) != 2 {
		t.Errorf("SyncAll: %v, after %d flushes; want the flush's error, 2 flushes", err, len(*flushed))
	}
}
