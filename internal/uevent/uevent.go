// Package uevent reads the kernel's device events (uevents) from its netlink
// socket. The server learns from them at once that a device-mapper device it
// exports was reloaded with another size (an lvreduce or lvextend behind
// it), where a periodic look at the size could miss a shrink grown back in
// between.
//
// The socket is mdlayher/netlink's (already lvnbd's for the kernel's nbd
// family): uevents are not netlink messages, so they are read raw, and
// parsed here.
package uevent

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Event is one uevent.
type Event struct {
	// Action is what happened: add, remove, change, move, online,
	// offline, bind or unbind.
	Action string
	// DevPath is the device's path under /sys, such as
	// /devices/virtual/block/dm-3.
	DevPath string
	// Subsystem is the device's, such as block.
	Subsystem string
	// Seq is the kernel's sequence number of the event
	// (/sys/kernel/uevent_seqnum is the last one sent).
	Seq uint64
	// Vars are every KEY=VALUE of the event, those above included.
	Vars map[string]string
}

// Dev is the device number from MAJOR and MINOR, as unix.Mkdev makes it;
// false when the event names none.
func (e Event) Dev() (uint64, bool) {
	major, err1 := strconv.ParseUint(e.Vars["MAJOR"], 10, 32)
	minor, err2 := strconv.ParseUint(e.Vars["MINOR"], 10, 32)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return unix.Mkdev(uint32(major), uint32(minor)), true
}

// ErrMalformed is in Parse's error for what is not a kernel uevent.
var ErrMalformed = errors.New("malformed uevent")

// Parse reads one kernel uevent: "ACTION@DEVPATH" then KEY=VALUE pairs, each
// ended by a NUL byte. The pairs carry ACTION, DEVPATH, SUBSYSTEM and SEQNUM
// again, and they are what Event holds.
func Parse(b []byte) (Event, error) {
	head, rest, ok := bytes.Cut(b, []byte{0})
	if !ok || !bytes.Contains(head, []byte("@")) {
		return Event{}, fmt.Errorf("%w: no ACTION@DEVPATH header in %q", ErrMalformed, truncate(b))
	}
	e := Event{Vars: map[string]string{}}
	for len(rest) > 0 {
		var field []byte
		field, rest, _ = bytes.Cut(rest, []byte{0})
		if len(field) == 0 {
			continue
		}
		k, v, ok := strings.Cut(string(field), "=")
		if !ok || k == "" {
			return Event{}, fmt.Errorf("%w: field %q is not KEY=VALUE", ErrMalformed, truncate(field))
		}
		e.Vars[k] = v
	}
	e.Action, e.DevPath, e.Subsystem = e.Vars["ACTION"], e.Vars["DEVPATH"], e.Vars["SUBSYSTEM"]
	if e.Action == "" || e.DevPath == "" {
		return Event{}, fmt.Errorf("%w: no ACTION or DEVPATH in %q", ErrMalformed, truncate(b))
	}
	if s, ok := e.Vars["SEQNUM"]; ok {
		seq, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return Event{}, fmt.Errorf("%w: SEQNUM %q", ErrMalformed, s)
		}
		e.Seq = seq
	}
	return e, nil
}

func truncate(b []byte) []byte {
	if len(b) > 64 {
		return b[:64]
	}
	return b
}

// ErrLost is Next's error when the kernel dropped events because the
// socket's buffer was full: what they said is not known. The listener stays
// usable.
var ErrLost = errors.New("uevents lost: the socket's receive buffer overflowed")

// kernelGroup is the multicast group the kernel sends its uevents to (udevd
// sends its own, processed ones, to group 2).
const kernelGroup = 1

// receiveBuffer is what Listen asks for: a burst of events (activating a
// volume group sends a few per volume) must not overflow it while the
// listener is busy.
const receiveBuffer = 4 << 20

// Listener receives the kernel's uevents. Close it to stop a Next.
type Listener struct {
	c   *netlink.Conn
	buf []byte
}

// Listen opens a socket on the kernel's uevents. Only events sent after it
// returns are received.
func Listen() (*Listener, error) {
	c, err := netlink.Dial(unix.NETLINK_KOBJECT_UEVENT, &netlink.Config{Groups: kernelGroup})
	if err != nil {
		return nil, fmt.Errorf("opening the kernel's uevent socket: %w", err)
	}
	if err := setReceiveBuffer(c, receiveBuffer); err != nil {
		c.Close()
		return nil, err
	}
	return &Listener{c: c, buf: make([]byte, 16<<10)}, nil
}

// setReceiveBuffer sets the socket's receive buffer to n bytes, past the
// system's limit (net.core.rmem_max) for root, as udevd does.
func setReceiveBuffer(c *netlink.Conn, n int) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n)
		if serr != nil {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, n)
		}
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("sizing the uevent socket's receive buffer: %w", serr)
	}
	return nil
}

// Next waits for the kernel's next uevent. Messages that are not the
// kernel's (another process may send to the group) are skipped.
func (l *Listener) Next() (Event, error) {
	raw, err := l.c.SyscallConn()
	if err != nil {
		return Event{}, err
	}
	for {
		var (
			n, flags int
			from     unix.Sockaddr
			rerr     error
		)
		if err := raw.Read(func(fd uintptr) bool {
			n, _, flags, from, rerr = unix.Recvmsg(int(fd), l.buf, nil, unix.MSG_DONTWAIT)
			return rerr != unix.EAGAIN
		}); err != nil {
			return Event{}, fmt.Errorf("reading uevents: %w", err)
		}
		switch {
		case errors.Is(rerr, unix.ENOBUFS):
			return Event{}, ErrLost
		case rerr != nil:
			return Event{}, fmt.Errorf("reading uevents: %w", rerr)
		case flags&unix.MSG_TRUNC != 0:
			// The kernel's are at most a few KiB: not one of them.
			continue
		}
		if nl, ok := from.(*unix.SockaddrNetlink); !ok || nl.Pid != 0 {
			continue
		}
		e, err := Parse(l.buf[:n])
		if err != nil {
			continue
		}
		return e, nil
	}
}

// SetDeadline makes a Next waiting at t return an error.
func (l *Listener) SetDeadline(t time.Time) error { return l.c.SetReadDeadline(t) }

// LastSeq is the sequence number of the last uevent the kernel sent: an
// event with a higher one happened after the call.
func LastSeq() (uint64, error) {
	b, err := os.ReadFile("/sys/kernel/uevent_seqnum")
	if err != nil {
		return 0, err
	}
	seq, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("/sys/kernel/uevent_seqnum: %w", err)
	}
	return seq, nil
}

// Close closes the socket; a Next under way returns an error.
func (l *Listener) Close() error { return l.c.Close() }
