package guest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
)

// runner runs one system command (mdadm, mkfs.ext4, resize2fs...) and
// returns its standard output.
type runner interface {
	run(ctx context.Context, args ...string) ([]byte, error)
}

// execRunner runs commands found on PATH or in the sbin directories.
type execRunner struct{}

func (execRunner) run(ctx context.Context, args ...string) ([]byte, error) {
	if len(args) == 0 {
		return nil, fmt.Errorf("running %q: no command", args)
	}
	bin, err := lookPath(args[0])
	if err != nil {
		return nil, fmt.Errorf("running %q: %w", args, err)
	}
	cmd := exec.CommandContext(ctx, bin, args[1:]...)
	// Messages in English for the errors we pass on; never a prompt.
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.Stdin = nil
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		out := bytes.TrimSpace(stderr.Bytes())
		if len(out) == 0 {
			out = bytes.TrimSpace(stdout.Bytes())
		}
		return stdout.Bytes(), fmt.Errorf("running %q: %w\n%s", args, err, out)
	}
	return stdout.Bytes(), nil
}

// lookPath finds a command on PATH or in /usr/sbin and /sbin, where mdadm
// and the e2fsprogs live but which are not always on a user's PATH.
func lookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		p := dir + "/" + name
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s is not installed (not on PATH, in /usr/sbin or /sbin)", name)
}

// haveCommand reports whether name can be run.
func haveCommand(name string) bool {
	_, err := lookPath(name)
	return err == nil
}
