package main

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/control"
	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/server/backend"
	"github.com/lvnbd/lvnbd/volume/file"
)

// TestRecoverThroughServer: lvnbd status shows failed exports, also those
// recorded before a restart and those not served now; lvnbd recover serves
// one again and clears its record; removing or making a volume anew clears
// its record too.
func TestRecoverThroughServer(t *testing.T) {
	vs := startVolumeServer(t)
	path := filepath.Join(t.TempDir(), "failures.json")
	since := time.Date(2026, 12, 1, 3, 4, 5, 0, time.UTC)
	var recorded []server.Failure
	for _, name := range []string{"vm2", "vm3", "vm4", "gone", "disk"} {
		recorded = append(recorded, server.Failure{Export: name, Description: "volume " + name,
			Error: "fdatasync " + name + ": input/output error", Errno: int(syscall.EIO), Since: since})
	}
	b, _ := json.Marshal(recorded)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	failures, err := server.LoadFailures(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The volumes exist before the server (re)starts: made without it.
	for _, name := range []string{"vm1", "vm2", "vm3"} {
		if _, err := runVolumeCommand(t, "volume", "create", name, "--size", "1M", "--volumes", "file://"+vs.dir,
			"--control", filepath.Join(t.TempDir(), "none.sock")); err != nil {
			t.Fatal(err)
		}
	}
	vs.reg.KeepFailures(failures) // as lvnbd serve does before exporting anything
	// disk is an --export beside the volumes, failed before the restart.
	img := filepath.Join(t.TempDir(), "disk.img")
	err = os.WriteFile(img, make([]byte, 4096), 0o600)
	var disk *server.Export
	if err == nil {
		disk, err = server.OpenExport(server.ExportSpec{Name: "disk", Path: img})
	}
	if err == nil {
		err = vs.reg.Add(disk)
	}
	if err != nil {
		t.Fatal(err)
	}
	ctl := func(args ...string) (string, error) {
		t.Helper()
		return runVolumeCommand(t, append(args, "--control", vs.sock)...)
	}
	ok := func(out string, err error) string {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	if err := control.NewClient(vs.sock).Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	// vm1 fails now, in this run: kept in memory.
	e, _ := vs.reg.Lookup("vm1")
	e.Backend.(*backend.File).MarkFailed(syscall.EIO)

	st := ok(ctl("status"))
	for _, want := range []string{"vm1: FAILED", "vm2: FAILED: fdatasync vm2", "vm3: FAILED",
		"gone (not served now): FAILED since 2026-12-01T03:04:05Z", "vm4 (not served now)"} {
		if !strings.Contains(st, want) {
			t.Errorf("lvnbd status lacks %q:\n%s", want, st)
		}
	}

	out := ok(ctl("recover", "vm2"))
	if !strings.Contains(out, "export vm2 recovered") || !strings.Contains(out, "--zero-superblock") {
		t.Errorf("lvnbd recover vm2 said:\n%s", out)
	}
	if st := ok(ctl("status")); strings.Contains(st, "vm2: FAILED") {
		t.Errorf("vm2 still failed after lvnbd recover:\n%s", st)
	}
	if e, _ := vs.reg.Lookup("vm2"); e.Backend.ReadAt(make([]byte, 512), 0) != nil {
		t.Error("a read of the recovered vm2 failed")
	}
	if _, err := ctl("recover", "vm2"); err == nil || !strings.Contains(err.Error(), "has not failed") {
		t.Errorf("recovering vm2 again: %v, want has not failed", err)
	}
	if _, err := ctl("recover", "nope"); !errors.Is(err, server.ErrNoExport) {
		t.Errorf("recovering an unknown export: %v, want ErrNoExport", err)
	}
	var res server.RecoverResult
	if err := json.Unmarshal([]byte(ok(ctl("recover", "gone", "--json"))), &res); err != nil || res.Reopened ||
		res.Export != "gone" {
		t.Errorf("lvnbd recover gone --json: %+v, %v; want the record cleared, nothing reopened", res, err)
	}
	// vm1 failed in memory only: recover opens it anew all the same.
	ok(ctl("recover", "vm1"))

	// A volume made under an --export's name clears nothing of the export's.
	ok(vs.run(t, "volume", "create", "disk", "--size", "1M"))
	kept := slices.ContainsFunc(failures.List(), func(f server.Failure) bool { return f.Export == "disk" })
	if !kept || !strings.Contains(ok(ctl("status")), "disk: FAILED") {
		t.Error("making a volume named like a failed --export cleared the export's failure")
	}
	ok(ctl("recover", "disk"))

	ok(vs.run(t, "volume", "remove", "vm3"))
	ok(vs.run(t, "volume", "create", "vm4", "--size", "1M"))
	if e, _ := vs.reg.Lookup("vm4"); e.Backend.ReadAt(make([]byte, 512), 0) != nil {
		t.Error("vm4, made anew under a recorded name, fails")
	}
	if left := failures.List(); len(left) != 0 {
		t.Errorf("records left: %+v", left)
	}
	if b, _ := os.ReadFile(path); strings.TrimSpace(string(b)) != "[]" {
		t.Errorf("failure file left with %s", b)
	}
}

// statusOf is what lvnbd status says, as text and as --json, of a server
// on file volumes set up by setup.
func statusOf(t *testing.T, setup func(*server.Volumes)) (text, asJSON string) {
	t.Helper()
	drv, err := file.New(filepath.Join(t.TempDir(), "volumes"))
	if err != nil {
		t.Fatal(err)
	}
	reg := server.NewRegistry()
	vols := server.NewVolumes(drv, reg, nil)
	setup(vols)
	sock, _ := serveWithControl(t, server.New(&server.Config{Exports: reg}), vols)
	if text, err = runVolumeCommand(t, "status", "--control", sock); err != nil {
		t.Fatal(err)
	}
	if asJSON, err = runVolumeCommand(t, "status", "--json", "--control", sock); err != nil {
		t.Fatal(err)
	}
	return text, asJSON
}

// lvnbd status lists a volume whose shrink behind the server is not counted
// yet, and so not exported.
func TestStatusShowsAShrinkWaitingForItsCount(t *testing.T) {
	shrinks := filepath.Join(t.TempDir(), "shrinks.json")
	if err := os.WriteFile(shrinks, []byte(`{"vm1": "18eeea2fb604df13"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	text, asJSON := statusOf(t, func(vols *server.Volumes) {
		if err := vols.KeepShrinks(shrinks); err != nil {
			t.Fatal(err)
		}
	})
	if !strings.Contains(text, "vm1 (not served now): shrank behind the server") ||
		!strings.Contains(text, "changes its ID from 18eeea2fb604df13") ||
		!strings.Contains(asJSON, `"shrinks_pending"`) || !strings.Contains(asJSON, `"volume": "vm1"`) {
		t.Errorf("lvnbd status says:\n%s\nand --json:\n%s", text, asJSON)
	}
}

// lvnbd status shows the crash epoch the volumes are served under, once
// the box went down under a server, and nothing of it before.
func TestStatusShowsTheCrashEpoch(t *testing.T) {
	for _, epoch := range []string{"", "3fa2b1c9"} {
		text, asJSON := statusOf(t, func(vols *server.Volumes) { vols.Epoch = epoch })
		shown := strings.Contains(text, "crash epoch 3fa2b1c9") && strings.Contains(asJSON, `"epoch": "3fa2b1c9"`)
		hidden := !strings.Contains(text, "crash epoch") && !strings.Contains(asJSON, `"epoch"`)
		if epoch != "" && !shown || epoch == "" && !hidden {
			t.Errorf("with epoch %q, lvnbd status says:\n%s\nand --json:\n%s", epoch, text, asJSON)
		}
	}
}
