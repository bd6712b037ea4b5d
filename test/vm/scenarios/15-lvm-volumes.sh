#!/bin/bash
# timeout: 600
# The LVM driver for real, through a running server: a VG on two ramdisk PVs; lvnbd volume
# create --stripes 2 gives a 2-stripe LV that appears as an export at once; it is attached and
# written through /dev/nbdX; it grows (lvnbd volume resize) and the live device follows with
# reconnect --size; classic and thin snapshots are taken while attached, and each snapshot,
# attached read-only, shows the data from before later writes; removing a volume in use is
# refused naming the client; a merge gives thin1 another ID, which its attached device refuses.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
need_lvnbd

CTL=/run/lvnbd/box.sock
V=(--volumes lvm://vg0 --control "$CTL")
size_of() { blockdev --getsize64 "$1"; }
devsha() { dd if="$1" bs=1M count="$2" iflag=direct status=none | sha256sum | cut -d' ' -f1; }
filesha() { dd if="$1" bs=1M count="$2" status=none | sha256sum | cut -d' ' -f1; }

serve_vg0 1s

# A striped volume, exported as soon as it exists.
lvnbd volume create vm1 --size 128M --stripes 2 "${V[@]}"
assert_eq 2 "$(lvs --noheadings -o stripes vg0/vm1 | tr -d ' ')" "stripes of vg0/vm1"
lvnbd volume list --json "${V[@]}" | grep -q '"stripes": *2'
nbdinfo_size=$(lvnbd info --json nbd://127.0.0.1/vm1 | grep -o '"size": *[0-9]*' | grep -o '[0-9]*$')
assert_eq $((128 << 20)) "$nbdinfo_size" "export size"

dev=$(lvnbd attach --connections 2 nbd://127.0.0.1/vm1)
dd if=/dev/urandom of=old bs=1M count=32 status=none
dd if=old of="$dev" bs=1M oflag=direct conv=fsync status=none
old=$(sha old)
assert_eq "$old" "$(devsha "$dev" 32)" "data through the device"
assert_eq "$old" "$(devsha /dev/vg0/vm1 32)" "data on the LV"

# Grow: LVM extends the LV (keeping its 2 stripes), the server re-reads the size, and the
# attached device grows without a detach.
lvnbd volume resize vm1 --size +64M "${V[@]}"
assert_eq 2 "$(lvs --noheadings -o stripes vg0/vm1 | head -1 | tr -d ' ')" "stripes after the resize"
lvnbd reconnect --size "$dev"
assert_eq $((192 << 20)) "$(size_of "$dev")" "device size after the resize"

# A classic snapshot while attached; later writes do not show in it.
lvnbd snapshot create vm1@before --size 64M "${V[@]}"
dd if=/dev/urandom of=new bs=1M count=32 status=none
dd if=new of="$dev" bs=1M oflag=direct conv=fsync status=none
snap=$(lvnbd attach nbd://127.0.0.1/vm1@before)
assert_eq 1 "$(cat "/sys/block/${snap#/dev/}/ro")" "snapshot attached read-only"
assert_eq "$old" "$(devsha "$snap" 32)" "classic snapshot holds the data from before"
assert_eq "$(sha new)" "$(devsha "$dev" 32)" "the volume holds the new data"
if dd if=/dev/zero of="$snap" bs=4k count=1 oflag=direct status=none 2>/dev/null; then
	fail "a write to the snapshot succeeded"
fi
lvnbd snapshot list --json "${V[@]}" | grep -q '"usage_percent"'

# Removing a volume in use is refused, naming the client.
if lvnbd volume remove vm1 "${V[@]}" 2>remove.err; then
	fail "removed a volume with clients connected"
fi
grep -q "127.0.0.1" remove.err || fail "the refusal does not name the client: $(cat remove.err)"

# Thin: a pool and a thin volume made with lvm directly and adopted by the lvnbd tag; the
# server's rescan (--rescan 1s here, 10 s by default) exports it; a thin snapshot needs no COW
# size.
lvcreate -q -T vg0/pool -L 96M
lvcreate -q -V 64M -T vg0/pool -n thin1 --addtag lvnbd
wait_for "lvnbd info nbd://127.0.0.1/thin1" 20
tdev=$(lvnbd attach nbd://127.0.0.1/thin1)
dd if=old of="$tdev" bs=1M count=16 oflag=direct conv=fsync status=none
lvnbd snapshot create thin1@t1 "${V[@]}"
lvnbd snapshot list --json "${V[@]}" | grep -q '"thin": *true'
dd if=new of="$tdev" bs=1M count=16 oflag=direct conv=fsync status=none
tsnap=$(lvnbd attach nbd://127.0.0.1/thin1@t1)
assert_eq "$(filesha old 16)" "$(devsha "$tsnap" 16)" "thin snapshot holds the data from before"

# A merge rolls thin1 back under the same LV and UUID: its export's ID gets -r1, and the
# device attached to it refuses to be reconnected to the older data.
id=$(lvnbd info --json nbd://127.0.0.1/thin1 | grep -o '(lvnbd-id [^)]*)')
[[ -n $id ]] || fail "thin1's description carries no volume ID"
lvnbd snapshot merge thin1@t1 --force "${V[@]}"
wait_for "lvnbd info --json nbd://127.0.0.1/thin1 | grep -qF -- '${id%)}-r1)'" 20
assert_eq "$(filesha old 16)" "$(devsha /dev/vg0/thin1 16)" "thin1 after the merge holds the snapshot's data"
if lvnbd reconnect "$tdev" 2>reconnect.err; then
	fail "reconnected $tdev to thin1 rolled back by a merge"
fi
grep -q "made anew or rolled back" reconnect.err || fail "the refusal does not say why: $(cat reconnect.err)"

for d in "$tsnap" "$tdev" "$snap" "$dev"; do lvnbd detach "$d"; done
lvnbd snapshot remove vm1@before "${V[@]}"
lvnbd volume remove vm1 "${V[@]}"
[[ ! -e /dev/vg0/vm1 ]] || fail "vg0/vm1 still exists"
kill "$server"
wait "$server"
