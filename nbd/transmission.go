package nbd

import "fmt"

// RequestHeader is a transmission request; a WRITE's Length bytes of data follow.
type RequestHeader struct {
	Flags   CommandFlags
	Command Command
	Handle  uint64 // the spec's "cookie": echoed in the reply
	Offset  uint64
	Length  uint32
}

// AppendBinary appends the encoded header to b.
func (r RequestHeader) AppendBinary(b []byte) ([]byte, error) {
	b = be.AppendUint32(b, RequestMagic)
	b = be.AppendUint16(b, uint16(r.Flags))
	b = be.AppendUint16(b, uint16(r.Command))
	b = be.AppendUint64(b, r.Handle)
	b = be.AppendUint64(b, r.Offset)
	return be.AppendUint32(b, r.Length), nil
}

// UnmarshalBinary decodes a header of exactly RequestHeaderSize bytes.
func (r *RequestHeader) UnmarshalBinary(b []byte) error {
	const op = "request header"
	d := decoder{b: b}
	magic := d.u32()
	r.Flags = CommandFlags(d.u16())
	r.Command = Command(d.u16())
	r.Handle = d.u64()
	r.Offset = d.u64()
	r.Length = d.u32()
	if err := d.finish(op); err != nil {
		return err
	}
	if magic != RequestMagic {
		return opErrf(op, ErrBadMagic, "%#x", magic)
	}
	return nil
}

// SimpleReply answers a request when structured replies are not in use; a
// successful READ's data follows it.
type SimpleReply struct {
	Errno  Errno
	Handle uint64
}

// AppendBinary appends the encoded reply to b.
func (r SimpleReply) AppendBinary(b []byte) ([]byte, error) {
	b = be.AppendUint32(b, SimpleReplyMagic)
	b = be.AppendUint32(b, uint32(r.Errno))
	return be.AppendUint64(b, r.Handle), nil
}

// UnmarshalBinary decodes a reply of exactly SimpleReplySize bytes.
func (r *SimpleReply) UnmarshalBinary(b []byte) error {
	const op = "simple reply"
	d := decoder{b: b}
	magic := d.u32()
	r.Errno = Errno(d.u32())
	r.Handle = d.u64()
	if err := d.finish(op); err != nil {
		return err
	}
	if magic != SimpleReplyMagic {
		return opErrf(op, ErrBadMagic, "%#x", magic)
	}
	return nil
}

// StructuredReplyHeader opens one chunk of a structured reply; Length bytes of
// chunk payload follow.
type StructuredReplyHeader struct {
	Flags  ReplyFlags
	Type   ReplyType
	Handle uint64
	Length uint32
}

// AppendBinary appends the encoded header to b.
func (h StructuredReplyHeader) AppendBinary(b []byte) ([]byte, error) {
	b = be.AppendUint32(b, StructuredReplyMagic)
	b = be.AppendUint16(b, uint16(h.Flags))
	b = be.AppendUint16(b, uint16(h.Type))
	b = be.AppendUint64(b, h.Handle)
	return be.AppendUint32(b, h.Length), nil
}

// UnmarshalBinary decodes a header of exactly StructuredHeaderSize bytes.
func (h *StructuredReplyHeader) UnmarshalBinary(b []byte) error {
	const op = "structured reply header"
	d := decoder{b: b}
	magic := d.u32()
	h.Flags = ReplyFlags(d.u16())
	h.Type = ReplyType(d.u16())
	h.Handle = d.u64()
	h.Length = d.u32()
	if err := d.finish(op); err != nil {
		return err
	}
	if magic != StructuredReplyMagic {
		return opErrf(op, ErrBadMagic, "%#x", magic)
	}
	return nil
}

// OffsetHole is the payload of an NBD_REPLY_TYPE_OFFSET_HOLE chunk: Length
// bytes at Offset read as zeroes.
type OffsetHole struct {
	Offset uint64
	Length uint32
}

// OffsetHoleSize is the payload size of an OffsetHole chunk.
const OffsetHoleSize = 12

// AppendBinary appends the encoded payload to b.
func (h OffsetHole) AppendBinary(b []byte) ([]byte, error) {
	b = be.AppendUint64(b, h.Offset)
	return be.AppendUint32(b, h.Length), nil
}

// UnmarshalBinary decodes an OFFSET_HOLE payload.
func (h *OffsetHole) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	h.Offset = d.u64()
	h.Length = d.u32()
	return d.finish("offset hole chunk")
}

// OffsetDataPrefixSize is the size of the offset that opens an OFFSET_DATA
// chunk payload; the data follows it.
const OffsetDataPrefixSize = 8

// Extent is one block-status descriptor.
type Extent struct {
	Length uint32
	Flags  uint32
}

// BlockStatus is the payload of an NBD_REPLY_TYPE_BLOCK_STATUS chunk.
type BlockStatus struct {
	ContextID uint32
	Extents   []Extent
}

// AppendBinary appends the encoded payload to b.
func (s BlockStatus) AppendBinary(b []byte) ([]byte, error) {
	if len(s.Extents) > MaxBlockStatusExtents {
		return b, fmt.Errorf("nbd: block status: %d extents: %w", len(s.Extents), ErrTooLong)
	}
	b = be.AppendUint32(b, s.ContextID)
	for _, e := range s.Extents {
		b = be.AppendUint32(b, e.Length)
		b = be.AppendUint32(b, e.Flags)
	}
	return b, nil
}

// UnmarshalBinary decodes a BLOCK_STATUS payload: a context id and at least
// one descriptor, each of nonzero length.
func (s *BlockStatus) UnmarshalBinary(b []byte) error {
	const op = "block status chunk"
	if len(b) < 12 || (len(b)-4)%8 != 0 {
		return opErrf(op, ErrShort, "%d bytes is not a context id and whole descriptors", len(b))
	}
	n := (len(b) - 4) / 8
	if n > MaxBlockStatusExtents {
		return opErrf(op, ErrTooLong, "%d extents", n)
	}
	d := decoder{b: b}
	s.ContextID = d.u32()
	s.Extents = make([]Extent, n)
	for i := range s.Extents {
		s.Extents[i] = Extent{Length: d.u32(), Flags: d.u32()}
		if s.Extents[i].Length == 0 {
			return opErrf(op, ErrShort, "extent %d has length 0", i)
		}
	}
	return d.finish(op)
}

// ErrorChunk is the payload of NBD_REPLY_TYPE_ERROR, or with HasOffset of
// NBD_REPLY_TYPE_ERROR_OFFSET.
type ErrorChunk struct {
	Errno     Errno
	Message   string
	HasOffset bool
	Offset    uint64
}

// Type is the chunk type that carries e.
func (e ErrorChunk) Type() ReplyType {
	if e.HasOffset {
		return ReplyErrorOffset
	}
	return ReplyError
}

// AppendBinary appends the encoded payload to b.
func (e ErrorChunk) AppendBinary(b []byte) ([]byte, error) {
	if len(e.Message) > MaxStringLength {
		return b, fmt.Errorf("nbd: error chunk message: %w", ErrTooLong)
	}
	b = be.AppendUint32(b, uint32(e.Errno))
	b = be.AppendUint16(b, uint16(len(e.Message)))
	b = append(b, e.Message...)
	if e.HasOffset {
		b = be.AppendUint64(b, e.Offset)
	}
	return b, nil
}

// UnmarshalBinary decodes an error chunk payload of type t. Unknown error
// types keep whatever follows the message unparsed, as the spec allows.
func (e *ErrorChunk) UnmarshalBinary(t ReplyType, b []byte) error {
	const op = "error chunk"
	d := decoder{b: b}
	e.Errno = Errno(d.u32())
	msg, ok := d.str(uint32(d.u16()))
	if !ok {
		return opErrf(op, ErrTooLong, "message over %d bytes", MaxStringLength)
	}
	e.Message = msg
	e.HasOffset = t == ReplyErrorOffset
	if e.HasOffset {
		e.Offset = d.u64()
	} else if t != ReplyError && !d.short {
		d.b = nil
	}
	if err := d.finish(op); err != nil {
		return err
	}
	if e.Errno == 0 {
		return opErrf(op, ErrShort, "error value 0")
	}
	return nil
}
