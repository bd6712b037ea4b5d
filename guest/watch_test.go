package guest

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// watchEnv is a watcher over fakes, its sysfs loaded from a capture, both
// legs (nbd0, nbd1) 64 MiB block devices that answer reads.
type watchEnv struct {
	t     *testing.T
	w     *Watcher
	fsys  fstest.MapFS
	run   *fakeRunner
	probe *fakeProber
	clock *fakeClock
	logs  *observer.ObservedLogs
	md    string // kernel name of the captured array
}

func newWatchEnv(t *testing.T, capture string, cfg WatchConfig) *watchEnv {
	h, fsys, r, p, c := testHost(t)
	e := &watchEnv{t: t, fsys: fsys, run: r, probe: p, clock: c}
	e.load(capture)
	blockDev(fsys, "nbd0", 64<<20, "43:0")
	blockDev(fsys, "nbd1", 64<<20, "43:32")
	p.set("/dev/nbd0", probeReadable)
	p.set("/dev/nbd1", probeReadable)
	core, logs := observer.New(zap.DebugLevel)
	e.logs = logs
	cfg.Log = zap.New(core)
	if cfg.Arrays == nil {
		cfg.Arrays = []string{"/dev/" + e.md}
	}
	e.w = newWatcher(h, &cfg)
	return e
}

// load replaces the array's sysfs with another capture of it.
func (e *watchEnv) load(capture string) {
	e.t.Helper()
	for k := range e.fsys {
		if strings.HasPrefix(k, "sys/block/") || strings.HasPrefix(k, "sys/class/block/md") {
			delete(e.fsys, k)
		}
	}
	e.md = sysfsDump(e.t, e.fsys, capture)
}

// setMD writes one attribute of the array's md directory in sysfs.
func (e *watchEnv) setMD(attr, value string) { e.setMDOf(e.md, attr, value) }

// setMDOf writes one attribute of array's md directory in sysfs.
func (e *watchEnv) setMDOf(array, attr, value string) {
	e.fsys["sys/block/"+array+"/md/"+attr] = &fstest.MapFile{Data: []byte(value + "\n")}
}

func (e *watchEnv) step() {
	e.t.Helper()
	e.w.Step(context.Background())
	e.run.done()
}

// logged counts the log entries with msg.
func (e *watchEnv) logged(msg string) int { return e.logs.FilterMessage(msg).Len() }

func (e *watchEnv) wantLogged(msg string, n int) {
	e.t.Helper()
	if got := e.logged(msg); got != n {
		e.t.Errorf("%q logged %d times, want %d; log:\n%s", msg, got, n, e.dump())
	}
}

func (e *watchEnv) dump() string {
	var s string
	for _, l := range e.logs.All() {
		s += l.Level.String() + " " + l.Message + "\n"
	}
	return s
}

func mdadm(args ...string) []string { return append([]string{"mdadm"}, args...) }

// Legs of the captured failover (scenario 26): its stale leg A, and leg A
// of scenario 25's array, which is another array.
func staleLeg(t *testing.T) call {
	return call{args: mdadm("--examine", "--export", "/dev/nbd0"), stdout: string(readTestdata(t, "examine-export-stale.txt"))}
}

// staleView is the stale leg's own view of the array: both legs active,
// as it was when md failed it.
func staleView(t *testing.T) call {
	return call{args: mdadm("--examine", "/dev/nbd0"), stdout: string(readTestdata(t, "examine-stale.txt"))}
}

func otherArraysLeg(t *testing.T) call {
	return call{args: mdadm("--examine", "--export", "/dev/nbd0"), stdout: string(readTestdata(t, "examine-export-member.txt"))}
}

func TestWatchHealthy(t *testing.T) {
	e := newWatchEnv(t, "sysfs-healthy.txt", WatchConfig{})
	e.step()
	e.step()
	e.wantLogged("watching", 1)
	e.wantLogged("all legs in sync", 1)
	if len(e.probe.probed) != 0 {
		t.Errorf("probed %v on a healthy array", e.probe.probed)
	}
}

func TestWatchWaitsForDeadLeg(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
	e.probe.set("/dev/nbd0", probeUnreadable)
	for range 3 {
		e.step() // no command while the leg does not answer
	}
	e.wantLogged("degraded", 1)
	e.wantLogged("leg does not answer reads; waiting for it", 1)
	if len(e.probe.probed) != 3 {
		t.Errorf("probed %v, want the dead leg once per look", e.probe.probed)
	}
	e.probe.set("/dev/nbd0", probePending) // a probe still in flight
	e.step()
}

func TestWatchReaddsFaultyLeg(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
	e.run.expect(staleLeg(t), staleView(t),
		call{args: mdadm("--manage", "/dev/md127", "--remove", "/dev/nbd0")},
		call{args: mdadm("--manage", "/dev/md127", "--re-add", "--failfast", "/dev/nbd0")})
	e.step()
	e.wantLogged("removed the failed leg", 1)
	e.wantLogged("re-added the leg: md resyncs the chunks its bitmap marked", 1)
}

// md's state file says faulty also for a leg in sync with bad blocks it has
// not recorded yet: that leg is no failed one, and is the source the failed
// leg is re-added from.
func TestWatchTakesALegWithPendingBadBlocksForInSync(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
	e.setMD("dev-nbd1/state", "faulty,in_sync,blocked,failfast")
	e.run.expect(staleLeg(t), staleView(t),
		call{args: mdadm("--manage", "/dev/md127", "--remove", "/dev/nbd0")},
		call{args: mdadm("--manage", "/dev/md127", "--re-add", "--failfast", "/dev/nbd0")})
	e.step()
	e.wantLogged("a leg in sync has bad blocks md has not recorded yet (md/dev-nbd1/unacknowledged_bad_blocks); it keeps using the leg", 1)
	e.wantLogged("re-added the leg: md resyncs the chunks its bitmap marked", 1)
	e.wantLogged("no leg in sync: nothing to resync from; not touching it", 0)
	if got := e.probe.probed; !slices.Contains(got, "/dev/nbd1") {
		t.Errorf("probed %v: the source was not checked", got)
	}
}

// The source leg dies while the returning leg's superblock is read (seconds,
// over the network): nothing is removed or re-added, since md would start a
// recovery from a leg that fails its reads and leave the returning one half
// rewritten.
func TestWatchChecksTheSourceAgainBeforeChangingMembers(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
	view := staleView(t)
	view.then = func() { e.probe.set("/dev/nbd1", probeUnreadable) }
	e.run.expect(staleLeg(t), view)
	e.step()
	e.wantLogged("no in-sync leg answers reads: not changing the array's members", 1)
	e.wantLogged("removed the failed leg", 0)
}

// The array changes while the returning leg's superblock is read (which
// can take minutes when the leg dies under mdadm --examine and comes back):
// the leg was checked against what the array was, so its members are left
// as they are.
func TestWatchChecksTheArrayAgainBeforeChangingMembers(t *testing.T) {
	const not = ": not changing the array's members"
	// renameLeg moves leg from's md entry to leg to's, or deletes it.
	renameLeg := func(e *watchEnv, from, to string) {
		for k, f := range maps.Clone(e.fsys) {
			if rest, ok := strings.CutPrefix(k, "sys/block/md127/md/dev-"+from+"/"); ok {
				delete(e.fsys, k)
				if to != "" {
					e.fsys["sys/block/md127/md/dev-"+to+"/"+rest] = f
				}
			}
		}
	}
	tests := []struct {
		name   string
		change func(e *watchEnv)
		noUUID bool // no md/uuid: mdadm --detail names the array
		want   string
	}{
		{name: "another array under the name", change: func(e *watchEnv) { e.setMD("uuid", "68d1dea1-1ba1-ea1b-bda5-d2a8ece3d6b6") },
			want: "the array was stopped and another assembled under its name meanwhile (UUID 68d1dea1:1ba1ea1b:bda5d2a8:ece3d6b6, " +
				"was e4264e04:4d189632:3ebccc7b:b2168f02)" + not},
		{name: "another array under the name, no md/uuid", noUUID: true,
			want: "the array was stopped and another assembled under its name meanwhile (UUID 68d1dea1:1ba1ea1b:bda5d2a8:ece3d6b6, " +
				"was e4264e04:4d189632:3ebccc7b:b2168f02)" + not},
		{name: "forgotten as stopped", change: func(e *watchEnv) { e.w.forget("md127") },
			want: "the array was stopped meanwhile" + not},
		{name: "the leg added back by hand", change: func(e *watchEnv) { e.setMD("dev-nbd0/state", "in_sync,failfast") },
			want: "the leg is a working member of the array again (added meanwhile, by hand?)" + not},
		{name: "the leg recovering", change: func(e *watchEnv) { e.setMD("dev-nbd0/state", "spare,failfast") },
			want: "the leg is a working member of the array again (added meanwhile, by hand?)" + not},
		{name: "the leg removed by hand", change: func(e *watchEnv) { renameLeg(e, "nbd0", "") },
			want: "the leg was added to or removed from the array meanwhile" + not},
		{name: "whole again", change: func(e *watchEnv) { e.setMD("degraded", "0") },
			want: "the array is whole again (a leg was added meanwhile)" + not},
		{name: "in sync from another leg", change: func(e *watchEnv) { renameLeg(e, "nbd1", "nbd5") },
			want: "the array's legs in sync are others than when the leg was looked at" + not},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
			if tt.noUUID {
				delete(e.fsys, "sys/block/md127/md/uuid")
				detail := call{args: mdadm("--detail", "--export", "/dev/md127"), stdout: string(readTestdata(t, "detail-export-faulty.txt"))}
				other := detail
				other.stdout = strings.Replace(detail.stdout, "MD_UUID=e4264e04:4d189632:3ebccc7b:b2168f02",
					"MD_UUID=68d1dea1:1ba1ea1b:bda5d2a8:ece3d6b6", 1)
				if other.stdout == detail.stdout {
					t.Fatal("the capture names no MD_UUID to change")
				}
				e.run.expect(detail, staleLeg(t), staleView(t), other)
			} else {
				view := staleView(t)
				view.then = func() { tt.change(e) }
				e.run.expect(staleLeg(t), view)
			}
			e.step()
			e.wantLogged(tt.want, 1)
			e.wantLogged("removed the failed leg", 0)
		})
	}
}

// A watcher stopped while a look reads the returning leg changes no member
// after that read.
func TestWatchStoppedMidLookChangesNoMember(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
	ctx, cancel := context.WithCancel(context.Background())
	view := staleView(t)
	view.then = cancel
	e.run.expect(staleLeg(t), view)
	e.w.Step(ctx)
	if l := e.w.busy["md127"]; l != nil {
		receive(t, l.done, "end of the look") // Step returned on the cancel: the look ends on its own
	}
	e.wantLogged("removed the failed leg", 0)
}

// md no longer lists leg A (removed while away): the watcher remembers it.
func TestWatchReaddsRemovedLeg(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
	e.probe.set("/dev/nbd0", probeUnreadable)
	e.step()
	e.load("sysfs-removed.txt")
	e.step() // still dead
	e.probe.set("/dev/nbd0", probeReadable)
	e.run.expect(staleLeg(t), staleView(t), call{args: mdadm("--manage", "/dev/md127", "--re-add", "--failfast", "/dev/nbd0")})
	e.step()
	e.wantLogged("re-added the leg: md resyncs the chunks its bitmap marked", 1)
}

// A leg the array became whole without (replaced by another disk) is
// forgotten: a disk that takes its name later is not pulled into the array
// the next time it degrades.
func TestWatchForgetsALegTheArrayIsWholeWithout(t *testing.T) {
	e := newWatchEnv(t, "sysfs-healthy.txt", WatchConfig{})
	e.step() // knows nbd0 and nbd1
	mem := e.w.arrays[e.md]
	mem.legs["nbd5"] = &legMemory{} // a leg it had before it was whole
	e.step()
	if _, ok := mem.legs["nbd5"]; ok {
		t.Errorf("a leg the whole array no longer lists is still remembered")
	}
	if len(mem.legs) != 2 || mem.legs["nbd0"] == nil || mem.legs["nbd1"] == nil {
		t.Errorf("legs remembered: %v, want nbd0 and nbd1", mem.legs)
	}
}

// An array stopped and assembled again starts from nothing, as after a
// reboot: perhaps an admin assembled it from the stale leg, and the leg it
// lacks now holds the newer data. It is not added back.
func TestWatchForgetsAStoppedArray(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
	e.probe.set("/dev/nbd0", probeUnreadable)
	e.step() // knows nbd0 and nbd1
	for k := range e.fsys {
		if strings.HasPrefix(k, "sys/block/md") || strings.HasPrefix(k, "sys/class/block/md") {
			delete(e.fsys, k) // mdadm --stop
		}
	}
	e.step()
	e.wantLogged("array gone: forgetting its legs", 1)
	e.load("sysfs-removed.txt") // assembled again, without nbd0
	e.probe.set("/dev/nbd0", probeReadable)
	e.probe.probed = nil
	e.step()
	e.step()
	if len(e.probe.probed) != 0 {
		t.Errorf("probed %v: the forgotten leg was looked at", e.probe.probed)
	}
}

// An array stopped and assembled again from the other leg between two
// looks: none of the legs in sync before is now. It is not the array known,
// and the leg it lacks (perhaps with the newer data) is not added back.
func TestWatchForgetsAnArrayAssembledFromTheOtherLeg(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
	e.probe.set("/dev/nbd0", probeUnreadable)
	e.step() // nbd1 in sync, nbd0 faulty
	// Assembled from nbd0 alone: sysfs-removed.txt with nbd1 as nbd0.
	e.load("sysfs-removed.txt")
	for k, f := range e.fsys {
		if strings.HasPrefix(k, "sys/block/"+e.md+"/") && strings.Contains(k, "nbd1") {
			delete(e.fsys, k)
			e.fsys[strings.ReplaceAll(k, "nbd1", "nbd0")] = f
		}
	}
	e.fsys["sys/block/"+e.md+"/md/dev-nbd0/slot"] = &fstest.MapFile{Data: []byte("0\n")}
	e.probe.set("/dev/nbd0", probeReadable)
	e.probe.probed = nil
	e.step()
	e.wantLogged("the array's legs in sync are all others than at the last look: assembled again from another leg? Forgetting its legs; add the one it lacks by hand once you know which holds the newest data", 1)
	e.step()
	if len(e.probe.probed) != 0 {
		t.Errorf("probed %v: the leg the array lacks was looked at", e.probe.probed)
	}
}

// A /dev/md/NAME link that is gone for a moment (udev rebuilding it) while
// md still runs the array is no stopped array: its legs are kept.
func TestWatchKeepsAnArrayWhoseLinkIsRebuilt(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{Arrays: []string{"/dev/md/data"}})
	symlink(e.fsys, "/dev/md/data", "/dev/"+e.md)
	e.probe.set("/dev/nbd0", probeUnreadable)
	e.step() // knows nbd0 and nbd1
	delete(e.fsys, "dev/md/data")
	e.step()
	e.wantLogged("array gone: forgetting its legs", 0)
	symlink(e.fsys, "/dev/md/data", "/dev/"+e.md)
	e.load("sysfs-removed.txt")
	e.probe.set("/dev/nbd0", probeReadable)
	e.run.expect(staleLeg(t), staleView(t), call{args: mdadm("--manage", "/dev/md127", "--re-add", "--failfast", "/dev/nbd0")})
	e.step()
	e.wantLogged("re-added the leg: md resyncs the chunks its bitmap marked", 1)
}

// A watcher started after the leg was removed does not know it.
func TestWatchDoesNotGuessLegs(t *testing.T) {
	e := newWatchEnv(t, "sysfs-removed.txt", WatchConfig{})
	e.step()
	e.wantLogged("degraded", 1)
	if len(e.probe.probed) != 0 {
		t.Errorf("probed %v", e.probe.probed)
	}
}

func TestWatchReaddRefused(t *testing.T) {
	readd := mdadm("--manage", "/dev/md127", "--re-add", "--failfast", "/dev/nbd0")
	add := mdadm("--manage", "/dev/md127", "--add-spare", "--failfast", "/dev/nbd0")
	t.Run("add", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
		e.probe.set("/dev/nbd0", probeUnreadable)
		e.step() // remembers nbd0
		e.load("sysfs-removed.txt")
		e.probe.set("/dev/nbd0", probeReadable)
		e.run.expect(staleLeg(t), staleView(t),
			call{args: readd, err: cmdError(readd, 1, "mdadm: --re-add for /dev/nbd0 to /dev/md127 is not possible")},
			call{args: add})
		e.step()
		e.wantLogged("re-add refused; adding the leg as a spare: a full resync follows", 1)
		e.wantLogged("added the leg: full resync started", 1)
	})
	// The refused re-add took seconds: the source is asked again.
	t.Run("source died meanwhile", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
		e.run.expect(staleLeg(t), staleView(t),
			call{args: mdadm("--manage", "/dev/md127", "--remove", "/dev/nbd0")},
			call{args: readd, err: cmdError(readd, 1, "mdadm: --re-add for /dev/nbd0 to /dev/md127 is not possible"),
				then: func() { e.probe.set("/dev/nbd1", probeUnreadable) }}) // and no --add-spare
		e.step()
		e.wantLogged("no in-sync leg answers reads: not adding the leg", 1)
	})
}

// md lists a spare (or a leg being recovered) with bad blocks it has not
// recorded yet as faulty,spare: no failed leg to remove.
func TestWatchLeavesASpareWithPendingBadBlocks(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
	e.setMD("dev-nbd0/state", "faulty,blocked,spare,failfast")
	e.step() // the fake runner fails the test on any command
	e.wantLogged("removed the failed leg", 0)
}

// md never fails the last leg of a RAID1: with both storage boxes dead, leg
// B (nbd1) still shows in_sync. When leg A returns, nothing is done to it
// until B answers a direct read, for A may be the only copy left.
func TestWatchWaitsForAReadableSource(t *testing.T) {
	tests := []struct {
		name   string
		source probeResult
	}{
		{"source unreadable", probeUnreadable},
		{"source probe unanswered", probePending},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
			e.probe.set("/dev/nbd1", tt.source)
			e.step() // the fake runner fails the test on any command
			e.step()
			e.wantLogged(noSource, 1)
			if got := strings.Count(strings.Join(e.probe.probed, " "), "/dev/nbd1"); got != 2 {
				t.Errorf("probed %v, want the in-sync leg probed once per look", e.probe.probed)
			}
			e.probe.set("/dev/nbd1", probeReadable)
			e.run.expect(staleLeg(t), staleView(t),
				call{args: mdadm("--manage", "/dev/md127", "--remove", "/dev/nbd0")},
				call{args: mdadm("--manage", "/dev/md127", "--re-add", "--failfast", "/dev/nbd0")})
			e.step()
			e.wantLogged("re-added the leg: md resyncs the chunks its bitmap marked", 1)
		})
	}
}

const noSource = "no in-sync leg answers reads (both storage boxes down?): nothing to resync from; " +
	"waiting for one before touching the returning leg"

// An array md calls broken, a read-only one or one not running is not
// touched.
func TestWatchLeavesUnchangeableArraysAlone(t *testing.T) {
	tests := []struct{ state, why string }{
		{"broken", "md lost a member it cannot run without"},
		{"readonly", "read-only, so md would not recover it"},
		{"read-auto", "read-only, so md would not recover it"},
		{"inactive", "not running (being assembled, or stopped)"},
		{"clear", "not running (being assembled, or stopped)"},
	}
	for _, tt := range tests {
		t.Run(tt.state, func(t *testing.T) {
			e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
			e.fsys["sys/block/md127/md/array_state"] = &fstest.MapFile{Data: []byte(tt.state + "\n")}
			e.step()
			e.wantLogged("the array is "+tt.state+": "+tt.why+"; not touching it", 1)
			if len(e.probe.probed) != 0 {
				t.Errorf("probed %v", e.probe.probed)
			}
		})
	}
}

// The watcher never clears a leg's superblock: when mdadm refuses to take
// the stale leg as a spare, for whatever reason (old mdadm's refusal to turn
// an active member into a spare included), it backs off and says why.
func TestWatchNeverZeroesALeg(t *testing.T) {
	readd := mdadm("--manage", "/dev/md127", "--re-add", "--failfast", "/dev/nbd0")
	add := mdadm("--manage", "/dev/md127", "--add-spare", "--failfast", "/dev/nbd0")
	for name, stderr := range map[string]string{
		"too small": "mdadm: /dev/nbd0 not large enough to join array",
		"array failed": "mdadm: /dev/md127 has failed so using --add cannot work and might destroy\n" +
			"mdadm: data on /dev/nbd0.  You should stop the array and re-assemble it.",
		"refused as spare": "mdadm: /dev/nbd0 reports being an active member for /dev/md127, but a --re-add fails.\n" +
			"mdadm: not performing --add as that would convert /dev/nbd0 in to a spare.\n" +
			"mdadm: To make this a spare, use \"mdadm --zero-superblock /dev/nbd0\" first.",
		"mdadm older than 3.3": "mdadm: unrecognized option '--add-spare'",
	} {
		t.Run(name, func(t *testing.T) {
			e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
			e.run.expect(staleLeg(t), staleView(t),
				call{args: mdadm("--manage", "/dev/md127", "--remove", "/dev/nbd0")},
				call{args: readd, err: cmdError(readd, 1, "mdadm: --re-add for /dev/nbd0 to /dev/md127 is not possible")},
				call{args: add, err: cmdError(add, 1, stderr)}) // and no --zero-superblock: the fake fails the test on it
			e.step()
			e.wantLogged("cannot add the leg", 1)
		})
	}
}

// A leg whose own superblock says it ran without the other leg, or whose
// view cannot be read, is not re-added (the bitmap does not know what was
// written to it) but added as a spare: a full resync.
func TestWatchFullyResyncsALegThatRanApart(t *testing.T) {
	examine := mdadm("--examine", "/dev/nbd0")
	tests := []struct {
		name string
		view call
		why  string
	}{
		{name: "spare", view: call{args: examine, stdout: strings.Replace(string(readTestdata(t, "examine-stale.txt")),
			"Active device 0", "spare", 1)},
			why: "the leg's superblock says it is no active member"},
		{name: "inconsistent", view: call{args: examine, stdout: strings.Replace(string(readTestdata(t, "examine-stale.txt")),
			"Array State : AA", "Array State : A?", 1)},
			why: "the leg's superblock is inconsistent (Array State A?)"},
		{name: "slot out of range", view: call{args: examine, stdout: strings.Replace(string(readTestdata(t, "examine-stale.txt")),
			"Active device 0", "Active device 2", 1)},
			why: "the leg's superblock names slot 2, which its Array State AA does not have"},
		{name: "unparsable", view: call{args: examine, stdout: "/dev/nbd0:\n          Magic : a92b4efc\n        Version : 0.90.00\n"},
			why: "cannot read the leg's own view of the array (no Device Role and Array State lines (not a version-1 superblock?): unexpected format)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
			e.run.expect(staleLeg(t), tt.view,
				call{args: mdadm("--manage", "/dev/md127", "--remove", "/dev/nbd0")},
				call{args: mdadm("--manage", "/dev/md127", "--add-spare", "--failfast", "/dev/nbd0")})
			e.step()
			e.wantLogged(tt.why+": adding it as a spare, not re-adding it: a full resync follows", 1)
			e.wantLogged("added the leg: full resync started", 1)
		})
	}
	t.Run("unreadable", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
		e.run.expect(staleLeg(t), call{args: examine, err: cmdError(examine, 1, "mdadm: cannot open /dev/nbd0: Input/output error")},
			call{args: mdadm("--manage", "/dev/md127", "--remove", "/dev/nbd0")},
			call{args: mdadm("--manage", "/dev/md127", "--add-spare", "--failfast", "/dev/nbd0")})
		e.step()
		e.wantLogged("added the leg: full resync started", 1)
	})
}

// A returning leg whose superblock says it ran without the other leg was
// the array's only leg for a while: this array was assembled again from
// the other leg since, or the leg ran elsewhere. It may hold the newest
// writes, and is neither re-added nor resynced over: the admin chooses.
func TestWatchLeavesALegThatRanAloneAlone(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
	e.run.expect(staleLeg(t), call{args: mdadm("--examine", "/dev/nbd0"), stdout: string(readTestdata(t, "examine-alone.txt"))})
	e.step()
	e.wantLogged("the leg's superblock says it ran without the other leg (Array State .A), Events 30: it may hold "+
		"writes this array lacks, the newest ones even, which a resync from the array would overwrite: not adding it. "+
		"Compare mdadm --examine of both legs (README, \"When both storage boxes crashed\"); to give up the leg's "+
		"writes: mdadm --zero-superblock /dev/nbd0, then mdadm /dev/md127 --add --failfast /dev/nbd0", 1)
	// Backed off, then asked again: still nothing but the examines.
	e.clock.Advance(maxBackoff)
	e.run.expect(staleLeg(t), call{args: mdadm("--examine", "/dev/nbd0"), stdout: string(readTestdata(t, "examine-alone.txt"))})
	e.step()
}

// A leg md failed, then removed, comes back on a disk attached anew (the
// dom0 took the leg down and up, after its volume was made anew or its
// storage box went down): its superblock still names the array, its disk
// sequence number is another. It may be another copy of the volume,
// without writes md's bitmap counts as done: a full resync, not a re-add.
// The same disk, its connections back, is re-added.
func TestWatchFullyResyncsALegAttachedAnew(t *testing.T) {
	for _, tc := range []struct {
		name    string
		diskseq string // nbd0's when it returns; "-" none
		readd   bool
		why     string
	}{
		{"same disk", "7", true, ""},
		{"attached anew", "42", false, "the leg's disk was attached anew (disk sequence number 42, was 7): " +
			"it may be another copy of the volume, which md's bitmap does not cover"},
		{"number unreadable", "-", false, "cannot read the leg's disk sequence number (it was 7): it may be another disk"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
			seq := func(v string) {
				if v == "-" {
					delete(e.fsys, "sys/class/block/nbd0/diskseq")
					return
				}
				e.fsys["sys/class/block/nbd0/diskseq"] = &fstest.MapFile{Data: []byte(v + "\n")}
			}
			seq("7")
			e.probe.set("/dev/nbd0", probeUnreadable)
			e.step() // failed, still listed: disk 7
			e.load("sysfs-removed.txt")
			e.step() // removed
			seq(tc.diskseq)
			e.probe.set("/dev/nbd0", probeReadable)
			if tc.readd {
				e.run.expect(staleLeg(t), staleView(t), call{args: mdadm("--manage", "/dev/md127", "--re-add", "--failfast", "/dev/nbd0")})
				e.step()
				e.wantLogged("re-added the leg: md resyncs the chunks its bitmap marked", 1)
				return
			}
			e.run.expect(staleLeg(t), staleView(t), call{args: mdadm("--manage", "/dev/md127", "--add-spare", "--failfast", "/dev/nbd0")})
			e.step()
			e.wantLogged(tc.why+": adding it as a spare, not re-adding it: a full resync follows", 1)
			e.wantLogged("added the leg: full resync started", 1)
		})
	}
}

// A partition's disk sequence number is its disk's.
func TestDiskseqOfAPartition(t *testing.T) {
	h, fsys, _, _, _ := testHost(t)
	fsys["sys/block/xvdb/diskseq"] = &fstest.MapFile{Data: []byte("12\n")}
	fsys["sys/block/xvdb/xvdb1/partition"] = &fstest.MapFile{Data: []byte("1\n")}
	fsys["sys/class/block/xvdb/diskseq"] = &fstest.MapFile{Data: []byte("12\n")}
	for dev, want := range map[string]string{"xvdb": "12", "xvdb1": "12", "xvdc": ""} {
		if got := h.diskseq(dev); got != want {
			t.Errorf("diskseq(%s) = %q, want %q", dev, got, want)
		}
	}
}

// notBlank is what the watcher logs when it refuses a device in a leg's
// place that holds something.
func notBlank(found string) string {
	return "the leg has no md superblock but " + found + ": not adding it; if it is meant to be this leg, " +
		"zero it (blkdiscard -z /dev/nbd0, or at least its first and last MiB) and the watcher adds it"
}

// A device in a known leg's place without an md superblock is added (a full
// resync over it) only if it is blank by every test: detectSignature,
// blkid, and zeroes at both ends.
func TestWatchAddsOnlyBlankDevices(t *testing.T) {
	blkid := []string{"blkid", "-p", "-o", "export", "/dev/nbd0"}
	f2fs := func(string, uint64) ([]byte, []byte, error) {
		head := make([]byte, headSize)
		copy(head[1024:], []byte{0x10, 0x20, 0xf5, 0xf2}) // F2FS_SUPER_MAGIC 0xF2F52010, little-endian
		return head, make([]byte, tailSize), nil
	}
	dataAtEnd := func(string, uint64) ([]byte, []byte, error) {
		tail := make([]byte, tailSize)
		tail[len(tail)-1] = 1
		return make([]byte, headSize), tail, nil
	}
	damagedMD := func(string, uint64) ([]byte, []byte, error) {
		head := make([]byte, headSize)
		copy(head[4096:], []byte{0xfc, 0x4e, 0x2b, 0xa9}) // md's magic where 1.2 keeps it, little-endian
		return head, make([]byte, tailSize), nil
	}
	tests := []struct {
		name     string
		readEnds func(string, uint64) ([]byte, []byte, error)
		blkid    *call // nil: blkid not installed
		want     string
		added    bool
	}{
		{name: "md superblock mdadm cannot read", readEnds: damagedMD,
			want: "mdadm cannot read the leg's md superblock 1.2: not adding it; see mdadm --examine /dev/nbd0, " +
				"and if it is meant to be this leg, zero it (blkdiscard -z /dev/nbd0, or at least its first and last MiB) " +
				"and the watcher adds it"},
		{name: "f2fs, no blkid", readEnds: f2fs, want: notBlank("data in its first or last MiB (no signature we know)")},
		{name: "f2fs, blkid", readEnds: f2fs, blkid: &call{args: blkid, stdout: "DEVNAME=/dev/nbd0\nTYPE=f2fs\n"},
			want: notBlank("a f2fs signature (blkid)")},
		{name: "data at the end", readEnds: dataAtEnd, blkid: &call{args: blkid, err: cmdError(blkid, 2, "")},
			want: notBlank("data in its first or last MiB (no signature we know)")},
		{name: "blkid ambivalent", blkid: &call{args: blkid, err: cmdError(blkid, 8, "")},
			want: "cannot tell whether the leg is blank: not adding it"},
		{name: "blkid read error", blkid: &call{args: blkid, err: cmdError(blkid, 4, "blkid: error: /dev/nbd0: Input/output error")},
			want: "cannot tell whether the leg is blank: not adding it"},
		{name: "unreadable ends", readEnds: func(string, uint64) ([]byte, []byte, error) {
			return nil, nil, errors.New("reading /dev/nbd0: input/output error")
		}, want: "cannot tell whether the leg is blank: not adding it"},
		{name: "blank, blkid", blkid: &call{args: blkid, err: cmdError(blkid, 2, "")}, added: true,
			want: "the leg is blank; adding it as a new member: a full resync follows"},
		{name: "blank, no blkid", added: true, want: "the leg is blank; adding it as a new member: a full resync follows"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
			if tt.readEnds != nil {
				e.w.h.readEnds = tt.readEnds
			}
			e.w.h.have = func(name string) bool { return name == "blkid" && tt.blkid != nil }
			e.run.expect(examineBlank("/dev/nbd0"))
			if tt.blkid != nil {
				e.run.expect(*tt.blkid)
			}
			if tt.added {
				e.run.expect(call{args: mdadm("--manage", "/dev/md127", "--remove", "/dev/nbd0")},
					call{args: mdadm("--manage", "/dev/md127", "--add", "--failfast", "/dev/nbd0")})
			}
			e.step()
			e.wantLogged(tt.want, 1)
		})
	}
}

// A failed attempt is retried after a delay that doubles, not every look.
func TestWatchBacksOff(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{Interval: 2 * time.Second})
	remove := mdadm("--manage", "/dev/md127", "--remove", "/dev/nbd0")
	busy := cmdError(remove, 1, "mdadm: hot remove failed for /dev/nbd0: Device or resource busy")
	e.run.expect(staleLeg(t), staleView(t), call{args: remove, err: busy})
	e.step()
	e.wantLogged("cannot remove the failed leg", 1)
	e.step() // within the 4 s delay: nothing
	e.clock.Advance(4 * time.Second)
	e.run.expect(staleLeg(t), staleView(t), call{args: remove, err: busy})
	e.step()
	// The same reason again: logged once.
	e.wantLogged("cannot remove the failed leg", 1)
	e.clock.Advance(7 * time.Second) // the next delay is 8 s
	e.step()
	e.clock.Advance(time.Second)
	// Another reason is logged.
	e.run.expect(staleLeg(t), staleView(t), call{args: remove, err: cmdError(remove, 1, "mdadm: cannot find /dev/nbd0")})
	e.step()
	e.wantLogged("cannot remove the failed leg", 2)
	e.clock.Advance(16 * time.Second)
	e.run.expect(staleLeg(t), staleView(t), call{args: remove},
		call{args: mdadm("--manage", "/dev/md127", "--re-add", "--failfast", "/dev/nbd0")})
	e.step()
	e.wantLogged("re-added the leg: md resyncs the chunks its bitmap marked", 1)
	if leg := e.w.arrays["md127"].legs["nbd0"]; leg.failures != 0 || !leg.retryAt.IsZero() {
		t.Errorf("after success: %+v", leg)
	}
}

func TestWatchLeavesOtherDevicesAlone(t *testing.T) {
	t.Run("another array", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
		e.run.expect(otherArraysLeg(t))
		e.step()
		e.wantLogged(`the leg belongs to another array ("vm1", UUID a1eb0886:605cc9af:beadbfc9:43ae6784): not adding it`, 1)
	})
	t.Run("a filesystem", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
		e.w.h.readEnds = func(string, uint64) ([]byte, []byte, error) {
			head := make([]byte, headSize)
			copy(head[0:], "XFSB")
			return head, nil, nil
		}
		e.run.expect(examineBlank("/dev/nbd0"))
		e.step()
		e.wantLogged(notBlank("a xfs filesystem"), 1)
	})
	t.Run("gone", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
		delete(e.fsys, "sys/class/block/nbd0/size")
		delete(e.fsys, "sys/class/block/nbd0/dev")
		e.step()
		e.wantLogged("leg device is gone", 1)
	})
}

// A blank device in a known leg's place (the storage box replaced the
// volume) is added, with a full resync.
func TestWatchAddsBlankLeg(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
	e.run.expect(examineBlank("/dev/nbd0"),
		call{args: mdadm("--manage", "/dev/md127", "--remove", "/dev/nbd0")},
		call{args: mdadm("--manage", "/dev/md127", "--add", "--failfast", "/dev/nbd0")})
	e.step()
	e.wantLogged("the leg is blank; adding it as a new member: a full resync follows", 1)
}

func TestWatchWaitsForRecovery(t *testing.T) {
	e := newWatchEnv(t, "sysfs-recovery.txt", WatchConfig{GrowFS: true})
	e.step()
	e.wantLogged("degraded, recover running", 1)
}

func TestWatchGrows(t *testing.T) {
	grow := call{args: mdadm("--grow", "/dev/md126", "--size=max")}
	t.Run("both legs", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-healthy.txt", WatchConfig{})
		blockDev(e.fsys, "nbd0", 128<<20, "43:0")
		blockDev(e.fsys, "nbd1", 128<<20, "43:32")
		e.run.expect(grow)
		e.step()
		e.wantLogged("grew the array to use its grown legs", 1)
		e.step() // md has not grown (a fake): not tried again at the same sizes
		blockDev(e.fsys, "nbd1", 192<<20, "43:32")
		e.step() // the smallest leg did not change
		blockDev(e.fsys, "nbd0", 192<<20, "43:0")
		e.run.expect(grow)
		e.step()
	})
	t.Run("one leg", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-healthy.txt", WatchConfig{})
		blockDev(e.fsys, "nbd0", 128<<20, "43:0")
		e.step()
	})
	t.Run("less than the slack", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-healthy.txt", WatchConfig{})
		blockDev(e.fsys, "nbd0", 64<<20+512<<10, "43:0")
		blockDev(e.fsys, "nbd1", 64<<20+512<<10, "43:32")
		e.step()
	})
	t.Run("resyncing", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-resync.txt", WatchConfig{})
		blockDev(e.fsys, "nbd0", 128<<20, "43:0")
		blockDev(e.fsys, "nbd1", 128<<20, "43:32")
		e.step()
	})
	t.Run("degraded", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
		e.probe.set("/dev/nbd0", probeUnreadable)
		blockDev(e.fsys, "nbd0", 128<<20, "43:0")
		blockDev(e.fsys, "nbd1", 128<<20, "43:32")
		e.step()
	})
}

// md is not asked to grow an array it would refuse to resize (not
// read-write) or one whose legs may differ (a resync pending or running):
// the watcher says once why it waits, and grows the array once that passed.
func TestWatchGrowWaits(t *testing.T) {
	grow := call{args: mdadm("--grow", "/dev/md126", "--size=max")}
	tests := []struct {
		name string
		md   map[string]string // attributes of /sys/block/md126/md
		want string
	}{
		{name: "read-auto, resync pending", // assembled after an unclean shutdown, not written yet
			md:   map[string]string{"array_state": "read-auto", "resync_start": "1024"},
			want: "both legs grew, but the array is read-auto: not growing it until it is read-write"},
		{name: "readonly", md: map[string]string{"array_state": "readonly"},
			want: "both legs grew, but the array is readonly: not growing it until it is read-write"},
		{name: "resync pending", md: map[string]string{"array_state": "active", "resync_start": "1024"},
			want: "both legs grew, but a resync is pending (md/resync_start 1024): not growing the array until it ran"},
		{name: "frozen", md: map[string]string{"sync_action": "frozen", "resync_start": "1024"},
			want: "both legs grew, but md's sync_action is frozen: not growing the array until it is idle"},
		{name: "check", md: map[string]string{"sync_action": "check"},
			want: "both legs grew, but md's sync_action is check: not growing the array until it is idle"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newWatchEnv(t, "sysfs-healthy.txt", WatchConfig{})
			blockDev(e.fsys, "nbd0", 128<<20, "43:0")
			blockDev(e.fsys, "nbd1", 128<<20, "43:32")
			for attr, v := range tt.md {
				e.setMD(attr, v)
			}
			e.step() // the fake runner fails the test on any command
			e.step()
			e.wantLogged(tt.want, 1)
			e.setMD("array_state", "active")
			e.setMD("resync_start", "none")
			e.setMD("sync_action", "idle")
			e.run.expect(grow)
			e.step()
			e.wantLogged("grew the array to use its grown legs", 1)
		})
	}
}

// A grow of the array or of its filesystem that failed is not taken as
// done: it is tried again after a delay that doubles, and the failure is
// logged once while it lasts.
func TestWatchGrowRetries(t *testing.T) {
	const mountinfo = "29 28 9:127 / /mnt rw,relatime - %s /dev/md/vm1 rw\n"
	grow := mdadm("--grow", "/dev/md126", "--size=max")
	dumpe2fs := []string{"dumpe2fs", "-h", "/dev/md127"}
	resize2fs := []string{"resize2fs", "/dev/md127"}
	xfsGrowfs := []string{"xfs_growfs", "/mnt"}
	ext4Size := string(readTestdata(t, "dumpe2fs-h.txt"))
	tests := []struct {
		name    string
		capture string
		fstype  string // mounted on the array, with --grow-fs; "" for neither
		fail    []call // one attempt that fails
		ok      []call // one that succeeds
		failed  string
		done    string
	}{
		{name: "array", capture: "sysfs-healthy.txt",
			fail:   []call{{args: grow, err: cmdError(grow, 1, "mdadm: Cannot set device size for /dev/md126: Device or resource busy")}},
			ok:     []call{{args: grow}},
			failed: "cannot grow the array", done: "grew the array to use its grown legs"},
		{name: "ext4", capture: "sysfs-grow.txt", fstype: "ext4",
			fail: []call{{args: dumpe2fs, stdout: ext4Size},
				{args: resize2fs, err: cmdError(resize2fs, 1, "resize2fs: Read-only file system While checking for on-line resizing support")}},
			ok:     []call{{args: dumpe2fs, stdout: ext4Size}, {args: resize2fs}},
			failed: "cannot grow the filesystem", done: "grew the filesystem"},
		{name: "ext4 size unreadable", capture: "sysfs-grow.txt", fstype: "ext4",
			fail:   []call{{args: dumpe2fs, err: cmdError(dumpe2fs, 1, "dumpe2fs: Input/output error while trying to open /dev/md127")}},
			ok:     []call{{args: dumpe2fs, stdout: ext4Size}, {args: resize2fs}},
			failed: "cannot read the filesystem's size", done: "grew the filesystem"},
		{name: "xfs", capture: "sysfs-grow.txt", fstype: "xfs",
			fail:   []call{{args: xfsGrowfs, err: cmdError(xfsGrowfs, 1, "xfs_growfs: XFS_IOC_FSGROWFSDATA xfsctl failed: Read-only file system")}},
			ok:     []call{{args: xfsGrowfs}},
			failed: "cannot grow the filesystem", done: "grew the filesystem"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newWatchEnv(t, tt.capture, WatchConfig{Interval: 2 * time.Second, GrowFS: tt.fstype != ""})
			if tt.fstype != "" {
				e.fsys["proc/self/mountinfo"] = &fstest.MapFile{Data: []byte(sprintf(mountinfo, tt.fstype))}
			} else {
				blockDev(e.fsys, "nbd0", 128<<20, "43:0")
				blockDev(e.fsys, "nbd1", 128<<20, "43:32")
			}
			e.run.expect(tt.fail...)
			e.step()
			e.wantLogged(tt.failed, 1)
			e.step() // within the 4 s delay: nothing
			e.clock.Advance(4 * time.Second)
			e.run.expect(tt.fail...)
			e.step()
			e.clock.Advance(7 * time.Second) // the next delay is 8 s
			e.step()
			e.clock.Advance(time.Second)
			e.run.expect(tt.ok...)
			e.step()
			e.wantLogged(tt.failed, 1)
			e.wantLogged(tt.done, 1)
			e.clock.Advance(time.Hour)
			e.step() // done at these sizes
			if mem := e.w.arrays[e.md]; mem.growRetry != (retry{}) || mem.fsRetry != (retry{}) {
				t.Errorf("after success: grow %+v, fs %+v", mem.growRetry, mem.fsRetry)
			}
		})
	}
}

// A filesystem that needs to grow on an array that is not read-write is
// left alone until the array is: the watcher writes nothing through it.
func TestWatchGrowFSWaitsForAReadWriteArray(t *testing.T) {
	const mountinfo = "29 28 9:127 / /mnt ro,relatime - %s /dev/md/vm1 ro\n"
	dumpe2fs := call{args: []string{"dumpe2fs", "-h", "/dev/md127"}, stdout: string(readTestdata(t, "dumpe2fs-h.txt"))}
	tests := []struct {
		fstype string
		look   []call // what each look runs before the grow
		grow   call
	}{
		{fstype: "ext4", look: []call{dumpe2fs}, grow: call{args: []string{"resize2fs", "/dev/md127"}}},
		{fstype: "xfs", grow: call{args: []string{"xfs_growfs", "/mnt"}}},
	}
	for _, tt := range tests {
		t.Run(tt.fstype, func(t *testing.T) {
			e := newWatchEnv(t, "sysfs-grow.txt", WatchConfig{GrowFS: true})
			e.fsys["proc/self/mountinfo"] = &fstest.MapFile{Data: []byte(sprintf(mountinfo, tt.fstype))}
			e.setMD("array_state", "readonly")
			e.setMD("sync_action", "idle")
			for range 2 {
				e.run.expect(tt.look...)
				e.step()
			}
			e.wantLogged("the array is readonly: not growing its filesystem until it is read-write", 1)
			e.setMD("array_state", "clean")
			e.run.expect(tt.look...)
			e.run.expect(tt.grow)
			e.step()
			e.wantLogged("grew the filesystem", 1)
		})
	}
}

// After the array grew (scenario 28's capture, 127 MiB, its ext4 still
// 63 MiB), the mounted filesystem is grown once.
func TestWatchGrowsFilesystem(t *testing.T) {
	const mountinfo = "29 28 9:127 / /mnt rw,relatime - %s /dev/md/vm1 rw\n"
	dumpe2fs := call{args: []string{"dumpe2fs", "-h", "/dev/md127"}, stdout: ""}
	t.Run("ext4", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-grow.txt", WatchConfig{GrowFS: true})
		e.fsys["proc/self/mountinfo"] = &fstest.MapFile{Data: []byte(sprintf(mountinfo, "ext4"))}
		dumpe2fs.stdout = string(readTestdata(t, "dumpe2fs-h.txt"))
		e.run.expect(dumpe2fs, call{args: []string{"resize2fs", "/dev/md127"}})
		e.step()
		e.wantLogged("grew the filesystem", 1)
		e.step() // once per array size
	})
	t.Run("ext4 already grown", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-grow.txt", WatchConfig{GrowFS: true})
		e.fsys["proc/self/mountinfo"] = &fstest.MapFile{Data: []byte(sprintf(mountinfo, "ext4"))}
		dumpe2fs.stdout = "Block count:              130048\nBlock size:               1024\n"
		e.run.expect(dumpe2fs)
		e.step()
		e.step()
	})
	t.Run("xfs", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-grow.txt", WatchConfig{GrowFS: true})
		e.fsys["proc/self/mountinfo"] = &fstest.MapFile{Data: []byte(sprintf(mountinfo, "xfs"))}
		e.run.expect(call{args: []string{"xfs_growfs", "/mnt"}})
		e.step()
		e.step()
	})
	t.Run("not mounted", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-grow.txt", WatchConfig{GrowFS: true})
		e.fsys["proc/self/mountinfo"] = &fstest.MapFile{Data: readTestdata(t, "mountinfo.txt")}
		e.step()
	})
	t.Run("without --grow-fs", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-grow.txt", WatchConfig{})
		e.fsys["proc/self/mountinfo"] = &fstest.MapFile{Data: []byte(sprintf(mountinfo, "ext4"))}
		e.step()
	})
}

// With no --md, the watcher follows every RAID1 array in /proc/mdstat.
func TestWatchAllArrays(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{Arrays: []string{}})
	e.w.cfg.Arrays = nil
	e.fsys["proc/mdstat"] = &fstest.MapFile{Data: readTestdata(t, "mdstat-faulty.txt")}
	e.probe.set("/dev/nbd0", probeUnreadable)
	e.step()
	e.wantLogged("leg does not answer reads; waiting for it", 1)
}

func TestWatchMissingArray(t *testing.T) {
	e := newWatchEnv(t, "sysfs-healthy.txt", WatchConfig{Arrays: []string{"/dev/md/nosuch"}})
	e.step()
	e.step()
	e.wantLogged("array not found (not assembled yet?)", 1)
}

// Run looks once per interval of its clock, and returns nil when
// cancelled.
func TestWatchRun(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{Interval: 5 * time.Second})
	e.probe.set("/dev/nbd0", probeUnreadable)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.w.Run(ctx) }()
	probes := func() int {
		e.probe.mu.Lock()
		defer e.probe.mu.Unlock()
		return len(e.probe.probed)
	}
	<-e.clock.waiting // first look done, waiting for the interval
	if n := probes(); n != 1 {
		t.Fatalf("%d probes after the first look", n)
	}
	e.clock.Advance(4 * time.Second)
	e.clock.Advance(time.Second)
	<-e.clock.waiting
	if n := probes(); n != 2 {
		t.Fatalf("%d probes after one interval", n)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run returned %v on cancel", err)
	}
}

// Without md/uuid in sysfs (older kernels), mdadm --detail names the array.
func TestWatchUUIDFromMdadm(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
	delete(e.fsys, "sys/block/md127/md/uuid")
	detail := call{args: mdadm("--detail", "--export", "/dev/md127"), stdout: string(readTestdata(t, "detail-export-faulty.txt"))}
	e.run.expect(detail, staleLeg(t), staleView(t),
		detail, // asked again before the members change: still this array?
		call{args: mdadm("--manage", "/dev/md127", "--remove", "/dev/nbd0")},
		call{args: mdadm("--manage", "/dev/md127", "--re-add", "--failfast", "/dev/nbd0")})
	e.step()
	e.wantLogged("re-added the leg: md resyncs the chunks its bitmap marked", 1)
}

// One broken array (both storage boxes of one volume down; Linux 6.12 on
// prints "broken" in /proc/mdstat) hides no other mirror from a watcher
// run without --md.
func TestWatcherTargetsBesideABrokenArray(t *testing.T) {
	h, fsys, _, _, _ := testHost(t)
	fsys["proc/mdstat"] = &fstest.MapFile{Data: []byte("Personalities : [raid1] \n" +
		"md127 : broken raid1 nbd1[1](F) nbd0[0]\n      64512 blocks super 1.2 [2/1] [U_]\n\n" +
		"md126 : active raid1 xvdd[1](F) xvdc[0]\n      64512 blocks super 1.2 [2/1] [U_]\n\n" +
		"unused devices: <none>\n")}
	w := newWatcher(h, &WatchConfig{})
	names, complete := w.targets()
	if !complete || !slices.Equal(names, []string{"md127", "md126"}) {
		t.Errorf("targets = %v, complete %v; want md127 and md126", names, complete)
	}
}

// copyArray adds a second array, name (mdN), made from the one loaded
// (md127) under another UUID, its legs renamed as legs says, each a 64 MiB
// device that answers reads.
func (e *watchEnv) copyArray(name string, legs map[string]string) {
	e.t.Helper()
	prefix := "sys/block/" + e.md + "/"
	for k, f := range maps.Clone(e.fsys) {
		rest, ok := strings.CutPrefix(k, prefix)
		if !ok {
			continue
		}
		for from, to := range legs {
			rest = strings.Replace(rest, "md/dev-"+from+"/", "md/dev-"+to+"/", 1)
		}
		e.fsys["sys/block/"+name+"/"+rest] = &fstest.MapFile{Data: slices.Clone(f.Data)}
	}
	minor := strings.TrimPrefix(name, "md")
	e.fsys["sys/block/"+name+"/dev"] = &fstest.MapFile{Data: []byte("9:" + minor + "\n")}
	e.setMDOf(name, "uuid", "e4264e04-4d18-9632-3ebc-cc7bb2168"+minor)
	e.fsys["sys/class/block/"+name+"/dev"] = e.fsys["sys/block/"+name+"/dev"]
	e.fsys["sys/class/block/"+name+"/size"] = e.fsys["sys/class/block/"+e.md+"/size"]
	for i, to := range slices.Sorted(maps.Values(legs)) {
		blockDev(e.fsys, to, 64<<20, sprintf("43:%d", 64+32*i))
		e.probe.set("/dev/"+to, probeReadable)
	}
}

// One array's look stuck on a leg that died right after its probe (mdadm
// --examine of it waits in the kernel) holds up neither the other arrays
// nor the next look: the watcher heals the other array meanwhile, leaves
// the stuck one alone until its look ends, and then looks at it again.
func TestWatchLooksAtOtherArraysWhileOneIsStuck(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{Arrays: []string{"/dev/md127", "/dev/md126"}})
	e.copyArray("md126", map[string]string{"nbd0": "nbd2", "nbd1": "nbd3"})
	healed := func(array, leg string) func() {
		return func() {
			e.setMDOf(array, "dev-"+leg+"/state", "in_sync,failfast")
			e.setMDOf(array, "degraded", "0")
		}
	}

	// md127's look is the first to start a wait; it is let go once its
	// examine is stuck. Later waits last until the look ends.
	stuck, release := make(chan struct{}), make(chan struct{})
	moveOn := make(chan time.Time, 1)
	waits := 0
	e.w.h.lookWait = func() <-chan time.Time {
		waits++
		if waits == 1 {
			return moveOn
		}
		return nil
	}
	go func() {
		<-stuck
		moveOn <- time.Time{}
	}()
	examine := staleLeg(t)
	examine.started, examine.release = stuck, release
	e.run.expect(examine, examineBlank("/dev/nbd2"),
		call{args: mdadm("--manage", "/dev/md126", "--remove", "/dev/nbd2")},
		call{args: mdadm("--manage", "/dev/md126", "--add", "--failfast", "/dev/nbd2"), then: healed("md126", "nbd2")})
	e.step()
	const slow = "the array's look is taking long: looking at the other arrays meanwhile (a command or read " +
		"stuck on a leg that died under it waits as long as the dom0 keeps the dead disk's requests)"
	e.wantLogged(slow, 1)
	if got := e.logs.FilterMessage(slow).All(); len(got) == 1 {
		if f := got[0].ContextMap(); f["array"] != "/dev/md127" || f["doing"] != "mdadm --examine --export /dev/nbd0" {
			t.Errorf("logged %v, want md127 stuck in mdadm --examine --export /dev/nbd0", f)
		}
	}
	e.wantLogged("added the leg: full resync started", 1)

	// Still stuck: md127 is left alone, md126 looked at (whole now).
	const still = "the array's last look is still at work: not looking at it again yet"
	e.step()
	e.wantLogged(still, 1)
	e.wantLogged("all legs in sync", 1)
	// Said at warning level again after maxBackoff, in between at debug.
	e.clock.Advance(maxBackoff - time.Second)
	e.step()
	e.clock.Advance(time.Second)
	e.step()
	var levels []string
	for _, l := range e.logs.FilterMessage(still).All() {
		levels = append(levels, l.Level.String())
	}
	if want := []string{"debug", "debug", "warn"}; !slices.Equal(levels, want) {
		t.Errorf("%q logged at %v, want %v", still, levels, want)
	}

	// The examine answers: the stuck look carries on where it was.
	e.run.expect(staleView(t),
		call{args: mdadm("--manage", "/dev/md127", "--remove", "/dev/nbd0")},
		call{args: mdadm("--manage", "/dev/md127", "--re-add", "--failfast", "/dev/nbd0"), then: healed("md127", "nbd0")})
	close(release)
	receive(t, e.w.busy["md127"].done, "end of the stuck look")
	e.step()
	e.wantLogged("re-added the leg: md resyncs the chunks its bitmap marked", 1)
	e.wantLogged("the array's long look finished", 1)
	e.wantLogged("all legs in sync", 2) // md127 looked at again
	if len(e.w.busy) != 0 {
		t.Errorf("arrays still busy: %v", e.w.busy)
	}
}

// Stopping the watcher does not wait for a look stuck on a dying leg.
func TestWatchRunStopsDuringAStuckLook(t *testing.T) {
	e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
	stuck, release := make(chan struct{}), make(chan struct{})
	examine := otherArraysLeg(t)
	examine.started, examine.release = stuck, release
	e.run.expect(examine)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.w.Run(ctx) }()
	receive(t, stuck, "stuck examine")
	cancel()
	if err := receive(t, done, "return from Run"); err != nil {
		t.Errorf("Run returned %v on cancel", err)
	}
	close(release)
	receive(t, e.w.busy["md127"].done, "end of the stuck look") // once the examine ends
	e.wantLogged(`the leg belongs to another array ("vm1", UUID a1eb0886:605cc9af:beadbfc9:43ae6784): not adding it`, 1)
}
