package daemon

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/config"
	"github.com/lvnbd/lvnbd/internal/systemd"
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
			info, err := client.Info(d.ctx, uri, nil)
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

// Changing the record with the volumes asks systemd for time beyond the
// unit's start and stop timeouts, since it may wait for lvm and a sync of
// the box: before READY=1 at a start, and at a stop after the drain.
// Exports of files named in the configuration keep no record, and ask for
// nothing.
func TestRecordChangesAskSystemdForTime(t *testing.T) {
	extend := fmt.Sprintf("EXTEND_TIMEOUT_USEC=%d", (recordTimeout + recordSlack).Microseconds())
	for _, tc := range []struct {
		name            string
		volumes         bool
		atStart, atStop []string
	}{
		{"volumes", true, []string{extend, "READY=1"}, []string{extend}},
		{"static exports", false, []string{"READY=1"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "notify")
			conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			// A bound for a test that fails, not a wait: a server that
			// works sends READY=1 at once.
			if err := conn.SetReadDeadline(time.Now().Add(time.Minute)); err != nil {
				t.Fatal(err)
			}
			t.Setenv("NOTIFY_SOCKET", path)
			// read returns the states sent until last, last included.
			read := func(last string) []string {
				t.Helper()
				var got []string
				buf := make([]byte, 256)
				for {
					n, err := conn.Read(buf)
					if err != nil {
						t.Fatalf("after %q: %v", got, err)
					}
					got = append(got, string(buf[:n]))
					if string(buf[:n]) == last {
						return got
					}
				}
			}

			sock := filepath.Join(dir, "nbd.sock")
			var cfg *config.Config
			if tc.volumes {
				_, data := fileVolumes(t, dir, "vm1")
				cfg = testConfig(sock)
				cfg.Server.Volumes = "file://" + data
			} else {
				cfg = testConfig(sock, config.Export{Name: "disk", Path: sparse(t, "disk.img", 1<<20)})
			}
			d := startDaemon(t, cfg)
			if got := read("READY=1"); !slices.Equal(got, tc.atStart) {
				t.Errorf("at the start, told systemd %q, want %q", got, tc.atStart)
			}
			if err := d.stop(); err != nil {
				t.Fatalf("Run: %v", err)
			}
			// Datagrams queue in the order sent: this one comes after
			// everything the stopped server sent.
			if err := systemd.Notify("END"); err != nil {
				t.Fatal(err)
			}
			got := slices.DeleteFunc(read("END"), func(s string) bool { return s == "STOPPING=1" || s == "END" })
			if !slices.Equal(got, tc.atStop) {
				t.Errorf("at the stop, told systemd %q (STOPPING=1 left out), want %q", got, tc.atStop)
			}
		})
	}
}
