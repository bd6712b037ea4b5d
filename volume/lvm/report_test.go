package lvm

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/lvnbd/lvnbd/volume"
)

// lvSummary is what the driver reads from one LV.
type lvSummary struct {
	Name                             string
	Hidden                           bool
	Size, OriginSize                 int64
	Type, State                      string
	Snapshot, Thin, Merging, Invalid bool
	Origin                           string
	Tags                             []string
	Stripes                          int
	StripeSize                       int64
	SnapPct, DataPct                 float64
}

func summarize(lvs []*logicalVolume) []lvSummary {
	var out []lvSummary
	for _, lv := range lvs {
		out = append(out, lvSummary{
			Name: lv.name, Hidden: lv.hidden, Size: lv.size, OriginSize: lv.originSize,
			Type: string(lv.volumeType()), State: string(lv.state()),
			Snapshot: lv.snapshot(), Thin: lv.thin(), Merging: lv.merging(), Invalid: lv.invalid(),
			Origin: lv.origin, Tags: lv.tags, Stripes: lv.stripes, StripeSize: lv.stripeSize,
			SnapPct: lv.snapPct, DataPct: lv.dataPct,
		})
	}
	return out
}

// TestParseLVs reads a VG with a striped LV of two segments (a row each), a
// thin pool, thin and classic snapshots, one that overflowed (invalid), and
// LVs that are not lvnbd's.
func TestParseLVs(t *testing.T) {
	lvs, err := parseLVs([]byte(testdata(t, "lvs.json")))
	if err != nil {
		t.Fatal(err)
	}
	lvnbd := []string{"lvnbd"}
	want := []lvSummary{
		{Name: "lin", Size: 32 << 20, OriginSize: 32 << 20, Type: "o", State: "a", Tags: lvnbd, Stripes: 1},
		{Name: "lin+full", Size: 4 << 20, OriginSize: 32 << 20, Type: "s", State: "I", Snapshot: true, Invalid: true,
			Origin: "lin", Tags: lvnbd, Stripes: 1, SnapPct: 100, DataPct: 100},
		{Name: "lvol0_pmspare", Hidden: true, Size: 4 << 20, Type: "e", State: "-", Stripes: 1},
		{Name: "manual", Size: 8 << 20, OriginSize: 32 << 20, Type: "s", State: "I", Snapshot: true, Invalid: true,
			Origin: "lin", Stripes: 1, SnapPct: 100, DataPct: 100},
		{Name: "pool", Size: 16 << 20, Type: "t", State: "a", Stripes: 1},
		{Name: "pool_tdata", Hidden: true, Size: 16 << 20, Type: "T", State: "a", Stripes: 1},
		{Name: "pool_tmeta", Hidden: true, Size: 4 << 20, Type: "e", State: "a", Stripes: 1},
		{Name: "root", Size: 8 << 20, Type: "-", State: "a", Stripes: 1},
		{Name: "thin1", Size: 64 << 20, Type: "V", State: "a", Thin: true, Tags: lvnbd},
		{Name: "thin1+t1", Size: 64 << 20, Type: "V", State: "a", Snapshot: true, Thin: true, Origin: "thin1", Tags: lvnbd},
		{Name: "vm1", Size: 128 << 20, OriginSize: 128 << 20, Type: "o", State: "a", Tags: lvnbd, Stripes: 2, StripeSize: 64 << 10},
		{Name: "vm1+s1", Size: 8 << 20, OriginSize: 128 << 20, Type: "s", State: "a", Snapshot: true, Origin: "vm1", Tags: lvnbd,
			Stripes: 1, SnapPct: 12.65, DataPct: 12.65},
		{Name: "vm1+s2", Size: 8 << 20, OriginSize: 128 << 20, Type: "s", State: "a", Snapshot: true, Origin: "vm1", Tags: lvnbd,
			Stripes: 1, SnapPct: 12.65, DataPct: 12.65},
	}
	if diff := cmp.Diff(want, summarize(lvs)); diff != "" {
		t.Errorf("parseLVs (-want +got):\n%s", diff)
	}
	if got, want := lvs[10].created, time.Date(2026, 11, 22, 3, 40, 52, 0, time.UTC); !got.Equal(want) {
		t.Errorf("vm1 created %v, want %v", got, want)
	}
}

// TestParseLVsMerging reads merges waiting for their open origins: the
// snapshots are hidden, of type S, and lv_merging is set on them and their
// origins.
func TestParseLVsMerging(t *testing.T) {
	lvs, err := parseLVs([]byte(testdata(t, "lvs-merging.json")))
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]lvSummary{}
	for _, s := range summarize(lvs) {
		byName[s.Name] = s
	}
	for name, want := range map[string]struct{ hidden, snapshot, thin, merging bool }{
		"vm1+s1":   {true, true, false, true},
		"thin1+t1": {true, true, true, true},
		"vm1+s2":   {false, true, false, false},
		"vm1":      {false, false, false, false},
		"thin1":    {false, false, true, false},
	} {
		s := byName[name]
		if got := (struct{ hidden, snapshot, thin, merging bool }{s.Hidden, s.Snapshot, s.Thin, s.Merging}); got != want {
			t.Errorf("%s: hidden, snapshot, thin, merging = %+v, want %+v", name, got, want)
		}
	}
}

func TestParseLVsEmpty(t *testing.T) {
	lvs, err := parseLVs([]byte(testdata(t, "lvs-empty.json")))
	if err != nil || len(lvs) != 0 {
		t.Errorf("parseLVs(empty VG) = %v, %v", lvs, err)
	}
}

func TestParseLVsErrors(t *testing.T) {
	row := func(field, value string) string {
		r := map[string]string{"lv_name": "a", "lv_uuid": "u", "lv_size": "4194304", "lv_attr": "-wi-a-----",
			"lv_time": "2026-11-22 03:24:54 +0000", "stripes": "1", "stripe_size": "0"}
		r[field] = value
		var b strings.Builder
		b.WriteString(`{"report":[{"lv":[{`)
		first := true
		for k, v := range r {
			if !first {
				b.WriteString(",")
			}
			first = false
			b.WriteString(`"` + k + `":"` + v + `"`)
		}
		b.WriteString(`}]}]}`)
		return b.String()
	}
	tests := []struct {
		name, in, want string
	}{
		{"not JSON", "  Volume group vg0 not found", "parsing lvs report"},
		{"short attr", row("lv_attr", "-wi-a"), "lv_attr"},
		{"no uuid", row("lv_uuid", ""), "lv_uuid"},
		{"bracket", row("lv_name", "[a"), "brackets"},
		{"numbers not strings", `{"report":[{"lv":[{"lv_name":"a","lv_size":4194304}]}]}`, "parsing lvs report"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseLVs([]byte(tt.in))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("parseLVs(%s) = %v, want an error about %s", tt.in, err, tt.want)
			}
		})
	}
	// A field that does not parse, once the LV is known by name, UUID and
	// kind, is that LV's problem: the listing goes on.
	for _, tt := range []struct {
		name, in, want string
	}{
		{"size with suffix", row("lv_size", "4.00m"), `lv_size "4.00m"`},
		{"negative size", row("lv_size", "-1"), `lv_size "-1"`},
		{"bad stripes", row("stripes", "two"), `stripes "two"`},
		{"bad percent", row("snap_percent", "lots"), "snap_percent"},
		{"percent over 100", row("data_percent", "101"), "data_percent"},
		{"merging", row("lv_merging", "soon"), "lv_merging"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			lvs, err := parseLVs([]byte(tt.in))
			if err != nil || len(lvs) != 1 {
				t.Fatalf("parseLVs(%s) = %v, %v, want the LV with its problem", tt.in, lvs, err)
			}
			if p := lvs[0].problem; !strings.Contains(p, tt.want) {
				t.Errorf("problem %q, want it to name %s", p, tt.want)
			}
		})
	}
	// The merge count is the highest lvnbd-rollbacks-N tag; other tags, and
	// ones that only look like it, count nothing.
	for tags, want := range map[string]int{
		"lvnbd":                   0,
		"lvnbd,lvnbd-rollbacks-2": 2,
		"lvnbd-rollbacks-3,lvnbd,lvnbd-rollbacks-1":  3,
		"lvnbd,lvnbd-rollbacks-x,lvnbd-rollbacks-":   0,
		"lvnbd,backup-lvnbd-rollbacks-4":             0,
		"lvnbd,lvnbd-rollbacks-9,lvnbd-rollbacks-10": 10,
	} {
		lvs, err := parseLVs([]byte(row("lv_tags", tags)))
		if err != nil || len(lvs) != 1 || lvs[0].rollbacks != want {
			t.Errorf("tags %q: %v, %v; want %d rollbacks", tags, lvs, err, want)
		}
	}
	// A time in another format (report/time_format in lvm.conf) is not
	// known, and fails nothing: it only orders snapshots.
	lvs, err := parseLVs([]byte(row("lv_time", "Sun Nov 22 03:40:54 2026")))
	if err != nil || len(lvs) != 1 || !lvs[0].created.IsZero() || lvs[0].problem != "" {
		t.Errorf("an LV with lv_time in another format: %v, %v; want it, its time unknown", lvs, err)
	}
}

func TestParseVG(t *testing.T) {
	tests := []struct {
		file string
		want volumeGroup
	}{
		{"vgs.json", volumeGroup{name: "vg0", size: 792723456, free: 562036736, extentSize: 4 << 20, pvCount: 3}},
		{"vgs-full.json", volumeGroup{name: "vg0", size: 792723456, free: 0, extentSize: 4 << 20, pvCount: 3}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			vg, err := parseVG([]byte(testdata(t, tt.file)), "vg0")
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, *vg, cmp.AllowUnexported(volumeGroup{})); diff != "" {
				t.Errorf("parseVG (-want +got):\n%s", diff)
			}
		})
	}
	if _, err := parseVG([]byte(testdata(t, "vgs.json")), "vg1"); err == nil {
		t.Error("parseVG found vg1 in a report of vg0")
	}
	if _, err := parseVG([]byte(`{"report":[{"vg":[{"vg_name":"vg0","vg_extent_size":"0"}]}]}`), "vg0"); err == nil {
		t.Error("parseVG accepted an extent size of 0")
	}
}

func TestParseVGRuns(t *testing.T) {
	run1 := volume.Run{Boot: "0123456789abcdef0123456789abcdef", PID: 4242, PIDStart: 12345}
	run2 := volume.Run{Boot: "fedcba9876543210fedcba9876543210", PID: 77, PIDStart: 999}
	for _, tc := range []struct {
		name, report, vg string
		want             volume.RunState
		tags             int
		err              string
	}{
		{name: "none", report: testdata(t, "vgs-tags-none.json"), vg: "vg0"},
		{name: "epoch and runs beside another tag", report: testdata(t, "vgs-tags.json"), vg: "vg0",
			want: volume.RunState{Epoch: "00112233", Runs: []volume.Run{run1, run2}}, tags: 3},
		// Two epochs, and a run tag that does not parse: runs of an
		// unknown boot, which a server takes for a crash.
		{name: "odd", report: testdata(t, "vgs-tags-odd.json"), vg: "vg0",
			want: volume.RunState{Runs: []volume.Run{run1, run2, {}, {}}}, tags: 5},
		{name: "another VG", report: testdata(t, "vgs-tags.json"), vg: "vg1", err: "no volume group vg1"},
		{name: "not json", report: `{`, vg: "vg0", err: "parsing vgs report"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, tags, pvs, err := parseVGRuns([]byte(tc.report), tc.vg)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("parseVGRuns = %+v, %v; want an error with %q", got, err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("parseVGRuns (-want +got):\n%s", diff)
			}
			if len(tags) != tc.tags {
				t.Errorf("parseVGRuns read %d lvnbd tags (%q), want %d", len(tags), tags, tc.tags)
			}
			if want := []string{"/dev/ram0", "/dev/ram1", "/dev/ram2"}; !slices.Equal(pvs, want) {
				t.Errorf("parseVGRuns read PVs %q, want %q", pvs, want)
			}
		})
	}
}

// addSeedFiles seeds f with the files pattern matches: real lvm2 output.
func addSeedFiles(f *testing.F, pattern string) {
	files, err := filepath.Glob(pattern)
	if err != nil {
		f.Fatal(err)
	}
	for _, file := range files {
		b, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
}

// Whatever vgs prints, parseVGRuns returns a valid epoch or none, and runs
// that are valid or zero (of an unknown boot).
func FuzzParseVGRuns(f *testing.F) {
	addSeedFiles(f, "testdata/vgs-tags*.json")
	f.Fuzz(func(t *testing.T, b []byte) {
		st, _, _, err := parseVGRuns(b, "vg0")
		if err != nil {
			return
		}
		if st.Epoch != "" && !volume.ValidEpoch(st.Epoch) {
			t.Fatalf("epoch %q, not an epoch", st.Epoch)
		}
		for _, r := range st.Runs {
			if r != (volume.Run{}) && !r.Valid() {
				t.Fatalf("run %+v, neither valid nor zero", r)
			}
		}
	})
}

func FuzzParseLVs(f *testing.F) {
	addSeedFiles(f, "testdata/lvs*.json")
	f.Add([]byte(`{"report":[{"lv":[{"lv_name":"[x]","lv_uuid":"u","lv_attr":"Sri-I-s---","snap_percent":"100.00"}]}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		lvs, err := parseLVs(b)
		if err != nil {
			return
		}
		for _, lv := range lvs {
			if len(lv.attr) != 10 || lv.name == "" || lv.size < 0 {
				t.Fatalf("parseLVs accepted %+v", lv)
			}
			_ = lv.invalid() || lv.merging() || lv.snapshot()
		}
	})
}
