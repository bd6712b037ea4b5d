package volumeid

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const backend = "nbd://192.0.2.2:10809/vm1"

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name    string
		path    func(t *testing.T) string
		checks  []string // IDs checked in turn
		refused []bool
	}{
		{"memory", func(*testing.T) string { return "" }, []string{"", "u1", "u1", "u2", "", "u1"},
			[]bool{false, false, false, true, true, false}},
		{"file", func(t *testing.T) string { return filepath.Join(t.TempDir(), "lvnbd", "ids.json") },
			[]string{"u1", "u2", "u1"}, []bool{false, true, false}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := Open(tc.path(t))
			for i, id := range tc.checks {
				err := s.Check(backend, id)
				if refused := errors.Is(err, ErrReplaced); refused != tc.refused[i] || (err != nil && !refused) {
					t.Errorf("check %d of %q: %v, want refused %v", i, id, err, tc.refused[i])
				}
			}
			if err := s.Forget(backend); err != nil {
				t.Fatal(err)
			}
			if err := s.Check(backend, "u2"); err != nil {
				t.Errorf("after Forget, a new ID was refused: %v", err)
			}
		})
	}
}

// Another process (a new Store on the same file: the daemon after a reload
// or a restart, lvnbd reconnect) finds what one recorded.
func TestSharedFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ids.json")
	if err := Open(path).Set(backend, "u1"); err != nil {
		t.Fatal(err)
	}
	err := Open(path).Check(backend, "u2")
	if !errors.Is(err, ErrReplaced) || !strings.Contains(err.Error(), "volume id u1, now u2") {
		t.Errorf("a second store's check: %v, want refused naming both IDs", err)
	}
	if err := Open(path).Set("nbd://198.51.100.2:10809/vm1", "u9"); err != nil {
		t.Fatal(err)
	}
	if id, err := Open(path).Get(backend); err != nil || id != "u1" {
		t.Errorf("after another backend was recorded, %s has %q (%v), want u1", backend, id, err)
	}
	if err := os.WriteFile(path, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path).Get(backend); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("a corrupt file: %v, want an error naming it", err)
	}
}

// Verify compares without recording: an attach that then fails leaves
// nothing behind.
func TestVerify(t *testing.T) {
	s := Open("")
	if err := s.Verify(backend, "u1"); err != nil {
		t.Fatal(err)
	}
	if id, _ := s.Get(backend); id != "" {
		t.Errorf("Verify recorded %q", id)
	}
	if err := s.Set(backend, "u1"); err != nil {
		t.Fatal(err)
	}
	if err := s.Verify(backend, "u2"); !errors.Is(err, ErrReplaced) {
		t.Errorf("Verify of another ID: %v, want ErrReplaced", err)
	}
}
