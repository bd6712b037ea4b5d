package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/internal/atomicfile"
)

// Fence cuts a client off one export, or off all of them: GNBD's fencing,
// which plain NBD lacks. A cluster fences a failed host so it cannot write
// to a volume after another host took over.
type Fence struct {
	// Client is an address (192.0.2.7), a CIDR (10.0.0.0/24) or a client
	// certificate name.
	Client string `json:"client"`
	// Export limits the fence to one export; empty fences every export.
	Export string    `json:"export,omitempty"`
	Since  time.Time `json:"since"`
}

// ErrFenceNameNeedsCA is returned for a fence by certificate name on a
// server that verifies no client certificates: no client could ever be
// known by that name, and the fence would cut nothing.
var ErrFenceNameNeedsCA = errors.New("a fence by certificate name needs client certificates verified against tls.ca (--tls-ca); fence the host's addresses instead")

// ErrFenceNotSaved is returned when a fence (or an unfence) is in force but
// could not be saved: a restart of the server may undo it.
var ErrFenceNotSaved = errors.New("in force now, but it may not survive a restart of the server")

// ErrFenceNotQuiesced is returned when fenced connections still had writes
// executing when FenceClient stopped waiting for them: those writes may
// still reach the storage.
var ErrFenceNotQuiesced = errors.New("writes in flight did not finish")

// FenceScope names what a fence of export covers, for messages: "all
// exports" when export is empty, else export "NAME".
func FenceScope(export string) string {
	if export == "" {
		return "all exports"
	}
	return fmt.Sprintf("export %q", export)
}

// matches reports whether the fence covers peer p using export name.
func (f Fence) matches(p peer, export string) bool {
	if f.Export != "" && f.Export != export {
		return false
	}
	if pr, err := parsePrefix(f.Client); err == nil {
		return p.addr.IsValid() && pr.Contains(p.addr)
	}
	// A fence by name covers the clients that show that name in a
	// verified certificate. Not those that show none: cutting every
	// plain-text client of a box where TLS is optional would take the
	// disks of every other host that uses none, on every box the cluster
	// fences on. A host that can connect without its certificate is
	// fenced by its addresses too (README, Fencing).
	return slices.Contains(p.names, f.Client)
}

// isName reports whether fence client s is a certificate name rather than
// an address or a CIDR.
func isName(s string) bool {
	_, err := parsePrefix(s)
	return err != nil
}

// ValidateFenceClient checks a fence's client: an address, a CIDR, or a
// certificate name. What looks like an address but is not a valid one
// (10.0.1.300, fe80::1%, 10.0.0.0/33) is refused rather than taken for a
// name that no certificate has.
func ValidateFenceClient(s string) error {
	_, err := parsePrefix(s)
	switch {
	case err == nil:
		return nil
	case s == "" || len(s) > 255 || strings.ContainsAny(s, " \t\n"):
		return fmt.Errorf("fence client %q: want an address (192.0.2.7), a CIDR (10.0.0.0/24) or a certificate name", s)
	case strings.ContainsAny(s, ":/%") || strings.Trim(s, "0123456789.") == "":
		return fmt.Errorf("fence client %q: %w", s, err)
	}
	return nil
}

// SameFenceClient reports whether fence clients a and b are the same: the
// same name, or the same address or CIDR however written (::ffff:10.0.1.21
// is 10.0.1.21).
func SameFenceClient(a, b string) bool {
	if a == b {
		return true
	}
	pa, errA := parsePrefix(a)
	pb, errB := parsePrefix(b)
	return errA == nil && errB == nil && pa == pb
}

// Fences is the server's fence list, persisted so that a fence survives a
// server restart: a fenced host must not get back in because the storage
// box rebooted.
type Fences struct {
	path string
	// save serialises changes and their writes to the file; mu guards
	// list, which every handshake reads (matches) and must not wait for
	// a write (fsyncs, on a disk that may be slow or failing).
	save sync.Mutex
	mu   sync.Mutex
	list []Fence
}

// saveFences writes a fence list to path; tests replace it.
var saveFences = saveJSON

// LoadFences reads the fence list at path; a missing file is an empty list.
// An empty path keeps the list in memory only.
func LoadFences(path string) (*Fences, error) {
	f := &Fences{path: path}
	if err := loadJSON(path, &f.list); err != nil {
		return nil, fmt.Errorf("fence file %s: %w: fix or remove it; until then no client can be trusted", path, err)
	}
	return f, nil
}

// loadJSON reads the JSON file at path into v; a missing file or an empty
// path leaves v as it is.
func loadJSON(path string, v any) error {
	if path == "" {
		return nil
	}
	return atomicfile.ReadJSON(path, v)
}

// saveJSON writes v to path atomically (temp file, fsync, rename, fsync the
// directory), so a crash leaves the old contents or the new, never half;
// an empty path saves nothing.
func saveJSON(path string, v any) error {
	if path == "" {
		return nil
	}
	// The directories too: a record in a directory made now, whose own
	// entry a crash loses, is lost with it.
	if err := atomicfile.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return atomicfile.WriteJSON(path, v)
}

// List returns the fences.
func (f *Fences) List() []Fence {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.list)
}

func (f *Fences) matches(p peer, export string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.ContainsFunc(f.list, func(x Fence) bool { return x.matches(p, export) })
}

// add records a fence and saves the list. The fence is in force even when
// saving fails. One already there is saved again, so repeating a fence whose
// saving failed is how to retry it.
func (f *Fences) add(x Fence) error {
	f.save.Lock()
	defer f.save.Unlock()
	f.mu.Lock()
	next := slices.Clone(f.list)
	if !slices.ContainsFunc(next, func(y Fence) bool { return SameFenceClient(y.Client, x.Client) && y.Export == x.Export }) {
		next = append(next, x)
	}
	f.mu.Unlock()
	return f.saveLocked(next)
}

// remove drops a fence and saves the list; it reports whether there was
// one. The fence is lifted even when saving fails.
func (f *Fences) remove(client, export string) (bool, error) {
	f.save.Lock()
	defer f.save.Unlock()
	f.mu.Lock()
	next := slices.DeleteFunc(slices.Clone(f.list), func(y Fence) bool { return SameFenceClient(y.Client, client) && y.Export == export })
	same := len(next) == len(f.list)
	f.mu.Unlock()
	if same {
		return false, nil
	}
	return true, f.saveLocked(next)
}

// saveLocked adopts list and writes it atomically (temp file, fsync, rename,
// fsync the directory), so a crash leaves the old list or the new one, never
// half of one; f.save must be held. The list is adopted first, whatever
// saving does: a fence must be enforced at once, also when it could not be
// saved, and after atomicfile.ErrNotDurable the file holds the new list
// already, so keeping the old one in memory would make memory and file
// disagree.
func (f *Fences) saveLocked(list []Fence) error {
	f.mu.Lock()
	f.list = list
	f.mu.Unlock()
	if err := saveFences(f.path, list); err != nil {
		return fmt.Errorf("%w: saving fences: %w", ErrFenceNotSaved, err)
	}
	return nil
}

func (s *Server) fenced(p peer, export string) bool {
	return s.cfg.Fences != nil && s.cfg.Fences.matches(p, export)
}

// Fences is the server's fence list.
func (s *Server) Fences() *Fences { return s.cfg.Fences }

// verifiesClientCerts reports whether clients can prove a certificate name:
// TLS is on and client certificates are verified against a CA.
func (s *Server) verifiesClientCerts() bool {
	c := s.tlsConfig.Load()
	return c != nil && c.ClientCAs != nil &&
		(c.ClientAuth == tls.VerifyClientCertIfGiven || c.ClientAuth == tls.RequireAndVerifyClientCert)
}

// FenceClient fences a client: the fence is saved, new connections from it
// are refused, and its open connections are cut. When FenceClient returns
// without error, no write from those connections will reach the storage
// any more: writes already executing have finished and the rest are
// refused.
//
// The fence is enforced even when saving it fails: the error then wraps
// ErrFenceNotSaved. Writes in flight are waited for up to DrainTimeout,
// whether or not ctx ends meanwhile; those still executing then are
// reported with ErrFenceNotQuiesced. A fence by certificate name needs a
// client CA (ErrFenceNameNeedsCA); it covers the clients that show that name
// (see Fence.matches).
func (s *Server) FenceClient(ctx context.Context, f Fence) (cut int, err error) {
	if s.cfg.Fences == nil {
		return 0, errors.New("this server has no fence list")
	}
	if err := ValidateFenceClient(f.Client); err != nil {
		return 0, err
	}
	if isName(f.Client) && !s.verifiesClientCerts() {
		return 0, fmt.Errorf("fence client %q: %w", f.Client, ErrFenceNameNeedsCA)
	}
	if f.Since.IsZero() {
		f.Since = time.Now().UTC()
	}
	saveErr := s.cfg.Fences.add(f)
	var victims []*clientConn
	// Removed exports too: their clients keep them until they hang up.
	for _, e := range s.cfg.Exports.inUse() {
		if f.Export != "" && f.Export != e.Name {
			continue
		}
		e.mu.Lock()
		for _, c := range e.clients {
			if f.matches(c.who, e.Name) {
				victims = append(victims, c)
			}
		}
		e.mu.Unlock()
	}
	stuck := s.fenceAll(ctx, victims)
	if saveErr != nil {
		err = fmt.Errorf("fence of %q: %w", f.Client, saveErr)
	}
	if len(stuck) > 0 {
		var which []string
		for _, c := range stuck {
			which = append(which, fmt.Sprintf("connection %d from %s", c.id, c.peer))
		}
		err = errors.Join(err, fmt.Errorf("%w within %s on %s: they may still reach the storage (the connections are cut and refuse every further write)",
			ErrFenceNotQuiesced, s.cfg.DrainTimeout, strings.Join(which, ", ")))
	}
	log := s.log.With(zap.String("client", f.Client), zap.String("export", f.Export), zap.Int("connections_cut", len(victims)))
	if err != nil {
		log.Error("client fenced, with problems", zap.Error(err))
	} else {
		log.Warn("client fenced")
	}
	return len(victims), err
}

// fenceAll fences every victim at once and returns those whose writes in
// flight had not finished within DrainTimeout. One at a time, a victim
// whose writes hang would leave the ones after it writing.
//
// The fences run on a context of their own, not the caller's (who may give
// up early), ending with the wait: a fence retried while a write hangs then
// leaves no goroutine behind (one per connection waits for its writes,
// conn.fence).
func (s *Server) fenceAll(ctx context.Context, victims []*clientConn) (stuck []*clientConn) {
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.DrainTimeout)
	defer cancel()
	quiesced := make([]error, len(victims))
	var wg sync.WaitGroup
	for i, c := range victims {
		// Marks c fenced first thing: no write of it starts after. It
		// returns once its writes in flight have ended, or with an
		// error when fctx does.
		wg.Go(func() { quiesced[i] = c.fence(fctx) })
	}
	// Closed now, not once its writes are done: a victim whose writes
	// hang reads no more requests meanwhile.
	for _, c := range victims {
		c.kick()
	}
	wg.Wait()
	for i, c := range victims {
		if quiesced[i] != nil {
			stuck = append(stuck, c)
		}
	}
	return stuck
}

// UnfenceClient lifts a fence; it reports whether there was one. The fence
// is lifted even when saving the list fails (ErrFenceNotSaved): it may then
// come back after a restart.
func (s *Server) UnfenceClient(client, export string) (bool, error) {
	if s.cfg.Fences == nil {
		return false, errors.New("this server has no fence list")
	}
	ok, err := s.cfg.Fences.remove(client, export)
	if err != nil {
		err = fmt.Errorf("unfence of %q: %w", client, err)
	}
	if ok {
		s.log.Info("client unfenced", zap.String("client", client), zap.String("export", export), zap.Error(err))
	}
	return ok, err
}
