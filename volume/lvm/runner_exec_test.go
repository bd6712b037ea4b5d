package lvm

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeLVM writes a shell script standing in for the lvm binary.
func fakeLVM(t *testing.T, script string) execRunner {
	t.Helper()
	path := filepath.Join(t.TempDir(), "lvm")
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+script), 0o755); err != nil {
		t.Fatal(err)
	}
	return execRunner{bin: path}
}

func TestExecRunner(t *testing.T) {
	t.Setenv("LC_ALL", "de_DE.UTF-8")
	r := fakeLVM(t, `echo "$1 $LC_ALL $LVM_SUPPRESS_FD_WARNINGS"; echo "  WARNING: noise" >&2`)
	out, err := r.run(context.Background(), "lvs", "vg0")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(out), "lvs C 1\n"; got != want {
		t.Errorf("stdout = %q, want %q (the command, LC_ALL=C, no fd warnings, and no stderr)", got, want)
	}
}

func TestExecRunnerError(t *testing.T) {
	r := fakeLVM(t, `echo '{"report":[]}'; echo '  Volume group "vg9" not found' >&2; exit 5`)
	_, err := r.run(context.Background(), "vgs", "vg9")
	want := "running [\"vgs\" \"vg9\"]: exit status 5\nVolume group \"vg9\" not found"
	if err == nil || err.Error() != want {
		t.Errorf("error = %v, want %q", err, want)
	}
}

func TestExecRunnerCancelInterrupts(t *testing.T) {
	r := fakeLVM(t, `trap 'echo interrupted >&2; exit 130' INT; sleep 10 >/dev/null 2>&1 & wait`)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := r.run(ctx, "lvconvert", "--merge", "vg0/x")
	if err == nil || !strings.Contains(err.Error(), "interrupted") {
		t.Errorf("error = %v, want lvm to have been sent SIGINT", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("cancel took %v", d)
	}
}
