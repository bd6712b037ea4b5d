// Package client is lvnbd's userspace NBD client: it parses NBD URIs, runs
// the fixed-newstyle handshake (also for sockets later handed to the kernel),
// and carries pipelined requests over one connection (Conn) or several
// (Pool), both safe for concurrent use. nbds:// URIs start TLS before any
// other option and never fall back to plain text (Options.TLS).
//
// Everything read from the server is bounded before it is read: a broken or
// hostile server produces errors wrapping ErrProtocol, never a panic or an
// allocation it chose the size of.
package client
