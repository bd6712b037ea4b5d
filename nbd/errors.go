package nbd

import (
	"errors"
	"fmt"
)

// Sentinel errors returned (wrapped) by the decoders.
var (
	// ErrShort means a message was shorter than its fixed part or than a
	// length it declared.
	ErrShort = errors.New("message too short")
	// ErrTrailing means a message had bytes after its last field.
	ErrTrailing = errors.New("unexpected trailing bytes")
	// ErrBadMagic means a magic number did not match.
	ErrBadMagic = errors.New("bad magic")
	// ErrTooLong means a peer-declared length exceeded a protocol bound.
	ErrTooLong = errors.New("length exceeds limit")
)

// OpError records which message failed to decode and why.
type OpError struct {
	Op  string // the message being decoded, e.g. "request header"
	Err error
}

func (e *OpError) Error() string { return fmt.Sprintf("nbd: decoding %s: %v", e.Op, e.Err) }

// Unwrap returns the underlying error.
func (e *OpError) Unwrap() error { return e.Err }

func opErr(op string, err error) error { return &OpError{Op: op, Err: err} }

func opErrf(op string, sentinel error, format string, args ...any) error {
	return &OpError{Op: op, Err: fmt.Errorf("%w: "+format, append([]any{sentinel}, args...)...)}
}
