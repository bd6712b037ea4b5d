package server

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/volume"
	"github.com/lvnbd/lvnbd/volume/file"
)

func startVolumes(t *testing.T) (*Volumes, *testServer) {
	t.Helper()
	drv, err := file.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ts := startServer(t, nil)
	vols := NewVolumes(drv, ts.reg, zaptest.NewLogger(t))
	return vols, ts
}

func exportSize(t *testing.T, ts *testServer, name string) uint64 {
	t.Helper()
	c := dialRaw(t, ts.addr)
	c.greet(nbd.ClientFlagFixedNewstyle)
	for _, r := range c.option(nbd.OptInfo, nbd.InfoRequest{Name: name}) {
		var info nbd.Info
		if r.typ == nbd.RepInfo && info.UnmarshalBinary(r.data) == nil && info.Type == nbd.InfoExport {
			return info.Size
		}
		if r.typ.IsError() {
			t.Fatalf("NBD_OPT_INFO %q: %v %s", name, r.typ, r.data)
		}
	}
	t.Fatalf("no NBD_INFO_EXPORT for %q", name)
	return 0
}

func TestVolumesBecomeExports(t *testing.T) {
	ctx := context.Background()
	vols, ts := startVolumes(t)
	if _, err := vols.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if got := exportSize(t, ts, "vm1"); got != 1<<20 {
		t.Fatalf("vm1 size %d", got)
	}

	// A connected client; the volume grows; NBD_OPT_INFO sees the new size
	// and the connected client can write past the old end.
	c := dialRaw(t, ts.addr)
	c.open("vm1", false)
	if _, err := vols.Resize(ctx, "vm1", 2<<20, false, false); err != nil {
		t.Fatal(err)
	}
	if got := exportSize(t, ts, "vm1"); got != 2<<20 {
		t.Fatalf("after resize, vm1 size %d", got)
	}
	c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 1, Offset: 2<<20 - 4, Length: 4}, []byte("tail"))
	if res := c.simpleReply(0); res.errno != 0 {
		t.Fatalf("write into the grown part: %v", res.errno)
	}

	// Snapshots are read-only exports.
	if _, err := vols.Snapshot(ctx, volume.SnapshotOptions{Volume: "vm1", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	s := dialRaw(t, ts.addr)
	if info := s.open("vm1@s1", false); info.Flags&nbd.FlagReadOnly == 0 || info.Size != 2<<20 {
		t.Fatalf("snapshot export: %+v", info)
	}
	s.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: 2, Offset: 2<<20 - 4, Length: 4}, nil)
	if res := s.simpleReply(4); string(res.whole) != "tail" {
		t.Fatalf("snapshot reads %q", res.whole)
	}

	// Removing a snapshot or volume in use names the clients and refuses.
	err := vols.RemoveSnapshot(ctx, "vm1", "s1", false)
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "127.0.0.1") {
		t.Fatalf("removing a snapshot in use: %v", err)
	}
	if err := vols.RemoveSnapshot(ctx, "vm1", "s1", true); err != nil {
		t.Fatalf("forced snapshot removal: %v", err)
	}
	s.expectClosed()
	if err := vols.Remove(ctx, "vm1", false); !errors.Is(err, ErrInUse) {
		t.Fatalf("removing a volume in use: %v", err)
	}
	if err := vols.Remove(ctx, "vm1", true); err != nil {
		t.Fatalf("forced removal: %v", err)
	}
	c.expectClosed()
	if _, ok := ts.reg.Lookup("vm1"); ok {
		t.Fatal("vm1 still exported after removal")
	}
}

func TestVolumesSyncPicksUpOutsideChanges(t *testing.T) {
	ctx := context.Background()
	vols, ts := startVolumes(t)
	// Made through the driver directly, as another process would.
	if _, err := vols.Driver().Create(ctx, volume.CreateOptions{Name: "outside", Size: 4096}); err != nil {
		t.Fatal(err)
	}
	if _, ok := ts.reg.Lookup("outside"); ok {
		t.Fatal("exported before a sync")
	}
	if err := vols.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if got := exportSize(t, ts, "outside"); got != 4096 {
		t.Fatalf("size %d", got)
	}
	if err := vols.Driver().Remove(ctx, "outside"); err != nil {
		t.Fatal(err)
	}
	if err := vols.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if _, ok := ts.reg.Lookup("outside"); ok {
		t.Fatal("still exported after it was removed and synced")
	}
}

// A snapshot taken while clients write holds every write acknowledged
// before the snapshot was asked for.
func TestSnapshotsAreCrashConsistent(t *testing.T) {
	ctx := context.Background()
	const block, blocks = 4096, 1024
	vols, ts := startVolumes(t)
	if _, err := vols.Create(ctx, volume.CreateOptions{Name: "db", Size: block * blocks}); err != nil {
		t.Fatal(err)
	}
	// Two writers, each with its own connection and its half of the
	// volume, writing blocks stamped with a generation number, round
	// after round. acked[i] is the generation last acknowledged for block i.
	var acked [blocks]atomic.Uint64
	var writes atomic.Int64 // acknowledged writes, to know the writers are going
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 2 {
		c := dialRaw(t, ts.addr)
		c.open("db", false)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for gen := uint64(1); ; gen++ {
				for i := w * blocks / 2; i < (w+1)*blocks/2; i++ {
					select {
					case <-stop:
						return
					default:
					}
					buf := make([]byte, block)
					binary.BigEndian.PutUint64(buf, gen)
					binary.BigEndian.PutUint64(buf[8:], uint64(i))
					c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: gen, Offset: uint64(i * block), Length: block}, buf)
					if res := c.simpleReply(0); res.errno != 0 {
						t.Errorf("write: %v", res.errno)
						return
					}
					acked[i].Store(gen)
					writes.Add(1)
				}
			}
		}()
	}
	for round := range 5 {
		// Snapshot while the writers are busy: wait (bounded) for fresh
		// acknowledgements since the last round.
		from, deadline := writes.Load(), time.Now().Add(10*time.Second)
		for writes.Load() < from+200 {
			if time.Now().After(deadline) {
				t.Fatal("the writers stopped making progress")
			}
			time.Sleep(time.Millisecond)
		}
		var before [blocks]uint64
		for i := range before {
			before[i] = acked[i].Load()
		}
		snap, err := vols.Snapshot(ctx, volume.SnapshotOptions{Volume: "db", Name: fmt.Sprint("s", round)})
		if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(snap.Path)
		if err != nil {
			t.Fatal(err)
		}
		checked := 0
		for i := range blocks {
			b := data[i*block : (i+1)*block]
			gen := binary.BigEndian.Uint64(b)
			if gen < before[i] {
				t.Fatalf("snapshot %d: block %d has generation %d, but %d was acknowledged before the snapshot", round, i, gen, before[i])
			}
			if gen > 0 && binary.BigEndian.Uint64(b[8:]) != uint64(i) {
				t.Fatalf("snapshot %d: block %d is torn or misplaced", round, i)
			}
			if before[i] > 0 {
				checked++
			}
		}
		if checked == 0 {
			t.Fatalf("snapshot %d checked no acknowledged write: the writers made no progress", round)
		}
		t.Logf("snapshot %d: %d blocks with acknowledged writes verified", round, checked)
	}
	close(stop)
	wg.Wait()
}
