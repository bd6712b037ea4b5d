package bench

import (
	"encoding/binary"
	"fmt"
)

// The verify pattern: each 8-byte word of the target holds a hash of its
// absolute offset and the run's seed. Data at the wrong offset, left over from
// an earlier run (another seed) or flipped in transit all fail the check.

func patternWord(seed uint64, wordIndex int64) uint64 {
	// splitmix64's finalizer: cheap, and every input bit reaches every
	// output bit.
	z := seed ^ uint64(wordIndex)*0x9e3779b97f4a7c15
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return z ^ z>>31
}

func patternByte(seed uint64, pos int64) byte {
	return byte(patternWord(seed, pos/8) >> (8 * (pos % 8)))
}

// FillPattern fills p with the pattern for the bytes at [off, off+len(p)).
func FillPattern(p []byte, off int64, seed uint64) {
	i := 0
	for ; i < len(p) && (off+int64(i))%8 != 0; i++ {
		p[i] = patternByte(seed, off+int64(i))
	}
	w := (off + int64(i)) / 8
	for ; i+8 <= len(p); i += 8 {
		binary.LittleEndian.PutUint64(p[i:], patternWord(seed, w))
		w++
	}
	for ; i < len(p); i++ {
		p[i] = patternByte(seed, off+int64(i))
	}
}

// MismatchError reports the first byte that did not hold the pattern.
type MismatchError struct {
	Offset int64 // absolute offset in the target
	Want   byte
	Got    byte
}

func (e *MismatchError) Error() string {
	return fmt.Sprintf("verify: data mismatch at offset %d (0x%x): want 0x%02x, got 0x%02x", e.Offset, e.Offset, e.Want, e.Got)
}

// CheckPattern returns a *MismatchError for the first byte of p (read from
// off) that does not hold the pattern, or nil.
func CheckPattern(p []byte, off int64, seed uint64) error {
	i := 0
	for ; i < len(p) && (off+int64(i))%8 != 0; i++ {
		if err := checkByte(p[i], off+int64(i), seed); err != nil {
			return err
		}
	}
	w := (off + int64(i)) / 8
	for ; i+8 <= len(p); i += 8 {
		if binary.LittleEndian.Uint64(p[i:]) != patternWord(seed, w) {
			for j := i; j < i+8; j++ {
				if err := checkByte(p[j], off+int64(j), seed); err != nil {
					return err
				}
			}
		}
		w++
	}
	for ; i < len(p); i++ {
		if err := checkByte(p[i], off+int64(i), seed); err != nil {
			return err
		}
	}
	return nil
}

func checkByte(got byte, pos int64, seed uint64) error {
	if want := patternByte(seed, pos); got != want {
		return &MismatchError{Offset: pos, Want: want, Got: got}
	}
	return nil
}
