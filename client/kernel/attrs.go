package kernel

import (
	"errors"
	"fmt"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// The generic-netlink family of drivers/block/nbd.c (nbd-netlink.h).
const (
	familyName     = "nbd"
	familyVersion  = 1
	multicastGroup = "nbd_mc_group"
)

// command is an NBD_CMD_* of the netlink family (not the NBD protocol's
// transmission commands).
type command uint8

// Commands, numbered as in nbd-netlink.h.
const (
	cmdConnect     command = 1
	cmdDisconnect  command = 2
	cmdReconfigure command = 3
	cmdLinkDead    command = 4
	cmdStatus      command = 5
)

func (c command) String() string {
	switch c {
	case cmdConnect:
		return "NBD_CMD_CONNECT"
	case cmdDisconnect:
		return "NBD_CMD_DISCONNECT"
	case cmdReconfigure:
		return "NBD_CMD_RECONFIGURE"
	case cmdLinkDead:
		return "NBD_CMD_LINK_DEAD"
	case cmdStatus:
		return "NBD_CMD_STATUS"
	}
	return fmt.Sprintf("NBD_CMD_%d", uint8(c))
}

// Top-level attributes (NBD_ATTR_*). Integer attributes are u64 except the
// index (u32); timeouts are in seconds.
const (
	attrIndex             uint16 = 1
	attrSizeBytes         uint16 = 2
	attrBlockSizeBytes    uint16 = 3
	attrTimeout           uint16 = 4
	attrServerFlags       uint16 = 5
	attrClientFlags       uint16 = 6
	attrSockets           uint16 = 7
	attrDeadConnTimeout   uint16 = 8
	attrDeviceList        uint16 = 9
	attrBackendIdentifier uint16 = 10
)

// Nested attributes: NBD_ATTR_SOCKETS holds NBD_SOCK_ITEMs holding an
// NBD_SOCK_FD (u32); NBD_ATTR_DEVICE_LIST holds NBD_DEVICE_ITEMs holding
// NBD_DEVICE_INDEX (u32) and NBD_DEVICE_CONNECTED (u8).
const (
	sockItem        uint16 = 1
	sockFD          uint16 = 1
	deviceItem      uint16 = 1
	deviceIndex     uint16 = 1
	deviceConnected uint16 = 2
)

// ClientFlags are the NBD_ATTR_CLIENT_FLAGS of a connection (NBD_CFLAG_*).
type ClientFlags uint64

// Client flags.
const (
	// DestroyOnDisconnect removes /dev/nbdN when it is disconnected.
	DestroyOnDisconnect ClientFlags = 1 << 0
	// DisconnectOnClose disconnects the device when its last opener closes it.
	DisconnectOnClose ClientFlags = 1 << 1
)

func (f ClientFlags) String() string {
	if f == 0 {
		return "0"
	}
	var s string
	add := func(name string) {
		if s != "" {
			s += "|"
		}
		s += name
	}
	if f&DestroyOnDisconnect != 0 {
		add("DESTROY_ON_DISCONNECT")
	}
	if f&DisconnectOnClose != 0 {
		add("DISCONNECT_ON_CLOSE")
	}
	if rest := f &^ (DestroyOnDisconnect | DisconnectOnClose); rest != 0 {
		add(fmt.Sprintf("%#x", uint64(rest)))
	}
	return s
}

// errMalformed is wrapped by every error about a kernel message we cannot
// parse.
var errMalformed = errors.New("malformed nbd netlink message")

// connectAttrs encodes an NBD_CMD_CONNECT for a validated c whose sockets
// are the descriptors fds.
func connectAttrs(c *Config, fds []uint32) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	if c.Index >= 0 {
		ae.Uint32(attrIndex, uint32(c.Index))
	}
	ae.Uint64(attrSizeBytes, c.Size)
	ae.Uint64(attrBlockSizeBytes, uint64(c.blockSize()))
	if c.Timeout > 0 {
		ae.Uint64(attrTimeout, seconds(c.Timeout))
	}
	if c.DeadConnTimeout > 0 {
		ae.Uint64(attrDeadConnTimeout, seconds(c.DeadConnTimeout))
	}
	ae.Uint64(attrServerFlags, kernelServerFlags(c.ServerFlags, c.ReadOnly))
	if c.ClientFlags != 0 {
		ae.Uint64(attrClientFlags, uint64(c.ClientFlags))
	}
	encodeSockets(ae, fds)
	if c.Backend != "" {
		ae.String(attrBackendIdentifier, c.Backend)
	}
	return ae.Encode()
}

// reconfigureAttrs encodes an NBD_CMD_RECONFIGURE of device index. backend
// must repeat the identifier the device was connected with: the kernel
// refuses to reconfigure a device with a backend identifier otherwise.
func reconfigureAttrs(index int, r *Reconfig, backend string, fds []uint32) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, uint32(index))
	if r.Size > 0 {
		ae.Uint64(attrSizeBytes, r.Size)
	}
	if r.Timeout > 0 {
		ae.Uint64(attrTimeout, seconds(r.Timeout))
	}
	if r.DeadConnTimeout > 0 {
		ae.Uint64(attrDeadConnTimeout, seconds(r.DeadConnTimeout))
	}
	if len(fds) > 0 {
		encodeSockets(ae, fds)
	}
	if backend != "" {
		ae.String(attrBackendIdentifier, backend)
	}
	return ae.Encode()
}

func encodeSockets(ae *netlink.AttributeEncoder, fds []uint32) {
	ae.Nested(attrSockets, func(socks *netlink.AttributeEncoder) error {
		for _, fd := range fds {
			socks.Nested(sockItem, func(item *netlink.AttributeEncoder) error {
				item.Uint32(sockFD, fd)
				return nil
			})
		}
		return nil
	})
}

// indexAttrs encodes a message naming only a device (DISCONNECT, STATUS).
func indexAttrs(index int) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, uint32(index))
	return ae.Encode()
}

// parseIndex returns NBD_ATTR_INDEX from the attributes of a CONNECT reply
// or a LINK_DEAD notification.
func parseIndex(b []byte) (int, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return 0, fmt.Errorf("%w: %v", errMalformed, err)
	}
	index, found := -1, false
	for ad.Next() {
		if ad.Type() == attrIndex {
			index, found = int(ad.Uint32()), true
		}
	}
	if err := ad.Err(); err != nil {
		return 0, fmt.Errorf("%w: NBD_ATTR_INDEX: %v", errMalformed, err)
	}
	if !found {
		return 0, fmt.Errorf("%w: no NBD_ATTR_INDEX", errMalformed)
	}
	return index, nil
}

// deviceStatus is one NBD_DEVICE_ITEM of a STATUS reply.
type deviceStatus struct {
	Index     int
	Connected bool
}

// maxDevices bounds the devices one STATUS reply may list: the kernel
// allows at most 1<<20 minors, so more than that is nonsense.
const maxDevices = 1 << 20

// parseDeviceList decodes the attributes of a STATUS reply.
func parseDeviceList(b []byte) ([]deviceStatus, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errMalformed, err)
	}
	var out []deviceStatus
	for ad.Next() {
		if ad.Type() != attrDeviceList {
			continue
		}
		ad.Nested(func(list *netlink.AttributeDecoder) error {
			for list.Next() {
				if list.Type() != deviceItem {
					continue
				}
				if len(out) >= maxDevices {
					return fmt.Errorf("more than %d devices", maxDevices)
				}
				d := deviceStatus{Index: -1}
				list.Nested(func(item *netlink.AttributeDecoder) error {
					for item.Next() {
						switch item.Type() {
						case deviceIndex:
							d.Index = int(item.Uint32())
						case deviceConnected:
							d.Connected = item.Uint8() != 0
						}
					}
					return nil
				})
				if d.Index < 0 {
					return errors.New("NBD_DEVICE_ITEM without NBD_DEVICE_INDEX")
				}
				out = append(out, d)
			}
			return nil
		})
	}
	if err := ad.Err(); err != nil {
		return nil, fmt.Errorf("%w: NBD_ATTR_DEVICE_LIST: %v", errMalformed, err)
	}
	return out, nil
}

// encodeDeviceList is parseDeviceList's inverse, for tests and fakes.
func encodeDeviceList(devs []deviceStatus) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	ae.Nested(attrDeviceList, func(list *netlink.AttributeEncoder) error {
		for _, d := range devs {
			list.Nested(deviceItem, func(item *netlink.AttributeEncoder) error {
				item.Uint32(deviceIndex, uint32(d.Index))
				var c uint8
				if d.Connected {
					c = 1
				}
				item.Uint8(deviceConnected, c)
				return nil
			})
		}
		return nil
	})
	return ae.Encode()
}

// family is what the generic-netlink controller says about the nbd family.
type family struct {
	ID     uint16
	Groups map[string]uint32
}

// maxGroups bounds the multicast groups of one family we collect.
const maxGroups = 256

// parseFamily decodes a CTRL_CMD_NEWFAMILY reply. genetlink's own parser
// panics on some replies; this one returns errors.
func parseFamily(b []byte) (family, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return family{}, fmt.Errorf("%w: %v", errMalformed, err)
	}
	f := family{Groups: map[string]uint32{}}
	for ad.Next() {
		switch ad.Type() {
		case unix.CTRL_ATTR_FAMILY_ID:
			f.ID = ad.Uint16()
		case unix.CTRL_ATTR_MCAST_GROUPS:
			ad.Nested(func(groups *netlink.AttributeDecoder) error {
				for groups.Next() {
					if len(f.Groups) >= maxGroups {
						return fmt.Errorf("more than %d multicast groups", maxGroups)
					}
					var name string
					var id uint32
					groups.Nested(func(g *netlink.AttributeDecoder) error {
						for g.Next() {
							switch g.Type() {
							case unix.CTRL_ATTR_MCAST_GRP_NAME:
								name = g.String()
							case unix.CTRL_ATTR_MCAST_GRP_ID:
								id = g.Uint32()
							}
						}
						return nil
					})
					if name != "" {
						f.Groups[name] = id
					}
				}
				return nil
			})
		}
	}
	if err := ad.Err(); err != nil {
		return family{}, fmt.Errorf("%w: family: %v", errMalformed, err)
	}
	if f.ID == 0 {
		return family{}, fmt.Errorf("%w: family without CTRL_ATTR_FAMILY_ID", errMalformed)
	}
	return f, nil
}
