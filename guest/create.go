package guest

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/dustin/go-humanize"
	"golang.org/x/sys/unix"
)

// CreateOptions says which mirror Create builds.
type CreateOptions struct {
	// Name makes the array /dev/md/NAME; it is also the name in the md
	// superblock, by which the guest's mdadm assembles it at boot.
	Name string
	// Devices are the two legs, one from each storage box.
	Devices [2]string
	// Filesystem, if not empty, is made on the new array: ext4 or xfs.
	Filesystem string
	// Force creates the array over devices that carry data (an md
	// superblock, a filesystem, a partition table), destroying it.
	Force bool
	// BitmapChunk is the write-intent bitmap's chunk in bytes, a power of
	// two of at least 4 KiB, or 0 for mdadm's default (64 MiB in mdadm 4.2):
	// the unit md resyncs after a leg returns.
	BitmapChunk uint64
}

// Created is what Create made.
type Created struct {
	Path string // /dev/md/NAME
	// Overwritten lists what --force destroyed, one line per finding.
	Overwritten []string
}

// Create builds a RAID1 mirror over two legs for a guest: metadata 1.2, an
// internal write-intent bitmap so a returning leg resyncs only what changed,
// and both legs failfast so md fails a dead leg as soon as its I/O fails
// instead of retrying it. It refuses legs that are in use, and, unless
// opts.Force, legs that carry data, naming what it found.
func Create(ctx context.Context, opts CreateOptions) (Created, error) {
	return realHost().create(ctx, opts)
}

// Filesystems Create can make and the watcher can grow.
var filesystems = map[string][]string{
	"ext4": {"mkfs.ext4", "-q", "-F"},
	"xfs":  {"mkfs.xfs", "-q", "-f"},
}

func (h *host) create(ctx context.Context, opts CreateOptions) (Created, error) {
	if err := validArrayName(opts.Name); err != nil {
		return Created{}, err
	}
	mkfs, ok := filesystems[opts.Filesystem]
	if opts.Filesystem != "" && !ok {
		return Created{}, fmt.Errorf("filesystem %q: want ext4 or xfs", opts.Filesystem)
	}
	if c := opts.BitmapChunk; c != 0 && (c < 4<<10 || c&(c-1) != 0) {
		return Created{}, fmt.Errorf("bitmap chunk %d: want a power of two of at least 4 KiB", c)
	}
	if _, err := h.checkMdadm(ctx); err != nil {
		return Created{}, err
	}
	path := "/dev/md/" + opts.Name
	if h.exists(path) {
		// mdadm leaves the link behind when it stops an array without udev;
		// only a running array makes the name taken.
		if name, err := h.kernelName(path); err == nil {
			if _, err := fs.Stat(h.sys, "sys/block/"+name+"/md/array_state"); err == nil {
				if st, _ := readSysString(h.sys, "sys/block/"+name+"/md/array_state"); st != "clear" && st != "inactive" {
					return Created{}, fmt.Errorf("%s: %w (%s)", path, ErrExists, devPath(name))
				}
			}
		}
	}
	var names [2]string
	for i, dev := range opts.Devices {
		name, err := h.kernelName(dev)
		if err != nil {
			return Created{}, err
		}
		names[i] = name
	}
	if names[0] == names[1] {
		return Created{}, fmt.Errorf("%s and %s are the same device %s: a mirror needs one leg from each storage box",
			opts.Devices[0], opts.Devices[1], names[0])
	}
	// md would use the smaller leg's size and leave the rest of the other
	// unused: the two volumes are meant to be one size on both boxes, and
	// grown together (README, "Online resize").
	sa, errA := blockDevSize(h.sys, names[0])
	sb, errB := blockDevSize(h.sys, names[1])
	if errA == nil && errB == nil && sa != 0 && sb != 0 && sa != sb {
		return Created{}, fmt.Errorf("%s is %s (%d bytes) and %s %s (%d bytes): the legs of a mirror must be the same "+
			"size; make the smaller volume as large as the other on its storage box (lvnbd volume resize), which its "+
			"dom0 passes on to the guest", opts.Devices[0], humanize.IBytes(sa), sa, opts.Devices[1], humanize.IBytes(sb), sb)
	}
	var found []string
	for i, dev := range opts.Devices {
		f, err := h.inspect(ctx, dev, names[i])
		if err != nil {
			return Created{}, err
		}
		found = append(found, f...)
	}
	if len(found) > 0 && !opts.Force {
		return Created{}, fmt.Errorf("%w: %s (--force destroys it)", ErrHasData, strings.Join(found, "; "))
	}
	args := []string{"mdadm", "--create", path, "--run", "--level=1", "--raid-devices=2",
		"--metadata=1.2", "--bitmap=internal"}
	if opts.BitmapChunk != 0 {
		args = append(args, fmt.Sprintf("--bitmap-chunk=%dK", opts.BitmapChunk>>10))
	}
	// --failfast flags the devices listed after it. mdadm gets the devices
	// that were inspected, by their kernel names: a link such as
	// /dev/disk/by-id/… re-pointed since, or a path starting with "-",
	// would hand it another device or an option.
	args = append(args, "--failfast", devPath(names[0]), devPath(names[1]))
	if _, err := h.run.run(ctx, args...); err != nil {
		return Created{}, err
	}
	if mkfs != nil {
		if _, err := h.run.run(ctx, append(mkfs, path)...); err != nil {
			return Created{Path: path, Overwritten: found}, fmt.Errorf("the array %s was created, but not its filesystem: %w", path, err)
		}
	}
	return Created{Path: path, Overwritten: found}, nil
}

// inspect describes what a device carries, or fails if it is in use or
// cannot be read.
//
// dev is the path the admin gave, which messages name; every look goes to
// the device by its kernel name, the one mdadm is then given.
func (h *host) inspect(ctx context.Context, dev, name string) ([]string, error) {
	kdev := devPath(name)
	if holders := h.holders(name); len(holders) > 0 {
		return nil, fmt.Errorf("%s: %w by %s", dev, ErrInUse, strings.Join(holders, ", "))
	}
	majmin, err := readSysString(h.sys, "sys/class/block/"+name+"/dev")
	if err != nil {
		return nil, err
	}
	if mp, _, err := h.mountOf(majmin); err != nil {
		return nil, err
	} else if mp != "" {
		return nil, fmt.Errorf("%s: %w: mounted on %s", dev, ErrInUse, mp)
	}
	size, err := blockDevSize(h.sys, name)
	if err != nil {
		return nil, err
	}
	if size == 0 {
		return nil, fmt.Errorf("%s has no size: is it attached?", dev)
	}
	// What the looks above miss (a partition of it mounted or held, swap,
	// a btrfs, a mount in another namespace, a program's O_EXCL) the
	// kernel knows: mdadm would fail on it, and --force must not be
	// offered for data that is in use.
	if h.exclusive != nil {
		if err := h.exclusive(kdev); errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("%s: %w: the kernel refuses to open it exclusively (a partition of it mounted or in an md array or device-mapper table, swap, or a program holding it)", dev, ErrInUse)
		} else if err != nil {
			return nil, err // names the device (os.PathError)
		}
	}
	head, tail, err := h.readEnds(kdev, size)
	if err != nil {
		return nil, err
	}
	var found []string
	mdFound := false
	// mdadm names the array whose superblock it is. It cannot tell an
	// unreadable device from a blank one, but this one was just read.
	if out, err := h.run.run(ctx, "mdadm", "--examine", "--export", kdev); err == nil {
		if e, err := ParseExamine(out); err == nil {
			found = append(found, fmt.Sprintf("%s: md superblock of array %q (UUID %s, %s)", dev, e.Name, e.UUID, e.Level))
			mdFound = true
		}
	}
	if h.have("blkid") {
		// blkid knows more formats than detectSignature, by name.
		typ, err := h.blkid(ctx, kdev)
		if errors.Is(err, errAmbivalentProbe) {
			// Data all the same (a thick LV with old leftovers),
			// which --force may overwrite like any other.
			found = append(found, fmt.Sprintf("%s: several signatures at once (blkid; wipefs -n %s lists them)", dev, dev))
		} else if err != nil {
			return nil, err
		}
		if typ != "" && !(typ == "linux_raid_member" && mdFound) {
			found = append(found, fmt.Sprintf("%s: %s signature (blkid)", dev, typ))
		}
	} else if sig := detectSignature(head, tail, size); sig != "" && !(strings.HasPrefix(sig, "md ") && mdFound) {
		found = append(found, fmt.Sprintf("%s: %s", dev, sig))
	}
	if len(found) == 0 {
		// No format anyone knows is not no data: raw data, a plain
		// dm-crypt volume, a damaged header. The watcher's test for a
		// blank leg decides.
		blank, err := h.zeroEnds(kdev, size)
		if err != nil {
			return nil, err
		}
		if !blank {
			found = append(found, fmt.Sprintf("%s: no signature of a known format, but its first or last MiB is not zeroes: it may hold data (a new thick LV can hold old data from its disk)", dev))
		}
	}
	return found, nil
}

// errAmbivalentProbe is blkid's exit status 8: it found several signatures
// on the device at once.
var errAmbivalentProbe = errors.New("several signatures at once (an ambivalent probe)")

// blkid returns the TYPE (or PTTYPE) blkid finds on dev, "" for none;
// errAmbivalentProbe when it finds several.
func (h *host) blkid(ctx context.Context, dev string) (string, error) {
	out, err := h.run.run(ctx, "blkid", "-p", "-o", "export", dev)
	var ee interface{ ExitCode() int }
	if errors.As(err, &ee) {
		switch ee.ExitCode() {
		case 2:
			return "", nil // blkid(8): 2 means nothing was found
		case 8:
			return "", fmt.Errorf("blkid -p %s: %w", dev, errAmbivalentProbe)
		}
	}
	if err != nil {
		return "", err
	}
	pairs, err := ParseExport(out)
	if err != nil {
		return "", fmt.Errorf("blkid %s: %w", dev, err)
	}
	for _, k := range []string{"TYPE", "PTTYPE"} {
		if v := lookup(pairs, k); v != "" {
			if k == "PTTYPE" {
				v += " partition table"
			}
			return v, nil
		}
	}
	return "", nil
}

func validArrayName(s string) error {
	if s == "" || len(s) > 32 || s[0] == '.' || s[0] == '-' {
		return fmt.Errorf("%q: %w", s, ErrInvalidName)
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("%q: %w", s, ErrInvalidName)
		}
	}
	return nil
}
