// Package guest runs inside a Xen guest (domU) that mirrors the two legs of
// an lvnbd volume, one from each storage box, with md RAID1: it creates the
// mirror the way lvnbd needs it (internal write-intent bitmap, failfast
// legs), reports its state, and watches it — re-adding a leg that came back
// so md resyncs only the chunks the bitmap marked, and growing the array and
// its filesystem after both legs grew.
//
// Everything it knows comes from the kernel's own reports: /proc/mdstat,
// /sys/block/mdX/md/, /proc/self/mountinfo, and the machine-readable output
// of mdadm --export.
package guest
