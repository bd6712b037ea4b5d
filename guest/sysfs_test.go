package guest

import (
	"errors"
	"strconv"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/google/go-cmp/cmp"
)

func TestReadArray(t *testing.T) {
	const mib = 1 << 20
	leg := func(dev string, slot int, state string) Member {
		return Member{Device: dev, Slot: slot, State: DevState(strings.Split(state, ",")), Offset: mib, Size: 63 * mib}
	}
	base := func(name string, degraded int, action string, done, total uint64, members ...Member) Array {
		num := map[string]string{"md126": "9:126", "md127": "9:127"}[name]
		return Array{Name: name, DevNumber: num, Level: "raid1", Metadata: "1.2", State: "clean", RaidDisks: 2,
			Degraded: degraded, Size: 63 * mib, ComponentSize: 63 * mib, SyncAction: action, SyncDone: done, SyncTotal: total,
			ResyncStart: "none", Bitmap: "internal", Members: members}
	}
	resync := base("md126", 0, "resync", 0, 129024, leg("nbd0", 0, "in_sync,failfast"), leg("nbd1", 1, "in_sync,failfast"))
	resync.ResyncStart = "0" // a resync runs from there
	grown := base("md127", 0, "resync", 129024, 260096, leg("nbd0", 0, "in_sync,failfast"), leg("nbd1", 1, "in_sync,failfast"))
	grown.ResyncStart = "129024" // the grown part, from the old end
	grown.Size, grown.ComponentSize = 127*mib, 127*mib
	grown.Members[0].Size, grown.Members[1].Size = 127*mib, 127*mib
	tests := []struct {
		file string
		want Array
	}{
		{"sysfs-resync.txt", resync},
		{"sysfs-healthy.txt", base("md126", 0, "idle", 0, 0, leg("nbd0", 0, "in_sync,failfast"), leg("nbd1", 1, "in_sync,failfast"))},
		{"sysfs-faulty.txt", base("md127", 1, "idle", 0, 0, leg("nbd0", -1, "faulty,failfast"), leg("nbd1", 1, "in_sync,failfast"))},
		{"sysfs-removed.txt", base("md127", 1, "idle", 0, 0, leg("nbd1", 1, "in_sync,failfast"))},
		{"sysfs-recovery.txt", base("md126", 1, "recover", 0, 129024, leg("nbd0", 0, "spare,failfast"), leg("nbd1", 1, "in_sync,failfast"))},
		{"sysfs-grow.txt", grown},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			fsys := fstest.MapFS{}
			name := sysfsDump(t, fsys, tt.file)
			got, err := readArray(fsys, name)
			if err != nil {
				t.Fatal(err)
			}
			if normalizeUUID(got.UUID) != got.UUID || got.UUID == "" {
				t.Errorf("UUID %q is not in mdadm's form", got.UUID)
			}
			got.UUID = ""
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

// The sysfs UUID and mdadm's are the same array's, written two ways.
func TestSysfsUUIDMatchesMdadm(t *testing.T) {
	fsys := fstest.MapFS{}
	name := sysfsDump(t, fsys, "sysfs-faulty.txt")
	a, err := readArray(fsys, name)
	if err != nil {
		t.Fatal(err)
	}
	d, err := ParseDetail(readTestdata(t, "detail-export-faulty.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if a.UUID != normalizeUUID(d.UUID) || a.UUID != d.UUID {
		t.Errorf("sysfs UUID %q, mdadm's %q", a.UUID, d.UUID)
	}
}

func TestReadArrayErrors(t *testing.T) {
	fsys := fstest.MapFS{}
	name := sysfsDump(t, fsys, "sysfs-healthy.txt")
	if _, err := readArray(fsys, "md9"); !errors.Is(err, ErrNoArray) {
		t.Errorf("missing array: %v", err)
	}
	if _, err := readArray(fsys, "../md126"); !errors.Is(err, ErrNoArray) {
		t.Errorf("path as a name: %v", err)
	}
	for attr, value := range map[string]string{
		"md/component_size":  "lots",
		"md/dev-nbd0/state":  "in sync",
		"md/dev-nbd0/slot":   "-1",
		"md/sync_completed":  "12 of 34",
		"md/degraded":        "-1",
		"md/dev-nbd1/offset": "x",
		"size":               "",
		"md/dev-nbd1/size":   "1e3",
		"md/dev-nbd1/errors": "many",
		"md/mismatch_cnt":    "?",
		"md/raid_disks":      "two",
	} {
		t.Run(attr, func(t *testing.T) {
			broken := fstest.MapFS{}
			for k, v := range fsys {
				broken[k] = v
			}
			broken["sys/block/"+name+"/"+attr] = &fstest.MapFile{Data: []byte(value + "\n")}
			if value == "" {
				delete(broken, "sys/block/"+name+"/"+attr)
			}
			if _, err := readArray(broken, name); err == nil {
				t.Errorf("%s = %q: no error", attr, value)
			}
		})
	}
}

func TestParseDevState(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want DevState
	}{
		{"in_sync,failfast", DevState{"in_sync", "failfast"}},
		{"faulty,write_error,failfast\n", DevState{"faulty", "write_error", "failfast"}},
		{"spare", DevState{"spare"}},
	} {
		got, err := ParseDevState(tt.in)
		if err != nil || !cmp.Equal(tt.want, got) {
			t.Errorf("ParseDevState(%q) = %v, %v, want %v", tt.in, got, err, tt.want)
		}
	}
	for _, in := range []string{"", "in_sync,", "In_sync", "in sync", ",faulty"} {
		if _, err := ParseDevState(in); !errors.Is(err, errSyntax) {
			t.Errorf("ParseDevState(%q) = %v, want a syntax error", in, err)
		}
	}
	s := DevState{"faulty", "failfast"}
	if !s.Has(StateFaulty) || s.Has(StateInSync) || s.String() != "faulty,failfast" {
		t.Errorf("Has/String of %v", s)
	}
}

func TestParseSyncCompleted(t *testing.T) {
	for _, tt := range []struct {
		in          string
		done, total uint64
		ok          bool
	}{
		{"none", 0, 0, true},
		{"delayed", 0, 0, true},
		{"20480 / 129024\n", 20480, 129024, true},
		{"20480/129024", 0, 0, false},
		{"x / 1", 0, 0, false},
		{"1 / -1", 0, 0, false},
	} {
		done, total, err := ParseSyncCompleted(tt.in)
		if (err == nil) != tt.ok || done != tt.done || total != tt.total {
			t.Errorf("ParseSyncCompleted(%q) = %d, %d, %v", tt.in, done, total, err)
		}
	}
}

func TestNormalizeUUID(t *testing.T) {
	for in, want := range map[string]string{
		"e4264e04-4d18-9632-3ebc-cc7bb2168f02": "e4264e04:4d189632:3ebccc7b:b2168f02",
		"E4264E04:4D189632:3EBCCC7B:B2168F02":  "e4264e04:4d189632:3ebccc7b:b2168f02",
		"e4264e04:4d189632:3ebccc7b":           "",
		"g4264e04:4d189632:3ebccc7b:b2168f02":  "",
		"":                                     "",
	} {
		if got := normalizeUUID(in); got != want {
			t.Errorf("normalizeUUID(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzParseDevState(f *testing.F) {
	for _, s := range []string{"in_sync,failfast", "faulty,write_error,failfast", "spare", "in_sync,,x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		st, err := ParseDevState(s)
		if err != nil {
			return
		}
		again, err := ParseDevState(st.String())
		if err != nil || !cmp.Equal(st, again) {
			t.Errorf("round trip of %q: %v, %v", s, again, err)
		}
	})
}

func FuzzParseSyncCompleted(f *testing.F) {
	for _, s := range []string{"none", "0 / 129024", "20480 / 129024", "delayed"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		done, total, err := ParseSyncCompleted(s)
		if err != nil || strings.TrimSpace(s) == "none" || strings.TrimSpace(s) == "delayed" {
			return
		}
		d2, t2, err := ParseSyncCompleted(strings.Join([]string{uitoa(done), "/", uitoa(total)}, " "))
		if err != nil || d2 != done || t2 != total {
			t.Errorf("round trip of %q: %d %d %v", s, d2, t2, err)
		}
	})
}

func FuzzParseSlot(f *testing.F) {
	for _, s := range []string{"none", "0", "1", "-1", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSlot(s)
		if err != nil {
			return
		}
		back := "none"
		if n >= 0 {
			back = uitoa(uint64(n))
		}
		if m, err := ParseSlot(back); err != nil || m != n {
			t.Errorf("round trip of %q: %d %v", s, m, err)
		}
	})
}

// FuzzReadArray feeds a captured array's sysfs with one attribute replaced.
func FuzzReadArray(f *testing.F) {
	f.Add("md/dev-nbd0/state", "faulty,failfast")
	f.Add("md/sync_completed", "1 / 2")
	f.Add("md/component_size", "18446744073709551615")
	f.Fuzz(func(t *testing.T, attr, value string) {
		fsys := fstest.MapFS{}
		name := sysfsDump(t, fsys, "sysfs-faulty.txt")
		p := "sys/block/" + name + "/" + attr
		if !strings.HasPrefix(p, "sys/block/"+name+"/") || strings.Contains(attr, "..") {
			return
		}
		fsys[p] = &fstest.MapFile{Data: []byte(value)}
		_, _ = readArray(fsys, name)
	})
}

func uitoa(n uint64) string { return strconv.FormatUint(n, 10) }
