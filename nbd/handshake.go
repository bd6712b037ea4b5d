package nbd

// ServerHello is the server's greeting in fixed-newstyle negotiation.
type ServerHello struct {
	Flags HandshakeFlags
}

// AppendBinary appends the encoded greeting to b.
func (h ServerHello) AppendBinary(b []byte) ([]byte, error) {
	b = be.AppendUint64(b, Magic)
	b = be.AppendUint64(b, OptionMagic)
	return be.AppendUint16(b, uint16(h.Flags)), nil
}

// UnmarshalBinary decodes a greeting of exactly ServerHelloSize bytes. Oldstyle
// servers (a different second magic) are reported as ErrBadMagic.
func (h *ServerHello) UnmarshalBinary(b []byte) error {
	const op = "server greeting"
	d := decoder{b: b}
	magic, opt := d.u64(), d.u64()
	h.Flags = HandshakeFlags(d.u16())
	if err := d.finish(op); err != nil {
		return err
	}
	if magic != Magic || opt != OptionMagic {
		return opErrf(op, ErrBadMagic, "%#x %#x (not a newstyle NBD server)", magic, opt)
	}
	return nil
}

// OptionHeader precedes every option request; Length bytes of data follow.
type OptionHeader struct {
	Option Option
	Length uint32
}

// AppendBinary appends the encoded header to b.
func (h OptionHeader) AppendBinary(b []byte) ([]byte, error) {
	b = be.AppendUint64(b, OptionMagic)
	b = be.AppendUint32(b, uint32(h.Option))
	return be.AppendUint32(b, h.Length), nil
}

// UnmarshalBinary decodes a header of exactly OptionHeaderSize bytes. It does
// not bound Length: the caller decides how much option data it will read.
func (h *OptionHeader) UnmarshalBinary(b []byte) error {
	const op = "option header"
	d := decoder{b: b}
	magic := d.u64()
	h.Option = Option(d.u32())
	h.Length = d.u32()
	if err := d.finish(op); err != nil {
		return err
	}
	if magic != OptionMagic {
		return opErrf(op, ErrBadMagic, "%#x", magic)
	}
	return nil
}

// OptionReplyHeader precedes every option reply; Length bytes of data follow.
type OptionReplyHeader struct {
	Option Option
	Type   OptionReplyType
	Length uint32
}

// AppendBinary appends the encoded header to b.
func (h OptionReplyHeader) AppendBinary(b []byte) ([]byte, error) {
	b = be.AppendUint64(b, OptionReplyMagic)
	b = be.AppendUint32(b, uint32(h.Option))
	b = be.AppendUint32(b, uint32(h.Type))
	return be.AppendUint32(b, h.Length), nil
}

// UnmarshalBinary decodes a header of exactly OptionReplyHeaderSize bytes.
func (h *OptionReplyHeader) UnmarshalBinary(b []byte) error {
	const op = "option reply header"
	d := decoder{b: b}
	magic := d.u64()
	h.Option = Option(d.u32())
	h.Type = OptionReplyType(d.u32())
	h.Length = d.u32()
	if err := d.finish(op); err != nil {
		return err
	}
	if magic != OptionReplyMagic {
		return opErrf(op, ErrBadMagic, "%#x", magic)
	}
	return nil
}

// ExportNameReply answers NBD_OPT_EXPORT_NAME. Unless the client set
// ClientFlagNoZeroes, ExportNameZeroPadding zero bytes follow it.
type ExportNameReply struct {
	Size  uint64
	Flags TransmissionFlags
}

// AppendBinary appends the encoded reply (without padding) to b.
func (r ExportNameReply) AppendBinary(b []byte) ([]byte, error) {
	b = be.AppendUint64(b, r.Size)
	return be.AppendUint16(b, uint16(r.Flags)), nil
}

// UnmarshalBinary decodes a reply of exactly ExportNameReplySize bytes.
func (r *ExportNameReply) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	r.Size = d.u64()
	r.Flags = TransmissionFlags(d.u16())
	return d.finish("export name reply")
}
