package nbd

import (
	"encoding/hex"
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

func TestEpoch(t *testing.T) {
	uuid := "N2rCXI-bdIi-0s83-f1kJ-NiKY-r36V-EsR2zC"
	for _, tc := range []struct{ id, epoch, want string }{
		{uuid, "", uuid},
		{uuid, "3fa2b1c9", uuid + "--c3fa2b1c9"},
		{uuid + "-r2", "3fa2b1c9", uuid + "-r2--c3fa2b1c9"},
		{"18ea3f92c137d200", "00000000", "18ea3f92c137d200--c00000000"},
		{"", "3fa2b1c9", ""},                      // no ID: nothing to tell apart
		{strings.Repeat("a", 54), "3fa2b1c9", ""}, // would be 65: no ID rather than the old one
		{strings.Repeat("a", 53), "3fa2b1c9", strings.Repeat("a", 53) + "--c3fa2b1c9"},
	} {
		got := WithEpoch(tc.id, tc.epoch)
		if got != tc.want {
			t.Errorf("WithEpoch(%q, %q) = %q, want %q", tc.id, tc.epoch, got, tc.want)
		}
		if !validID(got) && got != "" {
			t.Errorf("WithEpoch(%q, %q) = %q, not an ID", tc.id, tc.epoch, got)
		}
	}
	for _, tc := range []struct{ id, base, epoch string }{
		{uuid, uuid, ""},
		{uuid + "--c3fa2b1c9", uuid, "3fa2b1c9"},
		{uuid + "-r1--c3fa2b1c9", uuid + "-r1", "3fa2b1c9"},
		{"--c3fa2b1c9", "--c3fa2b1c9", ""},                      // nothing before the mark
		{uuid + "--c3fa2b1c", uuid + "--c3fa2b1c", ""},          // 7 digits
		{uuid + "--c3fa2b1c90", uuid + "--c3fa2b1c90", ""},      // 9 digits
		{uuid + "--c3FA2B1C9", uuid + "--c3FA2B1C9", ""},        // not lower case
		{uuid + "--c3fa2b1cg", uuid + "--c3fa2b1cg", ""},        // not hex
		{"a--c00000000--c11111111", "a--c00000000", "11111111"}, // the last mark
		{"", "", ""},
	} {
		base, epoch := SplitEpoch(tc.id)
		if base != tc.base || epoch != tc.epoch {
			t.Errorf("SplitEpoch(%q) = %q, %q, want %q, %q", tc.id, base, epoch, tc.base, tc.epoch)
		}
	}
}

// SplitEpoch undoes WithEpoch, and never makes an ID longer or invents an
// epoch an ID does not end with.
func FuzzSplitEpoch(f *testing.F) {
	f.Add("N2rCXI-bdIi-0s83-f1kJ-NiKY-r36V-EsR2zC", "3fa2b1c9")
	f.Add("18ea3f92c137d200--c00000000", "")
	f.Add("", "0")
	f.Fuzz(func(t *testing.T, id, epoch string) {
		base, e := SplitEpoch(id)
		if e == "" && base != id || e != "" && base+epochMark+e != id {
			t.Fatalf("SplitEpoch(%q) = %q, %q: not a split of the ID", id, base, e)
		}
		if !validID(id) || strings.Contains(id, "--") || len(epoch) != epochLen {
			return
		}
		if _, err := hex.DecodeString(epoch); err != nil || strings.ToLower(epoch) != epoch {
			return
		}
		with := WithEpoch(id, epoch)
		if with == id {
			t.Fatalf("WithEpoch(%q, %q) kept the ID as it was", id, epoch)
		}
		if b, e := SplitEpoch(with); with != "" && (b != id || e != epoch) {
			t.Fatalf("SplitEpoch(WithEpoch(%q, %q)) = %q, %q", id, epoch, b, e)
		}
	})
}
