package daemon

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

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
	serve := func() (string, *running) {
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
