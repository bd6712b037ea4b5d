package nbd

import (
	"fmt"
	"strings"
)

var optionNames = map[Option]string{
	OptExportName: "NBD_OPT_EXPORT_NAME", OptAbort: "NBD_OPT_ABORT", OptList: "NBD_OPT_LIST",
	OptPeekExport: "NBD_OPT_PEEK_EXPORT", OptStartTLS: "NBD_OPT_STARTTLS", OptInfo: "NBD_OPT_INFO",
	OptGo: "NBD_OPT_GO", OptStructuredReply: "NBD_OPT_STRUCTURED_REPLY",
	OptListMetaContext: "NBD_OPT_LIST_META_CONTEXT", OptSetMetaContext: "NBD_OPT_SET_META_CONTEXT",
	OptExtendedHeaders: "NBD_OPT_EXTENDED_HEADERS",
}

func (o Option) String() string {
	if s, ok := optionNames[o]; ok {
		return s
	}
	return fmt.Sprintf("NBD_OPT_%d", uint32(o))
}

var optionReplyNames = map[OptionReplyType]string{
	RepAck: "NBD_REP_ACK", RepServer: "NBD_REP_SERVER", RepInfo: "NBD_REP_INFO",
	RepMetaContext: "NBD_REP_META_CONTEXT", RepErrUnsup: "NBD_REP_ERR_UNSUP",
	RepErrPolicy: "NBD_REP_ERR_POLICY", RepErrInvalid: "NBD_REP_ERR_INVALID",
	RepErrPlatform: "NBD_REP_ERR_PLATFORM", RepErrTLSReqd: "NBD_REP_ERR_TLS_REQD",
	RepErrUnknown: "NBD_REP_ERR_UNKNOWN", RepErrShutdown: "NBD_REP_ERR_SHUTDOWN",
	RepErrBlockSizeReqd: "NBD_REP_ERR_BLOCK_SIZE_REQD", RepErrTooBig: "NBD_REP_ERR_TOO_BIG",
	RepErrExtHeaderReqd: "NBD_REP_ERR_EXT_HEADER_REQD",
}

func (t OptionReplyType) String() string {
	if s, ok := optionReplyNames[t]; ok {
		return s
	}
	return fmt.Sprintf("NBD_REP_%#x", uint32(t))
}

var infoNames = map[InfoType]string{
	InfoExport: "NBD_INFO_EXPORT", InfoName: "NBD_INFO_NAME",
	InfoDescription: "NBD_INFO_DESCRIPTION", InfoBlockSize: "NBD_INFO_BLOCK_SIZE",
}

func (t InfoType) String() string {
	if s, ok := infoNames[t]; ok {
		return s
	}
	return fmt.Sprintf("NBD_INFO_%d", uint16(t))
}

var commandNames = map[Command]string{
	CmdRead: "NBD_CMD_READ", CmdWrite: "NBD_CMD_WRITE", CmdDisc: "NBD_CMD_DISC",
	CmdFlush: "NBD_CMD_FLUSH", CmdTrim: "NBD_CMD_TRIM", CmdCache: "NBD_CMD_CACHE",
	CmdWriteZeroes: "NBD_CMD_WRITE_ZEROES", CmdBlockStatus: "NBD_CMD_BLOCK_STATUS",
	CmdResize: "NBD_CMD_RESIZE",
}

func (c Command) String() string {
	if s, ok := commandNames[c]; ok {
		return s
	}
	return fmt.Sprintf("NBD_CMD_%d", uint16(c))
}

var replyTypeNames = map[ReplyType]string{
	ReplyNone: "NBD_REPLY_TYPE_NONE", ReplyOffsetData: "NBD_REPLY_TYPE_OFFSET_DATA",
	ReplyOffsetHole: "NBD_REPLY_TYPE_OFFSET_HOLE", ReplyBlockStatus: "NBD_REPLY_TYPE_BLOCK_STATUS",
	ReplyBlockStatusExt: "NBD_REPLY_TYPE_BLOCK_STATUS_EXT", ReplyError: "NBD_REPLY_TYPE_ERROR",
	ReplyErrorOffset: "NBD_REPLY_TYPE_ERROR_OFFSET",
}

func (t ReplyType) String() string {
	if s, ok := replyTypeNames[t]; ok {
		return s
	}
	return fmt.Sprintf("NBD_REPLY_TYPE_%d", uint16(t))
}

var errnoNames = map[Errno]string{
	EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL", ENOSPC: "ENOSPC",
	EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP", ESHUTDOWN: "ESHUTDOWN",
}

func (e Errno) String() string {
	if s, ok := errnoNames[e]; ok {
		return s
	}
	return fmt.Sprintf("errno %d", uint32(e))
}

// Error makes Errno usable as an error: a request the peer answered with e.
func (e Errno) Error() string { return "nbd: " + e.String() }

// bitNames renders the set bits of v with names, unknown bits as hex.
func bitNames(v uint64, names []string) string {
	if v == 0 {
		return "0"
	}
	var parts []string
	for i := 0; i < 64; i++ {
		if v&(1<<i) == 0 {
			continue
		}
		if i < len(names) && names[i] != "" {
			parts = append(parts, names[i])
		} else {
			parts = append(parts, fmt.Sprintf("%#x", uint64(1)<<i))
		}
	}
	return strings.Join(parts, "|")
}

var transmissionFlagNames = []string{
	"HAS_FLAGS", "READ_ONLY", "SEND_FLUSH", "SEND_FUA", "ROTATIONAL", "SEND_TRIM",
	"SEND_WRITE_ZEROES", "SEND_DF", "CAN_MULTI_CONN", "SEND_RESIZE", "SEND_CACHE",
	"SEND_FAST_ZERO", "BLOCK_STATUS_PAYLOAD",
}

func (f TransmissionFlags) String() string { return bitNames(uint64(f), transmissionFlagNames) }

// Names lists the names of the set flags, for reports.
func (f TransmissionFlags) Names() []string {
	var out []string
	for i, n := range transmissionFlagNames {
		if f&(1<<i) != 0 {
			out = append(out, n)
		}
	}
	return out
}

func (f HandshakeFlags) String() string {
	return bitNames(uint64(f), []string{"FIXED_NEWSTYLE", "NO_ZEROES"})
}

func (f ClientFlags) String() string {
	return bitNames(uint64(f), []string{"C_FIXED_NEWSTYLE", "C_NO_ZEROES"})
}

func (f CommandFlags) String() string {
	return bitNames(uint64(f), []string{"FUA", "NO_HOLE", "DF", "REQ_ONE", "FAST_ZERO", "PAYLOAD_LEN"})
}

func (f ReplyFlags) String() string { return bitNames(uint64(f), []string{"DONE"}) }
