package kernel

import (
	"errors"
	"strings"
	"testing"

	"github.com/lvnbd/lvnbd/client"
)

func TestChooseBlockSize(t *testing.T) {
	info := func(minimum uint32) client.ExportInfo {
		return client.ExportInfo{BlockSizes: client.BlockSizes{Minimum: minimum, Preferred: 4096, MaxPayload: 1 << 20},
			BlockSizesAdvertised: true}
	}
	tests := []struct {
		name    string
		asked   uint32
		info    client.ExportInfo
		want    uint32
		wantErr bool
	}{
		{name: "nothing advertised", info: client.ExportInfo{BlockSizes: client.DefaultBlockSizes}, want: 512},
		{name: "minimum 1", info: info(1), want: 512},
		{name: "minimum 4096", info: info(4096), want: 4096},
		{name: "asked 4096", asked: 4096, info: info(1), want: 4096},
		{name: "asked below the minimum", asked: 512, info: info(4096), wantErr: true},
		{name: "minimum over a page", info: info(64 << 10), wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ChooseBlockSize(tt.asked, tt.info)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Errorf("ChooseBlockSize = %d, %v; want %d, error %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func TestGrownSize(t *testing.T) {
	dev := func(size uint64, bs uint32) Device { return Device{Index: 3, Size: size, BlockSize: bs} }
	tests := []struct {
		name       string
		dev        Device
		exportSize uint64
		want       uint64
		wantErr    string
	}{
		{name: "same", dev: dev(8<<20, 512), exportSize: 8 << 20, want: 8 << 20},
		{name: "grown", dev: dev(8<<20, 512), exportSize: 16 << 20, want: 16 << 20},
		{name: "grown by a partial block", dev: dev(8<<20, 4096), exportSize: 8<<20 + 5000, want: 8<<20 + 4096},
		{name: "block size unknown means 512", dev: dev(1024, 0), exportSize: 2047, want: 1536},
		// Named with the export, and not "detach it first": a pair's leg
		// must be replaced.
		{name: "shrank", dev: Device{Index: 3, Size: 16 << 20, BlockSize: 512, Backend: "nbd://192.0.2.2:10809/vm1"},
			exportSize: 8 << 20, wantErr: "the export shrank from 16 MiB to 8.0 MiB (16777216 to 8388608 bytes) under /dev/nbd3: " +
				"nbd://192.0.2.2:10809/vm1 has lost the device's tail, even if it is grown back, and a device never shrinks; " +
				"if /dev/nbd3 is one half of a mirror (a pair's leg), that half must be replaced as a new member, resynced in full"},
		{name: "tail under a block", dev: dev(8<<20, 4096), exportSize: 8<<20 - 1,
			wantErr: "shrank from 8.0 MiB to 8.0 MiB (8388608 to 8388607 bytes) under /dev/nbd3: its export has lost"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := GrownSize(tt.dev, tt.exportSize)
			if tt.wantErr != "" {
				if !errors.Is(err, ErrExportShrank) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("GrownSize = %d, %v; want ErrExportShrank containing %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("GrownSize = %d, %v; want %d", got, err, tt.want)
			}
		})
	}
}
