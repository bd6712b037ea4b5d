// Package pair keeps the two legs of each pair attached on a dom0: for every
// pair of client.toml, the export of one volume on storage box A and the
// export of the same volume on storage box B, each a kernel block device
// that the guest mirrors with md RAID1.
//
// A Supervisor attaches each leg through the kernel's nbd netlink family
// (package kernel) and names it with a stable symlink, LinkDir/PAIR/a and
// LinkDir/PAIR/b, re-pointed atomically if the device ever changes. Then it
// keeps the leg working without ever detaching it:
//
//   - when the kernel reports a dead connection (LINK_DEAD), it redials
//     with exponential backoff and jitter and hands the same device fresh
//     sockets with RECONFIGURE, so the guest's disk never goes away;
//   - every PollInterval it reads the export's size and grows a device whose
//     volume grew, also with RECONFIGURE (never shrinking one);
//   - every HealthInterval it checks that the device is still attached to
//     its export, and attaches a new one if it is not.
//
// A leg's device is identified by its backend identifier, the export's
// canonical URI, so a restarted supervisor adopts the devices a previous
// run attached instead of attaching them twice. Stopping the supervisor
// leaves every device attached; Down detaches a pair's.
//
// With a Xen domain configured, Up and Down also give the legs to the
// domain and take them back with xl block-attach and xl block-detach.
//
// The daemon (lvnbd client) serves Handler on a root-only Unix socket
// (Listen, DefaultSocket); Client is how lvnbd pair reaches it.
package pair
