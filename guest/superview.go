package guest

import (
	"fmt"
	"strconv"
	"strings"
)

// SuperView is what a component device's version-1 md superblock says of
// its array as of the last time it was written: its own slot and which
// slots were active. Only mdadm --examine without --export prints it
// (examine_super1 in mdadm's super1.c, the same in mdadm 4.2 and 4.4).
type SuperView struct {
	// Role is the device's slot ("Device Role : Active device N" or
	// "Replacement device N"), or -1 for a spare or a journal.
	Role int
	// ArrayState has one character per slot: 'A' active, '.' missing,
	// 'R' replacing, '?' when the superblock is inconsistent.
	ArrayState string
}

// ParseSuperView reads the Device Role and Array State lines of
// mdadm --examine (LC_ALL=C) for one device with a version-1 superblock;
// 0.90 superblocks print a table instead and are refused.
func ParseSuperView(b []byte) (SuperView, error) {
	v := SuperView{Role: -2}
	for _, line := range strings.Split(string(b), "\n") {
		key, value, ok := strings.Cut(line, " : ")
		if !ok {
			continue
		}
		value = strings.TrimSpace(value)
		switch strings.TrimSpace(key) {
		case "Device Role":
			v.Role = -1
			if value == "spare" || value == "Journal" {
				continue
			}
			n, found := strings.CutPrefix(value, "Active device ")
			if !found {
				n, found = strings.CutPrefix(value, "Replacement device ")
			}
			r, err := strconv.Atoi(n)
			if !found || err != nil || r < 0 {
				return SuperView{}, fmt.Errorf("device role %q: %w", value, errSyntax)
			}
			v.Role = r
		case "Array State":
			// "AA ('A' == active, '.' == missing, 'R' == replacing)"
			st, legend, _ := strings.Cut(value, " ")
			if st == "" || strings.Trim(st, "AR.?") != "" || !strings.HasPrefix(legend, "('A' == active") {
				return SuperView{}, fmt.Errorf("array state %q: %w", value, errSyntax)
			}
			v.ArrayState = st
		}
	}
	if v.Role == -2 || v.ArrayState == "" {
		return SuperView{}, fmt.Errorf("no Device Role and Array State lines (not a version-1 superblock?): %w", errSyntax)
	}
	return v, nil
}

// RanAlone reports whether the device last saw itself active with another
// slot missing: it was then written without that leg (assembled alone, in
// this guest before or elsewhere), and differs from it in ways the running
// array's bitmap does not record.
func (v SuperView) RanAlone() bool {
	if v.Role < 0 || v.Role >= len(v.ArrayState) || v.ArrayState[v.Role] == '.' {
		return false
	}
	return strings.Contains(v.ArrayState[:v.Role]+v.ArrayState[v.Role+1:], ".")
}
