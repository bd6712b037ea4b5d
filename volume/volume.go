// Package volume is lvnbd's storage model: volumes (the block devices a
// storage box exports) and their point-in-time snapshots, behind one Driver
// interface with two implementations, volume/lvm for production (striped LVM
// logical volumes) and volume/file (sparse files in a directory, the default).
//
// Drivers are for the control path (create, grow, snapshot, list); the server
// opens Path() once per export and never calls a driver per request.
package volume

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Volume is one exportable block device.
type Volume struct {
	Name string `json:"name"`
	// Size is what a client of the export sees, in bytes.
	Size int64 `json:"size"`
	// Stripes is the number of physical volumes data is striped over; 1 for
	// a linear volume.
	Stripes int `json:"stripes"`
	// StripeSize is the bytes written to one stripe before the next; 0 for a
	// linear volume.
	StripeSize int64 `json:"stripe_size"`
	// Thin is set for thinly provisioned LVM volumes.
	Thin bool `json:"thin,omitempty"`
	// Path is the file or block device the server opens.
	Path string `json:"path"`
	// ID tells this volume from any other made under its name, before or
	// after (the LV's UUID; for a file, when it was made), and from itself
	// before a snapshot was merged into it (see RolledBackID); empty when
	// the driver cannot tell. A dom0 refuses to reconnect a leg to an
	// export whose ID changed: it would hand the guest's mirror other data.
	ID string `json:"id,omitempty"`
	// MergePending is set while a snapshot is being merged into the volume
	// or waits to be (LVM merges once the volume is closed and activated
	// again). The merge undoes whatever is written to the volume until it
	// starts, so the server does not export it meanwhile.
	MergePending bool `json:"merge_pending"`
	// Problem is set for a volume the driver knows by name but could not
	// read (its file is gone, an LV's report does not parse): say what, and
	// trust no other field. A listing goes on past it, so that one bad entry
	// does not stop a server's rescans for every other volume; the server
	// leaves the export of such a volume as it is, and Get returns Problem
	// as an error.
	Problem string `json:"problem,omitempty"`
	// Snapshots are the volume's snapshots, oldest first.
	Snapshots []Snapshot `json:"snapshots"`
}

// RolledBackID is the ID of a volume made as base that lvnbd has rolled
// back n times (`lvnbd snapshot merge`, or a shrink, which loses the tail):
// base itself until the first, then base-rN. A merge makes the volume an
// older copy of itself that a guest's md cannot tell from a current one:
// re-added from md's bitmap, the blocks written since the snapshot would
// stay old on that half; a shrink grown back has lost what its tail held.
// With another ID, a dom0 refuses the rolled-back half until it is taken
// down and up again, which is also when it must be given to the mirror as a
// new member.
func RolledBackID(base string, n int) string {
	if base == "" || n <= 0 {
		return base
	}
	return fmt.Sprintf("%s-r%d", base, n)
}

// SplitRollbacks undoes RolledBackID: the ID as made, and how many
// rollbacks it counts (0 for an ID without the -rN of one).
func SplitRollbacks(id string) (base string, n int) {
	i := strings.LastIndex(id, "-r")
	if i <= 0 {
		return id, 0
	}
	n, err := strconv.Atoi(id[i+2:])
	if err != nil || n <= 0 || strconv.Itoa(n) != id[i+2:] {
		return id, 0
	}
	return id[:i], n
}

// Err is the volume's Problem as an error wrapping ErrUnreadable, or nil.
func (v Volume) Err() error {
	if v.Problem == "" {
		return nil
	}
	return fmt.Errorf("volume %s %w: %s", v.Name, ErrUnreadable, v.Problem)
}

// Snapshot is a read-only, point-in-time copy of a volume, exported as
// VOLUME@NAME.
type Snapshot struct {
	Volume string `json:"volume"`
	Name   string `json:"name"`
	// Size is the size of the volume as the snapshot preserves it: what a
	// client of the snapshot's export sees.
	Size int64 `json:"size"`
	// COWSize is the space reserved for blocks the volume changes after the
	// snapshot (a classic LVM snapshot); 0 when the snapshot needs none (a
	// reflinked or copied file, a thin snapshot).
	COWSize int64 `json:"cow_size"`
	// UsagePercent is how full the COW space is (classic LVM snapshots) or,
	// for thin snapshots, how much of Size is mapped; 0 otherwise.
	UsagePercent float64 `json:"usage_percent"`
	// Invalid is set when the COW space filled up: the snapshot lost data
	// and can only be removed.
	Invalid bool `json:"invalid"`
	// Thin is set for a thin LVM snapshot (no COW space, shares the pool).
	Thin bool `json:"thin"`
	// Merging is set while the snapshot is being merged back into its
	// volume, or waits to be (LVM merges once the volume is closed).
	Merging bool `json:"merging"`
	// Created is when the snapshot was taken, if known.
	Created time.Time `json:"created,omitzero"`
	// Path is the file or block device the server opens, read-only.
	Path string `json:"path"`
	// ID tells this snapshot from any other made under its name (see
	// Volume.ID).
	ID string `json:"id,omitempty"`
	// Problem is set for a snapshot the driver could not read, as
	// Volume.Problem is.
	Problem string `json:"problem,omitempty"`
}

// Ref is the snapshot's export name, VOLUME@NAME.
func (s Snapshot) Ref() string { return SnapshotRef(s.Volume, s.Name) }

// Err is the snapshot's Problem as an error wrapping ErrUnreadable, or nil.
func (s Snapshot) Err() error {
	if s.Problem == "" {
		return nil
	}
	return fmt.Errorf("snapshot %s %w: %s", s.Ref(), ErrUnreadable, s.Problem)
}

// CreateOptions describe a new volume.
type CreateOptions struct {
	Name string
	// Size in bytes; drivers round it up to their allocation unit (4 KiB
	// for files, the extent size for LVM).
	Size int64
	// Stripes is the number of physical volumes to stripe over; 0 or 1 is
	// linear.
	Stripes int
	// StripeSize in bytes, a power of two of at least 4 KiB; 0 means
	// DefaultStripeSize when Stripes > 1.
	StripeSize int64
}

// SnapshotOptions describe a new snapshot.
type SnapshotOptions struct {
	Volume string
	Name   string
	// COWSize is the space for the volume's changes while the snapshot
	// exists, for classic LVM snapshots; 0 picks a default (a fifth of the
	// volume) for them, or a thin snapshot for a thin volume. Drivers that
	// need no COW space ignore it.
	COWSize int64
}

// DefaultStripeSize is the stripe size when striping is asked for without
// one, LVM's own default.
const DefaultStripeSize = 64 << 10

// Driver manages the volumes and snapshots of one storage pool: a volume
// group or a directory. Implementations are safe for concurrent use, also by
// several processes (lvnbd serve and the lvnbd volume commands) at once.
//
// Errors wrap the sentinel errors of this package where one applies, so
// callers can test them with errors.Is.
type Driver interface {
	// String is the driver's URL, such as lvm://vg0 or file:///var/lib/lvnbd.
	String() string

	// List returns every volume, sorted by name, with its snapshots.
	List(ctx context.Context) ([]Volume, error)
	// Get returns one volume with its snapshots, or ErrNotFound.
	Get(ctx context.Context, name string) (Volume, error)
	// Create makes a volume and returns it as created (with its rounded
	// size); ErrExists if the name is taken, ErrNoSpace if it does not fit.
	Create(ctx context.Context, opts CreateOptions) (Volume, error)
	// Resize grows a volume to size bytes, or shrinks it if allowShrink is
	// set (ErrShrink otherwise), and returns it as resized.
	Resize(ctx context.Context, name string, size int64, allowShrink bool) (Volume, error)
	// Remove deletes a volume and its data; ErrHasSnapshots while it has
	// snapshots.
	Remove(ctx context.Context, name string) error
	// Path is the file or block device a server opens for an export name,
	// VOLUME or VOLUME@SNAPSHOT. It does not check that the volume exists.
	Path(exportName string) string

	// Snapshot takes a snapshot of a volume.
	Snapshot(ctx context.Context, opts SnapshotOptions) (Snapshot, error)
	// Snapshots returns every snapshot of every volume, sorted by volume,
	// then oldest first.
	Snapshots(ctx context.Context) ([]Snapshot, error)
	// RemoveSnapshot deletes a snapshot; the volume is untouched.
	RemoveSnapshot(ctx context.Context, volume, snapshot string) error
	// MergeSnapshot reverts the volume to the snapshot's content and then
	// removes the snapshot. Nothing may have the volume open. ErrMergePending
	// means the merge is scheduled but waits for the volume to be closed.
	MergeSnapshot(ctx context.Context, volume, snapshot string) error
}

// RunKeeper is a Driver that records, with its volumes, which servers
// serve them and the storage box's crash epoch (server/boxcrash): a server
// that ran when the box went down (power loss, panic, reset) lost the writes
// it had acknowledged but not flushed, and its volumes must then change ID.
// Kept with the volumes (LVM: tags on the volume group; files: lvnbd.json),
// the record goes wherever they go, and no file elsewhere can be lost,
// restored or shared in its place.
type RunKeeper interface {
	// UpdateRuns reads the record, lets f change it, and stores it in one
	// durable change if f reports a change. No other UpdateRuns of these
	// volumes on this host runs meanwhile; f may call SyncAll, not
	// UpdateRuns.
	UpdateRuns(ctx context.Context, f func(*RunState) (changed bool, err error)) error
	// SyncAll makes everything written to the volumes durable: written
	// back from the page cache and flushed from the disks' caches, also
	// what a server that died left.
	SyncAll(ctx context.Context) error
}

// RunState is what RunKeeper records.
type RunState struct {
	// Epoch is drawn at the first start after each crash of the box
	// under a server, "" before the first: every volume's ID ends with it.
	Epoch string `json:"epoch,omitempty"`
	// Runs are the servers that serve the volumes, or served them and did
	// not stop cleanly.
	Runs []Run `json:"runs,omitempty"`
}

// Run is one lvnbd serve process.
type Run struct {
	// Boot is the kernel's boot ID it ran in, as 32 lower-case hex digits.
	Boot string `json:"boot"`
	PID  int    `json:"pid"`
	// PIDStart is when the process started, in clock ticks after boot
	// (/proc/PID/stat): with PID, it tells the server from a later process
	// given its pid; 0 if unknown.
	PIDStart uint64 `json:"pid_start,omitempty"`
}

// Valid reports whether r can be recorded.
func (r Run) Valid() bool { return r.PID > 0 && lowerHex(r.Boot, 32) }

// ValidEpoch reports whether e is an epoch: 8 lower-case hex digits.
func ValidEpoch(e string) bool { return lowerHex(e, 8) }

// lowerHex reports whether s is n lower-case hex digits.
func lowerHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// RollbackCounter is a Driver that counts a rollback made behind its back:
// a volume shrunk outside lvnbd (lvreduce, truncate) has lost its tail, and
// grown back it would pass for what a dom0 last saw under its ID. The server
// counts one when it sees an export shrink, which changes the volume's ID
// (RolledBackID), so that every dom0 refuses the half, also grown back.
type RollbackCounter interface {
	// CountRollback counts one rollback of volume name if its ID is still
	// id, and says whether it did. A volume whose ID changed meanwhile
	// (counted already, by a shrink through lvnbd, or made anew) is left as
	// it is.
	CountRollback(ctx context.Context, name, id string) (counted bool, err error)
}

// RemoveChecker is a Driver that can tell, changing nothing, why Remove
// would refuse a volume when Get does not show it (LVM: a snapshot an admin
// made, which Get leaves out). The server asks before it disconnects a
// volume's clients to remove it.
type RemoveChecker interface {
	CheckRemove(ctx context.Context, name string) error
}
