package kernel

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/nbd"
)

func TestUserTimeout(t *testing.T) {
	tests := []struct {
		request time.Duration
		want    time.Duration
	}{
		{request: 0, want: 22500 * time.Millisecond}, // the kernel's 30 s
		{request: time.Second, want: 750 * time.Millisecond},
		{request: 1500 * time.Millisecond, want: 1500 * time.Millisecond}, // the kernel's 2 s
		{request: 10 * time.Second, want: 7500 * time.Millisecond},
		{request: 30 * time.Second, want: 22500 * time.Millisecond},
		{request: MaxTimeout, want: 18 * time.Hour},
	}
	for _, tt := range tests {
		got := userTimeout(tt.request)
		if got != tt.want {
			t.Errorf("userTimeout(%v) = %v, want %v", tt.request, got, tt.want)
		}
		if kernelTimer := time.Duration(seconds(max(tt.request, time.Nanosecond))) * time.Second; tt.request > 0 && got >= kernelTimer {
			t.Errorf("userTimeout(%v) = %v, not below the kernel's %v", tt.request, got, kernelTimer)
		}
	}
}

// tcpSocket returns the client end of a loopback TCP connection as a file,
// as DialSockets hands it over, and the server's end.
func tcpSocket(t testing.TB) (*os.File, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return tcpSocketTo(t, ln)
}

func tcpSocketTo(t testing.TB, ln net.Listener) (*os.File, net.Conn) {
	t.Helper()
	f, srv, err := dialForTest(ln)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close(); srv.Close() })
	return f, srv
}

func dialForTest(ln net.Listener) (*os.File, net.Conn, error) {
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		return nil, nil, err
	}
	defer c.Close()
	srv, err := ln.Accept()
	if err != nil {
		return nil, nil, err
	}
	f, err := c.(*net.TCPConn).File()
	if err != nil {
		srv.Close()
		return nil, nil, err
	}
	return f, srv, nil
}

// sockOpts are the options of a socket the kernel was given.
type sockOpts struct {
	Linger      unix.Linger
	UserTimeout int // milliseconds; -1 for a Unix socket
}

func optsOf(t testing.TB, fd int) sockOpts {
	t.Helper()
	l, err := unix.GetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER)
	if err != nil {
		t.Fatalf("SO_LINGER of descriptor %d: %v", fd, err)
	}
	o := sockOpts{Linger: *l, UserTimeout: -1}
	if domain, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN); domain != unix.AF_UNIX {
		if o.UserTimeout, err = unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT); err != nil {
			t.Fatalf("TCP_USER_TIMEOUT of descriptor %d: %v", fd, err)
		}
	}
	return o
}

var (
	handedOverTCP = func(ms int) sockOpts { return sockOpts{Linger: unix.Linger{Onoff: 1, Linger: 0}, UserTimeout: ms} }
	untouchedUnix = sockOpts{UserTimeout: -1}
)

// The sockets Connect hands the kernel drop what they have not delivered
// when the kernel releases them (SO_LINGER 0) and give up on data left
// unacknowledged before the request timeout (TCP_USER_TIMEOUT): otherwise a
// write nbd gave up on and sent again could reach the server later, over a
// newer one. Unix sockets are taken as they are.
func TestConnectPreparesSockets(t *testing.T) {
	tcp := func() *os.File { f, _ := tcpSocket(t); return f }
	tests := []struct {
		name    string
		sockets []*os.File
		timeout time.Duration
		want    []sockOpts
	}{
		{name: "TCP", sockets: []*os.File{tcp()}, timeout: 8 * time.Second, want: []sockOpts{handedOverTCP(6000)}},
		{name: "TCP, timeout rounded up", sockets: []*os.File{tcp()}, timeout: 1100 * time.Millisecond, want: []sockOpts{handedOverTCP(1500)}},
		{name: "TCP, the kernel's default timeout", sockets: []*os.File{tcp()}, want: []sockOpts{handedOverTCP(22500)}},
		{name: "several TCP", sockets: []*os.File{tcp(), tcp()}, timeout: 4 * time.Second,
			want: []sockOpts{handedOverTCP(3000), handedOverTCP(3000)}},
		{name: "Unix", sockets: testSockets(t, 2), timeout: 8 * time.Second, want: []sockOpts{untouchedUnix, untouchedUnix}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []sockOpts
			k := &fakeKernel{handle: func(cmd command, attrs []byte) ([]byte, unix.Errno) {
				// The options as the kernel finds them when it looks the
				// descriptors up.
				for _, fd := range sockFDs(t, attrs) {
					got = append(got, optsOf(t, int(fd)))
				}
				return concat(nla(attrIndex, u32(3))), 0
			}}
			c, _ := newTestConn(t, k)
			_, err := c.Connect(context.Background(), Config{Sockets: tt.sockets, Size: 1 << 20, Index: AnyDevice,
				ServerFlags: nbd.FlagHasFlags | nbd.FlagCanMultiConn, Timeout: tt.timeout})
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("socket options at CONNECT (-want +got):\n%s", diff)
			}
		})
	}
}

func TestConnectRefusesOtherSockets(t *testing.T) {
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	f, err := udp.(*net.UDPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	pipeR, pipeW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pipeR.Close()
	defer pipeW.Close()
	for name, file := range map[string]*os.File{"UDP": f, "pipe": pipeR} {
		t.Run(name, func(t *testing.T) {
			k := &fakeKernel{handle: func(cmd command, _ []byte) ([]byte, unix.Errno) {
				t.Errorf("%v sent with a socket that cannot be prepared", cmd)
				return nil, 0
			}}
			c, _ := newTestConn(t, k)
			_, err := c.Connect(context.Background(), Config{Sockets: []*os.File{file}, Size: 1 << 20, Index: AnyDevice, Timeout: time.Second})
			if err == nil || !strings.Contains(err.Error(), "NBD_CMD_CONNECT: socket 1: ") {
				t.Errorf("Connect = %v, want an error about socket 1", err)
			}
		})
	}
}

// Reconfigure prepares its sockets for the timeout it sets, or for the one
// the device has.
func TestReconfigurePreparesSockets(t *testing.T) {
	const backend = "nbd://h:10809/e"
	tests := []struct {
		name      string
		unix      bool
		timeout   time.Duration
		ioTimeout string // queue/io_timeout in milliseconds, "" for none
		want      sockOpts
		wantErr   string
	}{
		{name: "new timeout", timeout: 40 * time.Second, ioTimeout: "30000", want: handedOverTCP(30000)},
		{name: "the device's timeout", ioTimeout: "10000", want: handedOverTCP(7500)},
		{name: "the device's timeout unknown", wantErr: "cannot tell its request timeout"},
		{name: "Unix, the device's timeout unknown", unix: true, want: untouchedUnix},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []sockOpts
			k := &fakeKernel{handle: func(cmd command, attrs []byte) ([]byte, unix.Errno) {
				for _, fd := range sockFDs(t, attrs) {
					got = append(got, optsOf(t, int(fd)))
				}
				return nil, 0
			}}
			c, sys := newTestConn(t, k)
			attrs := map[string]string{"pid": "77", "backend": backend, "size": "2048"}
			if tt.ioTimeout != "" {
				attrs["queue/io_timeout"] = tt.ioTimeout
			}
			sys.set(t, 2, attrs)
			sock := testSockets(t, 1)[0]
			if !tt.unix {
				sock, _ = tcpSocket(t)
			}
			err := c.Reconfigure(context.Background(), 2, Reconfig{Sockets: []*os.File{sock}, Timeout: tt.timeout, Backend: backend})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || got != nil {
					t.Fatalf("Reconfigure = %v, %d sockets sent; want an error containing %q, none sent", err, len(got), tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff([]sockOpts{tt.want}, got); diff != "" {
				t.Errorf("socket options at RECONFIGURE (-want +got):\n%s", diff)
			}
		})
	}
}

// connectKeeping connects sock with the fake kernel and returns the
// kernel's reference to it, a duplicate descriptor as sockfd_lookup takes
// one; the caller's file is closed, as attach closes it.
func connectKeeping(t *testing.T, sock *os.File, timeout time.Duration) int {
	t.Helper()
	kernelRef := -1
	k := &fakeKernel{handle: func(cmd command, attrs []byte) ([]byte, unix.Errno) {
		fd, err := unix.FcntlInt(uintptr(sockFDs(t, attrs)[0]), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		kernelRef = fd
		return concat(nla(attrIndex, u32(0))), 0
	}}
	c, _ := newTestConn(t, k)
	if _, err := c.Connect(context.Background(), Config{Sockets: []*os.File{sock}, Size: 1 << 20, Index: AnyDevice, Timeout: timeout}); err != nil {
		t.Fatal(err)
	}
	sock.Close()
	return kernelRef
}

// The reviewer's reproduction of a stale write, on loopback: a connection
// the kernel marked dead (shutdown) and then released (RECONFIGURE gave it
// a replacement) still held a write the server had not taken in. Without
// SO_LINGER 0 the orphaned socket goes on sending it, and the server gets
// the whole old write after the copy nbd resent on the new connection; with
// it, the server's end is reset and the rest of the old write is gone.
func TestReleasedSocketDropsItsStaleWrite(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// The server takes in little before it reads (the window it
	// advertises follows its receive buffer, which accepted sockets get
	// from the listener), and the client queues much more.
	raw, err := ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	raw.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 4096) })
	if err != nil {
		t.Fatal(err)
	}
	sock, srv := tcpSocketTo(t, ln)
	if err := unix.SetsockoptInt(int(sock.Fd()), unix.SOL_SOCKET, unix.SO_SNDBUF, 1<<20); err != nil {
		t.Fatal(err)
	}
	kernelRef := connectKeeping(t, sock, 30*time.Second)

	// The kernel sends a write while the server does not read.
	write := make([]byte, 1<<20)
	sent, err := unix.SendmsgN(kernelRef, write, nil, nil, unix.MSG_DONTWAIT)
	if err != nil {
		t.Fatal(err)
	}
	var rcvbuf int
	raw.Control(func(fd uintptr) { rcvbuf, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF) })
	if err != nil || sent <= 2*rcvbuf {
		t.Fatalf("queued %d bytes, the server takes %d (%v): the test cannot tell a dropped write", sent, rcvbuf, err)
	}
	// nbd_mark_nsock_dead shuts the socket down; nbd_reconnect_socket
	// puts the kernel's last reference when a fresh socket replaces it.
	if err := unix.Shutdown(kernelRef, unix.SHUT_RDWR); err != nil {
		t.Fatal(err)
	}
	unix.Close(kernelRef)

	got, err := io.Copy(io.Discard, srv)
	if !errors.Is(err, unix.ECONNRESET) || got >= int64(sent) {
		t.Errorf("the server read %d of the released connection's %d bytes, then %v; want fewer, then a reset", got, sent, err)
	}
}

// inNetworkNamespace runs fn on a thread of its own in a new network
// namespace, where fn makes its sockets (they stay there, whichever thread
// uses them later). The thread is never given back to the Go runtime: it
// ends with the goroutine.
func inNetworkNamespace(t *testing.T, fn func() error) {
	t.Helper()
	done := make(chan error)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			done <- err
			return
		}
		done <- fn()
	}()
	if err := <-done; errors.Is(err, unix.EPERM) {
		t.Skipf("needs CAP_SYS_ADMIN for a network namespace of its own (make test runs it as root): %v", err)
	} else if err != nil {
		t.Fatal(err)
	}
}

// setLinkUp brings the loopback interface of ctl's namespace up or down.
func setLinkUp(ctl int, up bool) error {
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(ctl, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	flags := ifr.Uint16() &^ unix.IFF_UP
	if up {
		flags |= unix.IFF_UP
	}
	ifr.SetUint16(flags)
	return unix.IoctlIfreq(ctl, unix.SIOCSIFFLAGS, ifr)
}

// The multi-connection case of the reviewer's reproduction: the link is
// cut while a write is unacknowledged. nbd resends the request on another
// connection at the request timeout but does not release the dead one, so
// only TCP_USER_TIMEOUT stops it from retransmitting the old write (for
// tcp_retries2, some 15 minutes) until the link heals. With it, TCP gives
// the connection up, and drops the write, before the request times out.
func TestCutLinkAbortsAnUnacknowledgedWrite(t *testing.T) {
	var (
		ctl  = -1
		sock *os.File
		srv  net.Conn
	)
	inNetworkNamespace(t, func() error {
		var err error
		if ctl, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		if err := setLinkUp(ctl, true); err != nil {
			return err
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		defer ln.Close()
		sock, srv, err = dialForTest(ln)
		return err
	})
	defer unix.Close(ctl)
	defer srv.Close()
	kernelRef := connectKeeping(t, sock, time.Second)
	defer unix.Close(kernelRef)

	if err := setLinkUp(ctl, false); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Write(kernelRef, []byte("W1-old")); err != nil {
		t.Fatal(err)
	}
	// Without TCP_USER_TIMEOUT nothing happens for minutes; the bound only
	// ends a failing test.
	fds := []unix.PollFd{{Fd: int32(kernelRef), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, int((20 * time.Second).Milliseconds()))
	if err != nil {
		t.Fatal(err)
	}
	soErr, err := unix.GetsockoptInt(kernelRef, unix.SOL_SOCKET, unix.SO_ERROR)
	if n != 1 || fds[0].Revents&unix.POLLERR == 0 || err != nil || soErr == 0 {
		t.Fatalf("after the link was cut under an unacknowledged write: poll %d, revents %#x, SO_ERROR %v (%v); "+
			"want the connection aborted", n, fds[0].Revents, unix.Errno(soErr), err)
	}
	t.Logf("connection aborted: %v", unix.Errno(soErr))
}
