package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lvnbd/lvnbd/server"
)

// startFenceServer runs a server with a fence list and one export, disk0,
// and its control socket; it returns the socket.
func startFenceServer(t *testing.T) string {
	t.Helper()
	reg := server.NewRegistry()
	path := filepath.Join(t.TempDir(), "disk0.img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	e, err := server.OpenExport(server.ExportSpec{Name: "disk0", Path: path})
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Add(e); err != nil {
		t.Fatal(err)
	}
	fences, err := server.LoadFences("")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Backend.Close() }) // after the server has stopped
	sock, _ := serveWithControl(t, server.New(&server.Config{Exports: reg, Fences: fences}), nil)
	return sock
}

// TestFenceCommands: the fence and unfence commands say what an admin needs
// to know: a fence of an export not served now is said to be one, an
// unfence names the fences of the client still in force, and the list is
// [] in JSON when empty.
func TestFenceCommands(t *testing.T) {
	sock := startFenceServer(t)
	run := func(args ...string) (stdout, stderr string) {
		t.Helper()
		var out, errOut bytes.Buffer
		root := newRootCmd(&out, &errOut)
		root.SetArgs(append(args, "--control", sock))
		if err := root.ExecuteContext(context.Background()); err != nil {
			t.Fatalf("lvnbd %s: %v", strings.Join(args, " "), err)
		}
		return out.String(), errOut.String()
	}
	for _, bad := range [][]string{{"fence", "10.0.1.21", "--json"}, {"fence", "--list", "10.0.1.21"}} {
		var out, errOut bytes.Buffer
		root := newRootCmd(&out, &errOut)
		root.SetArgs(append(bad, "--control", sock))
		if err := root.ExecuteContext(context.Background()); err == nil || !strings.Contains(err.Error(), "lvnbd fence --list") {
			t.Errorf("lvnbd %s: %v, want a refusal saying how --list is used", strings.Join(bad, " "), err)
		}
	}
	if out, _ := run("fence", "--list", "--json"); strings.TrimSpace(out) != "[]" {
		t.Errorf("fence --list --json with no fences printed %q, want []", out)
	}
	if _, stderr := run("fence", "10.0.1.21", "--export", "disk0"); stderr != "" {
		t.Errorf("fence of a served export warned %q", stderr)
	}
	if _, stderr := run("fence", "10.0.1.21", "--export", "nosuch"); !strings.Contains(stderr, `no export "nosuch" is served now`) {
		t.Errorf("fence of an export not served said %q on stderr, want a warning", stderr)
	}
	run("fence", "10.0.1.21")
	out, _ := run("unfence", "10.0.1.21")
	if !strings.Contains(out, "unfenced 10.0.1.21 on all exports; still fenced off export \"disk0\", export \"nosuch\"") {
		t.Errorf("unfence of the all-exports fence printed %q, want the fences still in force named", out)
	}
}
