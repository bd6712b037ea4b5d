package lvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// call is one lvm2 command a test expects, with what it answers.
type call struct {
	Args   []string `json:"args"`
	Stdout string   `json:"stdout,omitempty"`
	Err    string   `json:"error,omitempty"` // the runner's error text; empty for success
}

// fakeRunner answers an exact sequence of calls and fails the test on any
// other, and on calls left unmade when the test ends.
type fakeRunner struct {
	t     testing.TB
	mu    sync.Mutex
	calls []call
	n     int
}

func newFakeRunner(t testing.TB, calls ...call) *fakeRunner {
	f := &fakeRunner{t: t, calls: calls}
	t.Cleanup(func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		if left := f.calls[f.n:]; len(left) > 0 && !t.Failed() {
			t.Errorf("%d expected lvm calls not made, first %q", len(left), left[0].Args)
		}
	})
	return f
}

func (f *fakeRunner) run(_ context.Context, args ...string) ([]byte, error) {
	f.t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.n >= len(f.calls) {
		f.t.Errorf("unexpected lvm call %q", args)
		return nil, errors.New("unexpected call")
	}
	c := f.calls[f.n]
	f.n++
	if diff := cmp.Diff(c.Args, args); diff != "" {
		f.t.Errorf("lvm call %d (-want +got):\n%s", f.n, diff)
		return nil, errors.New("unexpected call")
	}
	if c.Err != "" {
		return nil, errors.New(c.Err)
	}
	return []byte(c.Stdout), nil
}

// recordingRunner passes calls on and keeps them, to save as a session.
type recordingRunner struct {
	r     runner
	mu    sync.Mutex
	calls []call
}

func (r *recordingRunner) run(ctx context.Context, args ...string) ([]byte, error) {
	out, err := r.r.run(ctx, args...)
	c := call{Args: args, Stdout: string(out)}
	if err != nil {
		c.Err = err.Error()
	}
	r.mu.Lock()
	r.calls = append(r.calls, c)
	r.mu.Unlock()
	return out, err
}

func testdata(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func loadSession(t testing.TB, name string) []call {
	t.Helper()
	var calls []call
	if err := json.Unmarshal([]byte(testdata(t, name)), &calls); err != nil {
		t.Fatalf("testdata/%s: %v", name, err)
	}
	return calls
}

// lvsCall and vgsCall answer the reports with captured output.
func lvsCall(t testing.TB, file string) call {
	return call{Args: lvsArgs("vg0"), Stdout: testdata(t, file)}
}

func vgsCall(t testing.TB, file string) call {
	return call{Args: vgsArgs("vg0"), Stdout: testdata(t, file)}
}

// lvmError is how the real runner reports a command that failed.
func lvmError(args []string, stderr string) string {
	return fmt.Sprintf("running %q: exit status 5\n%s", args, strings.TrimSpace(stderr))
}
