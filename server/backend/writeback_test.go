package backend

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"testing"
	"testing/synctest"

	"golang.org/x/sys/unix"
)

// failSync makes b's next sync fail as fdatasync does after a page failed to
// reach the disk.
func failSync(t *testing.T, b *File) {
	t.Helper()
	err := b.syncs.run(func() error { return fmt.Errorf("fdatasync %s: %w", b.path, unix.EIO) }, nil)
	if !errors.Is(err, unix.EIO) {
		t.Fatalf("the failing sync returned %v, want EIO", err)
	}
}

// After one sync failed, the kernel would let the next fdatasync succeed:
// every later flush fails instead, with the first failure's errno, and so
// does every other I/O, which must not touch the file.
func TestWriteBackFailureIsKept(t *testing.T) {
	b, path := sparseFile(t, 1<<20)
	if err := b.Flush(); err != nil {
		t.Fatalf("Flush before any failure: %v", err)
	}
	failSync(t, b)

	data := bytes.Repeat([]byte{0xa5}, 4096)
	buf := make([]byte, 4096)
	for _, tc := range []struct {
		name string
		op   func() error
	}{
		{"Flush", b.Flush},
		{"Flush again", b.Flush},
		{"FUA WriteAt", func() error { return b.WriteAt(data, 0, true) }},
		{"WriteAt", func() error { return b.WriteAt(data, 4096, false) }},
		{"ReadAt", func() error { return b.ReadAt(buf, 0) }},
		{"Trim", func() error { return b.Trim(0, 4096) }},
		{"Zero", func() error { return b.Zero(0, 4096, false, false) }},
		{"Cache", func() error { return b.Cache(0, 4096) }},
		{"Extents", func() error { _, err := b.Extents(0, 4096, 16); return err }},
	} {
		err := tc.op()
		var wb *WriteBackError
		if !errors.As(err, &wb) || !errors.Is(err, unix.EIO) {
			t.Errorf("%s after a failed write-back returned %v, want a WriteBackError with EIO", tc.name, err)
		}
	}
	for _, tc := range []struct {
		name string
		op   func() error
	}{
		{"ReadAtNoWait", func() error { return b.ReadAtNoWait(buf, 0) }},
		{"WriteAtNoWait", func() error { return b.WriteAtNoWait(data, 0) }},
	} {
		if err := tc.op(); !errors.Is(err, ErrWouldBlock) {
			t.Errorf("%s after a failed write-back returned %v, want ErrWouldBlock (for the call that fails)", tc.name, err)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, 1<<20)) {
		t.Error("a refused write reached the file")
	}
}

// The kernel refusing RWF_DSYNC is not a failed write-back: FUA falls back
// to a write and a flush, and the export stays usable.
func TestDSyncRefusalIsNotKept(t *testing.T) {
	b, _ := sparseFile(t, 1<<20)
	err := b.syncs.run(func() error { return fmt.Errorf("pwrite: %w", unix.EOPNOTSUPP) }, dsyncRefused)
	if !errors.Is(err, unix.EOPNOTSUPP) {
		t.Fatalf("refused sync returned %v, want EOPNOTSUPP", err)
	}
	if err := b.Flush(); err != nil {
		t.Errorf("Flush after a refused RWF_DSYNC: %v", err)
	}
	if err := b.WriteAt(make([]byte, 512), 0, true); err != nil {
		t.Errorf("FUA WriteAt after a refused RWF_DSYNC: %v", err)
	}
}

// Two syncs run together and the kernel tells only the first of the failed
// write-back; the second, told nothing, must not report success before the
// first has kept the failure.
func TestSyncBesideAFailingOneFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tr := newSyncTracker("disk.img")
		told := make(chan struct{})
		release := make(chan struct{})
		go tr.run(func() error {
			close(told) // the kernel has told this sync, which has not returned yet
			<-release
			return unix.EIO
		}, nil)
		<-told
		second := make(chan error, 1)
		go func() { second <- tr.run(func() error { return nil }, nil) }()
		synctest.Wait()
		select {
		case err := <-second:
			t.Fatalf("the second sync returned (%v) while the one told of the failure had not", err)
		default:
		}
		close(release)
		if err := <-second; !errors.Is(err, unix.EIO) {
			t.Errorf("the second sync returned %v, want the first one's EIO", err)
		}
		// A sync that starts after both is refused at once.
		if err := tr.run(func() error { t.Error("a sync ran after the failure"); return nil }, nil); !errors.Is(err, unix.EIO) {
			t.Errorf("a later sync returned %v, want EIO", err)
		}
	})
}

// The function given to OnFailure is told of a failure before the failing
// sync returns, and before a sync beside it can succeed: the server records
// the failure there, and nothing may be answered as durable before that.
// A refused RWF_DSYNC is not a failure, and a kept one is not told again.
func TestOnFailureIsToldFirst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tr := newSyncTracker("disk.img")
		var told []error
		recording := make(chan struct{})
		release := make(chan struct{})
		tr.setOnFail(func(err error) {
			told = append(told, err)
			close(recording)
			<-release
		})
		if err := tr.run(func() error { return unix.EOPNOTSUPP }, dsyncRefused); !errors.Is(err, unix.EOPNOTSUPP) {
			t.Fatalf("refused sync returned %v", err)
		}
		first := make(chan error, 1)
		go func() { first <- tr.run(func() error { return unix.EIO }, nil) }()
		<-recording
		second := make(chan error, 1)
		go func() { second <- tr.run(func() error { return nil }, nil) }()
		synctest.Wait()
		select {
		case err := <-first:
			t.Fatalf("the failing sync returned (%v) before its failure was recorded", err)
		case err := <-second:
			t.Fatalf("a sync beside it returned (%v) before the failure was recorded", err)
		default:
		}
		close(release)
		for _, c := range []chan error{first, second} {
			if err := <-c; !errors.Is(err, unix.EIO) {
				t.Errorf("a sync returned %v, want EIO", err)
			}
		}
		if err := tr.run(func() error { return unix.EIO }, nil); !errors.Is(err, unix.EIO) {
			t.Errorf("a later sync returned %v, want EIO", err)
		}
		if len(told) != 1 || !errors.Is(told[0], unix.EIO) {
			t.Errorf("told %v, want the one EIO", told)
		}
	})
}

// MarkFailed fails every request, as a failure from before a restart.
func TestMarkFailed(t *testing.T) {
	b, _ := sparseFile(t, 1<<20)
	b.MarkFailed(fmt.Errorf("recorded before: %w", unix.ENOSPC))
	var wb *WriteBackError
	if err := b.ReadAt(make([]byte, 512), 0); !errors.As(err, &wb) || !errors.Is(err, unix.ENOSPC) {
		t.Errorf("ReadAt of a backend marked failed returned %v, want a WriteBackError with ENOSPC", err)
	}
	if err := b.Failed(); err == nil {
		t.Error("Failed() is nil after MarkFailed")
	}
}
