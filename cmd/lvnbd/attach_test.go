package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/client/kernel"
	"github.com/lvnbd/lvnbd/client/pair"
	"github.com/lvnbd/lvnbd/client/volumeid"
	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server"
)

// fakeNBD stands in for the kernel's nbd driver. Connect checks every socket
// it is given with a READ, as the kernel would send it.
type fakeNBD struct {
	t          testing.TB
	mu         sync.Mutex
	devs       []kernel.Device
	nextIndex  int
	connectErr error
	// starve makes the next Connect configure nothing and fail as the
	// kernel's does when its nbd workqueue's rescuer starved a connection.
	starve bool
	// stillAttached makes that failure say the starved device could not be
	// disconnected again.
	stillAttached bool
	starved       []kernel.Config
	connected     []kernel.Config
	reconfigured  []kernel.Reconfig
	disconnected  []int
	closed        bool
	// held devices keep their configuration when disconnected, as the
	// kernel's do while something holds them open.
	held map[int]bool
	// A subscription to dead-connection notices sends nbd2's and a loss,
	// then fails with watchErr if set; otherwise it calls eventsRead (if
	// set) and lasts until its ctx is done.
	watchErr   error
	eventsRead func()
	// afterConnect, if set, runs after each Connect that succeeds.
	afterConnect func()
}

func (k *fakeNBD) Connect(_ context.Context, cfg kernel.Config) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := cfg.Validate(); err != nil {
		return 0, err
	}
	if k.connectErr != nil {
		return 0, k.connectErr
	}
	if k.starve {
		k.starve = false
		k.starved = append(k.starved, cfg)
		err := error(&kernel.OpError{Op: "NBD_CMD_CONNECT", Index: k.nextIndex, Err: kernel.ErrReceiversStarved})
		if k.stillAttached {
			err = errors.Join(err, fmt.Errorf("disconnecting it again failed, %w", kernel.ErrStillAttached))
		}
		return 0, err
	}
	for i, f := range cfg.Sockets {
		checkKernelSocket(k.t, fmt.Sprintf("socket %d", i), f)
	}
	k.connected = append(k.connected, cfg)
	index := k.nextIndex
	if cfg.Index != kernel.AnyDevice {
		index = cfg.Index
	} else {
		k.nextIndex++
	}
	k.devs = append(k.devs, kernel.Device{Index: index, Connected: true, PID: 1, Backend: cfg.Backend,
		Size: cfg.Size, BlockSize: cfg.BlockSize, ReadOnly: cfg.ReadOnly})
	if k.afterConnect != nil {
		k.afterConnect()
	}
	return index, nil
}

// Bound: every running device is, here.
func (k *fakeNBD) Bound(_ context.Context, index int, backend string) (bool, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, d := range k.devs {
		if d.Index == index && d.Running() && d.Backend == backend {
			return true, nil
		}
	}
	return false, nil
}

func (k *fakeNBD) Disconnect(_ context.Context, index int) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.disconnected = append(k.disconnected, index)
	if !k.held[index] {
		k.devs = slices.DeleteFunc(k.devs, func(d kernel.Device) bool { return d.Index == index })
	}
	return nil
}

func (k *fakeNBD) Reconfigure(_ context.Context, index int, r kernel.Reconfig) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	// As kernel.Conn, it refuses sockets and a size together.
	if err := r.Validate(); err != nil {
		return err
	}
	for i, f := range r.Sockets {
		checkKernelSocket(k.t, fmt.Sprintf("reconnect socket %d", i), f)
	}
	k.reconfigured = append(k.reconfigured, r)
	for i := range k.devs {
		if k.devs[i].Index == index && r.Size != 0 {
			k.devs[i].Size = r.Size
		}
	}
	return nil
}

func (k *fakeNBD) Status(_ context.Context, index int) ([]kernel.Device, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if index == kernel.AnyDevice {
		return slices.Clone(k.devs), nil
	}
	for _, d := range k.devs {
		if d.Index == index {
			return []kernel.Device{d}, nil
		}
	}
	// Free devices exist but are not connected.
	if index < 16 {
		return []kernel.Device{{Index: index}}, nil
	}
	return nil, &kernel.OpError{Op: "NBD_CMD_STATUS", Index: index, Err: kernel.ErrNoDevice}
}

func (k *fakeNBD) WatchLinkDead(ctx context.Context) (<-chan int, error) {
	ch, _, err := k.SubscribeLinkDead(ctx)
	return ch, err
}

func (k *fakeNBD) SubscribeLinkDead(ctx context.Context) (<-chan int, func() error, error) {
	ch := make(chan int)
	done := make(chan struct{})
	var failed error
	go func() {
		defer close(done)
		defer close(ch)
		for _, i := range []int{2, kernel.EventsLost} {
			select {
			case ch <- i:
			case <-ctx.Done():
				return
			}
		}
		if k.watchErr != nil {
			failed = k.watchErr
			return
		}
		if k.eventsRead != nil {
			k.eventsRead()
		}
		<-ctx.Done()
	}()
	return ch, func() error { <-done; return failed }, nil
}

func (k *fakeNBD) Close() error {
	k.closed = true
	return nil
}

// checkKernelSocket reads 512 bytes through f as the kernel would: the
// socket must be in the transmission phase, and the reply a simple one.
func checkKernelSocket(t testing.TB, what string, f *os.File) {
	t.Helper()
	nc, err := net.FileConn(f) // a duplicate: f stays the caller's
	if err != nil {
		t.Errorf("%s: %v", what, err)
		return
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	req, _ := nbd.RequestHeader{Command: nbd.CmdRead, Handle: 0x1234, Length: 512}.AppendBinary(nil)
	if _, err := nc.Write(req); err != nil {
		t.Errorf("%s: sending a read: %v", what, err)
		return
	}
	b := make([]byte, nbd.SimpleReplySize+512)
	if _, err := io.ReadFull(nc, b); err != nil {
		t.Errorf("%s: reading the reply: %v", what, err)
		return
	}
	var rep nbd.SimpleReply
	if err := rep.UnmarshalBinary(b[:nbd.SimpleReplySize]); err != nil || rep.Handle != 0x1234 || rep.Errno != 0 {
		t.Errorf("%s: reply %+v, %v; want a simple reply without error to handle 0x1234", what, rep, err)
	}
}

func testHost(k *fakeNBD, users map[int][]string) *hostDeps {
	return &hostDeps{
		openKernel: func(context.Context) (nbdKernel, error) { return k, nil },
		users:      func(index int, _ string) ([]string, error) { return users[index], nil },
	}
}

// runCmd runs cmd with args and returns its stdout and stderr.
func runCmd(t testing.TB, cmd command, args ...string) (string, string, error) {
	t.Helper()
	return runCmdContext(context.Background(), t, cmd, args...)
}

// command is what runCmd needs of a *cobra.Command.
type command interface {
	SetArgs([]string)
	SetOut(io.Writer)
	SetErr(io.Writer)
	ExecuteContext(context.Context) error
}

// runCmdContext is runCmd with ctx, which the command's context ends with.
func runCmdContext(ctx context.Context, t testing.TB, cmd command, args ...string) (string, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err := cmd.ExecuteContext(ctx)
	return out.String(), errOut.String(), err
}

// serveExport serves a size-byte file as export name (read-only if ro) with
// lvnbd's server and returns the server's address.
func serveExport(t testing.TB, name string, size int64, ro bool) string {
	t.Helper()
	return serveExportAs(t, name, size, ro, "")
}

// serveExportAs is serveExport with the export's description.
func serveExportAs(t testing.TB, name string, size int64, ro bool, description string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name+".img")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	e, err := server.OpenExport(server.ExportSpec{Name: name, Path: path, ReadOnly: ro})
	if err != nil {
		t.Fatal(err)
	}
	e.Description = description
	t.Cleanup(func() { e.Backend.Close() })
	reg := server.NewRegistry()
	if err := reg.Add(e); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- server.New(&server.Config{Exports: reg, Logger: zap.NewNop()}).Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server: %v", err)
		}
	})
	return ln.Addr().String()
}

// serveNoMultiConn runs a minimal NBD server whose export does not allow
// several connections, and returns its address.
func serveNoMultiConn(t testing.TB, size uint64) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer nc.Close()
				hello, _ := nbd.ServerHello{Flags: nbd.FlagFixedNewstyle | nbd.FlagNoZeroes}.AppendBinary(nil)
				nc.Write(hello)
				var b [4 + nbd.OptionHeaderSize]byte
				if _, err := io.ReadFull(nc, b[:]); err != nil {
					return
				}
				var h nbd.OptionHeader
				if h.UnmarshalBinary(b[4:]) != nil || h.Length > 4096 {
					return
				}
				if _, err := io.CopyN(io.Discard, nc, int64(h.Length)); err != nil {
					return
				}
				info, _ := nbd.Info{Type: nbd.InfoExport, Size: size, Flags: nbd.FlagHasFlags | nbd.FlagSendFlush}.AppendBinary(nil)
				rep, _ := nbd.OptionReplyHeader{Option: h.Option, Type: nbd.RepInfo, Length: uint32(len(info))}.AppendBinary(nil)
				ack, _ := nbd.OptionReplyHeader{Option: h.Option, Type: nbd.RepAck}.AppendBinary(nil)
				nc.Write(slices.Concat(rep, info, ack))
				io.Copy(io.Discard, nc)
			}()
		}
	}()
	return ln.Addr().String()
}

func TestAttach(t *testing.T) {
	addr := serveExport(t, "disk", 64<<20+100, false)
	k := &fakeNBD{t: t, nextIndex: 5}
	out, errOut, err := runCmd(t, newAttachCmd(testHost(k, nil)),
		"--connections", "4", "--timeout", "5s", "--dead-timeout", "10s", "nbd://"+addr+"/disk")
	if err != nil {
		t.Fatal(err)
	}
	if out != "/dev/nbd5\n" {
		t.Errorf("stdout %q, want /dev/nbd5", out)
	}
	// The export's odd tail cannot be a whole block: said on stderr.
	if !strings.Contains(errOut, "last 100 bytes") {
		t.Errorf("stderr %q lacks a note about the tail", errOut)
	}
	if len(k.connected) != 1 {
		t.Fatalf("%d connects, want 1", len(k.connected))
	}
	cfg := k.connected[0]
	if len(cfg.Sockets) != 4 {
		t.Errorf("%d sockets, want 4", len(cfg.Sockets))
	}
	// The command closes its descriptors after Connect.
	for i, f := range cfg.Sockets {
		if err := f.Close(); !errors.Is(err, os.ErrClosed) {
			t.Errorf("socket %d still open after attach (Close: %v)", i, err)
		}
	}
	got := cfg
	got.Sockets = nil
	want := kernel.Config{
		Size:            64 << 20,
		BlockSize:       512,
		ServerFlags:     got.ServerFlags,
		Timeout:         5 * time.Second,
		DeadConnTimeout: 10 * time.Second,
		Backend:         "nbd://" + addr + "/disk",
		Index:           kernel.AnyDevice,
		MaxRequestBytes: nbd.DefaultMaxPayload,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Config (-want +got):\n%s", diff)
	}
	if f := got.ServerFlags; f&nbd.FlagCanMultiConn == 0 || f&nbd.FlagSendTrim == 0 || f&nbd.FlagReadOnly != 0 {
		t.Errorf("server flags %v", f)
	}
	if !k.closed {
		t.Error("kernel connection not closed")
	}
}

// An attach whose volume ID cannot be recorded is undone: a later lvnbd
// reconnect, another process, would find no record and take whatever
// volume it met for the device's.
func TestAttachUndoneWhenTheIDIsNotRecorded(t *testing.T) {
	uri := "nbd://" + serveExportAs(t, "vm1", 8<<20, false, nbd.WithID("volume vm1 on lvm://vg0", "uuid-1")) + "/vm1"
	dir := filepath.Join(t.TempDir(), "run")
	// Once the device is attached, a file where the record's directory
	// was: nothing can be recorded (root ignores permissions, not this).
	k := &fakeNBD{t: t, nextIndex: 4, afterConnect: func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Error(err)
		}
		if err := os.WriteFile(dir, nil, 0o600); err != nil {
			t.Error(err)
		}
	}}
	host := testHost(k, nil)
	host.volumeIDs = volumeid.Open(filepath.Join(dir, "lvnbd", "volume-ids.json"))
	out, _, err := runCmd(t, newAttachCmd(host), uri)
	if err == nil || !strings.Contains(err.Error(), "/dev/nbd4 detached again: its volume ID was not recorded") {
		t.Errorf("attach: %v, want it undone, saying why", err)
	}
	if strings.HasPrefix(out, "/dev/") {
		t.Errorf("stdout %q: no device to use", out)
	}
	if len(k.connected) != 1 || !slices.Equal(k.disconnected, []int{4}) {
		t.Errorf("connected %d, disconnected %v; want one connect undone", len(k.connected), k.disconnected)
	}
}

// A device the kernel left with a starved connection (Connect disconnected
// it again) is attached anew, once, with fresh sockets, and the same device
// asked for.
func TestAttachAgainAfterStarvedReceivers(t *testing.T) {
	addr := serveExport(t, "disk", 64<<20, false)
	for _, device := range []string{"", "/dev/nbd7"} {
		k := &fakeNBD{t: t, nextIndex: 5, starve: true}
		args := []string{"--connections", "2", "nbd://" + addr + "/disk"}
		want := "/dev/nbd5\n"
		if device != "" {
			args = append([]string{"--device", device}, args...)
			want = device + "\n"
		}
		out, errOut, err := runCmd(t, newAttachCmd(testHost(k, nil)), args...)
		if err != nil {
			t.Fatal(err)
		}
		if out != want || !strings.Contains(errOut, "did not start a receiver for every connection") || !strings.Contains(errOut, "attaching again") {
			t.Errorf("attach %v: stdout %q, stderr %q", args, out, errOut)
		}
		if len(k.starved) != 1 || len(k.connected) != 1 {
			t.Fatalf("%d starved and %d good connects, want 1 and 1", len(k.starved), len(k.connected))
		}
		if k.starved[0].Index != k.connected[0].Index || k.starved[0].Sockets[0] == k.connected[0].Sockets[0] {
			t.Errorf("the second connect asked for device %d with the first's sockets (%v), want device %d, fresh sockets",
				k.connected[0].Index, k.starved[0].Sockets[0] == k.connected[0].Sockets[0], k.starved[0].Index)
		}
	}
}

// Not again if the starved device could not be disconnected: that would
// give the export a second device.
func TestNoAttachAgainWhileTheStarvedDeviceStays(t *testing.T) {
	addr := serveExport(t, "disk", 64<<20, false)
	k := &fakeNBD{t: t, nextIndex: 5, starve: true, stillAttached: true}
	_, errOut, err := runCmd(t, newAttachCmd(testHost(k, nil)), "--connections", "2", "nbd://"+addr+"/disk")
	if err == nil || !strings.Contains(err.Error(), "stays attached") || strings.Contains(errOut, "attaching again") {
		t.Errorf("attach: %v, stderr %q; want the error, no second attach", err, errOut)
	}
	if len(k.starved) != 1 || len(k.connected) != 0 {
		t.Errorf("%d starved and %d good connects, want 1 and 0", len(k.starved), len(k.connected))
	}
}

func TestAttachOptions(t *testing.T) {
	addr := serveExport(t, "ro", 1<<20, true)
	uri := "nbd://" + addr + "/ro"
	k := &fakeNBD{t: t}
	out, _, err := runCmd(t, newAttachCmd(testHost(k, nil)), "--device", "/dev/nbd7", "--block-size", "4k", "--read-only", uri)
	if err != nil {
		t.Fatal(err)
	}
	if out != "/dev/nbd7\n" {
		t.Errorf("stdout %q", out)
	}
	cfg := k.connected[0]
	if cfg.Index != 7 || cfg.BlockSize != 4096 || !cfg.ReadOnly || cfg.ServerFlags&nbd.FlagReadOnly == 0 {
		t.Errorf("Config: index %d, block size %d, read-only %v, flags %v", cfg.Index, cfg.BlockSize, cfg.ReadOnly, cfg.ServerFlags)
	}
	// The default URI port is spelled out in the backend, so that
	// nbd://host/x and nbd://host:10809/x are the same export.
	u, _ := client.ParseURI(uri)
	if cfg.Backend != u.String() {
		t.Errorf("backend %q, want %q", cfg.Backend, u.String())
	}
}

func TestAttachErrors(t *testing.T) {
	addr := serveExport(t, "disk", 1<<20, false)
	single := serveNoMultiConn(t, 1<<20)
	closed := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().String()
	}()
	attached := []kernel.Device{{Index: 2, Connected: true, PID: 1, Backend: "nbd://" + addr + "/disk", Size: 1 << 20}}
	local := []kernel.Device{{Index: 2, Connected: true, PID: 1, Backend: "nbd://localhost:10809/vm1", Size: 1 << 20}}
	tests := []struct {
		name       string
		args       []string
		devs       []kernel.Device
		kernelErr  error // from openKernel
		pairs      func(context.Context) ([]pair.PairStatus, error)
		clientTOML string // the pair daemon's configuration file, if any
		wantErr    string
		wantStderr string
	}{
		{name: "no nbd module", args: []string{"nbd://" + addr + "/disk"}, kernelErr: kernel.ErrModuleNotLoaded,
			wantErr: "the nbd kernel module is not loaded: modprobe nbd"},
		{name: "unknown export", args: []string{"nbd://" + addr + "/nope"}, wantErr: `export "nope" not found`},
		{name: "unreachable", args: []string{"nbd://" + closed + "/disk"}, wantErr: "cannot connect to " + closed},
		{name: "no multi-conn", args: []string{"--connections", "2", "nbd://" + single + "/x"},
			wantErr: "does not allow several connections"},
		{name: "already attached", args: []string{"nbd://" + addr + "/disk"}, devs: attached,
			wantErr: "already attached as /dev/nbd2"},
		{name: "already attached, with no size yet", args: []string{"nbd://localhost/vm1"},
			devs: []kernel.Device{{Index: 2, Connected: true, PID: 1, Backend: "nbd://localhost:10809/vm1"}},
			wantErr: "nbd://localhost:10809/vm1 is already attached as /dev/nbd2, with no size yet (an attach that did not finish): " +
				"lvnbd reconnect --size /dev/nbd2 gives it the export's, or lvnbd detach /dev/nbd2"},
		// The same export spelt otherwise: refused before any dialing
		// (nothing serves vm1 there), not attached a second time.
		{name: "already attached, host in capitals", args: []string{"nbd://LocalHost/vm1"}, devs: local,
			wantErr: "nbd://LocalHost:10809/vm1 is already attached as /dev/nbd2 to nbd://localhost:10809/vm1 (lvnbd detach /dev/nbd2)"},
		{name: "already attached, trailing dot", args: []string{"nbd://localhost./vm1"}, devs: local,
			wantErr: "nbd://localhost.:10809/vm1 is already attached as /dev/nbd2 to nbd://localhost:10809/vm1"},
		{name: "already attached, IPv6 spelt otherwise", args: []string{"nbd://[0:0::1]/vm1"},
			devs:    []kernel.Device{{Index: 2, Connected: true, PID: 1, Backend: "nbd://[::1]:10809/vm1", Size: 1 << 20}},
			wantErr: "nbd://[0:0::1]:10809/vm1 is already attached as /dev/nbd2 to nbd://[::1]:10809/vm1 (lvnbd detach /dev/nbd2)"},
		{name: "device busy", args: []string{"--device", "/dev/nbd2", "nbd://" + addr + "/other"}, devs: attached,
			wantErr: "/dev/nbd2: device is in use"},
		{name: "bad device", args: []string{"--device", "/dev/sda", "nbd://" + addr + "/disk"}, wantErr: "not an nbd device"},
		{name: "bad block size", args: []string{"--block-size", "1000", "nbd://" + addr + "/disk"}, wantErr: "block size 1000"},
		{name: "zero timeout", args: []string{"--timeout", "0", "nbd://" + addr + "/disk"},
			wantErr: "--timeout 0 means no request ever times out"},
		{name: "zero connections", args: []string{"--connections", "0", "nbd://" + addr + "/disk"}, wantErr: "--connections 0"},
		{name: "bad URI", args: []string{"http://x/y"}, wantErr: "invalid NBD URI"},
		{name: "TLS", args: []string{"nbds://" + addr + "/disk"}, wantErr: "TLS"},
		// A pair leg's export: its device is the daemon's to attach, which
		// checks the volume against the ID the leg keeps.
		{name: "a pair's leg", args: []string{"nbd://LocalHost/vm1"}, pairs: legsOf("nbd://localhost:10809/vm1"),
			wantErr: "nbd://LocalHost:10809/vm1 is leg b of pair vm1 (lvnbd client): lvnbd pair up --leg b vm1 attaches it"},
		// Without a daemon, or for another export, the attach goes on (to
		// the dial, which fails here).
		{name: "no pair daemon", args: []string{"nbd://" + addr + "/nope"},
			pairs:   func(context.Context) ([]pair.PairStatus, error) { return nil, pair.ErrNoDaemon },
			wantErr: `export "nope" not found`},
		{name: "a pair daemon that does not answer", args: []string{"nbd://" + addr + "/nope"},
			pairs:   func(context.Context) ([]pair.PairStatus, error) { return nil, context.DeadlineExceeded },
			wantErr: `export "nope" not found`, wantStderr: "cannot tell whether nbd://" + addr + "/nope is a pair's leg"},
		{name: "another export than the legs'", args: []string{"nbd://" + addr + "/nope"}, pairs: legsOf("nbd://localhost:10809/vm1"),
			wantErr: `export "nope" not found`},
		// A leg of client.toml, also while no daemon runs: at its start it
		// would adopt the device without the check.
		{name: "a leg of client.toml, no daemon", args: []string{"nbd://LocalHost/vm1"},
			pairs:      func(context.Context) ([]pair.PairStatus, error) { return nil, pair.ErrNoDaemon },
			clientTOML: "[[pair]]\nname = \"vm1\"\na = \"nbd://localhost/vm1\"\nb = \"nbd://boxb/vm1\"\n",
			wantErr: "nbd://LocalHost:10809/vm1 is leg a of pair vm1 in CONFIG: lvnbd client attaches it, checking its volume " +
				"(systemctl start lvnbd-client, or lvnbd pair up --leg a vm1 once it runs); to attach it by hand, take the " +
				"pair out of CONFIG first"},
		{name: "another export than client.toml's legs", args: []string{"nbd://" + addr + "/nope"},
			clientTOML: "[[pair]]\nname = \"vm1\"\na = \"nbd://localhost/vm1\"\nb = \"nbd://boxb/vm1\"\n",
			wantErr:    `export "nope" not found`},
		{name: "a client.toml that does not parse", args: []string{"nbd://" + addr + "/nope"},
			clientTOML: "[[pair]]\nname = 1\n",
			wantErr:    `export "nope" not found`, wantStderr: "cannot tell whether nbd://" + addr + "/nope is a pair's leg"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := &fakeNBD{t: t, devs: tt.devs}
			host := testHost(k, nil)
			host.pairs = tt.pairs
			if tt.clientTOML != "" {
				host.clientConfig = filepath.Join(t.TempDir(), "client.toml")
				if err := os.WriteFile(host.clientConfig, []byte(tt.clientTOML), 0o600); err != nil {
					t.Fatal(err)
				}
				tt.wantErr = strings.ReplaceAll(tt.wantErr, "CONFIG", host.clientConfig)
			}
			if tt.kernelErr != nil {
				host.openKernel = func(context.Context) (nbdKernel, error) { return nil, tt.kernelErr }
			}
			_, stderr, err := runCmd(t, newAttachCmd(host), tt.args...)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
			}
			if !strings.Contains(stderr, tt.wantStderr) {
				t.Errorf("stderr %q, want it to contain %q", stderr, tt.wantStderr)
			}
			if len(k.connected) != 0 {
				t.Error("Connect was called")
			}
		})
	}
}

// legsOf is a pair daemon's answer: pair vm1, whose leg b is uri.
func legsOf(uri string) func(context.Context) ([]pair.PairStatus, error) {
	return func(context.Context) ([]pair.PairStatus, error) {
		return []pair.PairStatus{{Name: "vm1", Legs: []pair.LegStatus{{Leg: "a", URI: "nbd://boxa:10809/vm1"}, {Leg: "b", URI: uri}}}}, nil
	}
}

// attach's "already attached" check compares exports, not spellings; a
// backend another tool gave, which is no URI, only as written.
func TestAttachedBackendIsSameExport(t *testing.T) {
	tests := []struct {
		backend, uri string
		same         bool
	}{
		{"nbd://boxa:10809/vm1", "nbd://boxa/vm1", true},
		{"nbd://boxa:10809/vm1", "nbd://BOXA/vm1", true},
		{"nbd://boxa:10809/vm1", "nbd://boxa./vm1", true},
		{"nbd://BoxA.:10809/vm1", "nbd://boxa/vm1", true},
		{"nbd://boxa:10809/vm1", "nbd://boxa/vm2", false},
		{"nbd://boxa:10809/vm1", "nbd://boxb/vm1", false},
		{"nbd://boxa:10809/vm1", "nbd://boxa:10810/vm1", false},
		{"", "nbd://boxa/vm1", false},
		{"some-tool:vm1", "nbd://boxa/vm1", false},
	}
	for _, tt := range tests {
		u, err := client.ParseURI(tt.uri)
		if err != nil {
			t.Fatal(err)
		}
		if got := sameExport(tt.backend, u); got != tt.same {
			t.Errorf("sameExport(%q, %s) = %v, want %v", tt.backend, u, got, tt.same)
		}
	}
}

func TestDetach(t *testing.T) {
	devs := func() []kernel.Device {
		return []kernel.Device{
			{Index: 0, Connected: true, PID: 1, Backend: "nbd://a:10809/x"},
			{Index: 1, Connected: true, PID: 1, Backend: "nbd://a:10809/y"},
			{Index: 3, Connected: true, PID: 1, Backend: "nbd://a:10809/y"},
			{Index: 4, Connected: true, PID: 1, Backend: "nbd://a:10809/busy"},
		}
	}
	users := map[int][]string{4: {"nbd4 mounted on /mnt"}}
	tests := []struct {
		name    string
		args    []string
		want    []int // disconnected
		wantErr string
	}{
		{name: "by device", args: []string{"/dev/nbd1"}, want: []int{1}},
		{name: "by name", args: []string{"nbd3"}, want: []int{3}},
		{name: "by URI, default port", args: []string{"nbd://a/x"}, want: []int{0}},
		{name: "URI attached twice", args: []string{"nbd://a:10809/y"}, wantErr: "attached as /dev/nbd1 and /dev/nbd3"},
		{name: "URI not attached", args: []string{"nbd://a/z"}, wantErr: "no device is attached to nbd://a:10809/z"},
		{name: "free device", args: []string{"/dev/nbd9"}, wantErr: "/dev/nbd9 is not attached"},
		{name: "missing device", args: []string{"/dev/nbd99"}, wantErr: "no such nbd device"},
		{name: "mounted", args: []string{"/dev/nbd4"}, wantErr: "in use (nbd4 mounted on /mnt)"},
		{name: "mounted, forced", args: []string{"--force", "/dev/nbd4"}, want: []int{4}},
		{name: "neither", args: []string{"disk"}, wantErr: "want a device /dev/nbdN or an NBD URI"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := &fakeNBD{t: t, devs: devs()}
			checkDetach(t, k, testHost(k, users), tt.args, tt.wantErr, tt.want)
		})
	}
}

// TestDetachKeepsTheIDOfAHeldDevice: a device still held open after its
// disconnect stays configured and is found by its backend, so its
// volume ID is kept; one that went away has its ID forgotten.
func TestDetachKeepsTheIDOfAHeldDevice(t *testing.T) {
	const held, gone = "nbd://a:10809/held", "nbd://a:10809/gone"
	k := &fakeNBD{t: t, held: map[int]bool{0: true}, devs: []kernel.Device{
		{Index: 0, Connected: true, PID: 1, Backend: held},
		{Index: 1, Connected: true, PID: 1, Backend: gone},
	}}
	host := testHost(k, map[int][]string{0: {"Xen backend vbd-1-51712"}})
	for _, uri := range []string{held, gone} {
		if err := host.ids().Set(uri, "uuid-1"); err != nil {
			t.Fatal(err)
		}
	}
	_, stderr, err := runCmd(t, newDetachCmd(host), "--force", "/dev/nbd0")
	if err != nil || !strings.Contains(stderr, "still holds it open") || !strings.Contains(stderr, "volume ID is kept") {
		t.Errorf("detach --force of a held device: %v, stderr %q; want success saying it is held and its ID kept", err, stderr)
	}
	if id, _ := host.ids().Get(held); id != "uuid-1" {
		t.Errorf("the held device's volume ID is %q, want uuid-1 kept", id)
	}
	if _, _, err := runCmd(t, newDetachCmd(host), "/dev/nbd1"); err != nil {
		t.Fatal(err)
	}
	if id, _ := host.ids().Get(gone); id != "" {
		t.Errorf("the detached device's volume ID is %q, want it forgotten", id)
	}
}

// Of two devices on one export (a pair's leg and a leftover the daemon left
// alone), detaching one keeps the export's volume ID for the other, whose
// next reconnect checks the volume against it; detaching the last forgets it.
func TestDetachKeepsTheIDAnotherDeviceUses(t *testing.T) {
	const uri = "nbd://a:10809/vm1"
	k := &fakeNBD{t: t, devs: []kernel.Device{
		{Index: 0, Connected: true, PID: 1, Backend: uri},
		{Index: 1, Connected: true, PID: 1, Backend: uri},
	}}
	host := testHost(k, nil)
	if err := host.ids().Set(uri, "uuid-1"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := runCmd(t, newDetachCmd(host), "/dev/nbd0"); err != nil {
		t.Fatal(err)
	}
	if id, _ := host.ids().Get(uri); id != "uuid-1" {
		t.Errorf("the volume ID is %q after detaching one of two devices on the export, want uuid-1 kept", id)
	}
	if _, _, err := runCmd(t, newDetachCmd(host), "/dev/nbd1"); err != nil {
		t.Fatal(err)
	}
	if id, _ := host.ids().Get(uri); id != "" {
		t.Errorf("the volume ID is %q after detaching the last device, want it forgotten", id)
	}
}

func TestList(t *testing.T) {
	k := &fakeNBD{t: t, devs: []kernel.Device{
		{Index: 0, Connected: true, PID: 10, Backend: "nbd://a:10809/x", Size: 64 << 20, BlockSize: 512},
		{Index: 1},
		{Index: 2, Connected: true, Size: 0},
		{Index: 12, Connected: true, PID: 10, Backend: "nbd+unix:///golden?socket=%2Frun%2Fs", Size: 1 << 30, ReadOnly: true},
	}}
	out, _, err := runCmd(t, newListCmd(testHost(k, nil)))
	if err != nil {
		t.Fatal(err)
	}
	want := `DEVICE      SIZE     MODE  STATE      BACKEND
/dev/nbd0   64 MiB   rw    connected  nbd://a:10809/x
/dev/nbd2   0 B      rw    open       -
/dev/nbd12  1.0 GiB  ro    connected  nbd+unix:///golden?socket=%2Frun%2Fs
`
	if diff := cmp.Diff(want, out); diff != "" {
		t.Errorf("list (-want +got):\n%s", diff)
	}

	out, _, err = runCmd(t, newListCmd(testHost(k, nil)), "--json", "--all")
	if err != nil {
		t.Fatal(err)
	}
	var entries []map[string]any
	if err := json.Unmarshal([]byte(out), &entries); err != nil {
		t.Fatalf("list --json: %v\n%s", err, out)
	}
	if len(entries) != 4 {
		t.Fatalf("%d entries, want 4", len(entries))
	}
	wantFirst := map[string]any{"device": "/dev/nbd0", "state": "connected", "index": 0.0, "connected": true, "pid": 10.0,
		"backend": "nbd://a:10809/x", "size": float64(64 << 20), "read_only": false, "block_size": 512.0}
	if diff := cmp.Diff(wantFirst, entries[0]); diff != "" {
		t.Errorf("first entry (-want +got):\n%s", diff)
	}
	if entries[1]["state"] != "free" {
		t.Errorf("nbd1 state %v, want free", entries[1]["state"])
	}
}

func TestListWatch(t *testing.T) {
	// Until interrupted, which is a normal end.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	k := &fakeNBD{t: t, eventsRead: cancel}
	out, _, err := runCmdContext(ctx, t, newListCmd(testHost(k, nil)), "--watch")
	if err != nil {
		t.Fatal(err)
	}
	want := "DEVICE  SIZE  MODE  STATE  BACKEND\n/dev/nbd2: dead connection\nevents lost: check every device\n"
	if diff := cmp.Diff(want, out); diff != "" {
		t.Errorf("list --watch (-want +got):\n%s", diff)
	}
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	k = &fakeNBD{t: t, eventsRead: cancel}
	out, _, err = runCmdContext(ctx, t, newListCmd(testHost(k, nil)), "--watch", "--json")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || lines[0] != "[]" || !strings.Contains(lines[1], `"device":"/dev/nbd2","event":"link-dead"`) ||
		!strings.Contains(lines[2], `"event":"events-lost"`) {
		t.Errorf("list --watch --json:\n%s", out)
	}
}

// A subscription that fails is said, and list --watch fails: a script
// reading its events must not take the silence for no deaths.
func TestListWatchFails(t *testing.T) {
	for _, args := range [][]string{{"--watch"}, {"--watch", "--json"}} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			failed := errors.New("receiving nbd netlink notifications: recvmsg: bad file descriptor")
			k := &fakeNBD{t: t, watchErr: failed}
			out, _, err := runCmd(t, newListCmd(testHost(k, nil)), args...)
			if !errors.Is(err, failed) || !strings.Contains(err.Error(), "watching for dead connections stopped") {
				t.Errorf("list %s: %v, want an error saying the watch stopped, wrapping %v", strings.Join(args, " "), err, failed)
			}
			// What came before the failure is printed all the same.
			if !strings.Contains(out, "nbd2") || !strings.Contains(out, "events") {
				t.Errorf("stdout %q lacks the events before the failure", out)
			}
		})
	}
}

func TestReconnect(t *testing.T) {
	addr := serveExport(t, "disk", 8<<20, false)
	uri := "nbd://" + addr + "/disk"
	newKernel := func(size uint64) *fakeNBD {
		return &fakeNBD{t: t, devs: []kernel.Device{
			{Index: 3, Connected: true, PID: 1, Backend: uri, Size: size, BlockSize: 4096},
			{Index: 4, Connected: true, Backend: uri}, // disconnected, still open
		}}
	}

	// Fresh sockets; the export grew from 4 to 8 MiB, so the device grows.
	k := newKernel(4 << 20)
	out, errOut, err := runCmd(t, newReconnectCmd(testHost(k, nil)), "--connections", "3", "--dead-timeout", "1m", "/dev/nbd3")
	if err != nil {
		t.Fatal(err)
	}
	if out != "/dev/nbd3\n" || !strings.Contains(errOut, "grew from 4.0 MiB to 8.0 MiB") {
		t.Errorf("stdout %q, stderr %q", out, errOut)
	}
	// The sockets first and alone: a size in the same RECONFIGURE would
	// be applied first, and its queue freeze would wait for the I/O parked
	// until the dead timeout fails it.
	type reconfig struct {
		Sockets                  int
		Size                     uint64
		Timeout, DeadConnTimeout time.Duration
		Backend                  string
	}
	var got []reconfig
	for _, r := range k.reconfigured {
		got = append(got, reconfig{len(r.Sockets), r.Size, r.Timeout, r.DeadConnTimeout, r.Backend})
	}
	want := []reconfig{
		{Sockets: 3, DeadConnTimeout: time.Minute, Backend: uri},
		{Size: 8 << 20, Backend: uri},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Reconfigure calls (-want +got):\n%s", diff)
	}

	// --size too: fresh sockets first, as many as --connections, alone,
	// then the size. A size alone would freeze the queue (from Linux 6.9,
	// holding the host's generic netlink lock) until I/O parked on dead
	// connections failed at the dead timeout.
	k = newKernel(4 << 20)
	_, errOut, err = runCmd(t, newReconnectCmd(testHost(k, nil)), "--size", "--connections", "2", "/dev/nbd3", uri)
	if err != nil {
		t.Fatal(err)
	}
	got = nil
	for _, r := range k.reconfigured {
		got = append(got, reconfig{len(r.Sockets), r.Size, r.Timeout, r.DeadConnTimeout, r.Backend})
	}
	want = []reconfig{{Sockets: 2, Backend: uri}, {Size: 8 << 20, Backend: uri}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("--size: Reconfigure calls (-want +got):\n%s", diff)
	}
	if !strings.Contains(errOut, "grew from 4.0 MiB to 8.0 MiB") {
		t.Errorf("--size: stderr %q", errOut)
	}

	// An attach that did not finish left the device with no size: --size
	// gives it the export's, as attach's refusal of the export says.
	k = newKernel(0)
	if _, errOut, err = runCmd(t, newReconnectCmd(testHost(k, nil)), "--size", "/dev/nbd3"); err != nil || !strings.Contains(errOut, "grew from 0 B to 8.0 MiB") {
		t.Errorf("--size of a device with no size: %v, stderr %q", err, errOut)
	}

	// Same size: fresh sockets, no size, and --size says so.
	k = newKernel(8 << 20)
	_, errOut, err = runCmd(t, newReconnectCmd(testHost(k, nil)), "--size", "/dev/nbd3")
	if err != nil {
		t.Fatal(err)
	}
	if len(k.reconfigured) != 1 || len(k.reconfigured[0].Sockets) != 1 || k.reconfigured[0].Size != 0 {
		t.Errorf("same size: Reconfigure calls %+v, want one with a socket and no size", k.reconfigured)
	}
	if want := "lvnbd: /dev/nbd3 already has the export's size, 8.0 MiB\n"; errOut != want {
		t.Errorf("same size: stderr %q, want %q", errOut, want)
	}

	for name, tc := range map[string]struct {
		args    []string
		size    uint64
		wantErr string
	}{
		"shrink":         {args: []string{"/dev/nbd3"}, size: 16 << 20, wantErr: "shrank from 16 MiB to 8.0 MiB"},
		"not running":    {args: []string{"/dev/nbd4"}, wantErr: "/dev/nbd4 is not attached"},
		"free":           {args: []string{"/dev/nbd5"}, wantErr: "/dev/nbd5 is not attached"},
		"bad device":     {args: []string{"nbd://x/y"}, wantErr: "not an nbd device"},
		"unknown export": {args: []string{"/dev/nbd3", "nbd://" + addr + "/nope"}, wantErr: "/dev/nbd3 is attached to " + uri},
	} {
		t.Run(name, func(t *testing.T) {
			k := newKernel(tc.size)
			_, _, err := runCmd(t, newReconnectCmd(testHost(k, nil)), tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
			}
			if len(k.reconfigured) != 0 {
				t.Error("Reconfigure was called")
			}
		})
	}
}

// TestReconnectRecordsAShrink: an export found smaller than its device is
// recorded, and refused from then on, whatever size it has later: its tail
// is lost. Another host, with no record, reconnects.
func TestReconnectRecordsAShrink(t *testing.T) {
	uri := "nbd://" + serveExport(t, "disk", 8<<20, false) + "/disk"
	dev := func(size uint64) *fakeNBD {
		return &fakeNBD{t: t, devs: []kernel.Device{{Index: 3, Connected: true, PID: 1, Backend: uri, Size: size, BlockSize: 4096}}}
	}
	host := testHost(dev(16<<20), nil)
	if _, _, err := runCmd(t, newReconnectCmd(host), "/dev/nbd3"); err == nil || !strings.Contains(err.Error(), "shrank from 16 MiB to 8.0 MiB") {
		t.Fatalf("reconnect to a shrunk export: %v", err)
	}
	// The same host, its device now no larger than the export (as after a
	// grow back): still refused.
	k := dev(8 << 20)
	host.openKernel = func(context.Context) (nbdKernel, error) { return k, nil }
	_, _, err := runCmd(t, newReconnectCmd(host), "/dev/nbd3")
	if !errors.Is(err, volumeid.ErrReplaced) || !strings.Contains(err.Error(), "shrank under the device") {
		t.Errorf("reconnect after the shrink was recorded: %v, want the recorded shrink", err)
	}
	if len(k.reconfigured) != 0 {
		t.Error("Reconfigure was called")
	}
	if _, _, err := runCmd(t, newReconnectCmd(testHost(dev(8<<20), nil)), "/dev/nbd3"); err != nil {
		t.Errorf("reconnect on a host with no record: %v", err)
	}
}

// TestReconnectRefusesAnotherExport checks that reconnect never points a
// device at another export than its own: with a mirror leg, that would put
// both halves on one storage box while md believes them in sync.
func TestReconnectRefusesAnotherExport(t *testing.T) {
	// Both boxes serve vm1 and answer: only the check stops the reconnect.
	boxA, boxB := "nbd://"+serveExport(t, "vm1", 8<<20, false)+"/vm1", "nbd://"+serveExport(t, "vm1", 8<<20, false)+"/vm1"
	const backendA = "nbd://storage-a:10809/vm1"
	tests := []struct {
		name    string
		backend string // the device's
		args    []string
		wantErr []string // all in the error
	}{
		{name: "the other storage box", backend: boxA, args: []string{"--connections", "2", "/dev/nbd3", boxB},
			wantErr: []string{"/dev/nbd3 is attached to " + boxA + ", not " + boxB,
				"lvnbd detach /dev/nbd3; lvnbd attach " + boxB, "resync"}},
		{name: "the other storage box, --size", backend: boxA, args: []string{"--size", "/dev/nbd3", boxB},
			wantErr: []string{"/dev/nbd3 is attached to " + boxA + ", not " + boxB}},
		{name: "another export on the same box", backend: backendA, args: []string{"/dev/nbd3", "nbd://storage-a/vm2"},
			wantErr: []string{"attached to " + backendA + ", not nbd://storage-a/vm2"}},
		{name: "another port", backend: backendA, args: []string{"/dev/nbd3", "nbd://storage-a:10810/vm1"},
			wantErr: []string{"not nbd://storage-a:10810/vm1"}},
		{name: "a unix socket", backend: backendA, args: []string{"/dev/nbd3", "nbd+unix:///vm1?socket=/run/nbd.sock"},
			wantErr: []string{"not nbd+unix:///vm1?socket=/run/nbd.sock"}},
		{name: "no backend and no URI", args: []string{"/dev/nbd3"},
			wantErr: []string{"/dev/nbd3 was attached without a backend identifier", "give the export's URI"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := &fakeNBD{t: t, devs: []kernel.Device{{Index: 3, Connected: true, PID: 1, Backend: tt.backend, Size: 8 << 20, BlockSize: 512}}}
			_, _, err := runCmd(t, newReconnectCmd(testHost(k, nil)), tt.args...)
			if err == nil {
				t.Fatal("reconnect succeeded")
			}
			for _, s := range tt.wantErr {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q lacks %q", err, s)
				}
			}
			if len(k.reconfigured) != 0 {
				t.Errorf("Reconfigure was called: %+v", k.reconfigured)
			}
		})
	}
}

// TestReconnectRefusesAVolumeMadeAnew: the export's volume ID is not the
// one recorded when the device was attached, so its volume was removed and
// made anew under the same name: reconnect refuses it. With the recorded ID
// it goes ahead.
func TestReconnectRefusesAVolumeMadeAnew(t *testing.T) {
	uri := "nbd://" + serveExportAs(t, "vm1", 8<<20, false, nbd.WithID("volume vm1 on lvm://vg0", "uuid-2")) + "/vm1"
	for _, tc := range []struct {
		recorded string
		wantErr  string
	}{
		{"uuid-1", "/dev/nbd3 not reconnected: the export's volume was made anew or rolled back: the volume behind " + uri +
			" is not the one its device was attached to (volume id uuid-1, now uuid-2)"},
		{"uuid-2", ""},
		{"", ""}, // attached before IDs were recorded: learned now
	} {
		t.Run("recorded "+tc.recorded, func(t *testing.T) {
			k := &fakeNBD{t: t, devs: []kernel.Device{{Index: 3, Connected: true, PID: 1, Backend: uri, Size: 8 << 20, BlockSize: 512}}}
			host := testHost(k, nil)
			if err := host.ids().Set(uri, tc.recorded); err != nil {
				t.Fatal(err)
			}
			_, _, err := runCmd(t, newReconnectCmd(host), "/dev/nbd3")
			if tc.wantErr == "" {
				if err != nil || len(k.reconfigured) == 0 {
					t.Fatalf("reconnect: %v, %d reconfigures", err, len(k.reconfigured))
				}
				if id, _ := host.ids().Get(uri); id != "uuid-2" {
					t.Errorf("recorded ID after the reconnect: %q, want uuid-2", id)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("reconnect: %v, want %q", err, tc.wantErr)
			}
			if len(k.reconfigured) != 0 {
				t.Errorf("Reconfigure was called: %+v", k.reconfigured)
			}
		})
	}
}

func TestReconnectURI(t *testing.T) {
	dev := func(backend string) kernel.Device {
		return kernel.Device{Index: 3, Connected: true, PID: 1, Backend: backend}
	}
	tests := []struct {
		name  string
		dev   kernel.Device
		given string
		want  string // the URI to dial, "" for an error
	}{
		{name: "the device's backend", dev: dev("nbd://storage-a:10809/vm1"), want: "nbd://storage-a:10809/vm1"},
		{name: "its own export spelt short", dev: dev("nbd://storage-a:10809/vm1"), given: "nbd://storage-a/vm1",
			want: "nbd://storage-a:10809/vm1"},
		{name: "another export", dev: dev("nbd://storage-a:10809/vm1"), given: "nbd://storage-b/vm1"},
		{name: "a device attached without a backend: the URI given", dev: dev(""), given: "nbd://storage-a/vm1",
			want: "nbd://storage-a:10809/vm1"},
		{name: "without a backend or a URI", dev: dev("")},
		{name: "a bad URI", dev: dev("nbd://storage-a:10809/vm1"), given: "http://storage-a/vm1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u, err := reconnectURI(tt.dev, tt.given)
			switch {
			case tt.want == "" && err == nil:
				t.Errorf("reconnectURI = %s, want an error", u)
			case tt.want != "" && err != nil:
				t.Errorf("reconnectURI: %v, want %s", err, tt.want)
			case err == nil && u.String() != tt.want:
				t.Errorf("reconnectURI = %s, want %s", u, tt.want)
			}
		})
	}
}

func TestDeviceUsers(t *testing.T) {
	sys := t.TempDir()
	write := func(rel, content string) {
		p := filepath.Join(sys, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("block/nbd2/dev", "43:64\n")
	write("block/nbd2/holders/dm-0", "")
	write("block/nbd2/nbd2p1/dev", "43:65\n")
	write("block/nbd2/nbd2p1/holders/md0", "")
	write("block/nbd3/dev", "43:96\n")
	mountinfo := filepath.Join(t.TempDir(), "mountinfo")
	if err := os.WriteFile(mountinfo, []byte(`22 1 0:21 / / rw - tmpfs tmpfs rw
40 22 43:65 / /mnt/with\040space rw,relatime - ext4 /dev/nbd2p1 rw
41 22 43:64 / /srv rw - ext4 /dev/nbd2 rw
42 22 43:96 / /other rw - ext4 /dev/nbd3 rw
`), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := deviceUsers(sys, mountinfo, "", 2)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"nbd2 held by dm-0", "nbd2p1 held by md0", "nbd2p1 mounted on /mnt/with space", "nbd2 mounted on /srv"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if got, err := deviceUsers(sys, mountinfo, "", 5); err != nil || len(got) != 0 {
		t.Errorf("unused device: %v, %v", got, err)
	}
	// Unreadable is not unused: the check guards a detach.
	if err := os.WriteFile(mountinfo, []byte("40 22 43:65 / /mnt rw\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := deviceUsers(sys, mountinfo, "", 2); err == nil {
		t.Errorf("malformed mountinfo: %v, want an error", got)
	}
	if got, err := deviceUsers(sys, filepath.Join(sys, "no-mountinfo"), "", 2); err == nil {
		t.Errorf("missing mountinfo: %v, want an error", got)
	}
}

// A guest's disk shows neither as a holder nor as a mount: blkback opens the
// device directly, through a pair's stable link or not.
func TestDeviceUsersPairsAndXen(t *testing.T) {
	type link struct{ path, target string }
	tests := []struct {
		name    string
		links   []link            // under the link directory
		files   map[string]string // under the sysfs root
		index   int
		want    []string
		wantErr string
	}{
		{name: "unused", links: []link{{"vm1/a", "/dev/nbd0"}, {"vm1/b", "/dev/nbd1"}}, index: 2},
		{name: "pair leg", links: []link{{"vm1/a", "/dev/nbd0"}, {"vm1/b", "/dev/nbd2"}}, index: 2,
			want: []string{"leg b of pair vm1 via LINKS/vm1/b, taken down with 'lvnbd pair down vm1'"}},
		{name: "relative link", links: []link{{"vm1/a", "../../../dev/nbd2"}}, index: 2,
			want: []string{"leg a of pair vm1 via LINKS/vm1/a, taken down with 'lvnbd pair down vm1'"}},
		{name: "nbd20 is not nbd2", links: []link{{"vm1/a", "/dev/nbd20"}}, index: 2},
		// 43:64 is 2b:40 in hex, as blkback prints it.
		{name: "xen guest's disk", files: map[string]string{"bus/xen-backend/devices/vbd-5-51728/physical_device": "2b:40\n"}, index: 2,
			want: []string{"nbd2 given to Xen domain 5 by vbd-5-51728, taken back with 'xl block-detach 5 51728'"}},
		{name: "xen guest's partition", files: map[string]string{"bus/xen-backend/devices/vbd-7-51712/physical_device": "2b:41\n"}, index: 2,
			want: []string{"nbd2p1 given to Xen domain 7 by vbd-7-51712, taken back with 'xl block-detach 7 51712'"}},
		{name: "decimal is not hex", files: map[string]string{"bus/xen-backend/devices/vbd-5-51728/physical_device": "43:64\n"}, index: 2},
		{name: "xen, another disk", files: map[string]string{"bus/xen-backend/devices/vbd-5-51728/physical_device": "fd:3\n"}, index: 2},
		{name: "xen backend not connected yet", files: map[string]string{"bus/xen-backend/devices/vbd-5-51728/mode": "w\n"}, index: 2},
		{name: "xen backend garbled", files: map[string]string{"bus/xen-backend/devices/vbd-5-51728/physical_device": "nbd2\n"}, index: 2,
			wantErr: `xen-backend vbd-5-51728: physical_device "nbd2" is not MAJOR:MINOR in hex`},
		{name: "both", links: []link{{"vm1/a", "/dev/nbd2"}},
			files: map[string]string{"bus/xen-backend/devices/vbd-5-51728/physical_device": "2b:40\n"}, index: 2,
			want: []string{"leg a of pair vm1 via LINKS/vm1/a, taken down with 'lvnbd pair down vm1'",
				"nbd2 given to Xen domain 5 by vbd-5-51728, taken back with 'xl block-detach 5 51728'"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sys, links := t.TempDir(), filepath.Join(t.TempDir(), "lvnbd")
			files := map[string]string{"block/nbd2/dev": "43:64\n", "block/nbd2/nbd2p1/dev": "43:65\n"}
			for rel, content := range tt.files {
				files[rel] = content
			}
			for rel, content := range files {
				p := filepath.Join(sys, rel)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			for _, l := range tt.links {
				p := filepath.Join(links, l.path)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				target := l.target
				if !filepath.IsAbs(target) {
					// Relative to the link's directory, down to the root.
					target = strings.Repeat("../", strings.Count(filepath.Dir(p), "/")) + strings.TrimLeft(target, "./")
				}
				if err := os.Symlink(target, p); err != nil {
					t.Fatal(err)
				}
			}
			mountinfo := filepath.Join(t.TempDir(), "mountinfo")
			if err := os.WriteFile(mountinfo, []byte("22 1 0:21 / / rw - tmpfs tmpfs rw\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := deviceUsers(sys, mountinfo, links, tt.index)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var want []string
			for _, w := range tt.want {
				want = append(want, strings.ReplaceAll(w, "LINKS", links))
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

// detach checks the link directory it is given.
func TestDetachPairLeg(t *testing.T) {
	links := t.TempDir()
	if err := os.MkdirAll(filepath.Join(links, "vm1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/nbd0", filepath.Join(links, "vm1", "a")); err != nil {
		t.Fatal(err)
	}
	mountinfo := filepath.Join(t.TempDir(), "mountinfo")
	if err := os.WriteFile(mountinfo, []byte("22 1 0:21 / / rw - tmpfs tmpfs rw\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	sys := t.TempDir()
	for _, tt := range []struct {
		name    string
		args    []string
		want    []int // disconnected
		wantErr string
	}{
		{name: "refused", args: []string{"--link-dir", links, "/dev/nbd0"},
			wantErr: "/dev/nbd0 is in use (leg a of pair vm1 via " + filepath.Join(links, "vm1", "a") + ", taken down with 'lvnbd pair down vm1')"},
		{name: "other link directory", args: []string{"--link-dir", t.TempDir(), "/dev/nbd0"}, want: []int{0}},
		{name: "forced", args: []string{"--link-dir", links, "--force", "/dev/nbd0"}, want: []int{0}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			k := &fakeNBD{t: t, devs: []kernel.Device{{Index: 0, Connected: true, PID: 1, Backend: "nbd://a:10809/x"}}}
			host := testHost(k, nil)
			host.users = func(index int, linkDir string) ([]string, error) { return deviceUsers(sys, mountinfo, linkDir, index) }
			checkDetach(t, k, host, tt.args, tt.wantErr, tt.want)
		})
	}
}

// checkDetach runs lvnbd detach with args and checks its error (one
// containing wantErr, or none) and the devices it disconnected.
func checkDetach(t *testing.T, k *fakeNBD, host *hostDeps, args []string, wantErr string, want []int) {
	t.Helper()
	_, _, err := runCmd(t, newDetachCmd(host), args...)
	if wantErr != "" {
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Fatalf("error %v, want one containing %q", err, wantErr)
		}
	} else if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, k.disconnected); diff != "" {
		t.Errorf("disconnected (-want +got):\n%s", diff)
	}
}

// No client.toml (a host without pairs): no leg, and nothing said.
func TestConfiguredLegOfWithoutAFile(t *testing.T) {
	u, err := client.ParseURI("nbd://localhost/vm1")
	if err != nil {
		t.Fatal(err)
	}
	var warn strings.Builder
	h := &hostDeps{clientConfig: filepath.Join(t.TempDir(), "client.toml")}
	if name, leg := h.configuredLegOf(u, &warn); name != "" || leg != "" || warn.Len() != 0 {
		t.Errorf("configuredLegOf = %q %q, warned %q", name, leg, warn.String())
	}
}
