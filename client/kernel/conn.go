package kernel

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"golang.org/x/sync/semaphore"
	"golang.org/x/sys/unix"
)

// maxReplyReads bounds the datagrams read while waiting for the kernel's
// acknowledgement of one request.
const maxReplyReads = 64

// replyTimeout bounds the wait for the answer to a request the kernel has
// taken: it has queued the answer already (see exchange), so this is only a
// guard.
const replyTimeout = 10 * time.Second

// aLongTimeAgo is a deadline in the past: setting it interrupts blocked I/O.
var aLongTimeAgo = time.Unix(1, 0)

// Conn talks to the nbd driver. Its methods may be called from several
// goroutines; requests are made one at a time.
type Conn struct {
	// turn lets one request at a time use nl. A request can take long
	// inside the kernel (a DISCONNECT of a device whose connection is
	// stuck sending waits up to its timeout, and generic netlink runs it
	// inside sendmsg, which nothing interrupts): the others wait their
	// turn only as long as their contexts let them.
	turn   *semaphore.Weighted
	nl     *netlink.Conn
	family family
	sys    sysfs
	proc   string // where /proc is, to check a new device's receivers; "" skips that
	broken error  // set when a request was interrupted: replies may be pending
	// dial opens another netlink socket (for WatchLinkDead).
	dial func() (*netlink.Conn, error)
}

// Dial opens a generic-netlink socket and looks up the nbd family. Without
// the nbd module it fails with ErrModuleNotLoaded.
func Dial(ctx context.Context) (*Conn, error) {
	dial := func() (*netlink.Conn, error) { return netlink.Dial(unix.NETLINK_GENERIC, nil) }
	nl, err := dial()
	if err != nil {
		return nil, fmt.Errorf("opening a generic netlink socket: %w", err)
	}
	c, err := newConn(ctx, nl, "/sys")
	if err != nil {
		nl.Close()
		return nil, err
	}
	c.dial = dial
	c.proc = "/proc"
	return c, nil
}

// newConn resolves the nbd family over nl; sysRoot is where sysfs is.
func newConn(ctx context.Context, nl *netlink.Conn, sysRoot string) (*Conn, error) {
	c := &Conn{turn: semaphore.NewWeighted(1), nl: nl, sys: sysfs{root: sysRoot}}
	// Best effort: the kernel's reasons for refusing a message's attributes.
	_ = nl.SetOption(netlink.ExtendedAcknowledge, true)
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.CTRL_ATTR_FAMILY_NAME, familyName)
	attrs, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	replies, err := c.exchange(ctx, unix.GENL_ID_CTRL, unix.CTRL_CMD_GETFAMILY, attrs)
	if errors.Is(err, unix.ENOENT) {
		return nil, ErrModuleNotLoaded
	}
	if err != nil {
		return nil, fmt.Errorf("looking up the %q netlink family: %w", familyName, err)
	}
	for _, m := range replies {
		if m.Header.Command != unix.CTRL_CMD_NEWFAMILY {
			continue
		}
		f, err := parseFamily(m.Data)
		if err != nil {
			return nil, err
		}
		c.family = f
		return c, nil
	}
	return nil, fmt.Errorf("%w: no reply to CTRL_CMD_GETFAMILY", errMalformed)
}

// Close closes the netlink socket.
func (c *Conn) Close() error { return c.nl.Close() }

// Connect configures a device with cfg and returns its index N (/dev/nbdN).
// It fails with ErrBusy if cfg.Index is taken, ErrNoMultiConn for several
// sockets to an export without multi-conn, ErrBackendUnsupported (having
// disconnected the device again) if the kernel dropped cfg.Backend,
// ErrReceiversStarved (likewise) if the kernel left a connection without a
// receiver, where attaching again with new sockets works, Reconfigure's
// errors (likewise: ErrResizeUnsupported, or the kernel's errno) if the
// size, given after the backend, was not taken, and an *OpError wrapping
// the kernel's errno otherwise. Once the kernel has
// configured the device, ctx ending no longer makes Connect fail.
func (c *Conn) Connect(ctx context.Context, cfg Config) (int, error) {
	if err := cfg.Validate(); err != nil {
		return 0, err
	}
	if err := prepareSockets(cfg.Sockets, func() (time.Duration, error) { return cfg.Timeout, nil }); err != nil {
		return 0, &OpError{Op: cmdConnect.String(), Index: cfg.Index, Err: err}
	}
	fds := socketFDs(cfg.Sockets)
	// With a backend, the device starts empty and gets its size in a
	// RECONFIGURE once the backend is in sysfs. nbd_genl_connect tells
	// udev the device is up (a change event) before it writes the backend:
	// udev's rules would find a full-size device with no backend, and
	// probe it (blkid, then mdadm --incremental on a guest's md half;
	// packaging/udev/59-lvnbd.rules matches the backend). A size set by
	// RECONFIGURE is announced with the backend in place.
	size := cfg.Size
	if cfg.Backend != "" {
		cfg.Size = 0
	}
	attrs, err := connectAttrs(&cfg, fds)
	if err != nil {
		return 0, err
	}
	// Once the request is sent the kernel has configured the device, even
	// if ctx ends meanwhile: exchange reads the reply regardless, so that
	// the device is reported, not left attached unknown to the caller.
	replies, err := c.execute(ctx, cmdConnect, attrs)
	// The descriptors must stay open until the kernel has looked them up.
	runtime.KeepAlive(cfg.Sockets)
	if err != nil {
		return 0, kernelError(cmdConnect, cfg.Index, err)
	}
	index := -1
	for _, m := range replies {
		if command(m.Header.Command) == cmdConnect {
			if index, err = parseIndex(m.Data); err != nil {
				return 0, &OpError{Op: cmdConnect.String(), Index: cfg.Index, Err: err}
			}
		}
	}
	if index < 0 {
		return 0, &OpError{Op: cmdConnect.String(), Index: cfg.Index, Err: fmt.Errorf("%w: no reply with the device index", errMalformed)}
	}
	if err := c.checkBackend(index, cfg.Backend); err != nil {
		// lvnbd finds its devices by their backend: one without would
		// be taken for lost and attached again, and again.
		return 0, c.undoConnect(ctx, index, err)
	}
	if cfg.Size != size {
		r := Reconfig{Size: size, Backend: cfg.Backend}
		if err := c.Reconfigure(context.WithoutCancel(ctx), index, r); err != nil {
			return 0, c.undoConnect(ctx, index, fmt.Errorf("giving %s its size, after its backend: %w", DevicePath(index), err))
		}
	}
	if cfg.MaxRequestBytes > 0 {
		if err := c.sys.limitRequestSize(index, cfg.MaxRequestBytes); err != nil {
			// A device that could send requests the server refuses is
			// worse than none.
			return 0, c.undoConnect(ctx, index, fmt.Errorf("%s: %w", DevicePath(index), err))
		}
	}
	// Before anyone uses it: a device with a starved connection would
	// hold that connection's requests for its whole timeout.
	if err := checkReceivers(ctx, c.proc, index, len(cfg.Sockets), receiverSettle); err != nil {
		return 0, c.undoConnect(ctx, index, &OpError{Op: cmdConnect.String(), Index: index, Err: err})
	}
	return index, nil
}

// checkBackend checks that the kernel kept the backend identifier device
// index was connected with: kernels before 5.14 ignore it.
func (c *Conn) checkBackend(index int, want string) error {
	if want == "" {
		return nil
	}
	got, err := c.sys.read(index, "backend")
	if err != nil {
		return &OpError{Op: cmdConnect.String(), Index: index, Err: fmt.Errorf("reading its backend identifier back: %w", err)}
	}
	if got == want {
		return nil
	}
	file := filepath.Join(c.sys.dir(index), "backend")
	has := fmt.Sprintf("is missing (want %q)", want)
	if _, err := os.Stat(file); err == nil {
		has = fmt.Sprintf("holds %q, not %q", got, want)
	}
	return &OpError{Op: cmdConnect.String(), Index: index,
		Err: fmt.Errorf("%w: this is Linux %s, and %s %s", ErrBackendUnsupported, kernelRelease(), file, has)}
}

// ErrStillAttached is joined to a Connect error when the device Connect
// configured, and then had to disconnect again, could not be disconnected:
// it stays attached, with its backend. Attaching again at once would give
// the backend a second device.
var ErrStillAttached = errors.New("it stays attached")

// undoConnect disconnects device index, which Connect configured but
// cannot return because of err, and says so.
func (c *Conn) undoConnect(ctx context.Context, index int, err error) error {
	if derr := c.Disconnect(context.WithoutCancel(ctx), index); derr != nil {
		return errors.Join(err, fmt.Errorf("disconnecting %s again failed, %w: %w", DevicePath(index), ErrStillAttached, derr))
	}
	return fmt.Errorf("%w; %s was disconnected again", err, DevicePath(index))
}

// kernelRelease returns the running kernel's release, as uname -r prints it.
func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "(unknown: " + err.Error() + ")"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// Disconnect tells the server goodbye on every connection of device index
// and tears the device down; if it is still open (mounted, say) the
// teardown completes at the last close. Disconnecting an unconfigured
// device does nothing.
func (c *Conn) Disconnect(ctx context.Context, index int) error {
	if !c.sys.exists(index) {
		return &OpError{Op: cmdDisconnect.String(), Index: index, Err: ErrNoDevice}
	}
	attrs, err := indexAttrs(index)
	if err != nil {
		return err
	}
	if _, err := c.execute(ctx, cmdDisconnect, attrs); err != nil {
		return kernelError(cmdDisconnect, index, err)
	}
	return nil
}

// Reconfigure changes a running device: fresh sockets take the place of dead
// connections (the kernel silently drops those it has no dead slot for), a
// new size grows it without detaching, timeouts change. It fails with
// ErrWrongBackend if the device's backend is not r.Backend, with
// ErrDisconnectedHeldOpen for a device disconnected but still held open
// (the kernel refuses it), and with r.Size, with ErrResizeUnsupported if
// the kernel ignored the size.
func (c *Conn) Reconfigure(ctx context.Context, index int, r Reconfig) error {
	if err := r.Validate(); err != nil {
		return err
	}
	op := cmdReconfigure.String()
	if !c.sys.exists(index) {
		return &OpError{Op: op, Index: index, Err: ErrNoDevice}
	}
	var d Device
	d.Index = index
	if err := c.sys.fill(&d); err != nil {
		return &OpError{Op: op, Index: index, Err: err}
	}
	if d.PID == 0 {
		return &OpError{Op: op, Index: index, Err: ErrNotConnected}
	}
	// The kernel compares the backend itself, but only if the device has
	// one: a device number freed and reused by an attach without one would
	// take another export's sockets. Only the moment between this read and
	// the kernel's own check is left open.
	if d.Backend != r.Backend {
		has := "none"
		if d.Backend != "" {
			has = strconv.Quote(d.Backend)
		}
		return &OpError{Op: op, Index: index,
			Err: fmt.Errorf("%w: its backend is %s, not %q (detached, and the number reused?): see lvnbd list", ErrWrongBackend, has, r.Backend)}
	}
	// The kernel takes any size. A caller's size read before another
	// process grew the device (the pair daemon's size poll beside lvnbd
	// reconnect --size, during two grows in a row) would shrink it under
	// the guest; only the moment between this read and the kernel's
	// change is left open.
	if r.Size > 0 && r.Size < d.Size {
		return &OpError{Op: op, Index: index, Err: fmt.Errorf("%w from %d to %d bytes (grown meanwhile by another "+
			"lvnbd?): nothing changed; see lvnbd list", ErrWouldShrink, d.Size, r.Size)}
	}
	if r.Timeout != 0 {
		// Unknown (no io_timeout, Linux before 5.0) is let through: the
		// sockets below get the new timeout, and the kernel the same.
		// The kernel takes whole seconds, rounded up here (seconds):
		// compared as it would set it, the timeout a device was
		// attached with is never lower than its own.
		asSet := time.Duration(seconds(r.Timeout)) * time.Second
		if cur, err := c.sys.requestTimeout(index); err == nil && asSet < cur {
			return &OpError{Op: op, Index: index, Err: fmt.Errorf("%w: from %s to %s (its connections abort "+
				"unacknowledged data only after %s): nothing changed; detach and attach it to lower the timeout "+
				"(a pair's leg: lvnbd pair down --leg, then up)", ErrTimeoutLowered, cur, asSet, userTimeout(cur))}
		}
	}
	// The sockets' TCP_USER_TIMEOUT follows the timeout the device has
	// once reconfigured.
	requestTimeout := func() (time.Duration, error) {
		if r.Timeout != 0 {
			return r.Timeout, nil
		}
		timeout, err := c.sys.requestTimeout(index)
		if err != nil {
			return 0, fmt.Errorf("cannot tell its request timeout, which the sockets' TCP_USER_TIMEOUT must stay under: %w; give a timeout", err)
		}
		return timeout, nil
	}
	if err := prepareSockets(r.Sockets, requestTimeout); err != nil {
		return &OpError{Op: op, Index: index, Err: err}
	}
	fds := socketFDs(r.Sockets)
	attrs, err := reconfigureAttrs(index, &r, r.Backend, fds)
	if err != nil {
		return err
	}
	_, err = c.execute(ctx, cmdReconfigure, attrs)
	runtime.KeepAlive(r.Sockets)
	if err != nil {
		kerr := kernelError(cmdReconfigure, index, err)
		if errors.Is(err, unix.EINVAL) && c.disconnectedHeldOpen(ctx, index, r.Backend) {
			return c.heldOpenError(index, kerr)
		}
		return kerr
	}
	if r.Size > 0 {
		sectors, err := c.sys.readUint(index, "size")
		if err != nil {
			return &OpError{Op: op, Index: index, Err: err}
		}
		if sectors*512 != r.Size {
			return &OpError{Op: op, Index: index,
				Err: fmt.Errorf("%w: asked for %d bytes, the device has %d", ErrResizeUnsupported, r.Size, sectors*512)}
		}
	}
	return nil
}

// disconnectedHeldOpen tells whether an EINVAL from RECONFIGURE of device
// index came from its having been disconnected (NBD_CMD_DISCONNECT clears
// NBD_RT_BOUND) while something still holds it open, so that it keeps its
// pid and backend in sysfs: a RECONFIGURE with only the index and backend
// changes nothing on a device that is still bound, and fails the same way
// on one that is not. Other EINVALs (a size the kernel refuses, say) leave
// the device bound.
func (c *Conn) disconnectedHeldOpen(ctx context.Context, index int, backend string) bool {
	bound, err := c.Bound(ctx, index, backend)
	return err == nil && !bound
}

// Bound reports whether device index, running with backend as sysfs shows
// it, can still be given connections: false once it was disconnected while
// something holds it open (NBD_CMD_DISCONNECT by another process, with
// blkback or a mount holding it). The kernel then keeps its pid and
// backend, sends no dead-link notice and fails all its I/O. It asks with a
// RECONFIGURE that changes nothing, which the kernel refuses (EINVAL, and a
// "not configured" line in its log) only for such a device.
func (c *Conn) Bound(ctx context.Context, index int, backend string) (bool, error) {
	attrs, err := reconfigureAttrs(index, &Reconfig{}, backend, nil)
	if err != nil {
		return false, err
	}
	_, err = c.execute(ctx, cmdReconfigure, attrs)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.EINVAL):
		return false, nil
	default:
		return false, kernelError(cmdReconfigure, index, err)
	}
}

// heldOpenError explains kerr, the kernel's EINVAL for a RECONFIGURE of
// device index that disconnectedHeldOpen found unbound.
func (c *Conn) heldOpenError(index int, kerr error) error {
	inner := kerr
	var oe *OpError
	if errors.As(kerr, &oe) {
		inner = oe.Err
	}
	by := "a process or Xen's blkback may hold it"
	if holders := c.sys.holders(index); len(holders) > 0 {
		by = strings.Join(holders, ", ") + "; a process or Xen's blkback may hold it too"
	}
	return &OpError{Op: cmdReconfigure.String(), Index: index, Err: fmt.Errorf("%w: %w (%s): "+
		"the kernel gives %s no connections again; it works again once closed and detached, then attached anew",
		inner, ErrDisconnectedHeldOpen, by, DevicePath(index))}
}

// Status returns device index, or every nbd device for AnyDevice, sorted by
// index. A missing device is ErrNoDevice.
func (c *Conn) Status(ctx context.Context, index int) ([]Device, error) {
	var attrs []byte
	if index != AnyDevice {
		var err error
		if attrs, err = indexAttrs(index); err != nil {
			return nil, err
		}
	}
	replies, err := c.execute(ctx, cmdStatus, attrs)
	if err != nil {
		return nil, kernelError(cmdStatus, index, err)
	}
	var devs []Device
	for _, m := range replies {
		if command(m.Header.Command) != cmdStatus {
			continue
		}
		list, err := parseDeviceList(m.Data)
		if err != nil {
			return nil, &OpError{Op: cmdStatus.String(), Index: index, Err: err}
		}
		for _, s := range list {
			devs = append(devs, Device{Index: s.Index, Connected: s.Connected})
		}
	}
	if index != AnyDevice && !slices.ContainsFunc(devs, func(d Device) bool { return d.Index == index }) {
		return nil, &OpError{Op: cmdStatus.String(), Index: index, Err: ErrNoDevice}
	}
	slices.SortFunc(devs, func(a, b Device) int { return a.Index - b.Index })
	devs = slices.CompactFunc(devs, func(a, b Device) bool { return a.Index == b.Index })
	for i := range devs {
		if err := c.sys.fill(&devs[i]); err != nil {
			return nil, fmt.Errorf("%s: %w", devs[i].Path(), err)
		}
	}
	return devs, nil
}

// socketFDs returns the descriptors of files. Fd also puts each in blocking
// mode, as every other nbd client hands its sockets over; the kernel's
// socket calls do not depend on it.
func socketFDs(files []*os.File) []uint32 {
	fds := make([]uint32, len(files))
	for i, f := range files {
		fd := f.Fd()
		if fd > math.MaxInt32 {
			// Not a descriptor (a closed file gives ^uintptr(0), but
			// prepareSockets refuses those first); the kernel would
			// answer EBADF for it.
			fd = math.MaxInt32
		}
		fds[i] = uint32(fd)
	}
	return fds
}

// execute sends one nbd-family command and returns its replies.
func (c *Conn) execute(ctx context.Context, cmd command, attrs []byte) ([]genetlink.Message, error) {
	return c.exchange(ctx, c.family.ID, uint8(cmd), attrs)
}

// exchange sends a generic-netlink request asking for an acknowledgement and
// collects the replies up to it. genetlink's Execute cannot be used: it stops
// at the first datagram, leaving the acknowledgement that follows a reply in
// the socket for the next request to trip over.
func (c *Conn) exchange(ctx context.Context, familyID uint16, cmd uint8, attrs []byte) ([]genetlink.Message, error) {
	if err := c.turn.Acquire(ctx, 1); err != nil {
		return nil, err // not sent: nothing to read back
	}
	defer c.turn.Release(1)
	if c.broken != nil {
		return nil, fmt.Errorf("netlink connection unusable after an interrupted request: %w", c.broken)
	}
	if err := ctx.Err(); err != nil {
		return nil, err // not sent: nothing to read back
	}
	body, err := (&genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: familyVersion},
		Data:   attrs,
	}).MarshalBinary()
	if err != nil {
		return nil, err
	}
	stop := watchContext(ctx, c.nl)
	req, err := c.nl.Send(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(familyID), Flags: netlink.Request | netlink.Acknowledge},
		Data:   body,
	})
	// Generic netlink runs the command inside sendmsg: once Send returns,
	// the kernel has carried the request out and queued its answer. ctx
	// no longer interrupts reading it, or a CONNECT cancelled at that
	// moment would report a failure for a device the kernel configured,
	// left attached unknown to the caller. The reply deadline only keeps a
	// kernel that never answers from hanging us.
	stop()
	if err != nil {
		return nil, c.interrupted(ctx, err)
	}
	_ = c.nl.SetReadDeadline(time.Now().Add(replyTimeout))
	defer c.nl.SetReadDeadline(time.Time{})
	var out []genetlink.Message
	for range maxReplyReads {
		msgs, err := c.nl.Receive()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			c.broken = fmt.Errorf("no answer from the kernel within %v", replyTimeout)
			return nil, c.broken
		}
		if err != nil {
			return nil, err
		}
		for _, m := range msgs {
			if m.Header.Sequence != req.Header.Sequence {
				continue // a stale reply to someone else's request
			}
			switch m.Header.Type {
			case netlink.Error, netlink.Done:
				// The acknowledgement (errors came back from Receive).
				return out, nil
			case netlink.HeaderType(familyID):
				var gm genetlink.Message
				if err := gm.UnmarshalBinary(m.Data); err != nil {
					return nil, fmt.Errorf("%w: %v", errMalformed, err)
				}
				out = append(out, gm)
			}
		}
	}
	return nil, fmt.Errorf("%w: no acknowledgement after %d reads", errMalformed, maxReplyReads)
}

// interrupted returns the error of a Send: err, or ctx's error if ctx
// caused it; then the Conn is marked broken, to be safe.
func (c *Conn) interrupted(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		c.broken = ctx.Err()
		return ctx.Err()
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		c.broken = context.DeadlineExceeded
		return context.DeadlineExceeded
	}
	return err
}

// watchContext makes ctx's deadline and cancellation interrupt I/O on nl, as
// far as nl supports deadlines. The returned function, called once, stops
// watching and clears the deadline, also if ctx ended meanwhile.
func watchContext(ctx context.Context, nl *netlink.Conn) func() {
	if d, ok := ctx.Deadline(); ok {
		_ = nl.SetDeadline(d)
	}
	interrupted := make(chan struct{})
	stopAfter := context.AfterFunc(ctx, func() {
		_ = nl.SetDeadline(aLongTimeAgo)
		close(interrupted)
	})
	return func() {
		if !stopAfter() {
			// It has started: clear the deadline only after it set its own.
			<-interrupted
		}
		_ = nl.SetDeadline(time.Time{})
	}
}
