// Package bench measures block storage: dd-style sequential runs and random
// I/O at a queue depth, against a file, a block device or an NBD export, with
// latency percentiles and an optional data check. The same workloads run
// against the server alone (NBD) and the kernel path (/dev/nbdX, md, a guest
// disk), so the two can be compared.
package bench

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Target is storage a benchmark runs against. Every method may be called
// from many goroutines at once: the queue depth is the number of callers.
type Target interface {
	// ReadAt fills p from offset off.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes p at offset off; with durable set the data is on
	// stable storage when it returns (FUA on NBD, O_DSYNC on files).
	WriteAt(ctx context.Context, p []byte, off int64, durable bool) error
	// Flush makes every completed write durable.
	Flush(ctx context.Context) error
	// Size is the target's size in bytes.
	Size() int64
	// Close releases the target.
	Close() error
}

// Aligner is implemented by targets that need buffers, offsets and lengths
// aligned (O_DIRECT): Alignment returns the required multiple, 1 for none.
type Aligner interface {
	Alignment() int
}

// Describer is implemented by targets that can say what they are, for
// reports ("block device", "file", "nbd export over 4 connections").
type Describer interface {
	Describe() string
}

// OpenOptions say how to open a target.
type OpenOptions struct {
	// Write is set for modes that write: only then may a file be created,
	// and only with Force may existing data be overwritten.
	Write bool
	// Force allows writing over an existing block device, a non-empty file
	// or an NBD export.
	Force bool
	// Size is the region to use, from offset 0; 0 means the whole target.
	// A file that does not exist is created with this size.
	Size int64
	// Direct opens files and devices with O_DIRECT, bypassing the page
	// cache, like dd oflag=direct iflag=direct.
	Direct bool
	// Conns is the number of NBD connections, spread over the URIs; a
	// file or device takes no more than one.
	Conns int
	// Notices, if set, is told when a target takes less than was asked:
	// one connection to a server without multi-conn.
	Notices io.Writer
	// TLS is for nbds:// URIs (client.Options.TLS); nil for the system's
	// roots or the URIs' tls-certificates.
	TLS *tls.Config
	// Validate, if set, vets the region and the alignment direct I/O
	// needs once they are known, before a file is created, extended or
	// opened for writing (Config.Validate): a run its target cannot take
	// then leaves nothing behind.
	Validate func(size int64, align int) error
}

// Overwriter is implemented by targets opened to write over data that was
// there before, as --force allowed: Overwrites names what, or returns "".
type Overwriter interface {
	Overwrites() string
}

// ErrOverwrite is returned (wrapped in an *OverwriteError) when a write mode
// would overwrite existing data and Force was not given.
var ErrOverwrite = errors.New("refusing to overwrite existing data without --force")

// OverwriteError says exactly what a refused write run would have destroyed.
type OverwriteError struct {
	Path string // file, device or URI
	// Resolved is the device node a symlinked device path leads to
	// (/dev/disk/by-id/… → /dev/sdb), or "".
	Resolved string
	Kind     string // "block device", "file", "NBD export"
	Size     int64  // its size in bytes
	Range    int64  // the bytes the run would write over, from offset 0
}

func (e *OverwriteError) Error() string {
	dev := ""
	if e.Resolved != "" && e.Resolved != e.Path {
		dev = e.Resolved + ", "
	}
	what := fmt.Sprintf("%s %s (%s%s, %d bytes)", e.Kind, e.Path, dev, formatIBytes(e.Size), e.Size)
	if e.Range > 0 && e.Range < e.Size {
		what += fmt.Sprintf(": its first %s would be overwritten", formatIBytes(e.Range))
	} else {
		what += ": all of it would be overwritten"
	}
	return fmt.Sprintf("refusing to write to %s; add --force if that is what you want", what)
}

// Unwrap makes errors.Is(err, ErrOverwrite) true.
func (e *OverwriteError) Unwrap() error { return ErrOverwrite }

// IsNBDURI reports whether s names an NBD export rather than a path.
func IsNBDURI(s string) bool {
	for _, scheme := range []string{"nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://"} {
		if strings.HasPrefix(s, scheme) {
			return true
		}
	}
	return false
}

// Open opens the targets named: one file or block device path, or one or
// more NBD URIs of the same export (several links to one volume, with the
// connections spread over them).
func Open(ctx context.Context, names []string, o OpenOptions) (Target, error) {
	if len(names) == 0 {
		return nil, errors.New("no target given")
	}
	if !IsNBDURI(names[0]) {
		if len(names) > 1 {
			return nil, fmt.Errorf("%d targets given: only NBD URIs of one export may be combined", len(names))
		}
		if o.Conns > 1 {
			return nil, fmt.Errorf("--conns %d: %s is not an NBD export, and a file or block device has no connections to spread requests over; use --qd for more requests in flight", o.Conns, names[0])
		}
		f, err := OpenFile(names[0], o)
		if err != nil {
			return nil, err // not a nil *File in a non-nil Target
		}
		return f, nil
	}
	for _, n := range names[1:] {
		if !IsNBDURI(n) {
			return nil, fmt.Errorf("%s: cannot combine a path with NBD URIs", n)
		}
	}
	t, err := OpenNBD(ctx, names, o)
	if err != nil {
		return nil, err
	}
	return t, nil
}
