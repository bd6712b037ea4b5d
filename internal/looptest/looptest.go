// Package looptest gives tests loop devices: real block devices over sparse
// files, for what a regular file cannot show (BLKGETSIZE64, O_EXCL, sector
// sizes, mounts). Only tests import it.
package looptest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Require skips the test without root, the loop driver and the tools named
// (losetup always), or fails it under LVNBD_REQUIRE_LOOP=1, which make test
// sets, so that CI cannot pass by skipping.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	tools = append([]string{"losetup"}, tools...)
	var err error
	for _, tool := range tools {
		if _, err = exec.LookPath(tool); err != nil {
			break
		}
	}
	if err == nil && os.Geteuid() != 0 {
		err = errors.New("not root")
	}
	if err == nil {
		_, err = os.Stat("/dev/loop-control")
	}
	if err != nil {
		msg := fmt.Sprintf("needs root, the loop driver and %v: %v", tools, err)
		if os.Getenv("LVNBD_REQUIRE_LOOP") == "1" {
			t.Fatal(msg + " [LVNBD_REQUIRE_LOOP=1 makes this a failure]")
		}
		t.Skip(msg)
	}
}

// Attach attaches a loop device over a sparse file of size bytes, with the
// logical sector size given (0: the default, 512), until the test ends; it
// returns the device and the file. It calls Require first.
func Attach(t testing.TB, size int64, sectorSize int) (dev, backing string) {
	t.Helper()
	Require(t)
	backing = filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(backing, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(backing, size); err != nil {
		t.Fatal(err)
	}
	return AttachFile(t, backing, sectorSize), backing
}

// AttachFile attaches a loop device over the file backing, which the test
// made (on a file system of its choice: the device's discard and zeroing
// follow the file's), with the logical sector size given (0: the default,
// 512), until the test ends, and returns the device. It calls Require
// first.
func AttachFile(t testing.TB, backing string, sectorSize int) (dev string) {
	t.Helper()
	Require(t)
	args := []string{"--find", "--show"}
	if sectorSize > 0 {
		args = append(args, "--sector-size", fmt.Sprint(sectorSize))
	}
	out, err := exec.Command("losetup", append(args, backing)...).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup %v %s: %v: %s", args, backing, err, out)
	}
	dev = strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// Mount makes a file system of type fstype (mkfs.FSTYPE with the arguments
// given, then the device) on a loop device of size bytes, mounts it on a new
// temporary directory and returns that directory; it is unmounted and the
// device detached when the test ends, whether it passed or not. It calls
// Require for mkfs.FSTYPE, mount and umount.
func Mount(t testing.TB, size int64, fstype string, mkfsArgs ...string) (dir string) {
	t.Helper()
	Require(t, "mkfs."+fstype, "mount", "umount")
	dev, _ := Attach(t, size, 0)
	return mountDevice(t, dev, fstype, mkfsArgs)
}

// MountFile is Mount on a loop device over the file backing, which the test
// made on a file system of its choice (one that runs out of room, say).
func MountFile(t testing.TB, backing, fstype string, mkfsArgs ...string) (dir string) {
	t.Helper()
	Require(t, "mkfs."+fstype, "mount", "umount")
	return mountDevice(t, AttachFile(t, backing, 0), fstype, mkfsArgs)
}

// mountDevice makes the file system on dev, mounts it on a new temporary
// directory, and unmounts it when the test ends.
func mountDevice(t testing.TB, dev, fstype string, mkfsArgs []string) (dir string) {
	t.Helper()
	mkfs := "mkfs." + fstype
	if out, err := exec.Command(mkfs, append(mkfsArgs, dev)...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v %s: %v: %s", mkfs, mkfsArgs, dev, err, out)
	}
	dir = t.TempDir()
	if out, err := exec.Command("mount", "-t", fstype, dev, dir).CombinedOutput(); err != nil {
		t.Fatalf("mount -t %s %s %s: %v: %s", fstype, dev, dir, err, out)
	}
	// Registered after the device's detach and t.TempDir's removal, so it
	// runs before both.
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}
