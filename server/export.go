package server

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

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
	Close() error
}

// Export is one named block device the server offers.
type Export struct {
	Name        string
	Description string
	ReadOnly    bool
	Backend     Backend
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
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{exports: map[string]*Export{}} }

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
	r.exports[e.Name] = e
	return nil
}

// Remove stops offering the export called name and returns it. Connections
// already using it keep it until they end.
func (r *Registry) Remove(name string) (*Export, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.exports[name]
	if !ok {
		return nil, fmt.Errorf("export %q: %w", name, ErrNoExport)
	}
	delete(r.exports, name)
	return e, nil
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
