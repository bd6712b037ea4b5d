package snapshot

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/volume"
	"github.com/lvnbd/lvnbd/volume/file"
)

func newManager(t *testing.T) *Manager {
	t.Helper()
	d, err := file.New(filepath.Join(t.TempDir(), "volumes"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Create(context.Background(), volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	return &Manager{
		Driver: d,
		Now:    func() time.Time { return time.Date(2026, 11, 22, 4, 15, 0, 0, time.FixedZone("CET", 3600)) },
	}
}

func TestDefaultName(t *testing.T) {
	got := DefaultName(time.Date(2026, 11, 22, 4, 15, 0, 0, time.FixedZone("CET", 3600)))
	if want := "20261122T031500Z"; got != want {
		t.Errorf("DefaultName = %q, want %q", got, want)
	}
	if err := volume.ValidateName(got); err != nil {
		t.Error(err)
	}
}

func TestParseRef(t *testing.T) {
	tests := []struct {
		ref       string
		optional  bool
		vol, name string
		wantErr   bool
	}{
		{"vm1@s1", false, "vm1", "s1", false},
		{"vm1@s1", true, "vm1", "s1", false},
		{"vm1", true, "vm1", "", false},
		{"vm1", false, "", "", true},
		{"vm1@", true, "", "", true},
		{"-vm1", true, "", "", true},
		{"vm 1", true, "", "", true},
	}
	for _, tt := range tests {
		vol, name, err := ParseRef(tt.ref, tt.optional)
		if (err != nil) != tt.wantErr || vol != tt.vol || name != tt.name {
			t.Errorf("ParseRef(%q, %v) = %q, %q, %v", tt.ref, tt.optional, vol, name, err)
		}
		if err != nil && !errors.Is(err, volume.ErrInvalidName) {
			t.Errorf("ParseRef(%q) error %v is not ErrInvalidName", tt.ref, err)
		}
	}
}

func TestLifecycle(t *testing.T) {
	ctx := context.Background()
	m := newManager(t)
	s, err := m.Create(ctx, "vm1", 0)
	if err != nil {
		t.Fatal(err)
	}
	if s.Ref() != "vm1@20261122T031500Z" {
		t.Errorf("default-named snapshot is %s", s.Ref())
	}
	if _, err := m.Create(ctx, "vm1", 0); !errors.Is(err, volume.ErrExists) {
		t.Errorf("a second default-named snapshot in the same second: %v, want ErrExists", err)
	}
	if _, err := m.Create(ctx, "vm1@before-upgrade", 1<<30); err != nil {
		t.Fatal(err)
	}
	if snaps, err := m.List(ctx, "vm1"); err != nil || len(snaps) != 2 {
		t.Fatalf("List(vm1) = %+v, %v", snaps, err)
	}
	if all, err := m.List(ctx, ""); err != nil || len(all) != 2 {
		t.Fatalf("List() = %+v, %v", all, err)
	}
	if _, err := m.List(ctx, "nope"); !errors.Is(err, volume.ErrNotFound) {
		t.Errorf("List(nope): %v", err)
	}
	if err := m.Merge(ctx, "vm1@before-upgrade"); err != nil {
		t.Fatal(err)
	}
	if err := m.Remove(ctx, s.Ref()); err != nil {
		t.Fatal(err)
	}
	if err := m.Remove(ctx, s.Ref()); !errors.Is(err, volume.ErrNotFound) {
		t.Errorf("second Remove: %v", err)
	}
	if err := m.Merge(ctx, "vm1"); !errors.Is(err, volume.ErrInvalidName) {
		t.Errorf("Merge without a snapshot name: %v", err)
	}
	if all, err := m.List(ctx, ""); err != nil || len(all) != 0 {
		t.Errorf("List() at the end = %+v, %v", all, err)
	}
}
