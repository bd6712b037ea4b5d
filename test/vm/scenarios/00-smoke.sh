#!/bin/bash
# timeout: 120
# Proves the guest environment the other scenarios rely on: kernel modules, nbd devices, LVM
# striping on ramdisks, md RAID1 with an internal bitmap, ext4.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

for m in nbd dm_mod dm_snapshot dm_thin_pool raid1 md_mod brd loop ext4; do
	[[ -d /sys/module/$m ]] || fail "module $m is not loaded"
done
# /init loads nbd with nbds_max=16 and brd with rd_nr=4.
[[ -b /dev/nbd0 && -b /dev/nbd15 ]] || fail "no /dev/nbd0../dev/nbd15"
[[ -b /dev/ram0 && -b /dev/ram1 ]] || fail "no brd ramdisks"

# LVM: a 2-stripe LV across two ramdisk PVs.
pvcreate -y /dev/ram0 /dev/ram1
vgcreate smoke /dev/ram0 /dev/ram1
lvcreate -y -n striped -i 2 -I 64k -L 64m smoke
report=$(lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_size,stripes,stripe_size smoke/striped)
echo "$report"
grep -q '"stripes":"2"' <<<"$report" || fail "smoke/striped is not 2 stripes"
grep -q '"lv_size":"67108864"' <<<"$report" || fail "smoke/striped is not 64 MiB"
[[ -b /dev/smoke/striped ]] || fail "no /dev/smoke/striped node"

# md RAID1 over two LVs, as a domU mirrors its two NBD legs.
lvcreate -y -n leg0 -L 32m smoke
lvcreate -y -n leg1 -L 32m smoke
mdadm --create /dev/md0 --run --level=1 --raid-devices=2 --metadata=1.2 --bitmap=internal \
	/dev/smoke/leg0 /dev/smoke/leg1
# Clean means the initial resync is over; "clean, resyncing" is not clean yet.
wait_for "mdadm --detail /dev/md0 | grep -qE '^ *State : clean *$'" 60
mdadm --detail /dev/md0 | grep -q 'Intent Bitmap : Internal' || fail "md0 has no internal bitmap"

# ext4 on the mirror: write, remount, read back, fsck.
mkfs.ext4 -q -F /dev/md0
mkdir -p mnt
mount /dev/md0 mnt
dd if=/dev/urandom of=data bs=1M count=4 status=none
cp data mnt/data
want=$(sha data)
umount mnt
mount /dev/md0 mnt
assert_eq "$want" "$(sha mnt/data)" "data read back from ext4 on md0"
umount mnt
e2fsck -fn /dev/md0

mdadm --stop /dev/md0
vgremove -y smoke
pvremove -y /dev/ram0 /dev/ram1

if command -v lvnbd >/dev/null; then
	lvnbd --help
fi
