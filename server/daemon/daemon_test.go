package daemon

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/config"
	"github.com/lvnbd/lvnbd/control"
	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/volume"
	"github.com/lvnbd/lvnbd/volume/file"
)

func sparse(t *testing.T, name string, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

// configs hands Run the configuration of the moment; a nil one fails.
type configs struct {
	mu  sync.Mutex
	cur *config.Config
}

func (c *configs) set(cfg *config.Config) { c.mu.Lock(); c.cur = cfg; c.mu.Unlock() }
func (c *configs) load() (*config.Config, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur == nil {
		return nil, errors.New("bad configuration (test)")
	}
	return c.cur.Effective(), nil
}

// running is a daemon a test started, with the configuration it loads.
type running struct {
	cfgs     *configs
	reloads  chan struct{}
	reloaded chan error
	ctx      context.Context
	cancel   context.CancelFunc
	done     chan error
	level    zap.AtomicLevel
	logs     *observer.ObservedLogs
}

// startDaemon runs the daemon on cfg until stop.
func startDaemon(t *testing.T, cfg *config.Config) *running {
	r := &running{cfgs: &configs{}, reloads: make(chan struct{}, 1), reloaded: make(chan error, 1), done: make(chan error, 1),
		level: zap.NewAtomicLevel()}
	r.cfgs.set(cfg)
	r.ctx, r.cancel = context.WithCancel(context.Background())
	obs, logs := observer.New(zap.DebugLevel)
	r.logs = logs
	log := zap.New(zapcore.NewTee(zaptest.NewLogger(t).Core(), obs))
	go func() {
		r.done <- Run(r.ctx, Options{Load: r.cfgs.load, Log: log, Level: &r.level, Reload: r.reloads,
			Reloaded: func(err error) { r.reloaded <- err }})
	}()
	return r
}

// reload makes the daemon load cfg (nil fails) and returns the outcome.
func (r *running) reload(cfg *config.Config) error {
	r.cfgs.set(cfg)
	r.reloads <- struct{}{}
	return <-r.reloaded
}

// stop cancels the daemon and returns what Run returned.
func (r *running) stop() error {
	r.cancel()
	return <-r.done
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestReload(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "nbd.sock")
	base := func(exports ...config.Export) *config.Config {
		c := config.Default()
		c.Server.Listen = []string{"unix://" + sock}
		c.Server.Control = ""
		c.Server.FenceFile, c.Server.FailureFile = "", ""
		c.Server.Rescan = 0
		c.Exports = exports
		return c
	}
	a := config.Export{Name: "a", Path: sparse(t, "a.img", 1<<20)}
	b := config.Export{Name: "b", Path: sparse(t, "b.img", 1<<20)}
	c := config.Export{Name: "c", Path: sparse(t, "c.img", 2<<20)}
	d := startDaemon(t, base(a, b))
	ctx := d.ctx
	uri := func(name string) string { return "nbd+unix:///" + name + "?socket=" + sock }
	available := func(name string) bool {
		_, err := client.Info(ctx, uri(name), nil)
		return err == nil
	}
	waitFor(t, "the server", func() bool { return available("a") })

	conn, err := client.Dial(ctx, uri("a"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.WriteAt(ctx, []byte("before"), 0, 0); err != nil {
		t.Fatal(err)
	}

	// b goes, c comes, a stays: a's client keeps its connection.
	if err := d.reload(base(a, c)); err != nil {
		t.Fatal(err)
	}
	if !available("c") || available("b") {
		t.Fatal("after the reload: want c and not b")
	}
	if err := conn.WriteAt(ctx, []byte("after"), 4096, 0); err != nil {
		t.Fatalf("a's connection did not survive the reload: %v", err)
	}

	// A bad configuration is rejected; the running one stays.
	if err := d.reload(nil); err == nil {
		t.Fatal("a bad configuration was accepted")
	}
	if !available("a") || !available("c") {
		t.Fatal("a rejected reload changed the exports")
	}

	// An export whose file changed is replaced: new connections see the
	// new file; the old connection is drained.
	c2 := c
	c2.Path = sparse(t, "c2.img", 3<<20)
	if err := d.reload(base(a, c2)); err != nil {
		t.Fatal(err)
	}
	if info, err := client.Info(ctx, uri("c"), nil); err != nil || info.Size != 3<<20 {
		t.Fatalf("c after replacing its file: %+v %v", info, err)
	}
	if err := conn.WriteAt(ctx, []byte("still"), 8192, 0); err != nil {
		t.Fatalf("a's connection did not survive c's replacement: %v", err)
	}

	if err := d.stop(); err != nil {
		t.Fatalf("Run returned %v, want nil on cancellation", err)
	}
}

func TestMetricsEndpoint(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "nbd.sock")
	cfg := config.Default()
	cfg.Server.Listen = []string{"unix://" + sock}
	cfg.Server.Control, cfg.Server.FenceFile, cfg.Server.FailureFile, cfg.Server.Rescan = "", "", "", 0
	cfg.Exports = []config.Export{{Name: "m", Path: sparse(t, "m.img", 1<<20)}}
	cfg.Metrics.Listen = "127.0.0.1:0"
	cfgs := &configs{}
	cfgs.set(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	log := zaptest.NewLogger(t)
	obs, logs := observer.New(zap.InfoLevel)
	go func() { done <- Run(ctx, Options{Load: cfgs.load, Log: zap.New(zapcore.NewTee(log.Core(), obs))}) }()
	defer func() { cancel(); <-done }()
	var url string
	waitFor(t, "the metrics endpoint", func() bool {
		for _, e := range logs.FilterMessage("metrics").All() {
			url = e.ContextMap()["url"].(string)
		}
		return url != ""
	})
	uri := "nbd+unix:///m?socket=" + sock
	waitFor(t, "the server", func() bool { _, err := client.Info(ctx, uri, nil); return err == nil })
	conn, err := client.Dial(ctx, uri, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := conn.WriteAt(ctx, make([]byte, 4096), 0, 0); err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	conn.Close()
	for _, want := range []string{`lvnbd_request_bytes_total{command="write",export="m"} 4096`, `lvnbd_connections{export="m"} 1`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s\n%s", want, body)
		}
	}
}

// An export recorded as failed before a restart stays failed; lvnbd recover
// serves it again, and the recovered static export is the one later reloads
// change (the daemon finds it in the registry, not from before).
func TestFailedExportAcrossRestartAndRecover(t *testing.T) {
	dir := t.TempDir()
	sock, ctl := filepath.Join(dir, "nbd.sock"), filepath.Join(dir, "control.sock")
	failures := filepath.Join(dir, "state", "failures.json")
	rec := `[{"export":"a","description":"a.img","error":"fdatasync a.img: input/output error","errno":5,"since":"2026-12-01T00:00:00Z"}]`
	if err := os.MkdirAll(filepath.Dir(failures), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(failures, []byte(rec), 0o600); err != nil {
		t.Fatal(err)
	}
	a := config.Export{Name: "a", Path: sparse(t, "a.img", 1<<20)}
	b := config.Export{Name: "b", Path: sparse(t, "b.img", 1<<20)}
	base := func(exports ...config.Export) *config.Config {
		c := config.Default()
		c.Server.Listen = []string{"unix://" + sock}
		c.Server.Control, c.Server.FenceFile, c.Server.FailureFile, c.Server.Rescan = ctl, "", failures, 0
		c.Exports = exports
		return c
	}
	d := startDaemon(t, base(a, b))
	defer func() {
		if err := d.stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	ctx := d.ctx
	uri := func(name string) string { return "nbd+unix:///" + name + "?socket=" + sock }
	waitFor(t, "the server", func() bool { _, err := client.Info(ctx, uri("b"), nil); return err == nil })
	dial := func() *client.Conn {
		t.Helper()
		conn, err := client.Dial(ctx, uri("a"), nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	buf := make([]byte, 4096)
	failed := dial()
	if err := failed.ReadAt(ctx, buf, 0); err == nil {
		t.Fatal("a read of an export recorded as failed succeeded after the restart")
	}
	waitFor(t, "the control socket", func() bool { _, err := os.Stat(ctl); return err == nil })
	res, err := control.NewClient(ctl).Recover(ctx, "a")
	if err != nil || !res.Reopened || res.ClientsCut != 1 {
		t.Fatalf("Recover: %+v, %v; want a reopened and its one client cut", res, err)
	}
	recovered := dial()
	if err := recovered.WriteAt(ctx, []byte("works"), 0, nbd.CmdFlagFUA); err != nil {
		t.Fatalf("a write to the recovered export: %v", err)
	}
	if got, _ := os.ReadFile(failures); strings.Contains(string(got), `"a"`) {
		t.Errorf("the failure file still records a: %s", got)
	}

	// a is withdrawn: the recovered export's client is drained.
	if err := d.reload(base(b)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the recovered export's client to be drained", func() bool {
		return recovered.ReadAt(ctx, buf, 0) != nil
	})
}

// fileVolumes makes file volumes of 1 MiB, named names, in dir/volumes and
// returns their driver and directory.
func fileVolumes(t *testing.T, dir string, names ...string) (*file.Driver, string) {
	t.Helper()
	data := filepath.Join(dir, "volumes")
	drv, err := file.New(data)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		if _, err := drv.Create(context.Background(), volume.CreateOptions{Name: name, Size: 1 << 20}); err != nil {
			t.Fatal(err)
		}
	}
	return drv, data
}

// TestStartsBesideAnUnreadableVolume: a volume the driver cannot read (its
// file deleted by hand) is not exported, and the daemon serves every other;
// only volumes that cannot be listed at all keep it from starting.
func TestStartsBesideAnUnreadableVolume(t *testing.T) {
	dir := t.TempDir()
	drv, data := fileVolumes(t, dir, "ok", "gone")
	ctx := context.Background()
	if err := os.Remove(drv.Path("gone")); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "nbd.sock")
	cfg := testConfig(sock)
	cfg.Server.Volumes = "file://" + data
	d := startDaemon(t, cfg)
	uri := func(name string) string { return "nbd+unix:///" + name + "?socket=" + sock }
	waitFor(t, "the server", func() bool { _, err := client.Info(ctx, uri("ok"), nil); return err == nil })
	if _, err := client.Info(ctx, uri("gone"), nil); err == nil {
		t.Error("gone is exported though its file is gone")
	}
	if err := d.stop(); err != nil {
		t.Errorf("Run: %v", err)
	}

	if err := os.WriteFile(filepath.Join(data, "lvnbd.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	d = startDaemon(t, cfg)
	defer d.cancel()
	if err := <-d.done; !errors.Is(err, server.ErrListingVolumes) {
		t.Errorf("Run with volumes that cannot be listed: %v, want ErrListingVolumes", err)
	}
}

// testConfig is a configuration serving exports on the unix socket sock, with
// nothing else that would reach outside the test.
func testConfig(sock string, exports ...config.Export) *config.Config {
	c := config.Default()
	c.Server.Listen = []string{"unix://" + sock}
	c.Server.Control, c.Server.FenceFile, c.Server.FailureFile, c.Server.Rescan = "", "", "", 0
	c.Exports = exports
	return c
}

// TestRejectedReloadChangesNothing: a reload rejected because of one export
// changes nothing of what runs, not the access rules, exports or log level
// it would have changed before the problem was found.
func TestRejectedReloadChangesNothing(t *testing.T) {
	t.Run("export that cannot be opened", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "nbd.sock")
		a := config.Export{Name: "a", Path: sparse(t, "a.img", 1<<20)}
		d := startDaemon(t, testConfig(sock, a))
		defer d.stop()
		uri := "nbd+unix:///a?socket=" + sock
		waitFor(t, "the server", func() bool { _, err := client.Info(d.ctx, uri, nil); return err == nil })

		tlsOnly := a
		tlsOnly.TLS = "required"
		z := config.Export{Name: "z", Path: filepath.Join(t.TempDir(), "missing.img")}
		cfg := testConfig(sock, tlsOnly, z)
		cfg.Log.Level = "error"
		if err := d.reload(cfg); err == nil {
			t.Fatal("a reload with an export whose file is missing was accepted")
		}
		if _, err := client.Info(d.ctx, uri, nil); err != nil {
			t.Errorf("a plain client of a after the rejected reload: %v; want served as before", err)
		}
		if got := d.level.Level(); got != zapcore.InfoLevel {
			t.Errorf("log level after the rejected reload: %v, want info", got)
		}
	})
	t.Run("name of a volume export", func(t *testing.T) {
		dir := t.TempDir()
		data := filepath.Join(dir, "volumes")
		drv, err := file.New(data)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := drv.Create(context.Background(), volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
			t.Fatal(err)
		}
		sock := filepath.Join(dir, "nbd.sock")
		golden := config.Export{Name: "golden", Path: sparse(t, "golden.img", 1<<20)}
		cfg := testConfig(sock, golden)
		cfg.Server.Volumes = "file://" + data
		d := startDaemon(t, cfg)
		defer d.stop()
		ctx := d.ctx
		uri := func(name string) string { return "nbd+unix:///" + name + "?socket=" + sock }
		waitFor(t, "the server", func() bool { _, err := client.Info(ctx, uri("golden"), nil); return err == nil })
		conn, err := client.Dial(ctx, uri("golden"), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()

		moved := golden
		moved.Path = sparse(t, "golden2.img", 2<<20)
		clash := config.Export{Name: "vm1", Path: sparse(t, "vm1.img", 1<<20)}
		next := testConfig(sock, moved, clash)
		next.Server.Volumes = cfg.Server.Volumes
		err = d.reload(next)
		if !errors.Is(err, server.ErrExportExists) {
			t.Fatalf("a reload with a static export named as a volume: %v, want ErrExportExists", err)
		}
		if info, err := client.Info(ctx, uri("golden"), nil); err != nil || info.Size != 1<<20 {
			t.Errorf("golden after the rejected reload: %+v, %v; want its old file, of 1MiB", info, err)
		}
		if err := conn.WriteAt(ctx, []byte("still"), 0, 0); err != nil {
			t.Errorf("golden's client after the rejected reload: %v; want it kept", err)
		}
		if info, err := client.Info(ctx, uri("vm1"), nil); err != nil || info.Description == clash.Path {
			t.Errorf("vm1 after the rejected reload: %+v, %v; want the volume", info, err)
		}
	})
}

// TestStartsWithoutAnExportThatCannotBeOpened: an export whose file cannot
// be opened at start-up is logged and left out, the others are served, and
// a reload that can open it adds it; a mistake in the configuration still
// keeps the server from starting.
func TestStartsWithoutAnExportThatCannotBeOpened(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "nbd.sock")
	a := config.Export{Name: "a", Path: sparse(t, "a.img", 1<<20)}
	z := config.Export{Name: "z", Path: filepath.Join(dir, "z.img")}
	d := startDaemon(t, testConfig(sock, a, z))
	defer d.stop()
	ctx := d.ctx
	uri := func(name string) string { return "nbd+unix:///" + name + "?socket=" + sock }
	waitFor(t, "the server", func() bool { _, err := client.Info(ctx, uri("a"), nil); return err == nil })
	if _, err := client.Info(ctx, uri("z"), nil); err == nil {
		t.Error("z is served though its file is missing")
	}
	logged := func() int {
		n := 0
		for _, e := range d.logs.FilterLevelExact(zapcore.ErrorLevel).All() {
			if m := e.ContextMap(); m["export"] == "z" && m["path"] == z.Path {
				n++
			}
		}
		return n
	}
	if logged() != 1 {
		t.Errorf("want one error naming z and its path, got %d", logged())
	}

	// Still missing, and configured the same: the reload is no new mistake.
	if err := d.reload(testConfig(sock, a, z)); err != nil {
		t.Fatalf("a reload with z still missing: %v", err)
	}
	if logged() != 2 {
		t.Errorf("after the reload, want z logged again, got %d errors naming it", logged())
	}
	if err := os.WriteFile(z.Path, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := d.reload(testConfig(sock, a, z)); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Info(ctx, uri("z"), nil); err != nil {
		t.Errorf("z after a reload that can open it: %v", err)
	}

	for _, tc := range []struct {
		name    string
		exports []config.Export
	}{
		{"duplicate name", []config.Export{a, {Name: "a", Path: filepath.Join(dir, "missing.img")}}},
		{"invalid name", []config.Export{{Name: "-a", Path: a.Path}}},
		{"bad access", []config.Export{{Name: "b", Path: a.Path, Access: config.Access{TLS: "sometimes"}}}},
		{"bad access, missing file", []config.Export{{Name: "b", Path: filepath.Join(dir, "missing.img"), Access: config.Access{Allow: []string{"not an address"}}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := startDaemon(t, testConfig(filepath.Join(t.TempDir(), "nbd.sock"), tc.exports...))
			defer d.cancel()
			select {
			case err := <-d.done:
				if err == nil {
					t.Error("Run returned nil, want the configuration refused")
				}
			case <-time.After(20 * time.Second):
				t.Error("the server started with a mistake in its configuration")
			}
		})
	}
}

// TestVolumeNeverTakesAStaticExportsName: a static export whose file cannot
// be opened at start-up is left out, but its name stays its own: a volume of
// that name would be served to the static export's clients, and no volume
// ID would tell them. Once the file is there, a reload serves it.
func TestVolumeNeverTakesAStaticExportsName(t *testing.T) {
	dir := t.TempDir()
	_, data := fileVolumes(t, dir, "vm1")
	ctx := context.Background()
	sock := filepath.Join(dir, "nbd.sock")
	static := config.Export{Name: "vm1", Path: filepath.Join(dir, "vm1-device.img")} // missing at start-up
	other := config.Export{Name: "other", Path: sparse(t, "other.img", 1<<20)}
	withVolumes := func() *config.Config {
		c := testConfig(sock, static, other)
		c.Server.Volumes = "file://" + data
		return c
	}
	d := startDaemon(t, withVolumes())
	defer func() {
		if err := d.stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	uri := func(name string) string { return "nbd+unix:///" + name + "?socket=" + sock }
	waitFor(t, "the server", func() bool { _, err := client.Info(ctx, uri("other"), nil); return err == nil })
	if info, err := client.Info(ctx, uri("vm1"), nil); err == nil {
		t.Errorf("vm1 is served as %q while its static export's file is missing, want not served", info.Description)
	}
	if err := os.WriteFile(static.Path, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := d.reload(withVolumes()); err != nil {
		t.Fatalf("reload once the file is there: %v", err)
	}
	info, err := client.Info(ctx, uri("vm1"), nil)
	if err != nil || strings.Contains(info.Description, "volume") {
		t.Errorf("vm1 after the reload: %q, %v; want the static export", info.Description, err)
	}
}

// Two servers with their own failure files in one directory keep their own
// shrink files.
func TestShrinkFile(t *testing.T) {
	for _, tc := range []struct{ failures, want string }{
		{"/var/lib/lvnbd/failures.json", "/var/lib/lvnbd/shrinks.json"},
		{"/var/lib/lvnbd/vg1-failures.json", "/var/lib/lvnbd/vg1-failures-shrinks.json"},
		{"/srv/state/vg2", "/srv/state/vg2-shrinks.json"},
		{"failures.json", "shrinks.json"},
	} {
		if got := shrinkFile(tc.failures); got != tc.want {
			t.Errorf("shrinkFile(%q) = %q, want %q", tc.failures, got, tc.want)
		}
	}
}
