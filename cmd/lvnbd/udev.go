package main

import (
	"os"
	"path/filepath"
)

// udevRule is the rule packaging/install.sh installs: it keeps udev's blkid,
// and with it mdadm's and LVM's udev rules, off the devices lvnbd attaches
// (packaging/udev/59-lvnbd.rules says why).
const udevRule = "59-lvnbd.rules"

// udevRuleDirs are the directories udev reads rules from.
var udevRuleDirs = []string{"/etc/udev/rules.d", "/run/udev/rules.d", "/usr/local/lib/udev/rules.d",
	"/usr/lib/udev/rules.d", "/lib/udev/rules.d"}

// udevRuleMissing reports whether udevd runs on the host under root ("" for
// this one) without lvnbd's rule: the host's mdadm would then assemble the
// guests' mirrors from the legs the daemon attaches, and hold them. A rule
// of that name masked by the administrator (a link to /dev/null in
// /etc/udev/rules.d) counts as there: that is a choice.
func udevRuleMissing(root string) bool {
	if _, err := os.Stat(filepath.Join(root, "/run/udev/control")); err != nil {
		return false // no udevd: nothing probes the devices
	}
	for _, dir := range udevRuleDirs {
		if _, err := os.Lstat(filepath.Join(root, dir, udevRule)); err == nil {
			return false
		}
	}
	return true
}
