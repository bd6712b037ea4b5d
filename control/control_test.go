package control

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/volume"
	"github.com/lvnbd/lvnbd/volume/file"
)

// startControl runs a server with a file driver and its control socket.
func startControl(t *testing.T) (sock, nbdAddr, dataDir string, vols *server.Volumes) {
	t.Helper()
	dataDir = t.TempDir()
	drv, err := file.New(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	log := zaptest.NewLogger(t)
	reg := server.NewRegistry()
	vols = server.NewVolumes(drv, reg, log)
	sock = filepath.Join(t.TempDir(), "ctl", "control.sock")
	cln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	nln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	fences, err := server.LoadFences(filepath.Join(t.TempDir(), "fences.json"))
	if err != nil {
		t.Fatal(err)
	}
	srv := server.New(&server.Config{Exports: reg, Logger: log, Fences: fences})
	go func() { Serve(ctx, cln, Handler(srv, vols, log)); done <- struct{}{} }()
	go func() { srv.Serve(ctx, nln); done <- struct{}{} }()
	t.Cleanup(func() { cancel(); <-done; <-done })
	return sock, nln.Addr().String(), dataDir, vols
}

func TestRemoteDriver(t *testing.T) {
	ctx := context.Background()
	sock, nbdAddr, dataDir, _ := startControl(t)
	drv, err := OpenDriver(ctx, sock, "file://"+dataDir, false, t.Output())
	if err != nil {
		t.Fatal(err)
	}
	if _, remote := drv.(*remoteDriver); !remote {
		t.Fatalf("OpenDriver returned %T, want the server's driver", drv)
	}
	vol, err := drv.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20})
	if err != nil || vol.Size != 1<<20 {
		t.Fatalf("create: %+v %v", vol, err)
	}
	if _, err := drv.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); !errors.Is(err, volume.ErrExists) {
		t.Fatalf("duplicate create: %v, want ErrExists", err)
	}
	if _, err := drv.Get(ctx, "nope"); !errors.Is(err, volume.ErrNotFound) {
		t.Fatalf("get missing: %v, want ErrNotFound", err)
	}
	if _, err := drv.Resize(ctx, "vm1", 4096, false); !errors.Is(err, volume.ErrShrink) {
		t.Fatalf("shrink: %v, want ErrShrink", err)
	}

	// The export exists at once, and a connected client blocks removal.
	nc, err := net.Dial("tcp", nbdAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if err := goExport(nc, "vm1"); err != nil {
		t.Fatal(err)
	}
	if st := waitClients(t, sock, 1); st.Exports[0].Name != "vm1" {
		t.Fatalf("status: %+v", st)
	}
	if err := drv.Remove(ctx, "vm1"); !errors.Is(err, server.ErrInUse) || !strings.Contains(err.Error(), "127.0.0.1") {
		t.Fatalf("remove in use: %v, want ErrInUse naming the client", err)
	}
	// So does a shrink, until force (which the socket carries) disconnects it.
	if _, err := drv.Resize(ctx, "vm1", 4096, true); !errors.Is(err, server.ErrInUse) {
		t.Fatalf("shrink in use: %v, want ErrInUse", err)
	}
	forced, _ := OpenDriver(ctx, sock, "file://"+dataDir, true, t.Output())
	if vol, err := forced.Resize(ctx, "vm1", 512<<10, true); err != nil || vol.Size != 512<<10 {
		t.Fatalf("forced shrink: %+v, %v", vol, err)
	}
	if _, err := nc.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the client is still connected after a forced shrink (%v)", err)
	}
	if err := forced.Remove(ctx, "vm1"); err != nil {
		t.Fatalf("forced remove: %v", err)
	}
	if vols, err := drv.List(ctx); err != nil || len(vols) != 0 {
		t.Fatalf("after remove: %+v %v", vols, err)
	}
}

func TestOpenDriverWithoutServer(t *testing.T) {
	dir := t.TempDir()
	var note strings.Builder
	drv, err := OpenDriver(context.Background(), filepath.Join(dir, "none.sock"), "file://"+dir, false, &note)
	if err != nil {
		t.Fatal(err)
	}
	if _, remote := drv.(*remoteDriver); remote {
		t.Fatal("no server, yet OpenDriver returned the remote driver")
	}
}

func TestOpenDriverOtherVolumes(t *testing.T) {
	sock, _, _, _ := startControl(t)
	other := t.TempDir()
	var note strings.Builder
	drv, err := OpenDriver(context.Background(), sock, "file://"+other, false, &note)
	if err != nil {
		t.Fatal(err)
	}
	if _, remote := drv.(*remoteDriver); remote || !strings.Contains(note.String(), "directly") {
		t.Fatalf("server serves other volumes: got %T, note %q", drv, note.String())
	}
}

// waitClients waits (bounded) until the one export has n clients: the server
// records a client just after its NBD_OPT_GO reply, so the client may see
// that reply first.
func waitClients(t *testing.T, sock string, n int) Status {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		st, err := NewClient(sock).Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Exports) == 1 && len(st.Exports[0].Clients) == n {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %d clients: status %+v", n, st)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// goExport runs a minimal handshake to transmission on export name.
func goExport(nc net.Conn, name string) error {
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	hello := make([]byte, nbd.ServerHelloSize)
	if _, err := nc.Read(hello); err != nil {
		return err
	}
	b := []byte{0, 0, 0, byte(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)}
	data, _ := nbd.InfoRequest{Name: name}.AppendBinary(nil)
	b, _ = nbd.OptionHeader{Option: nbd.OptGo, Length: uint32(len(data))}.AppendBinary(b)
	if _, err := nc.Write(append(b, data...)); err != nil {
		return err
	}
	for {
		hdr := make([]byte, nbd.OptionReplyHeaderSize)
		if _, err := io.ReadFull(nc, hdr); err != nil {
			return err
		}
		var h nbd.OptionReplyHeader
		if err := h.UnmarshalBinary(hdr); err != nil {
			return err
		}
		if _, err := io.ReadFull(nc, make([]byte, h.Length)); err != nil {
			return err
		}
		if h.Type == nbd.RepAck {
			return nil
		}
		if h.Type.IsError() {
			return errors.New(h.Type.String())
		}
	}
}

func TestFenceOverTheSocket(t *testing.T) {
	ctx := context.Background()
	sock, nbdAddr, dataDir, _ := startControl(t)
	drv, err := OpenDriver(ctx, sock, "file://"+dataDir, false, t.Output())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := drv.Create(ctx, volume.CreateOptions{Name: "vm1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	nc, err := net.Dial("tcp", nbdAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if err := goExport(nc, "vm1"); err != nil {
		t.Fatal(err)
	}
	waitClients(t, sock, 1)
	c := NewClient(sock)
	cut, err := c.Fence(ctx, "127.0.0.1", "")
	if err != nil || cut != 1 {
		t.Fatalf("fence: cut %d, %v", cut, err)
	}
	list, err := c.Fences(ctx)
	if err != nil || len(list) != 1 || list[0].Client != "127.0.0.1" {
		t.Fatalf("fences: %+v %v", list, err)
	}
	again, err := net.Dial("tcp", nbdAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if err := goExport(again, "vm1"); err == nil || !strings.Contains(err.Error(), "POLICY") {
		t.Fatalf("a fenced client got in: %v", err)
	}
	if err := c.Unfence(ctx, "127.0.0.1", ""); err != nil {
		t.Fatal(err)
	}
	if err := c.Unfence(ctx, "127.0.0.1", ""); !errors.Is(err, volume.ErrNotFound) {
		t.Fatalf("second unfence: %v, want ErrNotFound", err)
	}
	if _, err := c.Fence(ctx, "not a client", ""); err == nil {
		t.Fatal("an invalid fence client was accepted")
	}
}
