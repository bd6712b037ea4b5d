package lvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
)

// runner runs one lvm2 command, such as lvs or lvcreate, and returns its
// standard output.
type runner interface {
	run(ctx context.Context, args ...string) ([]byte, error)
}

// execRunner runs lvm2 commands as `lvm COMMAND ARGS...`.
type execRunner struct {
	bin string // the lvm binary; empty to look for it
}

func (r execRunner) run(ctx context.Context, args ...string) ([]byte, error) {
	bin := r.bin
	if bin == "" {
		var err error
		if bin, err = lvmBinary(); err != nil {
			return nil, err
		}
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	// Messages in English for the errors we pass on, and no warning about
	// descriptors the caller leaked to us.
	cmd.Env = append(os.Environ(), "LC_ALL=C", "LVM_SUPPRESS_FD_WARNINGS=1")
	// On cancellation let lvm2 stop at a safe point: it defers SIGINT while
	// it commits metadata, where SIGKILL could leave a half-made LV.
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		// lvm2 says why on stderr; stdout holds reports, or nothing.
		out := bytes.TrimSpace(stderr.Bytes())
		if len(out) == 0 {
			out = bytes.TrimSpace(stdout.Bytes())
		}
		return nil, fmt.Errorf("running %q: %w\n%s", args, err, out)
	}
	return stdout.Bytes(), nil
}

// lvmBinary finds lvm, which is in /usr/sbin, not always on PATH.
func lvmBinary() (string, error) {
	if p, err := exec.LookPath("lvm"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/lvm", "/sbin/lvm"} {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", errors.New("lvm2 is not installed (no lvm on PATH, in /usr/sbin or /sbin): apt-get install lvm2")
}
