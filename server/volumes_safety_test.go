package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/atomicfile"
	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server/backend"
	"github.com/lvnbd/lvnbd/volume"
	"github.com/lvnbd/lvnbd/volume/file"
)

// createWithSnapshot makes volume vm1 (1 MiB) and its snapshot vm1@s.
func createWithSnapshot(t *testing.T, vols *Volumes) {
	t.Helper()
	ctx := context.Background()
	if _, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := vols.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s"}); err != nil {
		t.Fatal(err)
	}
}

// observedVolumes is startVolumes over drv, with the log kept for checking.
func observedVolumes(t *testing.T, drv volume.Driver) (*Volumes, *testServer, *observer.ObservedLogs) {
	t.Helper()
	ts := startServer(t, nil)
	core, logs := observer.New(zapcore.InfoLevel)
	return NewVolumes(drv, ts.reg, zap.New(core)), ts, logs
}

func newFileDriver(t *testing.T) *file.Driver {
	t.Helper()
	drv, err := file.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return drv
}

// expectExportID fails the test unless reg serves name under volume ID want,
// and returns that export.
func expectExportID(t *testing.T, reg *Registry, name, want string) *Export {
	t.Helper()
	e, ok := reg.Lookup(name)
	if !ok {
		t.Fatalf("%s not exported", name)
	}
	if got := nbd.DescriptionID(e.Description); got != want {
		t.Errorf("%s carries ID %q, want %q", name, got, want)
	}
	return e
}

// expectConnected fails unless c's connection still answers a request.
func expectConnected(t *testing.T, c *rawClient) {
	t.Helper()
	c.request(nbd.RequestHeader{Command: nbd.CmdFlush, Handle: 99}, nil)
	if r := c.simpleReply(0); r.errno != 0 || r.handle != 99 {
		t.Fatalf("flush after the refused change: %+v", r)
	}
}

func readExport(t *testing.T, ts *testServer, name string, n int) string {
	t.Helper()
	e, ok := ts.reg.Lookup(name)
	if !ok {
		t.Fatalf("%s is not exported", name)
	}
	buf := make([]byte, n)
	if err := e.Backend.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	return string(buf)
}

// mergeLaterDriver merges as LVM does with the volume open elsewhere: the
// merge waits, the listing says so, and finish makes it happen.
type mergeLaterDriver struct {
	*file.Driver
	mu      sync.Mutex
	pending map[string]string // volume: snapshot
}

func (d *mergeLaterDriver) MergeSnapshot(ctx context.Context, vol, snap string) error {
	if _, err := d.Get(ctx, vol); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.pending[vol] = snap
	return errors.Join(errors.New("merge of "+volume.SnapshotRef(vol, snap)), volume.ErrMergePending)
}

func (d *mergeLaterDriver) List(ctx context.Context) ([]volume.Volume, error) {
	vols, err := d.Driver.List(ctx)
	d.mu.Lock()
	defer d.mu.Unlock()
	for i, v := range vols {
		if snap, ok := d.pending[v.Name]; ok {
			vols[i].MergePending = true
			for j, s := range v.Snapshots {
				vols[i].Snapshots[j].Merging = s.Name == snap
			}
		}
	}
	return vols, err
}

// finish completes the merge into vol, as LVM does on activation.
func (d *mergeLaterDriver) finish(t *testing.T, vol string) {
	d.mu.Lock()
	snap := d.pending[vol]
	delete(d.pending, vol)
	d.mu.Unlock()
	if err := d.Driver.MergeSnapshot(context.Background(), vol, snap); err != nil {
		t.Fatal(err)
	}
}

// TestPendingMergeIsNotExported: a merge that waits for the volume to be
// closed undoes every write made to the volume until it starts, so the
// volume is not exported again until it is done, and the admin is told once.
func TestPendingMergeIsNotExported(t *testing.T) {
	ctx := context.Background()
	drv := &mergeLaterDriver{Driver: newFileDriver(t), pending: map[string]string{}}
	vols, ts, logs := observedVolumes(t, drv)
	createWithSnapshot(t, vols)
	if err := vols.MergeSnapshot(ctx, "vm1", "s", false); !errors.Is(err, volume.ErrMergePending) {
		t.Fatalf("MergeSnapshot: %v, want ErrMergePending", err)
	}
	for i := range 3 { // the periodic rescan
		if _, ok := ts.reg.Lookup("vm1"); ok {
			t.Fatalf("after sync %d vm1 is exported with a merge pending", i)
		}
		if _, ok := ts.reg.Lookup("vm1@s"); ok {
			t.Fatalf("after sync %d the merging snapshot is exported", i)
		}
		if err := vols.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	noted := logs.FilterMessageSnippet("merge into it is pending").FilterField(zap.String("volume", "vm1"))
	if n := noted.Len(); n != 1 {
		t.Errorf("logged %d times that vm1 waits for its merge, want once: %v", n, logs.All())
	}

	drv.finish(t, "vm1")
	if err := vols.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if e, ok := ts.reg.Lookup("vm1"); !ok || e.ReadOnly {
		t.Fatalf("vm1 after its merge: exported %v, want a writable export", ok)
	}
}

// TestMergeStartedOutsideStopsClients: an admin merges with lvconvert
// while lvnbd exports the volume; what its clients write from then on is
// undone, so they are disconnected rather than left writing.
func TestMergeStartedOutsideStopsClients(t *testing.T) {
	ctx := context.Background()
	drv := &mergeLaterDriver{Driver: newFileDriver(t), pending: map[string]string{}}
	vols, ts, _ := observedVolumes(t, drv)
	createWithSnapshot(t, vols)
	c := dialRaw(t, ts.addr)
	c.open("vm1", false)
	if err := drv.MergeSnapshot(ctx, "vm1", "s"); !errors.Is(err, volume.ErrMergePending) {
		t.Fatal(err)
	}
	if err := vols.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if _, ok := ts.reg.Lookup("vm1"); ok {
		t.Error("vm1 still exported with a merge pending")
	}
	c.expectClosed()
}

// TestReplacedVolumeIsExportedAnew: the file behind an export replaced
// behind the server's back (by lvnbd volume commands run without it, or by
// hand). Its clients are disconnected rather than left writing to a file no
// longer in the directory, and the new file is exported.
func TestReplacedVolumeIsExportedAnew(t *testing.T) {
	tests := []struct {
		name    string
		replace func(t *testing.T, drv *file.Driver)
		want    string // what the new export starts with
	}{
		{"removed and created again", func(t *testing.T, drv *file.Driver) {
			ctx := context.Background()
			if err := drv.RemoveSnapshot(ctx, "vm1", "s"); err != nil {
				t.Fatal(err)
			}
			if err := drv.Remove(ctx, "vm1"); err != nil {
				t.Fatal(err)
			}
			if _, err := drv.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
				t.Fatal(err)
			}
		}, "\x00\x00\x00\x00\x00\x00\x00"},
		{"merged", func(t *testing.T, drv *file.Driver) {
			if err := drv.MergeSnapshot(context.Background(), "vm1", "s"); err != nil {
				t.Fatal(err)
			}
		}, "SNAPPED"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			drv := newFileDriver(t)
			vols, ts, logs := observedVolumes(t, drv)
			if _, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
				t.Fatal(err)
			}
			c := dialRaw(t, ts.addr)
			c.open("vm1", false)
			c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Flags: nbd.CmdFlagFUA, Handle: 1, Length: 7}, []byte("SNAPPED"))
			if r := c.simpleReply(0); r.errno != 0 {
				t.Fatal(r.errno)
			}
			if _, err := vols.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s"}); err != nil {
				t.Fatal(err)
			}
			c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Flags: nbd.CmdFlagFUA, Handle: 2, Length: 7}, []byte("OLDDATA"))
			if r := c.simpleReply(0); r.errno != 0 {
				t.Fatal(r.errno)
			}
			old, _ := ts.reg.Lookup("vm1")

			tt.replace(t, drv)
			if err := vols.Sync(ctx); err != nil {
				t.Fatal(err)
			}
			c.expectClosed()
			if e, _ := ts.reg.Lookup("vm1"); e == old {
				t.Fatal("vm1 is still the old export")
			}
			if got := readExport(t, ts, "vm1", 7); got != tt.want {
				t.Errorf("vm1 exports %q, want the new file's %q", got, tt.want)
			}
			if n := logs.FilterLevelExact(zapcore.WarnLevel).FilterMessageSnippet("export replaced").Len(); n != 1 {
				t.Errorf("%d warnings that vm1 was replaced, want 1: %v", n, logs.All())
			}
		})
	}
}

// idDriver gives its volumes the IDs a test sets, as LVM gives an LV its
// UUID.
type idDriver struct {
	*file.Driver
	mu  sync.Mutex
	ids map[string]string
}

func (d *idDriver) setID(name, id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ids[name] = id
}

func (d *idDriver) List(ctx context.Context) ([]volume.Volume, error) {
	vols, err := d.Driver.List(ctx)
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := range vols {
		vols[i].ID = d.ids[vols[i].Name]
	}
	return vols, err
}

// An LV made anew may get its predecessor's device number, so the export
// looks like the same device: its ID, which the export's description
// carries for the dom0, tells it is not, and it is exported anew.
func TestVolumeWithAnotherIDIsExportedAnew(t *testing.T) {
	ctx := context.Background()
	drv := &idDriver{Driver: newFileDriver(t), ids: map[string]string{"vm1": "uuid-1"}}
	vols, ts, logs := observedVolumes(t, drv)
	if _, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	old, _ := ts.reg.Lookup("vm1")
	if id := nbd.DescriptionID(old.Description); id != "uuid-1" {
		t.Fatalf("vm1's description %q carries ID %q, want uuid-1", old.Description, id)
	}
	c := dialRaw(t, ts.addr)
	c.open("vm1", false)

	drv.setID("vm1", "uuid-2")
	if err := vols.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	c.expectClosed()
	now, _ := ts.reg.Lookup("vm1")
	if now == old || nbd.DescriptionID(now.Description) != "uuid-2" {
		t.Fatalf("vm1 after its ID changed: %q, want a new export with uuid-2", now.Description)
	}
	if n := logs.FilterLevelExact(zapcore.WarnLevel).FilterMessageSnippet("export replaced").Len(); n != 1 {
		t.Errorf("%d warnings that vm1 was replaced, want 1: %v", n, logs.All())
	}
	// Unchanged, it stays.
	if err := vols.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if again, _ := ts.reg.Lookup("vm1"); again != now {
		t.Error("a sync with nothing changed exported vm1 anew")
	}
}

// A snapshot merged through the server rolls the volume back: the export
// that replaces it carries another ID, so that a dom0 leg refuses it
// instead of handing the guest's mirror old data as current.
func TestMergedVolumeIsExportedUnderAnotherID(t *testing.T) {
	ctx := context.Background()
	vols, ts, _ := observedVolumes(t, newFileDriver(t))
	if _, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := vols.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s"}); err != nil {
		t.Fatal(err)
	}
	old, _ := ts.reg.Lookup("vm1")
	id := nbd.DescriptionID(old.Description)
	if id == "" {
		t.Fatalf("vm1's description %q carries no ID", old.Description)
	}
	c := dialRaw(t, ts.addr)
	c.open("vm1", false)
	if err := vols.MergeSnapshot(ctx, "vm1", "s", true); err != nil {
		t.Fatal(err)
	}
	c.expectClosed()
	now, _ := ts.reg.Lookup("vm1")
	if got := nbd.DescriptionID(now.Description); got != id+"-r1" {
		t.Errorf("vm1 after the merge carries ID %q, want %q", got, id+"-r1")
	}
}

// A volume shrunk behind the server (truncate, lvreduce) has lost its tail:
// its clients are cut, and the shrink is counted as a rollback, which gives
// the volume another ID, so that a dom0 leg refuses it also if it is grown
// back before the leg reconnects. Whoever sees the smaller size first
// handles it: a rescan, or a handshake (a dom0's size poll) that re-read the
// size before the rescan, which then has no change left to see.
func TestShrinkBehindTheServerCutsItsClients(t *testing.T) {
	for _, handshakeFirst := range []bool{false, true} {
		t.Run(fmt.Sprintf("handshake first %v", handshakeFirst), func(t *testing.T) {
			ctx := context.Background()
			vols, ts, logs := observedVolumes(t, newFileDriver(t))
			v, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 2 << 20})
			if err != nil {
				t.Fatal(err)
			}
			c := dialRaw(t, ts.addr)
			c.open("vm1", false)
			if err := os.Truncate(v.Path, 1<<20); err != nil {
				t.Fatal(err)
			}
			if handshakeFirst {
				poll := dialRaw(t, ts.addr)
				poll.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
				r := poll.option(nbd.OptInfo, nbd.InfoRequest{Name: "vm1"})
				var info nbd.Info
				if r[0].typ != nbd.RepInfo || info.UnmarshalBinary(r[0].data) != nil || info.Size != 1<<20 {
					t.Fatalf("INFO after the shrink: %v %+v, want %d bytes", r[0].typ, info, 1<<20)
				}
				c.expectClosed()
			}
			if err := vols.Sync(ctx); err != nil {
				t.Fatal(err)
			}
			c.expectClosed()
			vols.shrinks.Wait()
			e := expectExportID(t, ts.reg, "vm1", v.ID+"-r1")
			if e.Backend.Size() != 1<<20 {
				t.Errorf("vm1 after the shrink is exported with %d bytes, want %d", e.Backend.Size(), 1<<20)
			}
			// The handshake warns in the server's log; the rescan after it
			// has nothing left to say.
			want := 1
			if handshakeFirst {
				want = 0
			}
			if n := logs.FilterLevelExact(zapcore.WarnLevel).FilterMessageSnippet("export shrank").Len(); n != want {
				t.Errorf("%d warnings from the rescan that vm1 shrank, want %d: %v", n, want, logs.All())
			}
		})
	}
}

// A volume shrunk and grown back behind the server before any client
// reconnects keeps its size, but not its tail: the client the shrink cut
// must find another ID when it comes back, and none may come in before the
// count, under the old one.
func TestShrinkGrownBackBeforeTheReconnectChangesTheID(t *testing.T) {
	ctx := context.Background()
	vols, ts, _ := observedVolumes(t, newFileDriver(t))
	v, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	c := dialRaw(t, ts.addr)
	c.open("vm1", false)
	e, _ := ts.reg.Lookup("vm1")
	if err := os.Truncate(v.Path, 1<<20); err != nil {
		t.Fatal(err)
	}
	vols.mu.Lock()                                         // holds the count back until the check below
	if _, err := e.refreshSize(zap.NewNop()); err != nil { // a rescan, or the device watch
		t.Fatal(err)
	}
	c.expectClosed()
	if err := os.Truncate(v.Path, 2<<20); err != nil {
		t.Fatal(err)
	}
	// Before the count: refused, not told the old ID.
	early := dialRaw(t, ts.addr)
	early.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
	b, _ := nbd.InfoRequest{Name: "vm1"}.AppendBinary(nil)
	early.sendOption(nbd.OptGo, b)
	for _, r := range early.optionReplies(nbd.OptGo) {
		if r.typ == nbd.RepAck {
			t.Fatal("a client entered the shrunk export before the shrink was counted")
		}
	}
	vols.mu.Unlock()
	vols.shrinks.Wait()
	back := dialRaw(t, ts.addr)
	info := back.open("vm1", false)
	if info.Size != 2<<20 {
		t.Errorf("size after the grow back %d, want %d", info.Size, 2<<20)
	}
	expectExportID(t, ts.reg, "vm1", v.ID+"-r1")
}

// A shrink seen on an export replaced meanwhile counts for the volume it
// served, not for its name: a volume made anew under the name keeps its
// clients and its ID, and the same volume opened anew (lvnbd recover) is
// cut and counted all the same, its clients cut even while the count
// fails.
func TestCountShrinkFollowsTheVolume(t *testing.T) {
	for _, madeAnew := range []bool{true, false} {
		t.Run(fmt.Sprintf("made anew %v", madeAnew), func(t *testing.T) {
			ctx := context.Background()
			drv := &failingCounter{Driver: newFileDriver(t)}
			vols, ts, _ := observedVolumes(t, drv)
			v, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20})
			if err != nil {
				t.Fatal(err)
			}
			seen, _ := ts.reg.Lookup("vm1") // the export the shrink was seen on
			if madeAnew {
				if err := vols.Remove(ctx, "vm1", true); err != nil {
					t.Fatal(err)
				}
				if v, err = vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
					t.Fatal(err)
				}
			} else {
				// Opened anew under the same description, as a recovery does.
				vols.mu.Lock()
				vols.retireLocked("vm1")
				vols.mu.Unlock()
				if err := vols.Sync(ctx); err != nil {
					t.Fatal(err)
				}
			}
			c := dialRaw(t, ts.addr)
			c.open("vm1", false)
			drv.fail.Store(true)
			vols.shrinkHook(nbd.DescriptionID(seen.Description))(seen)
			vols.shrinks.Wait()
			if madeAnew {
				expectConnected(t, c)
				expectExportID(t, ts.reg, "vm1", v.ID)
				// Nothing has the old ID: forgotten.
				if left := vols.pending.list(); len(left) != 0 {
					t.Errorf("shrinks still noted: %v", left)
				}
				return
			}
			c.expectClosed()
			if _, ok := ts.reg.Lookup("vm1"); ok {
				t.Fatal("vm1 exported while its shrink is not counted")
			}
			drv.fail.Store(false)
			if err := vols.Sync(ctx); err != nil {
				t.Fatal(err)
			}
			expectExportID(t, ts.reg, "vm1", v.ID+"-r1")
		})
	}
}

// A shrink is noted the moment it is seen, not once its count gets the
// lock a sync or a recovery may hold for long: the shrink file lists it (a
// server killed meanwhile leaves it there), and a sync that runs first (a
// recovery's, which opens the export anew) counts it before it exports
// anything, never serving the volume, grown back, under its old ID.
func TestShrinkIsNotedBeforeItsCountGetsTheLock(t *testing.T) {
	ctx := context.Background()
	vols, ts, _ := observedVolumes(t, newFileDriver(t))
	v, e, file := shrunkBehind(t, vols, ts)
	vols.mu.Lock() // a recovery, say, holds it
	if _, err := e.refreshSize(zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	var listed map[string]string
	if err := atomicfile.ReadJSON(file, &listed); err != nil || listed["vm1"] != v.ID {
		t.Errorf("shrink file while the count waits: %v, %v; want vm1 with ID %s", listed, err, v.ID)
	}
	if err := os.Truncate(v.Path, 2<<20); err != nil { // grown back
		t.Fatal(err)
	}
	// The recovery's sync reopens the export: under the new ID only.
	vols.retireLocked("vm1")
	if r := vols.syncLocked(ctx); r.all() != nil {
		t.Fatal(r.all())
	}
	now, ok := ts.reg.Lookup("vm1")
	vols.mu.Unlock()
	vols.shrinks.Wait()
	if !ok {
		t.Fatal("vm1 not exported by the sync")
	}
	if got, want := nbd.DescriptionID(now.Description), v.ID+"-r1"; got != want {
		t.Errorf("vm1 reopened while its count waited carries ID %q, want %q", got, want)
	}
	expectExportID(t, ts.reg, "vm1", v.ID+"-r1") // and after the count
}

// A shrink whose count gets the lock after Stop is counted, so the volume's
// ID changes as the shrink demands, and nothing is exported again: the
// server is stopping. Stop returns once that count is done.
func TestStopCountsAShrinkWithoutExportingIt(t *testing.T) {
	ctx := context.Background()
	drv := newFileDriver(t)
	vols, ts, _ := observedVolumes(t, drv)
	v, e, file := shrunkBehind(t, vols, ts)
	vols.mu.Lock() // the count waits for it
	if _, err := e.refreshSize(zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	vols.stopping = true // what Stop does first, before the count gets the lock
	vols.mu.Unlock()
	vols.Stop()

	if _, ok := ts.reg.Lookup("vm1"); ok {
		t.Error("vm1 exported again by a count after Stop")
	}
	list, err := drv.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].ID != v.ID+"-r1" {
		t.Errorf("volumes once Stop returned: %+v; want vm1 with ID %s-r1 (the shrink counted)", list, v.ID)
	}
	var pending map[string]string
	if err := atomicfile.ReadJSON(file, &pending); err != nil || len(pending) != 0 {
		t.Errorf("shrink file once Stop returned: %v, %v; want it empty", pending, err)
	}
}

// shrunkBehind makes vols' volume vm1 of 2 MiB, exported (e), with the
// shrinks seen kept in file, and shrinks it to 1 MiB behind the server,
// which has not looked yet.
func shrunkBehind(t *testing.T, vols *Volumes, ts *testServer) (v volume.Volume, e *Export, file string) {
	t.Helper()
	file = filepath.Join(t.TempDir(), "shrinks.json")
	if err := vols.KeepShrinks(file); err != nil {
		t.Fatal(err)
	}
	v, err := vols.Create(context.Background(), volume.CreateOptions{Name: "vm1", Size: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	e, _ = ts.reg.Lookup("vm1")
	if err := os.Truncate(v.Path, 1<<20); err != nil {
		t.Fatal(err)
	}
	return v, e, file
}

// A shrink seen once Stop returned (the server's connections still drain)
// is counted, and nothing is exported again.
func TestShrinkAfterStopIsCountedNotExported(t *testing.T) {
	ctx := context.Background()
	drv := newFileDriver(t)
	vols, ts, _ := observedVolumes(t, drv)
	v, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	e, _ := ts.reg.Lookup("vm1")
	vols.Stop()
	if err := os.Truncate(v.Path, 1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := e.refreshSize(zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	vols.shrinks.Wait()
	if _, ok := ts.reg.Lookup("vm1"); ok {
		t.Error("vm1 exported again by a count after Stop")
	}
	if list, err := drv.List(ctx); err != nil || len(list) != 1 || list[0].ID != v.ID+"-r1" {
		t.Errorf("volumes: %+v, %v; want vm1 with ID %s-r1 (the shrink counted)", list, err, v.ID)
	}
}

// listHookDriver runs hook inside its List calls, the nth onwards.
type listHookDriver struct {
	*file.Driver
	calls, from int
	hook        func()
}

func (d *listHookDriver) List(ctx context.Context) ([]volume.Volume, error) {
	d.calls++
	if d.hook != nil && d.calls >= d.from {
		d.hook()
	}
	return d.Driver.List(ctx)
}

// A shrink noted while a sync opens the volume (between its listing and
// the export's offer) keeps the export from being offered under the old ID.
func TestShrinkNotedDuringAnOpenIsNotOffered(t *testing.T) {
	ctx := context.Background()
	drv := &listHookDriver{Driver: newFileDriver(t)}
	vols, ts, _ := observedVolumes(t, drv)
	v, err := drv.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	drv.from, drv.hook = drv.calls+2, func() { vols.pending.add("vm1", v.ID) } // addOpened's listing
	err = vols.Sync(ctx)
	if err == nil || !strings.Contains(err.Error(), "shrank behind the server while it was being opened") {
		t.Errorf("sync: %v", err)
	}
	if _, ok := ts.reg.Lookup("vm1"); ok {
		t.Error("vm1 offered under its old ID with a shrink noted")
	}
}

// A shrink seen keeps the export shut until it is replaced under another
// ID: an operation that shut it and then gives up (a merge refused for the
// snapshot's clients) does not let a client in under the old ID.
func TestLetInKeepsAShrunkExportShut(t *testing.T) {
	ctx := context.Background()
	vols, ts, _ := observedVolumes(t, newFileDriver(t))
	v, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	e, _ := ts.reg.Lookup("vm1")
	if err := os.Truncate(v.Path, 1<<20); err != nil {
		t.Fatal(err)
	}
	vols.mu.Lock() // holds the count back
	if _, err := e.refreshSize(zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	e.letIn()
	c := dialRaw(t, ts.addr)
	c.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
	b, _ := nbd.InfoRequest{Name: "vm1"}.AppendBinary(nil)
	c.sendOption(nbd.OptGo, b)
	replies := c.optionReplies(nbd.OptGo)
	vols.mu.Unlock()
	vols.shrinks.Wait()
	for _, r := range replies {
		if r.typ == nbd.RepAck {
			t.Fatal("a client entered the shrunk export before the shrink was counted")
		}
	}
}

// A shrink whose count failed is kept in the shrink file: a server started
// after it still does not export the volume under its old ID, and counts it.
func TestUncountedShrinkOutlivesARestart(t *testing.T) {
	ctx := context.Background()
	drv := &failingCounter{Driver: newFileDriver(t)}
	file := filepath.Join(t.TempDir(), "state", "shrinks.json")
	vols, _, _ := observedVolumes(t, drv)
	if err := vols.KeepShrinks(file); err != nil {
		t.Fatal(err)
	}
	v, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	drv.fail.Store(true)
	if err := os.Truncate(v.Path, 1<<20); err != nil {
		t.Fatal(err)
	}
	vols.Sync(ctx) // sees the shrink
	vols.shrinks.Wait()
	if err := os.Truncate(v.Path, 2<<20); err != nil { // grown back
		t.Fatal(err)
	}

	// The next server, its count failing too.
	vols2, ts2, _ := observedVolumes(t, drv)
	if err := vols2.KeepShrinks(file); err != nil {
		t.Fatal(err)
	}
	if err := vols2.Sync(ctx); err == nil || !strings.Contains(err.Error(), "not exporting vm1: it shrank behind the server") {
		t.Errorf("first sync of the next server: %v", err)
	}
	if _, ok := ts2.reg.Lookup("vm1"); ok {
		t.Fatal("the next server exported vm1 before its shrink was counted")
	}
	drv.fail.Store(false)
	if err := vols2.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	expectExportID(t, ts2.reg, "vm1", v.ID+"-r1")
	// Recorded before the count starts: a server killed during the count
	// leaves it in the file.
	if err := os.Truncate(v.Path, 1<<20); err != nil {
		t.Fatal(err)
	}
	drv.counting = make(chan chan struct{})
	go vols2.Sync(ctx) // sees the shrink
	release := <-drv.counting
	var listed map[string]string
	if err := atomicfile.ReadJSON(file, &listed); err != nil || listed["vm1"] != v.ID+"-r1" {
		t.Errorf("shrink file during the count: %v, %v; want vm1 with ID %s", listed, err, v.ID+"-r1")
	}
	close(release)
	vols2.shrinks.Wait()
	drv.counting = nil
	// Counted: the file lists nothing more.
	vols3, _, _ := observedVolumes(t, drv)
	if err := vols3.KeepShrinks(file); err != nil {
		t.Fatal(err)
	}
	if left := vols3.pending.list(); len(left) != 0 {
		t.Errorf("the shrink file still lists %v after the count", left)
	}
	// One that does not parse stops the start, saying what it is.
	if err := os.WriteFile(file, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := vols3.KeepShrinks(file); err == nil || !strings.Contains(err.Error(), "shrank behind the server") {
		t.Errorf("KeepShrinks of a corrupt file: %v", err)
	}
}

// failingCounter is a file driver whose rollback counts fail while fail is
// set; with counting set, a count first waits on it.
type failingCounter struct {
	*file.Driver
	fail     atomic.Bool
	counting chan chan struct{}
}

func (d *failingCounter) CountRollback(ctx context.Context, name, id string) (bool, error) {
	if d.counting != nil {
		release := make(chan struct{})
		d.counting <- release
		<-release
	}
	if d.fail.Load() {
		return false, errors.New("lvchange: Volume group vg0 is locked")
	}
	return d.Driver.CountRollback(ctx, name, id)
}

// Until a shrink behind the server is counted, the volume is not exported:
// under the old ID a dom0 leg would take it back. Each sync tries again.
func TestShrinkNotCountedIsNotExported(t *testing.T) {
	ctx := context.Background()
	drv := &failingCounter{Driver: newFileDriver(t)}
	vols, ts, _ := observedVolumes(t, drv)
	v, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vols.Create(ctx, volume.CreateOptions{Name: "vm2", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	drv.fail.Store(true)
	if err := os.Truncate(v.Path, 1<<20); err != nil {
		t.Fatal(err)
	}
	err = vols.Sync(ctx) // sees the shrink
	vols.shrinks.Wait()
	if err != nil {
		t.Fatal(err)
	}
	err = vols.Sync(ctx)
	if err == nil || !strings.Contains(err.Error(), "not exporting vm1: it shrank behind the server") ||
		!strings.Contains(err.Error(), "Volume group vg0 is locked") {
		t.Errorf("sync while the count fails: %v", err)
	}
	if _, ok := ts.reg.Lookup("vm1"); ok {
		t.Error("vm1 exported before its shrink was counted")
	}
	if _, ok := ts.reg.Lookup("vm2"); !ok {
		t.Error("vm2 not exported while vm1's count fails")
	}
	drv.fail.Store(false)
	if err := vols.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	expectExportID(t, ts.reg, "vm1", v.ID+"-r1")
}

// hiddenSnapshotDriver refuses to remove a volume for a snapshot its Get
// does not show, as the LVM driver does for one an admin made.
type hiddenSnapshotDriver struct{ *file.Driver }

func (d hiddenSnapshotDriver) CheckRemove(ctx context.Context, name string) error {
	return fmt.Errorf("volume %s %w (vg0/backup (not lvnbd's))", name, volume.ErrHasSnapshots)
}

func (d hiddenSnapshotDriver) Remove(ctx context.Context, name string) error {
	return d.CheckRemove(ctx, name)
}

// A forced removal the driver would refuse anyway is refused before the
// volume's clients are disconnected.
func TestForcedRemoveRefusedBeforeClientsAreCut(t *testing.T) {
	ctx := context.Background()
	vols, ts, _ := observedVolumes(t, hiddenSnapshotDriver{newFileDriver(t)})
	if _, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	c := dialRaw(t, ts.addr)
	c.open("vm1", false)
	if err := vols.Remove(ctx, "vm1", true); !errors.Is(err, volume.ErrHasSnapshots) {
		t.Errorf("forced remove: %v, want ErrHasSnapshots", err)
	}
	expectConnected(t, c)
}

// madeAnewAfterList is an idDriver whose volume is made anew (another ID)
// right after a listing, once: between the sync's listing and its open.
type madeAnewAfterList struct {
	*idDriver
	once sync.Once
}

func (d *madeAnewAfterList) List(ctx context.Context) ([]volume.Volume, error) {
	vols, err := d.idDriver.List(ctx)
	d.once.Do(func() { d.setID("vm1", "uuid-2") })
	return vols, err
}

// A volume made anew after a sync listed it and before it opened it is not
// exported under the ID of the one listed: the sync leaves it to the next,
// which exports it with its own.
func TestVolumeMadeAnewWhileOpenedIsNotExportedUnderTheOldID(t *testing.T) {
	ctx := context.Background()
	fd := newFileDriver(t)
	if _, err := fd.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	drv := &madeAnewAfterList{idDriver: &idDriver{Driver: fd, ids: map[string]string{"vm1": "uuid-1"}}}
	vols, ts, _ := observedVolumes(t, drv)
	err := vols.Sync(ctx)
	if err == nil || !strings.Contains(err.Error(), "changed while it was being opened") {
		t.Errorf("first sync: %v, want vm1 left for the next", err)
	}
	if e, ok := ts.reg.Lookup("vm1"); ok {
		t.Fatalf("vm1 exported as %q by the sync that saw it change", e.Description)
	}
	if err := vols.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	e, ok := ts.reg.Lookup("vm1")
	if !ok || nbd.DescriptionID(e.Description) != "uuid-2" {
		t.Fatalf("vm1 after the next sync: %v %+v, want it exported with uuid-2", ok, e)
	}
}

// TestRecoverTellsTheVolumesID: a failed volume recovered after it was made
// anew behind the server is served with the new volume's ID, never the
// failed one's, so a dom0 that knew the old volume refuses it; one made anew
// while it is reopened is not recovered. A failed volume removed behind the
// server only has its record cleared.
func TestRecoverTellsTheVolumesID(t *testing.T) {
	ctx := context.Background()
	drv := &idDriver{Driver: newFileDriver(t), ids: map[string]string{"vm1": "uuid-1", "vm2": "uuid-2", "vm3": "uuid-3"}}
	vols, ts, _ := observedVolumes(t, drv)
	failures, err := LoadFailures(filepath.Join(t.TempDir(), "failures.json"), nil)
	if err != nil {
		t.Fatal(err)
	}
	ts.reg.KeepFailures(failures)
	eio := fmt.Errorf("fdatasync: %w", syscall.EIO)
	for _, name := range []string{"vm1", "vm2", "vm3"} {
		if _, err := vols.Create(ctx, volume.CreateOptions{Name: name, Size: 1 << 20}); err != nil {
			t.Fatal(err)
		}
		e, _ := ts.reg.Lookup(name)
		failures.record(name, e.Description, eio)
		e.Backend.(*backend.File).MarkFailed(eio)
	}
	recovered := func(name, wantID string) {
		t.Helper()
		res, err := vols.Recover(ctx, name)
		if err != nil || !res.Reopened {
			t.Fatalf("Recover(%s) = %+v, %v; want it reopened", name, res, err)
		}
		e, _ := ts.reg.Lookup(name)
		if id := nbd.DescriptionID(e.Description); id != wantID {
			t.Errorf("recovered %s is described %q (ID %q), want ID %s", name, e.Description, id, wantID)
		}
		if got := readErrno(e); got != 0 {
			t.Errorf("a read of the recovered %s got errno %d", name, got)
		}
	}

	// Made anew since the last rescan.
	drv.setID("vm1", "uuid-1b")
	recovered("vm1", "uuid-1b")

	// Made anew just as it is opened again: what was opened may be either
	// volume, so nothing is; the next recovery finds the new one.
	open := openBackend
	openBackend = func(path string, readOnly bool) (Backend, error) {
		drv.setID("vm2", "uuid-2b")
		return open(path, readOnly)
	}
	if _, err := vols.Recover(ctx, "vm2"); err == nil || !strings.Contains(err.Error(), "changed while it was being recovered") {
		t.Errorf("Recover of vm2 made anew as it was opened: %v, want it refused", err)
	}
	openBackend = open
	if e, _ := ts.reg.Lookup("vm2"); nbd.DescriptionID(e.Description) != "uuid-2" {
		t.Errorf("vm2 after the refused recovery is described %q, want the failed export left as it was", e.Description)
	}
	recovered("vm2", "uuid-2b")

	// Removed behind the server.
	if err := drv.Driver.Remove(ctx, "vm3"); err != nil {
		t.Fatal(err)
	}
	res, err := vols.Recover(ctx, "vm3")
	if err != nil || res.Reopened || !strings.Contains(res.Failure, "fdatasync") {
		t.Fatalf("Recover of removed vm3 = %+v, %v; want the record cleared and nothing reopened", res, err)
	}
	if _, ok := ts.reg.Lookup("vm3"); ok {
		t.Error("vm3 is still exported after its volume was removed")
	}
	if got := failures.List(); len(got) != 0 {
		t.Errorf("records after recovering all three: %+v", got)
	}
}

// TestRecoverWatchesTheExportItOpened: the device watch follows a recovered
// volume to the export opened anew (its resizes are judged against that
// export's size), and a recovery during which a shrink of the volume is
// noted reopens nothing, as a sync would not.
func TestRecoverWatchesTheExportItOpened(t *testing.T) {
	ctx := context.Background()
	dev := unix.Mkdev(253, 3)
	vols, ts, _ := observedVolumes(t, newFileDriver(t))
	vols.deviceOf = func(*Export) (uint64, bool) { return dev, true } // an LV's
	failures, err := LoadFailures(filepath.Join(t.TempDir(), "failures.json"), nil)
	if err != nil {
		t.Fatal(err)
	}
	ts.reg.KeepFailures(failures)
	v, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	eio := fmt.Errorf("fdatasync: %w", syscall.EIO)
	fail := func() *Export {
		t.Helper()
		e, _ := ts.reg.Lookup("vm1")
		failures.record("vm1", e.Description, eio)
		e.Backend.(*backend.File).MarkFailed(eio)
		return e
	}
	watched := func() *Export {
		vols.watchMu.Lock()
		defer vols.watchMu.Unlock()
		return vols.devs[dev]
	}

	failed := fail()
	if res, err := vols.Recover(ctx, "vm1"); err != nil || !res.Reopened {
		t.Fatalf("Recover = %+v, %v; want vm1 reopened", res, err)
	}
	now := expectExportID(t, ts.reg, "vm1", v.ID)
	if now == failed {
		t.Fatal("the recovery reopened nothing")
	}
	if w := watched(); w != now {
		t.Errorf("the device watch leads to %p, want the export opened anew (%p), not the failed one (%p)", w, now, failed)
	}

	// A shrink noted while the recovery opens the volume.
	failed = fail()
	open := openBackend
	openBackend = func(path string, readOnly bool) (Backend, error) {
		vols.pending.add("vm1", v.ID)
		return open(path, readOnly)
	}
	if _, err := vols.Recover(ctx, "vm1"); err == nil || !strings.Contains(err.Error(), "changed while it was being recovered") {
		t.Errorf("Recover with a shrink noted during the open: %v, want it refused", err)
	}
	openBackend = open
	if e, _ := ts.reg.Lookup("vm1"); e != failed {
		t.Error("vm1 reopened under its old ID with a shrink noted")
	}
	if w := watched(); w != failed {
		t.Error("a refused recovery moved the device watch")
	}
	vols.pending.forget("vm1", v.ID)

	// A shrink grown back that the failed export could not judge (its
	// backend closed when the watch read the event): the export opened
	// anew judges it, from where the failed one's watch was (event 10),
	// not from its own open, after the event.
	vols.mu.Lock()
	vols.unwatch(failed)
	vols.watch(failed, openSeqs{10, 20})
	vols.mu.Unlock()
	for _, size := range []int64{512 << 10, 1 << 20} {
		if err := os.Truncate(v.Path, size); err != nil {
			t.Fatal(err)
		}
	}
	b := failed.Backend
	failed.Backend = refreshHook{b, func() (int64, error) { return 0, os.ErrClosed }}
	vols.deviceChanged(change(dev, 21, true))
	failed.Backend = b
	if res, err := vols.Recover(ctx, "vm1"); err != nil || !res.Reopened {
		t.Fatalf("Recover = %+v, %v; want vm1 reopened", res, err)
	}
	vols.shrinks.Wait()
	expectExportID(t, ts.reg, "vm1", v.ID+"-r1")
}

// TestInterruptedMergeFinishedBeforeExport: lvnbd crashed in a merge after
// recording it and before renaming the snapshot over the volume. The
// restarted server exports the merged volume, and what its clients write
// stays in the volume's file when the volumes change next.
func TestInterruptedMergeFinishedBeforeExport(t *testing.T) {
	ctx := context.Background()
	drv := newFileDriver(t)
	vol, err := drv.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	writeFileAt(t, vol.Path, []byte("SNAPPED"), 0)
	if _, err := drv.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s"}); err != nil {
		t.Fatal(err)
	}
	writeFileAt(t, vol.Path, []byte("LIVEDAT"), 0)
	markMerging(t, filepath.Join(drv.Dir(), "lvnbd.json"), "vm1", "s") // and crash

	vols, ts, _ := observedVolumes(t, drv) // the restarted server
	if err := vols.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if got := readExport(t, ts, "vm1", 7); got != "SNAPPED" {
		t.Fatalf("the restarted server exports vm1 starting %q, want the merged %q", got, "SNAPPED")
	}
	c := dialRaw(t, ts.addr)
	c.open("vm1", false)
	c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Flags: nbd.CmdFlagFUA, Handle: 1, Length: 5}, []byte("AFTER"))
	if r := c.simpleReply(0); r.errno != 0 {
		t.Fatal(r.errno)
	}
	if _, err := vols.Create(ctx, volume.CreateOptions{Name: "vm2", Size: 4096}); err != nil {
		t.Fatal(err)
	}
	expectConnected(t, c)
	disk, err := os.ReadFile(vol.Path)
	if err != nil {
		t.Fatal(err)
	}
	if string(disk[:7]) != "AFTERED" {
		t.Errorf("vm1.img starts %q, want %q: the acknowledged write went to a file the merge renamed away", disk[:7], "AFTERED")
	}
}

// markMerging records a merge of vol@snap in the file driver's lvnbd.json,
// as MergeSnapshot does before it renames.
func markMerging(t *testing.T, path, vol, snap string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	sm, ok := m["volumes"].(map[string]any)[vol].(map[string]any)["snapshots"].(map[string]any)[snap].(map[string]any)
	if !ok {
		t.Fatalf("no snapshot %s@%s in %s", vol, snap, b)
	}
	sm["merging"] = true
	if b, err = json.Marshal(m); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestForcedChangeRefusedBeforeDisconnecting: --force disconnects clients
// for a change that happens, not for one refused anyway.
func TestForcedChangeRefusedBeforeDisconnecting(t *testing.T) {
	tests := []struct {
		name   string
		change func(ctx context.Context, v *Volumes) error
		want   error
	}{
		{"remove a volume with snapshots", func(ctx context.Context, v *Volumes) error {
			return v.Remove(ctx, "vm1", true)
		}, volume.ErrHasSnapshots},
		{"merge a snapshot that does not exist", func(ctx context.Context, v *Volumes) error {
			return v.MergeSnapshot(ctx, "vm1", "nope", true)
		}, volume.ErrNotFound},
		{"merge an invalid snapshot name", func(ctx context.Context, v *Volumes) error {
			return v.MergeSnapshot(ctx, "vm1", "-x", true)
		}, volume.ErrInvalidName},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			vols, ts := startVolumes(t)
			if _, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
				t.Fatal(err)
			}
			if _, err := vols.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s"}); err != nil {
				t.Fatal(err)
			}
			c := dialRaw(t, ts.addr)
			c.open("vm1", false)
			if err := tt.change(ctx, vols); !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			expectConnected(t, c)
		})
	}
}

// TestShrinkInUse: a shrink takes the end of the volume from under its
// clients, so like a removal it is refused while they are connected,
// unless force disconnects them.
func TestShrinkInUse(t *testing.T) {
	const size = 2 << 20
	tests := []struct {
		name             string
		to               int64
		allowShrink      bool
		force            bool
		wantErr          error
		wantSize         int64
		wantDisconnected bool
	}{
		{"shrink refused", size / 2, true, false, ErrInUse, size, false},
		{"shrink forced", size / 2, true, true, nil, size / 2, true},
		{"shrink not allowed", size / 2, false, true, volume.ErrShrink, size, false},
		{"grow", size * 2, false, false, nil, size * 2, false},
		{"a smaller size that rounds to the same", size - 100, true, false, nil, size, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			vols, ts := startVolumes(t)
			if _, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: size}); err != nil {
				t.Fatal(err)
			}
			c := dialRaw(t, ts.addr)
			c.open("vm1", false)
			_, err := vols.Resize(ctx, "vm1", tt.to, tt.allowShrink, tt.force)
			if tt.wantErr == nil && err != nil || !errors.Is(err, tt.wantErr) {
				t.Fatalf("Resize: %v, want %v", err, tt.wantErr)
			}
			if tt.wantErr == ErrInUse && !strings.Contains(err.Error(), "127.0.0.1") {
				t.Errorf("Resize: %v, want the client named", err)
			}
			if tt.wantDisconnected {
				c.expectClosed()
			} else {
				expectConnected(t, c)
			}
			if got := exportSize(t, ts, "vm1"); got != uint64(tt.wantSize) {
				t.Errorf("vm1 exported with %d bytes, want %d", got, tt.wantSize)
			}
		})
	}
}

// brokenDriver lists a volume whose file cannot be opened.
type brokenDriver struct {
	*file.Driver
	broken string
}

func (d *brokenDriver) List(ctx context.Context) ([]volume.Volume, error) {
	vols, err := d.Driver.List(ctx)
	return append(vols, volume.Volume{Name: d.broken, Size: 4096, Path: filepath.Join(d.Dir(), "missing", d.broken+".img")}), err
}

// TestChangeIgnoresOtherExportsErrors: a change that worked is not reported
// as failed because another volume cannot be exported; that is logged,
// naming that volume.
func TestChangeIgnoresOtherExportsErrors(t *testing.T) {
	tests := []struct {
		name   string
		change func(ctx context.Context, v *Volumes) error
	}{
		{"create", func(ctx context.Context, v *Volumes) error {
			_, err := v.Create(ctx, volume.CreateOptions{Name: "vm2", Size: 4096})
			return err
		}},
		{"resize", func(ctx context.Context, v *Volumes) error {
			_, err := v.Resize(ctx, "vm1", 2<<20, false, false)
			return err
		}},
		{"snapshot", func(ctx context.Context, v *Volumes) error {
			_, err := v.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s2"})
			return err
		}},
		{"remove", func(ctx context.Context, v *Volumes) error { return v.Remove(ctx, "vm3", false) }},
		{"remove snapshot", func(ctx context.Context, v *Volumes) error { return v.RemoveSnapshot(ctx, "vm1", "s", false) }},
		{"merge", func(ctx context.Context, v *Volumes) error { return v.MergeSnapshot(ctx, "vm1", "s", false) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			drv := &brokenDriver{Driver: newFileDriver(t), broken: "broken"}
			if _, err := drv.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
				t.Fatal(err)
			}
			if _, err := drv.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s"}); err != nil {
				t.Fatal(err)
			}
			if _, err := drv.Create(ctx, volume.CreateOptions{Name: "vm3", Size: 4096}); err != nil {
				t.Fatal(err)
			}
			vols, _, logs := observedVolumes(t, drv)
			if err := vols.Sync(ctx); err == nil || !strings.Contains(err.Error(), "broken") {
				t.Fatalf("Sync: %v, want an error about the broken volume", err)
			}
			if err := tt.change(ctx, vols); err != nil {
				t.Errorf("%s: %v, want no error: only another volume failed", tt.name, err)
			}
			warned := logs.FilterLevelExact(zapcore.WarnLevel).FilterField(zap.String("export", "broken"))
			if warned.Len() != 1 {
				t.Errorf("%d warnings naming the broken volume, want 1: %v", warned.Len(), logs.All())
			}
		})
	}
	t.Run("own error", func(t *testing.T) {
		ctx := context.Background()
		drv := &brokenDriver{Driver: newFileDriver(t), broken: "vm2"}
		vols, _, _ := observedVolumes(t, drv)
		_, err := vols.Create(ctx, volume.CreateOptions{Name: "vm2", Size: 4096})
		if err == nil || !strings.Contains(err.Error(), "exporting vm2") {
			t.Errorf("Create of a volume that cannot be exported: %v, want the error exporting it", err)
		}
	})
}

// TestUnreadableVolumeIsLeftAsItIs: a volume the driver lists with a
// Problem (here its file was deleted by hand while exported) keeps its
// export and clients as they are, and so does its snapshot; every other
// volume is still brought in step, so a volume merged outside lvnbd still
// has its clients stopped. Before, the listing failed and no rescan changed
// anything.
func TestUnreadableVolumeIsLeftAsItIs(t *testing.T) {
	ctx := context.Background()
	drv := &mergeLaterDriver{Driver: newFileDriver(t), pending: map[string]string{}}
	vols, ts, _ := observedVolumes(t, drv)
	createWithSnapshot(t, vols)
	for _, name := range []string{"vm2", "merged"} {
		if _, err := vols.Create(ctx, volume.CreateOptions{Name: name, Size: 4096}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := vols.Snapshot(ctx, volume.SnapshotOptions{Volume: "merged", Name: "s"}); err != nil {
		t.Fatal(err)
	}
	kept := dialRaw(t, ts.addr)
	kept.open("vm1", false)
	cut := dialRaw(t, ts.addr)
	cut.open("merged", false)
	exported, _ := ts.reg.Lookup("vm1")

	// Behind the server: vm1's and vm1@s's files deleted, vm2 removed,
	// vm3 created, a merge into "merged" started.
	for _, path := range []string{drv.Path("vm1"), drv.Path("vm1@s")} {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
	}
	if err := drv.Remove(ctx, "vm2"); err != nil {
		t.Fatal(err)
	}
	if _, err := drv.Create(ctx, volume.CreateOptions{Name: "vm3", Size: 4096}); err != nil {
		t.Fatal(err)
	}
	if err := drv.MergeSnapshot(ctx, "merged", "s"); !errors.Is(err, volume.ErrMergePending) {
		t.Fatal(err)
	}

	err := vols.Sync(ctx)
	if !errors.Is(err, volume.ErrUnreadable) || !strings.Contains(err.Error(), "left as it is") || errors.Is(err, ErrListingVolumes) {
		t.Fatalf("Sync: %v, want vm1 unreadable and its export left as it is, not a failed listing", err)
	}
	for _, name := range []string{"vm1", "vm1@s"} {
		if !strings.Contains(err.Error(), name+" cannot be read") {
			t.Errorf("Sync: %v, want it to name %s", err, name)
		}
	}
	if e, _ := ts.reg.Lookup("vm1"); e != exported {
		t.Error("vm1's export was replaced or removed")
	}
	if _, ok := ts.reg.Lookup("vm1@s"); !ok {
		t.Error("vm1@s's export was removed")
	}
	expectConnected(t, kept)
	if _, ok := ts.reg.Lookup("vm2"); ok {
		t.Error("vm2 still exported after it was removed")
	}
	if _, ok := ts.reg.Lookup("vm3"); !ok {
		t.Error("vm3 not exported after it was created")
	}
	cut.expectClosed()
	if _, err := vols.Recover(ctx, "vm1"); !errors.Is(err, volume.ErrUnreadable) {
		t.Errorf("Recover of an unreadable volume: %v, want ErrUnreadable", err)
	}
	if e, _ := ts.reg.Lookup("vm1"); e != exported {
		t.Error("vm1's export was replaced or removed by Recover")
	}
	// What the problem says to do works through the server: its client
	// cut (forced), the snapshot removed, then the volume.
	if err := vols.RemoveSnapshot(ctx, "vm1", "s", true); err != nil {
		t.Errorf("RemoveSnapshot of an unreadable snapshot: %v", err)
	}
	if err := vols.Remove(ctx, "vm1", true); err != nil {
		t.Errorf("Remove of an unreadable volume: %v", err)
	}
	if _, ok := ts.reg.Lookup("vm1"); ok {
		t.Error("vm1 still exported after its removal")
	}

	// A volume that is unreadable from the start is not exported.
	drv2 := newFileDriver(t)
	for _, name := range []string{"ok", "gone"} {
		if _, err := drv2.Create(ctx, volume.CreateOptions{Name: name, Size: 4096}); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Remove(drv2.Path("gone")); err != nil {
		t.Fatal(err)
	}
	vols2, ts2, _ := observedVolumes(t, drv2)
	if err := vols2.Sync(ctx); !errors.Is(err, volume.ErrUnreadable) {
		t.Errorf("Sync: %v, want gone unreadable", err)
	}
	if _, ok := ts2.reg.Lookup("ok"); !ok {
		t.Error("ok not exported beside an unreadable volume")
	}
	if _, ok := ts2.reg.Lookup("gone"); ok {
		t.Error("gone exported though its file is gone")
	}
}

// The failure record of a static --export is its own, also while the export
// is only configured (its file could not be opened, or a reload is
// replacing it): a volume of the same name neither clears it, being created
// (refused: it would not be exported) or removed, and the static export,
// opened again, is still failed.
func TestStaticExportKeepsItsRecordWhileAbsent(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	reg := failureRegistry(t, filepath.Join(dir, "failures.json"))
	img := filepath.Join(dir, "static-vm1.img")
	reg.Failures().record("vm1", img, syscall.EIO)

	drv := newFileDriver(t)
	vols := NewVolumes(drv, reg, nil)
	vols.SetReserved([]string{"vm1"})
	_, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20})
	if err == nil || !strings.Contains(err.Error(), "an --export (or [[export]]) of this server has that name") {
		t.Errorf("create of a static export's name: %v, want a refusal", err)
	}
	if _, err := drv.Get(ctx, "vm1"); err == nil {
		t.Error("the refused create made the volume anyway")
	}
	// One made behind the server, then removed through it.
	if _, err := drv.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := vols.Remove(ctx, "vm1", false); err != nil {
		t.Fatal(err)
	}
	if got := reg.Failures().List(); len(got) != 1 {
		t.Fatalf("records after the remove: %v, want the static export's", got)
	}
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if e := addAgain(t, reg, "vm1", img); readErrno(e) == 0 {
		t.Error("the static export vm1, failed before, is served as healthy again")
	}
}

// pausingBackend pauses one Refresh, once armed, after it stored the size.
type pausingBackend struct {
	*backend.File
	armed          atomic.Bool
	paused, resume chan struct{}
}

func (p *pausingBackend) Refresh() (int64, error) {
	n, err := p.File.Refresh()
	if p.armed.CompareAndSwap(true, false) {
		close(p.paused)
		<-p.resume
	}
	return n, err
}

// A shrink behind the server that someone else (a rescan) sees between a
// handshake's read of the size and its counting the client cuts the clients
// counted then, not this one: it must then be told the smaller size, never
// enter with the size the export lost. And the handshake that sees a shrink
// first cuts the other clients, not itself: told the smaller size, a dom0
// leg refuses it with the reason.
func TestHandshakeTellsTheSizeAfterAShrink(t *testing.T) {
	for _, opt := range []nbd.Option{nbd.OptGo, nbd.OptExportName} {
		t.Run(opt.String(), func(t *testing.T) {
			e, path := fileExport(t, "vm1", 2<<20, false)
			pb := &pausingBackend{File: e.Backend.(*backend.File), paused: make(chan struct{}), resume: make(chan struct{})}
			e.Backend = pb
			ts := startServer(t, nil, e)
			a := dialRaw(t, ts.addr)
			a.open("vm1", false)

			c := dialRaw(t, ts.addr)
			c.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
			pb.armed.Store(true)
			if opt == nbd.OptGo {
				b, _ := nbd.InfoRequest{Name: "vm1"}.AppendBinary(nil)
				c.sendOption(opt, b)
			} else {
				c.sendOption(opt, []byte("vm1"))
			}
			<-pb.paused // the handshake has read 2 MiB
			if err := os.Truncate(path, 1<<20); err != nil {
				t.Fatal(err)
			}
			if _, err := e.refreshSize(zap.NewNop()); err != nil { // the rescan
				t.Fatal(err)
			}
			a.expectClosed()
			close(pb.resume)
			var size uint64
			if opt == nbd.OptGo {
				for _, r := range c.optionReplies(opt) {
					var info nbd.Info
					if r.typ.IsError() {
						t.Fatalf("GO: %v %s", r.typ, r.data)
					}
					if r.typ == nbd.RepInfo && info.UnmarshalBinary(r.data) == nil && info.Type == nbd.InfoExport {
						size = info.Size
					}
				}
			} else {
				var rep nbd.ExportNameReply
				if err := rep.UnmarshalBinary(c.read(nbd.ExportNameReplySize)); err != nil {
					t.Fatal(err)
				}
				size = rep.Size
			}
			if size != 1<<20 {
				t.Errorf("%v during the shrink told the client %d bytes, want %d", opt, size, 1<<20)
			}

			// The next shrink is seen first by a handshake: it cuts c, and
			// tells the new client the smaller size.
			if err := os.Truncate(path, 512<<10); err != nil {
				t.Fatal(err)
			}
			d := dialRaw(t, ts.addr)
			if info := d.open("vm1", false); info.Size != 512<<10 {
				t.Errorf("the handshake that saw the shrink told %d bytes, want %d", info.Size, 512<<10)
			}
			c.expectClosed()
		})
	}
}

// An operation that needs an export unused checks for clients and shuts
// the door in one step (holdOff): a client coming after the check is
// refused as by a removed export, not let in to be cut without --force. An
// export in use is refused, naming its clients, and a door shut in vain
// (another export of the operation is in use) opens again.
func TestHoldOffRefusesNewClients(t *testing.T) {
	a, _ := fileExport(t, "a", 1<<20, false)
	b, _ := fileExport(t, "b", 1<<20, false)
	x, _ := fileExport(t, "x", 1<<20, false)
	ts := startServer(t, nil, a, b, x)
	user := dialRaw(t, ts.addr)
	user.open("b", false)

	vols := NewVolumes(newFileDriver(t), ts.reg, nil)
	vols.managed = map[string]bool{"a": true, "b": true, "x": true}
	if err := vols.holdOffUnused("merge", false, "a", "b"); !errors.Is(err, ErrInUse) {
		t.Fatalf("hold off with b in use: %v, want ErrInUse", err)
	}
	c := dialRaw(t, ts.addr)
	if info := c.open("a", false); info.Size != 1<<20 {
		t.Errorf("a after a hold-off refused for b: size %d", info.Size)
	}
	if err := vols.holdOffUnused("shrink volume", false, "a"); !errors.Is(err, ErrInUse) {
		t.Fatalf("hold off of a with a client: %v, want ErrInUse", err)
	}

	if err := vols.holdOffUnused("shrink volume", false, "x"); err != nil {
		t.Fatal(err)
	}
	d := dialRaw(t, ts.addr)
	d.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
	r := d.option(nbd.OptGo, nbd.InfoRequest{Name: "x"})
	if last := r[len(r)-1]; last.typ != nbd.RepErrUnknown || !strings.Contains(string(last.data), whyRetired) {
		t.Errorf("GO while x is held off: %v %q, want NBD_REP_ERR_UNKNOWN, %q", last.typ, last.data, whyRetired)
	}
	x.letIn()
	dialRaw(t, ts.addr).open("x", false)
}
