package refusals

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
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

// Another spelling of the same export finds, and forgets, its refusal: the
// leg's URI written otherwise in client.toml must not bypass it.
func TestSameExportOtherwiseSpelled(t *testing.T) {
	s := Open(filepath.Join(t.TempDir(), "refused-legs.json"))
	if err := s.Add("nbd://box-a:10809/vm1", Refusal{Pair: "vm1", Leg: "a", Reason: "made anew"}); err != nil {
		t.Fatal(err)
	}
	for _, other := range []string{"nbd://BOX-A/vm1", "nbd://box-a./vm1"} {
		if _, ok, err := s.Get(other); !ok || err != nil {
			t.Errorf("Get(%s): %v %v, want the refusal of nbd://box-a:10809/vm1", other, ok, err)
		}
	}
	if _, ok, _ := s.Get("nbd://box-a/vm2"); ok {
		t.Error("another export found the refusal")
	}
	if err := s.Forget("nbd://BOX-A./vm1"); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := s.Get("nbd://box-a:10809/vm1"); ok {
		t.Error("Forget under another spelling left the refusal")
	}
}

// Two daemons (two stores on one file) adding at once lose nothing.
func TestSharedFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "refused-legs.json")
	a, b := Open(path), Open(path)
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := a
			if i%2 == 1 {
				s = b
			}
			if err := s.Add(fmt.Sprintf("nbd://box/vm%d", i), Refusal{Reason: "made anew"}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	for i := range 20 {
		if _, ok, err := Open(path).Get(fmt.Sprintf("nbd://box/vm%d", i)); !ok || err != nil {
			t.Errorf("vm%d's refusal lost: %v", i, err)
		}
	}
}

// A host where nothing was refused reads without making the directory.
func TestGetMakesNothing(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "lvnbd")
	if _, ok, err := Open(filepath.Join(dir, "refused-legs.json")).Get("nbd://box/vm1"); ok || err != nil {
		t.Fatalf("Get: %v %v", ok, err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Get made %s: %v", dir, err)
	}
}

// A refusal the device's volume would lift accepts none once a later one
// accepts another, or none (a shrink): the shrink must never be lifted.
func TestAddSealsALiftableRefusal(t *testing.T) {
	s := Open("")
	if err := s.Add("nbd://box/vm1", Refusal{Reason: "no ID", Accepts: "uuid-1"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Add("nbd://box/vm1", Refusal{Reason: "shrank"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Add("nbd://box/vm1", Refusal{Reason: "another volume", Accepts: "uuid-1"}); err != nil {
		t.Fatal(err)
	}
	r, _, _ := s.Get("nbd://box/vm1")
	if r.Accepts != "" || r.Reason != "no ID; then: shrank" {
		t.Errorf("refusal %+v, want one that accepts nothing and says both reasons", r)
	}
	// The same volume again changes nothing.
	s2 := Open("")
	s2.Add("nbd://box/vm1", Refusal{Reason: "no ID", Accepts: "uuid-1"})
	s2.Add("nbd://box/vm1", Refusal{Reason: "no ID again", Accepts: "uuid-1"})
	if r, _, _ := s2.Get("nbd://box/vm1"); r.Accepts != "uuid-1" || r.Reason != "no ID" {
		t.Errorf("refusal %+v, want the first, still accepting uuid-1", r)
	}
}

// ForgetOnly forgets what the caller saw, not a refusal recorded since.
func TestForgetOnly(t *testing.T) {
	s := Open(filepath.Join(t.TempDir(), "refused-legs.json"))
	if err := s.Add("nbd://box:10809/vm1", Refusal{Pair: "vm1", Leg: "a", Reason: "no ID", Accepts: "uuid-1", Since: time.Now()}); err != nil {
		t.Fatal(err)
	}
	seen, _, err := s.Get("nbd://box/vm1")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Add("nbd://box:10809/vm1", Refusal{Reason: "shrank"}); err != nil { // sealed meanwhile
		t.Fatal(err)
	}
	if forgot, err := s.ForgetOnly("nbd://box/vm1", seen); err != nil || forgot {
		t.Fatalf("ForgetOnly of a refusal changed since: %v, %v; want it kept", forgot, err)
	}
	now, ok, err := s.Get("nbd://box/vm1")
	if err != nil || !ok {
		t.Fatalf("after a ForgetOnly that kept it: %v, %v", ok, err)
	}
	if forgot, err := s.ForgetOnly("nbd://BOX/vm1", now); err != nil || !forgot {
		t.Fatalf("ForgetOnly of the refusal as it is: %v, %v; want it forgotten", forgot, err)
	}
	if _, ok, _ := s.Get("nbd://box/vm1"); ok {
		t.Error("still recorded after ForgetOnly")
	}
	if forgot, err := s.ForgetOnly("nbd://box/vm1", now); err != nil || forgot {
		t.Errorf("ForgetOnly of nothing: %v, %v", forgot, err)
	}
}
