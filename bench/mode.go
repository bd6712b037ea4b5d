package bench

import (
	"fmt"
	"strings"
)

// Mode is a workload.
type Mode int

// Workloads: dd-style sequential runs over the region once, and random I/O
// at a queue depth for a time.
const (
	ModeRead      Mode = iota // sequential read, like dd iflag=direct
	ModeWrite                 // sequential write then flush, like dd oflag=direct conv=fsync
	ModeRandRead              // random reads
	ModeRandWrite             // random writes, then a flush
	ModeRandRW                // random reads and writes mixed, then a flush
)

var modeNames = [...]string{"read", "write", "randread", "randwrite", "randrw"}

// ParseMode parses a mode name: read, write, randread, randwrite, randrw.
func ParseMode(s string) (Mode, error) {
	for i, n := range modeNames {
		if s == n {
			return Mode(i), nil
		}
	}
	return 0, fmt.Errorf("mode %q: want one of %s", s, strings.Join(modeNames[:], ", "))
}

func (m Mode) String() string {
	if m < 0 || int(m) >= len(modeNames) {
		return fmt.Sprintf("Mode(%d)", int(m))
	}
	return modeNames[m]
}

// Writes reports whether the mode writes to the target.
func (m Mode) Writes() bool { return m == ModeWrite || m == ModeRandWrite || m == ModeRandRW }

// Reads reports whether the mode reads from the target.
func (m Mode) Reads() bool { return m != ModeWrite && m != ModeRandWrite }

// Random reports whether the mode picks random offsets.
func (m Mode) Random() bool { return m >= ModeRandRead }
