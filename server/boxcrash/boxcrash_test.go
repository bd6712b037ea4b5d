package boxcrash

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// boot makes the kernel's boot ID id for the rest of the test.
func boot(t testing.TB, id string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "boot_id")
	if err := os.WriteFile(p, []byte(id+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	old := bootIDPath
	bootIDPath = p
	t.Cleanup(func() { bootIDPath = old })
}

const (
	boot1 = "3fa2b1c9-0d1e-4f5a-8b6c-7d8e9f0a1b2c"
	boot2 = "9e8d7c6b-5a4f-4e3d-9c2b-1a0f9e8d7c6b"
	boot3 = "00112233-4455-4677-8899-aabbccddeeff"
)

func start(t *testing.T, path string) *Tracker {
	t.Helper()
	tr, err := Start(path)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	return tr
}

// deadPID returns the PID of a process that has exited.
func deadPID(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid
}

// The epoch changes exactly when the box went down under a running server,
// and stays until the next such crash.
func TestEpoch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lib", "crash.json")
	boot(t, boot1)

	first := start(t, path)
	if first.Epoch() != "" || first.Crashed() != nil {
		t.Fatalf("first start: epoch %q, crashed %v; want none", first.Epoch(), first.Crashed())
	}
	if err := first.Stop(); err != nil {
		t.Fatal(err)
	}
	// A clean stop, then a reboot: nothing was lost.
	boot(t, boot2)
	second := start(t, path)
	if second.Epoch() != "" || second.Crashed() != nil {
		t.Fatalf("after a clean stop and a reboot: epoch %q, crashed %v; want none", second.Epoch(), second.Crashed())
	}
	// The box goes down while second runs (it never stops).
	boot(t, boot3)
	third := start(t, path)
	if third.Epoch() != "00112233" {
		t.Fatalf("after a crash: epoch %q, want 00112233 (from the new boot ID)", third.Epoch())
	}
	if c := third.Crashed(); c == nil || c.BootID != boot2 || c.Epoch != "00112233" {
		t.Fatalf("after a crash: Crashed() = %+v, want the crash of boot %s", c, boot2)
	}
	if err := third.Stop(); err != nil {
		t.Fatal(err)
	}
	// The epoch stays across clean restarts.
	fourth := start(t, path)
	if fourth.Epoch() != "00112233" || fourth.Crashed() != nil {
		t.Fatalf("after a clean restart: epoch %q, crashed %v; want 00112233, none", fourth.Epoch(), fourth.Crashed())
	}
	s, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Crashes) != 1 || len(s.Running) != 1 || s.Running[0].ID != fourth.run.ID {
		t.Fatalf("file: %+v; want one crash and fourth running", s)
	}
}

// A server that died while the box stayed up lost nothing: its record is
// dropped at the next start, and the epoch stays.
func TestServerDiedBoxStayedUp(t *testing.T) {
	path := filepath.Join(t.TempDir(), "crash.json")
	boot(t, boot1)
	writeState(t, path, State{Running: []Run{{ID: "dead", PID: deadPID(t), BootID: boot1}}})
	tr := start(t, path)
	if tr.Epoch() != "" || tr.Crashed() != nil {
		t.Fatalf("epoch %q, crashed %v; want none", tr.Epoch(), tr.Crashed())
	}
	s, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Running) != 1 || s.Running[0].ID != tr.run.ID {
		t.Fatalf("running %+v; want only the new server", s.Running)
	}
}

// Servers sharing the file keep each other's records: neither one
// starting nor one stopping cleanly hides a crash under the other.
func TestSharedFile(t *testing.T) {
	for _, stops := range []string{"first", "second"} {
		t.Run("the "+stops+" stops", func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "crash.json")
			boot(t, boot1)
			a := start(t, path)
			b := start(t, path)
			stopping := map[string]*Tracker{"first": a, "second": b}[stops]
			for range 2 { // twice: no harm
				if err := stopping.Stop(); err != nil {
					t.Fatal(err)
				}
			}
			boot(t, boot2)
			c := start(t, path)
			if cr := c.Crashed(); cr == nil || cr.BootID != boot1 {
				t.Fatalf("a server ran when the box went down: Crashed() = %+v, want boot %s", cr, boot1)
			}
			// A second server started in the same boot keeps the epoch drawn.
			d := start(t, path)
			if d.Epoch() != c.Epoch() || d.Crashed() != nil {
				t.Fatalf("second start after the crash: epoch %q (first %q), crashed %v", d.Epoch(), c.Epoch(), d.Crashed())
			}
		})
	}
}

// A record of this boot is dropped only when its process is gone: not for
// a process of another pid namespace, which cannot be looked up; and a pid
// that another process took since (another start time) is gone.
func TestWhoRuns(t *testing.T) {
	boot(t, boot1)
	self := os.Getpid()
	for _, tc := range []struct {
		name string
		run  Run
		kept bool
	}{
		{"this process", Run{PID: self, PIDStart: pidStart(self), PIDNamespace: pidNamespace()}, true},
		{"start time unknown", Run{PID: self}, true},
		{"pid taken by another process", Run{PID: self, PIDStart: pidStart(self) + 1, PIDNamespace: pidNamespace()}, false},
		{"dead", Run{PID: deadPID(t), PIDNamespace: pidNamespace()}, false},
		{"another pid namespace", Run{PID: deadPID(t), PIDNamespace: "pid:[1]"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "crash.json")
			tc.run.ID, tc.run.BootID = "other", boot1
			writeState(t, path, State{Running: []Run{tc.run}})
			tr := start(t, path)
			s, err := Load(path)
			if err != nil {
				t.Fatal(err)
			}
			kept := slices.ContainsFunc(s.Running, func(r Run) bool { return r.ID == "other" })
			if kept != tc.kept {
				t.Errorf("after a start, the record is kept: %v, want %v", kept, tc.kept)
			}
			if err := tr.Stop(); err != nil {
				t.Fatal(err)
			}
		})
	}
	if pidStart(self) == 0 || pidNamespace() == "" {
		t.Errorf("this process's start time (%d) or pid namespace (%q) cannot be read", pidStart(self), pidNamespace())
	}
}

// Renew draws an epoch the file records, and Known tells the epochs the
// file recorded from others.
func TestRenewAndKnown(t *testing.T) {
	path := filepath.Join(t.TempDir(), "crash.json")
	boot(t, boot1)
	start(t, path)
	boot(t, boot2)
	tr := start(t, path) // a crash: epoch 9e8d7c6b
	e, err := tr.Renew("a test")
	if err != nil {
		t.Fatal(err)
	}
	if !validEpoch(e) || e == "9e8d7c6b" || tr.Epoch() != e {
		t.Fatalf("Renew = %q, Epoch %q; want a new valid epoch", e, tr.Epoch())
	}
	for _, tc := range []struct {
		epoch string
		known bool
	}{{e, true}, {"9e8d7c6b", true}, {"00000000", false}, {"", false}} {
		if got := tr.Known(tc.epoch); got != tc.known {
			t.Errorf("Known(%q) = %v, want %v", tc.epoch, got, tc.known)
		}
	}
	again := start(t, path)
	if again.Epoch() != e || !again.Known("9e8d7c6b") {
		t.Errorf("a start after Renew: epoch %q, want %q, and the crash's epoch known", again.Epoch(), e)
	}
	s, err := Load(path)
	if err != nil || len(s.Crashes) != 2 || s.Crashes[1].Reason != "a test" {
		t.Errorf("file after Renew: %+v, %v; want the crash and the renewal", s, err)
	}
}

// Another crash draws another epoch, and the file keeps the latest crashes.
func TestCrashesBounded(t *testing.T) {
	path := filepath.Join(t.TempDir(), "crash.json")
	seen := map[string]bool{}
	for i := range maxCrashes + 3 {
		boot(t, fmt.Sprintf("%08x-0000-4000-8000-000000000000", i+1))
		tr := start(t, path)
		if i > 0 {
			if seen[tr.Epoch()] || tr.Crashed() == nil {
				t.Fatalf("crash %d: epoch %q seen before, or no crash noticed (%v)", i, tr.Epoch(), tr.Crashed())
			}
			seen[tr.Epoch()] = true
		}
	}
	s, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Crashes) != maxCrashes {
		t.Fatalf("%d crashes kept, want %d", len(s.Crashes), maxCrashes)
	}
}

// What cannot be read or written stops the server, naming the file and the
// way out; an empty path tracks nothing.
func TestStartErrors(t *testing.T) {
	dir := t.TempDir()
	boot(t, boot1)
	corrupt := filepath.Join(dir, "corrupt.json")
	if err := os.WriteFile(corrupt, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	badEpoch := filepath.Join(dir, "epoch.json")
	if err := os.WriteFile(badEpoch, []byte(`{"epoch":"xyz"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	notDir := filepath.Join(dir, "file")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, path, want string }{
		{"corrupt", corrupt, "corrupt"},
		{"bad epoch", badEpoch, "not 8 hex digits"},
		{"unwritable", filepath.Join(notDir, "crash.json"), "not a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Start(tc.path)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.path) ||
				!strings.Contains(err.Error(), "does not start without it") {
				t.Fatalf("Start(%s) = %v; want an error naming the file, %q and the way out", tc.path, err, tc.want)
			}
		})
	}
	t.Run("boot ID", func(t *testing.T) {
		boot(t, "not-a-uuid")
		if _, err := Start(filepath.Join(dir, "x.json")); err == nil || !strings.Contains(err.Error(), "boot ID") {
			t.Fatalf("Start with boot ID not-a-uuid = %v, want a boot ID error", err)
		}
	})
	t.Run("empty path", func(t *testing.T) {
		tr := start(t, "")
		if tr.Epoch() != "" || tr.Stop() != nil {
			t.Fatal("an empty path tracks something")
		}
	})
}

func writeState(t *testing.T, path string, s State) {
	t.Helper()
	if err := update(path, func(st *State) error { *st = s; return nil }); err != nil {
		t.Fatal(err)
	}
}

// Whatever the file holds, Parse accepts only what Start can use: every
// run with an ID and boot ID, an epoch of 8 lower-case hex digits.
func FuzzParse(f *testing.F) {
	f.Add([]byte(`{"epoch":"00112233","running":[{"id":"a","pid":1,"boot_id":"x","started":"2026-12-06T00:00:00Z"}]}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"epoch":"XYZ"}`))
	f.Add([]byte(`{"running":[{}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var s State
		if Parse(b, &s) != nil {
			return
		}
		if s.Epoch != "" && !validEpoch(s.Epoch) {
			t.Fatalf("accepted epoch %q", s.Epoch)
		}
		for _, r := range s.Running {
			if r.ID == "" || r.BootID == "" {
				t.Fatalf("accepted run %+v", r)
			}
		}
	})
}
