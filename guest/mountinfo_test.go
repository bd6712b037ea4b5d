package guest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseMountinfo(t *testing.T) {
	mounts, err := ParseMountinfo(readTestdata(t, "mountinfo.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) != 9 {
		t.Errorf("%d mounts, want 9", len(mounts))
	}
	want := Mount{DevNumber: "9:126", Root: "/", Mountpoint: "/tmp/vm-work/25-guest-mirror/mnt", FSType: "ext4", Source: "/dev/md/vm1"}
	if diff := cmp.Diff(want, mounts[len(mounts)-1]); diff != "" {
		t.Errorf("the mirror's mount (-want +got):\n%s", diff)
	}
	// Escapes, optional fields, a bind mount of a subdirectory.
	in := `36 35 98:0 /mnt1 /mnt/my\040data rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue
40 22 9:127 /sub /srv rw - xfs /dev/md127 rw`
	got, err := ParseMountinfo([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	wantAll := []Mount{
		{DevNumber: "98:0", Root: "/mnt1", Mountpoint: "/mnt/my data", FSType: "ext3", Source: "/dev/root"},
		{DevNumber: "9:127", Root: "/sub", Mountpoint: "/srv", FSType: "xfs", Source: "/dev/md127"},
	}
	if diff := cmp.Diff(wantAll, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	// Only space, tab, newline and backslash are escaped: other white
	// space is part of the path (found by FuzzParseMountinfo).
	odd, err := ParseMountinfo([]byte("41 22 9:127 / /mnt/a\fb\u00a0c rw - ext4 /dev/md127 rw"))
	if err != nil {
		t.Fatal(err)
	}
	wantOdd := []Mount{{DevNumber: "9:127", Root: "/", Mountpoint: "/mnt/a\fb\u00a0c", FSType: "ext4", Source: "/dev/md127"}}
	if diff := cmp.Diff(wantOdd, odd); diff != "" {
		t.Errorf("a path with a form feed and a no-break space (-want +got):\n%s", diff)
	}
	for _, bad := range []string{"1 2 3", "1 1 0:2 / / rw rootfs rootfs rw", `1 1 0:2 / /a\04 rw - x y z`, "1 1 02 / / rw - rootfs rootfs rw"} {
		if _, err := ParseMountinfo([]byte(bad)); !errors.Is(err, errSyntax) {
			t.Errorf("ParseMountinfo(%q) = %v, want a syntax error", bad, err)
		}
	}
}

func FuzzParseMountinfo(f *testing.F) {
	f.Add(readTestdata(f, "mountinfo.txt"))
	f.Add([]byte(`36 35 98:0 /mnt1 /mnt/my\040data rw master:1 - ext3 /dev/root rw`))
	f.Fuzz(func(t *testing.T, b []byte) {
		mounts, err := ParseMountinfo(b)
		if err != nil {
			return
		}
		var lines []string
		for _, m := range mounts {
			if strings.ContainsAny(m.Root+m.Mountpoint+m.Source+m.FSType, " \t\n\\") || m.FSType == "" || m.Root == "" {
				return // not writable back without escapes
			}
			lines = append(lines, fmt.Sprintf("1 1 %s %s %s rw - %s %s rw", m.DevNumber, m.Root, m.Mountpoint, m.FSType, m.Source))
		}
		again, err := ParseMountinfo([]byte(strings.Join(lines, "\n")))
		if err != nil || !cmp.Equal(mounts, again) {
			t.Errorf("round trip: %v, %v", again, err)
		}
	})
}

func TestParseDumpe2fs(t *testing.T) {
	got, err := ParseDumpe2fs(readTestdata(t, "dumpe2fs-h.txt"))
	if err != nil {
		t.Fatal(err)
	}
	want := Ext4Super{BlockCount: 64512, BlockSize: 1024, State: "clean"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if got.Bytes() != 63<<20 {
		t.Errorf("Bytes() = %d", got.Bytes())
	}
	for _, bad := range []string{"", "Block count: 10\n", "Block count: 10\nBlock size: 1000\n", "Block count: x\nBlock size: 1024\n"} {
		if _, err := ParseDumpe2fs([]byte(bad)); !errors.Is(err, errSyntax) {
			t.Errorf("ParseDumpe2fs(%q) = %v, want a syntax error", bad, err)
		}
	}
}

func FuzzParseDumpe2fs(f *testing.F) {
	f.Add(readTestdata(f, "dumpe2fs-h.txt"))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseDumpe2fs(b)
		if err != nil {
			return
		}
		again, err := ParseDumpe2fs(fmt.Appendf(nil, "Block count: %d\nBlock size: %d\nFilesystem state: %s\n", s.BlockCount, s.BlockSize, s.State))
		if err != nil || (again != s && strings.TrimSpace(s.State) == s.State) {
			t.Errorf("round trip: %+v, %v", again, err)
		}
	})
}

func TestDetectSignature(t *testing.T) {
	block := func(size int, patches map[int]string) []byte {
		b := make([]byte, size)
		for off, s := range patches {
			copy(b[off:], s)
		}
		return b
	}
	const size = 64 << 20
	md10 := ((size>>9 - 16) &^ 7) << 9
	md090 := (size &^ (64<<10 - 1)) - 64<<10
	tail := func(off int) []byte {
		return block(tailSize, map[int]string{off - (size - tailSize): "\xfc\x4e\x2b\xa9"})
	}
	tests := []struct {
		name       string
		head, tail []byte
		want       string
	}{
		{"blank", block(headSize, nil), block(tailSize, nil), ""},
		{"md 1.2", block(headSize, map[int]string{4096: "\xfc\x4e\x2b\xa9"}), nil, "md superblock 1.2"},
		{"md 1.1", block(headSize, map[int]string{0: "\xfc\x4e\x2b\xa9"}), nil, "md superblock 1.1"},
		{"md 1.0", block(headSize, nil), tail(md10), "md superblock 1.0"},
		{"md 0.90", block(headSize, nil), tail(md090), "md superblock 0.90"},
		{"ext4", block(headSize, map[int]string{1080: "\x53\xef"}), nil, "ext2/3/4 filesystem"},
		{"xfs", block(headSize, map[int]string{0: "XFSB"}), nil, "xfs filesystem"},
		{"btrfs", block(headSize, map[int]string{0x10040: "_BHRfS_M"}), nil, "btrfs filesystem"},
		{"luks", block(headSize, map[int]string{0: "LUKS\xba\xbe"}), nil, "LUKS encryption header"},
		{"lvm", block(headSize, map[int]string{512: "LABELONE", 536: "LVM2 001"}), nil, "LVM physical volume"},
		{"swap", block(headSize, map[int]string{4086: "SWAPSPACE2"}), nil, "swap space"},
		{"gpt", block(headSize, map[int]string{510: "\x55\xaa", 512: "EFI PART"}), nil, "GPT partition table"},
		{"mbr", block(headSize, map[int]string{510: "\x55\xaa"}), nil, "DOS partition table or boot sector"},
		{"short", []byte{1, 2}, []byte{3}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := detectSignature(tt.head, tt.tail, size); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

// Real filesystems made by the host's mkfs tools, where installed.
func TestDetectSignatureRealImages(t *testing.T) {
	for _, tool := range []struct {
		args []string
		want string
	}{
		{[]string{"mkfs.ext4", "-q", "-F"}, "ext2/3/4 filesystem"},
		{[]string{"mkfs.xfs", "-q", "-f"}, "xfs filesystem"},
		{[]string{"mkswap"}, "swap space"},
	} {
		t.Run(tool.args[0], func(t *testing.T) {
			if _, err := lookPath(tool.args[0]); err != nil {
				t.Skipf("%s is not installed", tool.args[0])
			}
			img := filepath.Join(t.TempDir(), "img")
			if err := os.WriteFile(img, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(img, 320<<20); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command(lookPathOrName(tool.args[0]), append(tool.args[1:], img)...).CombinedOutput(); err != nil {
				t.Fatalf("%s: %v\n%s", tool.args[0], err, out)
			}
			head, tail, err := readDeviceEnds(img, 320<<20)
			if err != nil {
				t.Fatal(err)
			}
			if got := detectSignature(head, tail, 320<<20); got != tool.want {
				t.Errorf("got %q, want %q", got, tool.want)
			}
		})
	}
}

func lookPathOrName(name string) string {
	if p, err := lookPath(name); err == nil {
		return p
	}
	return name
}

func FuzzDetectSignature(f *testing.F) {
	f.Add([]byte("XFSB"), []byte{}, uint64(1<<20))
	f.Add(make([]byte, 4100), make([]byte, 100), uint64(200<<10))
	f.Fuzz(func(t *testing.T, head, tail []byte, size uint64) {
		_ = detectSignature(head, tail, size) // must not panic on any input
	})
}
