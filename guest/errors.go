package guest

import "errors"

// ErrNotBlockDevice is returned for a path that is not a block device.
var ErrNotBlockDevice = errors.New("not a block device")

// ErrHasData is returned by Create for a device that carries an md
// superblock, a filesystem or another signature; --force overrides it.
var ErrHasData = errors.New("device carries data")

// ErrInUse is returned by Create for a device that is mounted or held by an
// md array or a device-mapper table.
var ErrInUse = errors.New("device in use")

// ErrExists is returned by Create when /dev/md/NAME already exists.
var ErrExists = errors.New("array already exists")

// ErrInvalidName is returned for an array name that is not 1 to 32
// letters, digits, dots, underscores and dashes.
var ErrInvalidName = errors.New("invalid array name")

// ErrNoArray is returned for a name that is not a running md array.
var ErrNoArray = errors.New("no such md array")
