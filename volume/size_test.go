package volume

import (
	"errors"
	"math"
	"testing"
)

const (
	kib = int64(1) << 10
	mib = int64(1) << 20
	gib = int64(1) << 30
	tib = int64(1) << 40
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64 // 0: an error
	}{
		{"10G", 10 * gib},
		{"10g", 10 * gib},
		{"10GiB", 10 * gib},
		{"10 GiB", 10 * gib},
		{"10GB", 10_000_000_000},
		{"512MiB", 512 * mib},
		{"512M", 512 * mib},
		{"64K", 64 * kib},
		{"64k", 64 * kib},
		{"1.5T", tib + tib/2},
		{"4096", 4096},
		{"4096B", 4096},
		{" 1G ", gib},
		{"0", 0},
		{"0G", 0},
		{"", 0},
		{"G", 0},
		{"ten", 0},
		{"10X", 0},
		{"+5G", 0},
		{"-5G", 0},
		{"16E", 0},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseSize(tt.in)
			if tt.want == 0 {
				if err == nil {
					t.Fatalf("ParseSize(%q) = %d, want an error", tt.in, got)
				}
				if !errors.Is(err, ErrInvalidSize) {
					t.Errorf("error %v is not ErrInvalidSize", err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseSize(%q) = %d, %v, want %d", tt.in, got, err, tt.want)
			}
		})
	}
}

func TestParseResize(t *testing.T) {
	tests := []struct {
		current int64
		in      string
		want    int64 // 0: an error
	}{
		{10 * gib, "+5G", 15 * gib},
		{10 * gib, "20G", 20 * gib},
		{10 * gib, "5G", 5 * gib},
		{20 * gib, "-10G", 10 * gib},
		{10 * gib, "-10G", 0},
		{10 * gib, "-20G", 0},
		{10 * gib, "+", 0},
		{10 * gib, "+x", 0},
		{10 * gib, "", 0},
		{math.MaxInt64 - 1, "+1G", 0},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseResize(tt.current, tt.in)
			if tt.want == 0 {
				if err == nil || !errors.Is(err, ErrInvalidSize) {
					t.Fatalf("ParseResize(%d, %q) = %d, %v, want ErrInvalidSize", tt.current, tt.in, got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseResize(%d, %q) = %d, %v, want %d", tt.current, tt.in, got, err, tt.want)
			}
		})
	}
}

func TestShrinkError(t *testing.T) {
	var err error = &ShrinkError{Volume: "vm1", From: 20 * gib, To: 10 * gib}
	if want := "shrinking vm1 from 20 GiB to 10 GiB discards the last 10 GiB"; err.Error() != want {
		t.Errorf("Error() = %q, want %q", err.Error(), want)
	}
	if !errors.Is(err, ErrShrink) {
		t.Error("not ErrShrink")
	}
}

func TestCheckCreate(t *testing.T) {
	tests := []struct {
		name string
		in   CreateOptions
		want CreateOptions
		err  error
	}{
		{"linear", CreateOptions{Name: "a", Size: gib}, CreateOptions{Name: "a", Size: gib, Stripes: 1}, nil},
		{"striped default size", CreateOptions{Name: "a", Size: gib, Stripes: 2}, CreateOptions{Name: "a", Size: gib, Stripes: 2, StripeSize: 64 * kib}, nil},
		{"striped", CreateOptions{Name: "a", Size: gib, Stripes: 4, StripeSize: 256 * kib}, CreateOptions{Name: "a", Size: gib, Stripes: 4, StripeSize: 256 * kib}, nil},
		{"bad name", CreateOptions{Name: "a b", Size: gib}, CreateOptions{}, ErrInvalidName},
		{"no size", CreateOptions{Name: "a"}, CreateOptions{}, ErrInvalidSize},
		{"stripe size not power of two", CreateOptions{Name: "a", Size: gib, Stripes: 2, StripeSize: 48 * kib}, CreateOptions{}, ErrInvalidSize},
		{"stripe size too small", CreateOptions{Name: "a", Size: gib, Stripes: 2, StripeSize: 2 * kib}, CreateOptions{}, ErrInvalidSize},
		{"too many stripes", CreateOptions{Name: "a", Size: gib, Stripes: 129}, CreateOptions{}, ErrUnsupported},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := CheckCreate(tt.in)
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("CheckCreate(%+v) error = %v, want %v", tt.in, err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("CheckCreate(%+v) = %+v, %v, want %+v", tt.in, got, err, tt.want)
			}
		})
	}
}

func FuzzParseResize(f *testing.F) {
	for _, s := range []string{"10G", "+5G", "-1G", "512MiB", "1.5T", "4096", "16E", "+", "-"} {
		f.Add(int64(10*gib), s)
	}
	f.Fuzz(func(t *testing.T, current int64, s string) {
		if current <= 0 {
			return
		}
		n, err := ParseResize(current, s)
		if err == nil && n <= 0 {
			t.Fatalf("ParseResize(%d, %q) = %d without an error", current, s, n)
		}
	})
}

func TestFormatSize(t *testing.T) {
	tests := []struct {
		n    int64
		want string
	}{
		{0, "0 B"},
		{1023, "1023 B"},
		{1024, "1 KiB"},
		{64 * kib, "64 KiB"},
		{8 * gib, "8 GiB"},
		{gib + gib/5, "1.2 GiB"},
		{15*gib + gib/2, "15.5 GiB"},
		{3435973837, "3.2 GiB"},
		{1536 * tib, "1.5 PiB"},
		{math.MaxInt64, "8.0 EiB"},
		{-5 * gib, "-5 GiB"},
	}
	for _, tt := range tests {
		if got := FormatSize(tt.n); got != tt.want {
			t.Errorf("FormatSize(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
}
