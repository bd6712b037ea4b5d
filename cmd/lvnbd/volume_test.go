package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/control"
	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/volume"
	"github.com/lvnbd/lvnbd/volume/file"
)

// volumeCLI runs lvnbd commands against file volumes in a fresh directory,
// with a control socket path where no server listens.
type volumeCLI struct {
	t   testing.TB
	dir string
}

func newVolumeCLI(t testing.TB) *volumeCLI {
	return &volumeCLI{t: t, dir: filepath.Join(t.TempDir(), "volumes")}
}

// run runs `lvnbd GROUP --volumes file://DIR --control DIR/none.sock ARGS...`.
func (c *volumeCLI) run(args ...string) (stdout string, err error) {
	c.t.Helper()
	// The group's flags go right after it, before any "--".
	full := append([]string{args[0], "--volumes", "file://" + c.dir, "--control", filepath.Join(c.dir, "none.sock")}, args[1:]...)
	return runVolumeCommand(c.t, full...)
}

// ok runs a command that must succeed.
func (c *volumeCLI) ok(args ...string) string {
	c.t.Helper()
	out, err := c.run(args...)
	if err != nil {
		c.t.Fatalf("lvnbd %s: %v", strings.Join(args, " "), err)
	}
	return out
}

func runVolumeCommand(t testing.TB, args ...string) (string, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	root := newRootCmd(&stdout, &stderr)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return stdout.String(), err
}

func (c *volumeCLI) listJSON() []volume.Volume {
	c.t.Helper()
	var got struct {
		Volumes []volume.Volume `json:"volumes"`
	}
	if err := json.Unmarshal([]byte(c.ok("volume", "list", "--json")), &got); err != nil {
		c.t.Fatal(err)
	}
	return got.Volumes
}

func TestVolumeCreateAndList(t *testing.T) {
	c := newVolumeCLI(t)
	out := c.ok("volume", "create", "vm1", "--size", "10G", "--stripes", "2", "--stripe-size", "128K")
	path := filepath.Join(c.dir, "vm1.img")
	if want := "created volume vm1: 10 GiB (10737418240 bytes), 2 stripes of 128 KiB, at " + path + "\n"; out != want {
		t.Errorf("create printed %q, want %q", out, want)
	}
	c.ok("volume", "create", "db", "--size", "512MiB")

	want := []volume.Volume{
		{Name: "db", Size: 512 << 20, Stripes: 1, Path: filepath.Join(c.dir, "db.img"), Snapshots: []volume.Snapshot{}},
		{Name: "vm1", Size: 10 << 30, Stripes: 2, StripeSize: 128 << 10, Path: path, Snapshots: []volume.Snapshot{}},
	}
	got := c.listJSON()
	if diff := cmp.Diff(want, got, cmpopts.IgnoreFields(volume.Volume{}, "ID")); diff != "" {
		t.Errorf("volume list --json (-want +got):\n%s", diff)
	}
	if len(got) == 2 && (got[0].ID == "" || got[0].ID == got[1].ID) {
		t.Errorf("volume list --json: IDs %q and %q, want two, and different", got[0].ID, got[1].ID)
	}

	table := c.ok("volume", "list")
	for _, want := range []string{"NAME", "BYTES", "db", "512 MiB", "536870912", "vm1", "10 GiB", "10737418240", "2x128 KiB"} {
		if !strings.Contains(table, want) {
			t.Errorf("volume list does not show %q:\n%s", want, table)
		}
	}
}

// TestVolumeListShowsUnreadable: a volume and a snapshot whose files were
// deleted by hand are listed, marked, with the reason and what to do; the
// rest are listed as ever.
func TestVolumeListShowsUnreadable(t *testing.T) {
	c := newVolumeCLI(t)
	c.ok("volume", "create", "gone", "--size", "1M")
	c.ok("volume", "create", "vm1", "--size", "1M")
	c.ok("snapshot", "create", "vm1@s1")
	for _, name := range []string{"gone.img", "vm1@s1.img"} {
		if err := os.Remove(filepath.Join(c.dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	got := c.listJSON()
	if len(got) != 2 || !strings.Contains(got[0].Problem, "file is gone") || got[1].Problem != "" ||
		len(got[1].Snapshots) != 1 || got[1].Snapshots[0].Problem == "" {
		t.Errorf("volume list --json = %+v, want gone and vm1@s1 with their problems", got)
	}
	table := c.ok("volume", "list")
	for _, want := range []string{"gone (unreadable)", "volume gone cannot be read: its file is gone", "lvnbd volume remove gone forgets it",
		"snapshot vm1@s1 cannot be read", "lvnbd snapshot remove vm1@s1 forgets it", "leaves its export as it is"} {
		if !strings.Contains(table, want) {
			t.Errorf("volume list does not say %q:\n%s", want, table)
		}
	}
	if snaps := c.ok("snapshot", "list"); !strings.Contains(snaps, "UNREADABLE: its file is gone") {
		t.Errorf("snapshot list does not mark vm1@s1 unreadable:\n%s", snaps)
	}
	c.ok("snapshot", "remove", "vm1@s1")
	c.ok("volume", "remove", "gone")
	if got := c.listJSON(); len(got) != 1 || got[0].Name != "vm1" || got[0].Problem != "" {
		t.Errorf("volume list --json after removing both = %+v, want vm1 alone", got)
	}
}

func TestVolumeCreateErrors(t *testing.T) {
	c := newVolumeCLI(t)
	c.ok("volume", "create", "vm1", "--size", "1G")
	tests := []struct {
		args []string
		is   error
		text string
	}{
		{[]string{"volume", "create", "-x", "--size", "1G"}, nil, "unknown shorthand flag"},
		{[]string{"volume", "create", "--size", "1G", "--", "-x"}, volume.ErrInvalidName, "must not start with - or ."},
		{[]string{"volume", "create", "vm/2", "--size", "1G"}, volume.ErrInvalidName, "only letters, digits and . _ - are allowed"},
		{[]string{"volume", "create", "vm@2", "--size", "1G"}, volume.ErrInvalidName, "vm@2"},
		{[]string{"volume", "create", strings.Repeat("v", 65), "--size", "1G"}, volume.ErrInvalidName, "longer than 64"},
		{[]string{"volume", "create", "vm2"}, nil, `required flag(s) "size" not set`},
		{[]string{"volume", "create", "vm2", "--size", "10X"}, volume.ErrInvalidSize, "--size"},
		{[]string{"volume", "create", "vm2", "--size", "0"}, volume.ErrInvalidSize, "more than zero"},
		{[]string{"volume", "create", "vm2", "--size", "1G", "--stripes", "2", "--stripe-size", "48K"}, volume.ErrInvalidSize, "power of two"},
		{[]string{"volume", "create", "vm1", "--size", "1G"}, volume.ErrExists, "volume vm1 already exists"},
		{[]string{"volume", "create", "a", "b", "--size", "1G"}, nil, "accepts 1 arg(s)"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			_, err := c.run(tt.args...)
			if err == nil || (tt.is != nil && !errors.Is(err, tt.is)) || !strings.Contains(err.Error(), tt.text) {
				t.Errorf("error = %v, want %v saying %q", err, tt.is, tt.text)
			}
		})
	}
	if vols := c.listJSON(); len(vols) != 1 {
		t.Errorf("failed creates left volumes behind: %+v", vols)
	}
}

func TestVolumeResize(t *testing.T) {
	c := newVolumeCLI(t)
	c.ok("volume", "create", "vm1", "--size", "10G")
	tests := []struct {
		args []string
		out  string // part of the output; "" for an error
		err  string
		size int64
	}{
		{[]string{"--size", "+5G"}, "resized volume vm1 from 10 GiB to 15 GiB (16106127360 bytes)", "", 15 << 30},
		{[]string{"--size", "20G"}, "resized volume vm1 from 15 GiB to 20 GiB", "", 20 << 30},
		{[]string{"--size", "20G"}, "volume vm1 is already 20 GiB", "", 20 << 30},
		{[]string{"--size", "10G"}, "", "shrinking vm1 from 20 GiB to 10 GiB discards the last 10 GiB; if the guest no longer uses that space, add --allow-shrink", 20 << 30},
		{[]string{"--size", "-5G"}, "", "shrinking vm1 from 20 GiB to 15 GiB discards the last 5 GiB", 20 << 30},
		{[]string{"--size", "10G", "--allow-shrink"}, "shrinking vm1 from 20 GiB to 10 GiB discards the last 10 GiB\nresized volume vm1 from 20 GiB to 10 GiB", "", 10 << 30},
		{[]string{"--size=-2G", "--allow-shrink"}, "resized volume vm1 from 10 GiB to 8 GiB", "", 8 << 30},
		{[]string{"--size", "-8G", "--allow-shrink"}, "", "the volume is only 8 GiB", 8 << 30},
		{[]string{"--size", "+lots"}, "", "want +SIZE or -SIZE", 8 << 30},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			out, err := c.run(append([]string{"volume", "resize", "vm1"}, tt.args...)...)
			switch {
			case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
				t.Errorf("error = %v, want one saying %q", err, tt.err)
			case tt.err == "" && err != nil:
				t.Errorf("error = %v", err)
			case tt.err == "" && !strings.Contains(out, tt.out):
				t.Errorf("printed %q, want %q", out, tt.out)
			}
			if v := c.listJSON(); len(v) != 1 || v[0].Size != tt.size {
				t.Errorf("after: %+v, want size %d", v, tt.size)
			}
		})
	}
	if _, err := c.run("volume", "resize", "nope", "--size", "1G"); !errors.Is(err, volume.ErrNotFound) {
		t.Errorf("resize of a missing volume: %v", err)
	}
}

func TestVolumeRemove(t *testing.T) {
	c := newVolumeCLI(t)
	c.ok("volume", "create", "vm1", "--size", "1G")
	c.ok("snapshot", "create", "vm1@s1")
	_, err := c.run("volume", "remove", "vm1")
	if !errors.Is(err, volume.ErrHasSnapshots) || !strings.Contains(err.Error(), "vm1@s1") {
		t.Errorf("remove with a snapshot: %v", err)
	}
	c.ok("snapshot", "remove", "vm1@s1")
	if out := c.ok("volume", "remove", "vm1"); out != "removed volume vm1\n" {
		t.Errorf("remove printed %q", out)
	}
	if out := c.ok("volume", "list"); !strings.HasPrefix(out, "no volumes in file://") {
		t.Errorf("list of nothing printed %q", out)
	}
	if got := c.ok("volume", "list", "--json"); got != "{\n  \"volumes\": []\n}\n" {
		t.Errorf("list --json of nothing printed %q", got)
	}
	if _, err := c.run("volume", "remove", "vm1"); !errors.Is(err, volume.ErrNotFound) {
		t.Errorf("second remove: %v", err)
	}
}

func TestVolumesURL(t *testing.T) {
	t.Chdir(t.TempDir())
	none := filepath.Join(t.TempDir(), "none.sock")
	if _, err := runVolumeCommand(t, "volume", "create", "vm1", "--size", "1M", "--control", none); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join("lvnbd-data", "vm1.img")); err != nil {
		t.Errorf("the default --volumes is not ./lvnbd-data: %v", err)
	}
	_, err := runVolumeCommand(t, "volume", "list", "--volumes", "s3://bucket", "--control", none)
	if !errors.Is(err, volume.ErrUnsupported) || !strings.Contains(err.Error(), "lvm://") {
		t.Errorf("--volumes s3://bucket: %v, want the schemes there are", err)
	}
	_, err = runVolumeCommand(t, "volume", "list", "--volumes", "file://data", "--control", none)
	if err == nil || !strings.Contains(err.Error(), "file://./data") {
		t.Errorf("--volumes file://data: %v, want a hint at file://./data", err)
	}
}

// volumeServer serves file volumes in a new directory through a control
// socket and over NBD on loopback, until the test ends.
type volumeServer struct {
	dir, sock, nbd string
	reg            *server.Registry
}

func startVolumeServer(t *testing.T) *volumeServer {
	t.Helper()
	vs := &volumeServer{dir: filepath.Join(t.TempDir(), "volumes"), reg: server.NewRegistry()}
	drv, err := file.New(vs.dir)
	if err != nil {
		t.Fatal(err)
	}
	vols := server.NewVolumes(drv, vs.reg, nil)
	vs.sock, vs.nbd = serveWithControl(t, server.New(&server.Config{Exports: vs.reg}), vols)
	return vs
}

// serveWithControl runs srv over NBD on loopback and its control socket
// (with vols, which may be nil) until the test ends, and returns the
// socket's path and the NBD URI of the server.
func serveWithControl(t *testing.T, srv *server.Server, vols *server.Volumes) (sock, nbd string) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "control.sock")
	cln, err := control.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	nln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 2)
	go func() { done <- control.Serve(ctx, cln, control.Handler(srv, vols, nil)) }()
	go func() { done <- srv.Serve(ctx, nln) }()
	t.Cleanup(func() {
		cancel()
		for range 2 {
			if err := <-done; err != nil {
				t.Error(err)
			}
		}
	})
	return sock, "nbd://" + nln.Addr().String()
}

// run runs an lvnbd volume or snapshot command against the server.
func (vs *volumeServer) run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	return runVolumeCommand(t, append([]string{args[0], "--volumes", "file://" + vs.dir, "--control", vs.sock}, args[1:]...)...)
}

// TestVolumeCommandsThroughServer runs the commands while a server exports
// the same volumes: they go through its control socket, and its exports
// follow at once.
func TestVolumeCommandsThroughServer(t *testing.T) {
	vs := startVolumeServer(t)
	reg := vs.reg
	run := func(args ...string) string {
		t.Helper()
		out, err := vs.run(t, args...)
		if err != nil {
			t.Fatalf("lvnbd %s: %v", strings.Join(args, " "), err)
		}
		return out
	}
	exportSize := func(name string) int64 {
		t.Helper()
		e, ok := reg.Lookup(name)
		if !ok {
			return -1
		}
		return e.Backend.Size()
	}

	run("volume", "create", "vm1", "--size", "1M")
	if got := exportSize("vm1"); got != 1<<20 {
		t.Errorf("export vm1 after create: size %d, want 1 MiB", got)
	}
	run("volume", "resize", "vm1", "--size", "+1M")
	if got := exportSize("vm1"); got != 2<<20 {
		t.Errorf("export vm1 after resize: size %d, want 2 MiB", got)
	}
	run("snapshot", "create", "vm1@s")
	if e, ok := reg.Lookup("vm1@s"); !ok || !e.ReadOnly {
		t.Errorf("snapshot vm1@s is not exported read-only")
	}
	run("snapshot", "merge", "vm1@s")
	if _, ok := reg.Lookup("vm1@s"); ok {
		t.Errorf("vm1@s still exported after its merge")
	}
	run("volume", "remove", "vm1")
	if _, ok := reg.Lookup("vm1"); ok {
		t.Errorf("vm1 still exported after its removal")
	}
}

// TestVolumeShrinkInUseThroughServer: a running server refuses to shrink a
// volume a client is connected to, and --force disconnects the client.
func TestVolumeShrinkInUseThroughServer(t *testing.T) {
	vs := startVolumeServer(t)
	reg := vs.reg
	ctx := context.Background()
	run := func(args ...string) (string, error) { return vs.run(t, args...) }
	if _, err := run("volume", "create", "vm1", "--size", "2M"); err != nil {
		t.Fatal(err)
	}
	c, err := client.Dial(ctx, vs.nbd+"/vm1", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	_, err = run("volume", "resize", "vm1", "--size", "1M", "--allow-shrink")
	if !errors.Is(err, server.ErrInUse) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("shrink with a client: %v, want ErrInUse suggesting --force", err)
	}
	if _, err := run("volume", "resize", "vm1", "--size", "1M", "--allow-shrink", "--force"); err != nil {
		t.Fatalf("forced shrink: %v", err)
	}
	if e, ok := reg.Lookup("vm1"); !ok || e.Backend.Size() != 1<<20 {
		t.Fatalf("vm1 after the forced shrink: exported %v, want 1 MiB", ok)
	}
	if err := c.Flush(ctx); err == nil {
		t.Error("the client still works after the forced shrink disconnected it")
	}
}

// A change made without a server says so, since a server on another
// control socket would be bypassed (its clients not checked); a listing
// says nothing.
func TestVolumeChangeWithoutAServerSaysSo(t *testing.T) {
	c := newVolumeCLI(t)
	run := func(args ...string) string {
		t.Helper()
		var stdout, stderr bytes.Buffer
		root := newRootCmd(&stdout, &stderr)
		root.SetArgs(append([]string{args[0], "--volumes", "file://" + c.dir, "--control", filepath.Join(c.dir, "none.sock")}, args[1:]...))
		if err := root.ExecuteContext(context.Background()); err != nil {
			t.Fatalf("lvnbd %s: %v", strings.Join(args, " "), err)
		}
		return stderr.String()
	}
	if got := run("volume", "list"); !strings.Contains(got, c.dir+" does not exist") {
		t.Errorf("volume list of a directory that does not exist said %q on stderr, want that said", got)
	}
	if got := run("volume", "create", "vm1", "--size", "1M"); !strings.Contains(got, "no lvnbd serve answers on") ||
		!strings.Contains(got, "changing file://"+c.dir+" directly") {
		t.Errorf("volume create without a server said %q, want a note that it changes the volumes directly", got)
	}
	if got := run("volume", "list"); got != "" {
		t.Errorf("volume list said %q on stderr, want nothing", got)
	}
}

// Every command that changes volumes or snapshots prints, with --json, what
// it made or changed as the list commands show it, and nothing else.
func TestChangingCommandsPrintJSON(t *testing.T) {
	c := newVolumeCLI(t)
	decode := func(out string, v any) {
		t.Helper()
		dec := json.NewDecoder(strings.NewReader(out))
		dec.DisallowUnknownFields()
		if err := dec.Decode(v); err != nil {
			t.Fatalf("%q: %v", out, err)
		}
		if dec.More() {
			t.Fatalf("%q: more than one JSON value", out)
		}
	}
	var created volumeResult
	decode(c.ok("volume", "create", "vm1", "--size", "1M", "--json"), &created)
	if v := created.Volume; v.Name != "vm1" || v.Size != 1<<20 || v.ID == "" || v.Snapshots == nil || created.PreviousSize != nil {
		t.Errorf("volume create --json: %+v", created)
	}
	var resized volumeResult
	decode(c.ok("volume", "resize", "vm1", "--size", "+1M", "--json"), &resized)
	if resized.Volume.Size != 2<<20 || resized.PreviousSize == nil || *resized.PreviousSize != 1<<20 || resized.Volume.ID != created.Volume.ID {
		t.Errorf("volume resize --json: %+v", resized)
	}
	var snap struct {
		Snapshot volume.Snapshot `json:"snapshot"`
	}
	decode(c.ok("snapshot", "create", "vm1@s1", "--json"), &snap)
	if snap.Snapshot.Volume != "vm1" || snap.Snapshot.Name != "s1" || snap.Snapshot.Size != 2<<20 {
		t.Errorf("snapshot create --json: %+v", snap)
	}
	var merged struct {
		Merged string `json:"merged"`
		volumeResult
	}
	decode(c.ok("snapshot", "merge", "vm1@s1", "--json"), &merged)
	if merged.Merged != "vm1@s1" || merged.Volume.ID != created.Volume.ID+"-r1" || len(merged.Volume.Snapshots) != 0 {
		t.Errorf("snapshot merge --json: %+v", merged)
	}
	c.ok("snapshot", "create", "vm1@s2")
	for _, args := range [][]string{{"snapshot", "remove", "vm1@s2"}, {"volume", "remove", "vm1"}} {
		var removed removedResult
		decode(c.ok(append(args, "--json")...), &removed)
		if removed.Removed != args[2] {
			t.Errorf("%s --json: %+v", strings.Join(args, " "), removed)
		}
	}
}
