package kernel

import (
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// kernelDefaultTimeout is the request timer of a device configured without
// a timeout: nbd_set_cmd_timeout (drivers/block/nbd.c) arms the block
// layer's timer with 30 s then, and with several connections a request
// still moves to another one when it expires.
const kernelDefaultTimeout = 30 * time.Second

// userTimeout is the TCP_USER_TIMEOUT of a socket given to a device whose
// requests time out after requestTimeout (0: kernelDefaultTimeout).
//
// When a request times out, nbd_xmit_timeout shuts its connection down and
// resends the request on another one (or on the one RECONFIGURE brings).
// shutdown() does not purge what TCP has not delivered: the old socket would
// go on retransmitting the old write, and the server, whose end may still be
// open, could apply it after the resent copy and after a newer write to the
// same blocks. TCP_USER_TIMEOUT makes TCP abort the connection, and drop
// its unacknowledged data, once data has gone unacknowledged this long, so
// it has to expire before the request timer does. Three quarters of the
// timer, as the kernel rounds it up to whole seconds (so at least 750 ms),
// leaves a quarter for a request that waited in the socket's queue behind
// others before it was sent, and for the timers' slack; a shorter one would
// cut connections over brief stalls that the request timeout tolerates. It
// also counts against keepalive probes, so a dead idle link is found no
// later than with keepalive alone.
func userTimeout(requestTimeout time.Duration) time.Duration {
	if requestTimeout <= 0 {
		requestTimeout = kernelDefaultTimeout
	}
	whole := time.Duration(seconds(requestTimeout)) * time.Second
	return whole * 3 / 4
}

// socketKind is the kind of a socket given to the kernel.
type socketKind int

const (
	socketUnix socketKind = iota // a Unix stream socket
	socketTCP                    // a TCP socket, IPv4 or IPv6
)

// kindOf returns the kind of socket f is: the kernel takes only TCP and
// Unix stream sockets (nbd_get_socket).
func kindOf(f *os.File) (socketKind, error) {
	fd := int(f.Fd())
	domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return 0, fmt.Errorf("reading its domain: %w", err)
	}
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return 0, fmt.Errorf("reading its type: %w", err)
	}
	proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return 0, fmt.Errorf("reading its protocol: %w", err)
	}
	switch {
	case typ != unix.SOCK_STREAM:
	case domain == unix.AF_UNIX:
		return socketUnix, nil
	case (domain == unix.AF_INET || domain == unix.AF_INET6) && proto == unix.IPPROTO_TCP:
		return socketTCP, nil
	}
	return 0, fmt.Errorf("domain %d, type %d, protocol %d is neither TCP nor a Unix stream socket, the only ones the kernel takes",
		domain, typ, proto)
}

// prepareSockets readies files for the kernel, for a device whose requests
// time out after what requestTimeout returns (0: kernelDefaultTimeout),
// which is asked only if a file is a TCP socket. On each TCP
// socket it sets SO_LINGER {on, 0} and TCP_USER_TIMEOUT (userTimeout), so
// that a connection the kernel has given up on cannot deliver an old
// request later, over a newer write:
//   - With SO_LINGER 0 the socket's release (the kernel's last reference
//     goes when RECONFIGURE replaces a dead connection, or at teardown)
//     resets the connection and drops unsent data, instead of leaving an
//     orphan that retransmits it for minutes.
//   - TCP_USER_TIMEOUT aborts a connection whose data goes unacknowledged
//     before nbd resends the request elsewhere; a dead connection of a
//     device with several stays in the kernel, unreleased, until replaced.
//
// Unix sockets need neither: their data is delivered or dropped at once.
func prepareSockets(files []*os.File, requestTimeout func() (time.Duration, error)) error {
	ut := time.Duration(-1) // not asked yet
	for i, f := range files {
		kind, err := kindOf(f)
		if err != nil {
			return fmt.Errorf("socket %d: %w", i+1, err)
		}
		if kind != socketTCP {
			continue
		}
		if ut < 0 {
			timeout, err := requestTimeout()
			if err != nil {
				return err
			}
			ut = userTimeout(timeout)
		}
		fd := int(f.Fd())
		if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}); err != nil {
			return fmt.Errorf("socket %d: setting SO_LINGER: %w", i+1, err)
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(ut.Milliseconds())); err != nil {
			return fmt.Errorf("socket %d: setting TCP_USER_TIMEOUT: %w", i+1, err)
		}
	}
	return nil
}
