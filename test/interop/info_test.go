package interop

import (
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// An odd size: block size 1 means the export is exactly as long as the file.
const infoDiskSize = 10<<20 + 12345

// TestNBDInfoReportsAdvertisedFlags checks with libnbd's nbdinfo that every
// flag the server advertises arrives, over each kind of listener.
func TestNBDInfoReportsAdvertisedFlags(t *testing.T) {
	requireInterop(t, "nbdinfo")
	dir := t.TempDir()
	disk := sparseFile(t, filepath.Join(dir, "disk.img"), infoDiskSize)
	golden := sparseFile(t, filepath.Join(dir, "golden.img"), 1<<20)
	s := startServer(t, serverOpts{tcp: true, unix: true,
		exports: []string{"disk=" + disk, "golden=" + golden + ":ro"}})

	transports := []struct {
		name string
		uri  func(export string) string
	}{
		{"tcp", s.uri},
		{"unix", s.unixURI},
	}
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			t.Run("export", func(t *testing.T) {
				exports := nbdinfoJSON(t, tr.uri("disk"))
				if len(exports) != 1 {
					t.Fatalf("nbdinfo reported %d exports, want 1: %v", len(exports), exports)
				}
				want := map[string]any{
					"export-name":          "disk",
					"export-size":          float64(infoDiskSize),
					"is_read_only":         false,
					"can_flush":            true,
					"can_fua":              true,
					"can_trim":             true,
					"can_zero":             true,
					"can_fast_zero":        true,
					"can_cache":            true,
					"can_df":               true,
					"can_multi_conn":       true,
					"block_size_minimum":   float64(1),
					"block_size_preferred": float64(4096),
					"block_size_maximum":   float64(32 << 20),
					"contexts":             []any{"base:allocation"},
				}
				if diff := cmp.Diff(want, pick(exports[0], want)); diff != "" {
					t.Errorf("nbdinfo --json %s (-want +got):\n%s", tr.uri("disk"), diff)
				}
			})
			t.Run("list", func(t *testing.T) {
				exports := nbdinfoJSON(t, "--list", tr.uri(""))
				want := []map[string]any{
					{"export-name": "disk", "export-size": float64(infoDiskSize), "is_read_only": false},
					{"export-name": "golden", "export-size": float64(1 << 20), "is_read_only": true},
				}
				var got []map[string]any
				for _, e := range exports {
					got = append(got, pick(e, want[0]))
				}
				if diff := cmp.Diff(want, got); diff != "" {
					t.Errorf("nbdinfo --list --json %s (-want +got):\n%s", tr.uri(""), diff)
				}
			})
		})
	}
}

// pick returns the fields of got that want names; absent ones stay absent,
// so the diff shows them missing.
func pick(got, want map[string]any) map[string]any {
	out := map[string]any{}
	for k := range want {
		if v, ok := got[k]; ok {
			out[k] = v
		}
	}
	return out
}
