package guest

import (
	"bytes"
	"context"
	"errors"
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
		return stdout.Bytes(), &commandError{args: args, err: err, out: out, stderr: stderr.Bytes()}
	}
	return stdout.Bytes(), nil
}

// commandError is a command that ran and failed. It keeps the command's
// stderr apart from the message, so that a caller which must tell one of
// mdadm's refusals from another compares mdadm's own line, not our text.
type commandError struct {
	args   []string
	err    error  // *exec.ExitError, or the context's error
	out    []byte // stderr, or stdout when stderr was empty: for the message
	stderr []byte
}

func (e *commandError) Error() string {
	return fmt.Sprintf("running %q: %v\n%s", e.args, e.err, e.out)
}

func (e *commandError) Unwrap() error { return e.err }

// stderrLine reports whether a failed command printed line, whole, on its
// stderr.
func stderrLine(err error, line string) bool {
	var ce *commandError
	if !errors.As(err, &ce) {
		return false
	}
	for _, l := range bytes.Split(ce.stderr, []byte("\n")) {
		if string(bytes.TrimSpace(l)) == line {
			return true
		}
	}
	return false
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
