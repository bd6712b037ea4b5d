package nbd

import "strings"

// An lvnbd server ends an export's description (NBD_INFO_DESCRIPTION) with
// " (lvnbd-id ID)" when it can tell the volume behind the export from any other
// made under the same name: an LV's UUID, a file volume's creation time. The
// protocol has no field for this, and the description is free text shown to
// people; the suffix is lvnbd's own convention, which other servers do not
// follow, and a client that finds no ID knows nothing either way. The
// marker names lvnbd so that no other server's "(id …)" is taken for one.

// maxIDLen bounds an ID: an LVM UUID has 38 characters.
const maxIDLen = 64

const idPrefix, idSuffix = " (lvnbd-id ", ")"

// validID reports whether id can be carried in a description: 1 to 64
// letters, digits and dashes.
func validID(id string) bool {
	if id == "" || len(id) > maxIDLen {
		return false
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
			return false
		}
	}
	return true
}

// WithID returns desc with the volume ID id appended, or desc as it is when
// id is empty or not an ID.
func WithID(desc, id string) string {
	if !validID(id) {
		return desc
	}
	return desc + idPrefix + id + idSuffix
}

// DescriptionID returns the volume ID at the end of desc, or "" if it has
// none.
func DescriptionID(desc string) string {
	rest, ok := strings.CutSuffix(desc, idSuffix)
	if !ok {
		return ""
	}
	i := strings.LastIndex(rest, idPrefix)
	if i < 0 {
		return ""
	}
	if id := rest[i+len(idPrefix):]; validID(id) {
		return id
	}
	return ""
}
