package boxcrash

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/lvnbd/lvnbd/volume"
)

// keeper is an in-memory volume.RunKeeper counting its durable changes and
// syncs.
type keeper struct {
	st      volume.RunState
	changes int
	fail    error
	syncs   int
	syncErr error
}

func (k *keeper) SyncAll(context.Context) error {
	k.syncs++
	return k.syncErr
}

func (k *keeper) UpdateRuns(_ context.Context, f func(*volume.RunState) (bool, error)) error {
	if k.fail != nil {
		return k.fail
	}
	st := volume.RunState{Epoch: k.st.Epoch, Runs: slices.Clone(k.st.Runs)}
	changed, err := f(&st)
	if err != nil || !changed {
		return err
	}
	k.st = st
	k.changes++
	return nil
}

const (
	boot1 = "3fa2b1c90d1e4f5a8b6c7d8e9f0a1b2c"
	boot2 = "9e8d7c6b5a4f4e3d9c2b1a0f9e8d7c6b"
)

// deadPID returns the PID of a process that has exited.
func deadPID(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid
}

func self(t *testing.T) volume.Run {
	t.Helper()
	r, err := Self()
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestSelf(t *testing.T) {
	r := self(t)
	b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if r.Boot != strings.ReplaceAll(strings.TrimSpace(string(b)), "-", "") || r.PID != os.Getpid() || r.PIDStart == 0 {
		t.Errorf("Self() = %+v; want this boot, pid %d and its start time", r, os.Getpid())
	}
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "sys/kernel/random"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "sys/kernel/random/boot_id"), []byte("not-a-uuid\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	old := procRoot
	procRoot = dir
	defer func() { procRoot = old }()
	if _, err := Self(); err == nil || !strings.Contains(err.Error(), "not a UUID") {
		t.Errorf("Self with boot ID not-a-uuid: %v", err)
	}
}

// The epoch changes exactly when the volumes were served when the box went
// down, in the same change that records the new server, and stays until the
// next such crash; a clean stop takes the record out.
func TestBeginEnd(t *testing.T) {
	ctx := context.Background()
	me := self(t)
	k := &keeper{}
	b, err := Begin(ctx, k, me)
	if err != nil || b.Epoch != "" || b.Crashed != nil {
		t.Fatalf("first Begin = %+v, %v; want no epoch, no crash", b, err)
	}
	if diff := cmp.Diff([]volume.Run{me}, k.st.Runs); diff != "" {
		t.Fatalf("runs while serving (-want +got):\n%s", diff)
	}
	if err := End(ctx, k, me); err != nil {
		t.Fatal(err)
	}
	if len(k.st.Runs) != 0 {
		t.Fatalf("runs after a clean stop: %+v", k.st.Runs)
	}

	// A server of another boot never stopped: the box went down under it.
	gone := volume.Run{Boot: boot1, PID: 100, PIDStart: 5}
	k.st.Runs = []volume.Run{gone}
	changes := k.changes
	b, err = Begin(ctx, k, me)
	if err != nil || len(b.Epoch) != 8 || !volume.ValidEpoch(b.Epoch) || !slices.Equal(b.Crashed, []volume.Run{gone}) {
		t.Fatalf("Begin after a crash = %+v, %v; want a new epoch and the crashed run", b, err)
	}
	if k.changes != changes+1 || k.st.Epoch != b.Epoch || !slices.Equal(k.st.Runs, []volume.Run{me}) {
		t.Fatalf("after Begin: %+v in %d changes; want the epoch and this server, the old run gone, in one change",
			k.st, k.changes-changes)
	}
	epoch := b.Epoch
	if err := End(ctx, k, me); err != nil {
		t.Fatal(err)
	}
	// Clean restarts keep the epoch.
	b, err = Begin(ctx, k, me)
	if err != nil || b.Epoch != epoch || b.Crashed != nil {
		t.Fatalf("Begin after a clean stop = %+v, %v; want epoch %s kept, no crash", b, err, epoch)
	}
	// Another crash draws another epoch.
	k.st.Runs = append(k.st.Runs, volume.Run{Boot: boot2, PID: 1})
	b, err = Begin(ctx, k, me)
	if err != nil || b.Epoch == epoch || len(b.Crashed) != 1 {
		t.Fatalf("Begin after a second crash = %+v, %v; want an epoch other than %s", b, err, epoch)
	}
	// A record that cannot be written stops the start.
	k.fail = errors.New("vgchange failed")
	if _, err := Begin(ctx, k, me); err == nil || !strings.Contains(err.Error(), "vgchange failed") {
		t.Fatalf("Begin with a failing keeper: %v", err)
	}
}

// Other servers' records: of this boot and running, they stay; of this
// boot and dead, they go at a start or a clean stop once everything is
// durable, and stay if that fails; a pid another process took since is
// dead. Without dead servers, nothing is synced.
func TestOthersRecords(t *testing.T) {
	ctx := context.Background()
	me := self(t)
	live := volume.Run{Boot: me.Boot, PID: os.Getppid(), PIDStart: pidStart(os.Getppid())}
	dead := volume.Run{Boot: me.Boot, PID: deadPID(t), PIDStart: 1}
	reused := volume.Run{Boot: me.Boot, PID: os.Getppid(), PIDStart: pidStart(os.Getppid()) + 1}
	syncErr := errors.New("fsync /dev/sdb: input/output error")
	for _, tc := range []struct {
		name    string
		at      string // "begin" or "end": where the dead ones are found
		syncErr error
		want    []volume.Run // after End
	}{
		{"dropped at a start", "begin", nil, []volume.Run{live}},
		{"dropped at a stop", "end", nil, []volume.Run{live}},
		{"sync fails at a start", "begin", syncErr, []volume.Run{live, dead, reused}},
		{"sync fails at a stop", "end", syncErr, []volume.Run{live, dead, reused}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := &keeper{st: volume.RunState{Runs: []volume.Run{live}}, syncErr: tc.syncErr}
			if tc.at == "begin" {
				k.st.Runs = append(k.st.Runs, dead, reused)
			}
			b, err := Begin(ctx, k, me)
			if err != nil || b.Crashed != nil || b.Epoch != "" {
				t.Fatalf("Begin beside servers of this boot = %+v, %v; want no crash", b, err)
			}
			if (tc.at == "begin" && tc.syncErr != nil) != (b.SyncErr != nil) {
				t.Errorf("Begin's SyncErr = %v", b.SyncErr)
			}
			if tc.at == "end" {
				k.st.Runs = append(k.st.Runs, dead, reused)
			}
			err = End(ctx, k, me)
			if (tc.syncErr != nil) != (err != nil) || err != nil && !strings.Contains(err.Error(), "the next boot counts a crash") {
				t.Fatalf("End = %v, want the sync's error: %v", err, tc.syncErr)
			}
			if diff := cmp.Diff(tc.want, k.st.Runs, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("runs after End (-want +got):\n%s", diff)
			}
			if k.syncs == 0 {
				t.Error("dead servers' records were handled without a sync")
			}
		})
	}
	k := &keeper{st: volume.RunState{Runs: []volume.Run{live}}}
	if _, err := Begin(ctx, k, me); err != nil {
		t.Fatal(err)
	}
	if err := End(ctx, k, me); err != nil || k.syncs != 0 {
		t.Errorf("End with only live servers beside: %v after %d syncs; want none", err, k.syncs)
	}
}

func TestPIDStart(t *testing.T) {
	dir := t.TempDir()
	old := procRoot
	procRoot = dir
	defer func() { procRoot = old }()
	for _, tc := range []struct {
		stat string
		want uint64
	}{
		{"42 (lvnbd) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 1000 10", 12345},
		{"42 (a) b (c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 777 1000 10", 777}, // a name with ") "
		{"42 (lvnbd) S 1", 0},
		{"42 lvnbd", 0},
		{"42 (lvnbd) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 x 1000 10", 0},
	} {
		if err := os.MkdirAll(filepath.Join(dir, "42"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "42", "stat"), []byte(tc.stat), 0o644); err != nil {
			t.Fatal(err)
		}
		if got := pidStart(42); got != tc.want {
			t.Errorf("pidStart of %q = %d, want %d", tc.stat, got, tc.want)
		}
	}
	if got := pidStart(43); got != 0 {
		t.Errorf("pidStart of a missing process = %d", got)
	}
}

// Whatever /proc/PID/stat holds, pidStart returns a number or 0, and never
// panics.
func FuzzPIDStart(f *testing.F) {
	f.Add([]byte("42 (lvnbd) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 1000 10"))
	f.Add([]byte("42 ("))
	dir := f.TempDir()
	old := procRoot
	procRoot = dir
	f.Cleanup(func() { procRoot = old })
	if err := os.MkdirAll(filepath.Join(dir, "42"), 0o755); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, stat []byte) {
		if err := os.WriteFile(filepath.Join(dir, "42", "stat"), stat, 0o644); err != nil {
			t.Fatal(err)
		}
		_ = pidStart(42)
	})
}
