#!/bin/bash
# timeout: 900
# The whole failover chain with nobody reconnecting anything by hand: the dom0 daemon (lvnbd
# client) keeps pair vm1's legs attached from two storage boxes in network namespaces, the
# "guest" mirrors /dev/lvnbd/vm1/a and /b with lvnbd guest create (ext4 on top) and runs lvnbd
# guest watch. Twice, while a writer writes files with fsync — box A's server SIGKILLed, then
# box A's link cut (ip link set vetha down) — md fails leg a and the writer carries on without an
# error; once box A is back (server restarted, link up) the daemon reconnects leg a by itself on
# the same device, the watcher re-adds it, md resyncs, a check finds no mismatch and every file
# matches its checksum.
# shellcheck source-path=SCRIPTDIR source=20-pair-lib.sh
. "$(dirname "$0")/20-pair-lib.sh"
# shellcheck source-path=SCRIPTDIR source=25-guest-mirror.sh
GUEST_LIB_ONLY=1 . "$(dirname "$0")/25-guest-mirror.sh"

# Failover takes the request timeout (requests in flight on the dead connections) plus the dead
# timeout (requests queued after them); with a cut link a request may time out once on each of
# the two connections first. 20 s still outlasts a live server slowed down by emulation and a
# resync.
TIMEOUT=20
DEAD_TIMEOUT=10
FAILOVER_LIMIT=$((2 * (2 * TIMEOUT + DEAD_TIMEOUT)))
wpid=''

# On failure, what the daemon, md and the watcher thought; always, stop what holds the legs
# before 20-pair-lib.sh's on_exit detaches them and deletes the namespaces.
cleanup() {
	local rc=$? m
	{ set +x; } 2>/dev/null
	set +e
	if ((rc != 0)); then
		echo "--- lvnbd pair status"
		lvnbd pair status --control "$CLIENT_SOCK"
		echo "--- /proc/mdstat"
		cat /proc/mdstat
		echo "--- lvnbd guest status"
		lvnbd guest status
		for m in watch.log w1.log w2.log; do
			[[ -s $m ]] && { echo "--- $m"; tail -n 40 "$m"; }
		done
		echo "--- dmesg (tail)"
		dmesg | tail -n 40
	fi
	for m in ${wpid:-} ${watcher:-}; do kill "$m" 2>/dev/null; done
	grep -q " $PWD/mnt " /proc/mounts && umount mnt
	[[ -e /sys/block/${MD:-none}/md ]] && mdadm --stop "$ARRAY" >/dev/null 2>&1
	# shellcheck disable=SC2154 # set by start_box
	for m in ${server_a:-} ${server_b:-}; do kill "$m" 2>/dev/null; done
	(exit "$rc")
	on_exit
}
trap cleanup EXIT

# --- dom0: two storage boxes and the daemon ------------------------------------------------
setup_boxes
box_volume a create vm1 --size 64M
box_volume b create vm1 --size 64M
{
	echo '[[pair]]'
	echo 'name = "vm1"'
	echo 'a = "nbd://192.0.2.2/vm1"'
	echo 'b = "nbd://198.51.100.2/vm1"'
	echo 'connections = 2'
	echo "timeout = \"${TIMEOUT}s\""
	echo "dead_timeout = \"${DEAD_TIMEOUT}s\""
} >client.toml
start_client
LEG_A=$(readlink -f /dev/lvnbd/vm1/a)
LEG_B=$(readlink -f /dev/lvnbd/vm1/b)
assert_eq "$(leg a device)" "$LEG_A" "link a"
assert_eq "$(leg b device)" "$LEG_B" "link b"

# --- guest: the mirror over the stable names, and its watcher -----------------------------------
assert_eq "$ARRAY" "$(lvnbd guest create --name vm1 --filesystem ext4 --bitmap-chunk 1M /dev/lvnbd/vm1/a /dev/lvnbd/vm1/b)" \
	"guest create prints the array"
MD=$(basename "$(readlink -f "$ARRAY")")
[[ -e /sys/block/$MD/md/dev-${LEG_A#/dev/} && -e /sys/block/$MD/md/dev-${LEG_B#/dev/} ]] ||
	fail "the array's members are not $LEG_A and $LEG_B: $(ls "/sys/block/$MD/md")"
mkdir -p mnt
mount "$ARRAY" mnt
wait_in_sync 300
lvnbd guest watch --md "$ARRAY" --interval 1s >watch.log 2>&1 &
watcher=$!
wait_for "grep -q 'all legs in sync' watch.log" 30

# lose_leg_a ROUND NAME HOW: with writer NAME running, lose box A by running HOW; md fails leg a,
# the writer finishes without an error, more files are written while degraded, and the watcher
# waits for the leg (for the ROUND-th time).
lose_leg_a() {
	local round=$1 name=$2 how=$3 lost took
	writer "$name" 40 >"$name.log" 2>&1 &
	wpid=$!
	wait_for "[[ \$(written $name) -ge 10 ]]" 120
	$how
	lost=$SECONDS
	wait_for "[[ \$(legstate $LEG_A) == *faulty* ]]" "$FAILOVER_LIMIT"
	took=$((SECONDS - lost))
	echo "md failed leg a ${took}s after: $how"
	[[ $(legstate "$LEG_B") == in_sync* ]] || fail "leg b is not in sync: $(legstate "$LEG_B")"
	[[ $(written "$name") -lt 40 ]] || fail "writer $name finished before leg a failed: not mid-write"
	wait "$wpid" || fail "writer $name failed while leg a failed: $(cat "$name.log")"
	wpid=''
	assert_eq 40 "$(written "$name")" "files written by $name across the failover"
	writer "$name-degraded" 10
	sync
	assert_eq 1 "$(mdattr degraded)" "degraded slots with box A away"
	wait_secs "[[ \$(leg a state) == reconnecting ]]" 60
	assert_connected b "leg b with box A away"
	wait_for "[[ \$(grep -c 'does not answer reads' watch.log) -ge $round ]]" 60
	[[ $(legstate "$LEG_A") == *faulty* ]] || fail "leg a is no longer faulty with box A away: $(legstate "$LEG_A")"
}

# leg_a_returns READDS RECONNECTS SUMS...: box A is back; with no help, the daemon reconnects
# leg a (its reconnect count past RECONNECTS), the watcher re-adds it (its READDS-th re-add),
# md resyncs only the dirty chunks, a check finds no mismatch, and the files of SUMS all match.
leg_a_returns() {
	local readds=$1 reconnects=$2 back=$SECONDS
	shift 2
	wait_secs "[[ \$(leg a state) == connected ]]" 120
	echo "daemon reconnected leg a $((SECONDS - back))s after box A's return"
	lvnbd pair status --control "$CLIENT_SOCK"
	assert_eq "$LEG_A" "$(leg a device)" "leg a's device after the reconnect"
	assert_eq "$LEG_A" "$(readlink -f /dev/lvnbd/vm1/a)" "link a after the reconnect"
	[[ $(leg a reconnects) -gt $reconnects ]] || fail "no reconnect counted for leg a: $(leg a reconnects)"
	wait_for "[[ \$(grep -c 're-added the leg' watch.log) -ge $readds ]]" 60
	wait_in_sync 300
	echo "leg a back in sync $((SECONDS - back))s after box A's return"
	cat /proc/mdstat
	assert_eq "$readds" "$(grep -c 're-added the leg' watch.log)" "re-adds by the watcher"
	if grep -q 'full resync' watch.log; then fail "the watcher fell back to a full resync: $(cat watch.log)"; fi
	[[ $(legstate "$LEG_A") == in_sync*failfast* ]] || fail "leg a after the re-add: $(legstate "$LEG_A")"
	json=$(lvnbd guest status --json)
	assert_eq healthy "$(json_field "$json" health)" "guest status after the re-add"
	check_mirror 300
	verify_files "$@"
	no_fs_errors
}

# --- 1: box A's server is killed mid-write, and restarted -------------------------------------
kill_box_a() {
	kill -9 "$server_a"
	wait "$server_a" || true
}
reconnects=$(leg a reconnects)
lose_leg_a 1 w1 kill_box_a
start_box a
leg_a_returns 1 "$reconnects" w1.sums w1-degraded.sums

# --- 2: box A's link is cut mid-write, and comes back ------------------------------------------
cut_link_a() { ip link set vetha down; }
reconnects=$(leg a reconnects)
lose_leg_a 2 w2 cut_link_a
ip link set vetha up
leg_a_returns 2 "$reconnects" w1.sums w1-degraded.sums w2.sums w2-degraded.sums

kill "$watcher"
wait "$watcher" || fail "the watcher exited with $? on SIGTERM: $(cat watch.log)"
watcher=''
cat watch.log
umount mnt
e2fsck -fn "$ARRAY"
mdadm --stop "$ARRAY"
lvnbd pair down --control "$CLIENT_SOCK" vm1
stop_client
