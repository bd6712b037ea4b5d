#!/bin/bash
# timeout: 420
# A failed write-back under one half of a guest's mirror, and the recovery the README gives.
# Box A's LV fails (its dm table swapped to error, dirty pages and all) while the guest writes:
# the next flush or write through leg A fails, md fails the leg, and the guest carries on with
# leg B. The disk is mended and box A restarted: the export is still failed (recorded), so leg A
# does not answer reads and lvnbd guest watch leaves it out. Then, in order: the watcher is
# stopped, the leg removed, lvnbd recover run on box A, the device reconnected, its superblock
# zeroed and the leg added: a full resync, after which a check of the mirror finds no mismatch
# and every file reads back intact.
# shellcheck source-path=SCRIPTDIR source=25-guest-mirror.sh
GUEST_LIB_ONLY=1 . "$(dirname "$0")/25-guest-mirror.sh"

guest_setup 64M
wait_in_sync 180
LV_A=vga-vm1
good_table=$(dmsetup table "$LV_A")

# looks: how many passes the watcher has made (it logs one line per pass at debug level).
looks() { grep -c 'looked at the arrays' watch.log || true; }
lvnbd guest watch --md "$ARRAY" --interval 1s --log-level debug >watch.log 2>&1 &
watcher=$!
wait_for "grep -q 'all legs in sync' watch.log" 30

writer w1 40 >w1.log 2>&1 &
wpid=$!
wait_for "[[ \$(written w1) -ge 5 ]]" 60
# Box A's disk fails under dirty pages: no flush before the swap, as a real failure gives none.
dmsetup suspend --nolockfs --noflush "$LV_A"
dmsetup load "$LV_A" --table "0 $(blockdev --getsz "/dev/mapper/$LV_A") error"
dmsetup resume "$LV_A"
wait_for "[[ \$(legstate $LEG_A) == *faulty* ]]" 60
wait "$wpid" || fail "the writer failed: $(cat w1.log)"
[[ $(legstate "$LEG_B") == in_sync* ]] || fail "leg B is not in sync: $(legstate "$LEG_B")"
grep -q 'write-back failed' server-a.log || fail "box A did not log the failed write-back: $(tail server-a.log)"
grep -q '"export": "vm1"' failures-a.json || fail "box A did not record the failure"
wait_for "grep -q 'does not answer reads' watch.log" 30

# The disk is mended and box A restarted: the export stays failed.
dmsetup suspend --nolockfs --noflush "$LV_A"
dmsetup load "$LV_A" --table "$good_table"
dmsetup resume "$LV_A"
kill "$srv_a"
wait "$srv_a" || true
serve_box a
lvnbd reconnect "$LEG_A"
if dd if="$LEG_A" of=/dev/null bs=4k count=1 iflag=direct status=none; then
	fail "leg A answers reads after box A restarted, although its write-back failed"
fi
lvnbd status --control "$CTL_A" >status-a.out
grep -q 'vm1: FAILED: .*recorded' status-a.out || fail "box A's status after the restart: $(cat status-a.out)"
writer w2 10
# The watcher has looked at least three times since: leg A is still out.
seen=$(looks)
wait_for "(( \$(looks) >= $((seen + 3)) ))" 30
[[ $(legstate "$LEG_A") != *in_sync* ]] || fail "leg A is back in the array: $(legstate "$LEG_A")"
if grep -q 're-added the leg\|added the leg\|removed the failed leg' watch.log; then
	fail "the watcher touched leg A: $(cat watch.log)"
fi

# The recovery, in the README's order.
kill "$watcher"
wait "$watcher" || true
watcher=''
if [[ -e /sys/block/$MD/md/dev-${LEG_A#/dev/} ]]; then
	mdadm "$ARRAY" --fail "$LEG_A" >/dev/null 2>&1 || true
	mdadm "$ARRAY" --remove "$LEG_A"
fi
lvnbd recover vm1 --control "$CTL_A" >recover.out || fail "lvnbd recover: $(cat recover.out)"
cat recover.out
grep -q 'export vm1 recovered' recover.out || fail "lvnbd recover said: $(cat recover.out)"
lvnbd reconnect "$LEG_A"
dd if="$LEG_A" of=/dev/null bs=4k count=1 iflag=direct status=none || fail "leg A does not answer reads after recovery"
mdadm --zero-superblock "$LEG_A"
mdadm "$ARRAY" --add --failfast "$LEG_A"
wait_in_sync 240
# Added in full, as created: failfast, so that md fails it at once when its box dies again.
[[ $(legstate "$LEG_A") == in_sync*failfast* ]] || fail "leg A after the full add: $(legstate "$LEG_A")"
check_mirror 120
verify_files w1.sums w2.sums
no_fs_errors
