#!/bin/bash
# timeout: 600
# The link to storage box A goes down (ip link set vetha down) with no I/O going on, for longer
# than the dead timeout: TCP keepalive makes the kernel find the connections dead, the daemon
# shows leg a reconnecting, I/O on leg a fails after the dead timeout instead of hanging, leg b
# keeps working. The link comes back up and the daemon reconnects leg a by itself, on the same
# device; I/O works again.
# shellcheck source-path=SCRIPTDIR source=20-pair-lib.sh
. "$(dirname "$0")/20-pair-lib.sh"

setup_boxes
box_volume a create vm1 --size 128M
box_volume b create vm1 --size 128M
write_config
start_client
dev_a=$(leg a device)
dd if=/dev/urandom of=data bs=1M count=4 status=none
dd if=data of=/dev/lvnbd/vm1/a bs=1M oflag=direct conv=fsync status=none

ip link set vetha down
start=$SECONDS
# Idle connections: keepalive (10 s, then 3 probes 5 s apart) gives up after about 25 s.
wait_secs "[[ \$(leg a state) == reconnecting ]]" 90
echo "leg a found dead after $((SECONDS - start))s"
lvnbd pair status --control "$CLIENT_SOCK"
assert_connected b "leg b while link a is down"
dd if=/dev/lvnbd/vm1/b of=/dev/null bs=1M count=4 iflag=direct status=none

# With every connection dead, I/O fails once the dead timeout (10 s) is over, not never.
t0=$SECONDS
rc=0
timeout 60 dd if=/dev/lvnbd/vm1/a of=/dev/null bs=4k count=1 skip=1000 iflag=direct || rc=$?
echo "read with link a down: exit $rc after $((SECONDS - t0))s"
[[ $rc -ne 0 ]] || fail "read succeeded with link a down"
[[ $rc -ne 124 && $rc -ne 143 ]] || fail "read hung with link a down"
# Down for longer than the dead timeout in all.
sleep 5
assert_eq reconnecting "$(leg a state)" "leg a with its link still down"

ip link set vetha up
wait_secs "[[ \$(leg a state) == connected ]]" 90
echo "leg a reconnected $((SECONDS - start))s after the cut"
lvnbd pair status --control "$CLIENT_SOCK"
assert_eq "$dev_a" "$(leg a device)" "leg a's device after the reconnect"
[[ $(leg a reconnects) -ge 1 ]] || fail "no reconnect counted for leg a"
echo 3 >/proc/sys/vm/drop_caches
assert_eq "$(sha data)" "$(dd if=/dev/lvnbd/vm1/a bs=1M count=4 iflag=direct status=none | sha256sum | cut -d' ' -f1)" \
	"data through leg a after the reconnect"
dd if=data of=/dev/lvnbd/vm1/a bs=1M seek=8 oflag=direct conv=fsync status=none

lvnbd pair down --control "$CLIENT_SOCK" vm1
stop_client
