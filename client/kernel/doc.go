// Package kernel hands NBD connections to the Linux nbd driver through its
// generic-netlink family "nbd" (include/uapi/linux/nbd-netlink.h), making
// them a block device /dev/nbdN.
//
// The handshake is done in userspace (client.Negotiate with
// Options.NoStructuredReplies: the driver only parses simple replies); the
// connected sockets then go to the kernel with NBD_CMD_CONNECT together with
// the export's size and transmission flags. From then on the kernel speaks
// the transmission phase itself, with no userspace process in the I/O path.
//
// Socket ownership: the kernel resolves each descriptor in the CONNECT or
// RECONFIGURE message with sockfd_lookup, which takes its own reference on
// the socket's file. The descriptors therefore only have to stay open in the
// calling process until the netlink call returns; the caller should then close
// them, or the process would keep every kernel connection's socket alive
// after a detach (and leak one descriptor per connection). Closing our
// descriptor does not close the connection: that happens only when the last
// reference, the kernel's, goes away. Connect and Reconfigure set
// SO_LINGER 0 and TCP_USER_TIMEOUT on TCP sockets before handing them over,
// so that a connection the kernel gave up on cannot deliver an old write
// after the copy nbd resent on another one.
//
// A device disconnected while something holds it open keeps its pid and
// backend in sysfs until the last close, but the kernel gives it no
// connections again (Reconfigure fails with ErrDisconnectedHeldOpen).
//
// Unlike the old ioctl interface (NBD_DO_IT), a netlink-configured device
// needs no process to stay alive: it lives until NBD_CMD_DISCONNECT, or until
// the dead-connection timeout expires with every connection dead, in which
// case I/O fails and the device waits for NBD_CMD_RECONFIGURE with fresh
// sockets. The kernel announces each connection it finds dead with
// NBD_CMD_LINK_DEAD on the "nbd_mc_group" multicast group (WatchLinkDead).
package kernel
