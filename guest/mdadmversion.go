package guest

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
)

// MdadmVersion is mdadm's release, major.minor.
type MdadmVersion struct{ Major, Minor int }

func (v MdadmVersion) String() string { return fmt.Sprintf("%d.%d", v.Major, v.Minor) }

// Less reports whether v is an older release than o.
func (v MdadmVersion) Less(o MdadmVersion) bool {
	return v.Major < o.Major || v.Major == o.Major && v.Minor < o.Minor
}

// minMdadm is the oldest mdadm the guest commands work with: --failfast,
// which create gives both legs and the watcher gives a leg it adds back,
// came with mdadm 4.0 (2017); --add-spare, with 3.3. An older mdadm
// refuses the option, so the watcher could bring no leg back.
var minMdadm = MdadmVersion{4, 0}

// ErrMdadmTooOld is returned when the guest's mdadm is older than minMdadm.
var ErrMdadmTooOld = errors.New("mdadm is too old")

// mdadmVersionLine is the start of what mdadm --version prints, ReadMe.c's
// Version: "mdadm - v4.2 - 2021-12-30", also "mdadm - v3.4 - 28th January
// 2016", and "mdadm - v4.3-12-gdeadbee - …" from a git build.
var mdadmVersionLine = regexp.MustCompile(`(?m)^mdadm - v(\d{1,4})\.(\d{1,4})`)

// ParseMdadmVersion reads the release from mdadm --version's output.
func ParseMdadmVersion(b []byte) (MdadmVersion, error) {
	m := mdadmVersionLine.FindSubmatch(b)
	if m == nil {
		return MdadmVersion{}, fmt.Errorf("mdadm --version printed %q: no \"mdadm - vX.Y\" in it", truncate(b, 200))
	}
	major, _ := strconv.Atoi(string(m[1])) // at most 4 digits: no error
	minor, _ := strconv.Atoi(string(m[2]))
	return MdadmVersion{major, minor}, nil
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// mdadmVersionOutput runs mdadm --version, which prints on stderr.
func mdadmVersionOutput(ctx context.Context) ([]byte, error) {
	bin, err := lookPath("mdadm")
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, bin, "--version")
	cmd.Env = []string{"LC_ALL=C"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("running mdadm --version: %w: %s", err, truncate(out, 200))
	}
	return out, nil
}

// checkMdadm fails if mdadm is missing or older than minMdadm. A version it
// cannot read is let through, with a warning saying so: a later mdadm may
// print it otherwise.
func (h *host) checkMdadm(ctx context.Context) (warning string, err error) {
	out, err := h.mdadmVersion(ctx)
	if err != nil {
		return "", fmt.Errorf("the guest commands need mdadm %s or later: %w", minMdadm, err)
	}
	v, err := ParseMdadmVersion(out)
	if err != nil {
		return fmt.Sprintf("cannot tell mdadm's version (%v); going on as if it were %s or later", err, minMdadm), nil
	}
	if v.Less(minMdadm) {
		return "", fmt.Errorf("%w: this guest has mdadm %s, and lvnbd guest needs %s or later (--failfast came with "+
			"mdadm 4.0, 2017); install a newer mdadm in the guest", ErrMdadmTooOld, v, minMdadm)
	}
	return "", nil
}
