package config

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// equateEmpty treats nil and empty lists alike: `allow = []` and no allow
// key mean the same.
var equateEmpty = cmpopts.EquateEmpty()

// fixWords are the words with which a message tells the administrator what
// to do; every message has one.
var fixWords = []string{"want", "give", "set ", "remove", "use ", "write", "keep", "choose", "merge", "did you mean", "must be", "takes", "needs", "leave", "such as", "e.g."}

// problemsOf unpacks the *Error values in err, failing the test on anything
// else: every problem must say which key it is about and how to fix it.
func problemsOf(t testing.TB, err error) []*Error {
	t.Helper()
	var errs []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	} else {
		errs = []error{err}
	}
	var out []*Error
	for _, e := range errs {
		var ce *Error
		if !errors.As(e, &ce) {
			t.Fatalf("error %q (%T) is not a *config.Error", e, e)
		}
		if !hasFix(ce.Msg) {
			t.Errorf("message %q does not say how to fix it", ce.Msg)
		}
		out = append(out, ce)
	}
	return out
}

func hasFix(msg string) bool {
	for _, w := range fixWords {
		if strings.Contains(msg, w) {
			return true
		}
	}
	return false
}

// wantProblem checks that err reports key (with a line, when line > 0) with
// a message containing want.
func wantProblem(t testing.TB, err error, key, want string, line int) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want %s: …%s…", key, want)
	}
	ps := problemsOf(t, err)
	for _, p := range ps {
		if p.Key != key || !strings.Contains(p.Msg, want) {
			continue
		}
		if line > 0 && p.Line != line {
			t.Errorf("%s reported on line %d, want %d", key, p.Line, line)
		}
		if !strings.Contains(p.Error(), key) && key != "" {
			t.Errorf("Error() = %q does not name %s", p.Error(), key)
		}
		return
	}
	t.Errorf("got %q; want a problem with %s: …%s…", err, key, want)
}

func diff(want, got any) string { return cmp.Diff(want, got, equateEmpty) }
