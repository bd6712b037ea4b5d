package guest

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// errSyntax is wrapped by every parser's error for input it cannot read.
var errSyntax = errors.New("unexpected format")

// Pair is one KEY=VALUE line of mdadm --export or blkid -o export output.
type Pair struct {
	Key, Value string
}

// ParseExport reads KEY=VALUE lines, as mdadm --detail --export, mdadm
// --examine --export and blkid -o export print them. Keys are letters,
// digits and underscores; blank lines are skipped; the order is kept.
func ParseExport(b []byte) ([]Pair, error) {
	var pairs []Pair
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimRight(line, "\r")
		if strings.TrimSpace(line) == "" {
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok || !validKey(key) {
			return nil, fmt.Errorf("line %d %q: want KEY=VALUE: %w", i+1, line, errSyntax)
		}
		pairs = append(pairs, Pair{Key: key, Value: value})
	}
	return pairs, nil
}

// FormatExport writes pairs back as KEY=VALUE lines.
func FormatExport(pairs []Pair) []byte {
	var b strings.Builder
	for _, p := range pairs {
		b.WriteString(p.Key)
		b.WriteByte('=')
		b.WriteString(p.Value)
		b.WriteByte('\n')
	}
	return []byte(b.String())
}

func validKey(k string) bool {
	if k == "" {
		return false
	}
	for _, c := range k {
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

func lookup(pairs []Pair, key string) string {
	for _, p := range pairs {
		if p.Key == key {
			return p.Value
		}
	}
	return ""
}

// Detail is what mdadm --detail --export says about a running array.
type Detail struct {
	Level    string // raid1
	Devices  int    // raid devices (slots)
	Metadata string // 1.2
	UUID     string // mdadm's form, a90c5f28:9f133301:ff19c17e:e8ef9bc0
	DevName  string // NAME of /dev/md/NAME, if it has one
	Name     string // the name in the superblock
	Members  []DetailMember
}

// DetailMember is one component device of an array.
type DetailMember struct {
	Device string // /dev/nbd0
	// Role is the slot number, or "spare" (also for faulty members),
	// "journal" or "faulty" as mdadm reports it.
	Role string
}

// ParseDetail reads mdadm --detail --export output.
func ParseDetail(b []byte) (Detail, error) {
	pairs, err := ParseExport(b)
	if err != nil {
		return Detail{}, err
	}
	d := Detail{
		Level:    lookup(pairs, "MD_LEVEL"),
		Metadata: lookup(pairs, "MD_METADATA"),
		UUID:     lookup(pairs, "MD_UUID"),
		DevName:  lookup(pairs, "MD_DEVNAME"),
		Name:     lookup(pairs, "MD_NAME"),
	}
	if d.Level == "" || d.UUID == "" {
		return Detail{}, fmt.Errorf("no MD_LEVEL or MD_UUID: %w", errSyntax)
	}
	if s := lookup(pairs, "MD_DEVICES"); s != "" {
		if d.Devices, err = strconv.Atoi(s); err != nil || d.Devices < 0 {
			return Detail{}, fmt.Errorf("MD_DEVICES=%q: %w", s, errSyntax)
		}
	}
	// MD_DEVICE_<path with / as _>_ROLE and _DEV come in pairs; the path
	// itself is ambiguous once mangled, so the _DEV value names the device.
	for _, p := range pairs {
		prefix, ok := strings.CutSuffix(p.Key, "_DEV")
		if !ok || !strings.HasPrefix(prefix, "MD_DEVICE_") {
			continue
		}
		if p.Value == "" {
			return Detail{}, fmt.Errorf("%s is empty: %w", p.Key, errSyntax)
		}
		d.Members = append(d.Members, DetailMember{Device: p.Value, Role: lookup(pairs, prefix+"_ROLE")})
	}
	return d, nil
}

// Examine is what mdadm --examine --export reads from a component device's
// md superblock.
type Examine struct {
	Level   string
	Devices int
	Name    string
	UUID    string // the array's UUID
	DevUUID string // this device's UUID
	Events  uint64 // the array's event count when this superblock was last written
}

// ParseExamine reads mdadm --examine --export output for one device.
func ParseExamine(b []byte) (Examine, error) {
	pairs, err := ParseExport(b)
	if err != nil {
		return Examine{}, err
	}
	e := Examine{
		Level:   lookup(pairs, "MD_LEVEL"),
		Name:    lookup(pairs, "MD_NAME"),
		UUID:    lookup(pairs, "MD_UUID"),
		DevUUID: lookup(pairs, "MD_DEV_UUID"),
	}
	if e.UUID == "" {
		return Examine{}, fmt.Errorf("no MD_UUID: %w", errSyntax)
	}
	if s := lookup(pairs, "MD_DEVICES"); s != "" {
		if e.Devices, err = strconv.Atoi(s); err != nil || e.Devices < 0 {
			return Examine{}, fmt.Errorf("MD_DEVICES=%q: %w", s, errSyntax)
		}
	}
	if s := lookup(pairs, "MD_EVENTS"); s != "" {
		if e.Events, err = strconv.ParseUint(s, 10, 64); err != nil {
			return Examine{}, fmt.Errorf("MD_EVENTS=%q: %w", s, errSyntax)
		}
	}
	return e, nil
}
