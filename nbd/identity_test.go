package nbd

import (
	"strings"
	"testing"
)

func TestDescriptionID(t *testing.T) {
	uuid := "N2rCXI-bdIi-0s83-f1kJ-NiKY-r36V-EsR2zC"
	for _, tc := range []struct {
		desc, want string
	}{
		{"volume vm1 on lvm://vg0 (lvnbd-id " + uuid + ")", uuid},
		{"(lvnbd-id 18ea3f92c137d200)", ""}, // no space before: not lvnbd's suffix
		{" (lvnbd-id 18ea3f92c137d200)", "18ea3f92c137d200"},
		{"volume vm1 on lvm://vg0", ""},
		{"another server's disk (id 5)", ""},
		{"volume (lvnbd-id a) (lvnbd-id b)", "b"},
		{"volume (lvnbd-id )", ""},
		{"volume (lvnbd-id a b)", ""},
		{"volume (lvnbd-id a/b)", ""},
		{"volume (lvnbd-id " + strings.Repeat("a", 65) + ")", ""},
		{"volume (lvnbd-id " + strings.Repeat("a", 64) + ")", strings.Repeat("a", 64)},
		{"", ""},
		{")", ""},
	} {
		if got := DescriptionID(tc.desc); got != tc.want {
			t.Errorf("DescriptionID(%q) = %q, want %q", tc.desc, got, tc.want)
		}
	}
	for _, tc := range []struct{ desc, id, want string }{
		{"volume vm1", uuid, "volume vm1 (lvnbd-id " + uuid + ")"},
		{"volume vm1", "", "volume vm1"},
		{"volume vm1", "not an id", "volume vm1"},
	} {
		if got := WithID(tc.desc, tc.id); got != tc.want {
			t.Errorf("WithID(%q, %q) = %q, want %q", tc.desc, tc.id, got, tc.want)
		}
	}
}

// Whatever the description, DescriptionID finds an ID or nothing, and finds
// the ID WithID appended.
func FuzzDescriptionID(f *testing.F) {
	f.Add("volume vm1 on lvm://vg0", "N2rCXI-bdIi-0s83-f1kJ-NiKY-r36V-EsR2zC")
	f.Add("snapshot vm1@s1 on file:///srv (lvnbd-id x)", "18ea3f92c137d200")
	f.Add("", "")
	f.Fuzz(func(t *testing.T, desc, id string) {
		if got := DescriptionID(desc); got != "" && !validID(got) {
			t.Fatalf("DescriptionID(%q) = %q, not an ID", desc, got)
		}
		if validID(id) {
			if got := DescriptionID(WithID(desc, id)); got != id {
				t.Fatalf("DescriptionID(WithID(%q, %q)) = %q", desc, id, got)
			}
		} else if WithID(desc, id) != desc {
			t.Fatalf("WithID(%q, %q) changed the description", desc, id)
		}
	})
}
