package pair

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"time"
)

// runner runs a system command (xl) and returns its combined output.
type runner interface {
	run(ctx context.Context, args ...string) ([]byte, error)
}

// xlWaitDelay is how long a command's output is waited for once it exited
// or was killed; tests shorten it.
var xlWaitDelay = 10 * time.Second

// execRunner runs commands for real, in the C locale so their messages do
// not depend on the host's language.
type execRunner struct{}

func (execRunner) run(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	// Killed when ctx ends; a hotplug script it started may keep the
	// output pipe open, which must not hold the wait for ever.
	cmd.WaitDelay = xlWaitDelay
	out, err := cmd.CombinedOutput()
	if errors.Is(err, exec.ErrWaitDelay) && cmd.ProcessState != nil && cmd.ProcessState.Success() {
		// xl itself succeeded; a hotplug child it left kept the pipe
		// open. Its output so far is all there is to report.
		err = nil
	}
	if err != nil {
		return out, fmt.Errorf("running %q: %w\n%s", args, err, out)
	}
	return out, nil
}
