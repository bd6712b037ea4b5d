package volume

import (
	"fmt"
	"math"
	"strings"

	"github.com/dustin/go-humanize"
)

// ParseSize parses a size such as 10G, 512MiB, 1.5T or 4096. As in LVM, a
// bare K, M, G, T, P or E is a power of 1024 (10G is 10 GiB); KB, MB, GB...
// are powers of 1000. A number without a unit is bytes. The size must be
// positive.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("%w: empty size (want a number and a unit, such as 10G or 512MiB)", ErrInvalidSize)
	}
	if t[0] == '+' || t[0] == '-' {
		return 0, fmt.Errorf("%w %q: a relative size is only for resizing", ErrInvalidSize, s)
	}
	// humanize reads k, m, g... as SI units; LVM users mean binary ones.
	if last := t[len(t)-1]; strings.IndexByte("kKmMgGtTpPeE", last) >= 0 {
		t += "iB"
	}
	n, err := humanize.ParseBytes(t)
	if err != nil {
		return 0, fmt.Errorf("%w %q: want a number and a unit, such as 10G, 512MiB or 1.5T", ErrInvalidSize, s)
	}
	if n == 0 {
		return 0, fmt.Errorf("%w %q: must be more than zero", ErrInvalidSize, s)
	}
	if n > math.MaxInt64 {
		return 0, fmt.Errorf("%w %q: too large", ErrInvalidSize, s)
	}
	return int64(n), nil
}

// ParseResize parses the size of a resize: absolute (20G) or relative to
// current (+5G, -1G), and returns the new size in bytes.
func ParseResize(current int64, s string) (int64, error) {
	t := strings.TrimSpace(s)
	sign := int64(0)
	if t != "" && (t[0] == '+' || t[0] == '-') {
		sign = 1
		if t[0] == '-' {
			sign = -1
		}
		t = t[1:]
	}
	n, err := ParseSize(t)
	if err != nil {
		if sign != 0 {
			return 0, fmt.Errorf("%w %q: want +SIZE or -SIZE, such as +5G", ErrInvalidSize, s)
		}
		return 0, err
	}
	switch {
	case sign > 0 && n > math.MaxInt64-current:
		return 0, fmt.Errorf("%w %q: too large", ErrInvalidSize, s)
	case sign > 0:
		return current + n, nil
	case sign < 0 && n >= current:
		return 0, fmt.Errorf("%w %q: the volume is only %s", ErrInvalidSize, s, FormatSize(current))
	case sign < 0:
		return current - n, nil
	}
	return n, nil
}

// FormatSize formats bytes for people, in powers of 1024: 10 GiB when
// exact, else to a tenth: 3.2 GiB.
func FormatSize(n int64) string {
	if n < 0 {
		return "-" + FormatSize(-n)
	}
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	i, unit := 0, int64(1)
	for i+1 < len(units) && n/unit >= 1024 {
		i, unit = i+1, unit*1024
	}
	if n%unit == 0 {
		return fmt.Sprintf("%d %s", n/unit, units[i])
	}
	return fmt.Sprintf("%.1f %s", float64(n)/float64(unit), units[i])
}

// ShrinkError describes a resize that would discard data.
type ShrinkError struct {
	Volume   string
	From, To int64
}

// Error says what would be lost.
func (e *ShrinkError) Error() string {
	return fmt.Sprintf("shrinking %s from %s to %s discards the last %s",
		e.Volume, FormatSize(e.From), FormatSize(e.To), FormatSize(e.From-e.To))
}

// Unwrap makes errors.Is(err, ErrShrink) true.
func (e *ShrinkError) Unwrap() error { return ErrShrink }

// RoundUp rounds a size up to a multiple of unit, as drivers do to their
// allocation unit; it saturates instead of overflowing.
func RoundUp(n, unit int64) int64 {
	if unit <= 0 || n > math.MaxInt64-unit {
		return n
	}
	if r := n % unit; r != 0 {
		return n + unit - r
	}
	return n
}

// CheckCreate validates opts and fills in defaults: a valid name, a positive
// size, Stripes of at least 1 and, when striped, a power-of-two StripeSize
// of at least 4 KiB.
func CheckCreate(opts CreateOptions) (CreateOptions, error) {
	if err := ValidateName(opts.Name); err != nil {
		return opts, err
	}
	if opts.Size <= 0 {
		return opts, fmt.Errorf("volume %s: %w: size must be more than zero", opts.Name, ErrInvalidSize)
	}
	switch {
	case opts.Stripes < 0 || opts.Stripes > 128:
		return opts, fmt.Errorf("volume %s: %w: %d stripes (want 1 to 128)", opts.Name, ErrUnsupported, opts.Stripes)
	case opts.Stripes <= 1:
		if opts.StripeSize != 0 {
			return opts, fmt.Errorf("volume %s: a stripe size needs 2 or more stripes", opts.Name)
		}
		opts.Stripes = 1
		return opts, nil
	case opts.StripeSize == 0:
		opts.StripeSize = DefaultStripeSize
	case opts.StripeSize < 4096 || opts.StripeSize&(opts.StripeSize-1) != 0:
		return opts, fmt.Errorf("volume %s: %w: stripe size %s is not a power of two of at least 4 KiB (such as 64K)",
			opts.Name, ErrInvalidSize, FormatSize(opts.StripeSize))
	}
	return opts, nil
}
