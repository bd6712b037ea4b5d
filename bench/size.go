package bench

import (
	"fmt"
	"strings"
	"unicode"

	"github.com/dustin/go-humanize"
)

// ParseSize parses a size such as 4096, 4k, 1M, 4G, 512KiB or 1.5GB.
//
// A bare one-letter suffix is binary, as in dd, fio and lvcreate (1M is
// 1048576 bytes, so a block size stays a multiple of the sector size); the
// long forms keep go-humanize's meaning: KiB, MiB, GiB are binary and
// kB, MB, GB decimal.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("size %q: empty", s)
	}
	if last := rune(t[len(t)-1]); unicode.IsLetter(last) && strings.ContainsRune("kKmMgGtTpPeE", last) {
		if len(t) == 1 || !unicode.IsLetter(rune(t[len(t)-2])) {
			t += "iB"
		}
	}
	n, err := humanize.ParseBytes(t)
	if err != nil {
		return 0, fmt.Errorf("size %q: want a number with an optional unit (4096, 4k, 1M, 4G, 512KiB, 1GB)", s)
	}
	if n > 1<<62 {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return int64(n), nil
}

// formatIBytes formats n bytes with a binary unit ("4.0 GiB").
func formatIBytes(n int64) string {
	if n < 0 {
		return fmt.Sprintf("%d B", n)
	}
	return humanize.IBytes(uint64(n))
}
