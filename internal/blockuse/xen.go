// Package blockuse finds who uses a block device in ways the kernel's
// exclusive open does not report.
package blockuse

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// XenBackends names the Xen block backends (blkback) serving a device of
// devnums ("43:64" -> "nbd2") to a guest. blkback opens its disk without
// becoming a holder, so only its own records tell: in
// drivers/block/xen-blkback/xenbus.c, each backend device (named vbd-DOMID-
// DEVID on the xen-backend bus) gets a physical_device file once it has
// opened its disk, VBD_SHOW(physical_device, "%x:%x\n", be->major,
// be->minor): the numbers in hex. Without Xen the directory is absent.
func XenBackends(sysRoot string, devnums map[string]string) ([]string, error) {
	vbds, err := filepath.Glob(filepath.Join(sysRoot, "bus", "xen-backend", "devices", "vbd-*"))
	if err != nil {
		return nil, err
	}
	var users []string
	for _, vbd := range vbds {
		b, err := os.ReadFile(filepath.Join(vbd, "physical_device"))
		if errors.Is(err, os.ErrNotExist) {
			continue // not connected to a disk yet
		}
		if err != nil {
			return nil, fmt.Errorf("reading xen-backend %s: %w", filepath.Base(vbd), err)
		}
		var major, minor uint32
		if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%x:%x", &major, &minor); err != nil {
			return nil, fmt.Errorf("xen-backend %s: physical_device %q is not MAJOR:MINOR in hex: %w",
				filepath.Base(vbd), strings.TrimSpace(string(b)), err)
		}
		name, ok := devnums[fmt.Sprintf("%d:%d", major, minor)]
		if !ok {
			continue
		}
		backend := filepath.Base(vbd)
		if f := strings.Split(backend, "-"); len(f) == 3 {
			users = append(users, fmt.Sprintf("%s given to Xen domain %s by %s, taken back with 'xl block-detach %s %s'",
				name, f[1], backend, f[1], f[2]))
		} else {
			users = append(users, fmt.Sprintf("%s given to a Xen guest by %s", name, backend))
		}
	}
	return users, nil
}
