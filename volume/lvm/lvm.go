// Package lvm is the production volume driver: each volume is a logical
// volume of one LVM volume group, linear or striped, and each snapshot a
// read-only LVM snapshot of it (classic copy-on-write, or thin for thin
// volumes). It runs lvm2's commands and reads their JSON reports.
//
// Only LVs tagged "lvnbd" are volumes, so a volume group shared with the
// host's own LVs (root, swap) never exports them. lvnbd tags what it
// creates; an existing LV is adopted with lvchange --addtag lvnbd VG/LV.
//
// Snapshot VOLUME@NAME is the LV VOLUME+NAME ('+' is valid in LVM names,
// never in lvnbd's), so /dev/VG/VOLUME+NAME is its device.
package lvm

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/flock"
	"github.com/lvnbd/lvnbd/volume"
)

func init() {
	volume.Register("lvm", openURL)
}

// Tag marks the LVs that are lvnbd volumes and snapshots.
const Tag = "lvnbd"

// rollbacksTag, followed by a count, is the tag that counts the times a
// volume was rolled back (snapshots merged into it): its ID is the LV's UUID
// and that count (volume.RolledBackID), since a merge keeps the LV and its
// UUID (a thin one too) but rolls its data back.
const rollbacksTag = "lvnbd-rollbacks-"

// snapSep joins a volume and a snapshot name into the snapshot's LV name.
const snapSep = "+"

// maxDMName is the longest device-mapper name (DM_NAME_LEN less its NUL).
const maxDMName = 127

// Driver manages the lvnbd volumes of one volume group.
type Driver struct {
	vg  string
	run runner
	// lockDir holds the lock file that makes UpdateRuns of the servers of
	// this host take turns; "" is lockDirDefault.
	lockDir string
}

// lockDirDefault is where UpdateRuns's lock files live: the systemd unit
// lets the server write there.
const lockDirDefault = "/run/lvnbd"

var _ volume.Driver = (*Driver)(nil)

// New returns the driver for volume group vg. It runs nothing yet: a
// missing VG or lvm2 shows on first use.
func New(vg string) (*Driver, error) {
	if err := validateVGName(vg); err != nil {
		return nil, err
	}
	return &Driver{vg: vg, run: execRunner{}}, nil
}

// openURL accepts lvm://VG.
func openURL(u *url.URL) (volume.Driver, error) {
	if u.Opaque != "" || u.User != nil || u.Port() != "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return nil, errors.New("want lvm://VG, the name of a volume group, such as lvm://vg0")
	}
	return New(u.Hostname())
}

// validateVGName checks lvm2's rules for VG names.
func validateVGName(vg string) error {
	switch {
	case vg == "":
		return errors.New("no volume group: want lvm://VG, such as lvm://vg0")
	case len(vg) > 127, vg == ".", vg == "..", vg[0] == '-':
		return fmt.Errorf("volume group %q: not a valid LVM name", vg)
	}
	for _, r := range vg {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("+_.-", r)) {
			return fmt.Errorf("volume group %q: only letters, digits and + _ . - are valid in LVM names", vg)
		}
	}
	return nil
}

// String is the driver's URL.
func (d *Driver) String() string { return "lvm://" + d.vg }

// Path is /dev/VG/VOLUME, or /dev/VG/VOLUME+SNAPSHOT for VOLUME@SNAPSHOT;
// "" for a name that is neither.
func (d *Driver) Path(exportName string) string {
	if !volume.ValidExportName(exportName) {
		return ""
	}
	return "/dev/" + d.vg + "/" + lvName(exportName)
}

// lvName maps an export name to its LV name.
func lvName(exportName string) string {
	return strings.Replace(exportName, "@", snapSep, 1)
}

// checkLVName refuses a name whose device-mapper name (VG-LV, each '-'
// doubled) would be too long for the kernel.
func (d *Driver) checkLVName(exportName string) error {
	dm := strings.ReplaceAll(d.vg, "-", "--") + "-" + strings.ReplaceAll(lvName(exportName), "-", "--")
	if len(dm) > maxDMName {
		return fmt.Errorf("%w %q: its device-mapper name %s would be %d characters, the kernel's limit is %d; use a shorter name",
			volume.ErrInvalidName, exportName, dm, len(dm), maxDMName)
	}
	return nil
}

// pool is one lvs report of the VG, read for one operation.
type pool struct {
	vg  string
	lvs []*logicalVolume
}

func (d *Driver) lvs(ctx context.Context) (*pool, error) {
	out, err := d.run.run(ctx, lvsArgs(d.vg)...)
	if err != nil {
		return nil, fmt.Errorf("listing volumes of %s: %w", d, err)
	}
	lvs, err := parseLVs(out)
	if err != nil {
		return nil, err
	}
	return &pool{vg: d.vg, lvs: lvs}, nil
}

func (d *Driver) vgs(ctx context.Context) (*volumeGroup, error) {
	out, err := d.run.run(ctx, vgsArgs(d.vg)...)
	if err != nil {
		return nil, fmt.Errorf("reading volume group %s: %w", d.vg, err)
	}
	return parseVG(out, d.vg)
}

// lv returns the LV named name, tagged or not.
func (p *pool) lv(name string) *logicalVolume {
	for _, lv := range p.lvs {
		if lv.name == name {
			return lv
		}
	}
	return nil
}

// volume returns the lvnbd volume named name, or ErrNotFound with a hint if
// an LV of that name is not one.
func (p *pool) volume(name string) (*logicalVolume, error) {
	lv := p.lv(name)
	switch {
	case lv == nil:
		return nil, fmt.Errorf("volume %s %w in volume group %s", name, volume.ErrNotFound, p.vg)
	case lv.hidden || lv.snapshot() || strings.IndexByte(internalTypes, lv.volumeType()) >= 0:
		return nil, fmt.Errorf("volume %s %w in volume group %s (%s/%s is an LVM internal, pool or snapshot LV)",
			name, volume.ErrNotFound, p.vg, p.vg, name)
	case !lv.hasTag(Tag):
		return nil, fmt.Errorf("volume %s %w: %s/%s is not tagged %q, so not an lvnbd volume; adopt it with lvchange --addtag %s %s/%s",
			name, volume.ErrNotFound, p.vg, name, Tag, Tag, p.vg, name)
	}
	return lv, nil
}

// internalTypes are the lv_attr volume types of LVs that hold parts of
// others: thin pools and their data and metadata, RAID and mirror images and
// logs, pvmove, virtual and VDO pool LVs.
const internalTypes = "tTeiIlpvdD"

// isVolume reports whether lv is an lvnbd volume.
func (p *pool) isVolume(lv *logicalVolume) bool {
	v, err := p.volume(lv.name)
	return err == nil && v == lv
}

// snapshotsOf returns the snapshots of origin, oldest first; with all, also
// those lvnbd did not make.
func (p *pool) snapshotsOf(origin string, all bool) []*logicalVolume {
	var out []*logicalVolume
	for _, lv := range p.lvs {
		if lv.snapshot() && lv.origin == origin && (all || lv.hasTag(Tag)) {
			out = append(out, lv)
		}
	}
	slices.SortStableFunc(out, func(a, b *logicalVolume) int {
		if c := a.created.Compare(b.created); c != 0 {
			return c
		}
		return strings.Compare(a.name, b.name)
	})
	return out
}

// snapshot returns the lvnbd snapshot vol@snap, or ErrNotFound. lvnbd names
// its snapshots VOLUME+NAME; one an admin tagged keeps its own LV name,
// which is then its name (see describeSnapshot).
func (p *pool) snapshot(vol, snap string) (*logicalVolume, error) {
	for _, name := range []string{vol + snapSep + snap, snap} {
		if lv := p.lv(name); lv != nil && lv.snapshot() && lv.origin == vol && lv.hasTag(Tag) {
			return lv, nil
		}
	}
	return nil, fmt.Errorf("snapshot %s %w in volume group %s", volume.SnapshotRef(vol, snap), volume.ErrNotFound, p.vg)
}

func (d *Driver) describe(p *pool, lv *logicalVolume) volume.Volume {
	v := volume.Volume{
		Name:         lv.name,
		Size:         lv.size,
		Stripes:      max(lv.stripes, 1),
		Thin:         lv.thin(),
		Path:         d.Path(lv.name),
		ID:           volume.RolledBackID(lv.uuid, lv.rollbacks),
		MergePending: lv.mergeTarget(),
		Problem:      lv.problem,
		Snapshots:    []volume.Snapshot{},
	}
	if v.Stripes > 1 {
		v.StripeSize = lv.stripeSize
	}
	for _, s := range p.snapshotsOf(lv.name, false) {
		v.Snapshots = append(v.Snapshots, d.describeSnapshot(s))
	}
	// A snapshot an admin made (untagged) merges into the volume all the
	// same.
	for _, s := range p.snapshotsOf(lv.name, true) {
		v.MergePending = v.MergePending || s.merging()
	}
	return v
}

func (d *Driver) describeSnapshot(lv *logicalVolume) volume.Snapshot {
	name, ok := strings.CutPrefix(lv.name, lv.origin+snapSep)
	if !ok {
		name = lv.name // tagged by an admin, not named by lvnbd
	}
	s := volume.Snapshot{
		Volume:  lv.origin,
		Name:    name,
		Thin:    lv.thin(),
		Invalid: lv.invalid(),
		Merging: lv.merging(),
		Created: lv.created,
		Path:    "/dev/" + d.vg + "/" + lv.name,
		ID:      lv.uuid,
		Problem: lv.problem,
	}
	if s.Thin {
		s.Size, s.UsagePercent = lv.size, lv.dataPct
	} else {
		// A classic snapshot's lv_size is its COW space.
		s.Size, s.COWSize, s.UsagePercent = lv.originSize, lv.size, lv.snapPct
	}
	return s
}

// List returns every LV tagged lvnbd that is not a snapshot.
func (d *Driver) List(ctx context.Context) ([]volume.Volume, error) {
	p, err := d.lvs(ctx)
	if err != nil {
		return nil, err
	}
	var vols []volume.Volume
	for _, lv := range p.lvs {
		if p.isVolume(lv) {
			vols = append(vols, d.describe(p, lv))
		}
	}
	slices.SortFunc(vols, func(a, b volume.Volume) int { return strings.Compare(a.Name, b.Name) })
	return vols, nil
}

// Get returns one volume.
func (d *Driver) Get(ctx context.Context, name string) (volume.Volume, error) {
	if err := volume.ValidateName(name); err != nil {
		return volume.Volume{}, err
	}
	p, err := d.lvs(ctx)
	if err != nil {
		return volume.Volume{}, err
	}
	lv, err := p.volume(name)
	if err != nil {
		return volume.Volume{}, err
	}
	v := d.describe(p, lv)
	return v, v.Err()
}

// Create runs lvcreate, striped over opts.Stripes PVs if more than one.
// The size is rounded up to whole extents (per stripe).
func (d *Driver) Create(ctx context.Context, opts volume.CreateOptions) (volume.Volume, error) {
	opts, err := volume.CheckCreate(opts)
	if err != nil {
		return volume.Volume{}, err
	}
	if err := d.checkLVName(opts.Name); err != nil {
		return volume.Volume{}, err
	}
	p, err := d.lvs(ctx)
	if err != nil {
		return volume.Volume{}, err
	}
	if p.lv(opts.Name) != nil {
		return volume.Volume{}, fmt.Errorf("volume %s %w: volume group %s has an LV of that name", opts.Name, volume.ErrExists, d.vg)
	}
	vg, err := d.vgs(ctx)
	if err != nil {
		return volume.Volume{}, err
	}
	if opts.Stripes > vg.pvCount {
		return volume.Volume{}, fmt.Errorf("volume %s: %d stripes need %d physical volumes, volume group %s has %d",
			opts.Name, opts.Stripes, opts.Stripes, d.vg, vg.pvCount)
	}
	size := volume.RoundUp(opts.Size, vg.extentSize*int64(opts.Stripes))
	if size > vg.free {
		return volume.Volume{}, noSpace(vg, size, "for "+opts.Name)
	}
	args := []string{"lvcreate", "--yes", "-W", "y", "-Z", "y", "-n", opts.Name, "-L", bytesArg(size)}
	if opts.Stripes > 1 {
		args = append(args, "-i", strconv.Itoa(opts.Stripes), "-I", strconv.FormatInt(opts.StripeSize>>10, 10)+"k")
	}
	args = append(args, "--addtag", Tag, d.vg)
	if _, err := d.run.run(ctx, args...); err != nil {
		return volume.Volume{}, fmt.Errorf("creating volume %s: %w", opts.Name, err)
	}
	return d.Get(ctx, opts.Name)
}

// Resize runs lvextend, which keeps the stripe layout of the last segment,
// or with allowShrink lvreduce. The size is rounded up to whole extents (per
// stripe); a size that rounds to the current one changes nothing.
func (d *Driver) Resize(ctx context.Context, name string, size int64, allowShrink bool) (volume.Volume, error) {
	if err := volume.ValidateName(name); err != nil {
		return volume.Volume{}, err
	}
	if size <= 0 {
		return volume.Volume{}, fmt.Errorf("resizing volume %s: %w: size must be more than zero", name, volume.ErrInvalidSize)
	}
	p, err := d.lvs(ctx)
	if err != nil {
		return volume.Volume{}, err
	}
	lv, err := p.volume(name)
	if err != nil {
		return volume.Volume{}, err
	}
	vg, err := d.vgs(ctx)
	if err != nil {
		return volume.Volume{}, err
	}
	size = volume.RoundUp(size, vg.extentSize*int64(max(lv.stripes, 1)))
	if size == lv.size {
		return d.describe(p, lv), nil
	}
	// Before the shrink check: the server disconnects a volume's clients
	// after a ShrinkError, to shrink it, and must not for a resize that
	// fails anyway.
	var classic []string
	for _, s := range p.snapshotsOf(name, true) {
		if s.classicSnapshot() {
			classic = append(classic, d.snapshotLabel(s))
		}
	}
	if len(classic) > 0 {
		return volume.Volume{}, fmt.Errorf("resizing volume %s: LVM resizes the origin of classic snapshots only while it is inactive; merge or remove its snapshots first (%s)",
			name, strings.Join(classic, ", "))
	}
	if size < lv.size && !allowShrink {
		return volume.Volume{}, &volume.ShrinkError{Volume: name, From: lv.size, To: size}
	}
	args := []string{"lvextend", "-L", bytesArg(size), d.vg + "/" + name}
	verb := "growing"
	if size < lv.size {
		args = []string{"lvreduce", "--yes", "-L", bytesArg(size), d.vg + "/" + name}
		verb = "shrinking"
		// A shrink loses the tail: grown back, the volume would not be
		// what a dom0 last saw under its ID.
		if err := d.countRollback(ctx, lv); err != nil {
			return volume.Volume{}, fmt.Errorf("shrinking volume %s: %w", name, err)
		}
	} else if !lv.thin() && size-lv.size > vg.free {
		return volume.Volume{}, noSpace(vg, size-lv.size, "to grow "+name+" to "+volume.FormatSize(size))
	}
	if _, err := d.run.run(ctx, args...); err != nil {
		return volume.Volume{}, fmt.Errorf("%s volume %s to %s: %w", verb, name, volume.FormatSize(size), err)
	}
	return d.Get(ctx, name)
}

// Remove runs lvremove on a volume without snapshots. LVM refuses while the
// volume is open.
func (d *Driver) Remove(ctx context.Context, name string) error {
	if err := d.CheckRemove(ctx, name); err != nil {
		return err
	}
	if _, err := d.run.run(ctx, "lvremove", "--yes", d.vg+"/"+name); err != nil {
		return fmt.Errorf("removing volume %s: %w", name, err)
	}
	return nil
}

// CheckRemove reports why Remove would refuse name, changing nothing
// (volume.RemoveChecker): not there, or with snapshots, lvnbd's or not.
func (d *Driver) CheckRemove(ctx context.Context, name string) error {
	if err := volume.ValidateName(name); err != nil {
		return err
	}
	p, err := d.lvs(ctx)
	if err != nil {
		return err
	}
	if _, err := p.volume(name); err != nil {
		return err
	}
	// Untagged snapshots count too: lvremove -y would take them along.
	if snaps := p.snapshotsOf(name, true); len(snaps) > 0 {
		labels := make([]string, len(snaps))
		for i, s := range snaps {
			labels[i] = d.snapshotLabel(s)
		}
		return fmt.Errorf("%s: %w (%s): remove or merge them first", name, volume.ErrHasSnapshots, strings.Join(labels, ", "))
	}
	return nil
}

// snapshotLabel names a snapshot for messages: VOLUME@NAME for lvnbd's,
// VG/LV for others.
func (d *Driver) snapshotLabel(lv *logicalVolume) string {
	if lv.hasTag(Tag) {
		return d.describeSnapshot(lv).Ref()
	}
	return d.vg + "/" + lv.name + " (not lvnbd's)"
}

// Snapshot runs lvcreate -s for a read-only snapshot: a thin one of a thin
// volume when opts.COWSize is 0, else a classic one with opts.COWSize of COW
// space (default a fifth of the volume). A classic snapshot that fills up
// becomes invalid: size it for the writes expected while it exists.
func (d *Driver) Snapshot(ctx context.Context, opts volume.SnapshotOptions) (volume.Snapshot, error) {
	if err := volume.ValidateName(opts.Volume); err != nil {
		return volume.Snapshot{}, err
	}
	if err := volume.ValidateName(opts.Name); err != nil {
		return volume.Snapshot{}, fmt.Errorf("snapshot name: %w", err)
	}
	ref := volume.SnapshotRef(opts.Volume, opts.Name)
	if err := d.checkLVName(ref); err != nil {
		return volume.Snapshot{}, err
	}
	if opts.COWSize < 0 {
		return volume.Snapshot{}, fmt.Errorf("snapshot %s: %w: negative COW size", ref, volume.ErrInvalidSize)
	}
	p, err := d.lvs(ctx)
	if err != nil {
		return volume.Snapshot{}, err
	}
	origin, err := p.volume(opts.Volume)
	if err != nil {
		return volume.Snapshot{}, err
	}
	name := lvName(ref)
	if p.lv(name) != nil {
		return volume.Snapshot{}, fmt.Errorf("snapshot %s %w (LV %s/%s)", ref, volume.ErrExists, d.vg, name)
	}
	args := []string{"lvcreate", "--yes", "-s", "-p", "r"}
	if origin.thin() && opts.COWSize == 0 {
		// Thin snapshots skip activation by default; the server opens it.
		args = append(args, "--setactivationskip", "n")
	} else {
		vg, err := d.vgs(ctx)
		if err != nil {
			return volume.Snapshot{}, err
		}
		cow := opts.COWSize
		if cow == 0 {
			cow = origin.size / 5
		}
		cow = volume.RoundUp(max(cow, vg.extentSize), vg.extentSize)
		if cow > vg.free {
			return volume.Snapshot{}, noSpace(vg, cow, "for the COW space of "+ref)
		}
		args = append(args, "-L", bytesArg(cow))
	}
	args = append(args, "-n", name, "--addtag", Tag, d.vg+"/"+opts.Volume)
	if _, err := d.run.run(ctx, args...); err != nil {
		return volume.Snapshot{}, fmt.Errorf("creating snapshot %s: %w", ref, err)
	}
	p, err = d.lvs(ctx)
	if err != nil {
		return volume.Snapshot{}, err
	}
	lv, err := p.snapshot(opts.Volume, opts.Name)
	if err != nil {
		return volume.Snapshot{}, fmt.Errorf("lvcreate made no snapshot: %w", err)
	}
	return d.describeSnapshot(lv), nil
}

// Snapshots returns every snapshot tagged lvnbd.
func (d *Driver) Snapshots(ctx context.Context) ([]volume.Snapshot, error) {
	p, err := d.lvs(ctx)
	if err != nil {
		return nil, err
	}
	var origins []string
	for _, lv := range p.lvs {
		if lv.snapshot() && lv.hasTag(Tag) && !slices.Contains(origins, lv.origin) {
			origins = append(origins, lv.origin)
		}
	}
	slices.Sort(origins)
	var out []volume.Snapshot
	for _, o := range origins {
		for _, lv := range p.snapshotsOf(o, false) {
			out = append(out, d.describeSnapshot(lv))
		}
	}
	return out, nil
}

// RemoveSnapshot runs lvremove on a snapshot.
func (d *Driver) RemoveSnapshot(ctx context.Context, vol, snap string) error {
	if _, _, err := volume.ParseSnapshotRef(volume.SnapshotRef(vol, snap)); err != nil {
		return err
	}
	p, err := d.lvs(ctx)
	if err != nil {
		return err
	}
	lv, err := p.snapshot(vol, snap)
	if err != nil {
		return err
	}
	if _, err := d.run.run(ctx, "lvremove", "--yes", d.vg+"/"+lv.name); err != nil {
		return fmt.Errorf("removing snapshot %s: %w", volume.SnapshotRef(vol, snap), err)
	}
	return nil
}

// MergeSnapshot runs lvconvert --merge, which reverts the volume to the
// snapshot and removes the snapshot. With the volume closed, a classic merge
// runs to the end before this returns; while the volume is open, LVM defers
// it and this returns ErrMergePending.
func (d *Driver) MergeSnapshot(ctx context.Context, vol, snap string) error {
	ref := volume.SnapshotRef(vol, snap)
	if _, _, err := volume.ParseSnapshotRef(ref); err != nil {
		return err
	}
	p, err := d.lvs(ctx)
	if err != nil {
		return err
	}
	lv, err := p.snapshot(vol, snap)
	if err != nil {
		return err
	}
	switch {
	case lv.invalid():
		return fmt.Errorf("snapshot %s is invalid (its COW space filled up and it lost data): it cannot be merged, only removed", ref)
	case lv.merging():
		return d.mergePending(ref, vol)
	}
	origin := p.lv(vol)
	if origin == nil {
		return fmt.Errorf("snapshot %s: its volume %w in volume group %s", ref, volume.ErrNotFound, d.vg)
	}
	if err := d.countRollback(ctx, origin); err != nil {
		return fmt.Errorf("merging snapshot %s: %w", ref, err)
	}
	if _, err := d.run.run(ctx, "lvconvert", "--merge", d.vg+"/"+lv.name); err != nil {
		return fmt.Errorf("merging snapshot %s: %w", ref, err)
	}
	p, err = d.lvs(ctx)
	if err != nil {
		return err
	}
	// A finished merge leaves no LV of the snapshot's name: a classic one
	// is removed, a thin one becomes the volume.
	if p.lv(lv.name) != nil {
		return d.mergePending(ref, vol)
	}
	return nil
}

func (d *Driver) mergePending(ref, vol string) error {
	return fmt.Errorf("snapshot %s: %w: LVM merges it when %s/%s is next activated, and undoes whatever is written to %s until then, "+
		"so lvnbd serve does not export %s until the merge is done; close every other user of %s, then run lvchange --refresh %s/%s",
		ref, volume.ErrMergePending, d.vg, vol, vol, vol, d.Path(vol), d.vg, vol)
}

// countRollback counts one more rollback of lv (a snapshot merged into it, a
// shrink) in its rollbacksTag, which changes its ID (volume.RolledBackID).
// Counted before the change starts: one that then fails only changes the ID
// for nothing (a dom0 refuses the leg until it is taken down and up), where
// one not counted would hand a guest's mirror other data under the ID it
// trusts.
func (d *Driver) countRollback(ctx context.Context, lv *logicalVolume) error {
	args := []string{"lvchange", "--addtag", rollbacksTag + strconv.Itoa(lv.rollbacks+1)}
	if lv.rollbacks > 0 {
		args = append(args, "--deltag", rollbacksTag+strconv.Itoa(lv.rollbacks))
	}
	if _, err := d.run.run(ctx, append(args, d.vg+"/"+lv.name)...); err != nil {
		return fmt.Errorf("counting the rollback on %s/%s, which changes its ID: %w", d.vg, lv.name, err)
	}
	return nil
}

// CountRollback counts a rollback of a volume shrunk behind lvnbd's back
// (volume.RollbackCounter), if its ID is still id.
func (d *Driver) CountRollback(ctx context.Context, name, id string) (bool, error) {
	if err := volume.ValidateName(name); err != nil {
		return false, err
	}
	p, err := d.lvs(ctx)
	if err != nil {
		return false, err
	}
	lv, err := p.volume(name)
	if err != nil {
		return false, err
	}
	if volume.RolledBackID(lv.uuid, lv.rollbacks) != id {
		return false, nil
	}
	if err := d.countRollback(ctx, lv); err != nil {
		return false, err
	}
	return true, nil
}

// noSpace is ErrNoSpace saying how much there is and how much is needed.
func noSpace(vg *volumeGroup, need int64, what string) error {
	return fmt.Errorf("%w: %s has %s free, %s needed %s", volume.ErrNoSpace, vg.name,
		volume.FormatSize(vg.free), volume.FormatSize(need), what)
}

// bytesArg is a size argument in bytes, which lvm2 takes with a b suffix.
func bytesArg(n int64) string { return strconv.FormatInt(n, 10) + "b" }

// UpdateRuns changes the servers and crash epoch recorded in the VG's tags,
// in one vgchange: one metadata commit (volume.RunKeeper). The tags are
// read by one command and changed by another, so UpdateRuns holds a lock
// across both: two servers of the VG starting together after a crash would
// otherwise each draw an epoch, and two epochs read as yet another crash.
// (Servers of other hosts do not see the lock: one VG is served by one
// box.)
func (d *Driver) UpdateRuns(ctx context.Context, f func(*volume.RunState) (bool, error)) error {
	unlock, err := d.lockRuns(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	st, old, pvs, err := d.runRecord(ctx)
	if err != nil {
		return err
	}
	changed, err := f(&st)
	if err != nil || !changed {
		return err
	}
	for _, r := range st.Runs {
		if !r.Valid() {
			return fmt.Errorf("recording run %+v on volume group %s: not a run", r, d.vg)
		}
	}
	if st.Epoch != "" && !volume.ValidEpoch(st.Epoch) {
		return fmt.Errorf("recording epoch %q on volume group %s: not 8 lower-case hex digits", st.Epoch, d.vg)
	}
	now := runTags(st)
	args := []string{"vgchange"}
	for _, t := range now {
		if !slices.Contains(old, t) {
			args = append(args, "--addtag", t)
		}
	}
	for _, t := range old {
		if !slices.Contains(now, t) {
			args = append(args, "--deltag", t)
		}
	}
	if len(args) == 1 {
		return nil
	}
	if _, err := d.run.run(ctx, append(args, d.vg)...); err != nil {
		return fmt.Errorf("recording the servers and crash epoch on volume group %s: %w", d.vg, err)
	}
	// lvm2 writes metadata with O_DIRECT and flushes no disk cache: until
	// the disks flush theirs, a power loss could take the record with it.
	if err := flushDevices(pvs); err != nil {
		return fmt.Errorf("recording the servers and crash epoch on volume group %s: %w", d.vg, err)
	}
	return nil
}

// lockRuns takes this host's turn at the VG's run record (UpdateRuns).
func (d *Driver) lockRuns(ctx context.Context) (unlock func(), err error) {
	dir := d.lockDir
	if dir == "" {
		dir = lockDirDefault
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("taking turns at the servers' record on volume group %s: %w", d.vg, err)
	}
	unlock, err = flock.Lock(ctx, filepath.Join(dir, "lvm-"+d.vg+".runs.lock"), unix.LOCK_EX)
	if err != nil {
		return nil, fmt.Errorf("taking turns at the servers' record on volume group %s: %w", d.vg, err)
	}
	return unlock, nil
}

// SyncAll makes everything written to the volumes durable: the page cache
// written back (sync(2) waits for it), then every PV's disk cache flushed
// (volume.RunKeeper).
//
// Not an fsync of each LV, though that would wait for the VG's devices
// only: an fsync reports a write-back error of a dead server's data once,
// and marks it seen, so the next server, opening the LV afterwards, would
// serve it as healthy. sync(2) leaves the error for that server's first
// flush, which fails the export (scenario 16-writeback-error).
func (d *Driver) SyncAll(ctx context.Context) error {
	unix.Sync()
	_, _, pvs, err := d.runRecord(ctx)
	if err != nil {
		return err
	}
	return flushDevices(pvs)
}

// runRecord reads the VG's run state, the tags it was read from and the
// VG's PVs (parseVGRuns).
func (d *Driver) runRecord(ctx context.Context) (st volume.RunState, tags, pvs []string, err error) {
	out, err := d.run.run(ctx, vgTagsArgs(d.vg)...)
	if err != nil {
		return st, nil, nil, fmt.Errorf("reading the tags and PVs of volume group %s: %w", d.vg, err)
	}
	return parseVGRuns(out, d.vg)
}

// flushDevices flushes the write caches of the block devices at paths
// (fsync of a block device issues a cache flush); "[unknown]", a missing
// PV, has none to flush.
var flushDevices = func(paths []string) error {
	var errs []error
	for _, p := range paths {
		if !strings.HasPrefix(p, "/") {
			continue
		}
		f, err := os.OpenFile(p, os.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == nil {
			err = f.Sync()
			f.Close()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("flushing PV %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}
