package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/nbd"
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
	// Epoch is the storage box's, drawn at the first start after each
	// crash of the box (server/boxcrash), "" before the first: every
	// volume's ID carries it (nbd.WithEpoch), so that dom0s refuse the
	// halves that may have lost acknowledged writes. Snapshots keep their
	// IDs: no mirror takes them back. Set it before the first Sync.
	Epoch string

	drv     volume.Driver
	reg     *Registry
	log     *zap.Logger
	mu      sync.Mutex      // serialises changes and syncs
	managed map[string]bool // export names this owns (not --export ones)
	// mergeNoted holds the volumes with a pending merge whose not being
	// exported was logged, so a rescan every few seconds does not log it
	// again.
	mergeNoted map[string]bool
	// reserved are the names static exports are configured under (see
	// SetReserved).
	reserved map[string]bool
	// pending are the shrinks seen whose rollback is not counted yet.
	pending  pendingShrinks
	stopping bool // see Stop
	// shrinks are the countShrink calls under way.
	shrinks sync.WaitGroup
	// devs leads WatchDevices from a device number to its export, and
	// unwatchedResize to the last resize it saw of a device none had;
	// under watchMu, not mu, which a sync holds for seconds.
	watchMu         sync.Mutex
	devs            map[uint64]*Export
	unwatchedResize map[uint64]uint64
	deviceOf        func(*Export) (uint64, bool) // devOf; tests give files one
}

// SetReserved makes names off limits for volume exports: the names static
// exports are configured under, whether they are open or not (one whose
// file cannot be opened is left out, and a reload replaces one by removing
// it, then adding its successor). A volume exported under such a name
// would be served to the static export's clients, and no volume ID tells
// them (a static export has none).
func (v *Volumes) SetReserved(names []string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.reserved = map[string]bool{}
	for _, n := range names {
		v.reserved[n] = true
	}
}

// NewVolumes exports drv's volumes through reg. Call Sync to load them.
func NewVolumes(drv volume.Driver, reg *Registry, log *zap.Logger) *Volumes {
	if log == nil {
		log = zap.NewNop()
	}
	return &Volumes{drv: drv, reg: reg, log: log, managed: map[string]bool{}, mergeNoted: map[string]bool{},
		pending: pendingShrinks{ids: map[string]string{}, log: log}, devs: map[uint64]*Export{}, unwatchedResize: map[uint64]uint64{},
		deviceOf: devOf}
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
// An export whose file or device was replaced is exported anew, its clients
// disconnected from the old one; a volume with a pending merge is not
// exported.
func (v *Volumes) Sync(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.syncLocked(ctx).all()
}

// syncResult is what went wrong in a sync: listing the volumes, which
// concerns every export, or exporting some of them.
type syncResult struct {
	list    error
	exports map[string]error
}

func (r syncResult) all() error {
	errs := []error{r.list}
	for _, name := range slices.Sorted(maps.Keys(r.exports)) {
		errs = append(errs, r.exports[name])
	}
	return errors.Join(errs...)
}

// syncAfter syncs after change (such as "create volume vm1") and returns
// what went wrong with the exports named, those change is about. What went
// wrong with other exports is logged instead: change did not cause it and
// succeeded, and Sync and the periodic rescan report it too.
func (v *Volumes) syncAfter(ctx context.Context, change string, names ...string) error {
	r := v.syncLocked(ctx)
	errs := []error{r.list}
	for _, name := range slices.Sorted(maps.Keys(r.exports)) {
		if slices.Contains(names, name) {
			errs = append(errs, r.exports[name])
			continue
		}
		v.log.Warn("another export is out of step with its volume", zap.String("export", name),
			zap.String("after", change), zap.Error(r.exports[name]))
	}
	return errors.Join(errs...)
}

// ErrListingVolumes is in Sync's error when the volumes could not be listed
// at all, so that no export was brought in step; without it, the error is
// only about some exports, and the others are in step.
var ErrListingVolumes = errors.New("listing volumes")

func (v *Volumes) syncLocked(ctx context.Context) syncResult {
	vols, err := v.drv.List(ctx)
	if err != nil {
		return syncResult{list: fmt.Errorf("%w of %s: %w", ErrListingVolumes, v.drv, err)}
	}
	// Before anything is opened: a volume counted now has another ID.
	failed, counted := v.countShrinks(ctx, vols)
	if counted {
		if vols, err = v.drv.List(ctx); err != nil {
			return syncResult{list: fmt.Errorf("%w of %s: %w", ErrListingVolumes, v.drv, err)}
		}
	}
	wanted, pending, unreadable := v.wanted(vols)
	v.noteMerges(pending)
	errs := map[string]error{}
	v.keepUncounted(wanted, failed, errs)
	for name, err := range unreadable {
		errs[name] = fmt.Errorf("%w; its export is left as it is", err)
	}
	opened := map[string]openedExport{}
	for name := range v.managed {
		if _, ok := wanted[name]; ok {
			continue
		}
		if _, ok := unreadable[name]; ok {
			// The driver knows the volume but not what it is now:
			// neither cut its clients nor serve anything new.
			continue
		}
		if _, ok := pending[name]; ok {
			// Someone merged outside lvnbd while clients write: the
			// merge undoes every write, so stop them now.
			v.retireLocked(name)
			continue
		}
		v.removeLocked(name)
	}
	for name, w := range wanted {
		if e, ok := v.export(name); ok {
			same, err := sameFile(e.Backend, w.path)
			if err != nil {
				errs[name] = fmt.Errorf("checking that export %s is still %s: %w", name, w.path, err)
				continue
			}
			// An LV made anew may get the old one's device number: its
			// ID tells.
			if same && e.Description == w.desc {
				if _, err := e.refreshSize(v.log); err != nil {
					errs[name] = err
				}
				continue
			}
			// Removed and made again, or merged, behind the server: its
			// clients write to a file no longer in the directory, or a
			// device no longer the volume. Disconnect them, so they
			// reconnect to the new one.
			v.log.Warn("export replaced: its volume is not the one open (another file or device, or made anew); disconnecting its clients from the old one and exporting the new",
				zap.String("export", name), zap.String("path", w.path), zap.String("old", e.Description), zap.String("new", w.desc),
				zap.Int64("old_size", e.Backend.Size()), zap.Int("clients", len(e.Clients())))
			v.retireLocked(name)
		}
		if _, taken := v.reg.Lookup(name); taken || v.reserved[name] {
			v.log.Warn("volume not exported: an --export has its name", zap.String("export", name))
			continue
		}
		// Device events sent before the open are not about what it
		// opened (WatchDevices).
		b, seqs, err := openWithSeqs(func() (*backend.File, error) { return backend.Open(w.path, w.readOnly) })
		if err != nil {
			errs[name] = fmt.Errorf("exporting %s: %w", name, err)
			continue
		}
		opened[name] = openedExport{w, b, seqs}
	}
	v.addOpened(ctx, opened, errs)
	return syncResult{exports: errs}
}

// openedExport is a volume's export opened by a sync, not yet offered.
type openedExport struct {
	want    wantedExport
	backend Backend
	seqs    openSeqs
}

// addOpened offers the exports a sync opened, once the volumes are listed
// again and still carry the IDs their descriptions give: a volume made anew
// between the sync's listing and the open would otherwise be served under
// its predecessor's ID, which a dom0 that knew that volume would accept.
// One that changed is closed, and the next rescan exports it.
func (v *Volumes) addOpened(ctx context.Context, opened map[string]openedExport, errs map[string]error) {
	if len(opened) == 0 {
		return
	}
	var now map[string]wantedExport
	vols, err := v.drv.List(ctx)
	if err == nil {
		now, _, _ = v.wanted(vols)
	}
	for _, name := range slices.Sorted(maps.Keys(opened)) {
		o := opened[name]
		switch {
		case err != nil:
			o.backend.Close()
			errs[name] = fmt.Errorf("exporting %s: listing volumes of %s again: %w", name, v.drv, err)
			continue
		case now[name] != o.want:
			o.backend.Close()
			errs[name] = fmt.Errorf("exporting %s: its volume changed while it was being opened (made anew, removed or merged): the next rescan exports what is there then", name)
			continue
		case o.want.volumeID != "" && v.pending.has(o.want.volumeID):
			o.backend.Close()
			errs[name] = fmt.Errorf("exporting %s: it shrank behind the server while it was being opened: the next sync counts that, and exports it under another ID", name)
			continue
		}
		e := &Export{Name: name, Description: o.want.desc, ReadOnly: o.want.readOnly, Backend: o.backend, Access: v.Access}
		if _, ok := v.drv.(volume.RollbackCounter); ok && o.want.volumeID != "" {
			e.onShrink = v.shrinkHook(o.want.volumeID)
		}
		if err := v.reg.Add(e); err != nil {
			o.backend.Close()
			errs[name] = err
			continue
		}
		v.managed[name] = true
		v.watch(e, o.seqs)
		v.log.Info("export added", zap.String("export", name), zap.String("path", o.want.path),
			zap.Int64("size", o.backend.Size()), zap.Bool("readonly", o.want.readOnly))
	}
}

// wantedExport is what the export of a volume or snapshot should be.
type wantedExport struct {
	path, desc string
	readOnly   bool
	volumeID   string // a volume's ID (without the epoch); "" for a snapshot
}

// wanted gives the exports vols should have, by name; the volumes that have
// none because a merge into them is pending; and the volumes and snapshots
// the driver could not read (volume.Volume.Problem), by export name with the
// problem as an error, whose exports a sync leaves as they are.
func (v *Volumes) wanted(vols []volume.Volume) (wanted map[string]wantedExport, pending map[string]volume.Volume, unreadable map[string]error) {
	wanted, pending, unreadable = map[string]wantedExport{}, map[string]volume.Volume{}, map[string]error{}
	for _, vol := range vols {
		switch {
		case vol.Problem != "":
			unreadable[vol.Name] = vol.Err()
		case vol.MergePending:
			pending[vol.Name] = vol
		default:
			// The ID in the description lets a dom0 refuse to
			// reconnect a leg to a volume made anew under this name.
			id := nbd.WithEpoch(vol.ID, v.Epoch)
			wanted[vol.Name] = wantedExport{vol.Path, nbd.WithID("volume "+vol.Name+" on "+v.drv.String(), id), false, vol.ID}
		}
		for _, s := range vol.Snapshots {
			switch {
			case s.Problem != "":
				unreadable[s.Ref()] = s.Err()
			case s.Invalid || s.Merging:
				// nothing consistent to read
			default:
				wanted[s.Ref()] = wantedExport{s.Path, nbd.WithID("snapshot "+s.Ref()+" on "+v.drv.String(), s.ID), true, ""}
			}
		}
	}
	return wanted, pending, unreadable
}

// Recover serves a failed export again, as Registry.Recover does. For an
// export made from a volume or snapshot it first rescans: an export whose
// volume was removed behind the server is removed (and Recover only clears
// its record), and one whose volume was made anew is exported anew (not
// failed: its record was the old volume's, and Recover clears it). The
// volumes are listed again once the export is reopened, and the recovery
// refused if its volume changed in between: what was opened might be either.
func (v *Volumes) Recover(ctx context.Context, name string) (RecoverResult, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.managed[name] {
		return v.reg.Recover(name)
	}
	if err := v.syncAfter(ctx, "recovery of "+name, name); err != nil {
		return RecoverResult{Export: name}, err
	}
	e, ok := v.export(name) // only a managed one
	if !ok {
		return v.reg.Recover(name) // its volume is gone: clears the record
	}
	before := e.Description // as the rescan just listed it, before the open
	res, err := v.reg.recover(name, func() (string, error) {
		vols, err := v.drv.List(ctx)
		if err != nil {
			return "", fmt.Errorf("listing volumes of %s: %w", v.drv, err)
		}
		wanted, _, _ := v.wanted(vols)
		if w, ok := wanted[name]; ok && w.desc == before && !v.pending.has(w.volumeID) {
			return w.desc, nil
		}
		return "", fmt.Errorf("the volume of %s changed while it was being recovered (made anew, removed, merged or shrunk): nothing was reopened; run lvnbd recover again", name)
	})
	// The export opened anew is the one to watch, from where the failed
	// one's watch was: describe found the same volume, so every resize the
	// watch has not judged yet, also one the failed export could not, is
	// judged against what it saw last.
	if now, ok := v.export(name); ok && now != e && err == nil && res.Reopened {
		v.rewatch(e, now)
	}
	return res, err
}

// sameFile reports whether b still has open what path names; a backend that
// cannot tell is taken to have (Sync opens every export it manages with
// backend.Open, which can).
func sameFile(b Backend, path string) (bool, error) {
	f, ok := b.(interface {
		SameFile(path string) (bool, error)
	})
	if !ok {
		return true, nil
	}
	return f.SameFile(path)
}

// noteMerges logs, once per merge, that a volume with a pending merge is not
// exported and what finishes the merge.
func (v *Volumes) noteMerges(pending map[string]volume.Volume) {
	for name := range v.mergeNoted {
		if _, ok := pending[name]; !ok {
			delete(v.mergeNoted, name)
			v.log.Info("volume no longer waits for a merge", zap.String("volume", name))
		}
	}
	for name, vol := range pending {
		if v.mergeNoted[name] {
			continue
		}
		v.mergeNoted[name] = true
		v.log.Warn("volume not exported: a snapshot merge into it is pending, and undoes whatever is written to it until the merge starts; "+
			"close every other user of its device and reactivate it (LVM: lvchange --refresh), and it is exported again once the merge is done",
			zap.String("volume", name), zap.String("path", vol.Path))
	}
}

// removeLocked stops exporting name and returns at once; the channel is
// closed once its backend is flushed and closed (after its last client).
func (v *Volumes) removeLocked(name string) <-chan struct{} {
	if e, ok := v.export(name); ok {
		v.unwatch(e)
	}
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

// retireLocked stops exporting name and disconnects its clients, without
// waiting for them to go.
func (v *Volumes) retireLocked(name string) <-chan struct{} {
	e, ok := v.export(name)
	closed := v.removeLocked(name)
	if ok {
		e.kickClients()
	}
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
	if v.reserved[opts.Name] {
		// It would never be exported, and its name is the static
		// export's, whose failure record must stay.
		return volume.Volume{}, fmt.Errorf("cannot create volume %s: an --export (or [[export]]) of this server has that name, so the volume would not be exported; choose another name", opts.Name)
	}
	vol, err := v.drv.Create(ctx, opts)
	if err != nil {
		return vol, err
	}
	// A failure recorded under this name was its old volume's, removed
	// behind the server: the new one holds none of that data.
	err = v.forgetFailure(opts.Name, "the volume was made anew")
	return vol, errors.Join(err, v.syncAfter(ctx, "create volume "+opts.Name, opts.Name))
}

// forgetFailure clears the recorded write-back failure of a volume whose
// data is gone, logging why; not if an --export has the name, whose record
// it is: one open, or only configured (its file could not be opened, or a
// reload is replacing it).
func (v *Volumes) forgetFailure(name, why string) error {
	if _, ok := v.reg.Lookup(name); v.reserved[name] || (ok && !v.managed[name]) {
		return nil
	}
	forgot, err := v.reg.ForgetFailure(name)
	if forgot && err == nil {
		v.log.Info("recorded write-back failure cleared", zap.String("export", name), zap.String("because", why))
	}
	return err
}

// Resize grows (or with allowShrink shrinks) a volume; the export's new size
// is what the next connection and NBD_OPT_INFO see, and what a client
// re-reading the size (the dom0 daemon) pushes into its kernel device. A
// shrink, which takes the end of the volume from under its clients, is
// refused while clients are connected, unless force disconnects them.
func (v *Volumes) Resize(ctx context.Context, name string, size int64, allowShrink, force bool) (volume.Volume, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	what := "resize volume " + name
	// The driver tells whether size is a shrink, after rounding it up to
	// its unit: refused without allowShrink, and nothing done.
	vol, err := v.drv.Resize(ctx, name, size, false)
	if !allowShrink || !errors.Is(err, volume.ErrShrink) {
		if err != nil {
			return vol, err
		}
		return vol, v.syncAfter(ctx, what, name)
	}
	if err := v.holdOffUnused("shrink volume", force, name); err != nil {
		return volume.Volume{}, err
	}
	if err := v.closeExport(ctx, name); err != nil {
		return volume.Volume{}, err
	}
	vol, err = v.drv.Resize(ctx, name, size, true)
	return vol, errors.Join(err, v.syncAfter(ctx, what, name))
}

// refuseInUse returns, unless force, an ErrInUse error naming the clients of
// the first of the exports names that has any: what would be done to it
// needs them gone.
func (v *Volumes) refuseInUse(what string, force bool, names ...string) error {
	if force {
		return nil
	}
	for _, name := range names {
		if e, ok := v.export(name); ok {
			if err := e.inUseError(what); err != nil {
				return err
			}
		}
	}
	return nil
}

// holdOffUnused is refuseInUse that also refuses new clients of the exports
// when none has any (Export.holdOff), so that none comes in before
// closeExport retires them, to be cut although force was not given.
func (v *Volumes) holdOffUnused(what string, force bool, names ...string) error {
	if force {
		return nil
	}
	var held []*Export
	for _, name := range names {
		e, ok := v.export(name)
		if !ok {
			continue
		}
		if err := e.holdOff(what); err != nil {
			for _, h := range held {
				h.letIn()
			}
			return err
		}
		held = append(held, e)
	}
	return nil
}

// closeExport stops exporting name so the driver can change it underneath,
// disconnecting its clients (refuseInUse first, where they should be asked
// to go), and waits until the backend is closed.
func (v *Volumes) closeExport(ctx context.Context, name string) error {
	if _, ok := v.export(name); !ok {
		return nil
	}
	closed := v.retireLocked(name)
	select {
	case <-closed:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for the clients of %q to disconnect: %w", name, ctx.Err())
	}
}

// Remove deletes a volume. With clients connected it refuses, naming them,
// unless force disconnects them; a removal the driver would refuse anyway
// (no such volume, or one with snapshots) is refused before that.
func (v *Volumes) Remove(ctx context.Context, name string, force bool) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	// Clients first, as before: naming them is the answer an admin needs
	// most; nothing is disconnected before every check passed.
	if err := v.refuseInUse("remove volume", force, name); err != nil {
		return err
	}
	// One the driver cannot read is removed all the same: that is what its
	// problem says to do (a volume whose file is gone), and the driver
	// still lists its snapshots.
	vol, err := v.drv.Get(ctx, name)
	if err != nil && !errors.Is(err, volume.ErrUnreadable) {
		return err
	}
	if len(vol.Snapshots) > 0 {
		refs := make([]string, len(vol.Snapshots))
		for i, s := range vol.Snapshots {
			refs[i] = s.Ref()
		}
		return fmt.Errorf("volume %s: %w (%s): remove or merge them first", name, volume.ErrHasSnapshots, strings.Join(refs, ", "))
	}
	if rc, ok := v.drv.(volume.RemoveChecker); ok {
		if err := rc.CheckRemove(ctx, name); err != nil {
			return err
		}
	}
	// Again, with nothing in between this time: a client may have come
	// while the driver was asked.
	if err := v.holdOffUnused("remove volume", force, name); err != nil {
		return err
	}
	if err := v.closeExport(ctx, name); err != nil {
		return err
	}
	err = v.drv.Remove(ctx, name)
	if err == nil {
		err = v.forgetFailure(name, "the volume was removed")
	}
	return errors.Join(err, v.syncAfter(ctx, "remove volume "+name, name))
}

// snapshot returns the snapshot vol@snap, or ErrNotFound. With unreadableOK
// it is looked for even in a volume the driver cannot read (ErrUnreadable).
func (v *Volumes) snapshot(ctx context.Context, vol, snap string, unreadableOK bool) (volume.Snapshot, error) {
	ref := volume.SnapshotRef(vol, snap)
	if _, _, err := volume.ParseSnapshotRef(ref); err != nil {
		return volume.Snapshot{}, err
	}
	got, err := v.drv.Get(ctx, vol)
	if err != nil && !(unreadableOK && errors.Is(err, volume.ErrUnreadable)) {
		return volume.Snapshot{}, err
	}
	for _, s := range got.Snapshots {
		if s.Name == snap {
			return s, nil
		}
	}
	return volume.Snapshot{}, fmt.Errorf("snapshot %s %w in %s", ref, volume.ErrNotFound, v.drv)
}

// Snapshot takes a crash-consistent snapshot: writes to the volume are
// paused, in-flight ones finished and flushed, so the snapshot holds every
// write acknowledged before the call; then writes resume and the snapshot
// is exported read-only.
func (v *Volumes) Snapshot(ctx context.Context, opts volume.SnapshotOptions) (volume.Snapshot, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	resume := func() {}
	if e, ok := v.export(opts.Volume); ok {
		var err error
		if resume, err = e.Quiesce(ctx); err != nil {
			return volume.Snapshot{}, err
		}
	}
	snap, err := v.drv.Snapshot(ctx, opts)
	// Writes wait only for the snapshot itself, not for the sync that
	// exports it.
	resume()
	if err != nil {
		return snap, err
	}
	return snap, v.syncAfter(ctx, "snapshot "+snap.Ref(), snap.Ref())
}

// RemoveSnapshot deletes a snapshot, refusing while clients read it unless
// force.
func (v *Volumes) RemoveSnapshot(ctx context.Context, vol, snap string, force bool) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	ref := volume.SnapshotRef(vol, snap)
	// A snapshot of a volume the driver cannot read may be removed, not
	// merged.
	if _, err := v.snapshot(ctx, vol, snap, true); err != nil {
		return err
	}
	if err := v.holdOffUnused("remove snapshot", force, ref); err != nil {
		return err
	}
	if err := v.closeExport(ctx, ref); err != nil {
		return err
	}
	err := v.drv.RemoveSnapshot(ctx, vol, snap)
	return errors.Join(err, v.syncAfter(ctx, "remove snapshot "+ref, ref))
}

// MergeSnapshot reverts a volume to a snapshot. Both exports are closed
// first (clients refused, or with force disconnected), since the volume's
// content changes under them; the volume is exported again afterwards, or,
// if the merge waits for the volume to be closed elsewhere (LVM), once it
// is done.
func (v *Volumes) MergeSnapshot(ctx context.Context, vol, snap string, force bool) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	ref := volume.SnapshotRef(vol, snap)
	s, err := v.snapshot(ctx, vol, snap, false)
	if err != nil {
		return err
	}
	if s.Invalid {
		return fmt.Errorf("snapshot %s is invalid (its COW space filled up and it lost data): it cannot be merged, only removed", ref)
	}
	if err := v.holdOffUnused("merge snapshot "+ref+" into", force, vol, ref); err != nil {
		return err
	}
	names := []string{vol, ref}
	for i, name := range names {
		if err := v.closeExport(ctx, name); err != nil {
			// The ones not retired are served again.
			for _, rest := range names[i+1:] {
				if e, ok := v.export(rest); ok {
					e.letIn()
				}
			}
			return err
		}
	}
	err = v.drv.MergeSnapshot(ctx, vol, snap)
	return errors.Join(err, v.syncAfter(ctx, "merge snapshot "+ref, vol, ref))
}
