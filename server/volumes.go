package server

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/server/backend"
	"github.com/lvnbd/lvnbd/volume"
)

// Volumes exports every volume of a driver, and every snapshot as a
// read-only VOLUME@SNAPSHOT, and keeps the registry in step as volumes are
// created, resized, snapshotted and removed. It is also where those changes
// are made while the server runs, so that they can quiesce writes around a
// snapshot and refuse to pull a volume from under its clients.
type Volumes struct {
	// Access applies to every export made from a volume or snapshot. Set
	// it before the first Sync.
	Access Access

	drv     volume.Driver
	reg     *Registry
	log     *zap.Logger
	mu      sync.Mutex      // serialises changes and syncs
	managed map[string]bool // export names this owns (not --export ones)
}

// NewVolumes exports drv's volumes through reg. Call Sync to load them.
func NewVolumes(drv volume.Driver, reg *Registry, log *zap.Logger) *Volumes {
	if log == nil {
		log = zap.NewNop()
	}
	return &Volumes{drv: drv, reg: reg, log: log, managed: map[string]bool{}}
}

// SetAccess changes who may use the exports made from volumes, those that
// exist and those to come.
func (v *Volumes) SetAccess(a Access) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.Access = a
	for name := range v.managed {
		if e, ok := v.reg.Lookup(name); ok {
			e.SetAccess(a)
		}
	}
}

// Driver is the volume driver behind the exports.
func (v *Volumes) Driver() volume.Driver { return v.drv }

// Sync makes the exports match the driver's volumes and snapshots: new ones
// appear, removed ones disappear (their clients keep them until they
// disconnect), and sizes are re-read so new connections see a grown volume.
func (v *Volumes) Sync(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.syncLocked(ctx)
}

func (v *Volumes) syncLocked(ctx context.Context) error {
	vols, err := v.drv.List(ctx)
	if err != nil {
		return fmt.Errorf("listing volumes of %s: %w", v.drv, err)
	}
	type want struct {
		path, desc string
		readOnly   bool
	}
	wanted := map[string]want{}
	for _, vol := range vols {
		wanted[vol.Name] = want{vol.Path, "volume " + vol.Name + " on " + v.drv.String(), false}
		for _, s := range vol.Snapshots {
			if s.Invalid || s.Merging {
				continue // nothing consistent to read
			}
			wanted[s.Ref()] = want{s.Path, "snapshot " + s.Ref() + " on " + v.drv.String(), true}
		}
	}
	var errs []error
	for name := range v.managed {
		if _, ok := wanted[name]; !ok {
			v.removeLocked(name)
		}
	}
	for name, w := range wanted {
		if e, ok := v.reg.Lookup(name); ok && v.managed[name] {
			before := e.Backend.Size()
			if size, err := e.Backend.Refresh(); err != nil {
				errs = append(errs, err)
			} else if size != before {
				v.log.Info("export resized", zap.String("export", name), zap.Int64("from", before), zap.Int64("to", size))
			}
			continue
		}
		if _, taken := v.reg.Lookup(name); taken && !v.managed[name] {
			v.log.Warn("volume not exported: an --export has its name", zap.String("export", name))
			continue
		}
		b, err := backend.Open(w.path, w.readOnly)
		if err != nil {
			errs = append(errs, fmt.Errorf("exporting %s: %w", name, err))
			continue
		}
		if err := v.reg.Add(&Export{Name: name, Description: w.desc, ReadOnly: w.readOnly, Backend: b, Access: v.Access}); err != nil {
			b.Close()
			errs = append(errs, err)
			continue
		}
		v.managed[name] = true
		v.log.Info("export added", zap.String("export", name), zap.String("path", w.path),
			zap.Int64("size", b.Size()), zap.Bool("readonly", w.readOnly))
	}
	return errors.Join(errs...)
}

// removeLocked stops exporting name; it returns when the backend is closed
// if there were no clients, else at once.
func (v *Volumes) removeLocked(name string) <-chan struct{} {
	delete(v.managed, name)
	_, closed, err := v.reg.Remove(name)
	if err != nil {
		c := make(chan struct{})
		close(c)
		return c
	}
	v.log.Info("export removed", zap.String("export", name))
	return closed
}

// export returns the managed export called name, if any.
func (v *Volumes) export(name string) (*Export, bool) {
	if !v.managed[name] {
		return nil, false
	}
	return v.reg.Lookup(name)
}

// Create makes a volume and exports it.
func (v *Volumes) Create(ctx context.Context, opts volume.CreateOptions) (volume.Volume, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	vol, err := v.drv.Create(ctx, opts)
	if err != nil {
		return vol, err
	}
	return vol, v.syncLocked(ctx)
}

// Resize grows (or with allowShrink shrinks) a volume; the export's new size
// is what the next connection and NBD_OPT_INFO see, and what a client
// re-reading the size (the dom0 daemon) pushes into its kernel device.
func (v *Volumes) Resize(ctx context.Context, name string, size int64, allowShrink bool) (volume.Volume, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	vol, err := v.drv.Resize(ctx, name, size, allowShrink)
	if err != nil {
		return vol, err
	}
	return vol, v.syncLocked(ctx)
}

// closeExport stops exporting name so the driver can change it underneath:
// with force its clients are disconnected, else clients are an ErrInUse
// error naming them. It waits until the backend is closed.
func (v *Volumes) closeExport(ctx context.Context, name, what string, force bool) error {
	e, ok := v.export(name)
	if !ok {
		return nil
	}
	if !force {
		if err := e.inUseError(what); err != nil {
			return err
		}
	}
	closed := v.removeLocked(name)
	e.kickClients()
	select {
	case <-closed:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for the clients of %q to disconnect: %w", name, ctx.Err())
	}
}

// Remove deletes a volume. With clients connected it refuses, naming them,
// unless force disconnects them.
func (v *Volumes) Remove(ctx context.Context, name string, force bool) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.closeExport(ctx, name, "remove volume", force); err != nil {
		return err
	}
	err := v.drv.Remove(ctx, name)
	return errors.Join(err, v.syncLocked(ctx))
}

// Snapshot takes a crash-consistent snapshot: writes to the volume are
// paused, in-flight ones finished and flushed, so the snapshot holds every
// write acknowledged before the call; then writes resume and the snapshot
// is exported read-only.
func (v *Volumes) Snapshot(ctx context.Context, opts volume.SnapshotOptions) (volume.Snapshot, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if e, ok := v.export(opts.Volume); ok {
		resume, err := e.Quiesce(ctx)
		if err != nil {
			return volume.Snapshot{}, err
		}
		defer resume()
	}
	snap, err := v.drv.Snapshot(ctx, opts)
	if err != nil {
		return snap, err
	}
	return snap, v.syncLocked(ctx)
}

// RemoveSnapshot deletes a snapshot, refusing while clients read it unless
// force.
func (v *Volumes) RemoveSnapshot(ctx context.Context, vol, snap string, force bool) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.closeExport(ctx, volume.SnapshotRef(vol, snap), "remove snapshot", force); err != nil {
		return err
	}
	err := v.drv.RemoveSnapshot(ctx, vol, snap)
	return errors.Join(err, v.syncLocked(ctx))
}

// MergeSnapshot reverts a volume to a snapshot. Both exports are closed
// first (clients refused, or with force disconnected), since the volume's
// content changes under them; the volume is exported again afterwards.
func (v *Volumes) MergeSnapshot(ctx context.Context, vol, snap string, force bool) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	ref := volume.SnapshotRef(vol, snap)
	for _, name := range []string{vol, ref} {
		if e, ok := v.export(name); ok && !force {
			if err := e.inUseError("merge snapshot " + ref + " into"); err != nil {
				return err
			}
		}
	}
	for _, name := range []string{vol, ref} {
		if err := v.closeExport(ctx, name, "merge", true); err != nil {
			return err
		}
	}
	err := v.drv.MergeSnapshot(ctx, vol, snap)
	return errors.Join(err, v.syncLocked(ctx))
}
