package daemon

import (
	"context"
	"fmt"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/server/boxcrash"
	"github.com/lvnbd/lvnbd/volume"
)

// volumeEpoch settles the crash epoch the volumes are exported under
// (server/boxcrash), and has the driver keep it with the volumes
// (volume.EpochKeeper) before any is served: the crash file only notices
// crashes, and losing it (removed, moved, turned off, the system
// reinstalled beside the volume group) must not give the volumes back the
// IDs they had before a crash, which dom0s would take back as they are.
//
//   - The crash file and the driver agree: that epoch.
//   - The crash file has none: the driver's (the file was lost or is off).
//   - The driver has none, or one the crash file recorded before: the crash
//     file's, which is newer (a crash noticed since, by this server or
//     another sharing the file, or an lvnbd from before the driver kept it).
//   - The driver's is one the crash file never recorded (the file is older
//     than the volumes' epoch: restored, or another box's): neither can be
//     trusted to be the newer, and a new one is drawn.
func volumeEpoch(ctx context.Context, crashes *boxcrash.Tracker, drv volume.Driver, log *zap.Logger) (string, error) {
	epoch := crashes.Epoch()
	keeper, ok := drv.(volume.EpochKeeper)
	if !ok {
		return epoch, nil
	}
	kept, err := keeper.Epoch(ctx)
	if err != nil {
		// As good as volumes that cannot be listed: nothing can be served.
		return "", fmt.Errorf("%w of %s: reading the crash epoch they keep: %w", server.ErrListingVolumes, drv, err)
	}
	switch {
	case kept == epoch:
		return epoch, nil
	case epoch == "":
		log.Warn("the crash file records no epoch, the volumes keep one: the volumes' is used (the crash file "+
			"was removed, moved or is off)", zap.String("epoch", kept), zap.String("volumes", drv.String()))
		return kept, nil
	case kept == "" || crashes.Known(kept):
	default:
		why := fmt.Sprintf("%s keeps epoch %s, which the crash file never recorded", drv, kept)
		if epoch, err = crashes.Renew(why); err != nil {
			return "", err
		}
		log.Error("the volumes keep a crash epoch the crash file never recorded (restored from an older copy, "+
			"or another box's): a new epoch is drawn, so every volume is exported under a new ID, and dom0s "+
			"refuse these halves until each is added to its guest's mirror in full",
			zap.String("kept", kept), zap.String("epoch", epoch), zap.String("volumes", drv.String()))
	}
	if err := keeper.SetEpoch(ctx, epoch); err != nil {
		return "", fmt.Errorf("%w: the volumes must keep the crash epoch before they are served under it", err)
	}
	return epoch, nil
}
