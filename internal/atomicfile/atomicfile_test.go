package atomicfile

import (
	"os"
	"path/filepath"
	"testing"
)

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	for _, tc := range []struct {
		data string
		perm os.FileMode
	}{{"first\n", 0o600}, {"second, longer than the first\n", 0o600}, {"", 0o640}} {
		if err := Write(path, []byte(tc.data), tc.perm); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(path)
		if err != nil || string(got) != tc.data {
			t.Fatalf("read back %q, %v; want %q", got, err, tc.data)
		}
		st, err := os.Stat(path)
		if err != nil || st.Mode().Perm() != tc.perm {
			t.Fatalf("mode %v, %v; want %v", st.Mode().Perm(), err, tc.perm)
		}
	}
	// No temporary file is left behind, after success or failure.
	if err := Write(filepath.Join(dir, "missing", "x"), []byte("x"), 0o600); err == nil {
		t.Fatal("Write into a missing directory succeeded")
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "state.json" {
		t.Fatalf("directory holds %v, want only state.json", entries)
	}
}

// A write whose rename fails (a non-empty directory is in the way) leaves
// what was there, and no temporary file.
func TestWriteFailureKeepsTheOld(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "adir")
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(path, "keep"), []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Write(path, []byte("new"), 0o600); err == nil {
		t.Fatal("Write over a non-empty directory succeeded")
	}
	if got, _ := os.ReadFile(filepath.Join(path, "keep")); string(got) != "old" {
		t.Fatalf("after a failed write: %q", got)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("directory holds %v, want only adir", entries)
	}
}

func TestMkdirAll(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "a", "b", "c")
	if err := MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o700 {
		t.Fatalf("%s after MkdirAll: %v, %v", dir, fi, err)
	}
	if err := MkdirAll(dir, 0o700); err != nil {
		t.Errorf("MkdirAll of an existing directory: %v", err)
	}
	if err := Write(filepath.Join(dir, "f"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := MkdirAll(filepath.Join(dir, "f"), 0o700); err == nil {
		t.Error("MkdirAll over a file succeeded")
	}
	if err := MkdirAll(filepath.Join(dir, "f", "g"), 0o700); err == nil {
		t.Error("MkdirAll under a file succeeded")
	}
}
