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

// An lvnbd server whose storage box crashed while it served (see
// server/boxcrash) ends each volume's ID with "--c" and the box's epoch:
// 8 hex digits drawn at the first start after the crash. The volume is the
// same, its data may not be (the writes acknowledged but not flushed before
// the crash are lost), so a dom0 takes it for another volume, while the
// server's own records of the volume (a failed write-back) still apply.
// No base ID has "--": an LVM UUID's groups and RolledBackID's "-rN" are
// joined by single dashes, a file volume's ID is hex.
const epochMark, epochLen = "--c", 8

// WithEpoch returns the ID id carries once its box crashed and drew epoch:
// id itself while epoch is "" (no crash yet), or when id is "" (a volume
// with no ID). Where the result would not be an ID (longer than 64; no
// driver's ID is that long), it is "": an export without an ID, which a
// dom0 refuses as it refuses a volume made anew, where id itself would be
// taken back as if the box had not crashed.
func WithEpoch(id, epoch string) string {
	if id == "" || epoch == "" {
		return id
	}
	if e := id + epochMark + epoch; validID(e) {
		return e
	}
	return ""
}

// SplitEpoch returns the volume's own ID and the box's epoch of an ID made
// by WithEpoch; an ID without one is its own base, and epoch is "".
func SplitEpoch(id string) (base, epoch string) {
	i := strings.LastIndex(id, epochMark)
	if i <= 0 || len(id)-i-len(epochMark) != epochLen {
		return id, ""
	}
	for _, r := range id[i+len(epochMark):] {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f') {
			return id, ""
		}
	}
	return id[:i], id[i+len(epochMark):]
}
