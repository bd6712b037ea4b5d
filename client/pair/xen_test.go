package pair

import (
	"context"
	"errors"
	"os/exec"
	"testing"
	"time"
)

// An xl that succeeded while a hotplug child it started keeps its output
// pipe open has succeeded: the wait for the pipe gives up after
// xlWaitDelay, and only a failed exit is a failure.
func TestExecRunnerTakesAnExitOverAPipeLeftOpen(t *testing.T) {
	if _, err := exec.LookPath("sh"); err != nil {
		t.Fatal(err)
	}
	old := xlWaitDelay
	xlWaitDelay = 50 * time.Millisecond
	defer func() { xlWaitDelay = old }()
	ctx := context.Background()
	// The child sleeps on with the pipe; sh exits at once.
	if _, err := (execRunner{}).run(ctx, "sh", "-c", "sleep 30 & exit 0"); err != nil {
		t.Errorf("exit 0 with the pipe left open: %v, want success", err)
	}
	_, err := (execRunner{}).run(ctx, "sh", "-c", "sleep 30 & exit 3")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Errorf("exit 3 with the pipe left open: %v, want exit status 3", err)
	}
}
