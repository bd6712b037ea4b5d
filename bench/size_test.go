package bench

import "testing"

func TestParseSize(t *testing.T) {
	tests := []struct {
		in      string
		want    int64
		wantErr bool
	}{
		{in: "4096", want: 4096},
		{in: "512", want: 512},
		{in: "4k", want: 4 << 10},
		{in: "4K", want: 4 << 10},
		{in: "1M", want: 1 << 20},
		{in: "1m", want: 1 << 20},
		{in: "4G", want: 4 << 30},
		{in: "2T", want: 2 << 40},
		{in: "512KiB", want: 512 << 10},
		{in: "1MiB", want: 1 << 20},
		{in: "1.5GiB", want: 3 << 29},
		{in: "1GB", want: 1e9},
		{in: "1MB", want: 1e6},
		{in: "4kB", want: 4000},
		{in: " 64k ", want: 64 << 10},
		{in: "4 k", want: 4 << 10},
		{in: "", wantErr: true},
		{in: "k", wantErr: true},
		{in: "four", wantErr: true},
		{in: "4X", wantErr: true},
		{in: "-1M", wantErr: true},
		{in: "100E", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseSize(tt.in)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("ParseSize(%q) = %d, want an error", tt.in, got)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseSize(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Errorf("ParseSize(%q) = %d, want %d", tt.in, got, tt.want)
			}
		})
	}
}

func TestParseMode(t *testing.T) {
	tests := []struct {
		in                    string
		want                  Mode
		writes, reads, random bool
		wantErr               bool
	}{
		{in: "read", want: ModeRead, reads: true},
		{in: "write", want: ModeWrite, writes: true},
		{in: "randread", want: ModeRandRead, reads: true, random: true},
		{in: "randwrite", want: ModeRandWrite, writes: true, random: true},
		{in: "randrw", want: ModeRandRW, writes: true, reads: true, random: true},
		{in: "rw", wantErr: true},
		{in: "READ", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			m, err := ParseMode(tt.in)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("ParseMode(%q) = %v, want an error", tt.in, m)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if m != tt.want || m.String() != tt.in || m.Writes() != tt.writes || m.Reads() != tt.reads || m.Random() != tt.random {
				t.Errorf("ParseMode(%q) = %v (writes %v reads %v random %v), want %v (%v %v %v)",
					tt.in, m, m.Writes(), m.Reads(), m.Random(), tt.want, tt.writes, tt.reads, tt.random)
			}
		})
	}
}
