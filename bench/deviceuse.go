package bench

import (
	"bufio"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/internal/blockuse"
)

// deviceUses says what holds the block device rdev (at resolved) so that an
// exclusive open failed, as far as /proc and /sys tell: where it or one of
// its partitions is mounted, the md and dm devices built on them, swap.
// With nothing found (another program's O_EXCL), it lists what it may be.
func deviceUses(rdev uint64, resolved string) string {
	devs := devicesOf(rdev, resolved)
	uses := mountsOf(devs)
	for _, num := range slices.Sorted(maps.Keys(devs)) {
		holders, _ := os.ReadDir("/sys/dev/block/" + num + "/holders")
		for _, h := range holders {
			uses = append(uses, fmt.Sprintf("%s is held by %s", devs[num], h.Name()))
		}
	}
	uses = append(uses, swapsOf(devs)...)
	if len(uses) == 0 {
		return "mounted, a member of an md array or device-mapper table (LVM), swap, or opened exclusively by another program"
	}
	return strings.Join(uses, "; ")
}

func devNumber(rdev uint64) string {
	return fmt.Sprintf("%d:%d", unix.Major(rdev), unix.Minor(rdev))
}

// mountsOf lists where the devices (by "major:minor") are mounted, from
// /proc/self/mountinfo: its third field is the device, its fifth the mount
// point.
func mountsOf(devs map[string]string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var uses []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		if name, ok := devs[fields[2]]; ok {
			uses = append(uses, fmt.Sprintf("%s is mounted on %s", name, fields[4]))
		}
	}
	return uses
}

// swapsOf lists the devices in use as swap, from /proc/swaps.
func swapsOf(devs map[string]string) []string {
	b, err := os.ReadFile("/proc/swaps")
	if err != nil {
		return nil
	}
	var uses []string
	for _, line := range strings.Split(string(b), "\n")[1:] {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(fields[0], &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
			continue
		}
		if name, ok := devs[devNumber(st.Rdev)]; ok {
			uses = append(uses, name+" is swap")
		}
	}
	return uses
}

// devicesOf returns the device rdev (at resolved) and its partitions, by
// "major:minor", with their names: "7:0" → "loop0".
func devicesOf(rdev uint64, resolved string) map[string]string {
	devs := map[string]string{devNumber(rdev): filepath.Base(resolved)}
	sys := "/sys/dev/block/" + devNumber(rdev)
	if entries, err := os.ReadDir(sys); err == nil {
		for _, e := range entries {
			if _, err := os.Stat(filepath.Join(sys, e.Name(), "partition")); err != nil {
				continue
			}
			if b, err := os.ReadFile(filepath.Join(sys, e.Name(), "dev")); err == nil {
				devs[strings.TrimSpace(string(b))] = e.Name()
			}
		}
	}
	return devs
}

// sharedUses finds the users of a device that an exclusive open does not
// see, because they open it without claiming it: programs (lvnbd serve
// exporting the LV, qemu, another bench), from every process's open
// descriptors under proc except skip's (this run's own), and Xen's block
// backend giving it to a guest, from sys. Both are checked as well as /proc
// and /sys let them be; an unreadable entry is passed over.
func sharedUses(proc, sys string, devs map[string]string, skip int) []string {
	uses := openersOf(proc, devs, skip)
	guests, err := blockuse.XenBackends(sys, devs)
	if err != nil {
		// Unknown is not unused: this check guards a write.
		guests = []string{fmt.Sprintf("cannot tell whether it is a Xen guest's disk: %v", err)}
	}
	return append(uses, guests...)
}

// openersOf lists the processes under proc, except skip, with one of devs
// open. Only descriptors whose link names a path under /dev are looked at
// (with stat, to compare device numbers): a stat of anything else, a file
// on a dead NFS server, could hang.
func openersOf(proc string, devs map[string]string, skip int) []string {
	entries, err := os.ReadDir(proc)
	if err != nil {
		return nil
	}
	var uses []string
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == skip {
			continue
		}
		fdDir := filepath.Join(proc, e.Name(), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue // gone, or a kernel thread's
		}
		seen := map[string]bool{}
		for _, fd := range fds {
			fdPath := filepath.Join(fdDir, fd.Name())
			target, err := os.Readlink(fdPath)
			if err != nil || !strings.HasPrefix(target, "/dev/") {
				continue
			}
			var st unix.Stat_t
			if unix.Stat(fdPath, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
				continue
			}
			name, ok := devs[devNumber(st.Rdev)]
			if !ok || seen[name] {
				continue
			}
			seen[name] = true
			comm, _ := os.ReadFile(filepath.Join(proc, e.Name(), "comm"))
			uses = append(uses, fmt.Sprintf("%s is open in %s (pid %d)", name, strings.TrimSpace(string(comm)), pid))
		}
	}
	return uses
}
