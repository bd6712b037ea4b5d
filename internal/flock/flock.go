// Package flock takes flock(2) locks on lock files, waiting for other
// holders until a context ends: what lvnbd's processes use to take turns at
// a file or a volume group's record that a single command cannot change.
package flock

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// poll is how often a lock held elsewhere is tried again: flock(2) cannot
// wait and watch a context at once.
const poll = 20 * time.Millisecond

// Lock opens the lock file at path (creating it, mode 0600) and takes a
// flock of kind how (unix.LOCK_SH or unix.LOCK_EX) on it, waiting for other
// holders until ctx is done. Each call opens the file anew, so it also
// excludes goroutines of one process. unlock releases the lock.
func Lock(ctx context.Context, path string, how int) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err // names the path
	}
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("another lvnbd process holds %s (lslocks shows which): %w", path, ctx.Err())
		case <-time.After(poll):
		}
	}
}
