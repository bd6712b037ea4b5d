package guest

import (
	"strings"
	"testing"
	"testing/fstest"

	"github.com/google/go-cmp/cmp"
)

func TestStatus(t *testing.T) {
	const mib = 1 << 20
	legs := func(s0, s1 []string, slot0 int) []MemberStatus {
		return []MemberStatus{
			{Device: "/dev/nbd0", Slot: slot0, State: s0, Size: 63 * mib},
			{Device: "/dev/nbd1", Slot: 1, State: s1, Size: 63 * mib},
		}
	}
	inSync := []string{"in_sync", "failfast"}
	tests := []struct {
		sysfs, mdstat string
		want          ArrayStatus
	}{
		{"sysfs-healthy.txt", "mdstat-healthy.txt", ArrayStatus{Name: "vm1", Path: "/dev/md/vm1", Device: "/dev/md126",
			UUID: "a1eb0886:605cc9af:beadbfc9:43ae6784", Level: "raid1", Health: "healthy", State: "clean", RaidDisks: 2,
			Size: 63 * mib, ComponentSize: 63 * mib, Bitmap: "internal", Members: legs(inSync, inSync, 0)}},
		{"sysfs-faulty.txt", "mdstat-faulty.txt", ArrayStatus{Name: "vm1", Path: "/dev/md/vm1", Device: "/dev/md127",
			UUID: "e4264e04:4d189632:3ebccc7b:b2168f02", Level: "raid1", Health: "degraded", State: "clean", RaidDisks: 2,
			Degraded: 1, Size: 63 * mib, ComponentSize: 63 * mib, Bitmap: "internal",
			Members: []MemberStatus{
				{Device: "/dev/nbd1", Slot: 1, State: inSync, Size: 63 * mib},
				{Device: "/dev/nbd0", Slot: -1, State: []string{"faulty", "failfast"}, Size: 63 * mib},
			}}},
		{"sysfs-recovery.txt", "mdstat-recovery.txt", ArrayStatus{Name: "vm1", Path: "/dev/md/vm1", Device: "/dev/md126",
			UUID: "908d17dc:29ae5902:a80ed8b8:89065a51", Level: "raid1", Health: "recovering", State: "clean", RaidDisks: 2,
			Degraded: 1, Size: 63 * mib, ComponentSize: 63 * mib, Bitmap: "internal",
			Sync:    &SyncStatus{Action: "recover", Total: 63 * mib, Finish: "1.3min", Speed: "768K/sec"},
			Members: legs([]string{"spare", "failfast"}, inSync, 0)}},
	}
	for _, tt := range tests {
		t.Run(tt.sysfs, func(t *testing.T) {
			h, fsys, _, _, _ := testHost(t)
			name := sysfsDump(t, fsys, tt.sysfs)
			fsys["proc/mdstat"] = &fstest.MapFile{Data: readTestdata(t, tt.mdstat)}
			symlink(fsys, "/dev/md/vm1", "/dev/"+name)
			got, err := h.status()
			if err != nil {
				t.Fatal(err)
			}
			if tt.want.State == "clean" && len(got) == 1 {
				tt.want.State = got[0].State // array_state: clean or active, as it was
			}
			if diff := cmp.Diff([]ArrayStatus{tt.want}, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

// The resync after a grow: progress from sysfs, estimates from mdstat.
func TestStatusProgress(t *testing.T) {
	h, fsys, _, _, _ := testHost(t)
	sysfsDump(t, fsys, "sysfs-grow.txt")
	fsys["proc/mdstat"] = &fstest.MapFile{Data: readTestdata(t, "mdstat-grow.txt")}
	got, err := h.status()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 {
		t.Fatalf("%d arrays", len(got))
	}
	want := &SyncStatus{Action: "resync", Done: 129024 * 512, Total: 260096 * 512, Percent: 49.6, Finish: "68.2min", Speed: "0K/sec"}
	if diff := cmp.Diff(want, got[0].Sync); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if got[0].Health != "resyncing" || got[0].Path != "/dev/md127" || got[0].Name != "md127" {
		t.Errorf("unnamed array: %+v", got[0])
	}
}

func TestStatusNoArrays(t *testing.T) {
	h, fsys, _, _, _ := testHost(t)
	if _, err := h.status(); err == nil {
		t.Error("no error without /proc/mdstat")
	}
	fsys["proc/mdstat"] = &fstest.MapFile{Data: []byte("Personalities : \nunused devices: <none>\n")}
	got, err := h.status()
	if err != nil || len(got) != 0 {
		t.Errorf("got %v, %v", got, err)
	}
}

// mdstatBeforeHealthy is /proc/mdstat as captured with the healthy array
// (mdstat-healthy.txt), with personalities and another array's stanza
// before it.
func mdstatBeforeHealthy(t *testing.T, personalities, stanza string) *fstest.MapFile {
	t.Helper()
	healthy, ok := strings.CutPrefix(string(readTestdata(t, "mdstat-healthy.txt")), "Personalities : [raid1] \n")
	if !ok {
		t.Fatal("mdstat-healthy.txt does not start with its personalities line")
	}
	return &fstest.MapFile{Data: []byte("Personalities : " + personalities + "\n" + stanza + "\n" + healthy)}
}

// An array stopped between the read of /proc/mdstat and the read of its
// sysfs is left out; the others are still reported.
func TestStatusSkipsAnArrayStoppedMeanwhile(t *testing.T) {
	h, fsys, _, _, _ := testHost(t)
	sysfsDump(t, fsys, "sysfs-healthy.txt")
	fsys["proc/mdstat"] = mdstatBeforeHealthy(t, "[raid1] ",
		"md125 : active raid1 nbd3[1] nbd2[0]\n      64512 blocks super 1.2 [2/2] [UU]\n")
	got, err := h.status()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Device != "/dev/md126" {
		t.Errorf("got %+v, want md126 alone", got)
	}
}

// An array whose sysfs cannot be read (here a reshaping RAID5's raid_disks)
// is reported as unknown, with why; the others as usual.
func TestStatusReportsAnArrayItCannotRead(t *testing.T) {
	h, fsys, _, _, _ := testHost(t)
	sysfsDump(t, fsys, "sysfs-healthy.txt")
	fsys["sys/block/md125/md/level"] = &fstest.MapFile{Data: []byte("raid5\n")}
	fsys["sys/block/md125/md/raid_disks"] = &fstest.MapFile{Data: []byte("4 (3)\n")}
	fsys["proc/mdstat"] = mdstatBeforeHealthy(t, "[raid1] [raid5]",
		"md125 : active raid5 sdd[3] sdc[2] sdb[1] sda[0]\n      64512 blocks super 1.2 level 5, 512k chunk [4/4] [UUUU]\n")
	got, err := h.status()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Device != "/dev/md125" || got[1].Device != "/dev/md126" {
		t.Fatalf("got %+v, want md125 and md126", got)
	}
	if got[0].Health != "unknown" || got[0].Problem == "" || got[0].Level != "raid5" {
		t.Errorf("md125: %+v, want health unknown, level raid5 and the problem", got[0])
	}
	if got[1].Health != "healthy" {
		t.Errorf("md126: health %q, want healthy", got[1].Health)
	}
}

// md calls an array broken when it lost a member it cannot run without: its
// writes fail, whatever the members in sync say.
func TestHealthBroken(t *testing.T) {
	active := MdstatArray{Active: true}
	if got := health(Array{State: "broken"}, active, 1); got != "failed" {
		t.Errorf("health of a broken array with a member in sync = %q, want failed", got)
	}
	if got := health(Array{State: "clean"}, active, 1); got != "healthy" {
		t.Errorf("health of a clean array = %q, want healthy", got)
	}
}

// An array whose legs may differ while no resync runs is not healthy: md
// starts none in a read-auto array until its first write (after an unclean
// shutdown mdstat says resync=PENDING), nor while sync_action is frozen;
// md/resync_start tells, where sync_action says idle or frozen.
func TestStatusResyncPending(t *testing.T) {
	for _, tc := range []struct{ name, state, action, start, mdline, extra, want string }{
		{"read-auto after an unclean shutdown", "read-auto", "idle", "2048", "md126 : active (auto-read-only) raid1 nbd1[1] nbd0[0]",
			"      \tresync=PENDING\n", "resync-pending"},
		{"frozen", "clean", "frozen", "2048", "md126 : active raid1 nbd1[1] nbd0[0]", "", "resync-pending"},
		{"in sync", "clean", "idle", "none", "md126 : active raid1 nbd1[1] nbd0[0]", "", "healthy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, fsys, _, _, _ := testHost(t)
			name := sysfsDump(t, fsys, "sysfs-healthy.txt")
			fsys["sys/block/"+name+"/md/array_state"] = &fstest.MapFile{Data: []byte(tc.state + "\n")}
			fsys["sys/block/"+name+"/md/sync_action"] = &fstest.MapFile{Data: []byte(tc.action + "\n")}
			fsys["sys/block/"+name+"/md/resync_start"] = &fstest.MapFile{Data: []byte(tc.start + "\n")}
			fsys["proc/mdstat"] = &fstest.MapFile{Data: []byte("Personalities : [raid1] \n" + tc.mdline + "\n" +
				"      64512 blocks super 1.2 [2/2] [UU]\n" + tc.extra +
				"      bitmap: 1/1 pages [4KB], 1024KB chunk\n\nunused devices: <none>\n")}
			got, err := h.status()
			if err != nil {
				t.Fatal(err)
			}
			if got[0].Health != tc.want {
				t.Errorf("health %q, want %q", got[0].Health, tc.want)
			}
		})
	}
}

// A leg md lists as faulty only for bad blocks it has not recorded yet is in
// sync: the array is degraded by its failed leg, not failed.
func TestStatusOfALegWithPendingBadBlocks(t *testing.T) {
	a := Array{Name: "md127", Level: "raid1", State: "active", RaidDisks: 2, Degraded: 1, SyncAction: "idle",
		Members: []Member{
			{Device: "nbd0", Slot: -1, State: DevState{"faulty", "failfast"}},
			{Device: "nbd1", Slot: 1, State: DevState{"faulty", "in_sync", "blocked", "failfast"}},
		}}
	if got := arrayStatus(a, MdstatArray{Active: true}, "").Health; got != "degraded" {
		t.Errorf("health %q, want degraded", got)
	}
}
