// Package nbd encodes and decodes the Network Block Device wire protocol as
// specified by NetworkBlockDevice/nbd doc/proto.md: the fixed-newstyle
// handshake, option requests and replies, transmission request headers and
// simple and structured replies.
//
// The package does no I/O policy and no logging. Every decoder checks lengths
// before slicing, so bytes from a peer can neither panic the caller nor make it
// allocate more than the bounds documented here.
package nbd
