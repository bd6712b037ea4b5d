package kernel

import (
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/nbd"
)

func TestConfigValidate(t *testing.T) {
	sock := os.Stdin // any file: Validate does not look at it
	ok := func(mod func(*Config)) Config {
		c := Config{Sockets: []*os.File{sock}, Size: 1 << 20, BlockSize: 4096, Index: AnyDevice,
			ServerFlags: nbd.FlagHasFlags | nbd.FlagCanMultiConn}
		if mod != nil {
			mod(&c)
		}
		return c
	}
	tests := []struct {
		name    string
		cfg     Config
		wantErr error // nil for valid; errBadConfig or ErrNoMultiConn
		errText string
	}{
		{name: "valid", cfg: ok(nil)},
		{name: "block size 0 means 512", cfg: ok(func(c *Config) { c.BlockSize = 0; c.Size = 1536 })},
		{name: "four connections with multi-conn", cfg: ok(func(c *Config) { c.Sockets = []*os.File{sock, sock, sock, sock} })},
		{name: "device 0", cfg: ok(func(c *Config) { c.Index = 0 })},
		{name: "no sockets", cfg: ok(func(c *Config) { c.Sockets = nil }), wantErr: errBadConfig},
		{name: "nil socket", cfg: ok(func(c *Config) { c.Sockets = []*os.File{nil} }), wantErr: errBadConfig},
		{name: "two connections without multi-conn", wantErr: ErrNoMultiConn, cfg: ok(func(c *Config) {
			c.Sockets = []*os.File{sock, sock}
			c.ServerFlags = nbd.FlagHasFlags
		})},
		{name: "size 0", cfg: ok(func(c *Config) { c.Size = 0 }), wantErr: errBadConfig},
		{name: "size not a multiple of the block size", cfg: ok(func(c *Config) { c.Size = 4096 + 512 }), wantErr: errBadConfig},
		{name: "size over int64", cfg: ok(func(c *Config) { c.Size = 1<<63 + 4096 }), wantErr: errBadConfig},
		{name: "block size 256", cfg: ok(func(c *Config) { c.BlockSize = 256 }), wantErr: errBadConfig},
		{name: "block size 3000", cfg: ok(func(c *Config) { c.BlockSize = 3000 }), wantErr: errBadConfig},
		{name: "block size over a page", cfg: ok(func(c *Config) { c.BlockSize = uint32(os.Getpagesize()) * 2 }), wantErr: errBadConfig},
		{name: "negative timeout", cfg: ok(func(c *Config) { c.Timeout = -time.Second }), wantErr: errBadConfig},
		{name: "negative dead timeout", cfg: ok(func(c *Config) { c.DeadConnTimeout = -1 }), wantErr: errBadConfig},
		{name: "timeout 24h", cfg: ok(func(c *Config) { c.Timeout = MaxTimeout; c.DeadConnTimeout = MaxTimeout })},
		// 17179870 s × HZ=250 wraps the kernel's 32 bits to 204 jiffies.
		{name: "timeout that wraps in jiffies", cfg: ok(func(c *Config) { c.Timeout = 17179870 * time.Second }), wantErr: errBadConfig,
			errText: "timeout 4772h11m10s is over 24h0m0s (the kernel counts it in jiffies in 32 bits)"},
		{name: "timeout over 24h", cfg: ok(func(c *Config) { c.Timeout = MaxTimeout + time.Second }), wantErr: errBadConfig},
		{name: "dead timeout over 24h", cfg: ok(func(c *Config) { c.DeadConnTimeout = MaxTimeout + time.Second }), wantErr: errBadConfig,
			errText: "dead-connection timeout 24h0m1s is over 24h0m0s"},
		{name: "index -2", cfg: ok(func(c *Config) { c.Index = -2 }), wantErr: errBadConfig},
		{name: "index too big", cfg: ok(func(c *Config) { c.Index = 1 << 20 }), wantErr: errBadConfig},
		{name: "long backend", cfg: ok(func(c *Config) { c.Backend = strings.Repeat("x", MaxBackendLength+1) }), wantErr: errBadConfig},
		{name: "backend with newline", cfg: ok(func(c *Config) { c.Backend = "a\nb" }), wantErr: errBadConfig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if tt.wantErr == nil {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Validate() = %v, want %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("Validate() = %q, want it to say %q", err, tt.errText)
			}
		})
	}
}

func TestReconfigValidate(t *testing.T) {
	for name, r := range map[string]Reconfig{
		"nil socket":       {Sockets: []*os.File{nil}},
		"negative timeout": {Timeout: -time.Second},
		"timeout over 24h": {Timeout: 25 * time.Hour},
		"dead over 24h":    {DeadConnTimeout: 25 * time.Hour},
		"huge size":        {Size: 1 << 63},
		"long backend":     {Backend: strings.Repeat("x", MaxBackendLength+1)},
	} {
		if err := r.Validate(); !errors.Is(err, errBadConfig) {
			t.Errorf("%s: Validate() = %v, want errBadConfig", name, err)
		}
	}
	if err := (&Reconfig{Size: 4096, Timeout: time.Second}).Validate(); err != nil {
		t.Errorf("valid Reconfig: %v", err)
	}
}

func TestKernelServerFlags(t *testing.T) {
	tests := []struct {
		name     string
		in       nbd.TransmissionFlags
		readOnly bool
		want     nbd.TransmissionFlags
	}{
		{
			name: "lvnbd read-write export",
			in: nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagSendCache | nbd.FlagCanMultiConn |
				nbd.FlagSendFUA | nbd.FlagSendTrim | nbd.FlagSendWriteZeroes | nbd.FlagSendFastZero,
			want: nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagCanMultiConn |
				nbd.FlagSendFUA | nbd.FlagSendTrim | nbd.FlagSendWriteZeroes,
		},
		{
			name: "read-only export",
			in:   nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagReadOnly | nbd.FlagCanMultiConn,
			want: nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagReadOnly | nbd.FlagCanMultiConn,
		},
		{
			name:     "read-only forced",
			in:       nbd.FlagHasFlags | nbd.FlagSendTrim,
			readOnly: true,
			want:     nbd.FlagHasFlags | nbd.FlagSendTrim | nbd.FlagReadOnly,
		},
		{
			name: "structured-reply features dropped",
			in:   nbd.FlagHasFlags | nbd.FlagSendDF | nbd.FlagBlockStatusPayload | nbd.FlagSendResize | 1<<15,
			want: nbd.FlagHasFlags,
		},
		{name: "rotational kept", in: nbd.FlagRotational, want: nbd.FlagRotational},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := kernelServerFlags(tt.in, tt.readOnly); got != uint64(tt.want) {
				t.Errorf("kernelServerFlags(%v) = %v, want %v", tt.in, nbd.TransmissionFlags(got), tt.want)
			}
		})
	}
}

func TestSeconds(t *testing.T) {
	for in, want := range map[time.Duration]uint64{
		0: 0, time.Nanosecond: 1, time.Second: 1, time.Second + 1: 2, 30 * time.Second: 30, 90 * time.Minute: 5400,
	} {
		if got := seconds(in); got != want {
			t.Errorf("seconds(%v) = %d, want %d", in, got, want)
		}
	}
}

func TestClientFlagsString(t *testing.T) {
	for f, want := range map[ClientFlags]string{
		0:                                       "0",
		DestroyOnDisconnect:                     "DESTROY_ON_DISCONNECT",
		DestroyOnDisconnect | DisconnectOnClose: "DESTROY_ON_DISCONNECT|DISCONNECT_ON_CLOSE",
		DisconnectOnClose | 1<<4:                "DISCONNECT_ON_CLOSE|0x10",
	} {
		if got := f.String(); got != want {
			t.Errorf("ClientFlags(%#x).String() = %q, want %q", uint64(f), got, want)
		}
	}
}

func TestParseDevice(t *testing.T) {
	tests := []struct {
		in      string
		want    int
		wantErr bool
	}{
		{in: "/dev/nbd0", want: 0},
		{in: "/dev/nbd15", want: 15},
		{in: "nbd3", want: 3},
		{in: "/dev/nbd", wantErr: true},
		{in: "/dev/nbd1p1", wantErr: true},
		{in: "/dev/nbd01", wantErr: true},
		{in: "/dev/sda", wantErr: true},
		{in: "3", wantErr: true},
		{in: "/dev/nbd-1", wantErr: true},
		{in: "/dev/nbd99999999999999999999", wantErr: true},
	}
	for _, tt := range tests {
		got, err := ParseDevice(tt.in)
		if (err != nil) != tt.wantErr || (!tt.wantErr && got != tt.want) {
			t.Errorf("ParseDevice(%q) = %d, %v; want %d, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
	if got := DevicePath(7); got != "/dev/nbd7" {
		t.Errorf("DevicePath(7) = %q", got)
	}
}
