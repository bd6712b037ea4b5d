package backend

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"testing"
	"testing/synctest"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/rwf"
)

// failSync makes b's next sync fail as fdatasync does after a page failed to
// reach the disk.
func failSync(t *testing.T, b *File) {
	t.Helper()
	err := b.syncs.run(func() error { return fmt.Errorf("fdatasync %s: %w", b.path, unix.EIO) })
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

// A FUA write's RWF_DSYNC write is a sync: whatever it fails with is a
// failed write-back of the export, told to OnFailure and kept, and never a
// reason to write again another way. EOPNOTSUPP too: ext4, xfs and fuse
// report a failed write-back with the device's errno, and BLK_STS_NOTSUPP
// is EOPNOTSUPP. Taken for the kernel refusing the flag, it was lost: the
// write and fdatasync that followed succeeded, the failure already
// reported to the RWF_DSYNC write.
func TestFailedDSyncWriteIsKept(t *testing.T) {
	for _, errno := range []unix.Errno{unix.EOPNOTSUPP, unix.ENOSYS, unix.EINVAL, unix.EIO} {
		t.Run(errno.Error(), func(t *testing.T) {
			b, path := sparseFile(t, 1<<20)
			b.dsync = true // as Open found it (TestDSyncProbe)
			var told []error
			b.OnFailure(func(err error) { told = append(told, err) })
			b.writeDSync = func(p []byte, off int64) error {
				return fmt.Errorf("pwrite %s at %d: %w", path, off, errno)
			}
			err := b.WriteAt(bytes.Repeat([]byte{0xa5}, 4096), 0, true)
			var wb *WriteBackError
			if !errors.As(err, &wb) || !errors.Is(err, errno) {
				t.Errorf("FUA WriteAt returned %v, want a WriteBackError with %v", err, errno)
			}
			if len(told) != 1 || !errors.Is(told[0], errno) {
				t.Errorf("OnFailure was told %v, want the one %v", told, errno)
			}
			if err := b.Flush(); !errors.As(err, &wb) || !errors.Is(err, errno) {
				t.Errorf("Flush after the failed FUA write returned %v, want a WriteBackError with %v", err, errno)
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, make([]byte, 1<<20)) {
				t.Error("the failed FUA write was written again another way")
			}
		})
	}
}

// Open asks the kernel whether it takes RWF_DSYNC with a read that cannot
// meet a failed write-back, at the end of the file or device: every kernel
// lvnbd runs on does, and a flag it does not know is refused.
func TestDSyncProbe(t *testing.T) {
	file, _ := sparseFile(t, 1<<20)
	empty, _ := sparseFile(t, 0)
	device, _ := loopDevice(t, 1<<20)
	for name, b := range map[string]*File{"file": file, "empty file": empty, "device": device} {
		if !b.dsync {
			t.Errorf("%s: Open found no RWF_DSYNC", name)
		}
		const unknown = 1 << 30
		if rwf.Supported(b.fd, b.Size(), unknown) {
			t.Errorf("%s: the kernel took the unknown flag %#x", name, unknown)
		}
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
		})
		<-told
		second := make(chan error, 1)
		go func() { second <- tr.run(func() error { return nil }) }()
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
		if err := tr.run(func() error { t.Error("a sync ran after the failure"); return nil }); !errors.Is(err, unix.EIO) {
			t.Errorf("a later sync returned %v, want EIO", err)
		}
	})
}

// The function given to OnFailure is told of a failure before the failing
// sync returns, and before a sync beside it can succeed: the server records
// the failure there, and nothing may be answered as durable before that.
// A kept failure is not told again.
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
		first := make(chan error, 1)
		go func() { first <- tr.run(func() error { return unix.EIO }) }()
		<-recording
		second := make(chan error, 1)
		go func() { second <- tr.run(func() error { return nil }) }()
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
		if err := tr.run(func() error { return unix.EIO }); !errors.Is(err, unix.EIO) {
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

// An fdatasync interrupted by a signal (a network file system may return
// EINTR) is tried again, not taken for a failed write-back, which would fail
// the export until lvnbd recover. The interrupted call may have consumed the
// file's write-back error, so the file system's record (syncfs) decides: an
// error there fails the flush and the export. A file system that keeps
// returning EINTR fails the flush.
func TestFlushRetriesAnInterruptedSync(t *testing.T) {
	origSync, origSyncfs := fdatasync, syncfs
	t.Cleanup(func() { fdatasync, syncfs = origSync, origSyncfs })
	for _, tc := range []struct {
		name        string
		interrupts  int   // fdatasync calls that return EINTR first
		syncfsErr   error // what syncfs returns
		wantSyncs   int
		wantSyncfs  int
		wantFailure bool
	}{
		{"none", 0, nil, 1, 0, false},
		{"once", 1, nil, 2, 1, false},
		{"once, and the file system kept an error", 1, unix.EIO, 2, 1, true},
		{"every time", 100, nil, maxSyncTries, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, _ := sparseFile(t, 1<<20)
			syncs, syncfses := 0, 0
			fdatasync = func(fd int) error {
				if syncs++; syncs <= tc.interrupts {
					return unix.EINTR
				}
				return origSync(fd)
			}
			syncfs = func(fd int) error {
				syncfses++
				return tc.syncfsErr
			}
			err := b.Flush()
			if (err != nil) != tc.wantFailure {
				t.Errorf("Flush = %v, want failure %v", err, tc.wantFailure)
			}
			if syncs != tc.wantSyncs || syncfses != tc.wantSyncfs {
				t.Errorf("%d fdatasync and %d syncfs calls, want %d and %d", syncs, syncfses, tc.wantSyncs, tc.wantSyncfs)
			}
			if failed := b.Failed() != nil; failed != tc.wantFailure {
				t.Errorf("export failed: %v, want %v", b.Failed(), tc.wantFailure)
			}
		})
	}
}
