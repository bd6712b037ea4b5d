#!/bin/bash
# timeout: 420
# A snapshot of box B's leg while the guest writes (lvnbd snapshot create through B's server,
# which quiesces the volume around it) holds a crash-consistent image of the guest's ext4:
# attached read-only (VOLUME@SNAP), copied out of its md leg (the data starts at the md data
# offset), e2fsck -fy replays the journal and fixes nothing else (exit 0 or 1), e2fsck -fn then
# finds it clean (exit 0), and every file fsync'ed before the snapshot reads back intact.
# "Clean" cannot mean e2fsck -fn on the raw snapshot: a filesystem mounted at snapshot time has
# a journal that needs recovery, which -fn reports without replaying.
# shellcheck source-path=SCRIPTDIR source=25-guest-mirror.sh
GUEST_LIB_ONLY=1 . "$(dirname "$0")/25-guest-mirror.sh"

guest_setup 64M
wait_in_sync 180
writer w0 20
writer w1 80 >w1.log 2>&1 &
wpid=$!
wait_for "[[ \$(written w1) -ge 10 ]]" 60
# Files whose fsync returned before the snapshot starts must be in it.
cp w1.sums before.sums
cat w0.sums >>before.sums
box b snapshot create vm1@backup --size 32M
after=$(written w1)
echo "snapshot taken with $(wc -l <before.sums) to $((after + 20)) files written"
wait "$wpid" || fail "the writer failed around the snapshot: $(cat w1.log)"
[[ $after -lt 80 ]] || fail "the writer finished before the snapshot: it was not taken mid-write"

snap=$(lvnbd attach "nbd://127.0.0.1:$PORT_B/vm1@backup")
assert_eq 1 "$(cat "/sys/block/${snap#/dev/}/ro")" "snapshot attached read-only"
# The filesystem starts at the md data offset of the leg; its size is the array's.
offset=$(cat "/sys/block/$MD/md/dev-${LEG_B#/dev/}/offset")
sectors=$(($(blockdev --getsize64 "$ARRAY") / 512))
dd if="$snap" of=fs.img bs=512 skip="$offset" count="$sectors" status=none
lvnbd detach "$snap"

rc=0
e2fsck -fy fs.img || rc=$?
echo "e2fsck -fy: exit $rc"
[[ $rc -le 1 ]] || fail "e2fsck -fy on the snapshot exited $rc: more than a journal replay"
e2fsck -fn fs.img || fail "e2fsck -fn on the repaired snapshot copy exited $?"

mkdir snapmnt
mount -o loop,ro fs.img snapmnt
(cd snapmnt && sha256sum -c ../before.sums >/dev/null) || fail "files fsync'ed before the snapshot are not intact in it"
umount snapmnt

# The live mirror is unaffected.
verify_files w0.sums w1.sums
no_fs_errors
box b snapshot remove vm1@backup
umount mnt
e2fsck -fn "$ARRAY"
mdadm --stop "$ARRAY"
