package nbd

import "fmt"

// InfoRequest is the data of NBD_OPT_INFO and NBD_OPT_GO: an export name and
// the information items the client asks for.
type InfoRequest struct {
	Name     string
	Requests []InfoType
}

// AppendBinary appends the encoded option data to b.
func (r InfoRequest) AppendBinary(b []byte) ([]byte, error) {
	if len(r.Name) > MaxStringLength || len(r.Requests) > 0xffff {
		return b, fmt.Errorf("nbd: info request: %w", ErrTooLong)
	}
	b = be.AppendUint32(b, uint32(len(r.Name)))
	b = append(b, r.Name...)
	b = be.AppendUint16(b, uint16(len(r.Requests)))
	for _, t := range r.Requests {
		b = be.AppendUint16(b, uint16(t))
	}
	return b, nil
}

// UnmarshalBinary decodes the option data of NBD_OPT_INFO or NBD_OPT_GO.
func (r *InfoRequest) UnmarshalBinary(b []byte) error {
	const op = "info request"
	d := decoder{b: b}
	name, ok := d.str(d.u32())
	if !ok {
		return opErrf(op, ErrTooLong, "export name over %d bytes", MaxStringLength)
	}
	n := int(d.u16())
	r.Name = name
	r.Requests = nil
	if n > 0 && n*2 <= len(d.b) {
		r.Requests = make([]InfoType, 0, n)
	}
	for i := 0; i < n && !d.short; i++ {
		r.Requests = append(r.Requests, InfoType(d.u16()))
	}
	return d.finish(op)
}

// Has reports whether the client asked for t.
func (r InfoRequest) Has(t InfoType) bool {
	for _, x := range r.Requests {
		if x == t {
			return true
		}
	}
	return false
}

// MetaContextRequest is the data of NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
type MetaContextRequest struct {
	Export  string
	Queries []string
}

// AppendBinary appends the encoded option data to b.
func (r MetaContextRequest) AppendBinary(b []byte) ([]byte, error) {
	if len(r.Export) > MaxStringLength {
		return b, fmt.Errorf("nbd: meta context request: %w", ErrTooLong)
	}
	b = be.AppendUint32(b, uint32(len(r.Export)))
	b = append(b, r.Export...)
	b = be.AppendUint32(b, uint32(len(r.Queries)))
	for _, q := range r.Queries {
		if len(q) > MaxStringLength {
			return b, fmt.Errorf("nbd: meta context query: %w", ErrTooLong)
		}
		b = be.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b, nil
}

// UnmarshalBinary decodes meta-context option data. The query count is
// checked against the bytes present before anything is allocated for it.
func (r *MetaContextRequest) UnmarshalBinary(b []byte) error {
	const op = "meta context request"
	d := decoder{b: b}
	name, ok := d.str(d.u32())
	if !ok {
		return opErrf(op, ErrTooLong, "export name over %d bytes", MaxStringLength)
	}
	n := d.u32()
	if !d.short && uint64(n)*4 > uint64(len(d.b)) {
		return opErrf(op, ErrShort, "%d queries in %d bytes", n, len(d.b))
	}
	r.Export = name
	r.Queries = nil
	for i := uint32(0); i < n && !d.short; i++ {
		q, ok := d.str(d.u32())
		if !ok {
			return opErrf(op, ErrTooLong, "query over %d bytes", MaxStringLength)
		}
		r.Queries = append(r.Queries, q)
	}
	return d.finish(op)
}

// Info is one NBD_REP_INFO item. Which fields are meaningful depends on Type:
// Size and Flags for InfoExport, Text for InfoName and InfoDescription,
// the three block sizes for InfoBlockSize, Raw for types this package does not
// know.
type Info struct {
	Type           InfoType
	Size           uint64
	Flags          TransmissionFlags
	Text           string
	MinBlockSize   uint32
	PrefBlockSize  uint32
	MaxPayloadSize uint32
	Raw            []byte
}

// AppendBinary appends the encoded reply data to b.
func (i Info) AppendBinary(b []byte) ([]byte, error) {
	b = be.AppendUint16(b, uint16(i.Type))
	switch i.Type {
	case InfoExport:
		b = be.AppendUint64(b, i.Size)
		b = be.AppendUint16(b, uint16(i.Flags))
	case InfoName, InfoDescription:
		if len(i.Text) > MaxStringLength {
			return b, fmt.Errorf("nbd: %v: %w", i.Type, ErrTooLong)
		}
		b = append(b, i.Text...)
	case InfoBlockSize:
		b = be.AppendUint32(b, i.MinBlockSize)
		b = be.AppendUint32(b, i.PrefBlockSize)
		b = be.AppendUint32(b, i.MaxPayloadSize)
	default:
		b = append(b, i.Raw...)
	}
	return b, nil
}

// UnmarshalBinary decodes NBD_REP_INFO data.
func (i *Info) UnmarshalBinary(b []byte) error {
	const op = "info reply"
	d := decoder{b: b}
	*i = Info{Type: InfoType(d.u16())}
	switch i.Type {
	case InfoExport:
		i.Size = d.u64()
		i.Flags = TransmissionFlags(d.u16())
	case InfoName, InfoDescription:
		s, ok := d.str(uint32(min(len(d.b), MaxStringLength+1)))
		if !ok {
			return opErrf(op, ErrTooLong, "%v over %d bytes", i.Type, MaxStringLength)
		}
		i.Text = s
	case InfoBlockSize:
		i.MinBlockSize = d.u32()
		i.PrefBlockSize = d.u32()
		i.MaxPayloadSize = d.u32()
	default:
		if !d.short {
			i.Raw = append([]byte(nil), d.b...)
			d.b = nil
		}
	}
	return d.finish(op)
}

// ServerEntry is the data of an NBD_REP_SERVER reply to NBD_OPT_LIST.
type ServerEntry struct {
	Name        string
	Description string
}

// AppendBinary appends the encoded reply data to b.
func (s ServerEntry) AppendBinary(b []byte) ([]byte, error) {
	if len(s.Name) > MaxStringLength || len(s.Description) > MaxStringLength {
		return b, fmt.Errorf("nbd: server entry: %w", ErrTooLong)
	}
	b = be.AppendUint32(b, uint32(len(s.Name)))
	b = append(b, s.Name...)
	return append(b, s.Description...), nil
}

// UnmarshalBinary decodes NBD_REP_SERVER data.
func (s *ServerEntry) UnmarshalBinary(b []byte) error {
	const op = "server entry"
	d := decoder{b: b}
	name, ok := d.str(d.u32())
	if !ok {
		return opErrf(op, ErrTooLong, "name over %d bytes", MaxStringLength)
	}
	desc, ok := d.str(uint32(min(len(d.b), MaxStringLength+1)))
	if !ok {
		return opErrf(op, ErrTooLong, "description over %d bytes", MaxStringLength)
	}
	s.Name, s.Description = name, desc
	return d.finish(op)
}

// MetaContext is the data of an NBD_REP_META_CONTEXT reply.
type MetaContext struct {
	ID   uint32
	Name string
}

// AppendBinary appends the encoded reply data to b.
func (m MetaContext) AppendBinary(b []byte) ([]byte, error) {
	if len(m.Name) > MaxStringLength {
		return b, fmt.Errorf("nbd: meta context: %w", ErrTooLong)
	}
	b = be.AppendUint32(b, m.ID)
	return append(b, m.Name...), nil
}

// UnmarshalBinary decodes NBD_REP_META_CONTEXT data.
func (m *MetaContext) UnmarshalBinary(b []byte) error {
	const op = "meta context reply"
	d := decoder{b: b}
	m.ID = d.u32()
	name, ok := d.str(uint32(min(len(d.b), MaxStringLength+1)))
	if !ok {
		return opErrf(op, ErrTooLong, "name over %d bytes", MaxStringLength)
	}
	m.Name = name
	return d.finish(op)
}
