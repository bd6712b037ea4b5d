package nbd

// Magic numbers of the handshake and transmission phases.
const (
	// Magic opens every newstyle handshake ("NBDMAGIC").
	Magic uint64 = 0x4e42444d41474943
	// OptionMagic ("IHAVEOPT") follows Magic from the server and opens every
	// option request from the client.
	OptionMagic uint64 = 0x49484156454f5054
	// OptionReplyMagic opens every option reply.
	OptionReplyMagic uint64 = 0x0003e889045565a9
	// RequestMagic opens every transmission request.
	RequestMagic uint32 = 0x25609513
	// SimpleReplyMagic opens every simple reply.
	SimpleReplyMagic uint32 = 0x67446698
	// StructuredReplyMagic opens every structured reply chunk.
	StructuredReplyMagic uint32 = 0x668e33ef
)

// Fixed sizes of headers on the wire, in bytes.
const (
	ServerHelloSize       = 18 // Magic, OptionMagic, handshake flags
	ClientFlagsSize       = 4
	OptionHeaderSize      = 16 // OptionMagic, option, length
	OptionReplyHeaderSize = 20 // OptionReplyMagic, option, reply type, length
	ExportNameReplySize   = 10 // size, transmission flags (then 124 zeroes unless NO_ZEROES)
	ExportNameZeroPadding = 124
	RequestHeaderSize     = 28
	SimpleReplySize       = 16
	StructuredHeaderSize  = 20
)

// Bounds on peer-controlled lengths.
const (
	// MaxStringLength is the longest string (export name, query, message)
	// the protocol allows.
	MaxStringLength = 4096
	// MaxOptionLength bounds the data of one option request. The largest
	// legitimate option is a meta-context request with a handful of queries.
	MaxOptionLength = 64 << 10
	// MaxOptionReplyLength bounds the data of one option reply a client
	// accepts (an NBD_REP_SERVER with a long description, say).
	MaxOptionReplyLength = 64 << 10
	// DefaultMaxPayload is the largest read or write payload a server must
	// accept when it advertises no other limit (32 MiB).
	DefaultMaxPayload = 32 << 20
	// MaxBlockStatusExtents is the most extents a block-status chunk may carry.
	MaxBlockStatusExtents = 1 << 20
)

// HandshakeFlags are the server's global flags sent in the greeting.
type HandshakeFlags uint16

// Handshake flags.
const (
	FlagFixedNewstyle HandshakeFlags = 1 << 0
	FlagNoZeroes      HandshakeFlags = 1 << 1
)

// ClientFlags are the client's answer to the handshake flags.
type ClientFlags uint32

// Client flags.
const (
	ClientFlagFixedNewstyle ClientFlags = 1 << 0
	ClientFlagNoZeroes      ClientFlags = 1 << 1
)

// Option is the type of an option request during the handshake.
type Option uint32

// Option types.
const (
	OptExportName      Option = 1
	OptAbort           Option = 2
	OptList            Option = 3
	OptPeekExport      Option = 4
	OptStartTLS        Option = 5
	OptInfo            Option = 6
	OptGo              Option = 7
	OptStructuredReply Option = 8
	OptListMetaContext Option = 9
	OptSetMetaContext  Option = 10
	OptExtendedHeaders Option = 11
)

// OptionReplyType is the type of an option reply. Error types have bit 31 set.
type OptionReplyType uint32

// Option reply types.
const (
	RepAck         OptionReplyType = 1
	RepServer      OptionReplyType = 2
	RepInfo        OptionReplyType = 3
	RepMetaContext OptionReplyType = 4

	repErrBit           OptionReplyType = 1 << 31
	RepErrUnsup         OptionReplyType = repErrBit + 1
	RepErrPolicy        OptionReplyType = repErrBit + 2
	RepErrInvalid       OptionReplyType = repErrBit + 3
	RepErrPlatform      OptionReplyType = repErrBit + 4
	RepErrTLSReqd       OptionReplyType = repErrBit + 5
	RepErrUnknown       OptionReplyType = repErrBit + 6
	RepErrShutdown      OptionReplyType = repErrBit + 7
	RepErrBlockSizeReqd OptionReplyType = repErrBit + 8
	RepErrTooBig        OptionReplyType = repErrBit + 9
	RepErrExtHeaderReqd OptionReplyType = repErrBit + 10
)

// IsError reports whether t is an error reply.
func (t OptionReplyType) IsError() bool { return t&repErrBit != 0 }

// InfoType names one item of NBD_OPT_INFO / NBD_OPT_GO information.
type InfoType uint16

// Information types.
const (
	InfoExport      InfoType = 0
	InfoName        InfoType = 1
	InfoDescription InfoType = 2
	InfoBlockSize   InfoType = 3
)

// TransmissionFlags describe what an export supports.
type TransmissionFlags uint16

// Transmission flags.
const (
	FlagHasFlags           TransmissionFlags = 1 << 0
	FlagReadOnly           TransmissionFlags = 1 << 1
	FlagSendFlush          TransmissionFlags = 1 << 2
	FlagSendFUA            TransmissionFlags = 1 << 3
	FlagRotational         TransmissionFlags = 1 << 4
	FlagSendTrim           TransmissionFlags = 1 << 5
	FlagSendWriteZeroes    TransmissionFlags = 1 << 6
	FlagSendDF             TransmissionFlags = 1 << 7
	FlagCanMultiConn       TransmissionFlags = 1 << 8
	FlagSendResize         TransmissionFlags = 1 << 9
	FlagSendCache          TransmissionFlags = 1 << 10
	FlagSendFastZero       TransmissionFlags = 1 << 11
	FlagBlockStatusPayload TransmissionFlags = 1 << 12
)

// Command is the type of a transmission request.
type Command uint16

// Commands.
const (
	CmdRead        Command = 0
	CmdWrite       Command = 1
	CmdDisc        Command = 2
	CmdFlush       Command = 3
	CmdTrim        Command = 4
	CmdCache       Command = 5
	CmdWriteZeroes Command = 6
	CmdBlockStatus Command = 7
	CmdResize      Command = 8
)

// CommandFlags modify a transmission request.
type CommandFlags uint16

// Command flags.
const (
	CmdFlagFUA        CommandFlags = 1 << 0
	CmdFlagNoHole     CommandFlags = 1 << 1
	CmdFlagDF         CommandFlags = 1 << 2
	CmdFlagReqOne     CommandFlags = 1 << 3
	CmdFlagFastZero   CommandFlags = 1 << 4
	CmdFlagPayloadLen CommandFlags = 1 << 5
)

// ReplyFlags modify a structured reply chunk.
type ReplyFlags uint16

// ReplyFlagDone marks the final chunk of a structured reply.
const ReplyFlagDone ReplyFlags = 1 << 0

// ReplyType is the type of a structured reply chunk. Error types have bit 15 set.
type ReplyType uint16

// Structured reply chunk types.
const (
	ReplyNone           ReplyType = 0
	ReplyOffsetData     ReplyType = 1
	ReplyOffsetHole     ReplyType = 2
	ReplyBlockStatus    ReplyType = 5
	ReplyBlockStatusExt ReplyType = 6

	replyErrBit      ReplyType = 1 << 15
	ReplyError       ReplyType = replyErrBit + 1
	ReplyErrorOffset ReplyType = replyErrBit + 2
)

// IsError reports whether t is an error chunk.
func (t ReplyType) IsError() bool { return t&replyErrBit != 0 }

// Errno is an error value in a reply. Only the values below are defined by the
// protocol; clients treat any other as EINVAL.
type Errno uint32

// Error values.
const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

// Block status flags of the base:allocation metadata context.
const (
	StateHole uint32 = 1 << 0
	StateZero uint32 = 1 << 1
)

// MetaContextBaseAllocation is the one metadata context lvnbd serves.
const MetaContextBaseAllocation = "base:allocation"

// DefaultPort is the IANA port of NBD.
const DefaultPort = 10809
