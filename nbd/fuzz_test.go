package nbd

import (
	"bytes"
	"testing"
)

// fuzzRoundTrip checks that whatever decodes, encodes, and decodes again to the
// same bytes: the decoder accepts nothing the encoder could not produce.
func fuzzRoundTrip[T message](t *testing.T, data []byte, newMsg func() T) {
	m := newMsg()
	if err := m.UnmarshalBinary(data); err != nil {
		return
	}
	b, err := m.AppendBinary(nil)
	if err != nil {
		t.Fatalf("decoded %x but cannot re-encode: %v", data, err)
	}
	m2 := newMsg()
	if err := m2.UnmarshalBinary(b); err != nil {
		t.Fatalf("re-encoded %x does not decode: %v", b, err)
	}
	b2, _ := m2.AppendBinary(nil)
	if !bytes.Equal(b, b2) {
		t.Fatalf("round trip differs:\n%x\n%x", b, b2)
	}
}

func seed(f *testing.F, msgs ...message) {
	for _, m := range msgs {
		b, err := m.AppendBinary(nil)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
}

func FuzzRequestHeader(f *testing.F) {
	seed(f, &RequestHeader{Command: CmdRead, Length: 4096}, &RequestHeader{Flags: CmdFlagFUA, Command: CmdWrite, Handle: 7, Offset: 1 << 40, Length: 1 << 25})
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, b []byte) {
		fuzzRoundTrip(t, b, func() *RequestHeader { return &RequestHeader{} })
	})
}

func FuzzOptionHeader(f *testing.F) {
	seed(f, &OptionHeader{Option: OptGo, Length: 10}, &OptionHeader{Option: OptList})
	f.Fuzz(func(t *testing.T, b []byte) {
		fuzzRoundTrip(t, b, func() *OptionHeader { return &OptionHeader{} })
	})
}

func FuzzInfoRequest(f *testing.F) {
	seed(f, &InfoRequest{Name: "vm1", Requests: []InfoType{InfoBlockSize}}, &InfoRequest{})
	f.Fuzz(func(t *testing.T, b []byte) {
		fuzzRoundTrip(t, b, func() *InfoRequest { return &InfoRequest{} })
	})
}

func FuzzMetaContextRequest(f *testing.F) {
	seed(f, &MetaContextRequest{Export: "vm1", Queries: []string{"base:allocation", "qemu:"}}, &MetaContextRequest{})
	f.Fuzz(func(t *testing.T, b []byte) {
		fuzzRoundTrip(t, b, func() *MetaContextRequest { return &MetaContextRequest{} })
	})
}

func FuzzOptionReply(f *testing.F) {
	// Option reply payloads a client decodes: info items, server entries and
	// meta contexts, selected by the first byte.
	seed(f, &Info{Type: InfoExport, Size: 1}, &Info{Type: InfoBlockSize, MinBlockSize: 1},
		&Info{Type: InfoName, Text: "x"}, &Info{Type: 9, Raw: []byte{1}})
	f.Fuzz(func(t *testing.T, b []byte) {
		fuzzRoundTrip(t, b, func() *Info { return &Info{} })
		fuzzRoundTrip(t, b, func() *ServerEntry { return &ServerEntry{} })
		fuzzRoundTrip(t, b, func() *MetaContext { return &MetaContext{} })
	})
}

func FuzzStructuredReply(f *testing.F) {
	seed(f, &StructuredReplyHeader{Flags: ReplyFlagDone, Type: ReplyError, Handle: 3, Length: 6},
		&BlockStatus{ContextID: 1, Extents: []Extent{{512, 3}}}, &OffsetHole{Offset: 512, Length: 512})
	f.Fuzz(func(t *testing.T, b []byte) {
		fuzzRoundTrip(t, b, func() *StructuredReplyHeader { return &StructuredReplyHeader{} })
		fuzzRoundTrip(t, b, func() *SimpleReply { return &SimpleReply{} })
		fuzzRoundTrip(t, b, func() *BlockStatus { return &BlockStatus{} })
		fuzzRoundTrip(t, b, func() *OffsetHole { return &OffsetHole{} })
		for _, typ := range []ReplyType{ReplyError, ReplyErrorOffset} {
			var e ErrorChunk
			if e.UnmarshalBinary(typ, b) != nil {
				continue
			}
			enc, err := e.AppendBinary(nil)
			if err != nil {
				t.Fatalf("decoded error chunk cannot re-encode: %v", err)
			}
			if !bytes.Equal(enc, b) {
				t.Fatalf("error chunk round trip differs:\n%x\n%x", b, enc)
			}
		}
	})
}
