package server

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/volume"
)

// pendingShrinks are the volumes seen to shrink behind the server whose
// rollback is not counted yet: by the name they had, the ID they had. A
// volume with such an ID is not exported (see Volumes.countShrink). Whoever
// sees a shrink notes it at once, without Volumes.mu, which a sync or a
// recovery may hold for seconds: every sync from then on counts it before it
// opens anything, and the file keeps it for the next server.
type pendingShrinks struct {
	mu   sync.Mutex
	path string // "": kept in memory only
	ids  map[string]string
	log  *zap.Logger
}

// load adds what the file at path lists and keeps the list there from now
// on.
func (p *pendingShrinks) load(path string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	left := map[string]string{}
	if err := loadJSON(path, &left); err != nil {
		return fmt.Errorf("shrink file %s: %w: it lists volumes that shrank behind the server, whose rollback "+
			"(a new ID) is not counted yet; fix it, or count each by hand (lvchange --addtag lvnbd-rollbacks-N, "+
			"one more than the volume's) and remove it", path, err)
	}
	maps.Copy(p.ids, left)
	p.path = path
	return nil
}

// add notes the shrink of volume name with ID id, and writes the file.
func (p *pendingShrinks) add(name, id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.ids[name] = id
	p.saveLocked()
}

// has reports whether a shrink of the volume with ID id is noted.
func (p *pendingShrinks) has(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, x := range p.ids {
		if x == id {
			return true
		}
	}
	return false
}

// list returns the shrinks noted.
func (p *pendingShrinks) list() map[string]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return maps.Clone(p.ids)
}

// forget drops the entry of name if it is still id, and writes the file.
func (p *pendingShrinks) forget(name, id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ids[name] == id {
		delete(p.ids, name)
		p.saveLocked()
	}
}

func (p *pendingShrinks) saveLocked() {
	if err := saveJSON(p.path, p.ids); err != nil {
		p.log.Error("recording the volumes that shrank behind the server and wait for their rollback count: a restart "+
			"before the count would export them under their old IDs", zap.String("file", p.path), zap.Error(err))
	}
}

// PendingShrink is a volume seen to shrink behind the server whose
// rollback is not counted yet: it is not exported under ID.
type PendingShrink struct {
	Volume string `json:"volume"`
	ID     string `json:"id"`
}

// PendingShrinks lists the shrinks seen whose rollback is not counted yet,
// by volume name.
func (v *Volumes) PendingShrinks() []PendingShrink {
	var out []PendingShrink
	for name, id := range v.pending.list() {
		out = append(out, PendingShrink{name, id})
	}
	slices.SortFunc(out, func(a, b PendingShrink) int { return strings.Compare(a.Volume, b.Volume) })
	return out
}

// KeepShrinks keeps the shrinks seen whose rollback is not counted yet in
// the file at path (none: ""), and loads the ones a server before this one
// left there. Call it before the first Sync.
func (v *Volumes) KeepShrinks(path string) error { return v.pending.load(path) }

// Stop waits for the counts of shrinks seen (countShrink) under way, which
// record a rollback a server stopping must not leave out; those that take
// Volumes.mu from now on count without exporting anything.
func (v *Volumes) Stop() {
	v.mu.Lock()
	v.stopping = true
	v.mu.Unlock()
	v.shrinks.Wait()
}

// shrinkHook is the onShrink of a volume's export whose volume has ID id:
// the shrink is noted (pendingShrinks) and counted (countShrink).
func (v *Volumes) shrinkHook(id string) func(*Export) {
	return func(e *Export) {
		v.pending.add(e.Name, id)
		v.shrinks.Add(1)
		go v.countShrink(e)
	}
}

// countShrink has the shrink seen on e counted as a rollback of its volume,
// which changes the volume's ID (e.shrank): it retires the export serving
// the volume under e's description (e, or one a recovery opened anew),
// whose clients e.shrank cut, and syncs, which counts the rollback and
// exports the volume under its new ID. Until the count succeeds (every sync
// tries again), the volume is not exported: under its old ID, a dom0 leg
// would take it back also once grown back, its tail lost. It runs on its
// own goroutine: a handshake, the device watch or a sync sees the shrink.
func (v *Volumes) countShrink(e *Export) {
	defer v.shrinks.Done()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	v.mu.Lock()
	defer v.mu.Unlock()
	if cur, ok := v.export(e.Name); ok && cur.Description == e.Description {
		v.retireLocked(e.Name)
	}
	if v.stopping {
		// Counted, not served again: the server is stopping.
		if vols, err := v.drv.List(ctx); err == nil {
			v.countShrinks(ctx, vols)
		}
		return
	}
	if err := v.syncAfter(ctx, "shrink of "+e.Name+" behind the server", e.Name); err != nil {
		v.log.Error("export not served again after its volume shrank behind the server", zap.String("export", e.Name), zap.Error(err))
	}
}

// countShrinks counts the rollbacks of the volumes in vols that shrank
// behind the server (pendingShrinks), found by their ID whatever their name
// now. It returns the errors of the counts that failed, by the ID the volume
// had, and whether any was counted, which changes vols. An entry whose
// name now has another ID, and no volume its ID, is forgotten (the volume
// was made anew, or counted otherwise); one whose volume is not listed, or
// cannot be read, is kept.
func (v *Volumes) countShrinks(ctx context.Context, vols []volume.Volume) (failed map[string]error, counted bool) {
	pending := v.pending.list()
	failed = map[string]error{}
	if len(pending) == 0 {
		return failed, false
	}
	byID, byName := map[string]volume.Volume{}, map[string]volume.Volume{}
	for _, vol := range vols {
		byName[vol.Name] = vol
		if vol.Problem == "" && vol.ID != "" {
			byID[vol.ID] = vol
		}
	}
	counter, canCount := v.drv.(volume.RollbackCounter)
	for _, name := range slices.Sorted(maps.Keys(pending)) {
		id := pending[name]
		vol, ok := byID[id]
		if !ok {
			if now, listed := byName[name]; listed && now.Problem == "" && now.ID != id {
				v.pending.forget(name, id)
			}
			continue
		}
		if !canCount {
			failed[id] = fmt.Errorf("the volume driver %s counts no rollbacks", v.drv)
			continue
		}
		c, err := counter.CountRollback(ctx, vol.Name, id)
		if err != nil {
			failed[id] = err
			continue
		}
		v.pending.forget(name, id)
		counted = true
		if c {
			v.log.Warn("volume that shrank behind the server now has another ID: dom0 legs on it refuse it, to be replaced as new members of their guests' mirrors",
				zap.String("volume", vol.Name), zap.String("old_id", id))
		}
	}
	return failed, counted
}

// keepUncounted leaves out of wanted the volumes whose shrink is not
// counted yet (failed: why, by ID), with an error in errs.
func (v *Volumes) keepUncounted(wanted map[string]wantedExport, failed, errs map[string]error) {
	pending := v.pending.list()
	if len(pending) == 0 {
		return
	}
	ids := map[string]bool{}
	for _, id := range pending {
		ids[id] = true
	}
	for name, w := range wanted {
		if w.volumeID == "" || !ids[w.volumeID] {
			continue
		}
		delete(wanted, name)
		errs[name] = fmt.Errorf("not exporting %s: it shrank behind the server, and counting that as a rollback, "+
			"which changes its ID so that no dom0 takes it back as it was, failed (tried again at every sync): %w", name, failed[w.volumeID])
	}
}
