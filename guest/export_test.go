package guest

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseDetail(t *testing.T) {
	tests := []struct {
		file    string
		members []DetailMember
	}{
		{"detail-export-resync.txt", []DetailMember{{"/dev/nbd0", "0"}, {"/dev/nbd1", "1"}}},
		{"detail-export-healthy.txt", []DetailMember{{"/dev/nbd0", "0"}, {"/dev/nbd1", "1"}}},
		// A faulty member has no role: mdadm calls it a spare.
		{"detail-export-faulty.txt", []DetailMember{{"/dev/nbd0", "spare"}, {"/dev/nbd1", "1"}}},
		{"detail-export-removed.txt", []DetailMember{{"/dev/nbd1", "1"}}},
		{"detail-export-recovery.txt", []DetailMember{{"/dev/nbd0", "0"}, {"/dev/nbd1", "1"}}},
		{"detail-export-grow.txt", []DetailMember{{"/dev/nbd0", "0"}, {"/dev/nbd1", "1"}}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			d, err := ParseDetail(readTestdata(t, tt.file))
			if err != nil {
				t.Fatal(err)
			}
			if d.Level != "raid1" || d.Devices != 2 || d.Metadata != "1.2" || d.DevName != "vm1" || d.Name != "vm1" {
				t.Errorf("got %+v, want raid1, 2 devices, metadata 1.2, named vm1", d)
			}
			if normalizeUUID(d.UUID) == "" {
				t.Errorf("UUID %q is not an md UUID", d.UUID)
			}
			if diff := cmp.Diff(tt.members, d.Members); diff != "" {
				t.Errorf("members (-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseExamine(t *testing.T) {
	tests := []struct {
		file string
		want Examine
	}{
		{"examine-export-member.txt", Examine{Level: "raid1", Devices: 2, Name: "vm1"}},
		{"examine-export-stale.txt", Examine{Level: "raid1", Devices: 2, Name: "vm1",
			UUID: "e4264e04:4d189632:3ebccc7b:b2168f02", DevUUID: "c3896ca2:a3c76d84:2c88644f:f47d7828", Events: 30}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			got, err := ParseExamine(readTestdata(t, tt.file))
			if err != nil {
				t.Fatal(err)
			}
			if tt.want.UUID == "" {
				// Only the fixed fields.
				tt.want.UUID, tt.want.DevUUID, tt.want.Events = got.UUID, got.DevUUID, got.Events
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

// The stale leg of scenario 26 has an older event count than the current
// one, and the same array UUID.
func TestExamineStaleVersusCurrent(t *testing.T) {
	stale, err := ParseExamine(readTestdata(t, "examine-export-stale.txt"))
	if err != nil {
		t.Fatal(err)
	}
	current, err := ParseExamine(readTestdata(t, "examine-export-current.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if stale.UUID != current.UUID || stale.DevUUID == current.DevUUID || stale.Events >= current.Events {
		t.Errorf("stale %+v, current %+v: want one array, two devices, the stale one behind", stale, current)
	}
}

func TestParseExportErrors(t *testing.T) {
	for _, in := range []string{
		"MD_LEVEL raid1\n",
		"=x\n",
		"MD-LEVEL=raid1\n",
		"mdadm: No md superblock detected on /dev/ram0.\n",
	} {
		if _, err := ParseExport([]byte(in)); !errors.Is(err, errSyntax) {
			t.Errorf("ParseExport(%q) = %v, want a syntax error", in, err)
		}
	}
	if _, err := ParseDetail([]byte("MD_LEVEL=raid1\n")); !errors.Is(err, errSyntax) {
		t.Errorf("ParseDetail without a UUID: %v", err)
	}
	if _, err := ParseExamine([]byte("MD_UUID=x\nMD_EVENTS=-1\n")); !errors.Is(err, errSyntax) {
		t.Errorf("ParseExamine with negative events: %v", err)
	}
	if _, err := ParseExamine(nil); !errors.Is(err, errSyntax) {
		t.Errorf("ParseExamine of nothing (a blank device): %v", err)
	}
}

func FuzzParseExport(f *testing.F) {
	for _, name := range []string{"detail-export-faulty.txt", "detail-export-removed.txt", "examine-export-stale.txt"} {
		f.Add(readTestdata(f, name))
	}
	f.Add([]byte("A=\n\nB==c\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		pairs, err := ParseExport(b)
		if err != nil {
			return
		}
		again, err := ParseExport(FormatExport(pairs))
		if err != nil {
			t.Fatalf("formatted pairs do not parse: %v", err)
		}
		if diff := cmp.Diff(pairs, again); diff != "" {
			t.Errorf("round trip (-first +second):\n%s", diff)
		}
		// The typed parsers never panic on what ParseExport accepts.
		_, _ = ParseDetail(b)
		_, _ = ParseExamine(b)
	})
}
