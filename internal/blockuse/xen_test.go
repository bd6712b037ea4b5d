package blockuse

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// blkback opens a guest's disk without claiming it: a device that is the
// backend of a Xen vbd, or has a partition that is, is a guest's disk. Its
// physical_device is in hexadecimal.
func TestXenBackends(t *testing.T) {
	sys := t.TempDir()
	vbd := func(name, physical string) {
		t.Helper()
		dir := filepath.Join(sys, "bus", "xen-backend", "devices", name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if physical == "" {
			return // not connected to a disk yet
		}
		if err := os.WriteFile(filepath.Join(dir, "physical_device"), []byte(physical), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	vbd("vbd-1-51712", "fd:3\n")   // dm-3
	vbd("vbd-2-51712", "103:10\n") // 259:16, a partition (nvme0n1p1)
	vbd("vbd-3-51712", "8:0\n")    // sda: someone else's
	vbd("vbd-4-51728", "")
	tests := []struct {
		devs map[string]string
		want []string
	}{
		{map[string]string{"253:3": "dm-3"}, []string{"dm-3 given to Xen domain 1 by vbd-1-51712, taken back with 'xl block-detach 1 51712'"}},
		{map[string]string{"259:0": "nvme0n1", "259:16": "nvme0n1p1"}, []string{"nvme0n1p1 given to Xen domain 2 by vbd-2-51712, taken back with 'xl block-detach 2 51712'"}},
		{map[string]string{"7:0": "loop0"}, nil},
	}
	for _, tt := range tests {
		got, err := XenBackends(sys, tt.devs)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("%v (-want +got):\n%s", tt.devs, diff)
		}
	}
	if got, err := XenBackends(filepath.Join(sys, "none"), map[string]string{"253:3": "dm-3"}); got != nil || err != nil {
		t.Errorf("without Xen: %v, %v", got, err)
	}
	// What cannot be read is an error, never "unused": it guards writes.
	vbd("vbd-5-51712", "garbage\n")
	if _, err := XenBackends(sys, map[string]string{"7:0": "loop0"}); err == nil || !strings.Contains(err.Error(), "vbd-5-51712") {
		t.Errorf("garbage physical_device: %v", err)
	}
}
