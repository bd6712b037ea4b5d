package client

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/lvnbd/lvnbd/nbd"
)

// Device is what both a single connection and a pool of them offer.
type Device interface {
	// Export returns what the handshake learned about the export.
	Export() ExportInfo
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64, flags nbd.CommandFlags) error
	Flush(ctx context.Context) error
	Trim(ctx context.Context, off, length int64, flags nbd.CommandFlags) error
	WriteZeroes(ctx context.Context, off, length int64, flags nbd.CommandFlags) error
	Cache(ctx context.Context, off, length int64) error
	BlockStatus(ctx context.Context, off, length int64, flags nbd.CommandFlags) ([]nbd.Extent, error)
	Close() error
}

var (
	_ Device = (*Conn)(nil)
	_ Device = (*Pool)(nil)
)

// Pool spreads requests over several connections to one export. The server
// must advertise NBD_FLAG_CAN_MULTI_CONN for that to be safe; otherwise the
// pool holds a single connection.
type Pool struct {
	conns   []*Conn
	info    ExportInfo
	lim     limits
	hasMeta bool
	next    atomic.Uint64
}

// DialPool opens n connections to the export at uri if the server advertises
// NBD_FLAG_CAN_MULTI_CONN, else one; Connections says how many it got.
func DialPool(ctx context.Context, uri string, n int, opts *Options) (*Pool, error) {
	if n < 1 {
		return nil, fmt.Errorf("a pool needs at least one connection, not %d", n)
	}
	first, err := Dial(ctx, uri, opts)
	if err != nil {
		return nil, err
	}
	conns := []*Conn{first}
	if first.info.MultiConn() && n > 1 {
		more := make([]*Conn, n-1)
		errs := make([]error, n-1)
		var wg sync.WaitGroup
		for i := range more {
			wg.Go(func() { more[i], errs[i] = Dial(ctx, uri, opts) })
		}
		wg.Wait()
		for i, c := range more {
			if c == nil {
				continue
			}
			conns = append(conns, c)
			if errs[i] == nil && !first.info.SameExport(c.info) {
				errs[i] = fmt.Errorf("connection %d to %s sees a different export (size %d, flags %v, contexts %v, volume ID %q) than the first (size %d, flags %v, contexts %v, volume ID %q)",
					i+2, uri, c.info.Size, c.info.Flags, c.info.MetaContexts, c.info.ID(),
					first.info.Size, first.info.Flags, first.info.MetaContexts, first.info.ID())
			}
		}
		if err := errors.Join(errs...); err != nil {
			for _, c := range conns {
				c.Close()
			}
			return nil, err
		}
	}
	return &Pool{conns: conns, info: first.info, lim: first.lim, hasMeta: first.hasMeta}, nil
}

// pick chooses the connection for the next request, round robin. It
// skips connections that failed or are closing (the server may have said
// ESHUTDOWN on one of them), as no request could start there, and fails
// only when no connection is left. Nothing is redialled.
func (p *Pool) pick() (*Conn, error) {
	n := uint64(len(p.conns))
	start := p.next.Add(1)
	var err error
	for i := range n {
		c := p.conns[(start+i)%n]
		if err = c.usable(); err == nil {
			return c, nil
		}
	}
	return nil, fmt.Errorf("none of the pool's %d connections is usable (dial a new pool); the last: %w", n, err)
}

// Connections is how many connections the pool uses: the n asked for, or 1
// when the server does not allow multi-conn.
func (p *Pool) Connections() int { return len(p.conns) }

// MultiConn reports whether the server advertised NBD_FLAG_CAN_MULTI_CONN.
func (p *Pool) MultiConn() bool { return p.info.MultiConn() }

// Export returns what the handshake learned about the export.
func (p *Pool) Export() ExportInfo { return p.info.clone() }

// ReadAt fills p from offset off; large reads are split over the connections.
func (p *Pool) ReadAt(ctx context.Context, b []byte, off int64) error {
	return run(ctx, p.info, p.lim, p.hasMeta, op{cmd: nbd.CmdRead, off: off, length: int64(len(b)), buf: b}, p.pick)
}

// WriteAt writes b at offset off; large writes are split over the connections.
func (p *Pool) WriteAt(ctx context.Context, b []byte, off int64, flags nbd.CommandFlags) error {
	return run(ctx, p.info, p.lim, p.hasMeta, op{cmd: nbd.CmdWrite, flags: flags, off: off, length: int64(len(b)), buf: b}, p.pick)
}

// Flush makes every write acknowledged on any of the pool's connections
// durable: with multi-conn one flush covers them all.
func (p *Pool) Flush(ctx context.Context) error {
	return run(ctx, p.info, p.lim, p.hasMeta, op{cmd: nbd.CmdFlush}, p.pick)
}

// Trim tells the server [off, off+length) is no longer needed.
func (p *Pool) Trim(ctx context.Context, off, length int64, flags nbd.CommandFlags) error {
	return run(ctx, p.info, p.lim, p.hasMeta, op{cmd: nbd.CmdTrim, flags: flags, off: off, length: length}, p.pick)
}

// WriteZeroes makes [off, off+length) read as zeroes.
func (p *Pool) WriteZeroes(ctx context.Context, off, length int64, flags nbd.CommandFlags) error {
	return run(ctx, p.info, p.lim, p.hasMeta, op{cmd: nbd.CmdWriteZeroes, flags: flags, off: off, length: length}, p.pick)
}

// Cache asks the server to prefetch [off, off+length).
func (p *Pool) Cache(ctx context.Context, off, length int64) error {
	return run(ctx, p.info, p.lim, p.hasMeta, op{cmd: nbd.CmdCache, off: off, length: length}, p.pick)
}

// BlockStatus returns base:allocation extents from off, as Conn.BlockStatus.
func (p *Pool) BlockStatus(ctx context.Context, off, length int64, flags nbd.CommandFlags) ([]nbd.Extent, error) {
	return blockStatus(ctx, p.info, p.lim, p.hasMeta, off, length, flags, p.pick)
}

// Close closes every connection, each after its in-flight requests.
func (p *Pool) Close() error {
	errs := make([]error, len(p.conns))
	var wg sync.WaitGroup
	for i, c := range p.conns {
		wg.Go(func() { errs[i] = c.Close() })
	}
	wg.Wait()
	return errors.Join(errs...)
}
