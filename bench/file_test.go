package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/looptest"
)

// mountExt4 makes an ext4 file system on dev and mounts it until the test
// ends; it returns the mount point.
func mountExt4(t *testing.T, dev string) string {
	t.Helper()
	looptest.Require(t, "mkfs.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", dev).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 %s: %v: %s", dev, err, out)
	}
	dir := t.TempDir()
	if err := unix.Mount(dev, dir, "ext4", 0, ""); err != nil {
		t.Fatalf("mounting %s on %s: %v", dev, dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmounting %s: %v", dir, err)
		}
	})
	return dir
}

// openRefused calls OpenFile expecting a refusal; a file it opens anyway is
// closed, so that a failing test still unmounts and detaches its devices.
func openRefused(path string, o OpenOptions) error {
	f, err := OpenFile(path, o)
	if err == nil {
		f.Close()
	}
	return err
}

// A write run must never write over a device the kernel says is in use:
// mounted, or held by md or dm. --force does not change that, and every
// message names the device a symlink leads to.
func TestWriteRefusesDeviceInUse(t *testing.T) {
	dev, backing := looptest.Attach(t, 4<<20, 0)
	link := filepath.Join(t.TempDir(), "by-id-disk")
	if err := os.Symlink(dev, link); err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile(backing)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("held exclusively", func(t *testing.T) {
		// What a mount, md or dm does to it: an exclusive open.
		hold, err := unix.Open(dev, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(hold)
		err = openRefused(link, OpenOptions{Write: true, Force: true})
		if !errors.Is(err, ErrDeviceBusy) || !errors.Is(err, unix.EBUSY) {
			t.Fatalf("forced write to a device in use: %v, want ErrDeviceBusy", err)
		}
		for _, want := range []string{link + " (" + dev + ")", "in use", "mounted", "md array", "unmount or stop it first", "--force does not override"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not say %q", err, want)
			}
		}
		// Without --force it is still refused as in use, not offered
		// to --force, which could not write it.
		if err := openRefused(link, OpenOptions{Write: true}); !errors.Is(err, ErrDeviceBusy) {
			t.Errorf("write without force to a device in use: %v, want ErrDeviceBusy", err)
		}
		// Reading it is harmless and allowed.
		r, err := OpenFile(link, OpenOptions{})
		if err != nil {
			t.Fatalf("reading a device in use: %v", err)
		}
		r.Close()
	})

	t.Run("open in another program", func(t *testing.T) {
		// What lvnbd serve (exporting the LV), qemu or another bench
		// does: an open that claims nothing, which O_EXCL cannot see.
		f, err := os.Open(dev)
		if err != nil {
			t.Fatal(err)
		}
		holder := exec.Command("sleep", "infinity")
		holder.ExtraFiles = []*os.File{f}
		if err := holder.Start(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		defer func() {
			holder.Process.Kill()
			holder.Wait()
		}()
		err = openRefused(link, OpenOptions{Write: true, Force: true})
		want := fmt.Sprintf("%s is open in sleep (pid %d)", filepath.Base(dev), holder.Process.Pid)
		if !errors.Is(err, ErrDeviceBusy) || !strings.Contains(err.Error(), want) {
			t.Fatalf("forced write to a device another program has open: %v, want ErrDeviceBusy saying %q", err, want)
		}
	})

	t.Run("mounted", func(t *testing.T) {
		dev, _ := looptest.Attach(t, 16<<20, 0)
		dir := mountExt4(t, dev)
		err := openRefused(dev, OpenOptions{Write: true, Force: true})
		if !errors.Is(err, ErrDeviceBusy) || !strings.Contains(err.Error(), "mounted on "+dir) {
			t.Fatalf("forced write to a mounted device: %v, want ErrDeviceBusy saying it is mounted on %s", err, dir)
		}
	})

	t.Run("refusal without force names the device", func(t *testing.T) {
		err := openRefused(link, OpenOptions{Write: true})
		want := "refusing to write to block device " + link + " (" + dev + ", 4.0 MiB, 4194304 bytes)"
		if !errors.Is(err, ErrOverwrite) || !strings.Contains(err.Error(), want) {
			t.Errorf("write without force: %v, want %q", err, want)
		}
	})

	if got, _ := os.ReadFile(backing); !bytes.Equal(got, before) {
		t.Fatal("a refused run wrote to the device")
	}

	t.Run("free device with force says what it overwrites", func(t *testing.T) {
		f, err := OpenFile(link, OpenOptions{Write: true, Force: true, Size: 1 << 20, Direct: true})
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		var notices bytes.Buffer
		mustRun(t, f, Config{Mode: ModeWrite, BlockSize: 64 << 10, QueueDepth: 2, Verify: true, Notices: &notices})
		want := "overwriting block device " + link + " (" + dev + "): 1048576 bytes (1.0 MiB) from offset 0\n"
		if notices.String() != want {
			t.Errorf("notice %q, want %q", notices.String(), want)
		}
	})
}

// closeEvents drains the inotify descriptor fd and counts the closes of
// descriptors opened for writing and of the others.
func closeEvents(t *testing.T, fd int) (writable, readOnly int) {
	t.Helper()
	buf := make([]byte, 4096)
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EAGAIN) {
			return writable, readOnly
		}
		if err != nil {
			t.Fatal(err)
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			if ev.Mask&unix.IN_CLOSE_WRITE != 0 {
				writable++
			}
			if ev.Mask&unix.IN_CLOSE_NOWRITE != 0 {
				readOnly++
			}
			off += unix.SizeofInotifyEvent + int(ev.Len)
		}
	}
}

// A run that may not write never opens its target writable: the --force
// decision is made on a read-only descriptor.
func TestOpenFileWritableOnlyWhenAllowed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "full.img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	in, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(in)
	if _, err := unix.InotifyAddWatch(in, path, unix.IN_CLOSE_WRITE|unix.IN_CLOSE_NOWRITE); err != nil {
		t.Fatal(err)
	}

	if err := openRefused(path, OpenOptions{Write: true}); !errors.Is(err, ErrOverwrite) {
		t.Fatalf("write without force: %v, want ErrOverwrite", err)
	}
	if w, r := closeEvents(t, in); w != 0 || r == 0 {
		t.Errorf("a refused write run closed %d writable and %d read-only descriptors; want none writable", w, r)
	}
	f, err := OpenFile(path, OpenOptions{Write: true, Force: true})
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if w, _ := closeEvents(t, in); w != 1 {
		t.Errorf("a forced write run closed %d writable descriptors, want 1", w)
	}
}

// The file reopened for writing must be the one looked at: one swapped in
// between is refused, not written.
func TestOpenFileRefusesSwappedFile(t *testing.T) {
	dir := t.TempDir()
	path, other := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	for _, p := range []string{path, other} {
		if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	swap := func() {
		if err := os.Rename(other, path); err != nil {
			t.Fatal(err)
		}
	}
	f, err := openFile(path, OpenOptions{Write: true, Force: true}, swap)
	if err == nil {
		f.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "was replaced while it was being opened") {
		t.Errorf("write to a file swapped while opening: %v, want a refusal", err)
	}
}

func TestDioAlign(t *testing.T) {
	tests := []struct {
		name            string
		stx             unix.Statx_t
		err             error
		offset, mem     int
		directSupported bool
	}{
		{name: "old kernel", err: unix.ENOSYS, offset: 512, mem: 4096, directSupported: true},
		{name: "not reported", offset: 512, mem: 4096, directSupported: true},
		{name: "4Kn disk", stx: unix.Statx_t{Mask: unix.STATX_DIOALIGN, Dio_offset_align: 4096, Dio_mem_align: 512}, offset: 4096, mem: 4096, directSupported: true},
		{name: "512e disk", stx: unix.Statx_t{Mask: unix.STATX_DIOALIGN, Dio_offset_align: 512, Dio_mem_align: 4}, offset: 512, mem: 4096, directSupported: true},
		{name: "memory aligned over a page", stx: unix.Statx_t{Mask: unix.STATX_DIOALIGN, Dio_offset_align: 512, Dio_mem_align: 8192}, offset: 512, mem: 8192, directSupported: true},
		{name: "no direct I/O on this file", stx: unix.Statx_t{Mask: unix.STATX_DIOALIGN}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			offset, mem, ok := dioAlign(&tt.stx, tt.err)
			if offset != tt.offset || mem != tt.mem || ok != tt.directSupported {
				t.Errorf("dioAlign = %d, %d, %v; want %d, %d, %v", offset, mem, ok, tt.offset, tt.mem, tt.directSupported)
			}
		})
	}
}

// On a disk of 4096-byte sectors direct I/O on a file needs 4096-byte
// requests: statx says so, and a run of 512-byte ones is refused before the
// file is made instead of failing with EINVAL mid-run.
func TestDirectAlignmentFromStatx(t *testing.T) {
	dev, _ := looptest.Attach(t, 64<<20, 4096)
	dir := mountExt4(t, dev)
	path := filepath.Join(dir, "disk.img")
	cfg := Config{Mode: ModeWrite, BlockSize: 512, QueueDepth: 1, Verify: true}
	err := openRefused(path, OpenOptions{Write: true, Size: 1 << 20, Direct: true, Validate: cfg.Validate})
	if err == nil || !strings.Contains(err.Error(), "not a multiple of 4096") {
		t.Fatalf("512-byte direct writes on a 4Kn file system: %v, want a refusal", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused run left %s behind: %v", path, err)
	}
	f, err := OpenFile(path, OpenOptions{Write: true, Size: 1 << 20, Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Alignment() != 4096 {
		t.Errorf("alignment %d on a 4Kn file system, want 4096", f.Alignment())
	}
	cfg.BlockSize = 4096
	if rep := mustRun(t, f, cfg); !rep.Verify.OK {
		t.Errorf("4096-byte direct writes: verify %+v", rep.Verify)
	}
}

// A run whose settings its new file cannot take (an unaligned --size with
// O_DIRECT) leaves no file behind.
func TestCreateValidatesBeforeSizing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "new.img")
	refuse := errors.New("refused")
	var gotSize int64
	var gotAlign int
	err := openRefused(path, OpenOptions{Write: true, Size: 1000, Validate: func(size int64, align int) error {
		gotSize, gotAlign = size, align
		return refuse
	}})
	if !errors.Is(err, refuse) || gotSize != 1000 || gotAlign != 1 {
		t.Errorf("OpenFile = %v, validated %d bytes aligned to %d; want the refusal, 1000 and 1", err, gotSize, gotAlign)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused run left %s behind: %v", path, err)
	}
}

// droppingWrites loses every write, as a broken cache or a lying disk would.
type droppingWrites struct{ Target }

func (droppingWrites) WriteAt(context.Context, []byte, int64, bool) error { return nil }

// A write run whose writes never reach storage fails its verify even where
// an earlier run left its own pattern there: each run draws a fresh seed.
func TestVerifyFreshSeedPerRun(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	f := openTestFile(t, path, OpenOptions{Write: true, Size: 1 << 20})
	cfg := Config{Mode: ModeWrite, BlockSize: 64 << 10, QueueDepth: 2, Verify: true}
	first := mustRun(t, f, cfg)
	if !first.Verify.OK {
		t.Fatalf("first run: verify %+v", first.Verify)
	}
	if first.Seed == 0 {
		t.Error("the first run reports seed 0, not the one it drew")
	}
	rep, err := Run(context.Background(), droppingWrites{f}, cfg)
	var m *MismatchError
	if !errors.As(err, &m) || rep.Verify.OK {
		t.Errorf("a run whose writes were lost: err %v, verify %+v (seed %d, first %d); want a mismatch", err, rep.Verify, rep.Seed, first.Seed)
	}
	// The first run's data reads back by the seed it reported.
	rep = mustRun(t, f, Config{Mode: ModeRead, BlockSize: 1 << 20, QueueDepth: 1, Verify: true, Seed: first.Seed})
	if !rep.Verify.OK || rep.Seed != first.Seed {
		t.Errorf("reading back by the reported seed %d: seed %d, verify %+v", first.Seed, rep.Seed, rep.Verify)
	}
}

// residentPages counts the pages of path's first size bytes in the page
// cache.
func residentPages(t testing.TB, path string, size int) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (size+os.Getpagesize()-1)/os.Getpagesize())
	// x/sys has no Mincore for Linux.
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(size), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatalf("mincore: %v", errno)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}

// cacheWatch records how many of the file's pages were cached when the
// verify began (the first read after the flush).
type cacheWatch struct {
	*File
	t        testing.TB
	path     string
	size     int
	flushed  bool
	once     sync.Once
	resident int
}

func (c *cacheWatch) Flush(ctx context.Context) error {
	c.flushed = true
	return c.File.Flush(ctx)
}

func (c *cacheWatch) ReadAt(ctx context.Context, p []byte, off int64) error {
	if c.flushed {
		c.once.Do(func() { c.resident = residentPages(c.t, c.path, c.size) })
	}
	return c.File.ReadAt(ctx, p, off)
}

// With --direct=false the verify reads what storage holds, not the pages
// the run just wrote into the cache.
func TestVerifyBypassesPageCache(t *testing.T) {
	dir := pageCachedDir(t)
	const size = 1 << 20
	path := filepath.Join(dir, "disk.img")
	f, err := OpenFile(path, OpenOptions{Write: true, Size: size})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n := residentPages(t, path, size); n != 0 {
		t.Logf("%d pages cached before the run", n)
	}
	w := &cacheWatch{File: f, t: t, path: path, size: size, resident: -1}
	mustRun(t, w, Config{Mode: ModeWrite, BlockSize: 64 << 10, QueueDepth: 1, Verify: true})
	if w.resident != 0 {
		t.Errorf("%d of the file's pages were cached when the verify began, want 0", w.resident)
	}
}

// pageCachedDir is a directory on a file system whose storage is not the
// page cache: the temporary directory, or where that is tmpfs or ramfs
// (Debian 13's /tmp), an ext4 on a loop device.
func pageCachedDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		t.Fatal(err)
	}
	if fs.Type != unix.TMPFS_MAGIC && fs.Type != unix.RAMFS_MAGIC {
		return dir
	}
	t.Logf("%s is in memory; using an ext4 on a loop device", dir)
	return looptest.Mount(t, 16<<20, "ext4", "-q")
}

// corruptingBacking changes a byte of a loop device's backing file behind
// the device's page cache once the run has flushed, as a disk that lost a
// write would.
type corruptingBacking struct {
	*File
	backing string
	at      int64
}

func (c *corruptingBacking) Flush(ctx context.Context) error {
	if err := c.File.Flush(ctx); err != nil {
		return err
	}
	fd, err := os.OpenFile(c.backing, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer fd.Close()
	b := make([]byte, 1)
	if _, err := fd.ReadAt(b, c.at); err != nil {
		return err
	}
	b[0] ^= 0xff
	_, err = fd.WriteAt(b, c.at)
	return err
}

func TestVerifyBypassesDeviceCache(t *testing.T) {
	dev, backing := looptest.Attach(t, 4<<20, 0)
	f, err := OpenFile(dev, OpenOptions{Write: true, Force: true})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const bad = 3<<20 + 5
	_, err = Run(context.Background(), &corruptingBacking{File: f, backing: backing, at: bad},
		Config{Mode: ModeWrite, BlockSize: 64 << 10, QueueDepth: 4, Verify: true})
	var m *MismatchError
	if !errors.As(err, &m) || m.Offset != bad {
		t.Errorf("verify after the device's storage changed under its cache: %v, want a mismatch at %d", err, bad)
	}
}

// OpenFile asks the kernel about RWF_DSYNC at the end of the file, where a
// probe read is taken even with O_DIRECT: a probe that failed would turn
// every durable write into a write and an fdatasync, slower than the
// device is.
func TestOpenFileProbesDSync(t *testing.T) {
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing.img")
	if err := os.WriteFile(existing, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	dev, _ := looptest.Attach(t, 4<<20, 0)
	for _, tc := range []struct {
		name string
		path string
		o    OpenOptions
	}{
		{"device", dev, OpenOptions{Write: true, Force: true, Size: 1 << 20}},
		{"created", filepath.Join(dir, "new.img"), OpenOptions{Write: true, Size: 1 << 20}},
		{"existing", existing, OpenOptions{Write: true, Force: true}},
		{"existing, grown", existing, OpenOptions{Write: true, Force: true, Size: 2 << 20}},
		{"existing, read", existing, OpenOptions{}},
	} {
		for _, direct := range []bool{false, true} {
			o := tc.o
			o.Direct = direct
			if tc.name == "created" {
				os.Remove(tc.path)
			}
			f, err := OpenFile(tc.path, o)
			if direct && err != nil && strings.Contains(err.Error(), "does not support direct I/O") {
				continue // the temp dir's file system (tmpfs before 6.6)
			}
			if err != nil {
				t.Fatalf("%s, direct %v: %v", tc.name, direct, err)
			}
			if !f.dsync {
				t.Errorf("%s, direct %v: no RWF_DSYNC found", tc.name, direct)
			}
			if o.Write {
				if err := f.WriteAt(context.Background(), alignedBuffer(4096, bufferAlign), 0, true); err != nil {
					t.Errorf("%s, direct %v: durable write: %v", tc.name, direct, err)
				}
			}
			f.Close()
		}
	}
}
