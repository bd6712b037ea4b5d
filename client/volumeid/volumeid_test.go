package volumeid

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lvnbd/lvnbd/nbd"
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

// An ID a Set could not write is still checked by the Store that tried, and
// written at its next change once the file can be: a reconnect then does
// not take whatever volume it finds for the device's.
func TestUnsavedIDIsStillChecked(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run")
	path := filepath.Join(dir, "lvnbd", "ids.json")
	// A file where the store's directory should be: nothing can be
	// written (root ignores permissions, not this).
	if err := os.WriteFile(dir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s := Open(path)
	if err := s.Set(backend, "u1"); err == nil {
		t.Fatal("Set succeeded with no directory to write in")
	}
	if err := os.Remove(dir); err != nil {
		t.Fatal(err)
	}
	if id, err := s.Get(backend); err != nil || id != "u1" {
		t.Errorf("Get: %q, %v; want the unsaved u1", id, err)
	}
	if err := s.Check(backend, "u2"); !errors.Is(err, ErrReplaced) {
		t.Errorf("Check of another volume after the Set failed: %v, want ErrReplaced", err)
	}
	// The Check wrote it: another process sees it.
	if id, err := Open(path).Get(backend); err != nil || id != "u1" {
		t.Errorf("another store's Get: %q, %v; want u1, saved by the Check", id, err)
	}
	if err := s.Forget(backend); err != nil {
		t.Fatal(err)
	}
	if err := s.Check(backend, "u2"); err != nil {
		t.Errorf("after Forget: %v", err)
	}
}

// A volume whose box went down since its device was attached carries the
// box's new epoch: refused, saying so; another volume is refused as made
// anew, whatever its epoch.
func TestCheckAfterABoxCrash(t *testing.T) {
	uuid := "N2rCXI-bdIi-0s83-f1kJ-NiKY-r36V-EsR2zC"
	for _, tc := range []struct {
		attached, now  string
		refused, crash bool
	}{
		{uuid, uuid, false, false},
		{uuid + "--c00112233", uuid + "--c00112233", false, false},
		{uuid, uuid + "--c00112233", true, true},
		{uuid + "--c00112233", uuid + "--c44556677", true, true},
		{uuid + "--c00112233", uuid, true, true}, // the box's crash file was removed
		{uuid, uuid + "-r1--c00112233", true, false},
		{uuid, "other--c00112233", true, false},
	} {
		s := Open("")
		if err := s.Check(backend, tc.attached); err != nil {
			t.Fatal(err)
		}
		err := s.Check(backend, tc.now)
		if refused := errors.Is(err, ErrReplaced); refused != tc.refused {
			t.Errorf("attached as %s, now %s: %v, want refused %v", tc.attached, tc.now, err, tc.refused)
		}
		if crash := strings.Contains(fmt.Sprint(err), "went down"); crash != tc.crash {
			t.Errorf("attached as %s, now %s: %v; want it to say the box went down: %v", tc.attached, tc.now, err, tc.crash)
		}
	}
}

// A volume rolled back since its device was attached (a merge, a shrink)
// is refused saying so; another volume or a box crash is not told as one.
func TestCheckAfterARollback(t *testing.T) {
	uuid := "N2rCXI-bdIi-0s83-f1kJ-NiKY-r36V-EsR2zC"
	for _, tc := range []struct {
		attached, now string
		rolled        bool
	}{
		{uuid, uuid + "-r1", true},
		{uuid + "-r1", uuid + "-r3", true},
		{uuid + "-r1--c00112233", uuid + "-r2--c00112233", true},
		{uuid + "-r2", uuid + "-r1", false}, // fewer: not this volume's history
		{uuid, "other-r1", false},
		{uuid + "--c00112233", uuid + "-r1--c44556677", false}, // and a crash: told as another volume
	} {
		s := Open("")
		if err := s.Check(backend, tc.attached); err != nil {
			t.Fatal(err)
		}
		err := s.Check(backend, tc.now)
		if !errors.Is(err, ErrReplaced) {
			t.Fatalf("attached as %s, now %s: %v, want refused", tc.attached, tc.now, err)
		}
		if rolled := strings.Contains(err.Error(), "rolled back since the device was attached"); rolled != tc.rolled {
			t.Errorf("attached as %s, now %s: %v; want it to say rolled back: %v", tc.attached, tc.now, err, tc.rolled)
		}
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

// An export that shrank under its device is refused from then on, even
// grown back under the same ID, by this store and by another process's,
// until the ID is forgotten.
func TestShrank(t *testing.T) {
	const shrank = "the export " + backend + " shrank under the device (from 67108864 to 33554432 bytes), its tail is lost, " +
		"so this half must be replaced as a new member: take the leg down and up and add it in full (see lvnbd pair down --help)"
	for _, tc := range []struct {
		name string
		path func(t *testing.T) string
		id   string // recorded at attach; "" for an export without one
	}{
		{"memory", func(*testing.T) string { return "" }, "u1"},
		{"file", func(t *testing.T) string { return filepath.Join(t.TempDir(), "lvnbd", "ids.json") }, "u1"},
		{"file, no ID", func(t *testing.T) string { return filepath.Join(t.TempDir(), "ids.json") }, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := tc.path(t)
			s := Open(path)
			if err := s.Set(backend, tc.id); err != nil {
				t.Fatal(err)
			}
			refused := func(what string, err error) {
				t.Helper()
				var se *ShrankError
				if !errors.Is(err, ErrReplaced) || !errors.As(err, &se) || !strings.Contains(err.Error(), shrank) {
					t.Errorf("%s: %v, want a refusal with %q", what, err, shrank)
				}
			}
			refused("Shrank", s.Shrank(backend, tc.id, 64<<20, 32<<20))
			// Grown back, same ID: still refused, by Check and Verify alike,
			// and the first shrink is the one told.
			refused("Check", s.Check(backend, tc.id))
			refused("Verify", s.Verify(backend, tc.id))
			refused("Shrank again", s.Shrank(backend, tc.id, 64<<20, 48<<20))
			if err := s.Set(backend, tc.id); err != nil {
				t.Fatal(err)
			}
			refused("Check after Set", s.Check(backend, tc.id))
			if id, err := s.Get(backend); err != nil || id != tc.id {
				t.Errorf("Get = %q, %v; want the ID %q", id, err, tc.id)
			}
			if path != "" {
				refused("another store's Check", Open(path).Check(backend, tc.id))
			}
			if err := s.Check("nbd://198.51.100.2:10809/vm1", "u9"); err != nil {
				t.Errorf("another backend: %v", err)
			}
			if err := s.Forget(backend); err != nil {
				t.Fatal(err)
			}
			if err := s.Check(backend, tc.id); err != nil {
				t.Errorf("after Forget: %v, want the mark forgotten with the ID", err)
			}
		})
	}
}

// A file written before the mark existed loads, and a marked record is one
// an lvnbd from before the mark refuses: it reads the whole value as the ID.
func TestFileFormat(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ids.json")
	old := "{\n  \"" + backend + "\": \"N2rCXI-abc-r1\"\n}\n"
	if err := os.WriteFile(path, []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	s := Open(path)
	if err := s.Check(backend, "N2rCXI-abc-r1"); err != nil {
		t.Errorf("the old file's ID: %v", err)
	}
	if err := s.Verify(backend, "u2"); !errors.Is(err, ErrReplaced) {
		t.Errorf("another ID than the old file's: %v, want refused", err)
	}
	if err := s.Shrank(backend, "N2rCXI-abc-r1", 64<<20, 32<<20); !errors.Is(err, ErrReplaced) {
		t.Fatalf("Shrank: %v", err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// What an older lvnbd does with the file: a map of IDs.
	var ids map[string]string
	if err := json.Unmarshal(b, &ids); err != nil {
		t.Fatalf("an older lvnbd cannot read %s: %v", b, err)
	}
	want := map[string]string{backend: "N2rCXI-abc-r1 (shrank from 67108864 to 33554432 bytes)"}
	if diff := cmp.Diff(want, ids); diff != "" {
		t.Errorf("the file (-want +got):\n%s", diff)
	}
	if nbd.DescriptionID(nbd.WithID("volume vm1", ids[backend])) != "" {
		t.Errorf("%q is an ID an export could have: an older lvnbd would take the export", ids[backend])
	}
}

func TestParseRecord(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want record
	}{
		{"", record{}},
		{"u1", record{id: "u1"}},
		{"u1 (shrank from 8 to 4 bytes)", record{id: "u1", shrank: true, from: 8, to: 4}},
		{" (shrank from 8 to 4 bytes)", record{shrank: true, from: 8, to: 4}},
		// A mark this lvnbd cannot read still refuses.
		{"u1 (something else)", record{id: "u1", shrank: true}},
		{"u1 ", record{id: "u1", shrank: true}},
	} {
		got := parseRecord(tc.in)
		if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(record{})); diff != "" {
			t.Errorf("parseRecord(%q) (-want +got):\n%s", tc.in, diff)
		}
	}
}

func FuzzParseRecord(f *testing.F) {
	for _, s := range []string{"", "u1", "u1 (shrank from 8 to 4 bytes)", " (shrank from 8 to 4 bytes)", "u1 x", "u1 (shrank from -1 to 4 bytes)"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		r := parseRecord(v)
		again := parseRecord(r.String())
		if again != r {
			t.Errorf("%q: parsed %+v, written %q, parsed again %+v", v, r, r.String(), again)
		}
		if r.shrank != strings.Contains(v, " ") {
			t.Errorf("%q: shrank %v", v, r.shrank)
		}
	})
}
