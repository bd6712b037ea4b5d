package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// host is what the package uses of the machine; tests replace each part.
type host struct {
	run runner
	// sys is the root file system, for sys/ and proc/.
	sys fs.FS
	// resolve follows symlinks such as /dev/md/NAME -> /dev/md127.
	resolve func(path string) (string, error)
	// exists reports whether a path exists (for /dev/md/NAME).
	exists func(path string) bool
	// readEnds reads up to headSize bytes at the start of a device and up
	// to tailSize at its end.
	readEnds func(dev string, size uint64) (head, tail []byte, err error)
	// zeroEnds reports whether the first and last blankSpan bytes of a
	// device of size bytes read as zeroes.
	zeroEnds func(dev string, size uint64) (bool, error)
	// exclusive opens a device exclusively and closes it again: the
	// kernel refuses (EBUSY) one that is mounted, swap, or held by md,
	// device-mapper or a program, or whose partition is. Nil skips it.
	exclusive func(dev string) error
	// have reports whether a command is installed.
	have func(name string) bool
	// probe says whether a device answers reads.
	probe prober
	clock clock
	// mdadmVersion returns what mdadm --version prints.
	mdadmVersion func(ctx context.Context) ([]byte, error)
	// lookWait starts the wait of a watcher's look for its work on one
	// array (see lookWait); nil waits for the work to end.
	lookWait func() <-chan time.Time
}

func realHost() *host {
	return &host{
		run:     execRunner{},
		sys:     os.DirFS("/"),
		resolve: filepath.EvalSymlinks,
		exists: func(p string) bool {
			_, err := os.Lstat(p)
			return err == nil
		},
		readEnds:     readDeviceEnds,
		zeroEnds:     deviceEndsZero,
		exclusive:    openExclusive,
		have:         haveCommand,
		probe:        newReadProber(5 * time.Second),
		clock:        realClock{},
		lookWait:     func() <-chan time.Time { return time.After(lookWait) },
		mdadmVersion: mdadmVersionOutput,
	}
}

// kernelName resolves a device path to its name under /sys/class/block:
// /dev/md/md0 -> md127, /dev/nbd0 -> nbd0.
// diskseq reads the disk sequence number of the kernel block device named
// dev (Linux 5.15 on): a new number for each disk the kernel makes, also
// under a name another disk had, kept while the disk lives. A partition
// has its disk's. "" if it cannot be read.
func (h *host) diskseq(dev string) string {
	b, err := fs.ReadFile(h.sys, "sys/class/block/"+dev+"/diskseq")
	if err != nil {
		parents, _ := fs.Glob(h.sys, "sys/block/*/"+dev+"/partition")
		if len(parents) != 1 {
			return ""
		}
		disk := strings.Split(parents[0], "/")[2]
		if b, err = fs.ReadFile(h.sys, "sys/block/"+disk+"/diskseq"); err != nil {
			return ""
		}
	}
	return strings.TrimSpace(string(b))
}

func (h *host) kernelName(dev string) (string, error) {
	p, err := h.resolve(dev)
	if err != nil {
		return "", err
	}
	name := filepath.Base(p)
	if !validKernelName(name) {
		return "", fmt.Errorf("%s: %w", dev, ErrNotBlockDevice)
	}
	if _, err := fs.Stat(h.sys, "sys/class/block/"+name); err != nil {
		return "", fmt.Errorf("%s: %w", dev, ErrNotBlockDevice)
	}
	return name, nil
}

// holders lists what holds a block device open in the kernel: md arrays,
// device-mapper tables.
func (h *host) holders(name string) []string {
	entries, err := fs.ReadDir(h.sys, "sys/class/block/"+name+"/holders")
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// readDeviceEnds reads the start and the end of a device with ordinary
// (cached) reads.
func readDeviceEnds(dev string, size uint64) (head, tail []byte, err error) {
	f, err := os.Open(dev)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	head = make([]byte, min(uint64(headSize), size))
	if _, err := io.ReadFull(f, head); err != nil {
		return nil, nil, fmt.Errorf("reading %s: %w", dev, err)
	}
	tail = make([]byte, min(uint64(tailSize), size))
	if _, err := f.ReadAt(tail, int64(size)-int64(len(tail))); err != nil && !errors.Is(err, io.EOF) {
		return nil, nil, fmt.Errorf("reading %s: %w", dev, err)
	}
	return head, tail, nil
}

// blankSpan is how much of each end of a device must read as zeroes for the
// watcher to call it blank: more than any signature we or blkid look for
// sits in, and what a disk freshly made for a leg (LVM zeroes the start of a
// new volume; a sparse file reads as zeroes) holds.
const blankSpan = 1 << 20

// deviceEndsZero reads the first and last blankSpan bytes of dev with
// O_DIRECT, so that the page cache cannot answer with what an earlier
// volume on the same /dev/nbdN held.
func deviceEndsZero(dev string, size uint64) (bool, error) {
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Errorf("opening %s: %w", dev, err)
	}
	defer unix.Close(fd)
	n := min(uint64(blankSpan), size)
	// O_DIRECT wants an aligned buffer: an anonymous mapping is page-aligned.
	buf, err := unix.Mmap(-1, 0, int(n), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return false, fmt.Errorf("reading %s: %w", dev, err)
	}
	defer unix.Munmap(buf)
	for _, off := range []uint64{0, size - n} {
		got, err := unix.Pread(fd, buf, int64(off))
		if err != nil {
			return false, fmt.Errorf("reading %s at %d: %w", dev, off, err)
		}
		if uint64(got) != n {
			return false, fmt.Errorf("reading %s at %d: %d of %d bytes", dev, off, got, n)
		}
		if !allZero(buf) {
			return false, nil
		}
	}
	return true, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// probeResult is what a readability probe found.
type probeResult int

const (
	probePending    probeResult = iota // no answer yet: ask again later
	probeReadable                      // a direct read succeeded
	probeUnreadable                    // the read failed or the device is gone
)

func (r probeResult) String() string {
	switch r {
	case probeReadable:
		return "readable"
	case probeUnreadable:
		return "unreadable"
	}
	return "pending"
}

// prober checks whether a device answers reads.
type prober interface {
	probe(dev string) probeResult
}

// readProber reads one block of a device with O_DIRECT, so the page cache
// cannot answer for a dead device. A read of a dead NBD leg can block for
// the kernel's dead-connection timeout, and a thread in such a read cannot
// be interrupted, so each device has at most one read in flight: probe
// waits up to timeout for it and otherwise answers pending, and the next
// call collects the result. A result that came in more than maxAge before
// that call is thrown away and the device read again: the device may have
// died, or come back, since.
type readProber struct {
	timeout time.Duration
	// maxAge is the oldest answer taken: the watcher makes it a look's
	// interval and a timeout, what a slow read collected at the next look
	// can be.
	maxAge time.Duration
	read   func(dev string) probeResult // readOneBlock; tests replace it
	mu     sync.Mutex
	flying map[string]chan probeAnswer
}

// probeAnswer is a read's result and when it came.
type probeAnswer struct {
	result probeResult
	at     time.Time
}

func newReadProber(timeout time.Duration) *readProber {
	return &readProber{timeout: timeout, maxAge: timeout, read: readOneBlock, flying: make(map[string]chan probeAnswer)}
}

func (p *readProber) probe(dev string) probeResult {
	for {
		p.mu.Lock()
		ch, earlier := p.flying[dev]
		if !earlier {
			ch = make(chan probeAnswer, 1) // the reader never blocks on a gone caller
			p.flying[dev] = ch
			go func() {
				r := p.read(dev)
				ch <- probeAnswer{r, time.Now()}
			}()
		}
		p.mu.Unlock()
		t := time.NewTimer(p.timeout)
		select {
		case a := <-ch:
			t.Stop()
			p.mu.Lock()
			delete(p.flying, dev)
			p.mu.Unlock()
			if earlier && time.Since(a.at) > p.maxAge {
				continue // stale: read it again, once
			}
			return a.result
		case <-t.C:
			return probePending
		}
	}
}

func readOneBlock(dev string) probeResult {
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return probeUnreadable
	}
	defer unix.Close(fd)
	// O_DIRECT wants an aligned buffer: an anonymous mapping is page-aligned.
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return probeUnreadable
	}
	defer unix.Munmap(buf)
	n, err := unix.Pread(fd, buf, 0)
	if err != nil || n != 4096 {
		return probeUnreadable
	}
	return probeReadable
}

// clock is the watcher's time source; tests drive their own.
type clock interface {
	Now() time.Time
	// After delivers the time once d has passed.
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// mountOf finds where the block device with number majmin (such as 9:127)
// is mounted, from /proc/self/mountinfo.
func (h *host) mountOf(majmin string) (mountpoint, fstype string, err error) {
	b, err := fs.ReadFile(h.sys, "proc/self/mountinfo")
	if err != nil {
		return "", "", err
	}
	mounts, err := ParseMountinfo(b)
	if err != nil {
		return "", "", err
	}
	for _, m := range mounts {
		if m.DevNumber == majmin && m.Root == "/" {
			return m.Mountpoint, m.FSType, nil
		}
	}
	return "", "", nil
}

// contextWithTimeout bounds one command of the watcher: a command stuck on
// a dead device must not hold up the others forever.
func contextWithTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, 2*time.Minute)
}

// devPath is the /dev path of a kernel block device name.
func devPath(name string) string {
	if strings.HasPrefix(name, "/") {
		return name
	}
	return "/dev/" + name
}

// readSysString reads one sysfs attribute, trimmed.
func readSysString(sys fs.FS, name string) (string, error) {
	b, err := fs.ReadFile(sys, name)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// openExclusive opens dev read-only with O_EXCL, as mdadm --create opens
// its legs, and closes it.
func openExclusive(dev string) error {
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open exclusively", Path: dev, Err: err}
	}
	return unix.Close(fd)
}
