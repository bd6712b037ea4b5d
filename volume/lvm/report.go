package lvm

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lvnbd/lvnbd/volume"
)

// The lvs and vgs fields lvnbd reads. Sizes come as strings of bytes
// (--units b --nosuffix); segment fields (segtype, stripes, stripe_size)
// make lvs print one row per segment.
const (
	lvFields = "lv_name,lv_uuid,lv_size,lv_attr,lv_path,lv_tags,lv_time,origin,origin_size," +
		"lv_merging,snap_percent,data_percent,pool_lv,segtype,stripes,stripe_size"
	vgFields = "vg_name,vg_size,vg_free,vg_extent_size,pv_count"
)

// lvsArgs lists every LV of vg, hidden ones too (-a): a snapshot that waits
// to be merged is hidden.
func lvsArgs(vg string) []string {
	return []string{"lvs", "-a", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", lvFields, vg}
}

func vgsArgs(vg string) []string {
	return []string{"vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", vgFields, vg}
}

// lvRow is one row of `lvs --reportformat json`, where every value is a
// string.
type lvRow struct {
	Name        string `json:"lv_name"`
	UUID        string `json:"lv_uuid"`
	Size        string `json:"lv_size"`
	Attr        string `json:"lv_attr"`
	Path        string `json:"lv_path"`
	Tags        string `json:"lv_tags"`
	Time        string `json:"lv_time"`
	Origin      string `json:"origin"`
	OriginSize  string `json:"origin_size"`
	Merging     string `json:"lv_merging"`
	SnapPercent string `json:"snap_percent"`
	DataPercent string `json:"data_percent"`
	PoolLV      string `json:"pool_lv"`
	Segtype     string `json:"segtype"`
	Stripes     string `json:"stripes"`
	StripeSize  string `json:"stripe_size"`
}

type vgRow struct {
	Name       string `json:"vg_name"`
	Size       string `json:"vg_size"`
	Free       string `json:"vg_free"`
	ExtentSize string `json:"vg_extent_size"`
	PVCount    string `json:"pv_count"`
}

// logicalVolume is an LV as lvs reports it, its segments folded into one.
type logicalVolume struct {
	name       string
	hidden     bool // lvs -a shows it in brackets
	uuid       string
	size       int64
	attr       string // lv_attr, always 10 characters
	path       string
	tags       []string
	rollbacks  int // times it was rolled back (snapshots merged into it), from its rollbacksTag
	created    time.Time
	origin     string
	originSize int64
	mergingSet bool    // lv_merging: a merge into the origin is under way or pending
	snapPct    float64 // classic snapshots: how full the COW space is
	dataPct    float64 // thin volumes: how much is mapped
	pool       string
	segtype    string
	stripes    int    // of the first segment
	stripeSize int64  // of the first segment
	problem    string // a field that did not parse: see volume.Volume.Problem
}

// volumeType is lv_attr's first character: s snapshot, S merging snapshot,
// o origin, O origin of a merging snapshot, V thin volume, t thin pool, -
// plain, and others for internal LVs.
func (lv *logicalVolume) volumeType() byte { return lv.attr[0] }

// state is lv_attr's fifth character: a active, I invalid snapshot, S
// invalid suspended snapshot, m merge failed, - inactive, and others.
func (lv *logicalVolume) state() byte { return lv.attr[4] }

func (lv *logicalVolume) thin() bool { return lv.pool != "" }

// classicSnapshot is a COW snapshot; type S is also a thin snapshot being
// merged.
func (lv *logicalVolume) classicSnapshot() bool {
	return (lv.volumeType() == 's' || lv.volumeType() == 'S') && !lv.thin()
}

func (lv *logicalVolume) snapshot() bool {
	return lv.classicSnapshot() || lv.thin() && lv.origin != ""
}

// merging is set for a snapshot being merged, or waiting to be (lv_merging
// is set on its origin too).
func (lv *logicalVolume) merging() bool {
	return lv.snapshot() && (lv.volumeType() == 'S' || lv.mergingSet)
}

// mergeTarget is set for an origin a snapshot is being merged into, or
// waits to be: lv_attr type O, and lv_merging (set on a classic snapshot's
// origin, not on a thin one's).
func (lv *logicalVolume) mergeTarget() bool {
	return !lv.snapshot() && (lv.volumeType() == 'O' || lv.mergingSet)
}

// invalid is set for a classic snapshot whose COW space filled up.
func (lv *logicalVolume) invalid() bool {
	return lv.classicSnapshot() && (lv.state() == 'I' || lv.state() == 'S' || lv.snapPct >= 100)
}

func (lv *logicalVolume) hasTag(tag string) bool { return slices.Contains(lv.tags, tag) }

// parseLVs parses `lvs --reportformat json --units b --nosuffix -o lvFields`.
func parseLVs(b []byte) ([]*logicalVolume, error) {
	var rep struct {
		Report []struct {
			LV []lvRow `json:"lv"`
		} `json:"report"`
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		return nil, fmt.Errorf("parsing lvs report: %w", err)
	}
	var lvs []*logicalVolume
	byUUID := map[string]bool{}
	for _, r := range rep.Report {
		for _, row := range r.LV {
			if byUUID[row.UUID] {
				continue // a further segment of an LV we have
			}
			lv, err := parseLVRow(row)
			if err != nil {
				return nil, fmt.Errorf("parsing lvs report: LV %q: %w", row.Name, err)
			}
			byUUID[row.UUID] = true
			lvs = append(lvs, lv)
		}
	}
	return lvs, nil
}

func parseLVRow(row lvRow) (*logicalVolume, error) {
	lv := &logicalVolume{
		name:    row.Name,
		uuid:    row.UUID,
		attr:    row.Attr,
		path:    row.Path,
		origin:  row.Origin,
		pool:    row.PoolLV,
		segtype: row.Segtype,
	}
	if n, ok := strings.CutPrefix(lv.name, "["); ok {
		lv.name, ok = strings.CutSuffix(n, "]")
		if !ok {
			return nil, fmt.Errorf("lv_name %q: unbalanced brackets", row.Name)
		}
		lv.hidden = true
	}
	if lv.name == "" || lv.uuid == "" {
		return nil, fmt.Errorf("no lv_name or lv_uuid")
	}
	if len(lv.attr) != 10 {
		return nil, fmt.Errorf("lv_attr %q: want 10 characters", row.Attr)
	}
	if row.Tags != "" {
		lv.tags = strings.Split(row.Tags, ",")
	}
	for _, t := range lv.tags {
		// The highest count, should an interrupted lvchange ever leave
		// two: a count too high only changes the ID once more.
		if n, err := strconv.Atoi(strings.TrimPrefix(t, rollbacksTag)); err == nil && strings.HasPrefix(t, rollbacksTag) && n > lv.rollbacks {
			lv.rollbacks = n
		}
	}
	// What is above tells which LV this is and what kind. A field below
	// that does not parse is the LV's problem, not the listing's: one
	// LV's odd field must not fail every listing (of LVs lvnbd does not
	// even serve, too), which would stop the server's rescans.
	var problems []error
	switch row.Merging {
	case "", "0", "unknown":
	case "merging", "1":
		lv.mergingSet = true
	default:
		problems = append(problems, fmt.Errorf("lv_merging %q: want merging or nothing", row.Merging))
	}
	var err error
	stripes := int64(1)
	for _, f := range []struct {
		name, value string
		to          *int64
	}{
		{"lv_size", row.Size, &lv.size},
		{"origin_size", row.OriginSize, &lv.originSize},
		{"stripe_size", row.StripeSize, &lv.stripeSize},
		{"stripes", row.Stripes, &stripes},
	} {
		if *f.to, err = parseBytes(f.name, f.value); err != nil {
			problems = append(problems, err)
		}
	}
	lv.stripes = int(min(stripes, 1<<16))
	if lv.snapPct, err = parsePercent("snap_percent", row.SnapPercent); err != nil {
		problems = append(problems, err)
	}
	if lv.dataPct, err = parsePercent("data_percent", row.DataPercent); err != nil {
		problems = append(problems, err)
	}
	if len(problems) > 0 {
		lv.problem = "lvs reports it oddly: " + errors.Join(problems...).Error()
	}
	if row.Time != "" {
		// lvm2's default time format under LC_ALL=C. Another
		// (report/time_format in lvm.conf) leaves the time unknown: it
		// only orders snapshots, and one LV's odd field must not fail
		// every listing, which would stop the server's rescans.
		if t, err := time.Parse("2006-01-02 15:04:05 -0700", row.Time); err == nil {
			lv.created = t
		}
	}
	return lv, nil
}

// parseBytes parses a count or size field; empty means 0.
func parseBytes(field, s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%s %q: want a number of bytes (run lvs with --units b --nosuffix)", field, s)
	}
	return n, nil
}

// parsePercent parses a percentage field such as "12.60"; empty means 0.
func parsePercent(field, s string) (float64, error) {
	if s == "" {
		return 0, nil
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f < 0 || f > 100 {
		return 0, fmt.Errorf("%s %q: want a percentage", field, s)
	}
	return f, nil
}

// volumeGroup is a VG as vgs reports it.
type volumeGroup struct {
	name       string
	size       int64
	free       int64
	extentSize int64
	pvCount    int
}

// parseVG parses `vgs --reportformat json --units b --nosuffix -o vgFields`
// for one VG.
func parseVG(b []byte, name string) (*volumeGroup, error) {
	var rep struct {
		Report []struct {
			VG []vgRow `json:"vg"`
		} `json:"report"`
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		return nil, fmt.Errorf("parsing vgs report: %w", err)
	}
	for _, r := range rep.Report {
		for _, row := range r.VG {
			if row.Name != name {
				continue
			}
			vg := &volumeGroup{name: row.Name}
			var err error
			if vg.size, err = parseBytes("vg_size", row.Size); err != nil {
				return nil, fmt.Errorf("parsing vgs report: %w", err)
			}
			if vg.free, err = parseBytes("vg_free", row.Free); err != nil {
				return nil, fmt.Errorf("parsing vgs report: %w", err)
			}
			if vg.extentSize, err = parseBytes("vg_extent_size", row.ExtentSize); err != nil {
				return nil, fmt.Errorf("parsing vgs report: %w", err)
			}
			pvs, err := parseBytes("pv_count", row.PVCount)
			if err != nil {
				return nil, fmt.Errorf("parsing vgs report: %w", err)
			}
			vg.pvCount = int(min(pvs, 1<<16))
			if vg.extentSize <= 0 {
				return nil, fmt.Errorf("parsing vgs report: VG %s: extent size %q", name, row.ExtentSize)
			}
			return vg, nil
		}
	}
	return nil, fmt.Errorf("parsing vgs report: no volume group %s in it", name)
}

// The tags on the VG that record its volume.RunState: epochTagPrefix and
// the epoch; runTagPrefix and a run as BOOT-PID-PIDSTART.
const (
	epochTagPrefix = "lvnbd-epoch-"
	runTagPrefix   = "lvnbd-run-"
)

// vgTagsArgs lists the tags and the PVs of vg: one row per PV.
func vgTagsArgs(vg string) []string {
	return []string{"vgs", "--reportformat", "json", "-o", "vg_name,vg_tags,pv_name", vg}
}

// parseVGRuns parses `vgs --reportformat json -o vg_name,vg_tags,pv_name`
// for the run state VG name records, and returns it with the tags it was
// read from and the VG's PVs (a missing one is "[unknown]").
// What does not read as lvnbd wrote it errs on the safe side, and does not
// stop a server: a run tag that does not parse is a run of an unknown boot
// (a crash, so a new epoch), and so are epoch tags that are not one epoch.
func parseVGRuns(b []byte, name string) (st volume.RunState, tags, pvs []string, err error) {
	var rep struct {
		Report []struct {
			VG []struct {
				Name string `json:"vg_name"`
				Tags string `json:"vg_tags"`
				PV   string `json:"pv_name"`
			} `json:"vg"`
		} `json:"report"`
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		return st, nil, nil, fmt.Errorf("parsing vgs report: %w", err)
	}
	found := false
	for _, r := range rep.Report {
		for _, row := range r.VG {
			if row.Name != name {
				continue
			}
			if row.PV != "" {
				pvs = append(pvs, row.PV)
			}
			if found {
				continue // the VG's tags again, on its next PV's row
			}
			found = true
			var epochs []string
			for _, t := range strings.Split(row.Tags, ",") {
				if e, ok := strings.CutPrefix(t, epochTagPrefix); ok {
					epochs = append(epochs, e)
					tags = append(tags, t)
				} else if rest, ok := strings.CutPrefix(t, runTagPrefix); ok {
					st.Runs = append(st.Runs, parseRunTag(rest))
					tags = append(tags, t)
				}
			}
			switch {
			case len(epochs) == 1 && volume.ValidEpoch(epochs[0]):
				st.Epoch = epochs[0]
			case len(epochs) > 0:
				st.Runs = append(st.Runs, volume.Run{}) // of an unknown boot
			}
		}
	}
	if !found {
		return st, nil, nil, fmt.Errorf("parsing vgs report: no volume group %s in it", name)
	}
	return st, tags, pvs, nil
}

// parseRunTag parses BOOT-PID-PIDSTART; a zero Run if it does not parse.
func parseRunTag(s string) volume.Run {
	f := strings.Split(s, "-")
	if len(f) != 3 {
		return volume.Run{}
	}
	pid, err1 := strconv.Atoi(f[1])
	start, err2 := strconv.ParseUint(f[2], 10, 64)
	r := volume.Run{Boot: f[0], PID: pid, PIDStart: start}
	if err1 != nil || err2 != nil || !r.Valid() {
		return volume.Run{}
	}
	return r
}

// runTags are the tags that record st.
func runTags(st volume.RunState) []string {
	var tags []string
	if st.Epoch != "" {
		tags = append(tags, epochTagPrefix+st.Epoch)
	}
	for _, r := range st.Runs {
		tags = append(tags, fmt.Sprintf("%s%s-%d-%d", runTagPrefix, r.Boot, r.PID, r.PIDStart))
	}
	return tags
}
