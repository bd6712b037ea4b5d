package kernel

import (
	"errors"
	"fmt"
	"math"
	"os"
	"strings"
	"time"

	"github.com/lvnbd/lvnbd/nbd"
)

// AnyDevice as Config.Index lets the kernel pick (or create) a free device.
const AnyDevice = -1

// MaxBackendLength bounds Config.Backend. The kernel prints the identifier
// into a one-page sysfs buffer (/sys/block/nbdN/backend) unchecked, so a long
// one would overflow it.
const MaxBackendLength = 1024

// DefaultBlockSize is the logical block size used when Config.BlockSize is 0:
// the smallest the kernel allows, and what most partition tables, file
// systems and Xen guests expect.
const DefaultBlockSize = 512

// Config describes a device to connect.
type Config struct {
	// Sockets are connected NBD sockets (TCP or Unix stream), each just past
	// a handshake without structured replies. Connect does not close them:
	// the caller closes them once Connect returns, whatever it returned (the
	// kernel keeps its own references; see the package documentation).
	// Connect sets SO_LINGER and TCP_USER_TIMEOUT on the TCP ones, so that
	// a connection the kernel gave up on cannot deliver an old write late
	// (prepareSockets).
	Sockets []*os.File
	// Size is the device size in bytes, a multiple of BlockSize.
	Size uint64
	// BlockSize is the logical block size: a power of two from 512 to the
	// page size, and at least the export's minimum block size. 0 means
	// DefaultBlockSize.
	BlockSize uint32
	// ServerFlags are the export's transmission flags as the handshake
	// returned them; only those the kernel's simple-reply client can use
	// are passed on.
	ServerFlags nbd.TransmissionFlags
	// ReadOnly makes the device read-only even if the export is writable.
	ReadOnly bool
	// ClientFlags are passed as they are.
	ClientFlags ClientFlags
	// Timeout bounds each request, rounded up to whole seconds, at most
	// MaxTimeout; a request that times out is retried on another
	// connection, or fails. 0 leaves the kernel's default (recent kernels
	// then only log stuck requests, or retry after 30 s with several
	// connections; the TCP sockets' TCP_USER_TIMEOUT assumes 30 s, which a
	// device number configured before with a shorter timeout may still
	// have: give a timeout).
	Timeout time.Duration
	// DeadConnTimeout is how long I/O waits for a RECONFIGURE with fresh
	// sockets once every connection is dead, rounded up to whole seconds,
	// at most MaxTimeout. 0 makes it fail at once.
	DeadConnTimeout time.Duration
	// Backend identifies what the device is attached to (lvnbd uses the
	// export's URI). The kernel shows it in /sys/block/nbdN/backend and
	// requires it back with every RECONFIGURE. At most MaxBackendLength
	// bytes.
	Backend string
	// Index is the device number N of /dev/nbdN, or AnyDevice. The zero
	// value asks for /dev/nbd0.
	Index int
	// MaxRequestBytes, when non-zero, caps the size of the requests the
	// kernel sends (the export's maximum payload), by lowering
	// /sys/block/nbdN/queue/max_sectors_kb if it allows more.
	MaxRequestBytes uint32
}

// Reconfig changes a connected device. Zero fields are left unchanged.
//
// Sockets and Size cannot be given together: give the sockets, then the
// size in a second Reconfig. nbd_genl_reconfigure (drivers/block/nbd.c)
// applies a size before it takes sockets, and resizing freezes the request
// queue (nbd_set_size, since Linux 6.9), which waits for every request in
// flight, including those nbd_handle_cmd holds waiting for a live
// connection: the sockets in the same message would be attached only after
// the dead-connection timeout had failed those requests with EIO.
type Reconfig struct {
	// Sockets replace dead connections, one each; the kernel closes those
	// left over when fewer connections are dead. The caller closes them
	// once Reconfigure returns, as with Config.Sockets. Their
	// TCP_USER_TIMEOUT follows Timeout, or the device's timeout if 0; a
	// lower Timeout does not reach the connections the device keeps.
	Sockets []*os.File
	// Size is the new device size in bytes, a multiple of the device's
	// block size (a grown export).
	Size uint64
	// Timeout and DeadConnTimeout as in Config.
	Timeout         time.Duration
	DeadConnTimeout time.Duration
	// Backend is the identifier the device was connected with, as in
	// /sys/block/nbdN/backend; empty for a device connected without one.
	// Reconfigure refuses a device with another identifier: its number may
	// have been given to another export since the caller looked.
	Backend string
}

// ErrNoMultiConn is returned for several sockets to an export that does not
// advertise NBD_FLAG_CAN_MULTI_CONN: without it, a flush on one connection
// need not cover writes made on another, and the kernel refuses.
var ErrNoMultiConn = errors.New("the export does not allow several connections (no NBD_FLAG_CAN_MULTI_CONN)")

// errBadConfig is wrapped by every validation error.
var errBadConfig = errors.New("invalid nbd device configuration")

func (c *Config) blockSize() uint32 {
	if c.BlockSize == 0 {
		return DefaultBlockSize
	}
	return c.BlockSize
}

// Validate checks c against what the kernel accepts, so that mistakes get a
// precise error instead of the kernel's EINVAL.
func (c *Config) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", errBadConfig, fmt.Sprintf(format, args...))
	}
	if len(c.Sockets) == 0 {
		return bad("no sockets")
	}
	for i, s := range c.Sockets {
		if s == nil {
			return bad("socket %d is nil", i)
		}
	}
	if len(c.Sockets) > 1 && c.ServerFlags&nbd.FlagCanMultiConn == 0 {
		return fmt.Errorf("%w: %d connections asked for", ErrNoMultiConn, len(c.Sockets))
	}
	if err := ValidBlockSize(c.blockSize()); err != nil {
		return fmt.Errorf("%w: %w", errBadConfig, err)
	}
	if c.Size == 0 {
		return bad("size 0")
	}
	if c.Size > math.MaxInt64 {
		return bad("size %d is over the kernel's limit", c.Size)
	}
	if bs := uint64(c.blockSize()); c.Size%bs != 0 {
		return bad("size %d is not a multiple of the block size %d", c.Size, bs)
	}
	if err := validTimeouts(c.Timeout, c.DeadConnTimeout); err != nil {
		return err
	}
	if c.Index < AnyDevice || c.Index >= maxDevices {
		return bad("device index %d out of range", c.Index)
	}
	if err := validBackend(c.Backend); err != nil {
		return err
	}
	return nil
}

// Validate checks r as far as it can without the device.
func (r *Reconfig) Validate() error {
	for i, s := range r.Sockets {
		if s == nil {
			return fmt.Errorf("%w: socket %d is nil", errBadConfig, i)
		}
	}
	if r.Size > math.MaxInt64 {
		return fmt.Errorf("%w: size %d is over the kernel's limit", errBadConfig, r.Size)
	}
	if len(r.Sockets) > 0 && r.Size > 0 {
		return fmt.Errorf("%w: sockets and a new size in one reconfiguration: give the sockets first, then the size "+
			"(the kernel resizes first, and a resize waits for the I/O that waits for the sockets)", errBadConfig)
	}
	if err := validTimeouts(r.Timeout, r.DeadConnTimeout); err != nil {
		return err
	}
	return validBackend(r.Backend)
}

// ValidBlockSize reports whether the kernel accepts bs as a logical block
// size: a power of two from 512 to the page size.
func ValidBlockSize(bs uint32) error {
	page := uint32(os.Getpagesize())
	if bs < 512 || bs > page || bs&(bs-1) != 0 {
		return fmt.Errorf("block size %d is not a power of two from 512 to %d", bs, page)
	}
	return nil
}

// MaxTimeout bounds Config.Timeout and Config.DeadConnTimeout. The kernel
// keeps the request timeout in jiffies in an unsigned int (tag_set.timeout:
// seconds × HZ), which wraps after 49 days at HZ=1000, 198 at HZ=250: a
// longer timeout would silently become a short one.
const MaxTimeout = 24 * time.Hour

func validTimeouts(timeout, dead time.Duration) error {
	if timeout < 0 || dead < 0 {
		return fmt.Errorf("%w: negative timeout", errBadConfig)
	}
	if timeout > MaxTimeout {
		return fmt.Errorf("%w: timeout %v is over %v (the kernel counts it in jiffies in 32 bits)", errBadConfig, timeout, MaxTimeout)
	}
	if dead > MaxTimeout {
		return fmt.Errorf("%w: dead-connection timeout %v is over %v (the kernel counts it in jiffies)", errBadConfig, dead, MaxTimeout)
	}
	return nil
}

func validBackend(s string) error {
	if len(s) > MaxBackendLength {
		return fmt.Errorf("%w: backend identifier of %d bytes is over %d", errBadConfig, len(s), MaxBackendLength)
	}
	if strings.ContainsAny(s, "\x00\n") {
		return fmt.Errorf("%w: backend identifier contains NUL or newline", errBadConfig)
	}
	return nil
}

// seconds rounds d up to whole seconds, the kernel's unit for timeouts.
func seconds(d time.Duration) uint64 {
	return uint64((d + time.Second - 1) / time.Second)
}

// kernelFlags are the transmission flags the kernel's client acts on with
// simple replies. Others (DF, block status payload, ...) would only describe
// features it does not use.
const kernelFlags = nbd.FlagHasFlags | nbd.FlagReadOnly | nbd.FlagSendFlush | nbd.FlagSendFUA |
	nbd.FlagRotational | nbd.FlagSendTrim | nbd.FlagSendWriteZeroes | nbd.FlagCanMultiConn

// kernelServerFlags maps an export's transmission flags to
// NBD_ATTR_SERVER_FLAGS, which takes the protocol's flags as they are.
func kernelServerFlags(f nbd.TransmissionFlags, readOnly bool) uint64 {
	f &= kernelFlags
	if readOnly {
		f |= nbd.FlagReadOnly
	}
	return uint64(f)
}
