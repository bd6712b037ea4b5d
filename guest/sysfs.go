package guest

import (
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strconv"
	"strings"
)

// Member states as /sys/block/mdX/md/dev-*/state lists them.
const (
	StateFaulty      = "faulty"
	StateInSync      = "in_sync"
	StateWriteMostly = "write_mostly"
	StateBlocked     = "blocked"
	StateSpare       = "spare"
	StateWriteError  = "write_error"
	StateFailfast    = "failfast"
)

// DevState is the comma-separated list of flags in dev-*/state, such as
// in_sync,failfast or faulty,write_error,failfast.
type DevState []string

// ParseDevState reads a dev-*/state value.
func ParseDevState(s string) (DevState, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, fmt.Errorf("empty member state: %w", errSyntax)
	}
	var st DevState
	for _, f := range strings.Split(s, ",") {
		if f == "" || strings.Trim(f, "abcdefghijklmnopqrstuvwxyz_") != "" {
			return nil, fmt.Errorf("member state %q: %w", s, errSyntax)
		}
		st = append(st, f)
	}
	return st, nil
}

// Has reports whether the state includes flag.
func (s DevState) Has(flag string) bool { return slices.Contains(s, flag) }

func (s DevState) String() string { return strings.Join(s, ",") }

// ParseSyncCompleted reads md/sync_completed: "DONE / TOTAL" in sectors
// while a sync action runs, "none" (both zero) otherwise, or "delayed".
func ParseSyncCompleted(s string) (done, total uint64, err error) {
	s = strings.TrimSpace(s)
	if s == "none" || s == "delayed" {
		return 0, 0, nil
	}
	d, t, ok := strings.Cut(s, " / ")
	if !ok {
		return 0, 0, fmt.Errorf("sync_completed %q: %w", s, errSyntax)
	}
	if done, err = strconv.ParseUint(d, 10, 64); err != nil {
		return 0, 0, fmt.Errorf("sync_completed %q: %w", s, errSyntax)
	}
	if total, err = strconv.ParseUint(t, 10, 64); err != nil {
		return 0, 0, fmt.Errorf("sync_completed %q: %w", s, errSyntax)
	}
	return done, total, nil
}

// ParseSlot reads dev-*/slot: the member's role, or -1 for "none" (faulty
// or spare).
func ParseSlot(s string) (int, error) {
	s = strings.TrimSpace(s)
	if s == "none" {
		return -1, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("slot %q: %w", s, errSyntax)
	}
	return n, nil
}

// Array is an md array as sysfs shows it.
type Array struct {
	Name      string // kernel name, md127
	DevNumber string // major:minor, 9:127
	Level     string // raid1
	Metadata  string // metadata_version: 1.2
	State     string // array_state: clean, active, readonly, inactive...
	RaidDisks int
	Degraded  int    // slots without an in-sync member
	Size      uint64 // bytes of the array device
	// ComponentSize is the bytes of each member used for data.
	ComponentSize uint64
	// SyncAction is idle, resync, recover, check, repair, reshape or frozen.
	SyncAction string
	SyncDone   uint64 // sectors done of SyncTotal; both 0 when idle
	SyncTotal  uint64
	// ResyncStart is md/resync_start: "none" when the legs are known to
	// agree, else the sector a resync must start from (one pending in a
	// read-auto array after an unclean shutdown, or frozen); empty if
	// unknown.
	ResyncStart   string
	MismatchCount uint64
	UUID          string // mdadm's form, xxxxxxxx:xxxxxxxx:xxxxxxxx:xxxxxxxx; empty if unknown
	Bitmap        string // bitmap/metadata: internal, external, clustered; empty without one
	Members       []Member
}

// Member is one component device of an array.
type Member struct {
	Device string // kernel name, nbd0
	Slot   int    // role, -1 for none
	State  DevState
	Offset uint64 // bytes before the data on the device
	Size   uint64 // bytes of data the array uses on the device
	Errors uint64 // read errors corrected or not
}

// InSync reports whether the member holds a current copy of its slot. md
// clears in_sync when it fails a member, so in_sync with faulty is no failed
// member: md's state file says faulty also for a member with bad blocks it
// has not yet recorded in the superblock (unacknowledged_bad_blocks), which
// it still reads and writes.
func (m Member) InSync() bool { return m.State.Has(StateInSync) }

// Failed reports whether md failed the member: faulty without in_sync or
// spare (md lists a failed member as neither).
func (m Member) Failed() bool {
	return m.State.Has(StateFaulty) && !m.State.Has(StateInSync) && !m.State.Has(StateSpare)
}

// badBlocksPending reports whether md lists the member as faulty only for
// bad blocks it has not yet recorded (see InSync): faulty with in_sync, or
// with spare (a spare, or a recovery under way, with such bad blocks).
func (m Member) badBlocksPending() bool {
	return m.State.Has(StateFaulty) && (m.State.Has(StateInSync) || m.State.Has(StateSpare))
}

// readArray reads /sys/block/NAME/md from sys, a file system rooted at /.
func readArray(sys fs.FS, name string) (Array, error) {
	if !validKernelName(name) {
		return Array{}, fmt.Errorf("%q: %w", name, ErrNoArray)
	}
	dir := "sys/block/" + name + "/md"
	if _, err := fs.Stat(sys, dir); err != nil {
		return Array{}, fmt.Errorf("%s: %w", name, ErrNoArray)
	}
	r := sysReader{fs: sys, dir: dir}
	a := Array{
		Name:        name,
		DevNumber:   r.str("../dev"),
		Level:       r.optStr("level"),
		Metadata:    r.optStr("metadata_version"),
		State:       r.str("array_state"),
		RaidDisks:   int(r.uint("raid_disks")),
		Degraded:    int(r.optUint("degraded")),
		Size:        r.uint("../size") * 512,
		SyncAction:  r.optStr("sync_action"),
		ResyncStart: r.optStr("resync_start"),
		UUID:        normalizeUUID(r.optStr("uuid")),
		Bitmap:      r.optStr("bitmap/metadata"),
	}
	if cs := r.optStr("component_size"); cs != "" && cs != "none" {
		n, err := strconv.ParseUint(cs, 10, 64)
		if err != nil {
			r.fail("component_size", cs)
		}
		a.ComponentSize = n * 1024
	}
	if sc := r.optStr("sync_completed"); sc != "" {
		var err error
		if a.SyncDone, a.SyncTotal, err = ParseSyncCompleted(sc); err != nil {
			r.err = err
		}
	}
	a.MismatchCount = r.optUint("mismatch_cnt")
	entries, err := fs.ReadDir(sys, dir)
	if err != nil {
		return Array{}, err
	}
	for _, e := range entries {
		dev, ok := strings.CutPrefix(e.Name(), "dev-")
		if !ok {
			continue
		}
		m, err := readMember(sys, dir+"/"+e.Name(), dev)
		if err != nil {
			return Array{}, err
		}
		a.Members = append(a.Members, m)
	}
	if r.err != nil {
		return Array{}, r.err
	}
	return a, nil
}

func readMember(sys fs.FS, dir, dev string) (Member, error) {
	r := sysReader{fs: sys, dir: dir}
	m := Member{Device: dev, Offset: r.uint("offset") * 512, Size: r.uint("size") * 1024, Errors: r.optUint("errors")}
	var err error
	if m.Slot, err = ParseSlot(r.str("slot")); err != nil && r.err == nil {
		r.err = err
	}
	if m.State, err = ParseDevState(r.str("state")); err != nil && r.err == nil {
		r.err = err
	}
	if r.err != nil {
		// A member removed between ReadDir and here leaves a half-read
		// directory behind; callers retry on the next pass.
		return Member{}, r.err
	}
	return m, nil
}

// sysReader reads attribute files, keeping the first error.
type sysReader struct {
	fs  fs.FS
	dir string
	err error
}

func (r *sysReader) read(name string, optional bool) string {
	b, err := fs.ReadFile(r.fs, path.Join(r.dir, name))
	if err != nil {
		if !optional && r.err == nil {
			r.err = fmt.Errorf("reading %s: %w", path.Join(r.dir, name), err)
		}
		return ""
	}
	return strings.TrimSpace(string(b))
}

func (r *sysReader) str(name string) string    { return r.read(name, false) }
func (r *sysReader) optStr(name string) string { return r.read(name, true) }

func (r *sysReader) parseUint(name, s string) uint64 {
	if s == "" {
		return 0
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		r.fail(name, s)
	}
	return n
}

func (r *sysReader) uint(name string) uint64    { return r.parseUint(name, r.str(name)) }
func (r *sysReader) optUint(name string) uint64 { return r.parseUint(name, r.optStr(name)) }

func (r *sysReader) fail(name, value string) {
	if r.err == nil {
		r.err = fmt.Errorf("%s = %q: %w", path.Join(r.dir, name), value, errSyntax)
	}
}

// normalizeUUID turns sysfs's a90c5f28-9f13-3301-ff19-c17ee8ef9bc0 and
// mdadm's a90c5f28:9f133301:ff19c17e:e8ef9bc0 into mdadm's form; anything
// else into "".
func normalizeUUID(s string) string {
	hex := strings.Map(func(r rune) rune {
		switch {
		case r == '-' || r == ':':
			return -1
		case r >= '0' && r <= '9' || r >= 'a' && r <= 'f':
			return r
		case r >= 'A' && r <= 'F':
			return r + 'a' - 'A'
		}
		return '!'
	}, s)
	if len(hex) != 32 || strings.Contains(hex, "!") {
		return ""
	}
	return hex[0:8] + ":" + hex[8:16] + ":" + hex[16:24] + ":" + hex[24:32]
}

// validKernelName accepts block device names as they appear in /sys/block:
// no slashes, no dot-dot.
func validKernelName(s string) bool {
	return s != "" && s != "." && s != ".." && !strings.ContainsAny(s, "/\x00") && len(s) <= 64
}

// blockDevSize reads /sys/class/block/NAME/size in bytes.
func blockDevSize(sys fs.FS, name string) (uint64, error) {
	if !validKernelName(name) {
		return 0, fmt.Errorf("%q is not a block device name", name)
	}
	r := sysReader{fs: sys, dir: "sys/class/block/" + name}
	n := r.uint("size")
	return n * 512, r.err
}
