package refusals

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestStore(t *testing.T) {
	since := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	first := Refusal{Pair: "vm1", Leg: "a", Reason: "rolled back", Since: since}
	for _, path := range []string{"", filepath.Join(t.TempDir(), "sub", "refused-legs.json")} {
		s := Open(path)
		if _, ok, err := s.Get("nbd://a/vm1"); ok || err != nil {
			t.Fatalf("%q: empty store: %v %v", path, ok, err)
		}
		if err := s.Add("nbd://a/vm1", first); err != nil {
			t.Fatal(err)
		}
		// A later refusal does not replace the first.
		if err := s.Add("nbd://a/vm1", Refusal{Pair: "vm1", Leg: "a", Reason: "later", Since: since.Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
		if err := s.Add("nbd://b/vm1", Refusal{Pair: "vm1", Leg: "b", Reason: "made anew", Since: since}); err != nil {
			t.Fatal(err)
		}
		if path != "" {
			s = Open(path) // the dom0 restarted
		}
		if got, ok, err := s.Get("nbd://a/vm1"); !ok || err != nil || got != first {
			t.Errorf("%q: Get = %+v %v %v, want %+v", path, got, ok, err, first)
		}
		if err := s.Forget("nbd://a/vm1"); err != nil {
			t.Fatal(err)
		}
		if _, ok, err := s.Get("nbd://a/vm1"); ok || err != nil {
			t.Errorf("%q: forgotten refusal still there: %v %v", path, ok, err)
		}
		if _, ok, _ := s.Get("nbd://b/vm1"); !ok {
			t.Errorf("%q: Forget of leg a dropped leg b's refusal", path)
		}
	}
}

func TestCorruptFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "refused-legs.json")
	if err := os.WriteFile(path, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err := Open(path).Get("nbd://a/vm1")
	if err == nil || !strings.Contains(err.Error(), path+" is corrupt") {
		t.Errorf("Get of a corrupt file: %v", err)
	}
}
