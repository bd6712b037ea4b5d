package daemon

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server/boxcrash"
)

// A server that ran when the box went down (its record in the crash file is
// of another boot) makes the next start export every volume under a new ID:
// the volume's own, with the box's new epoch. The ID stays across clean
// restarts, and a clean stop takes the server's record out.
func TestBoxCrashGivesVolumesANewID(t *testing.T) {
	dir := t.TempDir()
	drv, data := fileVolumes(t, dir, "vm1")
	vol, err := drv.Get(context.Background(), "vm1")
	if err != nil {
		t.Fatal(err)
	}
	crashFile := filepath.Join(dir, "lib", "crash.json")
	if err := os.MkdirAll(filepath.Dir(crashFile), 0o700); err != nil {
		t.Fatal(err)
	}
	// A boot that is not this one, its server never stopped.
	left := `{"running":[{"id":"a1","pid":1,"boot_id":"00000000-0000-4000-8000-000000000000","started":"2026-12-01T00:00:00Z"}]}`
	if err := os.WriteFile(crashFile, []byte(left), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		t.Fatal(err)
	}
	epoch := strings.ReplaceAll(strings.TrimSpace(string(b)), "-", "")[:8]

	sock := filepath.Join(dir, "nbd.sock")
	uri := "nbd+unix:///vm1?socket=" + sock
	serveWith := func(crashFile string) (string, *running) {
		t.Helper()
		cfg := testConfig(sock)
		cfg.Server.Volumes, cfg.Server.CrashFile = "file://"+data, crashFile
		d := startDaemon(t, cfg)
		var id string
		waitFor(t, "the server", func() bool {
			info, err := client.Info(d.ctx, uri)
			id = info.ID()
			return err == nil
		})
		return id, d
	}
	serve := func() (string, *running) { return serveWith(crashFile) }

	id, d := serve()
	if want := vol.ID + "--c" + epoch; id != want {
		t.Errorf("after the crash, vm1's ID is %q, want %q (its own and the new epoch)", id, want)
	}
	if base, _ := nbd.SplitEpoch(id); base != vol.ID {
		t.Errorf("the ID's base is %q, want the volume's %q", base, vol.ID)
	}
	if n := d.logs.FilterMessageSnippet("this box went down").Len(); n != 1 {
		t.Errorf("the crash was logged %d times, want once", n)
	}
	// While it serves, the server is recorded as running: a crash now
	// would be noticed.
	if s, err := boxcrash.Load(crashFile); err != nil || len(s.Running) != 1 || s.Running[0].PID != os.Getpid() {
		t.Errorf("crash file while serving: %+v, %v; want this server running", s, err)
	}
	if kept, err := drv.Epoch(context.Background()); err != nil || kept != epoch {
		t.Errorf("the volumes keep epoch %q (%v), want %q", kept, err, epoch)
	}
	if err := d.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	s, err := boxcrash.Load(crashFile)
	if err != nil || len(s.Running) != 0 || s.Epoch != epoch {
		t.Fatalf("crash file after a clean stop: %+v, %v; want no server running, epoch %s", s, err, epoch)
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

	// The crash file removed, or turned off: the volumes keep the epoch,
	// and their IDs stay.
	if err := os.Remove(crashFile); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{crashFile, ""} {
		again, d := serveWith(path)
		if again != id {
			t.Errorf("with crash file %q lost or off, vm1's ID is %q, want %q as before", path, again, id)
		}
		if err := d.stop(); err != nil {
			t.Fatalf("Run: %v", err)
		}
	}
}

// A start that fails before serving takes its record out of the crash
// file: it acknowledged nothing, and the next boot must not count a crash.
func TestFailedStartLeavesNoRecord(t *testing.T) {
	dir := t.TempDir()
	crashFile := filepath.Join(dir, "crash.json")
	cfg := testConfig(filepath.Join(dir, "nbd.sock"))
	cfg.Server.CrashFile = crashFile
	cfg.Server.Listen = []string{"unix://" + filepath.Join(dir, "missing", "nbd.sock")} // cannot listen
	if err := startDaemon(t, cfg).stop(); err == nil {
		t.Fatal("Run with a listen address in a missing directory succeeded")
	}
	s, err := boxcrash.Load(crashFile)
	if err != nil || len(s.Running) != 0 {
		t.Fatalf("crash file after a failed start: %+v, %v; want no server running", s, err)
	}
}

// volumeEpoch: the epoch the volumes are served under, in every case of
// what the crash file and the volumes keep.
func TestVolumeEpoch(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		// file and kept are the crash file's epoch ("" none, "crash" one
		// drawn by a crash) and the volumes'.
		file, kept string
		// want is the epoch served: "file", "kept", "" or "new".
		want string
	}{
		{"neither", "", "", ""},
		{"the file's, not kept yet", "crash", "", "file"},
		{"both agree", "crash", "crash", "file"},
		{"file lost", "", "0a0b0c0d", "kept"},
		{"an older crash's kept", "crash+", "crash", "file"},
		{"kept unknown to the file", "crash", "0a0b0c0d", "new"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			drv, _ := fileVolumes(t, dir, "vm1")
			crashFile := filepath.Join(dir, "crash.json")
			var crashEpoch, olderEpoch string
			if strings.HasPrefix(tc.file, "crash") {
				// A run of another boot: the start draws an epoch.
				writeCrashFile(t, crashFile, `{"running":[{"id":"a1","pid":1,"boot_id":"00000000-0000-4000-8000-000000000000","started":"2026-12-01T00:00:00Z"}]}`)
				if tc.file == "crash+" {
					olderEpoch = "0f0f0f0f"
					writeCrashFile(t, crashFile, `{"epoch":"0f0f0f0f","crashes":[{"epoch":"0f0f0f0f","noticed":"2026-11-01T00:00:00Z"}],`+
						`"running":[{"id":"a1","pid":1,"boot_id":"00000000-0000-4000-8000-000000000000","started":"2026-12-01T00:00:00Z"}]}`)
				}
			}
			crashes, err := boxcrash.Start(crashFile)
			if err != nil {
				t.Fatal(err)
			}
			defer crashes.Stop()
			crashEpoch = crashes.Epoch()
			kept := tc.kept
			switch kept {
			case "crash":
				kept = crashEpoch
				if olderEpoch != "" {
					kept = olderEpoch
				}
			}
			if kept != "" {
				if err := drv.SetEpoch(ctx, kept); err != nil {
					t.Fatal(err)
				}
			}
			got, err := volumeEpoch(ctx, crashes, drv, zaptest.NewLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			switch tc.want {
			case "file":
				if got != crashEpoch || got == "" {
					t.Errorf("epoch %q, want the crash file's %q", got, crashEpoch)
				}
			case "kept":
				if got != kept {
					t.Errorf("epoch %q, want the volumes' %q", got, kept)
				}
			case "":
				if got != "" {
					t.Errorf("epoch %q, want none", got)
				}
			case "new":
				if got == crashEpoch || got == kept || len(got) != 8 || crashes.Epoch() != got {
					t.Errorf("epoch %q (crash file now %q), want a new one, not %q or %q", got, crashes.Epoch(), crashEpoch, kept)
				}
			}
			if now, err := drv.Epoch(ctx); err != nil || now != got {
				t.Errorf("the volumes keep %q (%v) after, want %q", now, err, got)
			}
		})
	}
}

func writeCrashFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// A crash file that cannot be read keeps the server from starting: it could
// not tell a crash.
func TestCorruptCrashFileStopsTheStart(t *testing.T) {
	dir := t.TempDir()
	crashFile := filepath.Join(dir, "crash.json")
	if err := os.WriteFile(crashFile, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(filepath.Join(dir, "nbd.sock"))
	cfg.Server.CrashFile = crashFile
	err := startDaemon(t, cfg).stop()
	if err == nil || !strings.Contains(err.Error(), crashFile) {
		t.Fatalf("Run with a corrupt crash file: %v, want an error naming it", err)
	}
}
