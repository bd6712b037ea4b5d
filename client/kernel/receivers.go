package kernel

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// The nbd driver runs each connection's receive loop as a work item on the
// device's workqueue, "nbdN-recv" (Linux 4.13 to at least 6.12). The
// workqueue has a rescuer thread, named after it, for when the kernel is
// slow to start worker threads (over 10 ms: memory pressure, an emulated
// VM). The rescuer takes every loop then queued and runs them one after the
// other; the first never ends, so the others never start, and a request
// sent on one of their connections waits the device's timeout. A fix was
// proposed upstream in 2021 ("nbd: Don't use workqueue to handle recv
// work") and not merged. lvnbd saw it in about half of the attaches right
// after a VM's boot.
//
// A thread running a work item shows its workqueue in its name:
// /proc/PID/comm of a worker in a loop of nbd0 is "kworker/u4:2+nbd0-recv",
// of the rescuer "nbd0-recv+nbd0-recv".

// ErrReceiversStarved means the kernel left some of a new device's
// connections without a receive loop: see the comment above. Connect then
// disconnects the device again; attaching anew (with new sockets) starts
// them, since the kernel has started worker threads meanwhile.
var ErrReceiversStarved = errors.New("the kernel did not start a receiver for every connection " +
	"(its nbd workqueue's rescuer took them all; a known nbd bug, see lvnbd's README)")

// receiverSettle bounds the wait for a new device's receive loops to start.
const receiverSettle = 2 * time.Second

// receivers says, from /proc under procRoot, how many of device index's
// receive loops run now, whether the device's rescuer runs one of them, and
// whether the device's workqueue could be found at all (known): a kernel
// that names its threads otherwise cannot be checked.
func receivers(procRoot string, index int) (running int, rescuer, known bool) {
	wq := "nbd" + strconv.Itoa(index) + "-recv"
	entries, err := os.ReadDir(procRoot)
	if err != nil {
		return 0, false, false
	}
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(procRoot, e.Name(), "comm"))
		if err != nil {
			continue // gone
		}
		comm := strings.TrimSpace(string(b))
		if comm == wq || strings.HasPrefix(comm, wq+"+") || strings.HasPrefix(comm, wq+"-") {
			known = true // the rescuer, idle or not
		}
		if strings.HasSuffix(comm, "+"+wq) {
			running++
			if strings.HasPrefix(comm, wq+"+") {
				rescuer = true
			}
		}
	}
	return running, rescuer, known
}

// checkReceivers waits up to settle for the n receive loops of device index
// to start. It returns ErrReceiversStarved once the rescuer is seen running
// one of them while fewer than n run: the others cannot start then. Where
// the threads cannot be found, or they are only slow, it returns nil: a
// device is never refused on a guess.
func checkReceivers(ctx context.Context, procRoot string, index, n int, settle time.Duration) error {
	if n < 2 {
		return nil // a lone loop runs, in the rescuer or not
	}
	deadline := time.Now().Add(settle)
	for {
		running, rescuer, known := receivers(procRoot, index)
		switch {
		case !known || running >= n:
			return nil
		case rescuer:
			return fmt.Errorf("%w: %d of %d running on %s", ErrReceiversStarved, running, n, DevicePath(index))
		case !time.Now().Before(deadline):
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(5 * time.Millisecond):
		}
	}
}
