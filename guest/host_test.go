package guest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"golang.org/x/sys/unix"
)

// fakeCommand puts an executable script named name first on PATH.
func fakeCommand(t *testing.T, name, script string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n"+script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
}

func TestExecRunner(t *testing.T) {
	t.Setenv("LC_ALL", "de_DE.UTF-8")
	fakeCommand(t, "mdadm", `echo "$1 $LC_ALL"; echo "mdadm: noise" >&2`)
	out, err := execRunner{}.run(context.Background(), "mdadm", "--detail")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(out), "--detail C\n"; got != want {
		t.Errorf("stdout = %q, want %q (the arguments, LC_ALL=C, no stderr)", got, want)
	}
}

func TestExecRunnerError(t *testing.T) {
	fakeCommand(t, "mdadm", `echo "mdadm: No md superblock detected on $3." >&2; exit 1`)
	args := []string{"mdadm", "--examine", "--export", "/dev/nbd0"}
	_, err := execRunner{}.run(context.Background(), args...)
	want := `running ["mdadm" "--examine" "--export" "/dev/nbd0"]: exit status 1` + "\nmdadm: No md superblock detected on /dev/nbd0."
	if err == nil || err.Error() != want {
		t.Errorf("error = %v, want %q", err, want)
	}
	var ee interface{ ExitCode() int }
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Errorf("error %v does not carry the exit status", err)
	}
	if !stderrLine(err, "mdadm: No md superblock detected on /dev/nbd0.") {
		t.Errorf("error %v does not carry mdadm's stderr line", err)
	}
	if stderrLine(err, "mdadm: No md superblock detected") || stderrLine(errors.New(err.Error()), "mdadm: No md superblock detected on /dev/nbd0.") {
		t.Errorf("stderrLine matched part of a line, or an error that is not the command's")
	}
	if _, err := (execRunner{}).run(context.Background(), "lvnbd-no-such-command"); err == nil ||
		!strings.Contains(err.Error(), "not installed") {
		t.Errorf("missing command: %v", err)
	}
}

func TestReadProber(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		calls := 0
		p := newReadProber(10 * time.Millisecond)
		p.read = func(dev string) probeResult {
			calls++
			<-release
			return probeReadable
		}
		// A read that hangs (a dead NBD leg inside its dead-connection
		// timeout) leaves the answer pending, and is not started twice.
		if r := p.probe("/dev/nbd0"); r != probePending {
			t.Fatalf("hanging read: %v", r)
		}
		if r := p.probe("/dev/nbd0"); r != probePending {
			t.Fatalf("still hanging: %v", r)
		}
		close(release)
		synctest.Wait()
		if r := p.probe("/dev/nbd0"); r != probeReadable {
			t.Fatalf("after the read returned: %v", r)
		}
		if calls != 1 {
			t.Errorf("%d reads, want 1 in flight at a time", calls)
		}
		if r := p.probe("/dev/nbd0"); r != probeReadable || calls != 2 {
			t.Errorf("next probe: %v after %d reads", r, calls)
		}
	})
}

// A slow read's answer, collected long after it came, is not taken for the
// device's state now: the device is read again.
func TestReadProberDropsStaleAnswers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var alive atomic.Bool
		alive.Store(true)
		p := newReadProber(5 * time.Second)
		p.read = func(dev string) probeResult {
			time.Sleep(10 * time.Second) // slower than a probe waits
			if alive.Load() {
				return probeReadable
			}
			return probeUnreadable
		}
		if r := p.probe("/dev/nbd1"); r != probePending {
			t.Fatalf("slow read: %v", r)
		}
		// The read answers "readable" at 10 s; an hour later the device
		// is dead.
		time.Sleep(time.Hour)
		alive.Store(false)
		if r := p.probe("/dev/nbd1"); r != probePending {
			t.Fatalf("probe an hour after the answer came: %v, want pending (a new read)", r)
		}
		time.Sleep(6 * time.Second)
		if r := p.probe("/dev/nbd1"); r != probeUnreadable {
			t.Errorf("probe after the new read answered: %v, want unreadable", r)
		}

		// A watcher looking every 30 s looks again 10 s after a probe
		// was left pending (see Run), and takes the slow read's answer
		// then; one older than that is stale.
		w := newWatcher(&host{probe: p}, &WatchConfig{Interval: 30 * time.Second})
		if got := w.soonLook(); got != 10*time.Second {
			t.Errorf("soonLook = %v, want 10s", got)
		}
		alive.Store(true)
		if r := p.probe("/dev/nbd2"); r != probePending {
			t.Fatalf("slow read: %v", r)
		}
		time.Sleep(10 * time.Second)
		if r := p.probe("/dev/nbd2"); r != probeReadable {
			t.Errorf("probe at the next look, 10 s on: %v, want the slow read's readable", r)
		}
		if r := p.probe("/dev/nbd3"); r != probePending {
			t.Fatalf("slow read: %v", r)
		}
		time.Sleep(30 * time.Second)
		if r := p.probe("/dev/nbd3"); r != probePending {
			t.Errorf("probe 30 s on: %v, want a new read (the answer is older than 15 s)", r)
		}
		time.Sleep(10 * time.Second)
	})
}

func TestReadOneBlock(t *testing.T) {
	if r := readOneBlock(filepath.Join(t.TempDir(), "missing")); r != probeUnreadable {
		t.Errorf("missing device: %v", r)
	}
	short := filepath.Join(t.TempDir(), "short")
	if err := os.WriteFile(short, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if r := readOneBlock(short); r != probeUnreadable {
		t.Errorf("a 1-byte file: %v (no full block)", r)
	}
}

func TestDeviceEndsZero(t *testing.T) {
	const size = 3 << 20
	tests := []struct {
		name string
		at   int64 // where a non-zero byte is written; -1 for none
		want bool
	}{
		{"zeroes", -1, true},
		{"first byte", 0, false},
		{"end of the first MiB", 1<<20 - 1, false},
		{"middle", 3 << 19, true}, // only the ends are read
		{"start of the last MiB", size - 1<<20, false},
		{"last byte", size - 1, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "dev")
			b := make([]byte, size)
			if tt.at >= 0 {
				b[tt.at] = 0x5a
			}
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := deviceEndsZero(p, size)
			if errors.Is(err, unix.EINVAL) {
				t.Skipf("the temporary directory's file system does not do O_DIRECT: %v", err)
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("deviceEndsZero = %v, want %v", got, tt.want)
			}
		})
	}
	if _, err := deviceEndsZero(filepath.Join(t.TempDir(), "none"), size); err == nil {
		t.Error("no error for a missing device")
	}
}
