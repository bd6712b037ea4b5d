package kernel

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// maxReplyReads bounds the datagrams read while waiting for the kernel's
// acknowledgement of one request.
const maxReplyReads = 64

// aLongTimeAgo is a deadline in the past: setting it interrupts blocked I/O.
var aLongTimeAgo = time.Unix(1, 0)

// Conn talks to the nbd driver. Its methods may be called from several
// goroutines; requests are made one at a time.
type Conn struct {
	mu     sync.Mutex
	nl     *netlink.Conn
	family family
	sys    sysfs
	broken error // set when a request was interrupted: replies may be pending
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
	return c, nil
}

// newConn resolves the nbd family over nl; sysRoot is where sysfs is.
func newConn(ctx context.Context, nl *netlink.Conn, sysRoot string) (*Conn, error) {
	c := &Conn{nl: nl, sys: sysfs{root: sysRoot}}
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
// sockets to an export without multi-conn, and an *OpError wrapping the
// kernel's errno otherwise.
func (c *Conn) Connect(ctx context.Context, cfg Config) (int, error) {
	if err := cfg.Validate(); err != nil {
		return 0, err
	}
	fds := socketFDs(cfg.Sockets)
	attrs, err := connectAttrs(&cfg, fds)
	if err != nil {
		return 0, err
	}
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
	if cfg.MaxRequestBytes > 0 {
		if err := c.sys.limitRequestSize(index, cfg.MaxRequestBytes); err != nil {
			// A device that could send requests the server refuses is
			// worse than none.
			if derr := c.Disconnect(context.WithoutCancel(ctx), index); derr != nil {
				err = errors.Join(err, derr)
			}
			return 0, fmt.Errorf("%s: %w", DevicePath(index), err)
		}
	}
	return index, nil
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
// ErrWrongBackend if the device's backend is not r.Backend, and with
// r.Size, with ErrResizeUnsupported if the kernel ignored the size.
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
	fds := socketFDs(r.Sockets)
	attrs, err := reconfigureAttrs(index, &r, r.Backend, fds)
	if err != nil {
		return err
	}
	_, err = c.execute(ctx, cmdReconfigure, attrs)
	runtime.KeepAlive(r.Sockets)
	if err != nil {
		return kernelError(cmdReconfigure, index, err)
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
			// Not a descriptor (a closed file gives ^uintptr(0)); the
			// kernel will answer EBADF for it.
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
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken != nil {
		return nil, fmt.Errorf("netlink connection unusable after an interrupted request: %w", c.broken)
	}
	body, err := (&genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: familyVersion},
		Data:   attrs,
	}).MarshalBinary()
	if err != nil {
		return nil, err
	}
	stop := watchContext(ctx, c.nl)
	defer stop()
	req, err := c.nl.Send(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(familyID), Flags: netlink.Request | netlink.Acknowledge},
		Data:   body,
	})
	if err != nil {
		return nil, c.interrupted(ctx, err)
	}
	var out []genetlink.Message
	for range maxReplyReads {
		msgs, err := c.nl.Receive()
		if err != nil {
			return nil, c.interrupted(ctx, err)
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

// interrupted returns err, or ctx's error if ctx caused it; then the socket
// may still hold the answer, so the Conn is marked broken.
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
// far as nl supports deadlines. The returned function stops watching.
func watchContext(ctx context.Context, nl *netlink.Conn) func() {
	if d, ok := ctx.Deadline(); ok {
		_ = nl.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { _ = nl.SetDeadline(aLongTimeAgo) })
	return func() {
		stop()
		_ = nl.SetDeadline(time.Time{})
	}
}
