package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

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
	begun, err := boxcrash.Begin(ctx, keeper, self)
	if err != nil {
		// Reading the record is reading the volumes: as good as volumes
		// that cannot be listed, and nothing is served.
		return fmt.Errorf("%w of %s: %w", server.ErrListingVolumes, drv, err)
	}
	d.run, d.runs, d.vols.Epoch = &self, keeper, begun.Epoch
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

// endRunTimeout bounds taking the record out at a stop, whose context is
// done by then.
const endRunTimeout = 2 * time.Minute

// endRun takes this server's record out of its volumes' (boxcrash.End),
// once every export was flushed and closed, or nothing was served; it logs
// and returns what fails.
func (d *Daemon) endRun(ctx context.Context) error {
	if d.run == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), endRunTimeout)
	defer cancel()
	drv := d.vols.Driver()
	err := boxcrash.End(ctx, d.runs, *d.run, func(ctx context.Context) error { return syncVolumes(ctx, drv) })
	if err != nil {
		d.log.Error("taking this server's record out of its volumes", zap.String("volumes", drv.String()), zap.Error(err))
		return err
	}
	d.run = nil
	return nil
}

// syncVolumes makes every volume of drv durable: what a server that died
// wrote to one is written back and flushed to the disk (fsync of a block
// device flushes its cache too). A volume that cannot be opened (an
// inactive LV) has nothing in the page cache.
func syncVolumes(ctx context.Context, drv volume.Driver) error {
	vols, err := drv.List(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, v := range vols {
		if v.Problem != "" {
			continue
		}
		f, err := os.OpenFile(v.Path, os.O_RDONLY|unix.O_CLOEXEC, 0)
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENXIO) {
			continue
		}
		if err == nil {
			err = f.Sync()
			f.Close()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("volume %s: %w", v.Name, err))
		}
	}
	return errors.Join(errs...)
}
