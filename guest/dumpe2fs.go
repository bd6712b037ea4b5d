package guest

import (
	"fmt"
	"strconv"
	"strings"
)

// Ext4Super is what the watcher needs from dumpe2fs -h.
type Ext4Super struct {
	BlockCount uint64
	BlockSize  uint64
	State      string // clean, "not clean", "clean with errors"
}

// Bytes is the filesystem's size.
func (s Ext4Super) Bytes() uint64 { return s.BlockCount * s.BlockSize }

// ParseDumpe2fs reads the "Key:   value" lines of dumpe2fs -h (e2fsprogs
// 1.47, LC_ALL=C); other lines, such as the journal's, are skipped.
func ParseDumpe2fs(b []byte) (Ext4Super, error) {
	var s Ext4Super
	for _, line := range strings.Split(string(b), "\n") {
		key, value, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		value = strings.TrimSpace(value)
		var err error
		switch strings.TrimSpace(key) {
		case "Block count":
			s.BlockCount, err = strconv.ParseUint(value, 10, 64)
		case "Block size":
			s.BlockSize, err = strconv.ParseUint(value, 10, 64)
		case "Filesystem state":
			s.State = value
		}
		if err != nil {
			return Ext4Super{}, fmt.Errorf("dumpe2fs %q: %w", line, errSyntax)
		}
	}
	if s.BlockCount == 0 || s.BlockSize == 0 || s.BlockSize&(s.BlockSize-1) != 0 || s.BlockSize > 1<<16 {
		return Ext4Super{}, fmt.Errorf("dumpe2fs: no block count and size: %w", errSyntax)
	}
	return s, nil
}
