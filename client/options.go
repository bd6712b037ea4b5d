package client

import (
	"crypto/tls"
	"slices"
	"time"

	"github.com/lvnbd/lvnbd/nbd"
)

// Options tune a connection; nil means all defaults.
type Options struct {
	// NoStructuredReplies skips NBD_OPT_STRUCTURED_REPLY (and with it the
	// base:allocation context). The kernel's nbd driver cannot parse
	// structured replies, so sockets handed to it must not negotiate them.
	NoStructuredReplies bool
	// NoMetaContext skips NBD_OPT_SET_META_CONTEXT base:allocation, which
	// BlockStatus needs.
	NoMetaContext bool
	// DrainTimeout bounds how long Close waits for in-flight requests before
	// closing the socket under them. Default DefaultDrainTimeout.
	DrainTimeout time.Duration
	// TLS is for nbds:// and nbds+unix:// URIs: the roots to verify the
	// server against and the client certificate, if any (LoadTLSConfig).
	// nil: the system's roots and no client certificate, or the URI's
	// tls-certificates directory; giving both is an error, and so is TLS
	// for a plain-text URI. Its ServerName and InsecureSkipVerify are
	// replaced by the URI's: its tls-hostname (else its host) is the name
	// the server's certificate must carry, and only its tls-verify-peer=0
	// skips that check.
	TLS *tls.Config
}

// DefaultDrainTimeout is how long Close waits for in-flight requests.
const DefaultDrainTimeout = 30 * time.Second

func (o *Options) drainTimeout() time.Duration {
	if o == nil || o.DrainTimeout <= 0 {
		return DefaultDrainTimeout
	}
	return o.DrainTimeout
}

// BlockSizes are an export's size constraints (NBD_INFO_BLOCK_SIZE).
type BlockSizes struct {
	Minimum    uint32 // smallest addressable length and alignment
	Preferred  uint32 // smallest efficient length and alignment
	MaxPayload uint32 // largest READ or WRITE payload the server accepts
}

// DefaultBlockSizes are what the spec says a server supports when it
// advertises nothing.
var DefaultBlockSizes = BlockSizes{Minimum: 1, Preferred: 4096, MaxPayload: nbd.DefaultMaxPayload}

// ExportInfo is what the handshake learned about an export.
type ExportInfo struct {
	// Name is the server's canonical name (NBD_INFO_NAME), else the name
	// asked for.
	Name        string
	Description string
	Size        uint64
	Flags       nbd.TransmissionFlags
	// BlockSizes are the server's constraints, or DefaultBlockSizes when
	// BlockSizesAdvertised is false.
	BlockSizes           BlockSizes
	BlockSizesAdvertised bool
	// StructuredReplies reports whether NBD_OPT_STRUCTURED_REPLY was agreed.
	StructuredReplies bool
	// TLS reports whether the connection is encrypted (nbds://).
	TLS bool
	// MetaContexts are the contexts selected for transmission (Dial,
	// Negotiate), or those the export offers (Info).
	MetaContexts []nbd.MetaContext
}

// ID is the ID of the volume behind the export, if its server tells (an
// lvnbd server does, in the description: see nbd.DescriptionID): it
// changes when the volume is removed and made anew under the same name.
func (e ExportInfo) ID() string { return nbd.DescriptionID(e.Description) }

// SameExport reports whether two connections see the same export, so that a
// request may go over either (a pool's, the kernel's connections of one
// device): a BLOCK_STATUS needs the context on both, and a volume made anew
// between two dials (another ID) is another export.
func (e ExportInfo) SameExport(o ExportInfo) bool {
	return e.Size == o.Size && e.Flags == o.Flags && e.BlockSizes == o.BlockSizes &&
		e.StructuredReplies == o.StructuredReplies && e.ID() == o.ID() &&
		// The server numbers contexts per connection: names tell.
		slices.EqualFunc(e.MetaContexts, o.MetaContexts, func(x, y nbd.MetaContext) bool { return x.Name == y.Name })
}

// ReadOnly reports whether the export refuses writes.
func (e ExportInfo) ReadOnly() bool { return e.Flags&nbd.FlagReadOnly != 0 }

// MultiConn reports whether the server allows several connections to the
// export with consistent flushes (NBD_FLAG_CAN_MULTI_CONN).
func (e ExportInfo) MultiConn() bool { return e.Flags&nbd.FlagCanMultiConn != 0 }

// metaContextID returns the id of the named selected context.
func (e ExportInfo) metaContextID(name string) (uint32, bool) {
	for _, m := range e.MetaContexts {
		if m.Name == name {
			return m.ID, true
		}
	}
	return 0, false
}
