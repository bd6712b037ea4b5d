package file

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestCopySparse copies a file with data between holes and checks that the
// copy reads the same and allocates no more than the original.
func TestCopySparse(t *testing.T) {
	tests := []struct {
		name   string
		size   int64
		writes map[int64]string
	}{
		{"empty", 0, nil},
		{"all hole", 16 * mib, nil},
		{"data at both ends", 16 * mib, map[int64]string{0: "first", 16*mib - 4: "last"}},
		{"scattered", 24 * mib, map[int64]string{1 * mib: "a", 9 * mib: "b", 13*mib + 5: "c", 23 * mib: "d"}},
		{"unaligned end", 10*mib + 123, map[int64]string{10 * mib: "tail"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			srcPath := filepath.Join(dir, "src")
			src, err := os.Create(srcPath)
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			if err := src.Truncate(tt.size); err != nil {
				t.Fatal(err)
			}
			for off, s := range tt.writes {
				if _, err := src.WriteAt([]byte(s), off); err != nil {
					t.Fatal(err)
				}
			}
			dst, err := os.Create(filepath.Join(dir, "dst"))
			if err != nil {
				t.Fatal(err)
			}
			defer dst.Close()
			// Stale content from an earlier attempt must not survive.
			if _, err := dst.WriteAt([]byte("stale"), tt.size+4096); err != nil {
				t.Fatal(err)
			}
			if err := copySparse(context.Background(), dst, src); err != nil {
				t.Fatal(err)
			}
			want := readFile(t, srcPath)
			got := readFile(t, dst.Name())
			if !bytes.Equal(want, got) {
				t.Fatalf("copy differs: %d bytes, want %d", len(got), len(want))
			}
			if a, b := allocated(t, dst.Name()), allocated(t, srcPath); a > b {
				t.Errorf("copy allocates %d bytes, the original %d", a, b)
			}
		})
	}
}

func TestCopySparseCancelled(t *testing.T) {
	dir := t.TempDir()
	src, err := os.Create(filepath.Join(dir, "src"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if _, err := src.WriteAt(make([]byte, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	dst, err := os.Create(filepath.Join(dir, "dst"))
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := copySparse(ctx, dst, src); !errors.Is(err, context.Canceled) {
		t.Errorf("copySparse with a cancelled context: %v", err)
	}
}

func TestCopyRangeRW(t *testing.T) {
	dir := t.TempDir()
	want := bytes.Repeat([]byte("0123456789"), 300_000)
	srcPath := filepath.Join(dir, "src")
	if err := os.WriteFile(srcPath, want, 0o600); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(srcPath)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.Create(filepath.Join(dir, "dst"))
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if err := copyRangeRW(context.Background(), dst, src, 0, int64(len(want))); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, dst.Name()); !bytes.Equal(got, want) {
		t.Errorf("copyRangeRW copy differs")
	}
	if err := copyRangeRW(context.Background(), dst, src, int64(len(want))-10, 20); err == nil {
		t.Errorf("copying past the end succeeded")
	}
}
