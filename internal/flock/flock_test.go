package flock

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// An exclusive lock keeps every other lock out until it is released, and a
// waiter gives up when its context ends; shared locks coexist.
func TestLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.lock")
	short := func() context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		t.Cleanup(cancel)
		return ctx
	}
	unlock, err := Lock(context.Background(), path, unix.LOCK_EX)
	if err != nil {
		t.Fatal(err)
	}
	for _, how := range []int{unix.LOCK_EX, unix.LOCK_SH} {
		if _, err := Lock(short(), path, how); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("lock %d while held exclusively: %v, want DeadlineExceeded", how, err)
		}
	}
	unlock()

	shared1, err := Lock(short(), path, unix.LOCK_SH)
	if err != nil {
		t.Fatal(err)
	}
	shared2, err := Lock(short(), path, unix.LOCK_SH)
	if err != nil {
		t.Errorf("second shared lock: %v", err)
	} else {
		shared2()
	}
	if _, err := Lock(short(), path, unix.LOCK_EX); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("exclusive lock while held shared: %v, want DeadlineExceeded", err)
	}
	shared1()
	unlock, err = Lock(short(), path, unix.LOCK_EX)
	if err != nil {
		t.Errorf("exclusive lock once released: %v", err)
	} else {
		unlock()
	}
}

func TestLockOfAMissingDirectory(t *testing.T) {
	if _, err := Lock(context.Background(), filepath.Join(t.TempDir(), "none", "x.lock"), unix.LOCK_EX); err == nil {
		t.Error("Lock in a missing directory succeeded")
	}
}
