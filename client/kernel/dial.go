package kernel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/dustin/go-humanize"
	"golang.org/x/sync/errgroup"

	"github.com/lvnbd/lvnbd/client"
)

// MaxConnections bounds the connections lvnbd gives one device.
const MaxConnections = 64

// ErrExportShrank means an export is now smaller than the device attached to
// it: the device's tail is lost on the export, and a device never shrinks.
var ErrExportShrank = errors.New("the export shrank")

// DialSockets opens n connections to u with d (nil: a default net.Dialer)
// and negotiates each without structured replies, which the kernel cannot
// parse; the sockets are ready for Config.Sockets or Reconfig.Sockets. The
// first connection tells whether the export allows several; all must see
// the same export. The caller closes the files (CloseSockets).
func DialSockets(ctx context.Context, d *net.Dialer, u client.URI, n int) ([]*os.File, client.ExportInfo, error) {
	if u.IsTLS() {
		return nil, client.ExportInfo{}, fmt.Errorf("%s: %w (the kernel cannot speak TLS; use nbd:// or nbd+unix://)", u, client.ErrTLSNotSupported)
	}
	if n < 1 {
		return nil, client.ExportInfo{}, fmt.Errorf("%s: %d connections asked for", u, n)
	}
	if d == nil {
		d = &net.Dialer{}
	}
	files := make([]*os.File, n)
	infos := make([]client.ExportInfo, n)
	dialOne := func(ctx context.Context, i int) error {
		nc, err := d.DialContext(ctx, u.Network(), u.Address())
		if err != nil {
			return &client.DialError{Addr: u.Address(), Err: err}
		}
		defer nc.Close()
		info, err := client.Negotiate(ctx, nc, u.Export, &client.Options{NoStructuredReplies: true})
		if err != nil {
			return err
		}
		fc, ok := nc.(interface{ File() (*os.File, error) })
		if !ok {
			return fmt.Errorf("cannot hand a %T to the kernel", nc)
		}
		// A duplicate descriptor of the same socket: closing nc, the
		// original, does not end the connection.
		f, err := fc.File()
		if err != nil {
			return fmt.Errorf("connection %d: %w", i+1, err)
		}
		files[i], infos[i] = f, info
		return nil
	}
	fail := func(err error) ([]*os.File, client.ExportInfo, error) {
		CloseSockets(files)
		return nil, client.ExportInfo{}, err
	}
	if err := dialOne(ctx, 0); err != nil {
		return fail(err)
	}
	if n > 1 && !infos[0].MultiConn() {
		return fail(fmt.Errorf("%s: %w", u, ErrNoMultiConn))
	}
	g, gctx := errgroup.WithContext(ctx)
	for i := 1; i < n; i++ {
		g.Go(func() error { return dialOne(gctx, i) })
	}
	if err := g.Wait(); err != nil {
		return fail(err)
	}
	for i := 1; i < n; i++ {
		a, b := infos[0], infos[i]
		// The ID too: a volume made anew between two connections would
		// otherwise get one of them.
		if !a.SameExport(b) {
			return fail(fmt.Errorf("%s changed between connections: connection 1 saw %d bytes, flags %v, volume id %q; "+
				"connection %d saw %d bytes, flags %v, volume id %q", u, a.Size, a.Flags, a.ID(), i+1, b.Size, b.Flags, b.ID()))
		}
	}
	return files, infos[0], nil
}

// CloseSockets closes every non-nil file of files: what the caller does once
// Connect or Reconfigure returned (the kernel holds its own references).
func CloseSockets(files []*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}

// ChooseBlockSize returns a device's logical block size for an export: the
// one asked for (0 for none), else the export's minimum block size but at
// least 512 (the smallest, and most compatible, the kernel allows).
func ChooseBlockSize(asked uint32, info client.ExportInfo) (uint32, error) {
	minimum := uint32(1)
	if info.BlockSizesAdvertised {
		minimum = info.BlockSizes.Minimum
	}
	if asked != 0 {
		if asked < minimum {
			return 0, fmt.Errorf("block size %d is below the export's minimum block size %d", asked, minimum)
		}
		return asked, nil
	}
	bs := max(DefaultBlockSize, minimum)
	if err := ValidBlockSize(bs); err != nil {
		return 0, fmt.Errorf("the export's minimum block size %d is more than the kernel supports: %w", minimum, err)
	}
	return bs, nil
}

// ExportConfig is the Config of a device for an export: its size in whole
// blocks of blockSize (0: ChooseBlockSize picks one), the flags it
// advertised and its maximum payload. The caller adds the sockets, timeouts,
// backend and index. An export's tail that is not a whole block stays out of
// the device (compare Size with info.Size).
func ExportConfig(info client.ExportInfo, blockSize uint32) (Config, error) {
	bs, err := ChooseBlockSize(blockSize, info)
	if err != nil {
		return Config{}, err
	}
	size := info.Size - info.Size%uint64(bs)
	if size == 0 {
		return Config{}, fmt.Errorf("export %q is %d bytes, smaller than one %d-byte block", info.Name, info.Size, bs)
	}
	cfg := Config{Size: size, BlockSize: bs, ServerFlags: info.Flags}
	if info.BlockSizesAdvertised {
		cfg.MaxRequestBytes = info.BlockSizes.MaxPayload
	}
	return cfg, nil
}

// GrownSize is the size device d should have for an export of exportSize
// bytes: whole blocks, never smaller than d is now (ErrExportShrank).
func GrownSize(d Device, exportSize uint64) (uint64, error) {
	bs := uint64(max(d.BlockSize, DefaultBlockSize))
	size := exportSize - exportSize%bs
	if size < d.Size {
		// Not just "detach it first": a device that is half of a mirror (a
		// pair's leg) has lost its tail, and must be given to the mirror as a
		// new member whatever size it comes back with.
		export := d.Backend
		if export == "" {
			export = "its export"
		}
		return 0, fmt.Errorf("%w from %s to %s (%d to %d bytes) under %s: %s has lost the device's tail, even if "+
			"it is grown back, and a device never shrinks; if %s is one half of a mirror (a pair's leg), that half "+
			"must be replaced as a new member, resynced in full; a device used alone takes the smaller size only "+
			"detached and attached again",
			ErrExportShrank, humanize.IBytes(d.Size), humanize.IBytes(exportSize), d.Size, exportSize, d.Path(),
			export, d.Path())
	}
	return size, nil
}
