package kernel

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Device is the state of one nbd device.
type Device struct {
	Index int `json:"index"`
	// Connected is NBD_DEVICE_CONNECTED: the kernel holds a configuration.
	// It stays true after a disconnect while someone keeps the device open,
	// and an open of an unconfigured device makes it true too.
	Connected bool `json:"connected"`
	// PID is the process that connected the device, from
	// /sys/block/nbdN/pid, which exists from the CONNECT until the device
	// is torn down; 0 otherwise. A device disconnected while something
	// holds it open keeps it until the last close, although the kernel
	// then refuses to give it connections (ErrDisconnectedHeldOpen).
	PID int `json:"pid,omitempty"`
	// Backend is the identifier given to Connect (/sys/block/nbdN/backend).
	Backend string `json:"backend,omitempty"`
	// Size is the device size in bytes (/sys/block/nbdN/size × 512).
	Size uint64 `json:"size"`
	// ReadOnly is /sys/block/nbdN/ro.
	ReadOnly bool `json:"read_only"`
	// BlockSize is the logical block size in bytes.
	BlockSize uint32 `json:"block_size"`
}

// Path is the device node, /dev/nbdN.
func (d Device) Path() string { return DevicePath(d.Index) }

// Running reports whether the device is configured: connected, with a pid
// file. That is a device serving I/O or waiting for a reconnect, but also
// one disconnected while still held open, which sysfs cannot tell apart:
// only Reconfigure finds the latter (ErrDisconnectedHeldOpen).
func (d Device) Running() bool { return d.Connected && d.PID != 0 }

// DevicePath is the node of device index: /dev/nbdN.
func DevicePath(index int) string { return "/dev/nbd" + strconv.Itoa(index) }

// ParseDevice returns N of "/dev/nbdN" or "nbdN".
func ParseDevice(s string) (int, error) {
	name := strings.TrimPrefix(s, "/dev/")
	digits, ok := strings.CutPrefix(name, "nbd")
	if !ok || digits == "" || strings.TrimLeft(digits, "0123456789") != "" || (len(digits) > 1 && digits[0] == '0') {
		return 0, fmt.Errorf("%q is not an nbd device: want /dev/nbdN", s)
	}
	n, err := strconv.Atoi(digits)
	if err != nil || n >= maxDevices {
		return 0, fmt.Errorf("%q: device number out of range", s)
	}
	return n, nil
}

// sysfs reads nbd device attributes under root (normally /sys).
type sysfs struct{ root string }

func (s sysfs) dir(index int) string {
	return filepath.Join(s.root, "block", "nbd"+strconv.Itoa(index))
}

// exists reports whether device index exists.
func (s sysfs) exists(index int) bool {
	_, err := os.Stat(s.dir(index))
	return err == nil
}

// read returns a device attribute without its trailing newline, and "" with
// no error when the attribute does not exist.
func (s sysfs) read(index int, attr string) (string, error) {
	b, err := os.ReadFile(filepath.Join(s.dir(index), attr))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(string(b), "\n"), nil
}

func (s sysfs) readUint(index int, attr string) (uint64, error) {
	v, err := s.read(index, attr)
	if err != nil || v == "" {
		return 0, err
	}
	n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s/%s: %w", s.dir(index), attr, err)
	}
	return n, nil
}

// fill completes d from sysfs.
func (s sysfs) fill(d *Device) error {
	pid, err := s.readUint(d.Index, "pid")
	if err != nil {
		return err
	}
	d.PID = int(pid)
	if d.Backend, err = s.read(d.Index, "backend"); err != nil {
		return err
	}
	sectors, err := s.readUint(d.Index, "size")
	if err != nil {
		return err
	}
	d.Size = sectors * 512
	ro, err := s.readUint(d.Index, "ro")
	if err != nil {
		return err
	}
	d.ReadOnly = ro != 0
	bs, err := s.readUint(d.Index, "queue/logical_block_size")
	if err != nil {
		return err
	}
	d.BlockSize = uint32(min(bs, 1<<31))
	return nil
}

// holders lists what holds device index or one of its partitions open in
// the kernel (md, device-mapper), as "nbdN held by md127". Processes and
// Xen's blkback do not show up there.
func (s sysfs) holders(index int) []string {
	name := "nbd" + strconv.Itoa(index)
	dirs := []string{s.dir(index)}
	parts, _ := filepath.Glob(filepath.Join(s.dir(index), name+"p*"))
	var out []string
	for _, dir := range append(dirs, parts...) {
		entries, _ := os.ReadDir(filepath.Join(dir, "holders"))
		for _, e := range entries {
			out = append(out, filepath.Base(dir)+" held by "+e.Name())
		}
	}
	return out
}

// requestTimeout returns the request timeout of device index, from
// queue/io_timeout (milliseconds; since Linux 5.0).
func (s sysfs) requestTimeout(index int) (time.Duration, error) {
	ms, err := s.readUint(index, "queue/io_timeout")
	if err != nil {
		return 0, err
	}
	if ms == 0 {
		return 0, fmt.Errorf("%s/queue/io_timeout is missing (Linux 5.0 or later has it)", s.dir(index))
	}
	if ms > uint64(math.MaxInt64/time.Millisecond) {
		return 0, fmt.Errorf("%s/queue/io_timeout: %d ms is out of range", s.dir(index), ms)
	}
	return time.Duration(ms) * time.Millisecond, nil
}

// limitRequestSize lowers queue/max_sectors_kb of device index so no request
// is larger than max bytes.
func (s sysfs) limitRequestSize(index int, max uint32) error {
	kb := uint64(max / 1024)
	if kb == 0 {
		return fmt.Errorf("maximum request size %d is under 1 KiB", max)
	}
	cur, err := s.readUint(index, "queue/max_sectors_kb")
	if err != nil {
		return err
	}
	if cur != 0 && cur <= kb {
		return nil
	}
	p := filepath.Join(s.dir(index), "queue", "max_sectors_kb")
	if err := os.WriteFile(p, []byte(strconv.FormatUint(kb, 10)), 0); err != nil {
		return fmt.Errorf("limiting requests to %d KiB: %w", kb, err)
	}
	return nil
}
