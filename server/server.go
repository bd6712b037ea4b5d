// Package server is lvnbd's NBD server: listeners, the fixed-newstyle
// handshake, and a concurrent transmission loop per connection that answers
// requests out of order.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/nbd"
)

// Config is a server's configuration; the zero value of each field means its
// default.
type Config struct {
	// Exports is what the server offers. Required.
	Exports *Registry
	// Logger receives structured logs; nil discards them.
	Logger *zap.Logger
	// HandshakeTimeout bounds the whole negotiation, so a slow or silent
	// client cannot hold a connection slot. Default 30s.
	HandshakeTimeout time.Duration
	// MaxInFlight bounds the requests one connection may have outstanding.
	// Default 256 (the Linux client keeps up to 128 per socket).
	MaxInFlight int
	// MaxInFlightBytes bounds the payload bytes one connection may hold in
	// memory at once. Default 128 MiB.
	MaxInFlightBytes int64
	// Workers is how many requests of one connection do I/O at once.
	// Default 16.
	Workers int
	// NoSplice sends every read by copying it, as over TLS, instead of
	// splicing it from the backend to the socket (tests compare the two).
	NoSplice bool
	// SpliceWrites receives large write payloads by splicing them off the
	// socket into a pipe, and the pipe into the backend, instead of
	// reading them into a buffer. Off by default: the pipe holds the
	// received packets' pages until the backend has taken them, and copies
	// from a client pinned to a core of its own then fell, in streaks, to
	// a third of their speed, with both client and server spending more CPU
	// per byte; copying them in did not (README, Performance). In
	// side-by-side copies that did not collapse it saved about a tenth of
	// the server's CPU per GiB written. Tests keep the path working;
	// NoSplice turns it off too.
	SpliceWrites bool
	// NoInline hands every request to a worker, instead of answering
	// small ones whose data is in memory on the connection's reader (tests
	// compare the two).
	NoInline bool
	// DrainTimeout bounds how long shutdown waits for in-flight requests
	// before closing connections anyway. Default 30s.
	DrainTimeout time.Duration
	// TLS, when set, lets clients start TLS (NBD_OPT_STARTTLS). Set
	// ClientAuth and ClientCAs to verify client certificates.
	TLS *tls.Config
	// MaxConnections bounds the connections served at once. Default 1024.
	MaxConnections int
	// MaxConnectionsPerClient bounds the connections from one address.
	// Default 256: a dom0 holds one to a few connections per volume it
	// attaches from this box, plus its size polls.
	MaxConnectionsPerClient int
	// Fences is the fence list; nil means fencing is not available.
	Fences *Fences
	// Observer, when set, is told about every request (metrics).
	Observer Observer
}

// Observer receives what the server does, for metrics. ForExport is called
// once per connection, so implementations can look up their per-export
// handles there rather than on every request.
type Observer interface {
	ForExport(name string) ExportObserver
}

// ExportObserver is told about each request on one connection to an export:
// its command, payload bytes, how long it took from being read to its reply
// being queued, and its error value (0 for success).
type ExportObserver interface {
	Request(cmd nbd.Command, bytes int, took time.Duration, errno nbd.Errno)
}

// Defaults for Config fields left zero.
const (
	DefaultHandshakeTimeout = 30 * time.Second
	DefaultMaxInFlight      = 256
	DefaultMaxInFlightBytes = 128 << 20
	DefaultWorkers          = 16
	DefaultDrainTimeout     = 30 * time.Second
	DefaultMaxConnections   = 4096
	DefaultMaxPerClient     = 256
)

// Advertised size constraints: any alignment, 4 KiB preferred, 32 MiB payloads.
const (
	minBlockSize  = 1
	prefBlockSize = 4096
	maxPayload    = nbd.DefaultMaxPayload
)

// Server serves NBD exports. Create one with New.
type Server struct {
	cfg    Config
	log    *zap.Logger
	nextID atomic.Uint64
	conns  sync.WaitGroup

	limitsMu  sync.Mutex
	active    int
	perClient map[netip.Addr]int

	tlsConfig atomic.Pointer[tls.Config] // Config.TLS, replaceable by SetTLS

	// How often each splice path, and the reader's own answers, were
	// taken, and how many writes were dropped after their client hung up
	// (tests look).
	splicedReads, splicedWrites, pipeFallbacks, inlined, abandonedWrites atomic.Int64
}

// SetTLS replaces the TLS configuration (new certificates, say) for the
// handshakes from now on; nil stops offering TLS.
func (s *Server) SetTLS(c *tls.Config) { s.tlsConfig.Store(c) }

// New returns a server for cfg.
func New(cfg *Config) *Server {
	c := *cfg
	if c.Exports == nil {
		c.Exports = NewRegistry()
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = DefaultMaxInFlight
	}
	if c.MaxInFlightBytes < maxPayload {
		c.MaxInFlightBytes = DefaultMaxInFlightBytes
	}
	if c.DrainTimeout <= 0 {
		c.DrainTimeout = DefaultDrainTimeout
	}
	if c.Workers <= 0 {
		c.Workers = DefaultWorkers
	}
	if c.MaxConnections <= 0 {
		c.MaxConnections = DefaultMaxConnections
	}
	if c.MaxConnectionsPerClient <= 0 {
		c.MaxConnectionsPerClient = DefaultMaxPerClient
	}
	s := &Server{cfg: c, log: c.Logger, perClient: map[netip.Addr]int{}}
	s.tlsConfig.Store(c.TLS)
	return s
}

// Exports is the registry the server serves.
func (s *Server) Exports() *Registry { return s.cfg.Exports }

// admit counts a new connection against the limits; false means refuse it.
func (s *Server) admit(p peer) (release func(), why string) {
	s.limitsMu.Lock()
	defer s.limitsMu.Unlock()
	if s.active >= s.cfg.MaxConnections {
		return nil, fmt.Sprintf("the server has its maximum of %d connections", s.cfg.MaxConnections)
	}
	if p.addr.IsValid() && s.perClient[p.addr] >= s.cfg.MaxConnectionsPerClient {
		return nil, fmt.Sprintf("%s has its maximum of %d connections", p.addr, s.cfg.MaxConnectionsPerClient)
	}
	s.active++
	if p.addr.IsValid() {
		s.perClient[p.addr]++
	}
	return func() {
		s.limitsMu.Lock()
		defer s.limitsMu.Unlock()
		s.active--
		if p.addr.IsValid() {
			if s.perClient[p.addr]--; s.perClient[p.addr] == 0 {
				delete(s.perClient, p.addr)
			}
		}
	}, ""
}

// Serve accepts connections on every listener until ctx is done, then drains:
// it stops accepting, lets every connection finish and answer the requests it
// has already read, flushes every export, and returns. Cancellation is a
// normal exit and returns nil. Serve closes the listeners.
func (s *Server) Serve(ctx context.Context, listeners ...net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, len(listeners))
	for _, ln := range listeners {
		go func() { errc <- s.accept(ctx, ln) }()
	}
	var first error
	for range listeners {
		if err := <-errc; err != nil && first == nil {
			first = err
			cancel() // one listener failing stops the server
		}
	}
	s.conns.Wait()
	for _, e := range s.cfg.Exports.List() {
		if e.ReadOnly {
			continue
		}
		// An export that failed before is already recorded and reported:
		// it would make every stop look like a failure, and hide the one
		// a flush meets now.
		var failedBefore error
		if f, ok := e.Backend.(failer); ok {
			failedBefore = f.Failed()
		}
		if err := e.flushOpen(); err != nil {
			s.log.Error("flushing export at shutdown", zap.String("export", e.Name), zap.Error(err))
			if failedBefore == nil {
				first = errors.Join(first, err)
			}
		}
	}
	// Withdrawn exports flush as they close: their failures are recorded
	// before the process may exit. After the exports served, whose flush
	// one hung on a dying device must not hold up.
	s.cfg.Exports.WaitClosed()
	s.log.Info("server stopped")
	return first
}

func (s *Server) accept(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	s.log.Info("listening", zap.String("addr", ln.Addr().Network()+"://"+ln.Addr().String()))
	var delay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, errTooManyFiles) {
				// Out of descriptors or similar: back off rather than spin.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed, retrying", zap.Error(err), zap.Duration("in", delay))
				select {
				case <-time.After(delay):
					continue
				case <-ctx.Done():
					return nil
				}
			}
			return err
		}
		delay = 0
		p := peerOf(nc)
		release, why := s.admit(p)
		if release == nil {
			s.log.Warn("connection refused", zap.String("peer", nc.RemoteAddr().String()), zap.String("why", why))
			nc.Close()
			continue
		}
		s.conns.Add(1)
		go func() {
			defer s.conns.Done()
			defer release()
			s.handle(ctx, nc, p)
		}()
	}
}
