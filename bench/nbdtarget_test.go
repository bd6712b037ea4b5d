package bench

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lvnbd/lvnbd/server"
)

// serveFile runs lvnbd's server on loopback with path exported as "bench"
// and returns its URI.
func serveFile(tb testing.TB, path string, size int64) string {
	tb.Helper()
	return serveExports(tb, path, size, server.ExportSpec{Name: "bench", Path: path})[0]
}

// serveExports creates path with size bytes, runs lvnbd's server on
// loopback with the exports given and returns their URIs.
func serveExports(tb testing.TB, path string, size int64, specs ...server.ExportSpec) []string {
	tb.Helper()
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		tb.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		tb.Fatal(err)
	}
	reg := server.NewRegistry()
	for _, spec := range specs {
		e, err := server.OpenExport(spec)
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { e.Backend.Close() })
		if err := reg.Add(e); err != nil {
			tb.Fatal(err)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- server.New(&server.Config{Exports: reg}).Serve(ctx, ln) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("server: %v", err)
		}
	})
	var uris []string
	for _, spec := range specs {
		uris = append(uris, "nbd://"+ln.Addr().String()+"/"+spec.Name)
	}
	return uris
}

// A write run over several links refuses up front, naming it, any URI whose
// server serves the export read-only, not only the first.
func TestNBDReadOnlyURIRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "export.img")
	uris := append(serveExports(t, path, 1<<20, server.ExportSpec{Name: "vm1", Path: path}),
		serveExports(t, path, 1<<20, server.ExportSpec{Name: "vm1", Path: path, ReadOnly: true})...)
	_, err := Open(context.Background(), uris, OpenOptions{Write: true, Force: true, Conns: 2})
	if err == nil || !strings.Contains(err.Error(), uris[1]+" is a read-only export") {
		t.Errorf("write over %v: %v, want a refusal naming %s", uris, err, uris[1])
	}
	// Reading over both is fine.
	r, err := Open(context.Background(), uris, OpenOptions{Conns: 2})
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
}

func TestNBDTarget(t *testing.T) {
	const size = 8 << 20
	path := filepath.Join(t.TempDir(), "export.img")
	uri := serveFile(t, path, size)
	ctx := context.Background()

	// Writing to an export needs --force, and says what it would destroy.
	_, err := Open(ctx, []string{uri}, OpenOptions{Write: true, Conns: 2})
	var ow *OverwriteError
	if !errors.As(err, &ow) || ow.Kind != "NBD export" || ow.Size != size || !strings.Contains(err.Error(), uri) {
		t.Fatalf("write without force: %v, want an *OverwriteError naming %s", err, uri)
	}

	// Two URIs of one export (two links), 3 connections spread over them.
	tg, err := Open(ctx, []string{uri, uri}, OpenOptions{Write: true, Force: true, Conns: 3})
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	if tg.Size() != size || tg.(*NBD).Connections() != 3 {
		t.Fatalf("size %d, %d connections; want %d and 3", tg.Size(), tg.(*NBD).Connections(), size)
	}
	rep := mustRun(t, tg, Config{Mode: ModeWrite, BlockSize: 1 << 20, QueueDepth: 4, Verify: true, Seed: 11})
	if rep.Write.Bytes != size || !rep.Flushed || !rep.Verify.OK || rep.Verify.CheckedBytes != size || rep.Connections != 3 {
		t.Errorf("write over NBD: %+v verify %+v", rep, rep.Verify)
	}
	rep = mustRun(t, tg, Config{Mode: ModeRandRW, BlockSize: 4096, QueueDepth: 16, IOLimit: 1 << 20, ReadPercent: 50, Verify: true, Seed: 11, FUA: true})
	if rep.Bytes != 1<<20 || !rep.Verify.OK {
		t.Errorf("randrw over NBD: %d bytes, verify %+v", rep.Bytes, rep.Verify)
	}

	// Corruption in the export is found at its offset, through the server.
	const bad = 5<<20 + 3
	flipByte(t, path, bad)
	r, err := Open(ctx, []string{uri}, OpenOptions{Conns: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	_, err = Run(ctx, r, Config{Mode: ModeRead, BlockSize: 256 << 10, QueueDepth: 8, Verify: true, Seed: 11})
	var m *MismatchError
	if !errors.As(err, &m) || m.Offset != bad {
		t.Errorf("read verify after corruption: %v, want a mismatch at %d", err, bad)
	}

	if _, err := Open(ctx, []string{uri}, OpenOptions{Size: size + 4096}); err == nil || !strings.Contains(err.Error(), "larger than export") {
		t.Errorf("--size over the export: %v", err)
	}
}

// Several URIs must be links to one export. Two names are two exports, and
// refused. Two storage boxes serving the same name and size without a
// volume ID cannot be told apart up front, but a verify then fails: each
// block is read back through another link than the one that wrote it.
func TestNBDLinksToOneExport(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	const size = 4 << 20

	one := filepath.Join(dir, "one.img")
	uris := serveExports(t, one, size, server.ExportSpec{Name: "vm1", Path: one}, server.ExportSpec{Name: "vm2", Path: one})
	_, err := Open(ctx, uris, OpenOptions{Conns: 2})
	if err == nil || !strings.Contains(err.Error(), `names export "vm2" but`) {
		t.Errorf("two export names: %v, want a refusal", err)
	}

	a, b := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	halves := append(serveExports(t, a, size, server.ExportSpec{Name: "vm1", Path: a}),
		serveExports(t, b, size, server.ExportSpec{Name: "vm1", Path: b})...)
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"sequential", Config{Mode: ModeWrite, BlockSize: 64 << 10, QueueDepth: 4, Verify: true, Seed: 3}},
		{"random", Config{Mode: ModeRandWrite, BlockSize: 4096, QueueDepth: 8, IOLimit: 1 << 20, Verify: true, Seed: 3}},
	} {
		tg, err := Open(ctx, halves, OpenOptions{Write: true, Force: true, Conns: 2})
		if err != nil {
			t.Fatal(err)
		}
		_, err = Run(ctx, tg, tc.cfg)
		tg.Close()
		var m *MismatchError
		if !errors.As(err, &m) {
			t.Errorf("%s write over two different exports: %v, want a verify mismatch", tc.name, err)
		}
	}

	// One export over two links verifies.
	tg, err := Open(ctx, []string{uris[0], uris[0]}, OpenOptions{Write: true, Force: true, Conns: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	rep := mustRun(t, tg, Config{Mode: ModeRandWrite, BlockSize: 4096, QueueDepth: 8, IOLimit: 1 << 20, Verify: true, Seed: 3})
	if !rep.Verify.OK {
		t.Errorf("one export over two links: verify %+v", rep.Verify)
	}
}
