// Package control is the storage box's local control socket: a root-only
// Unix socket on which a running `lvnbd serve` reports its exports and
// clients and performs volume changes, so that they take effect in the
// server at once (a new export, a new size, a crash-consistent snapshot)
// and cannot pull a volume from under a connected client. The protocol is
// HTTP with JSON bodies; the CLI reaches it through Client.
package control

import (
	"errors"

	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/volume"
)

// DefaultPath is where lvnbd serve listens for control requests.
const DefaultPath = "/run/lvnbd/control.sock"

// Status is what GET /v1/status returns.
type Status struct {
	// Driver is the volume driver's URL, empty when the server exports no
	// volumes (only --export files and devices).
	Driver string `json:"driver"`
	// Epoch is the crash epoch every volume's ID ends with, once the box
	// went down under a running server (server/boxcrash); empty before.
	Epoch   string                `json:"epoch,omitempty"`
	Exports []server.ExportStatus `json:"exports"`
	// Failures are the recorded write-back failures, also of exports not
	// served now (a volume missing since); lvnbd recover clears them.
	Failures []server.Failure `json:"failures,omitempty"`
	// Shrinks are the volumes seen to shrink behind the server whose
	// rollback (a new ID) is not counted yet: not exported meanwhile.
	Shrinks []server.PendingShrink `json:"shrinks_pending,omitempty"`
}

// errorBody is the JSON body of every failed request.
type errorBody struct {
	Error string `json:"error"`
	Kind  string `json:"kind"`
}

// kinds maps sentinel errors to the words that carry them over the socket,
// so errors.Is works on the client side as it does in the server.
var kinds = map[string]error{
	"not_found":     volume.ErrNotFound,
	"exists":        volume.ErrExists,
	"invalid_name":  volume.ErrInvalidName,
	"invalid_size":  volume.ErrInvalidSize,
	"shrink":        volume.ErrShrink,
	"no_space":      volume.ErrNoSpace,
	"has_snapshots": volume.ErrHasSnapshots,
	"merge_pending": volume.ErrMergePending,
	"unsupported":   volume.ErrUnsupported,
	"in_use":        server.ErrInUse,
	"no_export":     server.ErrNoExport,
	"not_failed":    server.ErrNotFailed,
	"no_volumes":    ErrNoVolumes,
}

// ErrNoVolumes is returned for volume requests to a server that exports no
// volume driver.
var ErrNoVolumes = errors.New("this server exports no volumes (start it with --volumes)")

func kindOf(err error) string {
	for k, sentinel := range kinds {
		if errors.Is(err, sentinel) {
			return k
		}
	}
	return ""
}

// RemoteError is an error the server reported; it wraps the sentinel error
// of its kind.
type RemoteError struct {
	Msg      string
	sentinel error
}

func (e *RemoteError) Error() string { return e.Msg }

// Unwrap returns the sentinel error of the error's kind, if any.
func (e *RemoteError) Unwrap() error { return e.sentinel }
