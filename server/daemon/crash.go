package daemon

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/server/boxcrash"
	"github.com/lvnbd/lvnbd/volume"
)

// beginRun records this server with drv's volumes before any is served
// (server/boxcrash), and gives their exports the epoch the volumes carry,
// drawn anew if the box went down under a server of them. A driver that
// keeps no record (volume.RunKeeper) gets none.
func (d *Daemon) beginRun(ctx context.Context, drv volume.Driver) error {
	keeper, ok := drv.(volume.RunKeeper)
	if !ok {
		return nil
	}
	self, err := boxcrash.Self()
	if err != nil {
		return err
	}
	// Set first: a Begin that fails (or is cut short by a stop) may have
	// recorded the run all the same, and the failed start's endRun takes
	// it out. A stop does not cut the change short itself.
	d.run, d.runs = &self, keeper
	ctx, cancel := d.recordContext(ctx)
	defer cancel()
	begun, err := boxcrash.Begin(ctx, keeper, self)
	if err != nil {
		// Reading the record is reading the volumes: as good as volumes
		// that cannot be listed, and nothing is served.
		return fmt.Errorf("%w of %s: %w", server.ErrListingVolumes, drv, err)
	}
	d.vols.Epoch = begun.Epoch
	if begun.SyncErr != nil {
		d.log.Error("the records of servers that died stay with the volumes", zap.String("volumes", drv.String()),
			zap.Error(begun.SyncErr))
	}
	if len(begun.Crashed) > 0 {
		boots := make([]string, len(begun.Crashed))
		for i, r := range begun.Crashed {
			boots[i] = r.Boot
		}
		d.log.Error("this box went down while lvnbd served these volumes (power loss, panic or reset): the "+
			"writes acknowledged but not flushed then are lost, so every volume is exported under a new ID, "+
			"and dom0s refuse these halves until each is replaced as a new member of its guest's mirror "+
			"(lvnbd pair down --help)",
			zap.String("volumes", drv.String()), zap.String("epoch", begun.Epoch), zap.Strings("boots", boots))
	}
	return nil
}

// recordTimeout bounds a change of the record with the volumes, made
// whether or not the server is being stopped meanwhile.
const recordTimeout = 2 * time.Minute

// recordContext bounds a change of the record by recordTimeout, and asks
// systemd for that long and a little more beyond the unit's start or stop
// timeout (EXTEND_TIMEOUT_USEC; TimeoutStartSec and TimeoutStopSec are 90 s).
// The change runs lvm commands and, after a server died, a sync of the whole
// box, which may take longer on a busy box: killed in the middle of a stop,
// the server would leave its record, and the next boot would count a crash
// and change every volume's ID; killed in a start, it could not say why.
// Given the time, it either finishes or logs why not.
func (d *Daemon) recordContext(ctx context.Context) (context.Context, context.CancelFunc) {
	notify(fmt.Sprintf("EXTEND_TIMEOUT_USEC=%d", (recordTimeout+recordSlack).Microseconds()), d.log)
	return context.WithTimeout(context.WithoutCancel(ctx), recordTimeout)
}

// recordSlack is the time asked of systemd beyond recordTimeout, for the
// server to log why the change failed and exit.
const recordSlack = 15 * time.Second

// endRun takes this server's record out of its volumes' (boxcrash.End),
// once every export was flushed and closed, or nothing was served; it logs
// and returns what fails.
func (d *Daemon) endRun(ctx context.Context) error {
	if d.run == nil {
		return nil
	}
	ctx, cancel := d.recordContext(ctx)
	defer cancel()
	drv := d.vols.Driver()
	if err := boxcrash.End(ctx, d.runs, *d.run); err != nil {
		d.log.Error("taking this server's record out of its volumes", zap.String("volumes", drv.String()), zap.Error(err))
		return err
	}
	d.run = nil
	return nil
}
