package bench

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/nbd"
)

// NBD is an NBD export target: one or more URIs of the same export (one per
// link), each with a pool of connections. Requests are spread over the URIs
// by block (link), and within each over its connections.
type NBD struct {
	uris  []string
	pools []*client.Pool
	size  int64
	align int
	fua   bool // the server takes FUA; else durable writes are followed by a flush
	conns int
	// overwrites names the export when a forced write run writes over it.
	overwrites string
}

// OpenNBD connects to the export at each URI with o.Conns connections in all,
// spread evenly over the URIs (at least one each). A server that does not
// advertise multi-conn gets one connection (o.Notices is told), and cannot
// be given several URIs; several must name the same export and reach it
// (size and volume ID).
func OpenNBD(ctx context.Context, uris []string, o OpenOptions) (*NBD, error) {
	conns := max(o.Conns, 1)
	if conns < len(uris) {
		conns = len(uris)
	}
	// Links to one export differ in their address, never in the export's
	// name: two names are two exports, such as a mirror's two halves on
	// two storage boxes, which a write run would split its blocks over.
	var names []string
	for _, uri := range uris {
		u, err := client.ParseURI(uri)
		if err != nil {
			return nil, err
		}
		if len(names) > 0 && u.Export != names[0] {
			return nil, fmt.Errorf("%s names export %q but %s names %q: several URIs must be links to one export", uri, u.Export, uris[0], names[0])
		}
		names = append(names, u.Export)
	}
	t := &NBD{uris: uris}
	opts := &client.Options{NoMetaContext: true, TLS: o.TLS}
	var first client.ExportInfo
	for i, uri := range uris {
		n := conns / len(uris)
		if i < conns%len(uris) {
			n++
		}
		p, err := client.DialPool(ctx, uri, n, opts)
		if err != nil {
			t.Close()
			return nil, err
		}
		t.pools = append(t.pools, p)
		t.conns += p.Connections()
		if p.Connections() < n && o.Notices != nil {
			fmt.Fprintf(o.Notices, "%s does not advertise CAN_MULTI_CONN: using 1 connection, not %d\n", uri, n)
		}
		info := p.Export()
		// Every URI, not just the first: one link's server may serve
		// the volume read-only while another's does not.
		if o.Write && info.ReadOnly() {
			t.Close()
			return nil, fmt.Errorf("%s is a read-only export: a write mode cannot use it; leave it out or run a read mode", uri)
		}
		if i == 0 {
			first = info
			continue
		}
		// Without CAN_MULTI_CONN a server need not make one connection's
		// writes visible to another's reads (nor a flush cover them):
		// --verify would read what it did not write.
		noMulti := "%s does not advertise CAN_MULTI_CONN: its connections need not see each other's writes, so several URIs of it cannot be combined; give one"
		switch {
		case !first.MultiConn():
			t.Close()
			return nil, fmt.Errorf(noMulti, uris[0])
		case !info.MultiConn():
			t.Close()
			return nil, fmt.Errorf(noMulti, uri)
		case info.Size != first.Size:
			t.Close()
			return nil, fmt.Errorf("%s has %d bytes but %s has %d: not the same export", uri, info.Size, uris[0], first.Size)
		case info.ID() != first.ID():
			t.Close()
			return nil, fmt.Errorf("%s serves volume ID %q but %s serves %q: not the same export", uri, info.ID(), uris[0], first.ID())
		}
	}
	t.fua = first.Flags&nbd.FlagSendFUA != 0
	t.align = int(max(first.BlockSizes.Minimum, 1))
	size := int64(first.Size)
	name := strings.Join(uris, " ")
	switch {
	case o.Write && !o.Force && size > 0:
		t.Close()
		return nil, &OverwriteError{Path: name, Kind: "NBD export", Size: size, Range: min(o.Size, size)}
	case o.Size > size:
		t.Close()
		return nil, fmt.Errorf("--size %s is larger than export %s (%s)", formatIBytes(o.Size), name, formatIBytes(size))
	case o.Size > 0:
		t.size = o.Size
	default:
		t.size = size
	}
	if t.size == 0 {
		t.Close()
		return nil, fmt.Errorf("export %s is empty", name)
	}
	if o.Write {
		t.overwrites = "NBD export " + name
	}
	return t, nil
}

// Overwrites names the export a write run writes over.
func (t *NBD) Overwrites() string { return t.overwrites }

// pool picks the link for a request of n bytes at off: by block, so that a
// run's blocks alternate over the links, and a block is read back through
// the link after the one that wrote it. With one export behind every link
// that changes nothing; with different ones behind them (the same name and
// size on two storage boxes that do not report a volume ID, so OpenNBD
// cannot tell), --verify fails instead of reading each block back from
// where it went.
func (t *NBD) pool(off int64, n int, read bool) *client.Pool {
	if len(t.pools) == 1 {
		return t.pools[0]
	}
	i := uint64(off / int64(max(n, 1)))
	if read {
		i++
	}
	return t.pools[i%uint64(len(t.pools))]
}

// Size is the region of the export in use.
func (t *NBD) Size() int64 { return t.size }

// Alignment is the export's minimum block size.
func (t *NBD) Alignment() int { return t.align }

// Connections is the number of connections open, over every URI.
func (t *NBD) Connections() int { return t.conns }

// Describe says what the target is.
func (t *NBD) Describe() string {
	if len(t.uris) > 1 {
		return fmt.Sprintf("NBD export over %d links", len(t.uris))
	}
	return "NBD export"
}

// ReadAt fills p from offset off.
func (t *NBD) ReadAt(ctx context.Context, p []byte, off int64) error {
	return t.pool(off, len(p), true).ReadAt(ctx, p, off)
}

// WriteAt writes p at offset off; durable writes carry FUA, or are followed
// by a flush on a server that does not take FUA.
func (t *NBD) WriteAt(ctx context.Context, p []byte, off int64, durable bool) error {
	var flags nbd.CommandFlags
	if durable && t.fua {
		flags = nbd.CmdFlagFUA
	}
	pool := t.pool(off, len(p), false)
	if err := pool.WriteAt(ctx, p, off, flags); err != nil {
		return err
	}
	if durable && !t.fua {
		return pool.Flush(ctx)
	}
	return nil
}

// Flush flushes the export through every URI: with multi-conn one flush per
// server covers all its connections, and the URIs may reach different ones.
func (t *NBD) Flush(ctx context.Context) error {
	var errs []error
	for _, p := range t.pools {
		errs = append(errs, p.Flush(ctx))
	}
	return errors.Join(errs...)
}

// Close closes every connection after its in-flight requests.
func (t *NBD) Close() error {
	var errs []error
	for _, p := range t.pools {
		errs = append(errs, p.Close())
	}
	return errors.Join(errs...)
}
