package volume

import "errors"

// ErrNotFound is returned for a volume or snapshot that does not exist.
var ErrNotFound = errors.New("not found")

// ErrExists is returned when creating a volume or snapshot whose name is
// taken.
var ErrExists = errors.New("already exists")

// ErrInvalidName is returned for a name that is not 1 to 64 letters, digits,
// dots, underscores and dashes starting with a letter, digit or underscore,
// or a snapshot reference that is not VOLUME@SNAPSHOT.
var ErrInvalidName = errors.New("invalid name")

// ErrInvalidSize is returned for a size that does not parse, is zero or
// negative, or is out of range for the driver.
var ErrInvalidSize = errors.New("invalid size")

// ErrShrink is returned when a resize would make a volume smaller and
// shrinking was not allowed: it discards the data past the new end.
var ErrShrink = errors.New("shrinking discards data")

// ErrNoSpace is returned when the pool has too little free space for a
// volume, a resize or a snapshot.
var ErrNoSpace = errors.New("not enough free space")

// ErrHasSnapshots is returned when removing a volume that still has
// snapshots; remove or merge them first.
var ErrHasSnapshots = errors.New("volume has snapshots")

// ErrMergePending is returned when a snapshot merge could not start because
// the volume is open; it starts when the volume is next activated, and
// undoes whatever is written to the volume until then (Volume.MergePending).
var ErrMergePending = errors.New("merge pending until the volume is closed")

// ErrUnsupported is returned for an operation or option the driver does not
// have, such as a volume URL of an unknown scheme.
var ErrUnsupported = errors.New("not supported")

// ErrUnreadable is returned for a volume or snapshot the driver lists with a
// Problem: it knows the name but could not read the rest.
var ErrUnreadable = errors.New("cannot be read")
