package atomicfile

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestJSON(t *testing.T) {
	path := filepath.Join(t.TempDir(), "list.json")
	m := map[string]string{"keep": "me"}
	if err := ReadJSON(path, &m); err != nil || m["keep"] != "me" {
		t.Fatalf("ReadJSON of a missing file: %v, %v; want the value as it was", err, m)
	}
	if err := WriteJSON(path, map[string]string{"a": "1"}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil || string(b) != "{\n  \"a\": \"1\"\n}\n" {
		t.Errorf("file %q, %v", b, err)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, %v; want 0600", st.Mode(), err)
	}
	got := map[string]string{}
	if err := ReadJSON(path, &got); err != nil || got["a"] != "1" {
		t.Errorf("ReadJSON: %v, %v", err, got)
	}
	if err := os.WriteFile(path, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := ReadJSON(path, &got); !errors.Is(err, ErrCorrupt) {
		t.Errorf("ReadJSON of a corrupt file: %v, want ErrCorrupt", err)
	}
}
