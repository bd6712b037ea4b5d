package volume

import (
	"fmt"
	"strings"
)

// MaxNameLen is the longest volume or snapshot name.
const MaxNameLen = 64

// ValidateName checks a volume or snapshot name: 1 to MaxNameLen letters,
// digits, dots, underscores and dashes, not starting with a dot or dash. Such
// names are safe as file names, LVM names, NBD export names and in URIs.
func ValidateName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: empty name", ErrInvalidName)
	case len(name) > MaxNameLen:
		return fmt.Errorf("%w %q: longer than %d characters", ErrInvalidName, name, MaxNameLen)
	case name[0] == '-' || name[0] == '.':
		return fmt.Errorf("%w %q: must not start with - or .", ErrInvalidName, name)
	}
	for _, r := range name {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-'
		if !ok {
			return fmt.Errorf("%w %q: only letters, digits and . _ - are allowed, not %q", ErrInvalidName, name, r)
		}
	}
	return nil
}

// SnapshotRef is the name of a snapshot's export, VOLUME@SNAPSHOT.
func SnapshotRef(volume, snapshot string) string { return volume + "@" + snapshot }

// ParseSnapshotRef splits and validates VOLUME@SNAPSHOT.
func ParseSnapshotRef(ref string) (volume, snapshot string, err error) {
	volume, snapshot, ok := strings.Cut(ref, "@")
	if !ok {
		return "", "", fmt.Errorf("%w %q: want VOLUME@SNAPSHOT, such as vm1@20261122T031500Z", ErrInvalidName, ref)
	}
	if err := ValidateName(volume); err != nil {
		return "", "", fmt.Errorf("snapshot %q: volume: %w", ref, err)
	}
	if err := ValidateName(snapshot); err != nil {
		return "", "", fmt.Errorf("snapshot %q: %w", ref, err)
	}
	return volume, snapshot, nil
}

// ValidExportName reports whether name is a volume name or VOLUME@SNAPSHOT
// with valid names.
func ValidExportName(name string) bool {
	if ValidateName(name) == nil {
		return true
	}
	_, _, err := ParseSnapshotRef(name)
	return err == nil
}
