package guest

import (
	"errors"
	"fmt"
	"io/fs"
	"path"
	"slices"
)

// ArrayStatus is one array's state, as `lvnbd guest status` reports it.
type ArrayStatus struct {
	Name          string         `json:"name"`           // md0 of /dev/md/md0, or the kernel name
	Path          string         `json:"path"`           // /dev/md/md0, or /dev/md127 without a name
	Device        string         `json:"device"`         // /dev/md127
	UUID          string         `json:"uuid,omitempty"` // mdadm's form
	Level         string         `json:"level"`
	Health        string         `json:"health"`      // healthy, degraded, recovering, resyncing, resync-pending, checking, repairing, reshaping, failed, inactive; unknown with Problem
	State         string         `json:"array_state"` // the kernel's array_state
	RaidDisks     int            `json:"raid_disks"`
	Degraded      int            `json:"degraded"` // slots without an in-sync leg
	Size          uint64         `json:"size"`     // bytes
	ComponentSize uint64         `json:"component_size"`
	Bitmap        string         `json:"bitmap,omitempty"`
	MismatchCount uint64         `json:"mismatch_count"`
	Sync          *SyncStatus    `json:"sync,omitempty"`
	Members       []MemberStatus `json:"members"`
	// Problem says why the array's state could not be read (sysfs this
	// version does not parse, such as a reshaping RAID5's raid_disks
	// "4 (3)"); the other arrays are still reported.
	Problem string `json:"problem,omitempty"`
}

// SyncStatus is a running resync, recovery, check, repair or reshape.
type SyncStatus struct {
	Action  string  `json:"action"` // resync, recover, check, repair, reshape
	Done    uint64  `json:"done"`   // bytes
	Total   uint64  `json:"total"`  // bytes
	Percent float64 `json:"percent"`
	Finish  string  `json:"finish,omitempty"` // md's estimate, such as 0.6min
	Speed   string  `json:"speed,omitempty"`  // such as 1296K/sec
}

// MemberStatus is one leg of an array.
type MemberStatus struct {
	Device string   `json:"device"` // /dev/nbd0
	Slot   int      `json:"slot"`   // -1 when it has none (faulty, spare)
	State  []string `json:"state"`  // in_sync, faulty, spare, failfast, write_error...
	Size   uint64   `json:"size"`   // bytes of the device the array uses
	Errors uint64   `json:"errors"`
}

// Status reports every md array on this machine.
func Status() ([]ArrayStatus, error) {
	return realHost().status()
}

func (h *host) status() ([]ArrayStatus, error) {
	b, err := fs.ReadFile(h.sys, "proc/mdstat")
	if err != nil {
		return nil, fmt.Errorf("reading /proc/mdstat (is md loaded?): %w", err)
	}
	st, err := ParseMdstat(b)
	if err != nil {
		return nil, err
	}
	names := h.arrayNames()
	var out []ArrayStatus
	for _, ma := range st.Arrays {
		a, err := readArray(h.sys, ma.Name)
		if err != nil {
			if _, serr := fs.Stat(h.sys, "sys/block/"+ma.Name+"/md"); errors.Is(serr, fs.ErrNotExist) {
				// Stopped since /proc/mdstat was read: it is not
				// here to report, and the other arrays still are.
				continue
			}
			out = append(out, ArrayStatus{Name: ma.Name, Path: devPath(ma.Name), Device: devPath(ma.Name), Level: ma.Level,
				Health: "unknown", Members: []MemberStatus{}, Problem: err.Error()})
			continue
		}
		out = append(out, arrayStatus(a, ma, names[a.Name]))
	}
	return out, nil
}

// arrayNames maps kernel names to the NAME of their /dev/md/NAME link.
func (h *host) arrayNames() map[string]string {
	names := make(map[string]string)
	entries, err := fs.ReadDir(h.sys, "dev/md")
	if err != nil {
		return names // no named arrays, or no /dev/md
	}
	for _, e := range entries {
		p, err := h.resolve("/dev/md/" + e.Name())
		if err != nil {
			continue
		}
		if _, ok := names[path.Base(p)]; !ok {
			names[path.Base(p)] = e.Name()
		}
	}
	return names
}

func arrayStatus(a Array, ma MdstatArray, name string) ArrayStatus {
	s := ArrayStatus{
		Name: a.Name, Path: devPath(a.Name), Device: devPath(a.Name), UUID: a.UUID, Level: a.Level,
		State: a.State, RaidDisks: a.RaidDisks, Degraded: a.Degraded, Size: a.Size,
		ComponentSize: a.ComponentSize, Bitmap: a.Bitmap, MismatchCount: a.MismatchCount,
		Members: []MemberStatus{},
	}
	if name != "" {
		s.Name, s.Path = name, "/dev/md/"+name
	}
	inSync := 0
	for _, m := range a.Members {
		if m.InSync() {
			inSync++
		}
		s.Members = append(s.Members, MemberStatus{Device: devPath(m.Device), Slot: m.Slot,
			State: slices.Clone([]string(m.State)), Size: m.Size, Errors: m.Errors})
	}
	slices.SortFunc(s.Members, func(x, y MemberStatus) int {
		// Legs in slot order, then the ones without a slot.
		if (x.Slot < 0) != (y.Slot < 0) {
			if x.Slot < 0 {
				return 1
			}
			return -1
		}
		return x.Slot - y.Slot
	})
	if a.SyncAction != "" && a.SyncAction != "idle" && a.SyncTotal > 0 {
		s.Sync = &SyncStatus{Action: a.SyncAction, Done: a.SyncDone * 512, Total: a.SyncTotal * 512,
			Percent: float64(a.SyncDone*1000/a.SyncTotal) / 10}
		if ma.Sync != nil {
			s.Sync.Finish, s.Sync.Speed = ma.Sync.Finish, ma.Sync.Speed
		}
	}
	s.Health = health(a, ma, inSync)
	return s
}

func health(a Array, ma MdstatArray, inSync int) string {
	switch {
	case !ma.Active || a.State == "inactive":
		return "inactive"
	case inSync == 0, a.State == "broken":
		// broken: md lost a member it cannot run without, and fails
		// writes, whatever the members still say.
		return "failed"
	case a.Degraded > 0 && a.SyncAction == "recover":
		return "recovering"
	case a.Degraded > 0:
		return "degraded"
	}
	switch a.SyncAction {
	case "resync":
		return "resyncing"
	case "check":
		return "checking"
	case "repair":
		return "repairing"
	case "reshape":
		return "reshaping"
	}
	// No resync runs, yet the legs may differ: md starts none in a
	// read-auto array until its first write (after an unclean shutdown
	// mdstat says resync=PENDING), nor while sync_action is frozen.
	if a.ResyncStart != "" && a.ResyncStart != "none" || ma.Sync != nil && ma.Sync.Pending != "" {
		return "resync-pending"
	}
	return "healthy"
}
