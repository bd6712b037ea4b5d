// Package rwf asks the kernel which per-write flags (RWF_DSYNC) it takes, in
// a way that cannot lose a write-back failure.
package rwf

import "golang.org/x/sys/unix"

// Supported reports whether the kernel takes flag (RWF_DSYNC: Linux 4.7 and
// later) in preadv2 and pwritev2 on fd, asked with a read of one byte at off,
// the end of the file or device, where nothing is read. The kernel checks a
// read's flags as a write's, against one list for every file, before any
// I/O, and answers EOPNOTSUPP for a flag it does not know (ENOSYS without
// preadv2).
//
// Why a read: a write with RWF_DSYNC is a sync, and a sync that meets an
// earlier failed write-back reports that failure once and clears it. Had
// a failed DSYNC write been taken for "the kernel lacks the flag" and
// retried without it, the retry's fdatasync would find nothing wrong and the
// lost data would be reported written. A read never syncs. Any failure here
// counts as no: a durable write is then a write and an fdatasync, slower
// but as durable, and every later DSYNC failure is the write's failure.
func Supported(fd int, off int64, flag int) bool {
	var one [1]byte
	for {
		_, err := unix.Preadv2(fd, [][]byte{one[:]}, off, flag)
		if err != unix.EINTR {
			return err == nil
		}
	}
}
