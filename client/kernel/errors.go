package kernel

import (
	"errors"
	"fmt"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Sentinel errors; errors from this package wrap them where they apply.
var (
	// ErrModuleNotLoaded means the kernel has no nbd netlink family.
	ErrModuleNotLoaded = errors.New("the nbd kernel module is not loaded: modprobe nbd")
	// ErrBusy means the device asked for is already configured, or held
	// open by someone (even an open of an unconfigured device reserves it).
	ErrBusy = errors.New("device is in use")
	// ErrNoDevice means there is no /dev/nbdN of that number.
	ErrNoDevice = errors.New("no such nbd device")
	// ErrNotConnected means the device has no connection to reconfigure.
	ErrNotConnected = errors.New("device is not connected")
	// ErrWrongBackend means the device is attached to another export than
	// the one asked for (or to one without a backend identifier): its
	// number was reused, or the caller named the wrong export.
	ErrWrongBackend = errors.New("device is attached to another export")
	// ErrResizeUnsupported means the kernel ignored a new size given with
	// RECONFIGURE (older kernels only take a size with CONNECT).
	ErrResizeUnsupported = errors.New("this kernel cannot resize an nbd device in place")
	// ErrBackendUnsupported means the kernel ignored the backend identifier
	// given with CONNECT (NBD_ATTR_BACKEND_IDENTIFIER came with Linux 5.14;
	// older kernels drop attributes they do not know): lvnbd finds its
	// devices by it, so Connect disconnects such a device again.
	ErrBackendUnsupported = errors.New("this kernel ignores the backend identifier (NBD_ATTR_BACKEND_IDENTIFIER): " +
		"lvnbd needs Linux 5.14 or later for backend identifiers")
	// ErrDisconnectedHeldOpen means the device was disconnected while
	// something held it open: the kernel keeps its pid and backend until the
	// last close but refuses to give it connections again.
	ErrDisconnectedHeldOpen = errors.New("device was disconnected and is still held open")
	// ErrWouldShrink means a RECONFIGURE asked for a size below the
	// device's: the kernel would take it, and cut off what the guest
	// may already use. lvnbd grows devices only; a size read before a
	// grow by someone else meanwhile is stale.
	ErrWouldShrink = errors.New("the new size would shrink the device")
	// ErrTimeoutLowered is a Reconfigure with a request timeout below the
	// device's: it would not reach the connections the device keeps, whose
	// TCP_USER_TIMEOUT stays at three quarters of the old one, so a write
	// the kernel resends after the new timeout could still be delivered on
	// the old connection afterwards, over a newer write.
	ErrTimeoutLowered = errors.New("a lower request timeout does not reach the device's connections")
)

// OpError is a failed netlink operation on an nbd device.
type OpError struct {
	Op    string // the netlink command, e.g. "NBD_CMD_CONNECT"
	Index int    // the device, or AnyDevice
	Err   error
}

func (e *OpError) Error() string {
	s := e.Op
	if e.Index >= 0 {
		s += " of " + DevicePath(e.Index)
	}
	s += ": " + e.Err.Error()
	// The nbd driver explains its EINVALs only in the kernel log.
	if errors.Is(e.Err, unix.EINVAL) && !errors.Is(e.Err, ErrDisconnectedHeldOpen) {
		s += " (the kernel log says why: dmesg | tail)"
	}
	return s
}

// Unwrap returns the underlying error: a syscall errno, possibly wrapped by
// one of the sentinel errors.
func (e *OpError) Unwrap() error { return e.Err }

// kernelError turns the error of a netlink exchange into one that tells the
// user what happened: the errno, with the kernel's extended-ack message if
// any, wrapped by a sentinel where one fits.
func kernelError(op command, index int, err error) error {
	var errno unix.Errno
	if !errors.As(err, &errno) {
		return &OpError{Op: op.String(), Index: index, Err: err}
	}
	inner := error(errno)
	var ne *netlink.OpError
	if errors.As(err, &ne) && ne.Message != "" {
		inner = fmt.Errorf("%w: %s", errno, ne.Message)
	}
	switch errno {
	case unix.EBUSY:
		inner = fmt.Errorf("%w: %w", ErrBusy, inner)
	case unix.EPERM:
		inner = fmt.Errorf("%w (CAP_SYS_ADMIN is needed)", inner)
	}
	return &OpError{Op: op.String(), Index: index, Err: inner}
}
