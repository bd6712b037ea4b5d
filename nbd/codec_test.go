package nbd

import (
	"bytes"
	"encoding"
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// message is what every fixed-layout codec in this package implements.
type message interface {
	encoding.BinaryAppender
	encoding.BinaryUnmarshaler
}

// roundTrip encodes m, decodes into fresh, and checks the result equals m and
// re-encodes to the same bytes.
func roundTrip[T message](t *testing.T, m T, fresh T) {
	t.Helper()
	b, err := m.AppendBinary(nil)
	if err != nil {
		t.Fatalf("encode %#v: %v", m, err)
	}
	if err := fresh.UnmarshalBinary(b); err != nil {
		t.Fatalf("decode %x: %v", b, err)
	}
	b2, err := fresh.AppendBinary(nil)
	if err != nil {
		t.Fatalf("re-encode: %v", err)
	}
	if !bytes.Equal(b, b2) {
		t.Errorf("re-encoded bytes differ:\n%x\n%x", b, b2)
	}
}

func TestFixedHeaders(t *testing.T) {
	tests := []struct {
		name string
		msg  message
		want []byte
	}{
		{"server hello", &ServerHello{Flags: FlagFixedNewstyle | FlagNoZeroes},
			[]byte("NBDMAGICIHAVEOPT\x00\x03")},
		{"option header", &OptionHeader{Option: OptGo, Length: 7},
			[]byte("IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x07")},
		{"option reply header", &OptionReplyHeader{Option: OptList, Type: RepErrUnknown, Length: 2},
			[]byte("\x00\x03\xe8\x89\x04\x55\x65\xa9\x00\x00\x00\x03\x80\x00\x00\x06\x00\x00\x00\x02")},
		{"export name reply", &ExportNameReply{Size: 1 << 30, Flags: FlagHasFlags | FlagSendFlush},
			[]byte("\x00\x00\x00\x00\x40\x00\x00\x00\x00\x05")},
		{"request header", &RequestHeader{Flags: CmdFlagFUA, Command: CmdWrite, Handle: 0x0102030405060708, Offset: 4096, Length: 512},
			[]byte("\x25\x60\x95\x13\x00\x01\x00\x01\x01\x02\x03\x04\x05\x06\x07\x08\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x02\x00")},
		{"simple reply", &SimpleReply{Errno: EIO, Handle: 9},
			[]byte("\x67\x44\x66\x98\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x09")},
		{"structured header", &StructuredReplyHeader{Flags: ReplyFlagDone, Type: ReplyOffsetData, Handle: 1, Length: 8 + 512},
			[]byte("\x66\x8e\x33\xef\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x02\x08")},
		{"offset hole", &OffsetHole{Offset: 1 << 20, Length: 65536},
			[]byte("\x00\x00\x00\x00\x00\x10\x00\x00\x00\x01\x00\x00")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.msg.AppendBinary(nil)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("encoding (-want +got):\n%s", diff)
			}
			if err := tt.msg.UnmarshalBinary(tt.want); err != nil {
				t.Fatalf("decode: %v", err)
			}
			// A byte short and a byte long must both be refused.
			if err := tt.msg.UnmarshalBinary(tt.want[:len(tt.want)-1]); !errors.Is(err, ErrShort) {
				t.Errorf("decode short: got %v, want ErrShort", err)
			}
			if err := tt.msg.UnmarshalBinary(append(bytes.Clone(tt.want), 0)); !errors.Is(err, ErrTrailing) {
				t.Errorf("decode long: got %v, want ErrTrailing", err)
			}
		})
	}
}

func TestBadMagic(t *testing.T) {
	tests := []struct {
		name string
		msg  message
		size int
	}{
		{"server hello", &ServerHello{}, ServerHelloSize},
		{"option header", &OptionHeader{}, OptionHeaderSize},
		{"option reply header", &OptionReplyHeader{}, OptionReplyHeaderSize},
		{"request header", &RequestHeader{}, RequestHeaderSize},
		{"simple reply", &SimpleReply{}, SimpleReplySize},
		{"structured header", &StructuredReplyHeader{}, StructuredHeaderSize},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.msg.UnmarshalBinary(make([]byte, tt.size))
			if !errors.Is(err, ErrBadMagic) {
				t.Fatalf("got %v, want ErrBadMagic", err)
			}
			var opErr *OpError
			if !errors.As(err, &opErr) || opErr.Op == "" {
				t.Errorf("error %v is not an *OpError naming the message", err)
			}
		})
	}
}

func TestOptionPayloads(t *testing.T) {
	tests := []struct {
		name  string
		msg   message
		fresh message
		want  []byte
		// openEnded messages end in text or repeated items, so some
		// prefixes are valid messages too.
		openEnded bool
	}{
		{"info request", &InfoRequest{Name: "vm1", Requests: []InfoType{InfoBlockSize, InfoName}}, &InfoRequest{},
			[]byte("\x00\x00\x00\x03vm1\x00\x02\x00\x03\x00\x01"), false},
		{"info request default export", &InfoRequest{}, &InfoRequest{}, []byte("\x00\x00\x00\x00\x00\x00"), false},
		{"meta context request", &MetaContextRequest{Export: "a", Queries: []string{"base:allocation"}}, &MetaContextRequest{},
			[]byte("\x00\x00\x00\x01a\x00\x00\x00\x01\x00\x00\x00\x0fbase:allocation"), false},
		{"meta context no queries", &MetaContextRequest{Export: "a"}, &MetaContextRequest{},
			[]byte("\x00\x00\x00\x01a\x00\x00\x00\x00"), false},
		{"info export", &Info{Type: InfoExport, Size: 512, Flags: FlagHasFlags | FlagReadOnly}, &Info{},
			[]byte("\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x03"), false},
		{"info name", &Info{Type: InfoName, Text: "vm1"}, &Info{}, []byte("\x00\x01vm1"), true},
		{"info description", &Info{Type: InfoDescription, Text: "disk"}, &Info{}, []byte("\x00\x02disk"), true},
		{"info block size", &Info{Type: InfoBlockSize, MinBlockSize: 1, PrefBlockSize: 4096, MaxPayloadSize: 32 << 20}, &Info{},
			[]byte("\x00\x03\x00\x00\x00\x01\x00\x00\x10\x00\x02\x00\x00\x00"), false},
		{"info unknown", &Info{Type: 99, Raw: []byte{1, 2}}, &Info{}, []byte("\x00\x63\x01\x02"), true},
		{"server entry", &ServerEntry{Name: "vm1", Description: "a disk"}, &ServerEntry{},
			[]byte("\x00\x00\x00\x03vm1a disk"), true},
		{"meta context", &MetaContext{ID: 1, Name: "base:allocation"}, &MetaContext{},
			[]byte("\x00\x00\x00\x01base:allocation"), true},
		{"block status", &BlockStatus{ContextID: 1, Extents: []Extent{{4096, 0}, {8192, StateHole | StateZero}}}, &BlockStatus{},
			[]byte("\x00\x00\x00\x01\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00\x20\x00\x00\x00\x00\x03"), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.msg.AppendBinary(nil)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("encoding (-want +got):\n%s", diff)
			}
			if err := tt.fresh.UnmarshalBinary(tt.want); err != nil {
				t.Fatalf("decode: %v", err)
			}
			if diff := cmp.Diff(tt.msg, tt.fresh); diff != "" {
				t.Errorf("decoded (-want +got):\n%s", diff)
			}
			// Every strict prefix must be refused, never panic, unless the
			// message ends in free-form text or repeated items.
			for n := 0; n < len(tt.want) && !tt.openEnded; n++ {
				if err := tt.fresh.UnmarshalBinary(tt.want[:n]); err == nil {
					t.Errorf("prefix of %d bytes decoded without error", n)
				}
			}
		})
	}
}

func TestDecodeRefusesHugeCounts(t *testing.T) {
	tests := []struct {
		name string
		msg  message
		in   []byte
		want error
	}{
		{"info request name over limit", &InfoRequest{}, []byte("\x00\x01\x00\x01"), ErrTooLong},
		{"info request name past end", &InfoRequest{}, []byte("\x00\x00\x00\x10ab\x00\x00"), ErrShort},
		{"info request count past end", &InfoRequest{}, []byte("\x00\x00\x00\x00\xff\xff\x00\x01"), ErrShort},
		{"meta context 4 billion queries", &MetaContextRequest{}, []byte("\x00\x00\x00\x00\xff\xff\xff\xff\x00\x00\x00\x00"), ErrShort},
		{"meta context query over limit", &MetaContextRequest{}, []byte("\x00\x00\x00\x00\x00\x00\x00\x01\x00\x10\x00\x00"), ErrTooLong},
		{"block status zero extent", &BlockStatus{}, []byte("\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00"), ErrShort},
		{"block status ragged", &BlockStatus{}, []byte("\x00\x00\x00\x01\x00\x00\x10\x00\x00\x00"), ErrShort},
		{"server entry name past end", &ServerEntry{}, []byte("\x00\x00\x00\x09ab"), ErrShort},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.msg.UnmarshalBinary(tt.in); !errors.Is(err, tt.want) {
				t.Errorf("got %v, want %v", err, tt.want)
			}
		})
	}
}

func TestErrorChunk(t *testing.T) {
	tests := []struct {
		name string
		in   ErrorChunk
		want []byte
	}{
		{"plain", ErrorChunk{Errno: EIO, Message: "bad"}, []byte("\x00\x00\x00\x05\x00\x03bad")},
		{"no message", ErrorChunk{Errno: EINVAL}, []byte("\x00\x00\x00\x16\x00\x00")},
		{"offset", ErrorChunk{Errno: EIO, Message: "x", HasOffset: true, Offset: 512},
			[]byte("\x00\x00\x00\x05\x00\x01x\x00\x00\x00\x00\x00\x00\x02\x00")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.in.AppendBinary(nil)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("encoding (-want +got):\n%s", diff)
			}
			var back ErrorChunk
			if err := back.UnmarshalBinary(tt.in.Type(), got); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.in, back); diff != "" {
				t.Errorf("decoded (-want +got):\n%s", diff)
			}
		})
	}
	var e ErrorChunk
	if err := e.UnmarshalBinary(ReplyError, []byte("\x00\x00\x00\x00\x00\x00")); err == nil {
		t.Error("error value 0 decoded without error")
	}
	if err := e.UnmarshalBinary(ReplyError, []byte("\x00\x00\x00\x05\x00\x09ab")); !errors.Is(err, ErrShort) {
		t.Errorf("message past end: got %v, want ErrShort", err)
	}
}

func TestStrings(t *testing.T) {
	tests := []struct {
		got, want string
	}{
		{(FlagHasFlags | FlagSendFlush | FlagCanMultiConn).String(), "HAS_FLAGS|SEND_FLUSH|CAN_MULTI_CONN"},
		{TransmissionFlags(1 << 15).String(), "0x8000"},
		{TransmissionFlags(0).String(), "0"},
		{(CmdFlagFUA | CmdFlagNoHole).String(), "FUA|NO_HOLE"},
		{OptGo.String(), "NBD_OPT_GO"},
		{Option(77).String(), "NBD_OPT_77"},
		{RepErrUnknown.String(), "NBD_REP_ERR_UNKNOWN"},
		{CmdBlockStatus.String(), "NBD_CMD_BLOCK_STATUS"},
		{ReplyOffsetHole.String(), "NBD_REPLY_TYPE_OFFSET_HOLE"},
		{ENOSPC.Error(), "nbd: ENOSPC"},
		{InfoBlockSize.String(), "NBD_INFO_BLOCK_SIZE"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
	if !RepErrPolicy.IsError() || RepAck.IsError() || !ReplyErrorOffset.IsError() || ReplyOffsetData.IsError() {
		t.Error("IsError misclassifies")
	}
}
