package server

import (
	"testing"

	"github.com/lvnbd/lvnbd/nbd"
)

// A BLOCK_STATUS request is charged for the extents its answer can hold.
func TestBlockStatusCost(t *testing.T) {
	tests := []struct {
		name   string
		length uint32
		flags  nbd.CommandFlags
		want   int64
	}{
		{"one sector", 512, 0, 3 * 32},
		{"1 MiB", 1 << 20, 0, (2048 + 2) * 32},
		{"4 GiB - 1, capped at maxExtents", 1<<32 - 1, 0, maxExtents * 32},
		{"REQ_ONE", 1<<32 - 1, nbd.CmdFlagReqOne, 32},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := blockStatusCost(nbd.RequestHeader{Command: nbd.CmdBlockStatus, Length: tt.length, Flags: tt.flags})
			if got != tt.want {
				t.Errorf("blockStatusCost = %d, want %d", got, tt.want)
			}
		})
	}
}
