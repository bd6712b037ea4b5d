#!/bin/bash
# timeout: 480
# Online growth: both storage boxes grow their volume (lvnbd volume resize, lvextend underneath)
# and the dom0 pushes the new sizes (lvnbd reconnect --size). lvnbd guest watch --grow-fs grows
# the array (mdadm --grow --size=max) only once both legs grew, then ext4 online (resize2fs on
# the mounted filesystem): df shows the new size, and the files are intact. Also captures md's
# reports of the resync of the grown part.
# shellcheck source-path=SCRIPTDIR source=25-guest-mirror.sh
GUEST_LIB_ONLY=1 . "$(dirname "$0")/25-guest-mirror.sh"

guest_setup 64M
wait_in_sync 180
writer w1 30
offset=$(cat "/sys/block/$MD/md/dev-${LEG_A#/dev/}/offset") # sectors before the data on each leg
assert_eq $(((64 << 10) - offset / 2)) "$(mdattr component_size)" "component size (KiB) before"
df_before=$(df -k mnt | awk 'NR == 2 {print $2}')

lvnbd guest watch --md "$ARRAY" --grow-fs --interval 1s >watch.log 2>&1 &
watcher=$!
wait_for "grep -q 'all legs in sync' watch.log" 30

# Only box A grows: the array cannot, and the watcher leaves it.
box a volume resize vm1 --size 128M
lvnbd reconnect --size "$LEG_A"
assert_eq $((128 << 20)) "$(blockdev --getsize64 "$LEG_A")" "leg A's size"
sleep 5 # five looks of the watcher
assert_eq $(((64 << 10) - offset / 2)) "$(mdattr component_size)" "component size with one leg grown"

# Box B grows too: the array and its filesystem follow. The resync of the grown part is slowed
# down to be captured.
echo 1 >"/sys/block/$MD/md/sync_speed_min"
echo 200 >"/sys/block/$MD/md/sync_speed_max"
box b volume resize vm1 --size 128M
lvnbd reconnect --size "$LEG_B"
want=$(((128 << 10) - offset / 2))
wait_for "[[ \$(mdattr component_size) == $want ]]" 60
if [[ $(mdattr sync_action) == resync ]]; then
	capture_md grow
fi
echo system >"/sys/block/$MD/md/sync_speed_min"
echo system >"/sys/block/$MD/md/sync_speed_max"
assert_eq $((want * 1024)) "$(blockdev --getsize64 "$ARRAY")" "array size"
wait_for "grep -q 'grew the filesystem' watch.log" 60
df_after=$(df -k mnt | awk 'NR == 2 {print $2}')
echo "df: ${df_before} KiB before, ${df_after} KiB after"
[[ $df_after -ge $((df_before + (56 << 10))) ]] || fail "df shows ${df_after} KiB, not 64 MiB more than ${df_before}"
blocks=$(dumpe2fs -h "$ARRAY" 2>/dev/null | sed -n 's/^Block count: *//p')
bsize=$(dumpe2fs -h "$ARRAY" 2>/dev/null | sed -n 's/^Block size: *//p')
[[ $((blocks * bsize)) -ge $(((want - 1024) * 1024)) ]] || fail "ext4 is $((blocks * bsize)) bytes on a $((want * 1024))-byte array"

# The new space is usable, and the old files are intact.
writer w2 30
dd if=/dev/urandom of=mnt/big bs=1M count=60 conv=fsync status=none
wait_in_sync 180
verify_files w1.sums w2.sums
check_mirror 300
no_fs_errors
grep -c 'grew the array' watch.log | grep -qx 1 || fail "the array was grown other than once: $(cat watch.log)"

kill "$watcher"
wait "$watcher" || fail "the watcher exited with $?: $(cat watch.log)"
umount mnt
e2fsck -fn "$ARRAY"
mdadm --stop "$ARRAY"
