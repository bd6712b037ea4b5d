package server

import (
	"errors"
	"syscall"

	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server/backend"
)

var errTooManyFiles = syscall.EMFILE

// errnoOf maps an I/O error to the protocol's small set of error values.
func errnoOf(err error) nbd.Errno {
	var en syscall.Errno
	var wb *backend.WriteBackError
	switch {
	case errors.Is(err, backend.ErrNotFast):
		return nbd.ENOTSUP
	case errors.As(err, &wb):
		// The export failed for good, whatever the first failure was:
		// its errno (ENOSPC, say) would tell a client this request could
		// succeed once space is freed, and qemu pauses a VM on ENOSPC,
		// for reads too with rerror=enospc. The original error stays in
		// the reply's message, the log and lvnbd status.
		return nbd.EIO
	case errors.As(err, &en):
		switch en {
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return nbd.EPERM
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return nbd.ENOSPC
		case syscall.EINVAL:
			return nbd.EINVAL
		case syscall.ENOMEM:
			return nbd.ENOMEM
		}
	}
	return nbd.EIO
}
