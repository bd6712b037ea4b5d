package guest

import (
	"context"
	"errors"
	"io/fs"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"
)

const (
	legA = "/dev/nbd0"
	legB = "/dev/nbd1"
)

var createArgs = []string{"mdadm", "--create", "/dev/md/vm1", "--run", "--level=1", "--raid-devices=2",
	"--metadata=1.2", "--bitmap=internal", "--failfast", legA, legB}

func examineBlank(dev string) call {
	return call{args: []string{"mdadm", "--examine", "--export", dev},
		err: cmdError([]string{"mdadm", "--examine", "--export", dev}, 1, "mdadm: No md superblock detected on "+dev+".")}
}

// createHost is a host with two blank 64 MiB legs and the captured mounts.
func createHost(t *testing.T) (*host, fstest.MapFS, *fakeRunner) {
	h, fsys, r, _, _ := testHost(t)
	blockDev(fsys, "nbd0", 64<<20, "43:0")
	blockDev(fsys, "nbd1", 64<<20, "43:32")
	fsys["proc/self/mountinfo"] = &fstest.MapFile{Data: readTestdata(t, "mountinfo.txt")}
	return h, fsys, r
}

func TestCreate(t *testing.T) {
	h, _, r := createHost(t)
	r.expect(examineBlank(legA), examineBlank(legB),
		call{args: createArgs},
		call{args: []string{"mkfs.ext4", "-q", "-F", "/dev/md/vm1"}})
	got, err := h.create(context.Background(), CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}, Filesystem: "ext4"})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(Created{Path: "/dev/md/vm1"}, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// A leg given by a link is looked at, and handed to mdadm, as the device
// the link led to when it was resolved: a link re-pointed in between, or a
// name mdadm would take for an option, cannot put another device in the
// array than the one inspected.
func TestCreateGivesMdadmTheInspectedDevices(t *testing.T) {
	h, fsys, r := createHost(t)
	symlink(fsys, "/dev/disk/by-id/leg-a", legA)
	symlink(fsys, "-leg-b", legB)
	var exclusive []string
	h.exclusive = func(dev string) error { exclusive = append(exclusive, dev); return nil }
	r.expect(examineBlank(legA), examineBlank(legB), call{args: createArgs})
	if _, err := h.create(context.Background(), CreateOptions{Name: "vm1", Devices: [2]string{"/dev/disk/by-id/leg-a", "-leg-b"}}); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{legA, legB}, exclusive); diff != "" {
		t.Errorf("opened exclusively (-want +got):\n%s", diff)
	}
}

func TestCreateBitmapChunk(t *testing.T) {
	h, _, r := createHost(t)
	args := append(append([]string{}, createArgs[:8]...), "--bitmap-chunk=1024K")
	args = append(args, createArgs[8:]...)
	r.expect(examineBlank(legA), examineBlank(legB), call{args: args})
	if _, err := h.create(context.Background(), CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}, BitmapChunk: 1 << 20}); err != nil {
		t.Fatal(err)
	}
}

func TestCreateRefusesData(t *testing.T) {
	member := string(readTestdata(t, "examine-export-stale.txt"))
	ext4 := func(dev string, size uint64) ([]byte, []byte, error) {
		head := make([]byte, headSize)
		if dev == legB {
			copy(head[1080:], "\x53\xef")
		}
		return head, make([]byte, tailSize), nil
	}
	want := []string{
		`/dev/nbd0: md superblock of array "vm1" (UUID e4264e04:4d189632:3ebccc7b:b2168f02, raid1)`,
		"/dev/nbd1: ext2/3/4 filesystem",
	}
	t.Run("refused", func(t *testing.T) {
		h, _, r := createHost(t)
		h.readEnds = ext4
		r.expect(call{args: []string{"mdadm", "--examine", "--export", legA}, stdout: member}, examineBlank(legB))
		_, err := h.create(context.Background(), CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}})
		if !errors.Is(err, ErrHasData) {
			t.Fatalf("error %v, want ErrHasData", err)
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q does not say %q", err, w)
			}
		}
	})
	t.Run("force", func(t *testing.T) {
		h, _, r := createHost(t)
		h.readEnds = ext4
		r.expect(call{args: []string{"mdadm", "--examine", "--export", legA}, stdout: member}, examineBlank(legB), call{args: createArgs})
		got, err := h.create(context.Background(), CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}, Force: true})
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(Created{Path: "/dev/md/vm1", Overwritten: want}, got); diff != "" {
			t.Errorf("(-want +got):\n%s", diff)
		}
	})
	t.Run("data without a signature", func(t *testing.T) {
		h, _, r := createHost(t)
		h.readEnds = func(dev string, size uint64) ([]byte, []byte, error) {
			tail := make([]byte, tailSize)
			if dev == legB {
				copy(tail[len(tail)-4096:], "some guest's data, in no format anyone knows")
			}
			return make([]byte, headSize), tail, nil
		}
		r.expect(examineBlank(legA), examineBlank(legB))
		_, err := h.create(context.Background(), CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}})
		if !errors.Is(err, ErrHasData) || !strings.Contains(err.Error(), "/dev/nbd1: no signature of a known format, but its first or last MiB is not zeroes") {
			t.Errorf("create over raw data: %v, want ErrHasData naming /dev/nbd1", err)
		}
	})
	t.Run("blkid", func(t *testing.T) {
		h, _, r := createHost(t)
		h.have = func(name string) bool { return name == "blkid" }
		blkid := func(dev string) []string { return []string{"blkid", "-p", "-o", "export", dev} }
		r.expect(examineBlank(legA), call{args: blkid(legA), err: cmdError(blkid(legA), 2, "")},
			examineBlank(legB), call{args: blkid(legB), stdout: "DEVNAME=/dev/nbd1\nPTUUID=1234\nPTTYPE=dos\n"})
		_, err := h.create(context.Background(), CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}})
		if !errors.Is(err, ErrHasData) || !strings.Contains(err.Error(), "/dev/nbd1: dos partition table signature (blkid)") {
			t.Errorf("error %v, want the dos partition table named", err)
		}
	})
	t.Run("blkid finds several signatures", func(t *testing.T) {
		// blkid -p exits 8 for an ambivalent probe: data all the same,
		// which --force may overwrite, not a failure of blkid's.
		h, _, r := createHost(t)
		h.have = func(name string) bool { return name == "blkid" }
		blkid := func(dev string) []string { return []string{"blkid", "-p", "-o", "export", dev} }
		r.expect(examineBlank(legA), call{args: blkid(legA), err: cmdError(blkid(legA), 8, "")},
			examineBlank(legB), call{args: blkid(legB), err: cmdError(blkid(legB), 2, "")})
		_, err := h.create(context.Background(), CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}})
		if !errors.Is(err, ErrHasData) || !strings.Contains(err.Error(), "/dev/nbd0: several signatures at once") {
			t.Errorf("error %v, want ErrHasData naming /dev/nbd0's several signatures", err)
		}
	})
	t.Run("blkid fails", func(t *testing.T) {
		h, _, r := createHost(t)
		h.have = func(name string) bool { return name == "blkid" }
		blkid := []string{"blkid", "-p", "-o", "export", legA}
		r.expect(examineBlank(legA), call{args: blkid, err: cmdError(blkid, 4, "blkid: error: /dev/nbd0: Input/output error")})
		if _, err := h.create(context.Background(), CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}}); err == nil ||
			!strings.Contains(err.Error(), "Input/output error") {
			t.Errorf("error %v, want blkid's", err)
		}
	})
}

func TestCreateRefusals(t *testing.T) {
	tests := []struct {
		name  string
		opts  CreateOptions
		setup func(fstest.MapFS)
		busy  bool // the kernel refuses an exclusive open of leg a
		want  error
		say   string
	}{
		{name: "bad name", opts: CreateOptions{Name: "../x", Devices: [2]string{legA, legB}}, want: ErrInvalidName},
		{name: "long name", opts: CreateOptions{Name: strings.Repeat("x", 33), Devices: [2]string{legA, legB}}, want: ErrInvalidName},
		{name: "bad filesystem", opts: CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}, Filesystem: "ntfs"}, say: `filesystem "ntfs"`},
		{name: "bad chunk", opts: CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}, BitmapChunk: 3000}, say: "power of two"},
		{name: "not a device", opts: CreateOptions{Name: "vm1", Devices: [2]string{"/dev/nbd9", legB}}, want: ErrNotBlockDevice},
		{name: "same device", opts: CreateOptions{Name: "vm1", Devices: [2]string{legA, "/dev/disk/leg"}},
			setup: func(fsys fstest.MapFS) { symlink(fsys, "/dev/disk/leg", legA) }, say: "same device nbd0"},
		{name: "running array", opts: CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}}, want: ErrExists,
			setup: func(fsys fstest.MapFS) {
				symlink(fsys, "/dev/md/vm1", "/dev/md127")
				blockDev(fsys, "md127", 63<<20, "9:127")
				fsys["sys/block/md127/md/array_state"] = &fstest.MapFile{Data: []byte("clean\n")}
			}},
		{name: "held", opts: CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}}, want: ErrInUse, say: "by md127",
			setup: func(fsys fstest.MapFS) { fsys["sys/class/block/nbd0/holders/md127"] = &fstest.MapFile{} }},
		{name: "mounted", opts: CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}}, want: ErrInUse,
			say:   "mounted on /tmp/vm-work/25-guest-mirror/mnt",
			setup: func(fsys fstest.MapFS) { blockDev(fsys, "nbd0", 64<<20, "9:126") }},
		// A mounted partition, swap, another namespace's mount: the
		// kernel's exclusive open tells.
		{name: "held where sysfs does not show", opts: CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}}, busy: true,
			want: ErrInUse, say: "refuses to open it exclusively"},
		{name: "no size", opts: CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}}, say: "is it attached",
			setup: func(fsys fstest.MapFS) { blockDev(fsys, "nbd0", 0, "43:0") }},
		{name: "sizes differ", opts: CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}},
			say:   "/dev/nbd0 is 64 MiB (67108864 bytes) and /dev/nbd1 96 MiB (100663296 bytes): the legs of a mirror must be the same size",
			setup: func(fsys fstest.MapFS) { blockDev(fsys, "nbd1", 96<<20, "43:32") }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, fsys, _ := createHost(t) // the runner expects no command
			if tt.setup != nil {
				tt.setup(fsys)
			}
			if tt.busy {
				h.exclusive = func(dev string) error {
					return &fs.PathError{Op: "open exclusively", Path: dev, Err: unix.EBUSY}
				}
			}
			_, err := h.create(context.Background(), tt.opts)
			if err == nil {
				t.Fatal("no error")
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Errorf("error %v, want %v", err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.say) {
				t.Errorf("error %q does not say %q", err, tt.say)
			}
		})
	}
}

// A link left by an array stopped without udev does not make the name
// taken.
func TestCreateOverStaleLink(t *testing.T) {
	h, fsys, r := createHost(t)
	symlink(fsys, "/dev/md/vm1", "/dev/md127")
	blockDev(fsys, "md127", 0, "9:127")
	r.expect(examineBlank(legA), examineBlank(legB), call{args: createArgs})
	if _, err := h.create(context.Background(), CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}}); err != nil {
		t.Fatal(err)
	}
}

func TestCreateMkfsFails(t *testing.T) {
	h, _, r := createHost(t)
	mkfs := []string{"mkfs.xfs", "-q", "-f", "/dev/md/vm1"}
	r.expect(examineBlank(legA), examineBlank(legB), call{args: createArgs},
		call{args: mkfs, err: cmdError(mkfs, 1, "mkfs.xfs: not found")})
	got, err := h.create(context.Background(), CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}, Filesystem: "xfs"})
	if err == nil || !strings.Contains(err.Error(), "was created, but not its filesystem") || got.Path != "/dev/md/vm1" {
		t.Errorf("got %+v, %v", got, err)
	}
}
