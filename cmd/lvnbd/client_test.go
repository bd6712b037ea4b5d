package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/lvnbd/lvnbd/client/kernel"
	"github.com/lvnbd/lvnbd/client/pair"
	"github.com/lvnbd/lvnbd/config"
)

// quietNBD is a fakeNBD whose kernel reports no dead connections: its
// subscription stays open, and silent, until the context ends.
type quietNBD struct{ *fakeNBD }

func (k quietNBD) WatchLinkDead(ctx context.Context) (<-chan int, error) {
	ch := make(chan int)
	context.AfterFunc(ctx, func() { close(ch) })
	return ch, nil
}

// notifySocket listens where systemd.Notify sends, as systemd does, for the
// test's duration.
func notifySocket(t *testing.T) *net.UnixConn {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return c
}

// expectNotify reads the next notification and checks it is want.
func expectNotify(t *testing.T, c *net.UnixConn, want string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	b := make([]byte, 256)
	n, err := c.Read(b)
	if err != nil || string(b[:n]) != want {
		t.Fatalf("notification %q (%v), want %q", b[:n], err, want)
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func pairTOML(name, a, b string) string {
	return "[[pair]]\nname = \"" + name + "\"\na = \"" + a + "\"\nb = \"" + b + "\"\nconnections = 2\n"
}

func TestClientDaemon(t *testing.T) {
	dir := t.TempDir()
	uriA := "nbd://" + serveExport(t, "a", 8<<20, false) + "/a"
	uriB := "nbd://" + serveExport(t, "b", 8<<20, false) + "/b"
	uriC := "nbd://" + serveExport(t, "c", 4<<20, false) + "/c"
	uriD := "nbd://" + serveExport(t, "d", 4<<20, false) + "/d"
	conf := filepath.Join(dir, "client.toml")
	sock := filepath.Join(dir, "run", "client.sock")
	links := filepath.Join(dir, "links")
	writeFile(t, conf, pairTOML("vm1", uriA, uriB))
	notify := notifySocket(t)

	k := &fakeNBD{t: t}
	host := testHost(k, nil)
	host.openKernel = func(context.Context) (nbdKernel, error) { return quietNBD{k}, nil }
	cmd := newClientCmd(host)
	cmd.SetArgs([]string{"--config", conf, "--control", sock, "--link-dir", links, "--log-level", "error"})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	expectNotify(t, notify, "READY=1")

	// The legs attach at once: either may get either device.
	devA, _ := os.Readlink(filepath.Join(links, "vm1", "a"))
	devB, _ := os.Readlink(filepath.Join(links, "vm1", "b"))
	if devA+devB != "/dev/nbd0/dev/nbd1" && devA+devB != "/dev/nbd1/dev/nbd0" {
		t.Errorf("links to %q and %q, want /dev/nbd0 and /dev/nbd1", devA, devB)
	}
	out, _, err := runCmd(t, newPairCmd(), "status", "--control", sock)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"vm1   a    connected", devA + "  8.0 MiB  2      0           " + uriA} {
		if !strings.Contains(out, want) {
			t.Errorf("pair status lacks %q:\n%s", want, out)
		}
	}

	// Reload: pair vm1, taken down, stays down; the new pair vm2 comes up.
	if _, _, err := runCmd(t, newPairCmd(), "down", "--control", sock, "vm1"); err != nil {
		t.Fatal(err)
	}
	writeFile(t, conf, pairTOML("vm1", uriA, uriB)+pairTOML("vm2", uriC, uriD))
	syscall.Kill(os.Getpid(), syscall.SIGHUP)
	expectNotify(t, notify, "RELOADING=1")
	expectNotify(t, notify, "READY=1")
	out, _, err = runCmd(t, newPairCmd(), "status", "--json", "--control", sock)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"name":"vm1","up":false`, `"name":"vm2","up":true`, `"leg":"a","uri":"` + uriC} {
		if !strings.Contains(out, want) {
			t.Errorf("status after reload lacks %s:\n%s", want, out)
		}
	}

	// A broken file is not loaded: the running configuration stays.
	writeFile(t, conf, "[[pair]]\nname = 1\n")
	syscall.Kill(os.Getpid(), syscall.SIGHUP)
	expectNotify(t, notify, "RELOADING=1")
	expectNotify(t, notify, "READY=1")
	if out, _, err := runCmd(t, newPairCmd(), "status", "--control", sock, "vm2"); err != nil || !strings.Contains(out, "connected") {
		t.Errorf("status after a failed reload: %v\n%s", err, out)
	}

	// A pair removed from the file keeps its devices, but not its links:
	// lvnbd detach would refuse a device a pair's link leads to.
	vm2a, _ := os.Readlink(filepath.Join(links, "vm2", "a"))
	if vm2a == "" {
		t.Fatal("vm2 has no link a")
	}
	writeFile(t, conf, pairTOML("vm1", uriA, uriB))
	syscall.Kill(os.Getpid(), syscall.SIGHUP)
	expectNotify(t, notify, "RELOADING=1")
	expectNotify(t, notify, "READY=1")
	for _, leg := range []string{"a", "b"} {
		if target, err := os.Readlink(filepath.Join(links, "vm2", leg)); err == nil {
			t.Errorf("vm2, removed from the file, keeps its link %s -> %s", leg, target)
		}
	}
	if devs, err := k.Status(ctx, kernel.AnyDevice); err != nil || !slices.ContainsFunc(devs, func(d kernel.Device) bool { return d.Path() == vm2a && d.Running() }) {
		t.Errorf("vm2's device %s after its pair was removed: %v %v, want it still attached", vm2a, devs, err)
	}

	// Stopping detaches nothing more than pair down did.
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("lvnbd client: %v", err)
	}
	expectNotify(t, notify, "STOPPING=1")
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.disconnected) != 2 {
		t.Errorf("disconnected %v, want vm1's two devices", k.disconnected)
	}
	running := 0
	for _, d := range k.devs {
		if d.Running() {
			running++
		}
	}
	if running != 2 {
		t.Errorf("%d devices attached after the stop, want vm2's 2", running)
	}
}

func TestClientErrors(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.toml")
	writeFile(t, bad, "[[pair]]\nname = \"vm1\"\na = \"nbd://x/y\"\nb = \"nbd://x/y\"\n")
	k := &fakeNBD{t: t}
	tests := []struct {
		name    string
		args    []string
		kernel  error
		wantErr string
	}{
		{name: "missing file", args: []string{"--config", filepath.Join(dir, "none.toml")}, wantErr: "none.toml"},
		{name: "invalid pair", args: []string{"--config", bad}, wantErr: "pair[0].b"},
		{name: "no nbd module", args: []string{"--config", writeEmpty(t, dir)}, kernel: kernel.ErrModuleNotLoaded, wantErr: "modprobe nbd"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host := testHost(k, nil)
			if tt.kernel != nil {
				host.openKernel = func(context.Context) (nbdKernel, error) { return nil, tt.kernel }
			}
			args := append(tt.args, "--control", filepath.Join(t.TempDir(), "c.sock"), "--link-dir", t.TempDir())
			_, _, err := runCmd(t, newClientCmd(host), args...)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %v, want one with %q", err, tt.wantErr)
			}
		})
	}
}

func writeEmpty(t *testing.T, dir string) string {
	p := filepath.Join(dir, "empty.toml")
	writeFile(t, p, "")
	return p
}

func TestClientMetricsEndpoint(t *testing.T) {
	status := func() []pair.PairStatus {
		return []pair.PairStatus{{Name: "vm1", Up: true, Legs: []pair.LegStatus{{Leg: "a", State: pair.StateConnected, Reconnects: 3}}}}
	}
	core, logs := observer.New(zap.InfoLevel)
	stop, err := serveClientMetrics(context.Background(), "127.0.0.1:0", status, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	url, _ := logs.FilterMessage("metrics").All()[0].ContextMap()["url"].(string)
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`lvnbd_pair_leg_reconnects_total{leg="a",pair="vm1"} 3`, `lvnbd_pair_leg_state{leg="a",pair="vm1",state="connected"} 1`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

// A reload keeps down what was down, leg by leg, of the pairs it keeps.
func TestDownPairs(t *testing.T) {
	legs := func(a, b pair.State) []pair.LegStatus {
		return []pair.LegStatus{{Leg: "a", State: a}, {Leg: "b", State: b}}
	}
	now := []pair.PairStatus{
		{Name: "vm1", Up: true, Legs: legs(pair.StateConnected, pair.StateReconnecting)},
		{Name: "vm2", Legs: legs(pair.StateDown, pair.StateDown)},
		{Name: "vm3", Legs: legs(pair.StateConnected, pair.StateDown)},
		{Name: "vm4", Legs: legs(pair.StateDown, pair.StateFailed)},
		{Name: "gone", Legs: legs(pair.StateDown, pair.StateDown)},
	}
	next := &config.ClientConfig{Pairs: []config.Pair{{Name: "vm1"}, {Name: "vm2"}, {Name: "vm3"}, {Name: "vm4"}, {Name: "new"}}}
	got := downPairs(now, next)
	want := []string{"vm2/a", "vm2/b", "vm3/b", "vm4/a"}
	if !slices.Equal(got, want) {
		t.Errorf("downPairs = %q, want %q", got, want)
	}
}
