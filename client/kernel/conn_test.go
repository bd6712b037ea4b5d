package kernel

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nltest"
	"golang.org/x/sync/semaphore"
	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/nbd"
)

const testFamilyID = 0x21

// fakeKernel answers generic-netlink requests like the nbd driver would,
// through handle, which gets each nbd command and returns the reply's
// attributes (nil: acknowledgement only) or an errno.
type fakeKernel struct {
	t       testing.TB
	noNBD   bool // GETFAMILY answers ENOENT
	handle  func(cmd command, attrs []byte) ([]byte, unix.Errno)
	flags   []netlink.HeaderFlags
	version []uint8
}

func (k *fakeKernel) fn(reqs []netlink.Message) ([]netlink.Message, error) {
	if len(reqs) == 0 {
		k.t.Error("Receive without a pending reply")
		return nil, errors.New("fake kernel: nothing to receive")
	}
	req := reqs[0]
	var gm genetlink.Message
	if err := gm.UnmarshalBinary(req.Data); err != nil {
		k.t.Errorf("request is not a genetlink message: %v", err)
		return nltest.Error(int(unix.EINVAL), reqs)
	}
	k.flags = append(k.flags, req.Header.Flags)
	k.version = append(k.version, gm.Header.Version)
	reply := func(typ netlink.HeaderType, cmd uint8, attrs []byte) ([]netlink.Message, error) {
		body, _ := (&genetlink.Message{Header: genetlink.Header{Command: cmd, Version: 1}, Data: attrs}).MarshalBinary()
		msgs := []netlink.Message{{Header: netlink.Header{Type: typ, Sequence: req.Header.Sequence, PID: nltest.PID}, Data: body}}
		ack, _ := nltest.Error(0, reqs)
		return append(msgs, ack...), nil
	}
	switch req.Header.Type {
	case unix.GENL_ID_CTRL:
		if k.noNBD {
			return nltest.Error(int(unix.ENOENT), reqs)
		}
		return reply(unix.GENL_ID_CTRL, unix.CTRL_CMD_NEWFAMILY, familyAttrs(testFamilyID, map[string]uint32{multicastGroup: 7}))
	case testFamilyID:
		attrs, errno := k.handle(command(gm.Header.Command), gm.Data)
		if errno != 0 {
			return nltest.Error(int(errno), reqs)
		}
		if attrs == nil {
			return nltest.Error(0, reqs)
		}
		return reply(testFamilyID, gm.Header.Command, attrs)
	}
	k.t.Errorf("request to netlink family %#x", req.Header.Type)
	return nltest.Error(int(unix.ENOENT), reqs)
}

// fakeSysfs writes /sys/block/nbdN attributes under a temporary root.
type fakeSysfs string

func (s fakeSysfs) set(t testing.TB, index int, attrs map[string]string) {
	t.Helper()
	dir := filepath.Join(string(s), "block", "nbd"+strconv.Itoa(index))
	for name, v := range attrs {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func (s fakeSysfs) remove(t testing.TB, index int, attr string) {
	t.Helper()
	if err := os.Remove(filepath.Join(string(s), "block", "nbd"+strconv.Itoa(index), attr)); err != nil {
		t.Fatal(err)
	}
}

func (s fakeSysfs) get(t testing.TB, index int, attr string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(string(s), "block", "nbd"+strconv.Itoa(index), attr))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// connected writes what nbd_genl_connect leaves in sysfs for device index
// configured with attrs: its pid, its size in sectors, and its backend
// identifier if attrs has one and the kernel keeps it (Linux 5.14 and
// later).
func (s fakeSysfs) connected(t testing.TB, index int, attrs []byte, keepsBackend bool) {
	t.Helper()
	a := attrsOf(t, attrs)
	files := map[string]string{"pid": "4242", "size": "2048", "ro": "0"}
	if b, ok := a[attrSizeBytes]; ok {
		files["size"] = strconv.FormatUint(binary.NativeEndian.Uint64(b)/512, 10)
	}
	if b, ok := a[attrBackendIdentifier]; ok && keepsBackend {
		files["backend"] = strings.TrimSuffix(string(b), "\x00")
	}
	s.set(t, index, files)
}

// resized writes the size a RECONFIGURE with attrs gives its device, if
// it gives one.
func (s fakeSysfs) resized(t testing.TB, index int, attrs []byte) {
	t.Helper()
	if b, ok := attrsOf(t, attrs)[attrSizeBytes]; ok {
		s.set(t, index, map[string]string{"size": strconv.FormatUint(binary.NativeEndian.Uint64(b)/512, 10)})
	}
}

// countingConn is newTestConn on a kernel that accepts every command and
// counts them in *sent.
func countingConn(t testing.TB) (_ *Conn, _ fakeSysfs, sent *int) {
	t.Helper()
	sent = new(int)
	c, sys := newTestConn(t, &fakeKernel{handle: func(command, []byte) ([]byte, unix.Errno) {
		*sent++
		return nil, 0
	}})
	return c, sys, sent
}

func newTestConn(t testing.TB, k *fakeKernel) (*Conn, fakeSysfs) {
	t.Helper()
	k.t = t
	sys := fakeSysfs(t.TempDir())
	c, err := newConn(context.Background(), nltest.Dial(k.fn), string(sys))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, sys
}

func testSockets(t testing.TB, n int) []*os.File {
	t.Helper()
	var out []*os.File
	for range n {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
		if err != nil {
			t.Fatal(err)
		}
		a, b := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
		t.Cleanup(func() { a.Close(); b.Close() })
		out = append(out, a)
	}
	return out
}

// sockFDs decodes the descriptors of NBD_ATTR_SOCKETS.
func sockFDs(t testing.TB, attrs []byte) []uint32 {
	t.Helper()
	ad, err := netlink.NewAttributeDecoder(attrs)
	if err != nil {
		t.Fatal(err)
	}
	var fds []uint32
	for ad.Next() {
		if ad.Type() != attrSockets {
			continue
		}
		ad.Nested(func(socks *netlink.AttributeDecoder) error {
			for socks.Next() {
				socks.Nested(func(item *netlink.AttributeDecoder) error {
					for item.Next() {
						if item.Type() == sockFD {
							fds = append(fds, item.Uint32())
						}
					}
					return nil
				})
			}
			return nil
		})
	}
	if err := ad.Err(); err != nil {
		t.Fatal(err)
	}
	return fds
}

func attrsOf(t testing.TB, b []byte) map[uint16][]byte {
	t.Helper()
	attrs, err := netlink.UnmarshalAttributes(b)
	if err != nil {
		t.Fatal(err)
	}
	out := map[uint16][]byte{}
	for _, a := range attrs {
		out[a.Type&^nested] = a.Data
	}
	return out
}

func TestDialWithoutModule(t *testing.T) {
	k := &fakeKernel{t: t, noNBD: true}
	_, err := newConn(context.Background(), nltest.Dial(k.fn), t.TempDir())
	if !errors.Is(err, ErrModuleNotLoaded) {
		t.Fatalf("newConn error = %v, want ErrModuleNotLoaded", err)
	}
	if got := err.Error(); got != "the nbd kernel module is not loaded: modprobe nbd" {
		t.Errorf("error text %q", got)
	}
}

func TestConnect(t *testing.T) {
	socks := testSockets(t, 2)
	var gotFDs []uint32
	var gotAttrs, gotSize map[uint16][]byte
	var sys fakeSysfs
	k := &fakeKernel{handle: func(cmd command, attrs []byte) ([]byte, unix.Errno) {
		switch cmd {
		case cmdConnect:
			gotFDs, gotAttrs = sockFDs(t, attrs), attrsOf(t, attrs)
			sys.connected(t, 5, attrs, true)
			return concat(nla(attrIndex, u32(5))), 0
		case cmdReconfigure:
			gotSize = attrsOf(t, attrs)
			sys.resized(t, 5, attrs)
			return nil, 0
		}
		t.Errorf("command %v, want CONNECT, then RECONFIGURE", cmd)
		return nil, unix.EINVAL
	}}
	c, sys := newTestConn(t, k)
	index, err := c.Connect(context.Background(), Config{
		Sockets: socks, Size: 64 << 20, BlockSize: 4096, Index: AnyDevice, Backend: "nbd://127.0.0.1:10809/disk",
		ServerFlags: nbd.FlagHasFlags | nbd.FlagCanMultiConn, Timeout: 5 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	if index != 5 {
		t.Errorf("index = %d, want 5", index)
	}
	wantFDs := []uint32{uint32(socks[0].Fd()), uint32(socks[1].Fd())}
	if diff := cmp.Diff(wantFDs, gotFDs); diff != "" {
		t.Errorf("socket descriptors (-want +got):\n%s", diff)
	}
	if _, ok := gotAttrs[attrIndex]; ok {
		t.Error("NBD_ATTR_INDEX sent for AnyDevice")
	}
	if got := string(gotAttrs[attrBackendIdentifier]); got != "nbd://127.0.0.1:10809/disk\x00" {
		t.Errorf("backend %q", got)
	}
	// The device starts empty: udev hears of it before the kernel writes
	// its backend, and must not probe a full-size device then. The size
	// follows, with the backend in place.
	if got := binary.NativeEndian.Uint64(gotAttrs[attrSizeBytes]); got != 0 {
		t.Errorf("CONNECT with size %d, want 0", got)
	}
	if got := binary.NativeEndian.Uint64(gotSize[attrSizeBytes]); got != 64<<20 {
		t.Errorf("RECONFIGURE with size %d, want %d", got, 64<<20)
	}
	if got := string(gotSize[attrBackendIdentifier]); got != "nbd://127.0.0.1:10809/disk\x00" {
		t.Errorf("RECONFIGURE with backend %q", got)
	}
	if _, ok := gotSize[attrSockets]; ok {
		t.Error("RECONFIGURE with sockets")
	}
	if got := sys.get(t, 5, "size"); got != strconv.Itoa(64<<20/512) {
		t.Errorf("size in sectors %s after Connect", got)
	}
	// The family lookup and the CONNECT both ask for an acknowledgement,
	// with the family's version.
	for i, f := range k.flags {
		if f != netlink.Request|netlink.Acknowledge || k.version[i] != 1 {
			t.Errorf("request %d: flags %v version %d", i, f, k.version[i])
		}
	}
}

func TestConnectErrors(t *testing.T) {
	tests := []struct {
		name     string
		errno    unix.Errno
		index    int
		wantIs   []error
		wantText []string
	}{
		{name: "busy", errno: unix.EBUSY, index: 2, wantIs: []error{ErrBusy, unix.EBUSY},
			wantText: []string{"NBD_CMD_CONNECT of /dev/nbd2", "in use"}},
		{name: "invalid", errno: unix.EINVAL, index: AnyDevice, wantIs: []error{unix.EINVAL},
			wantText: []string{"dmesg"}},
		{name: "not root", errno: unix.EPERM, index: 0, wantIs: []error{os.ErrPermission},
			wantText: []string{"CAP_SYS_ADMIN"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := &fakeKernel{handle: func(command, []byte) ([]byte, unix.Errno) { return nil, tt.errno }}
			c, _ := newTestConn(t, k)
			_, err := c.Connect(context.Background(), Config{Sockets: testSockets(t, 1), Size: 4096, Index: tt.index})
			var oe *OpError
			if !errors.As(err, &oe) {
				t.Fatalf("error %v (%T), want an *OpError", err, err)
			}
			for _, target := range tt.wantIs {
				if !errors.Is(err, target) {
					t.Errorf("error %q is not %v", err, target)
				}
			}
			for _, s := range tt.wantText {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q lacks %q", err, s)
				}
			}
		})
	}
}

func TestConnectRefusesBeforeAsking(t *testing.T) {
	k := &fakeKernel{handle: func(cmd command, _ []byte) ([]byte, unix.Errno) {
		t.Errorf("%v sent for an invalid configuration", cmd)
		return nil, 0
	}}
	c, _ := newTestConn(t, k)
	_, err := c.Connect(context.Background(), Config{Sockets: testSockets(t, 2), Size: 4096, Index: AnyDevice,
		ServerFlags: nbd.FlagHasFlags})
	if !errors.Is(err, ErrNoMultiConn) {
		t.Fatalf("error %v, want ErrNoMultiConn", err)
	}
}

func TestConnectMaxRequestBytes(t *testing.T) {
	var cmds []command
	k := &fakeKernel{handle: func(cmd command, _ []byte) ([]byte, unix.Errno) {
		cmds = append(cmds, cmd)
		if cmd == cmdConnect {
			return nla(attrIndex, u32(1)), 0
		}
		return nil, 0
	}}
	c, sys := newTestConn(t, k)
	sys.set(t, 1, map[string]string{"queue/max_sectors_kb": "1280"})
	cfg := Config{Sockets: testSockets(t, 1), Size: 4096, Index: AnyDevice, MaxRequestBytes: 64 << 10}
	if _, err := c.Connect(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	if got := sys.get(t, 1, "queue/max_sectors_kb"); got != "64" {
		t.Errorf("max_sectors_kb = %s, want 64", got)
	}
	// A larger limit than the queue's leaves it alone.
	cfg.MaxRequestBytes = 32 << 20
	if _, err := c.Connect(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	if got := sys.get(t, 1, "queue/max_sectors_kb"); got != "64" {
		t.Errorf("max_sectors_kb = %s, want 64 still", got)
	}
	// When the limit cannot be set, the device is disconnected again.
	cmds = nil
	sys.remove(t, 1, "queue/max_sectors_kb")
	sys.set(t, 1, map[string]string{"queue/max_sectors_kb/x": ""}) // a directory: unwritable
	cfg.MaxRequestBytes = 4096
	if _, err := c.Connect(context.Background(), cfg); err == nil {
		t.Fatal("Connect succeeded with an unwritable max_sectors_kb")
	}
	if diff := cmp.Diff([]command{cmdConnect, cmdDisconnect}, cmds); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
}

func TestStatus(t *testing.T) {
	k := &fakeKernel{handle: func(cmd command, attrs []byte) ([]byte, unix.Errno) {
		if cmd != cmdStatus {
			t.Errorf("command %v", cmd)
		}
		list := []deviceStatus{{Index: 1}, {Index: 0, Connected: true}}
		if len(attrs) > 0 { // one device asked for
			i, err := parseIndex(attrs)
			if err != nil {
				t.Fatal(err)
			}
			list = nil
			if i <= 1 {
				list = []deviceStatus{{Index: i, Connected: i == 0}}
			}
		}
		b, _ := encodeDeviceList(list)
		return b, 0
	}}
	c, sys := newTestConn(t, k)
	sys.set(t, 0, map[string]string{"pid": "123", "backend": "nbd://h:10809/e", "size": "2048", "ro": "1",
		"queue/logical_block_size": "4096"})
	sys.set(t, 1, map[string]string{"size": "0", "ro": "0"})

	got, err := c.Status(context.Background(), AnyDevice)
	if err != nil {
		t.Fatal(err)
	}
	want := []Device{
		{Index: 0, Connected: true, PID: 123, Backend: "nbd://h:10809/e", Size: 1 << 20, ReadOnly: true, BlockSize: 4096},
		{Index: 1},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Status(all) (-want +got):\n%s", diff)
	}
	if !got[0].Running() || got[1].Running() {
		t.Errorf("Running() = %v, %v; want true, false", got[0].Running(), got[1].Running())
	}

	got, err = c.Status(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want[1:], got); diff != "" {
		t.Errorf("Status(1) (-want +got):\n%s", diff)
	}
	if _, err := c.Status(context.Background(), 9); !errors.Is(err, ErrNoDevice) {
		t.Errorf("Status(9) error = %v, want ErrNoDevice", err)
	}
}

func TestDisconnect(t *testing.T) {
	var got []int
	k := &fakeKernel{handle: func(cmd command, attrs []byte) ([]byte, unix.Errno) {
		i, err := parseIndex(attrs)
		if cmd != cmdDisconnect || err != nil {
			t.Errorf("command %v, index error %v", cmd, err)
		}
		got = append(got, i)
		return nil, 0
	}}
	c, sys := newTestConn(t, k)
	sys.set(t, 3, map[string]string{"size": "0"})
	if err := c.Disconnect(context.Background(), 3); err != nil {
		t.Fatal(err)
	}
	if err := c.Disconnect(context.Background(), 4); !errors.Is(err, ErrNoDevice) {
		t.Errorf("Disconnect(4) = %v, want ErrNoDevice", err)
	}
	if diff := cmp.Diff([]int{3}, got); diff != "" {
		t.Errorf("disconnected (-want +got):\n%s", diff)
	}
}

func TestReconfigure(t *testing.T) {
	var sys fakeSysfs
	var gotAttrs map[uint16][]byte
	var gotFDs []uint32
	resize := true // whether the fake kernel applies SIZE_BYTES
	k := &fakeKernel{handle: func(cmd command, attrs []byte) ([]byte, unix.Errno) {
		if cmd != cmdReconfigure {
			t.Errorf("command %v", cmd)
		}
		gotAttrs, gotFDs = attrsOf(t, attrs), sockFDs(t, attrs)
		if size, ok := gotAttrs[attrSizeBytes]; ok && resize {
			n := uint64(size[0]) | uint64(size[1])<<8 | uint64(size[2])<<16 | uint64(size[3])<<24
			sys.set(t, 2, map[string]string{"size": strconv.FormatUint(n/512, 10)})
		}
		return nil, 0
	}}
	c, s := newTestConn(t, k)
	sys = s
	const backend = "nbd://h:10809/e"
	sys.set(t, 2, map[string]string{"pid": "77", "backend": backend, "size": "2048", "ro": "0"})

	socks := testSockets(t, 2)
	if err := c.Reconfigure(context.Background(), 2, Reconfig{Sockets: socks, Backend: backend}); err != nil {
		t.Fatal(err)
	}
	// The kernel insists on the backend.
	if got := string(gotAttrs[attrBackendIdentifier]); got != backend+"\x00" {
		t.Errorf("backend %q", got)
	}
	if _, ok := gotAttrs[attrSizeBytes]; ok {
		t.Error("NBD_ATTR_SIZE_BYTES sent without a size")
	}
	if diff := cmp.Diff([]uint32{uint32(socks[0].Fd()), uint32(socks[1].Fd())}, gotFDs); diff != "" {
		t.Errorf("descriptors (-want +got):\n%s", diff)
	}
	if err := c.Reconfigure(context.Background(), 2, Reconfig{Size: 2 << 20, Backend: backend}); err != nil {
		t.Fatal(err)
	}

	resize = false
	err := c.Reconfigure(context.Background(), 2, Reconfig{Size: 4 << 20, Backend: backend})
	if !errors.Is(err, ErrResizeUnsupported) {
		t.Errorf("resize ignored by the kernel: error %v, want ErrResizeUnsupported", err)
	}

	sys.remove(t, 2, "pid")
	if err := c.Reconfigure(context.Background(), 2, Reconfig{Sockets: socks, Backend: backend}); !errors.Is(err, ErrNotConnected) {
		t.Errorf("Reconfigure of a stopped device: %v, want ErrNotConnected", err)
	}
	if err := c.Reconfigure(context.Background(), 6, Reconfig{Sockets: socks, Backend: backend}); !errors.Is(err, ErrNoDevice) {
		t.Errorf("Reconfigure of a missing device: %v, want ErrNoDevice", err)
	}
}

// A RECONFIGURE never shrinks a device: a size read before someone else
// grew it is refused, and nothing reaches the kernel. The same size is a
// resize that changes nothing.
func TestReconfigureNeverShrinks(t *testing.T) {
	c, sys, sent := countingConn(t)
	const backend = "nbd://h:10809/e"
	sys.set(t, 2, map[string]string{"pid": "77", "backend": backend, "size": "4096", "ro": "0"}) // 2 MiB
	err := c.Reconfigure(context.Background(), 2, Reconfig{Size: 1 << 20, Backend: backend})
	if !errors.Is(err, ErrWouldShrink) || !strings.Contains(err.Error(), "from 2097152 to 1048576 bytes") {
		t.Errorf("Reconfigure to 1 MiB of a 2 MiB device: %v, want ErrWouldShrink naming both sizes", err)
	}
	if *sent != 0 {
		t.Errorf("%d commands sent to the kernel", *sent)
	}
	if err := c.Reconfigure(context.Background(), 2, Reconfig{Size: 2 << 20, Backend: backend}); err != nil || *sent != 1 {
		t.Errorf("Reconfigure to its own size: %v, %d commands; want success, 1", err, *sent)
	}
}

// TestReconfigureChecksBackend checks that a device is reconfigured only if
// it is still attached to the export asked for: the kernel itself does not
// check a device that has no backend identifier.
func TestReconfigureChecksBackend(t *testing.T) {
	const backend = "nbd://storage-a:10809/vm1"
	tests := []struct {
		name    string
		has     string // the device's backend in sysfs, "" for none
		asked   string // Reconfig.Backend
		wantErr []string
	}{
		{name: "its own", has: backend, asked: backend},
		{name: "none asked, none had", has: "", asked: ""},
		{name: "reused by an attach without a backend", has: "", asked: backend,
			wantErr: []string{"NBD_CMD_RECONFIGURE of /dev/nbd2: device is attached to another export: its backend is none, not \"" + backend + "\""}},
		{name: "reused by another export", has: "nbd://storage-b:10809/vm9", asked: backend,
			wantErr: []string{`its backend is "nbd://storage-b:10809/vm9", not "` + backend + `"`, "lvnbd list"}},
		{name: "none asked, one had", has: backend, asked: "",
			wantErr: []string{`its backend is "` + backend + `", not ""`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, sys, sent := countingConn(t)
			attrs := map[string]string{"pid": "77", "size": "2048", "ro": "0"}
			if tt.has != "" {
				attrs["backend"] = tt.has
			}
			sys.set(t, 2, attrs)
			err := c.Reconfigure(context.Background(), 2, Reconfig{Sockets: testSockets(t, 1), Backend: tt.asked})
			if len(tt.wantErr) == 0 {
				if err != nil || *sent != 1 {
					t.Fatalf("Reconfigure: %v, %d commands sent; want success, 1", err, *sent)
				}
				return
			}
			if !errors.Is(err, ErrWrongBackend) {
				t.Fatalf("Reconfigure: %v, want ErrWrongBackend", err)
			}
			for _, s := range tt.wantErr {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q lacks %q", err, s)
				}
			}
			if *sent != 0 {
				t.Errorf("%d commands sent to the kernel", *sent)
			}
		})
	}
}

// TestReconfigureSocketsApartFromSize checks that sockets and a size never
// go in one RECONFIGURE: the kernel would resize first, and the resize
// waits for the I/O that waits for the sockets.
func TestReconfigureSocketsApartFromSize(t *testing.T) {
	k := &fakeKernel{handle: func(cmd command, _ []byte) ([]byte, unix.Errno) {
		t.Errorf("%v sent", cmd)
		return nil, 0
	}}
	c, sys := newTestConn(t, k)
	sys.set(t, 2, map[string]string{"pid": "77", "backend": "nbd://h:10809/e", "size": "2048", "ro": "0"})
	err := c.Reconfigure(context.Background(), 2, Reconfig{Sockets: testSockets(t, 1), Size: 2 << 20, Backend: "nbd://h:10809/e"})
	if !errors.Is(err, errBadConfig) || !strings.Contains(err.Error(), "give the sockets first, then the size") {
		t.Errorf("Reconfigure with sockets and a size: %v, want an invalid configuration", err)
	}
}

func TestWatchLoop(t *testing.T) {
	linkDead := func(index uint32) netlink.Message {
		body, _ := (&genetlink.Message{Header: genetlink.Header{Command: uint8(cmdLinkDead), Version: 1},
			Data: nla(attrIndex, u32(index))}).MarshalBinary()
		return netlink.Message{Header: netlink.Header{Type: testFamilyID}, Data: body}
	}
	other := linkDead(9)
	other.Header.Type = testFamilyID + 1 // another family's notification
	status, _ := (&genetlink.Message{Header: genetlink.Header{Command: uint8(cmdStatus)}}).MarshalBinary()
	garbled := linkDead(0)
	garbled.Data = garbled.Data[:6]

	steps := []struct {
		msgs []netlink.Message
		err  error
	}{
		{msgs: []netlink.Message{linkDead(3), other}},
		{err: &netlink.OpError{Op: "receive", Err: os.NewSyscallError("recvmsg", unix.ENOBUFS)}},
		{msgs: []netlink.Message{{Header: netlink.Header{Type: testFamilyID}, Data: status}, garbled, linkDead(4)}},
		{err: errSocketFailed},
	}
	receive := func() ([]netlink.Message, error) {
		if len(steps) == 0 {
			t.Fatal("receive after the socket failed")
		}
		s := steps[0]
		steps = steps[1:]
		return s.msgs, s.err
	}
	out := make(chan int)
	var failed error
	go func() {
		defer close(out)
		failed = watchLoop(context.Background(), testFamilyID, receive, out)
	}()
	var got []int
	for i := range out {
		got = append(got, i)
	}
	// ENOBUFS and a LINK_DEAD without a readable index both mean "some
	// device": EventsLost.
	if diff := cmp.Diff([]int{3, EventsLost, EventsLost, 4}, got); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
	// A socket that fails with ctx still live is said, for a caller that
	// cannot go on without the notifications (lvnbd list --watch).
	if !errors.Is(failed, errSocketFailed) {
		t.Errorf("watchLoop returned %v, want the socket's error %v", failed, errSocketFailed)
	}
}

var errSocketFailed = errors.New("use of closed file")

func TestWatchLoopStopsWithContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	receive := func() ([]netlink.Message, error) {
		body, _ := (&genetlink.Message{Header: genetlink.Header{Command: uint8(cmdLinkDead)},
			Data: nla(attrIndex, u32(1))}).MarshalBinary()
		return []netlink.Message{{Header: netlink.Header{Type: testFamilyID}, Data: body}}, nil
	}
	done := make(chan struct{})
	out := make(chan int)
	var stopped error
	go func() {
		defer close(done)
		stopped = watchLoop(ctx, testFamilyID, receive, out)
	}()
	<-out
	cancel() // nobody reads any more: the loop must not block on sending
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("watchLoop did not return after cancel")
	}
	if stopped != nil {
		t.Errorf("watchLoop stopped by ctx returned %v, want nil", stopped)
	}
}

// A socket closed because ctx is done fails its receive: that is the end
// ctx asked for, not a failure.
func TestWatchLoopClosedByContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	receive := func() ([]netlink.Message, error) {
		cancel() // as context.AfterFunc closing the socket under receive
		return nil, errSocketFailed
	}
	if err := watchLoop(ctx, testFamilyID, receive, make(chan int)); err != nil {
		t.Errorf("watchLoop = %v, want nil", err)
	}
}

// SubscribeLinkDead's stopped says why the events ended, over a real
// generic netlink socket (joined to nlctrl's group: no nbd module needed):
// nil once ctx is done, the socket's error when it fails first.
func TestSubscribeLinkDeadSaysWhyItStopped(t *testing.T) {
	for _, tc := range []struct {
		name    string
		failing bool
	}{{"ctx done", false}, {"socket failed", true}} {
		t.Run(tc.name, func(t *testing.T) {
			var sock *netlink.Conn
			c := &Conn{
				turn:   semaphore.NewWeighted(1),
				family: family{ID: testFamilyID, Groups: map[string]uint32{multicastGroup: unix.GENL_ID_CTRL}},
				dial: func() (*netlink.Conn, error) {
					var err error
					sock, err = netlink.Dial(unix.NETLINK_GENERIC, nil)
					return sock, err
				},
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			events, stopped, err := c.SubscribeLinkDead(ctx)
			if err != nil {
				t.Skipf("no generic netlink socket here: %v", err)
			}
			if tc.failing {
				sock.Close() // under the watch, ctx still live
			} else {
				cancel()
			}
			for range events {
			}
			err = stopped()
			switch {
			case tc.failing && (err == nil || !strings.Contains(err.Error(), "receiving nbd netlink notifications")):
				t.Errorf("stopped() = %v, want the socket's failure", err)
			case !tc.failing && err != nil:
				t.Errorf("stopped() = %v, want nil: ctx ended it", err)
			}
		})
	}
}

// A kernel before 5.14 ignores NBD_ATTR_BACKEND_IDENTIFIER: Connect finds
// no backend on the device it made, disconnects it again and says why,
// rather than return a device lvnbd could never find by its backend.
func TestConnectChecksTheKernelKeptTheBackend(t *testing.T) {
	const backend = "nbd://storage-a:10809/vm1"
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	release := unix.ByteSliceToString(u.Release[:])
	tests := []struct {
		name           string
		backend        string // Config.Backend
		keeps          bool   // the kernel keeps the backend
		other          string // the backend the kernel shows instead, if any
		disconnectFail bool
		wantErr        []string
	}{
		{name: "kept", backend: backend, keeps: true},
		{name: "none asked", backend: "", keeps: false},
		{name: "dropped by an old kernel", backend: backend, keeps: false, wantErr: []string{
			"NBD_CMD_CONNECT of /dev/nbd7: ", "Linux 5.14 or later", "this is Linux " + release,
			`block/nbd7/backend is missing (want "` + backend + `")`, "/dev/nbd7 was disconnected again"}},
		{name: "another", backend: backend, keeps: true, other: "nbd://storage-b:10809/vm9", wantErr: []string{
			"Linux 5.14 or later", `block/nbd7/backend holds "nbd://storage-b:10809/vm9", not "` + backend + `"`}},
		{name: "dropped, and the disconnect fails", backend: backend, keeps: false, disconnectFail: true, wantErr: []string{
			"Linux 5.14 or later", "disconnecting /dev/nbd7 again failed, it stays attached", "NBD_CMD_DISCONNECT of /dev/nbd7"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var sys fakeSysfs
			var sent []command
			k := &fakeKernel{handle: func(cmd command, attrs []byte) ([]byte, unix.Errno) {
				sent = append(sent, cmd)
				switch cmd {
				case cmdConnect:
					sys.connected(t, 7, attrs, tt.keeps)
					if tt.other != "" {
						sys.set(t, 7, map[string]string{"backend": tt.other})
					}
					return concat(nla(attrIndex, u32(7))), 0
				case cmdReconfigure:
					sys.resized(t, 7, attrs)
				case cmdDisconnect:
					if i, err := parseIndex(attrs); err != nil || i != 7 {
						t.Errorf("DISCONNECT of %d (%v), want 7", i, err)
					}
					if tt.disconnectFail {
						return nil, unix.EIO
					}
				}
				return nil, 0
			}}
			c, s := newTestConn(t, k)
			sys = s
			index, err := c.Connect(context.Background(), Config{Sockets: testSockets(t, 1), Size: 1 << 20, Index: AnyDevice,
				Timeout: 30 * time.Second, Backend: tt.backend})
			if len(tt.wantErr) == 0 {
				if err != nil || index != 7 {
					t.Fatalf("Connect = %d, %v; want 7", index, err)
				}
				want := []command{cmdConnect, cmdReconfigure} // the size, after the backend
				if tt.backend == "" {
					want = want[:1]
				}
				if diff := cmp.Diff(want, sent); diff != "" {
					t.Errorf("commands (-want +got):\n%s", diff)
				}
				return
			}
			if !errors.Is(err, ErrBackendUnsupported) {
				t.Fatalf("Connect = %d, %v; want ErrBackendUnsupported", index, err)
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)

				}
			}
			if errors.Is(err, ErrStillAttached) != tt.disconnectFail {
				t.Errorf("errors.Is(%v, ErrStillAttached) = %t", err, !tt.disconnectFail)
			}
			if diff := cmp.Diff([]command{cmdConnect, cmdDisconnect}, sent); diff != "" {
				t.Errorf("commands (-want +got):\n%s", diff)
			}
		})
	}
}

// A device disconnected while something holds it open keeps its pid and
// backend in sysfs, but the kernel refuses to reconfigure it with EINVAL.
// Reconfigure says so, and what holds it, instead of a bare "invalid
// argument"; another EINVAL, on a device still bound, is left as it is.
// Bound asks with a RECONFIGURE of only the index and backend: the kernel
// takes it from a bound device, refuses it (EINVAL) from one disconnected
// while held open; any other refusal is an error.
func TestBound(t *testing.T) {
	const backend = "nbd://storage-a:10809/vm1"
	for _, tc := range []struct {
		errno unix.Errno
		bound bool
		err   bool
	}{
		{0, true, false},
		{unix.EINVAL, false, false},
		{unix.EPERM, false, true},
	} {
		k := &fakeKernel{handle: func(cmd command, attrs []byte) ([]byte, unix.Errno) {
			got := attrsOf(t, attrs)
			if cmd != cmdReconfigure || string(got[attrBackendIdentifier]) != backend+"\x00" || len(got) != 2 {
				t.Errorf("%v with attributes %v: want a RECONFIGURE of the index and backend only", cmd, got)
			}
			return nil, tc.errno
		}}
		c, _ := newTestConn(t, k)
		bound, err := c.Bound(context.Background(), 2, backend)
		if bound != tc.bound || (err != nil) != tc.err {
			t.Errorf("kernel answering %v: Bound = %v, %v; want %v, error %v", tc.errno, bound, err, tc.bound, tc.err)
		}
	}
}

func TestReconfigureOfADeviceDisconnectedWhileHeld(t *testing.T) {
	const backend = "nbd://storage-a:10809/vm1"
	tests := []struct {
		name    string
		bound   bool     // the kernel still has the device bound
		holders []string // under /sys/block/nbd2 (and its partitions)
		want    []string // in the error; nil: not ErrDisconnectedHeldOpen
	}{
		{name: "held by md", holders: []string{"holders/md127", "nbd2p1/holders/dm-3"}, want: []string{
			"NBD_CMD_RECONFIGURE of /dev/nbd2: invalid argument: device was disconnected and is still held open " +
				"(nbd2 held by md127, nbd2p1 held by dm-3; a process or Xen's blkback may hold it too): " +
				"the kernel gives /dev/nbd2 no connections again; it works again once closed and detached, then attached anew"}},
		{name: "held by blkback or a process", want: []string{
			"NBD_CMD_RECONFIGURE of /dev/nbd2: invalid argument: device was disconnected and is still held open " +
				"(a process or Xen's blkback may hold it): the kernel gives /dev/nbd2 no connections again; " +
				"it works again once closed and detached, then attached anew"}},
		{name: "another invalid argument", bound: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var probes int
			k := &fakeKernel{handle: func(cmd command, attrs []byte) ([]byte, unix.Errno) {
				if cmd != cmdReconfigure {
					t.Errorf("command %v", cmd)
				}
				if got := string(attrsOf(t, attrs)[attrBackendIdentifier]); got != backend+"\x00" {
					t.Errorf("backend %q", got)
				}
				if len(sockFDs(t, attrs)) == 0 {
					probes++
					if tt.bound {
						return nil, 0
					}
				}
				return nil, unix.EINVAL
			}}
			c, sys := newTestConn(t, k)
			sys.set(t, 2, map[string]string{"pid": "77", "backend": backend, "size": "2048"})
			for _, h := range tt.holders {
				if err := os.MkdirAll(filepath.Join(string(sys), "block", "nbd2", h), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			err := c.Reconfigure(context.Background(), 2, Reconfig{Sockets: testSockets(t, 1), Timeout: 30 * time.Second, Backend: backend})
			if !errors.Is(err, unix.EINVAL) {
				t.Fatalf("Reconfigure = %v, want EINVAL", err)
			}
			if probes != 1 {
				t.Errorf("%d RECONFIGUREs without sockets, want 1 to tell why the kernel refused", probes)
			}
			if tt.want == nil {
				if errors.Is(err, ErrDisconnectedHeldOpen) || strings.Contains(err.Error(), "held open") {
					t.Errorf("Reconfigure of a bound device = %q, want the kernel's error alone", err)
				}
				return
			}
			if !errors.Is(err, ErrDisconnectedHeldOpen) {
				t.Errorf("Reconfigure = %v, want ErrDisconnectedHeldOpen", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)

				}
			}
		})
	}
}

// deadlineSocket is a netlink socket to a fake kernel that, unlike
// nltest's, honours deadlines as a real one does. past is closed when a
// deadline in the past is set: an interrupted request.
type deadlineSocket struct {
	fn       nltest.Func
	mu       sync.Mutex
	deadline time.Time
	msgs     []netlink.Message
	past     chan struct{}
	pastOnce sync.Once
}

func (s *deadlineSocket) expired() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.deadline.IsZero() && !time.Now().Before(s.deadline)
}

func (s *deadlineSocket) Send(m netlink.Message) error {
	if s.expired() {
		return os.ErrDeadlineExceeded
	}
	msgs, err := s.fn([]netlink.Message{m})
	s.msgs = msgs
	return err
}

func (s *deadlineSocket) SendMessages(ms []netlink.Message) error {
	return errors.New("SendMessages not expected")
}

func (s *deadlineSocket) Receive() ([]netlink.Message, error) {
	if s.expired() {
		return nil, os.ErrDeadlineExceeded
	}
	msgs := s.msgs
	s.msgs = nil
	return msgs, nil
}

func (s *deadlineSocket) SetDeadline(t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deadline = t
	if !t.IsZero() && t.Before(time.Now()) {
		s.pastOnce.Do(func() { close(s.past) })
	}
	return nil
}

func (s *deadlineSocket) SetReadDeadline(t time.Time) error  { return s.SetDeadline(t) }
func (s *deadlineSocket) SetWriteDeadline(t time.Time) error { return s.SetDeadline(t) }
func (s *deadlineSocket) Close() error                       { return nil }

// Generic netlink carries a command out inside sendmsg. A CONNECT whose
// context ends just after has configured the device: Connect returns it,
// rather than an error for a device left attached that nobody knows of.
func TestConnectCancelledAfterTheKernelConfiguredTheDevice(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sock := &deadlineSocket{past: make(chan struct{})}
	var sys fakeSysfs
	k := &fakeKernel{t: t, handle: func(cmd command, attrs []byte) ([]byte, unix.Errno) {
		if cmd == cmdConnect {
			sys.connected(t, 4, attrs, true)
			// Ctrl-C, or the daemon stopping, as the kernel answers.
			cancel()
			select {
			case <-sock.past:
			case <-time.After(10 * time.Second):
				t.Error("the cancellation did not interrupt the netlink socket")
			}
			return concat(nla(attrIndex, u32(4))), 0
		}
		if cmd == cmdReconfigure { // the size, which Connect gives however ctx ended
			sys.resized(t, 4, attrs)
			return nil, 0
		}
		return encodeDeviceListOrFail(t, []deviceStatus{{Index: 4, Connected: true}}), 0
	}}
	sock.fn = k.fn
	sys = fakeSysfs(t.TempDir())
	c, err := newConn(context.Background(), netlink.NewConn(sock, nltest.PID), string(sys))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	index, err := c.Connect(ctx, Config{Sockets: testSockets(t, 1), Size: 1 << 20, Index: AnyDevice,
		Timeout: 30 * time.Second, Backend: "nbd://storage-a:10809/vm1"})
	if err != nil || index != 4 {
		t.Fatalf("Connect cancelled after the kernel acted = %d, %v; want /dev/nbd4", index, err)
	}
	// And the Conn goes on working: the answer was read.
	if devs, err := c.Status(context.Background(), 4); err != nil || len(devs) != 1 || !devs[0].Running() {
		t.Errorf("Status after = %v, %v", devs, err)
	}
	// A context that ended before the request still stops it.
	if _, err := c.Status(ctx, 4); !errors.Is(err, context.Canceled) {
		t.Errorf("Status with a cancelled context = %v, want context.Canceled", err)
	}
}

func encodeDeviceListOrFail(t testing.TB, list []deviceStatus) []byte {
	t.Helper()
	b, err := encodeDeviceList(list)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// A lower request timeout would not reach the connections the device keeps
// (their TCP_USER_TIMEOUT stays at three quarters of the old one): it is
// refused before the kernel is asked, naming both and the way out. The same
// or a higher one, or a device whose timeout cannot be read, goes through.
func TestReconfigureRefusesALowerTimeout(t *testing.T) {
	c, sys, sent := countingConn(t)
	const backend = "nbd://h:10809/e"
	sys.set(t, 2, map[string]string{"pid": "77", "backend": backend, "size": "4096", "ro": "0", "queue/io_timeout": "30000"})
	err := c.Reconfigure(context.Background(), 2, Reconfig{Timeout: 10 * time.Second, Backend: backend})
	if !errors.Is(err, ErrTimeoutLowered) || !strings.Contains(err.Error(), "from 30s to 10s") || !strings.Contains(err.Error(), "pair down --leg") {
		t.Errorf("Reconfigure to 10s of a device with 30s: %v, want ErrTimeoutLowered naming both and the way out", err)
	}
	if *sent != 0 {
		t.Errorf("%d commands sent to the kernel", *sent)
	}
	// 29.5 s is set as 30 s, as the device has (attached with 29.5 s).
	for _, timeout := range []time.Duration{30 * time.Second, 29500 * time.Millisecond, time.Minute, 0} {
		if err := c.Reconfigure(context.Background(), 2, Reconfig{Timeout: timeout, Backend: backend}); err != nil {
			t.Errorf("Reconfigure to %v: %v", timeout, err)
		}
	}
	sys.set(t, 3, map[string]string{"pid": "77", "backend": backend, "size": "4096", "ro": "0"})
	if err := c.Reconfigure(context.Background(), 3, Reconfig{Timeout: 10 * time.Second, Backend: backend}); err != nil {
		t.Errorf("Reconfigure of a device without io_timeout: %v", err)
	}
}

// The size, given after the backend, not taken (refused, or ignored by the
// kernel): the empty device is disconnected again, and Connect says why.
func TestConnectUndoesADeviceThatGotNoSize(t *testing.T) {
	for name, tt := range map[string]struct {
		errno unix.Errno
		want  []string
	}{
		"refused": {errno: unix.EIO, want: []string{"giving /dev/nbd7 its size, after its backend: NBD_CMD_RECONFIGURE of /dev/nbd7",
			"/dev/nbd7 was disconnected again"}},
		"ignored": {want: []string{"giving /dev/nbd7 its size, after its backend", "asked for 1048576 bytes, the device has 0",
			"/dev/nbd7 was disconnected again"}},
	} {
		t.Run(name, func(t *testing.T) {
			var sys fakeSysfs
			var sent []command
			k := &fakeKernel{handle: func(cmd command, attrs []byte) ([]byte, unix.Errno) {
				sent = append(sent, cmd)
				switch cmd {
				case cmdConnect:
					sys.connected(t, 7, attrs, true)
					return concat(nla(attrIndex, u32(7))), 0
				case cmdReconfigure:
					return nil, tt.errno // and the size stays 0
				}
				return nil, 0
			}}
			c, s := newTestConn(t, k)
			sys = s
			_, err := c.Connect(context.Background(), Config{Sockets: testSockets(t, 1), Size: 1 << 20, Index: AnyDevice,
				Timeout: 30 * time.Second, Backend: "nbd://storage-a:10809/vm1"})
			if err == nil {
				t.Fatal("Connect succeeded")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if diff := cmp.Diff([]command{cmdConnect, cmdReconfigure, cmdDisconnect}, sent); diff != "" {
				t.Errorf("commands (-want +got):\n%s", diff)
			}
		})
	}
}

// A request the kernel takes long over (a DISCONNECT of a device stuck
// sending) holds up the others only as long as their contexts let them,
// and leaves the connection usable: nothing was sent for them.
func TestRequestsWaitTheirTurnOnlyAsLongAsTheirContext(t *testing.T) {
	inKernel, release := make(chan struct{}), make(chan struct{})
	c, _ := newTestConn(t, &fakeKernel{handle: func(cmd command, _ []byte) ([]byte, unix.Errno) {
		if cmd == cmdDisconnect {
			close(inKernel)
			<-release
		}
		return nil, 0
	}})
	done := make(chan error, 1)
	go func() {
		_, err := c.execute(context.Background(), cmdDisconnect, nil)
		done <- err
	}()
	<-inKernel
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.execute(ctx, cmdStatus, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("a request while another is in the kernel, its context cancelled: %v, want context.Canceled", err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("the disconnect: %v", err)
	}
	if _, err := c.execute(context.Background(), cmdStatus, nil); err != nil {
		t.Errorf("a request after the wait was given up: %v; want the connection still usable", err)
	}
}
