package daemon

import (
	"context"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server/boxcrash"
	"github.com/lvnbd/lvnbd/volume"
	"github.com/lvnbd/lvnbd/volume/file"
)

// runsOf reads the servers and epoch drv records.
func runsOf(t *testing.T, drv *file.Driver) volume.RunState {
	t.Helper()
	var st volume.RunState
	if err := drv.UpdateRuns(context.Background(), func(s *volume.RunState) (bool, error) {
		st = *s
		return false, nil
	}); err != nil {
		t.Fatal(err)
	}
	return st
}

// setRuns makes drv record runs.
func setRuns(t *testing.T, drv *file.Driver, runs ...volume.Run) {
	t.Helper()
	if err := drv.UpdateRuns(context.Background(), func(s *volume.RunState) (bool, error) {
		s.Runs = runs
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
}

// A server that ran when the box went down (its record with the volumes is
// of another boot) makes the next start export every volume under a new ID:
// the volume's own, with a new epoch. While it serves, it is recorded, and
// the records of this boot's servers that died are gone; the ID stays
// across clean restarts, and a clean stop takes the record out.
func TestBoxCrashGivesVolumesANewID(t *testing.T) {
	dir := t.TempDir()
	drv, data := fileVolumes(t, dir, "vm1")
	vol, err := drv.Get(context.Background(), "vm1")
	if err != nil {
		t.Fatal(err)
	}
	self, err := boxcrash.Self()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	dead := volume.Run{Boot: self.Boot, PID: cmd.Process.Pid, PIDStart: 1}
	setRuns(t, drv, volume.Run{Boot: strings.Repeat("0", 32), PID: 1, PIDStart: 1}, dead)

	sock := filepath.Join(dir, "nbd.sock")
	uri := "nbd+unix:///vm1?socket=" + sock
	serve := func() (string, *running) {
		t.Helper()
		cfg := testConfig(sock)
		cfg.Server.Volumes = "file://" + data
		d := startDaemon(t, cfg)
		var id string
		waitFor(t, "the server", func() bool {
			info, err := client.Info(d.ctx, uri)
			id = info.ID()
			return err == nil
		})
		return id, d
	}

	id, d := serve()
	st := runsOf(t, drv)
	if want := vol.ID + "--c" + st.Epoch; st.Epoch == "" || id != want {
		t.Errorf("after the crash, vm1's ID is %q, want %q (its own and the new epoch %q)", id, want, st.Epoch)
	}
	if base, _ := nbd.SplitEpoch(id); base != vol.ID {
		t.Errorf("the ID's base is %q, want the volume's %q", base, vol.ID)
	}
	if n := d.logs.FilterMessageSnippet("this box went down").Len(); n != 1 {
		t.Errorf("the crash was logged %d times, want once", n)
	}
	// While it serves, the server is recorded: a crash now would be
	// noticed. The dead server of this boot went at the start, the
	// volumes made durable.
	if !slices.Equal(st.Runs, []volume.Run{self}) {
		t.Errorf("runs while serving: %+v, want only this server", st.Runs)
	}
	if err := d.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	after := runsOf(t, drv)
	if len(after.Runs) != 0 || after.Epoch != st.Epoch {
		t.Fatalf("after a clean stop: %+v; want no server recorded, epoch %s kept", after, st.Epoch)
	}

	again, d := serve()
	if again != id {
		t.Errorf("after a clean restart, vm1's ID is %q, want %q as before", again, id)
	}
	if n := d.logs.FilterMessageSnippet("this box went down").Len(); n != 0 {
		t.Errorf("a clean restart logged a crash")
	}
	if err := d.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
}

// A start that fails before serving takes its record out: it acknowledged
// nothing, and the next boot must not count a crash.
func TestFailedStartLeavesNoRecord(t *testing.T) {
	dir := t.TempDir()
	drv, data := fileVolumes(t, dir, "vm1")
	cfg := testConfig(filepath.Join(dir, "nbd.sock"))
	cfg.Server.Volumes = "file://" + data
	cfg.Server.Listen = []string{"unix://" + filepath.Join(dir, "missing", "nbd.sock")} // cannot listen
	if err := startDaemon(t, cfg).stop(); err == nil {
		t.Fatal("Run with a listen address in a missing directory succeeded")
	}
	if st := runsOf(t, drv); len(st.Runs) != 0 {
		t.Fatalf("runs after a failed start: %+v; want none", st.Runs)
	}
}
