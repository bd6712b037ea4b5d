package nbd

import "encoding/binary"

// decoder reads big-endian fields from a byte slice, remembering the first
// shortfall so callers check once at the end instead of before every field.
type decoder struct {
	b     []byte
	short bool
}

func (d *decoder) take(n int) []byte {
	if d.short || n < 0 || n > len(d.b) {
		d.short = true
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) u16() uint16 {
	if v := d.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if v := d.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if v := d.take(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

// str reads a string of n bytes, refusing lengths over MaxStringLength before
// looking at the buffer.
func (d *decoder) str(n uint32) (string, bool) {
	if n > MaxStringLength {
		return "", false
	}
	return string(d.take(int(n))), true
}

// finish reports ErrShort or ErrTrailing for op, or nil.
func (d *decoder) finish(op string) error {
	if d.short {
		return opErr(op, ErrShort)
	}
	if len(d.b) != 0 {
		return opErrf(op, ErrTrailing, "%d bytes", len(d.b))
	}
	return nil
}

var be = binary.BigEndian
