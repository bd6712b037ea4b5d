package kernel

import (
	"context"
	"errors"
	"fmt"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// EventsLost is sent by WatchLinkDead when the socket overflowed and
// notifications were dropped: any device may have lost a connection.
const EventsLost = -1

// WatchLinkDead reports the index of each device the kernel finds a dead
// connection on (NBD_CMD_LINK_DEAD, once per connection), or EventsLost.
// It listens on its own socket until ctx is done (or the socket fails), then
// closes the channel.
// The kernel only says which device; Status and a RECONFIGURE with fresh
// sockets are up to the caller.
func (c *Conn) WatchLinkDead(ctx context.Context) (<-chan int, error) {
	group, ok := c.family.Groups[multicastGroup]
	if !ok {
		return nil, fmt.Errorf("the nbd netlink family has no %q multicast group", multicastGroup)
	}
	if c.dial == nil {
		return nil, errors.New("this Conn cannot open another netlink socket")
	}
	nl, err := c.dial()
	if err != nil {
		return nil, fmt.Errorf("opening a generic netlink socket: %w", err)
	}
	if err := nl.JoinGroup(group); err != nil {
		nl.Close()
		return nil, fmt.Errorf("joining %q: %w", multicastGroup, err)
	}
	out := make(chan int)
	stop := context.AfterFunc(ctx, func() { nl.Close() })
	go func() {
		defer close(out)
		defer stop()
		watchLoop(ctx, c.family.ID, nl.Receive, out)
		nl.Close()
	}()
	return out, nil
}

// watchLoop reads notifications with receive until it fails for good (the
// socket was closed because ctx is done) and sends each dead device's index
// to out.
func watchLoop(ctx context.Context, familyID uint16, receive func() ([]netlink.Message, error), out chan<- int) {
	send := func(index int) bool {
		select {
		case out <- index:
			return true
		case <-ctx.Done():
			return false
		}
	}
	for ctx.Err() == nil {
		msgs, err := receive()
		if errors.Is(err, unix.ENOBUFS) {
			if !send(EventsLost) {
				return
			}
			continue
		}
		if err != nil {
			return
		}
		for _, m := range msgs {
			if m.Header.Type != netlink.HeaderType(familyID) {
				continue
			}
			var gm genetlink.Message
			if gm.UnmarshalBinary(m.Data) != nil || command(gm.Header.Command) != cmdLinkDead {
				continue
			}
			index, err := parseIndex(gm.Data)
			if err != nil {
				index = EventsLost // a device died, we cannot tell which
			}
			if !send(index) {
				return
			}
		}
	}
}
