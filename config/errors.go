package config

import (
	"errors"
	"fmt"
	"strings"
)

// Error is one problem with a configuration: which key, where in the file
// when that is known, and what to do about it.
type Error struct {
	// File is the configuration file's name; empty for a configuration that
	// did not come from a file.
	File string
	// Line and Column locate the problem in the file, from 1; 0 when unknown
	// (for instance a value that came from a command-line flag).
	Line, Column int
	// Key is the dotted key path, such as "server.listen[1]" or
	// "export[0].allow_names"; empty for a TOML syntax error.
	Key string
	// Msg says what is wrong and how to fix it.
	Msg string
}

func (e *Error) Error() string {
	var b strings.Builder
	switch {
	case e.File != "" && e.Line > 0:
		fmt.Fprintf(&b, "%s:%d: ", e.File, e.Line)
	case e.File != "":
		fmt.Fprintf(&b, "%s: ", e.File)
	case e.Line > 0:
		fmt.Fprintf(&b, "line %d: ", e.Line)
	}
	if e.Key != "" {
		b.WriteString(e.Key)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// problems collects the errors of one configuration, so that an
// administrator sees all of them at once rather than one per attempt.
type problems struct {
	file string
	pos  positions
	errs []error
}

// add records a problem with key; format and args say what is wrong.
func (p *problems) add(key, format string, args ...any) {
	p.errs = append(p.errs, &Error{File: p.file, Line: p.pos.line(key), Key: key, Msg: fmt.Sprintf(format, args...)})
}

// withFix appends fix to an error from another package unless its message
// already shows what is wanted.
func withFix(err error, fix string) string {
	msg := err.Error()
	for _, w := range []string{"want", "such as", "e.g."} {
		if strings.Contains(msg, w) {
			return msg
		}
	}
	return msg + ": " + fix
}

// err is every problem joined, or nil.
func (p *problems) err() error { return errors.Join(p.errs...) }
