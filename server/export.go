package server

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server/backend"
)

// Backend is the storage behind an export. *backend.File implements it; tests
// substitute failing ones.
type Backend interface {
	Size() int64
	ReadAt(p []byte, off int64) error
	WriteAt(p []byte, off int64, fua bool) error
	Flush() error
	Trim(off, length int64) error
	Zero(off, length int64, mayTrim, fast bool) error
	Cache(off, length int64) error
	Sparse() bool
	Extents(off, length int64, max int) ([]backend.Extent, error)
	// Refresh re-reads the size after the file or device grew or shrank.
	Refresh() (int64, error)
	Close() error
}

// Export is one named block device the server offers.
type Export struct {
	Name        string
	Description string
	ReadOnly    bool
	Backend     Backend
	// Access is who may use the export; SetAccess changes it later.
	Access Access
	// access, once set by SetAccess, replaces Access.
	access atomic.Pointer[Access]
	// recovered is set once lvnbd recover replaced this failed export: a
	// failure its syncs still meet is not recorded (see keepFailuresLocked).
	recovered atomic.Bool

	// writeGate lets Quiesce pause writes: every request that modifies
	// data holds it shared for the duration of its I/O.
	writeGate sync.RWMutex
	// writes orders overlapping writes (see rangeLock and ranges).
	writes atomic.Pointer[rangeLock]

	mu      sync.Mutex
	clients map[uint64]*clientConn
	retired bool          // removed from the registry: close when unused
	heldOff bool          // new clients refused: about to be retired (holdOff)
	flushes int           // shutdown flushes under way (flushOpen): no close meanwhile
	closing bool          // the backend is being flushed and closed
	closed  chan struct{} // closed once the backend is closed after retiring
	// shrinkSeen: a shrink behind lvnbd was seen (see shrank).
	shrinkSeen bool

	// onShrink, set for a volume's export before it is offered, has the
	// shrink of its volume behind the server counted as a rollback
	// (Volumes.countShrink); it runs once, after the first shrink seen.
	onShrink func(*Export)
	// watchFrom and watchAmbiguous are the kernel's uevent numbers before
	// and after e was opened, and watchedSize the size WatchDevices last
	// saw (see Volumes.watch).
	watchFrom, watchAmbiguous uint64
	watchedSize               atomic.Int64
}

// ranges is the export's range lock (see rangeLock): its own or, for an
// export that replaced one whose clients still write, that one's.
func (e *Export) ranges() *rangeLock {
	if l := e.writes.Load(); l != nil {
		return l
	}
	e.writes.CompareAndSwap(nil, new(rangeLock))
	return e.writes.Load()
}

// clientConn is what an export knows of a connection using it.
type clientConn struct {
	id            uint64
	peer          string
	who           peer
	since         time.Time
	kick          func()                      // closes the connection
	drain         func()                      // stops reading; answers what it has, then closes
	fence         func(context.Context) error // stops its writes, then closes it
	read, written atomic.Int64
}

// ClientInfo describes one connection to an export.
type ClientInfo struct {
	ID        uint64    `json:"id"`
	Peer      string    `json:"peer"`
	Since     time.Time `json:"since"`
	ReadBytes int64     `json:"read_bytes"`
	// WrittenBytes counts WRITE payloads.
	WrittenBytes int64 `json:"written_bytes"`
}

// ErrInUse is returned when an operation needs an export that clients are
// still connected to.
var ErrInUse = errors.New("export in use")

// attach records a connection; false if the export was retired meanwhile.
func (e *Export) attach(c *clientConn) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.retired || e.heldOff {
		return false
	}
	if e.clients == nil {
		e.clients = map[uint64]*clientConn{}
	}
	c.since = time.Now()
	e.clients[c.id] = c
	return true
}

// detach forgets a connection, closing the backend if the export was retired
// and this was its last client.
func (e *Export) detach(id uint64) {
	e.mu.Lock()
	delete(e.clients, id)
	last := e.lastUseLocked()
	e.mu.Unlock()
	if last {
		e.closeBackend()
	}
}

// lastUseLocked reports whether the export is retired and unused, and its
// backend not yet being closed: the caller closes it, with closeBackend.
func (e *Export) lastUseLocked() bool {
	if !e.retired || len(e.clients) > 0 || e.flushes > 0 || e.closing {
		return false
	}
	e.closing = true
	return true
}

// closeBackend flushes a retired export's backend and closes it. The flush
// comes first because the server's shutdown flushes only the exports still
// open, and a write-back that fails here must be recorded (the backend tells
// the registry's failure records) rather than lost with the descriptor:
// clients had writes acknowledged that only the page cache held.
func (e *Export) closeBackend() {
	if !e.ReadOnly {
		_ = e.Backend.Flush() // a failure is recorded by the backend's OnFailure
	}
	e.Backend.Close()
	close(e.closed)
}

// flushOpen flushes the backend of an export the server still serves, or one
// retired but not yet closing, and holds off its close meanwhile: a retire
// that lands during the server's shutdown flush must not close the
// descriptor under it (fdatasync would fail with EBADF, or sync another
// file that took its number, and a healthy export be recorded as failed). An
// export already closing is left to closeBackend, which flushes it and which
// WaitClosed waits for.
func (e *Export) flushOpen() error {
	e.mu.Lock()
	if e.closing {
		e.mu.Unlock()
		return nil
	}
	e.flushes++
	e.mu.Unlock()
	err := e.Backend.Flush()
	e.mu.Lock()
	e.flushes--
	last := e.lastUseLocked()
	e.mu.Unlock()
	if last {
		e.closeBackend()
	}
	return err
}

// retire marks the export removed: its backend is flushed and closed once
// the last client is gone, and the returned channel closed then. With no
// client left now, last is true and the caller has it closed
// (Registry.closeRetired), outside the registry's lock: a failed flush tells
// the registry (failCurrent).
func (e *Export) retire() (closed <-chan struct{}, last bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.retired {
		e.retired = true
		e.closed = make(chan struct{})
	}
	return e.closed, e.lastUseLocked()
}

// Clients lists the connections using the export, oldest first.
func (e *Export) Clients() []ClientInfo {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]ClientInfo, 0, len(e.clients))
	for _, c := range e.clients {
		out = append(out, ClientInfo{ID: c.id, Peer: c.peer, Since: c.since,
			ReadBytes: c.read.Load(), WrittenBytes: c.written.Load()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// currentAccess is who may use the export now.
func (e *Export) currentAccess() *Access {
	if a := e.access.Load(); a != nil {
		return a
	}
	return &e.Access
}

// SetAccess changes who may use the export, for connections from now on.
func (e *Export) SetAccess(a Access) { e.access.Store(&a) }

// DrainClients ends every connection to the export gracefully: each stops
// reading requests, answers those it has, and closes.
func (e *Export) DrainClients() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, c := range e.clients {
		c.drain()
	}
}

// kickClients closes every connection to the export.
func (e *Export) kickClients() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, c := range e.clients {
		c.kick()
	}
}

// refreshSize re-reads the size of the export's file or device, for a
// rescan, a client's handshake or the kernel's word that the device changed
// (WatchDevices), whichever comes first after a change. A shrink made
// outside lvnbd (lvreduce, truncate) loses what was past the new end: the
// export's clients are cut, and a volume's export has the shrink counted,
// which changes the volume's ID (see shrank). Kept connected under the same
// ID, a dom0 leg would go on over a grow back, and md re-add the half from
// its bitmap. Whoever reads the smaller size first handles it: a handshake
// that read it and kept quiet would leave the next rescan nothing to see.
func (e *Export) refreshSize(log *zap.Logger) (int64, error) {
	before := e.Backend.Size()
	size, err := e.Backend.Refresh()
	switch {
	case err != nil:
		return 0, err
	case size < before:
		e.shrank(log, before, size, "")
	case size != before:
		log.Info("export resized", zap.String("export", e.Name), zap.Int64("from", before), zap.Int64("to", size))
	}
	return size, nil
}

// shrank handles a shrink of e's file or device behind lvnbd (lvreduce,
// truncate) from before to size bytes, seen by whoever looked first: what
// was past the new end is lost. Its clients are cut. A volume's export also
// refuses new clients, and has the shrink counted as a rollback of the
// volume (onShrink), which changes the volume's ID: a dom0 leg refuses that
// even when the volume is grown back before the leg reconnects or polls the
// size, which the smaller size alone would not tell it. how says how the
// shrink was seen, when not by a smaller size.
func (e *Export) shrank(log *zap.Logger, before, size int64, how string) {
	e.mu.Lock()
	hook := e.onShrink
	if e.shrinkSeen {
		hook = nil
	}
	if e.onShrink != nil {
		e.shrinkSeen = true
		e.heldOff = true
	}
	clients := len(e.clients)
	for _, c := range e.clients {
		c.kick()
	}
	e.mu.Unlock()
	fields := []zap.Field{zap.String("export", e.Name), zap.Int64("from", before), zap.Int64("to", size), zap.Int("clients", clients)}
	if how != "" {
		fields = append(fields, zap.String("seen", how))
	}
	if e.onShrink != nil {
		log.Warn("export shrank under its clients, outside lvnbd: what was past the new end is lost; disconnecting its clients and counting a rollback of the volume, which changes its ID: a dom0 leg on it refuses it from now on, also grown back, to be replaced as a new member of its guest's mirror", fields...)
	} else {
		log.Warn("export shrank under its clients, outside lvnbd: what was past the new end is lost; disconnecting its clients, and a dom0 leg on it refuses it from now on, to be replaced as a new member of its guest's mirror", fields...)
	}
	if hook != nil {
		hook(e)
	}
}

// holdOff refuses new clients from now on, as after a retire, unless e has
// clients: then it returns the ErrInUse error naming them, for what. An
// operation that needs the export unused checks that and shuts the door in
// one step, so a client cannot come in between to be cut without --force.
// The caller retires e next, or lets new clients in again with letIn.
func (e *Export) holdOff(what string) error {
	for {
		e.mu.Lock()
		if len(e.clients) == 0 {
			e.heldOff = true
			e.mu.Unlock()
			return nil
		}
		e.mu.Unlock()
		if err := e.inUseError(what); err != nil {
			return err
		}
		// The clients left meanwhile: look again.
	}
}

// letIn undoes holdOff.
func (e *Export) letIn() {
	e.mu.Lock()
	// A shrink seen keeps it shut: it waits to be replaced under another
	// ID (see shrank).
	e.heldOff = e.shrinkSeen && e.onShrink != nil
	e.mu.Unlock()
}

// inUseError names the clients of e for an operation that needs it unused.
func (e *Export) inUseError(what string) error {
	clients := e.Clients()
	if len(clients) == 0 {
		return nil
	}
	var names []string
	for _, c := range clients {
		names = append(names, fmt.Sprintf("connection %d from %s", c.ID, c.Peer))
	}
	return fmt.Errorf("cannot %s %q: %w by %d client(s): %s (detach them first, or use --force to disconnect them)",
		what, e.Name, ErrInUse, len(clients), strings.Join(names, ", "))
}

// Quiesce pauses writes to the export: it waits for writes in flight to
// finish, blocks new ones, and flushes, so the storage holds every write
// acknowledged before the call. resume lets writes continue; call it once.
func (e *Export) Quiesce(ctx context.Context) (resume func(), err error) {
	locked := make(chan struct{})
	go func() {
		e.writeGate.Lock()
		close(locked)
	}()
	select {
	case <-locked:
	case <-ctx.Done():
		go func() { <-locked; e.writeGate.Unlock() }()
		return nil, fmt.Errorf("quiescing export %q: %w", e.Name, ctx.Err())
	}
	if err := e.Backend.Flush(); err != nil {
		e.writeGate.Unlock()
		return nil, fmt.Errorf("quiescing export %q: %w", e.Name, err)
	}
	var once sync.Once
	return func() { once.Do(e.writeGate.Unlock) }, nil
}

// transmissionFlags are the flags advertised for e: exactly what works.
func (e *Export) transmissionFlags(structured bool) nbd.TransmissionFlags {
	f := nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagSendCache | nbd.FlagCanMultiConn
	if structured {
		f |= nbd.FlagSendDF
	}
	if e.ReadOnly {
		return f | nbd.FlagReadOnly
	}
	return f | nbd.FlagSendFUA | nbd.FlagSendTrim | nbd.FlagSendWriteZeroes | nbd.FlagSendFastZero
}

// Errors of the export registry.
var (
	// ErrExportExists is returned when adding an export whose name is taken.
	ErrExportExists = errors.New("export already exists")
	// ErrNoExport is returned when no export has the requested name.
	ErrNoExport = errors.New("no such export")
)

// Registry is the set of exports a server offers; it may change while the
// server runs.
type Registry struct {
	mu      sync.RWMutex
	exports map[string]*Export
	// retired are exports removed while clients used them, until the
	// last of those is gone: a fence must still reach them.
	retired map[*Export]struct{}
	// failures, when set, records failed write-backs across restarts.
	failures *Failures
	// closing counts the retired exports whose backends are being flushed
	// and closed in the background (see closeRetired), and allClosed is
	// broadcast when it falls to 0. Not a WaitGroup: a close may start
	// while WaitClosed waits (a rescan or a control request ending as the
	// server stops).
	closingMu sync.Mutex
	closing   int
	allClosed *sync.Cond
}

// closeRetired flushes and closes a retired export's backend in the
// background: the caller may hold a lock others need (the volumes' own,
// during a rescan), and a flush may take long on a slow or failing device.
// A server's shutdown waits for it (WaitClosed), so a failure is recorded
// before the process exits.
func (r *Registry) closeRetired(e *Export) {
	r.closingMu.Lock()
	r.closing++
	r.closingMu.Unlock()
	go func() {
		e.closeBackend()
		r.closingMu.Lock()
		defer r.closingMu.Unlock()
		if r.closing--; r.closing == 0 {
			r.allClosed.Broadcast()
		}
	}()
}

// WaitClosed waits until no backend of a retired export is being closed:
// their failures are then recorded. A server's shutdown calls it; so does
// the daemon once nothing else can retire an export.
func (r *Registry) WaitClosed() {
	r.closingMu.Lock()
	defer r.closingMu.Unlock()
	for r.closing > 0 {
		r.allClosed.Wait()
	}
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	r := &Registry{exports: map[string]*Export{}, retired: map[*Export]struct{}{}}
	r.allClosed = sync.NewCond(&r.closingMu)
	return r
}

// Add offers e under e.Name.
func (r *Registry) Add(e *Export) error {
	if len(e.Name) > nbd.MaxStringLength {
		return fmt.Errorf("export name of %d bytes: longer than the protocol's %d", len(e.Name), nbd.MaxStringLength)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.exports[e.Name]; ok {
		return fmt.Errorf("export %q: %w", e.Name, ErrExportExists)
	}
	r.keepFailuresLocked(e)
	r.shareRangesLocked(e)
	r.exports[e.Name] = e
	return nil
}

// shareRangesLocked gives e the range lock of an export it replaces under the
// same name whose clients are still there (a static export a reload changed,
// say): a copy of a write resent on e must wait for the first copy still under
// way on the old one (see hangup.go).
func (r *Registry) shareRangesLocked(e *Export) {
	for x := range r.retired {
		if x.Name != e.Name {
			continue
		}
		select {
		case <-x.closed: // no client left
		default:
			e.writes.Store(x.ranges())
			return
		}
	}
}

// Remove stops offering the export called name and returns it. Connections
// already using it keep it until they end; then its backend is flushed
// (a failure is recorded) and closed, and the returned channel with it.
func (r *Registry) Remove(name string) (*Export, <-chan struct{}, error) {
	r.mu.Lock()
	e, ok := r.exports[name]
	if !ok {
		r.mu.Unlock()
		return nil, nil, fmt.Errorf("export %q: %w", name, ErrNoExport)
	}
	delete(r.exports, name)
	closed, last := r.retireLocked(e)
	r.mu.Unlock()
	if last {
		r.closeRetired(e)
	}
	return e, closed, nil
}

// retireLocked retires e, keeping it among the exports in use until its
// backend is closed. If last, no client is left and the caller must call
// r.closeRetired(e) once it has let go of r.mu.
func (r *Registry) retireLocked(e *Export) (closed <-chan struct{}, last bool) {
	closed, last = e.retire()
	select {
	case <-closed:
	default:
		r.retired[e] = struct{}{}
	}
	return closed, last
}

// inUse returns every export a client may still be using: those offered,
// and those removed whose clients have not all gone yet.
func (r *Registry) inUse() []*Export {
	out := r.List()
	r.mu.Lock()
	defer r.mu.Unlock()
	for e := range r.retired {
		select {
		case <-e.closed: // retire made it before Remove put e here
			delete(r.retired, e)
		default:
			out = append(out, e)
		}
	}
	return out
}

// ExportStatus is an export as `lvnbd status` shows it.
type ExportStatus struct {
	Name     string       `json:"name"`
	Size     int64        `json:"size"`
	ReadOnly bool         `json:"read_only"`
	Path     string       `json:"description"`
	Clients  []ClientInfo `json:"clients"`
	// Failed says why every request to the export fails, if it does: a
	// write-back failed (see backend.WriteBackError).
	Failed string `json:"failed,omitempty"`
}

// failer is a backend that can have failed for good (backend.File).
type failer interface{ Failed() error }

// Status describes every export and its clients.
func (r *Registry) Status() []ExportStatus {
	var out []ExportStatus
	for _, e := range r.List() {
		st := ExportStatus{Name: e.Name, Size: e.Backend.Size(), ReadOnly: e.ReadOnly,
			Path: e.Description, Clients: e.Clients()}
		if f, ok := e.Backend.(failer); ok {
			if err := f.Failed(); err != nil {
				st.Failed = err.Error()
			}
		}
		out = append(out, st)
	}
	return out
}

// Lookup finds an export by name. The empty name is the default export: the
// one named "" if there is one, else the only export if there is just one.
func (r *Registry) Lookup(name string) (*Export, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if e, ok := r.exports[name]; ok {
		return e, true
	}
	if name == "" && len(r.exports) == 1 {
		for _, e := range r.exports {
			return e, true
		}
	}
	return nil, false
}

// List returns the exports sorted by name.
func (r *Registry) List() []*Export {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]*Export, 0, len(r.exports))
	for _, e := range r.exports {
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// names lists export names for error messages, quoted and comma-separated.
func (r *Registry) names() string {
	var names []string
	for _, e := range r.List() {
		names = append(names, fmt.Sprintf("%q", e.Name))
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}
