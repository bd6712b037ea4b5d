#!/bin/bash
# timeout: 360
# Failover: storage box A dies (SIGKILL) while the guest writes with fsync. md fails leg A within
# the request plus the dead-connection timeout (failfast legs), the writer never sees an error and
# carries on degraded, a final sync succeeds, no filesystem or md I/O error reaches the kernel
# log, and every file reads back intact from leg B alone. lvnbd guest status says degraded.
# Also captures md's reports of a faulty, then removed leg, and of a stale leg come back.
# shellcheck source-path=SCRIPTDIR source=25-guest-mirror.sh
GUEST_LIB_ONLY=1 . "$(dirname "$0")/25-guest-mirror.sh"

guest_setup 64M
wait_in_sync 180

writer w1 60 >w1.log 2>&1 &
wpid=$!
wait_for "[[ \$(written w1) -ge 10 ]]" 60
kill -9 "$srv_a"
killed=$SECONDS
wait "$srv_a" || true
# Requests in flight fail after the request timeout (10 s), later ones after the dead-connection
# timeout (5 s); md fails the leg on the first failed write.
wait_for "[[ \$(legstate $LEG_A) == *faulty* ]]" 60
took=$((SECONDS - killed))
echo "leg A failed ${took}s after the kill"
# Bounded by the timeouts, not by a hang; the margin is for a loaded host under emulation.
[[ $took -le 45 ]] || fail "md took ${took}s to fail the dead leg (request timeout 10 s + dead-connection timeout 5 s)"
[[ $(legstate "$LEG_B") == in_sync* ]] || fail "leg B is not in sync: $(legstate "$LEG_B")"
[[ $(written w1) -lt 60 ]] || fail "the writer finished before the leg failed: the failover was not mid-write"

wait "$wpid" || fail "the writer failed during the failover: $(cat w1.log)"
assert_eq 60 "$(written w1)" "files written across the failover"
sync
# Still degraded, and writes keep working.
writer w2 10
assert_eq 1 "$(mdattr degraded)" "degraded slots"
verify_files w1.sums w2.sums
no_fs_errors

json=$(lvnbd guest status --json)
echo "$json"
assert_eq degraded "$(json_field "$json" health)" "health after the failover"
grep -q '"faulty"' <<<"$json" || fail "status --json shows no faulty leg"
capture_md faulty

# md keeps a failed leg until it is removed.
mdadm --manage "$ARRAY" --remove "$LEG_A"
[[ ! -e /sys/block/$MD/md/dev-${LEG_A#/dev/} ]] || fail "leg A still listed after --remove"
capture_md removed

# Box A comes back with its stale copy: the superblock names the array, with an older event
# count than leg B's.
serve_box a
lvnbd reconnect "$LEG_A"
capture examine-export-stale.txt mdadm --examine --export "$LEG_A"
capture examine-export-current.txt mdadm --examine --export "$LEG_B"
# Each leg's own view of the array (mdadm --examine, not --export): stale leg A last saw both
# legs active; leg B has run without A.
capture examine-stale.txt mdadm --examine "$LEG_A"
capture examine-alone.txt mdadm --examine "$LEG_B"
stale=$(mdadm --examine --export "$LEG_A" | sed -n 's/^MD_EVENTS=//p')
current=$(mdadm --examine --export "$LEG_B" | sed -n 's/^MD_EVENTS=//p')
[[ $stale -lt $current ]] || fail "leg A's events $stale are not older than leg B's $current"

umount mnt
e2fsck -fn "$ARRAY"
mdadm --stop "$ARRAY"
