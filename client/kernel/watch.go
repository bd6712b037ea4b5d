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
	events, _, err := c.SubscribeLinkDead(ctx)
	return events, err
}

// SubscribeLinkDead is WatchLinkDead, and also tells why the channel was
// closed: stopped waits until it is, then returns nil if ctx ended the
// subscription, or the error its socket failed with. Until ctx is done,
// stopped returns only once events has been read to the end.
func (c *Conn) SubscribeLinkDead(ctx context.Context) (events <-chan int, stopped func() error, err error) {
	group, ok := c.family.Groups[multicastGroup]
	if !ok {
		return nil, nil, fmt.Errorf("the nbd netlink family has no %q multicast group", multicastGroup)
	}
	if c.dial == nil {
		return nil, nil, errors.New("this Conn cannot open another netlink socket")
	}
	nl, err := c.dial()
	if err != nil {
		return nil, nil, fmt.Errorf("opening a generic netlink socket: %w", err)
	}
	if err := nl.JoinGroup(group); err != nil {
		nl.Close()
		return nil, nil, fmt.Errorf("joining %q: %w", multicastGroup, err)
	}
	out := make(chan int)
	done := make(chan struct{})
	var failed error // written before done is closed
	stop := context.AfterFunc(ctx, func() { nl.Close() })
	go func() {
		defer close(done)
		defer close(out)
		defer stop()
		failed = watchLoop(ctx, c.family.ID, nl.Receive, out)
		nl.Close()
	}()
	return out, func() error { <-done; return failed }, nil
}

// watchLoop reads notifications with receive until it fails for good and
// sends each dead device's index to out. It returns nil when ctx is done
// (which closes the socket), or receive's error if the socket failed first.
func watchLoop(ctx context.Context, familyID uint16, receive func() ([]netlink.Message, error), out chan<- int) error {
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
				return nil
			}
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil // closed by ctx
			}
			return fmt.Errorf("receiving nbd netlink notifications: %w", err)
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
				return nil
			}
		}
	}
	return nil
}
