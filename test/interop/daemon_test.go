package interop

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Socket activation: systemd-socket-activate listens and passes the socket;
// lvnbd serve must use it (no --listen) and serve on it.
func TestSocketActivation(t *testing.T) {
	requireInterop(t, "systemd-socket-activate", "nbdinfo")
	img := sparseFile(t, filepath.Join(t.TempDir(), "sa.img"), 1<<20)
	port := freePort(t)
	log := &syncBuffer{}
	cmd := exec.Command("systemd-socket-activate", "-l", fmt.Sprintf("127.0.0.1:%d", port),
		lvnbdBin, "serve", "--control=", "--fence-file=", "--failure-file=", "--export", "sa="+img)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	// systemd-socket-activate binds after it starts: wait (bounded) until
	// the port takes connections. The probe is the first client lvnbd
	// sees, one that hangs up during the handshake.
	for deadline := time.Now().Add(10 * time.Second); ; {
		err := probe("tcp", fmt.Sprintf("127.0.0.1:%d", port), deadline)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the activation socket never served: %v\n%s", err, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
	uri := fmt.Sprintf("nbd://127.0.0.1:%d/sa", port)
	// The first connection starts lvnbd; nbdinfo waits for it.
	out, err := run(t, "nbdinfo", "--size", uri)
	if err != nil || strings.TrimSpace(out) != "1048576" {
		t.Fatalf("nbdinfo through the activated socket: %q %v\n%s", out, err, log)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(log.String(), "using the sockets systemd passed") {
		if time.Now().After(deadline) {
			t.Fatalf("lvnbd did not report the passed socket:\n%s", log)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// SIGHUP reloads the configuration file of the real binary: an export added
// to the file appears without a restart, and a broken file is refused with
// the server running on.
func TestReloadOnSIGHUP(t *testing.T) {
	requireInterop(t, "nbdinfo")
	dir := t.TempDir()
	a := sparseFile(t, filepath.Join(dir, "a.img"), 1<<20)
	b := sparseFile(t, filepath.Join(dir, "b.img"), 2<<20)
	conf := filepath.Join(dir, "server.toml")
	write := func(body string) {
		if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(fmt.Sprintf("[[export]]\nname = \"a\"\npath = %q\n", a))
	s := startServer(t, serverOpts{args: []string{"--config", conf}})
	if out, err := run(t, "nbdinfo", "--size", s.uri("b")); err == nil {
		t.Fatalf("b exported before it was configured: %s", out)
	}
	write(fmt.Sprintf("[[export]]\nname = \"a\"\npath = %q\n[[export]]\nname = \"b\"\npath = %q\n", a, b))
	s.cmd.Process.Signal(syscall.SIGHUP)
	if !s.waitLog("configuration reloaded", 10*time.Second) {
		t.Fatalf("no reload logged:\n%s", s.log)
	}
	if out := mustRun(t, "nbdinfo", "--size", s.uri("b")); strings.TrimSpace(out) != "2097152" {
		t.Fatalf("b after the reload: %q", out)
	}
	write("[[export]]\nname = \"a\"\npath = 42\nbogus = 1\n")
	s.cmd.Process.Signal(syscall.SIGHUP)
	if !s.waitLog("configuration rejected", 10*time.Second) {
		t.Fatalf("a broken file was not rejected:\n%s", s.log)
	}
	mustRun(t, "nbdinfo", "--size", s.uri("a"))
	mustRun(t, "nbdinfo", "--size", s.uri("b"))
}
