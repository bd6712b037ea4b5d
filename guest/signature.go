package guest

import (
	"bytes"
	"encoding/binary"
)

// headSize is how much of a device's start detectSignature looks at: the
// btrfs superblock, the furthest of the ones it knows, ends before it.
const headSize = 68 << 10

// tailSize is how much of a device's end it reads for md 0.90 and 1.0
// superblocks, which live there.
const tailSize = 128 << 10

const mdMagic = 0xa92b4efc

// detectSignature names the first thing of value it recognises at the start
// of a device (head, up to headSize bytes) or at its end (tail, the last
// tailSize bytes or fewer of a device of size bytes), or "" when it sees
// none. It knows the formats a volume handed to a guest is likely to hold;
// blkid, where installed, knows more.
func detectSignature(head, tail []byte, size uint64) string {
	at := func(b []byte, off int, magic string) bool {
		return off >= 0 && off+len(magic) <= len(b) && string(b[off:off+len(magic)]) == magic
	}
	le32 := func(b []byte, off int) uint32 {
		if off < 0 || off+4 > len(b) {
			return 0
		}
		return binary.LittleEndian.Uint32(b[off:])
	}
	switch {
	case le32(head, 0) == mdMagic:
		return "md superblock 1.1"
	case le32(head, 4096) == mdMagic:
		return "md superblock 1.2"
	case at(head, 1080, "\x53\xef"):
		return "ext2/3/4 filesystem"
	case at(head, 0, "XFSB"):
		return "xfs filesystem"
	case at(head, 0x10040, "_BHRfS_M"):
		return "btrfs filesystem"
	case at(head, 0, "LUKS\xba\xbe"):
		return "LUKS encryption header"
	case bytes.Contains(head[:min(len(head), 4*512)], []byte("LABELONE")) && bytes.Contains(head[:min(len(head), 4*512)], []byte("LVM2 001")):
		return "LVM physical volume"
	case at(head, 4086, "SWAPSPACE2") || at(head, 4086, "SWAP-SPACE"):
		return "swap space"
	case at(head, 512, "EFI PART"):
		return "GPT partition table"
	case at(head, 510, "\x55\xaa"):
		return "DOS partition table or boot sector"
	}
	// md 1.0 sits 8 KiB (rounded down to 4 KiB) before the end, 0.90 in the
	// last 64 KiB-aligned 64 KiB.
	if size >= 128<<10 && uint64(len(tail)) <= size {
		tailStart := size - uint64(len(tail))
		off10 := ((size>>9 - 16) &^ 7) << 9
		if off10 >= tailStart && le32(tail, int(off10-tailStart)) == mdMagic {
			return "md superblock 1.0"
		}
		off090 := (size &^ (64<<10 - 1)) - 64<<10
		if off090 >= tailStart && le32(tail, int(off090-tailStart)) == mdMagic {
			return "md superblock 0.90"
		}
	}
	return ""
}
