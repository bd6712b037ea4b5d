// Package boxcrash notices that a storage box went down (power loss, panic,
// reset) while lvnbd serve served its volumes, so that the volumes stop
// passing for what they were.
//
// The server acknowledges writes once they are in the page cache (a FLUSH or
// FUA write is what makes them durable), so such a crash loses the writes it
// acknowledged since the last flush. A dom0 would reconnect the volumes under
// the same ID, and the guest's md could not tell: it either never saw an
// error, or it re-adds the half from its bitmap, whose bits it clears a few
// seconds after a write completes, not after it is flushed. The mirror's
// halves would differ without anyone knowing.
//
// So a server records with its volumes (volume.RunKeeper: tags on the LVM
// volume group, lvnbd.json of file volumes) that it serves them, with the
// kernel's boot ID, before it serves any (Begin), and takes the record out
// when it stops cleanly, after its final flushes (End). A record of an
// earlier boot means the box went down under a server: the next start draws
// a new epoch, which the server adds to every volume's ID (nbd.WithEpoch),
// in the same change that drops those records. Dom0s then refuse those
// halves as they refuse a volume made anew, and they must be added to their
// mirrors in full. Kept with the volumes, the record goes wherever they go:
// no file elsewhere can be lost, restored or shared in its place.
//
// A server that died while the box stayed up lost nothing (the page cache
// outlives it): its record stays until a later server of the same volumes
// starts or stops and has made everything written to them durable, or
// until the next boot, which then counts a crash, as it cannot tell.
package boxcrash

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/volume"
)

// procRoot is where /proc is; tests replace it.
var procRoot = "/proc"

// Self returns this process as a run: the boot it runs in, its pid and
// start time. One server runs per process.
func Self() (volume.Run, error) {
	b, err := os.ReadFile(filepath.Join(procRoot, "sys/kernel/random/boot_id"))
	if err != nil {
		return volume.Run{}, fmt.Errorf("reading the boot ID: %w", err)
	}
	pid := os.Getpid()
	r := volume.Run{Boot: strings.ReplaceAll(strings.TrimSpace(string(b)), "-", ""), PID: pid, PIDStart: pidStart(pid)}
	if !r.Valid() {
		return volume.Run{}, fmt.Errorf("boot ID %q is not a UUID", strings.TrimSpace(string(b)))
	}
	return r, nil
}

// Begun is what Begin found.
type Begun struct {
	// Epoch is the one the volumes' IDs end with: "" until the box's
	// first crash under a server.
	Epoch string
	// Crashed are the runs of earlier boots found: the box went down
	// under them, and Epoch was drawn anew. None if it did not.
	Crashed []volume.Run
	// SyncErr is why the records of this boot's servers that died stay
	// (see End): the next boot counts a crash. Nil if none did, or they
	// were taken out.
	SyncErr error
}

// Begin records self with the volumes k keeps, and draws a new epoch if a
// server served them when the box last went down, in one durable change:
// call it before any volume is served. It fails if that cannot be recorded:
// a crash would then go unnoticed. The records of this boot's servers that
// died go, as at End, so that a server restarted again and again does not
// pile them up.
func Begin(ctx context.Context, k volume.RunKeeper, self volume.Run) (Begun, error) {
	var b Begun
	err := k.UpdateRuns(ctx, func(s *volume.RunState) (bool, error) {
		dead, syncErr := settleDead(ctx, k, s, self)
		b = Begun{SyncErr: syncErr}
		var runs []volume.Run
		for _, r := range s.Runs {
			switch {
			case r.Boot != self.Boot:
				b.Crashed = append(b.Crashed, r)
			case r != self && !slices.Contains(dead, r):
				runs = append(runs, r)
			}
		}
		if len(b.Crashed) > 0 {
			e, err := drawEpoch()
			if err != nil {
				return false, err
			}
			s.Epoch = e
		}
		s.Runs = append(runs, self)
		b.Epoch = s.Epoch
		return true, nil
	})
	if err != nil {
		return Begun{}, fmt.Errorf("recording that this server serves the volumes, so that a crash of the box "+
			"under it is noticed: %w", err)
	}
	return b, nil
}

// End takes self's record out: call it once every export was flushed and
// closed, or when nothing was served. The records of this boot's servers
// that died go too, once everything written to the volumes was made durable
// (k.SyncAll); if that fails they stay, the next boot counts a crash, and
// End returns why.
func End(ctx context.Context, k volume.RunKeeper, self volume.Run) error {
	var syncErr error
	err := k.UpdateRuns(ctx, func(s *volume.RunState) (bool, error) {
		var dead []volume.Run
		dead, syncErr = settleDead(ctx, k, s, self)
		n := len(s.Runs)
		s.Runs = slices.DeleteFunc(s.Runs, func(r volume.Run) bool { return r == self || slices.Contains(dead, r) })
		return len(s.Runs) != n, nil
	})
	if err != nil {
		return errors.Join(fmt.Errorf("taking this server's record out (the next boot counts a crash): %w", err), syncErr)
	}
	return syncErr
}

// settleDead returns the runs in s of self's boot whose process is gone,
// once everything written to the volumes is durable (k.SyncAll): what they
// acknowledged cannot be lost any more, and their records may go. If that
// fails, it returns none, and why. It runs inside the change that drops
// them (k.UpdateRuns), so the record is read once.
func settleDead(ctx context.Context, k volume.RunKeeper, s *volume.RunState, self volume.Run) (dead []volume.Run, syncErr error) {
	for _, r := range s.Runs {
		if r != self && r.Boot == self.Boot && !alive(r) {
			dead = append(dead, r)
		}
	}
	if len(dead) == 0 {
		return nil, nil
	}
	if err := k.SyncAll(ctx); err != nil {
		return nil, fmt.Errorf("making the volumes durable before taking out the records of %d servers that "+
			"died: %w; they stay, and the next boot counts a crash", len(dead), err)
	}
	return dead, nil
}

// drawEpoch draws an epoch at random: 8 hex digits.
func drawEpoch() (string, error) {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("drawing an epoch: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// alive reports whether r's process may still run: a process has its pid,
// and its start time where both are known. A server of another pid
// namespace on the same volumes would be taken for dead, and its record
// dropped after the flush: run the servers of a box in one.
func alive(r volume.Run) bool {
	if r.PID <= 0 {
		return false
	}
	err := unix.Kill(r.PID, 0)
	if err != nil && !errors.Is(err, unix.EPERM) {
		return false
	}
	start := pidStart(r.PID)
	return r.PIDStart == 0 || start == 0 || start == r.PIDStart
}

// pidStart returns when process pid started, in clock ticks after boot
// (field 22 of /proc/PID/stat), 0 if it cannot tell.
func pidStart(pid int) uint64 {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0
	}
	// The command name, field 2, is in parentheses and may hold anything:
	// the fields are counted after its closing one.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	fields := strings.Fields(string(b[i+1:]))
	const startField = 22 - 3 // fields 3 onwards
	if len(fields) <= startField {
		return 0
	}
	n, err := strconv.ParseUint(fields[startField], 10, 64)
	if err != nil {
		return 0
	}
	return n
}
