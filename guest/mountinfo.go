package guest

import (
	"fmt"
	"strconv"
	"strings"
)

// Mount is one line of /proc/self/mountinfo.
type Mount struct {
	DevNumber  string // major:minor of the mounted device
	Root       string // the path within the filesystem mounted, / for all of it
	Mountpoint string
	FSType     string
	Source     string
}

// ParseMountinfo reads /proc/self/mountinfo (see proc(5)).
//
// The kernel separates fields with one space and escapes only space, tab,
// newline and backslash in paths (\040, \011, \012, \134): any other
// byte, a form feed or a UTF-8 no-break space, is written as it is. So a
// line is split at single spaces, not at every white space as
// strings.Fields would, which would cut such a path in two and shift the
// fields after it.
func ParseMountinfo(b []byte) ([]Mount, error) {
	var mounts []Mount
	for i, line := range strings.Split(string(b), "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		f := strings.Split(line, " ")
		sep := -1
		for j := 6; j < len(f); j++ {
			if f[j] == "-" {
				sep = j
				break
			}
		}
		if len(f) < 7 || sep < 0 || sep+2 >= len(f) || !strings.Contains(f[2], ":") {
			return nil, fmt.Errorf("mountinfo line %d %q: %w", i+1, line, errSyntax)
		}
		root, err1 := unescapeMount(f[3])
		mp, err2 := unescapeMount(f[4])
		src, err3 := unescapeMount(f[sep+2])
		if err1 != nil || err2 != nil || err3 != nil {
			return nil, fmt.Errorf("mountinfo line %d %q: bad escape: %w", i+1, line, errSyntax)
		}
		mounts = append(mounts, Mount{DevNumber: f[2], Root: root, Mountpoint: mp, FSType: f[sep+1], Source: src})
	}
	return mounts, nil
}

// unescapeMount undoes the kernel's octal escapes (\040 for a space).
func unescapeMount(s string) (string, error) {
	if !strings.Contains(s, `\`) {
		return s, nil
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '\\' {
			b.WriteByte(s[i])
			continue
		}
		if i+4 > len(s) {
			return "", errSyntax
		}
		n, err := strconv.ParseUint(s[i+1:i+4], 8, 8)
		if err != nil {
			return "", errSyntax
		}
		b.WriteByte(byte(n))
		i += 3
	}
	return b.String(), nil
}
