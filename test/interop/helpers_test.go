// Package interop proves the real lvnbd binary against real NBD clients that
// nobody here wrote: libnbd's nbdinfo and nbdcopy, qemu-img and qemu-io, and
// fio's nbd engine, all from Debian packages. It runs for real under
// `make test-interop`; elsewhere every test skips.
package interop

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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

	"golang.org/x/sys/unix"
)

const skipReason = "interop suite: run `make test-interop` (needs Debian's nbdkit, qemu-utils, libnbd-bin, fio)"

// Suite state set once by TestMain.
var (
	interopEnabled  bool   // LVNBD_INTEROP=1 (or LVNBD_REQUIRE_INTEROP=1)
	interopRequired bool   // LVNBD_REQUIRE_INTEROP=1: a missing tool fails
	lvnbdBin        string // the binary TestMain built
)

// Bounds on waiting for the server; generous for a loaded 2-core machine.
const (
	readyTimeout = 10 * time.Second
	// stopTimeout exceeds the server's 30 s drain bound, so a server that
	// hangs in drain is told apart from one that ignores the signal.
	stopTimeout = 40 * time.Second
	toolTimeout = 90 * time.Second
)

func TestMain(m *testing.M) {
	interopRequired = os.Getenv("LVNBD_REQUIRE_INTEROP") == "1"
	// Requiring the suite implies running it: a required suite that skips
	// everything would pass while proving nothing.
	interopEnabled = os.Getenv("LVNBD_INTEROP") == "1" || interopRequired
	if !interopEnabled {
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "lvnbd-interop-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "interop:", err)
		os.Exit(1)
	}
	lvnbdBin = filepath.Join(dir, "lvnbd")
	if err := buildLvnbd(lvnbdBin); err != nil {
		fmt.Fprintln(os.Stderr, "interop: building lvnbd:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// buildLvnbd builds ./cmd/lvnbd statically, as `make build` does, from the
// module root.
func buildLvnbd(out string) error {
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(gomod))
	if mod == "" || mod == os.DevNull {
		return errors.New("not inside the lvnbd module (go env GOMOD is empty)")
	}
	cmd := exec.Command("go", "build", "-o", out, "./cmd/lvnbd")
	cmd.Dir = filepath.Dir(mod)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%w\n%s", err, b)
	}
	return nil
}

// requireInterop skips t outside the interop suite and checks that every
// tool is on PATH: a missing one skips, or fails under LVNBD_REQUIRE_INTEROP=1.
func requireInterop(t testing.TB, tools ...string) {
	t.Helper()
	if !interopEnabled {
		t.Skip(skipReason)
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			missing(t, "%s not found on PATH (%v)", tool, err)
		}
	}
}

func missing(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...) + "; " + skipReason
	if interopRequired {
		t.Fatal(msg + " [LVNBD_REQUIRE_INTEROP=1 makes this a failure]")
	}
	t.Skip(msg)
}

// server is one running `lvnbd serve` process.
type server struct {
	cmd    *exec.Cmd
	port   int    // TCP port, 0 when not listening on TCP
	socket string // Unix socket path, "" when not listening on one
	log    *syncBuffer
	done   chan struct{} // closed when the process has exited
	mu     sync.Mutex
	code   int
	killed bool // by kill: no clean exit to check
}

// kill ends the server with SIGKILL, as a crash would, and waits for it.
func (s *server) kill() {
	s.killed = true
	s.signal(syscall.SIGKILL)
}

// serverOpts chooses a server's listeners and exports.
type serverOpts struct {
	exports []string // NAME=PATH[:ro]
	tcp     bool     // listen on 127.0.0.1 on a free port
	unix    bool     // listen on a socket in a temp dir
	args    []string // extra flags
}

// startServer starts lvnbd serve and waits until it answers the NBD
// handshake. t.Cleanup stops it with SIGTERM and fails t unless it exits 0.
// The server's stderr is logged when t has failed.
func startServer(t testing.TB, o serverOpts) *server {
	t.Helper()
	if !o.tcp && !o.unix {
		o.tcp = true
	}
	var socket string
	if o.unix {
		socket = filepath.Join(t.TempDir(), "nbd.sock")
		if len(socket) >= 100 { // sun_path holds 108 bytes with the NUL
			dir, err := os.MkdirTemp("", "nbd")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			socket = filepath.Join(dir, "nbd.sock")
		}
	}
	const attempts = 5
	for i := 0; ; i++ {
		port := 0
		if o.tcp {
			port = freePort(t)
		}
		s, err := launch(t, o, port, socket)
		if err == nil {
			return s
		}
		// Another process may take the port between our probe and the
		// server's bind: only that race is retried.
		if errors.Is(err, errPortTaken) && i+1 < attempts {
			t.Logf("port %d was taken before the server bound it; retrying", port)
			continue
		}
		t.Fatalf("starting lvnbd serve: %v", err)
	}
}

var errPortTaken = errors.New("address already in use")

func launch(t testing.TB, o serverOpts, port int, socket string) (*server, error) {
	t.Helper()
	// No control socket and no fence file: the defaults are machine-wide
	// paths, which would tie every test server to the host and each other.
	args := []string{"serve", "--control=", "--fence-file=", "--failure-file="}
	if port != 0 {
		args = append(args, "--listen", fmt.Sprintf("tcp://127.0.0.1:%d", port))
	}
	if socket != "" {
		args = append(args, "--listen", "unix://"+socket)
	}
	for _, e := range o.exports {
		args = append(args, "--export", e)
	}
	args = append(args, o.args...)
	s := &server{port: port, socket: socket, log: &syncBuffer{}, done: make(chan struct{})}
	s.cmd = exec.Command(lvnbdBin, args...)
	s.cmd.Stdout = s.log
	s.cmd.Stderr = s.log
	t.Logf("$ %s", shellLine(s.cmd.Args))
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		s.cmd.Wait()
		s.mu.Lock()
		s.code = -1
		if s.cmd.ProcessState != nil {
			s.code = s.cmd.ProcessState.ExitCode()
		}
		s.mu.Unlock()
		close(s.done)
	}()
	if err := s.waitReady(); err != nil {
		s.cmd.Process.Kill()
		<-s.done
		if port != 0 && strings.Contains(s.log.String(), "address already in use") {
			return nil, errPortTaken
		}
		return nil, fmt.Errorf("%w\nserver output:\n%s", err, s.log)
	}
	t.Cleanup(func() {
		if s.killed {
			return // a test killed it on purpose
		}
		code, stopErr := s.stop()
		if stopErr != nil {
			t.Errorf("stopping the server: %v", stopErr)
		} else if code != 0 {
			t.Errorf("server exited with code %d after SIGTERM, want 0", code)
		}
		if t.Failed() {
			t.Logf("server output:\n%s", s.log)
		}
	})
	return s, nil
}

// waitReady retries an NBD handshake on every listener until one succeeds
// on each, the process exits, or readyTimeout passes.
func (s *server) waitReady() error {
	deadline := time.Now().Add(readyTimeout)
	for _, addr := range s.addrs() {
		for {
			err := probe(addr[0], addr[1], deadline)
			if err == nil {
				break
			}
			select {
			case <-s.done:
				return fmt.Errorf("server exited with code %d before listening on %s", s.exitCode(), addr[1])
			default:
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("server not ready on %s after %v: %w", addr[1], readyTimeout, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return nil
}

func (s *server) addrs() [][2]string {
	var a [][2]string
	if s.port != 0 {
		a = append(a, [2]string{"tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port))})
	}
	if s.socket != "" {
		a = append(a, [2]string{"unix", s.socket})
	}
	return a
}

// probe does the start of a fixed-newstyle handshake and ends it with
// NBD_OPT_ABORT, so the server logs a clean goodbye rather than a failure.
func probe(network, addr string, deadline time.Time) error {
	c, err := net.DialTimeout(network, addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	if d := time.Now().Add(2 * time.Second); d.Before(deadline) {
		deadline = d
	}
	c.SetDeadline(deadline)
	var hello [18]byte // "NBDMAGIC", "IHAVEOPT", handshake flags
	if _, err := io.ReadFull(c, hello[:]); err != nil {
		return fmt.Errorf("reading greeting: %w", err)
	}
	if string(hello[:16]) != "NBDMAGICIHAVEOPT" {
		return fmt.Errorf("greeting %q is not fixed-newstyle NBD", hello[:16])
	}
	const clientFixedNewstyle, optAbort, repAck = 1, 2, 1
	var req []byte
	req = binary.BigEndian.AppendUint32(req, clientFixedNewstyle)
	req = append(req, "IHAVEOPT"...)
	req = binary.BigEndian.AppendUint32(req, optAbort)
	req = binary.BigEndian.AppendUint32(req, 0)
	if _, err := c.Write(req); err != nil {
		return err
	}
	var rep [20]byte // magic, option, type, length
	if _, err := io.ReadFull(c, rep[:]); err != nil {
		return fmt.Errorf("reading NBD_OPT_ABORT reply: %w", err)
	}
	if typ := binary.BigEndian.Uint32(rep[12:16]); typ != repAck {
		return fmt.Errorf("NBD_OPT_ABORT answered with reply type %#x, want ACK", typ)
	}
	return nil
}

// uri is the NBD URI of export name on this server's TCP listener.
func (s *server) uri(name string) string {
	return fmt.Sprintf("nbd://127.0.0.1:%d/%s", s.port, name)
}

// unixURI is the NBD URI of export name on this server's Unix socket.
func (s *server) unixURI(name string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", name, s.socket)
}

func (s *server) exitCode() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.code
}

// signal sends sig to the server and waits for it to exit; it returns the
// exit code (-1 for death by a signal). Calling it again after an exit
// returns the same code.
func (s *server) signal(sig os.Signal) (int, error) {
	select {
	case <-s.done:
		return s.exitCode(), nil
	default:
	}
	if err := s.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return 0, err
	}
	select {
	case <-s.done:
		return s.exitCode(), nil
	case <-time.After(stopTimeout):
		s.cmd.Process.Kill()
		<-s.done
		return s.exitCode(), fmt.Errorf("server still running %v after %v; killed it", stopTimeout, sig)
	}
}

func (s *server) stop() (int, error) { return s.signal(syscall.SIGTERM) }

// countLog counts the log lines containing substr.
func (s *server) countLog(substr string) int {
	return strings.Count(s.log.String(), substr)
}

// waitLog waits (bounded) for a log line containing substr: the server's
// output reaches us through a pipe, after the client may already have its
// answer.
func (s *server) waitLog(substr string, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for s.countLog(substr) == 0 {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// freePort finds a TCP port on 127.0.0.1 that is free right now.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// syncBuffer is a bytes.Buffer safe for a process's output and a reader.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// run runs a tool with a timeout and returns its combined output.
func run(t testing.TB, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	t.Logf("$ %s", shellLine(cmd.Args))
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("%s timed out after %v: %w", name, toolTimeout, err)
	}
	return string(out), err
}

// mustRun runs a tool and fails t unless it exits 0.
func mustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := run(t, name, args...)
	if err != nil {
		t.Fatalf("%s: %v\n%s", shellLine(append([]string{name}, args...)), err, out)
	}
	return out
}

func shellLine(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " '\"$&;|<>*?()[]{}\\") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		q[i] = a
	}
	return strings.Join(q, " ")
}

// fastDir is a directory on tmpfs when there is one, for big files.
func fastDir(t testing.TB) string {
	t.Helper()
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		dir, err := os.MkdirTemp("/dev/shm", "lvnbd-interop-")
		if err == nil {
			t.Cleanup(func() { os.RemoveAll(dir) })
			return dir
		}
	}
	return t.TempDir()
}

// sparseFile creates a file of size bytes with no data.
func sparseFile(t testing.TB, path string, size int64) string {
	t.Helper()
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

// randomBytes returns n reproducible pseudo-random bytes for seed.
func randomBytes(seed uint64, n int) []byte {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	p := make([]byte, n)
	rand.NewChaCha8(key).Read(p)
	return p
}

// randomFile writes size pseudo-random bytes to path.
func randomFile(t testing.TB, path string, size int64, seed uint64) string {
	t.Helper()
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.CopyN(f, rand.NewChaCha8(key), size); err != nil {
		t.Fatal(err)
	}
	return path
}

// writeAt writes p into the file at off.
func writeAt(t testing.TB, path string, p []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// readAt reads n bytes of the file at off.
func readAt(t testing.TB, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := make([]byte, n)
	if _, err := f.ReadAt(p, off); err != nil {
		t.Fatalf("reading %s [%d, +%d): %v", path, off, n, err)
	}
	return p
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// extent is a run of a file or export that is all data or all hole.
type extent struct {
	Off, Len int64
	Hole     bool
}

func (e extent) String() string {
	kind := "data"
	if e.Hole {
		kind = "hole"
	}
	return fmt.Sprintf("%s[%d,+%d)", kind, e.Off, e.Len)
}

// fileExtents maps a file's data and holes with SEEK_DATA and SEEK_HOLE.
func fileExtents(t testing.TB, path string) []extent {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	fd, end := int(f.Fd()), st.Size()
	var out []extent
	for off := int64(0); off < end; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			data = end
		} else if err != nil {
			t.Fatalf("SEEK_DATA in %s at %d: %v", path, off, err)
		}
		if data > off {
			out = append(out, extent{Off: off, Len: data - off, Hole: true})
			off = data
			continue
		}
		hole, err := unix.Seek(fd, off, unix.SEEK_HOLE)
		if err != nil {
			t.Fatalf("SEEK_HOLE in %s at %d: %v", path, off, err)
		}
		out = append(out, extent{Off: off, Len: hole - off})
		off = hole
	}
	return out
}

// isHole reports whether [off, off+n) lies entirely in holes of extents.
func isHole(extents []extent, off, n int64) bool {
	for _, e := range extents {
		if e.Off < off+n && off < e.Off+e.Len && !e.Hole {
			return false
		}
	}
	return true
}

// merge joins adjacent extents of the same kind.
func merge(in []extent) []extent {
	var out []extent
	for _, e := range in {
		if n := len(out); n > 0 && out[n-1].Hole == e.Hole && out[n-1].Off+out[n-1].Len == e.Off {
			out[n-1].Len += e.Len
			continue
		}
		out = append(out, e)
	}
	return out
}

// nbdinfoJSON runs `nbdinfo --json ARGS...` and decodes its exports, each as
// a map of field name to value.
func nbdinfoJSON(t testing.TB, args ...string) []map[string]any {
	t.Helper()
	out := mustRun(t, "nbdinfo", append([]string{"--json"}, args...)...)
	var doc struct {
		Exports []map[string]any `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("decoding nbdinfo --json output: %v\n%s", err, out)
	}
	return doc.Exports
}

// nbdinfoMap runs `nbdinfo --map --json URI` and returns the export's
// extents, merged, with the NBD base:allocation type of each hole.
func nbdinfoMap(t testing.TB, uri string) []extent {
	t.Helper()
	out := mustRun(t, "nbdinfo", "--map", "--json", uri)
	var entries []struct {
		Offset int64  `json:"offset"`
		Length int64  `json:"length"`
		Type   uint32 `json:"type"`
	}
	if err := json.Unmarshal([]byte(out), &entries); err != nil {
		t.Fatalf("decoding nbdinfo --map --json output: %v\n%s", err, out)
	}
	const stateHole, stateZero = 1, 2
	var ext []extent
	for _, e := range entries {
		hole := e.Type&stateHole != 0
		if hole && e.Type&stateZero == 0 {
			t.Errorf("extent [%d,+%d) is a hole that does not read as zero (type %d)", e.Offset, e.Length, e.Type)
		}
		ext = append(ext, extent{Off: e.Offset, Len: e.Length, Hole: hole})
	}
	return merge(ext)
}

// rawConn is a bare-bones NBD client for what no real client will send,
// such as a write to a read-only export: every real client refuses that
// before it reaches the server. It negotiates with NBD_OPT_EXPORT_NAME and
// uses simple replies only.
type rawConn struct {
	c      net.Conn
	handle uint64
}

// Command types and the simple reply magic from the NBD protocol.
const (
	rawCmdWrite       = 1
	rawCmdDisc        = 2
	rawCmdTrim        = 4
	rawCmdWriteZeroes = 6
	rawReplyMagic     = 0x67446698
	rawRequestMagic   = 0x25609513
)

func dialRaw(t testing.TB, addr, export string) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	var hello [18]byte
	if _, err := io.ReadFull(c, hello[:]); err != nil {
		t.Fatalf("reading greeting: %v", err)
	}
	const fixedNewstyle, noZeroes, optExportName = 1, 2, 1
	var req []byte
	req = binary.BigEndian.AppendUint32(req, fixedNewstyle|noZeroes)
	req = append(req, "IHAVEOPT"...)
	req = binary.BigEndian.AppendUint32(req, optExportName)
	req = binary.BigEndian.AppendUint32(req, uint32(len(export)))
	req = append(req, export...)
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	var info [10]byte // size, transmission flags
	if _, err := io.ReadFull(c, info[:]); err != nil {
		t.Fatalf("reading NBD_OPT_EXPORT_NAME reply: %v", err)
	}
	return &rawConn{c: c}
}

// do sends one request and returns the errno of its simple reply.
func (r *rawConn) do(t testing.TB, cmd uint16, off uint64, length uint32, payload []byte) uint32 {
	t.Helper()
	r.handle++
	var req []byte
	req = binary.BigEndian.AppendUint32(req, rawRequestMagic)
	req = binary.BigEndian.AppendUint16(req, 0) // flags
	req = binary.BigEndian.AppendUint16(req, cmd)
	req = binary.BigEndian.AppendUint64(req, r.handle)
	req = binary.BigEndian.AppendUint64(req, off)
	req = binary.BigEndian.AppendUint32(req, length)
	req = append(req, payload...)
	if _, err := r.c.Write(req); err != nil {
		t.Fatalf("sending request: %v", err)
	}
	var rep [16]byte
	if _, err := io.ReadFull(r.c, rep[:]); err != nil {
		t.Fatalf("reading reply: %v", err)
	}
	if m := binary.BigEndian.Uint32(rep[0:4]); m != rawReplyMagic {
		t.Fatalf("reply magic %#x, want the simple reply's %#x", m, rawReplyMagic)
	}
	if h := binary.BigEndian.Uint64(rep[8:16]); h != r.handle {
		t.Fatalf("reply handle %d, want %d", h, r.handle)
	}
	return binary.BigEndian.Uint32(rep[4:8])
}

func (r *rawConn) close(t testing.TB) {
	t.Helper()
	var req []byte
	req = binary.BigEndian.AppendUint32(req, rawRequestMagic)
	req = binary.BigEndian.AppendUint16(req, 0)
	req = binary.BigEndian.AppendUint16(req, rawCmdDisc)
	req = append(req, make([]byte, 20)...)
	r.c.Write(req)
	r.c.Close()
}
