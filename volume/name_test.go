package volume

import (
	"errors"
	"strings"
	"testing"
)

func TestValidateName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"vm1", true},
		{"VM_1.disk-0", true},
		{"_x", true},
		{"0", true},
		{strings.Repeat("a", 64), true},
		{strings.Repeat("a", 65), false},
		{"", false},
		{"-vm", false},
		{".vm", false},
		{"vm 1", false},
		{"vm@1", false},
		{"vm/1", false},
		{"vm+1", false},
		{"vé", false},
		{"..", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateName(tt.name)
			if (err == nil) != tt.ok {
				t.Fatalf("ValidateName(%q) = %v, want ok=%v", tt.name, err, tt.ok)
			}
			if err != nil && !errors.Is(err, ErrInvalidName) {
				t.Errorf("error %v is not ErrInvalidName", err)
			}
		})
	}
}

func TestParseSnapshotRef(t *testing.T) {
	tests := []struct {
		ref, vol, snap string
		ok             bool
	}{
		{"vm1@20261122T031500Z", "vm1", "20261122T031500Z", true},
		{"vm1@before-upgrade", "vm1", "before-upgrade", true},
		{"vm1", "", "", false},
		{"vm1@", "", "", false},
		{"@snap", "", "", false},
		{"vm1@a@b", "", "", false},
		{"vm 1@a", "", "", false},
		{"vm1@-a", "", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.ref, func(t *testing.T) {
			vol, snap, err := ParseSnapshotRef(tt.ref)
			if (err == nil) != tt.ok {
				t.Fatalf("ParseSnapshotRef(%q) error = %v, want ok=%v", tt.ref, err, tt.ok)
			}
			if err != nil {
				if !errors.Is(err, ErrInvalidName) {
					t.Errorf("error %v is not ErrInvalidName", err)
				}
				return
			}
			if vol != tt.vol || snap != tt.snap {
				t.Errorf("ParseSnapshotRef(%q) = %q, %q, want %q, %q", tt.ref, vol, snap, tt.vol, tt.snap)
			}
			if got := SnapshotRef(vol, snap); got != tt.ref {
				t.Errorf("SnapshotRef round trip = %q, want %q", got, tt.ref)
			}
		})
	}
}

func TestValidExportName(t *testing.T) {
	for name, want := range map[string]bool{
		"vm1": true, "vm1@s1": true, "": false, "../vm1": false, "vm1@../x": false, "vm1@a@b": false, "@s": false,
	} {
		if got := ValidExportName(name); got != want {
			t.Errorf("ValidExportName(%q) = %v, want %v", name, got, want)
		}
	}
}
