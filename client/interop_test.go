package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/internal/testpki"
	"github.com/lvnbd/lvnbd/nbd"
)

// The client against real NBD servers nobody here wrote. Each test skips when
// its server is not installed, unless LVNBD_REQUIRE_INTEROP=1 makes that a
// failure (as `make test` does).

const interopSize = 64 << 20

// needBinary returns the path of an interop server binary.
func needBinary(t *testing.T, name, pkg string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	if os.Getenv("LVNBD_REQUIRE_INTEROP") == "1" {
		t.Fatalf("%s is not installed (Debian package %s) and LVNBD_REQUIRE_INTEROP=1", name, pkg)
	}
	t.Skipf("%s is not installed (Debian package %s); set LVNBD_REQUIRE_INTEROP=1 to fail instead", name, pkg)
	return ""
}

// lockedBuffer collects a child's output while tests may read it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// serverProc is a real NBD server running for one test.
type serverProc struct {
	name   string
	out    lockedBuffer
	exited chan struct{}
	err    error
}

// startServer runs a server binary until the test ends.
func startServer(t *testing.T, path string, args ...string) *serverProc {
	t.Helper()
	p := &serverProc{name: filepath.Base(path), exited: make(chan struct{})}
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = &p.out, &p.out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", p.name, err)
	}
	go func() { p.err = cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("%s %q output:\n%s", p.name, args, p.out.String())
		}
	})
	return p
}

// waitReady retries listing the server's exports until it answers, the
// process dies, or a deadline passes. Listing leaves single-session servers
// (nbd-server -d) free for the real connection.
func (p *serverProc) waitReady(t *testing.T, uri string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	retry := time.NewTicker(10 * time.Millisecond)
	defer retry.Stop()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := List(ctx, uri, nil)
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not answer on %s in time: %v\n%s", p.name, uri, err, p.out.String())
		}
		select {
		case <-p.exited:
			t.Fatalf("%s exited before answering: %v\n%s", p.name, p.err, p.out.String())
		case <-retry.C:
		}
	}
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// sparseFile creates an empty sparse file of size bytes.
func sparseFile(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return path
}

// shortDir is a directory for Unix sockets, whose paths must stay under 108
// bytes whatever the test's name.
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "lvnbd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// exercise writes random data at several offsets through d, reads it back,
// flushes, zeroes, trims and maps where the export allows, and checks what a
// correct server must return. The export must start out all zeroes.
func exercise(t *testing.T, d Device) {
	t.Helper()
	ctx := testContext(t)
	info := d.Export()
	if info.Size != interopSize {
		t.Fatalf("export size %d, want %d", info.Size, interopSize)
	}
	rng := rand.New(rand.NewChaCha8([32]byte{1}))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	model := make([]byte, interopSize)
	writes := []struct {
		off int64
		n   int
	}{
		{0, 4096},
		{1<<20 + 512, 64 << 10},
		{4 << 20, 33 << 20}, // more than one 32 MiB request
		{interopSize - 128<<10, 128 << 10},
	}
	for _, w := range writes {
		data := random(w.n)
		if err := d.WriteAt(ctx, data, w.off, 0); err != nil {
			t.Fatalf("WriteAt(%d, %d): %v", w.off, w.n, err)
		}
		copy(model[w.off:], data)
	}
	if info.Flags&nbd.FlagSendFUA != 0 {
		data := random(8192)
		if err := d.WriteAt(ctx, data, 2<<20, nbd.CmdFlagFUA); err != nil {
			t.Fatalf("WriteAt with FUA: %v", err)
		}
		copy(model[2<<20:], data)
	}
	// Concurrent writers on distinct blocks.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	blocks := make([][]byte, 8)
	for i := range blocks {
		blocks[i] = random(256 << 10)
	}
	for i := range blocks {
		wg.Go(func() {
			if err := d.WriteAt(ctx, blocks[i], int64(40<<20+i*(256<<10)), 0); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("concurrent WriteAt: %v", err)
	}
	for i := range blocks {
		copy(model[40<<20+i*(256<<10):], blocks[i])
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	got := make([]byte, interopSize)
	if err := d.ReadAt(ctx, got, 0); err != nil {
		t.Fatalf("ReadAt of the whole export: %v", err)
	}
	mustEqual(t, "whole export after writes", model, got)
	for _, w := range writes {
		part := make([]byte, w.n)
		if err := d.ReadAt(ctx, part, w.off); err != nil {
			t.Fatalf("ReadAt(%d, %d): %v", w.off, w.n, err)
		}
		mustEqual(t, fmt.Sprintf("read at %d", w.off), model[w.off:w.off+int64(w.n)], part)
	}

	if info.Flags&nbd.FlagSendWriteZeroes != 0 {
		if err := d.WriteZeroes(ctx, 4<<20, 1<<20, 0); err != nil {
			t.Fatalf("WriteZeroes: %v", err)
		}
		if err := d.WriteZeroes(ctx, 6<<20, 64<<10, nbd.CmdFlagNoHole); err != nil {
			t.Fatalf("WriteZeroes NO_HOLE: %v", err)
		}
		clear(model[4<<20 : 5<<20])
		clear(model[6<<20 : 6<<20+64<<10])
		if info.Flags&nbd.FlagSendFastZero != 0 {
			// Fast zeroing may be refused, but only with ENOTSUP.
			err := d.WriteZeroes(ctx, 8<<20, 1<<20, nbd.CmdFlagFastZero)
			if err != nil && !errors.Is(err, nbd.ENOTSUP) {
				t.Fatalf("WriteZeroes FAST_ZERO: %v, want success or ENOTSUP", err)
			}
			if err == nil {
				clear(model[8<<20 : 9<<20])
			}
		}
		part := make([]byte, 5<<20)
		if err := d.ReadAt(ctx, part, 4<<20); err != nil {
			t.Fatal(err)
		}
		mustEqual(t, "after WriteZeroes", model[4<<20:9<<20], part)
	}
	if info.Flags&nbd.FlagSendTrim != 0 {
		// Trimmed data is undefined afterwards; only the call is checked.
		if err := d.Trim(ctx, 12<<20, 1<<20, 0); err != nil {
			t.Fatalf("Trim: %v", err)
		}
	}
	if info.Flags&nbd.FlagSendCache != 0 {
		if err := d.Cache(ctx, 0, 1<<20); err != nil {
			t.Fatalf("Cache: %v", err)
		}
	}
	if len(info.MetaContexts) > 0 {
		m := allocationMap(t, d)
		// Written data is never a hole; the never-written tail before the
		// last write reads as zeroes (as a hole or explicitly).
		if f := flagsAt(t, m, 2<<20); f&nbd.StateHole != 0 {
			t.Errorf("written data at 2 MiB reported as a hole (flags %#x)", f)
		}
		if f := flagsAt(t, m, 50<<20); f&nbd.StateZero == 0 {
			t.Errorf("never-written region at 50 MiB not reported as zero (flags %#x)", f)
		}
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatalf("final Flush: %v", err)
	}
}

type mapped struct {
	off int64
	nbd.Extent
}

// allocationMap walks the whole export with BLOCK_STATUS.
func allocationMap(t *testing.T, d Device) []mapped {
	t.Helper()
	ctx := testContext(t)
	size := int64(d.Export().Size)
	var out []mapped
	for off := int64(0); off < size; {
		ext, err := d.BlockStatus(ctx, off, size-off, 0)
		if err != nil {
			t.Fatalf("BlockStatus(%d): %v", off, err)
		}
		for _, e := range ext {
			out = append(out, mapped{off, e})
			off += int64(e.Length)
		}
	}
	return out
}

func flagsAt(t *testing.T, m []mapped, off int64) uint32 {
	for _, e := range m {
		if off >= e.off && off < e.off+int64(e.Length) {
			return e.Flags
		}
	}
	t.Fatalf("offset %d not in the allocation map", off)
	return 0
}

func TestInteropNbdkit(t *testing.T) {
	nbdkit := needBinary(t, "nbdkit", "nbdkit")
	tests := []struct {
		name string
		unix bool
		opts *Options
	}{
		{name: "tcp"},
		{name: "unix", unix: true},
		{name: "simple replies, as the kernel", opts: &Options{NoStructuredReplies: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var uri string
			args := []string{"-f", "--exit-with-parent"}
			if tt.unix {
				sock := filepath.Join(shortDir(t), "kit.sock")
				args = append(args, "-U", sock)
				uri = "nbd+unix:///?socket=" + sock
			} else {
				port := freePort(t)
				args = append(args, "-i", "127.0.0.1", "-p", strconv.Itoa(port))
				uri = fmt.Sprintf("nbd://127.0.0.1:%d/", port)
			}
			p := startServer(t, nbdkit, append(args, "memory", strconv.Itoa(interopSize))...)
			p.waitReady(t, uri)

			info, err := Info(testContext(t), uri, nil)
			if err != nil {
				t.Fatalf("Info: %v", err)
			}
			if info.Size != interopSize || !hasContext(info, nbd.MetaContextBaseAllocation) {
				t.Errorf("Info: size %d, contexts %v; want %d with base:allocation", info.Size, info.MetaContexts, interopSize)
			}
			c := dialT(t, uri, tt.opts)
			if got := c.Export().StructuredReplies; got != (tt.opts == nil) {
				t.Errorf("structured replies %v, want %v", got, tt.opts == nil)
			}
			exercise(t, c)
		})
	}
}

func hasContext(info ExportInfo, name string) bool {
	for _, m := range info.MetaContexts {
		if m.Name == name {
			return true
		}
	}
	return false
}

// nbdkit's multi-conn memory export lets a pool use every connection.
func TestInteropNbdkitPool(t *testing.T) {
	nbdkit := needBinary(t, "nbdkit", "nbdkit")
	sock := filepath.Join(shortDir(t), "kit.sock")
	uri := "nbd+unix:///?socket=" + sock
	p := startServer(t, nbdkit, "-f", "--exit-with-parent", "-U", sock, "memory", strconv.Itoa(interopSize))
	p.waitReady(t, uri)
	pool, err := DialPool(testContext(t), uri, 4, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if !pool.MultiConn() || pool.Connections() != 4 {
		t.Fatalf("pool: multi-conn %v, %d connections; want true, 4", pool.MultiConn(), pool.Connections())
	}
	exercise(t, pool)
}

// nbdkit's filters make a real server enforce block sizes and fail requests.
func TestInteropNbdkitConstraintsAndErrors(t *testing.T) {
	nbdkit := needBinary(t, "nbdkit", "nbdkit")
	dir := shortDir(t)
	sock, trigger := filepath.Join(dir, "kit.sock"), filepath.Join(dir, "fail")
	uri := "nbd+unix:///?socket=" + sock
	p := startServer(t, nbdkit, "-f", "--exit-with-parent", "-U", sock,
		"--filter=error", "--filter=blocksize-policy", "memory", "16M",
		"blocksize-minimum=512", "blocksize-preferred=4096", "blocksize-maximum=65536",
		"blocksize-error-policy=error",
		"error-pwrite=ENOSPC", "error-pwrite-rate=100%", "error-pwrite-file="+trigger)
	p.waitReady(t, uri)
	c := dialT(t, uri, nil)
	info := c.Export()
	if want := (BlockSizes{512, 4096, 65536}); !info.BlockSizesAdvertised || info.BlockSizes != want {
		t.Fatalf("block sizes %+v (advertised %v), want %+v", info.BlockSizes, info.BlockSizesAdvertised, want)
	}
	ctx := testContext(t)
	// A 1 MiB write must go out as 64 KiB requests the server accepts.
	data := pattern(1<<20, 7)
	if err := c.WriteAt(ctx, data, 512, 0); err != nil {
		t.Fatalf("WriteAt under a 64 KiB maximum: %v", err)
	}
	got := make([]byte, 1<<20)
	if err := c.ReadAt(ctx, got, 512); err != nil {
		t.Fatalf("ReadAt under a 64 KiB maximum: %v", err)
	}
	mustEqual(t, "read back", data, got)
	if err := c.ReadAt(ctx, make([]byte, 100), 0); !errors.Is(err, nbd.EINVAL) {
		t.Errorf("unaligned read: %v, want a local EINVAL", err)
	}
	// Writes fail with ENOSPC while the trigger file exists.
	if err := os.WriteFile(trigger, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	err := c.WriteAt(ctx, make([]byte, 4096), 0, 0)
	var re *RequestError
	if !errors.As(err, &re) || re.Errno != nbd.ENOSPC {
		t.Fatalf("WriteAt with the error filter armed: %v, want ENOSPC", err)
	}
	os.Remove(trigger)
	if err := c.WriteAt(ctx, make([]byte, 4096), 0, 0); err != nil {
		t.Fatalf("WriteAt after disarming: %v", err)
	}
}

func TestInteropQemuNBD(t *testing.T) {
	qemuNBD := needBinary(t, "qemu-nbd", "qemu-utils")
	for _, unix := range []bool{false, true} {
		t.Run(map[bool]string{false: "tcp", true: "unix"}[unix], func(t *testing.T) {
			file := sparseFile(t, interopSize)
			args := []string{"-f", "raw", "-t", "-x", "disk"}
			var uri string
			if unix {
				sock := filepath.Join(shortDir(t), "q.sock")
				args = append(args, "-k", sock)
				uri = "nbd+unix:///disk?socket=" + sock
			} else {
				port := freePort(t)
				args = append(args, "-b", "127.0.0.1", "-p", strconv.Itoa(port))
				uri = fmt.Sprintf("nbd://127.0.0.1:%d/disk", port)
			}
			p := startServer(t, qemuNBD, append(args, file)...)
			p.waitReady(t, uri)

			list, err := List(testContext(t), uri, nil)
			if err != nil || len(list) != 1 || list[0].Name != "disk" {
				t.Fatalf("List: %v, %v; want the one export \"disk\"", list, err)
			}
			info, err := Info(testContext(t), uri, nil)
			if err != nil || info.Size != interopSize || !hasContext(info, nbd.MetaContextBaseAllocation) {
				t.Fatalf("Info: %+v, %v", info, err)
			}
			missing, err := ParseURI(uri)
			if err != nil {
				t.Fatal(err)
			}
			missing.Export = "disk-missing"
			if _, err := Dial(testContext(t), missing.String(), nil); !errors.Is(err, ErrExportNotFound) {
				t.Errorf("Dial of a missing export: %v, want ErrExportNotFound", err)
			} else {
				t.Logf("missing export: %v", err)
			}
			// qemu-nbd serves one client at a time and does not advertise
			// multi-conn: the pool must settle for one connection.
			pool, err := DialPool(testContext(t), uri, 4, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer pool.Close()
			if pool.Connections() != 1 || pool.MultiConn() {
				t.Fatalf("pool on qemu-nbd: %d connections, multi-conn %v; want 1, false", pool.Connections(), pool.MultiConn())
			}
			exercise(t, pool)
		})
	}
}

func TestInteropNbdServer(t *testing.T) {
	nbdServer := needBinary(t, "nbd-server", "nbd-server")
	file := sparseFile(t, interopSize)
	port := freePort(t)
	conf := filepath.Join(t.TempDir(), "nbd-server.conf")
	err := os.WriteFile(conf, fmt.Appendf(nil, `[generic]
	listenaddr = 127.0.0.1
	port = %d
	allowlist = true
[disk]
	exportname = %s
	flush = true
	fua = true
	trim = true
`, port, file), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	// -d keeps it in the foreground, where it serves exactly one session
	// that reaches transmission, then exits.
	p := startServer(t, nbdServer, "-C", conf, "-d")
	uri := fmt.Sprintf("nbd://127.0.0.1:%d/disk", port)
	p.waitReady(t, uri)
	list, err := List(testContext(t), uri, nil)
	if err != nil || len(list) != 1 || list[0].Name != "disk" {
		t.Fatalf("List: %v, %v; want the one export \"disk\"", list, err)
	}
	c := dialT(t, uri, nil)
	if c.Export().StructuredReplies {
		t.Log("nbd-server negotiated structured replies")
	}
	exercise(t, c)
}

// TestInteropTLS: nbds:// against the TLS of servers nobody here wrote, both
// on GnuTLS and both asking for a client certificate: nbdkit (a pool of
// connections) and qemu-nbd. The certificates are in GnuTLS's directory
// layout, which the URI's tls-certificates names, as it would for nbdinfo.
func TestInteropTLS(t *testing.T) {
	pki, err := testpki.New(shortDir(t), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	caOnly := writeCADir(t, pki)
	tests := []struct {
		name     string
		binary   string
		pkg      string
		args     func(port int, file string) []string
		export   string
		poolSize int // connections a pool gets: nbdkit allows several, qemu-nbd one
	}{
		{"nbdkit", "nbdkit", "nbdkit", func(port int, _ string) []string {
			return []string{"-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", strconv.Itoa(port),
				"--tls=require", "--tls-certificates=" + pki.Dir, "--tls-verify-peer", "memory", strconv.Itoa(interopSize)}
		}, "", 4},
		{"qemu-nbd", "qemu-nbd", "qemu-utils", func(port int, file string) []string {
			return []string{"-f", "raw", "-t", "-x", "disk", "-b", "127.0.0.1", "-p", strconv.Itoa(port),
				"--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir=" + pki.Dir, "--tls-creds", "tls0", file}
		}, "disk", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := needBinary(t, tt.binary, tt.pkg)
			port := freePort(t)
			p := startServer(t, path, tt.args(port, sparseFile(t, interopSize))...)
			base := fmt.Sprintf("nbds://127.0.0.1:%d/%s", port, tt.export)
			uri := base + "?tls-certificates=" + pki.Dir
			p.waitReady(t, uri)

			info, err := Info(testContext(t), uri, nil)
			if err != nil || !info.TLS || info.Size != interopSize {
				t.Fatalf("Info over TLS: %+v, %v", info, err)
			}
			pool, err := DialPool(testContext(t), uri, 4, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer pool.Close()
			if pool.Connections() != tt.poolSize || !pool.Export().TLS {
				t.Fatalf("pool over TLS: %d connections, TLS %v; want %d over TLS", pool.Connections(), pool.Export().TLS, tt.poolSize)
			}
			exercise(t, pool)
			pool.Close()

			// Refused without a client certificate (GnuTLS hangs up
			// without a word), and in plain text.
			if _, err := Dial(testContext(t), base+"?tls-certificates="+caOnly, nil); !errors.Is(err, ErrTLSNoClientCertificate) {
				t.Errorf("a client without a certificate: %v, want ErrTLSNoClientCertificate", err)
			}
			plain := strings.Replace(base, "nbds://", "nbd://", 1)
			if _, err := Dial(testContext(t), plain, nil); !errors.Is(err, ErrTLSRequired) {
				t.Errorf("a plain-text client: %v, want ErrTLSRequired", err)
			}
		})
	}
}
