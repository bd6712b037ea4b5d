#!/bin/bash
# timeout: 120
# A dom0 with Debian's udev (systemd-udevd with udev's, mdadm's and LVM's rules) and a stock
# mdadm.conf leaves alone the guest's mirror halves that lvnbd attaches: packaging/udev's
# 59-lvnbd.rules keeps blkid, and so mdadm --incremental, off them. The same halves on loop
# devices are assembled, which shows that without the rule udev and md would act here.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
need_lvnbd
[[ -f /usr/lib/udev/rules.d/59-lvnbd.rules ]] || fail "run.sh did not put 59-lvnbd.rules in the guest"

PORT=10809

# in_use DEV: the names of what holds DEV (md, dm), empty if nothing does.
in_use() { ls "/sys/class/block/${1#/dev/}/holders"; }

# This scenario only: Debian's mdadm.conf as installed, with no AUTO line, which lets udev
# assemble whatever arrays it finds.
# The suite's mdadm.conf, and no udevd, return at the end: with /run/udev there, mdadm would wait
# for udev in the later scenarios.
cp /etc/mdadm/mdadm.conf mdadm.conf.suite
# /run/udev goes too (the reset removes it again, once every process is gone): a udev worker
# still removing its links can make busybox's rm -rf fail on one, which must not fail the test.
trap 'cp mdadm.conf.suite /etc/mdadm/mdadm.conf; udevadm control --exit || true; rm -rf /run/udev 2>/dev/null || true' EXIT
printf 'HOMEHOST <system>\nMAILADDR root\n' >/etc/mdadm/mdadm.conf

# Two halves of a guest's mirror, made as lvnbd guest create makes them (metadata 1.2, internal
# bitmap), on the guest's host name.
truncate -s 64M a.img b.img
la=$(losetup -f --show a.img)
lb=$(losetup -f --show b.img)
mdadm --create /dev/md/guest --run --metadata=1.2 --level=1 --raid-devices=2 --bitmap=internal \
	--homehost=guest "$la" "$lb"
mdadm --stop /dev/md/guest
losetup -d "$la" "$lb"

/usr/lib/systemd/systemd-udevd --daemon --resolve-names=never
wait_for "udevadm control --ping" 30

# The control: the halves on loop devices, which no rule keeps udev off, are assembled.
la=$(losetup -f --show a.img)
lb=$(losetup -f --show b.img)
udevadm settle --timeout=60
cat /proc/mdstat
[[ -n $(in_use "$la") && -n $(in_use "$lb") ]] ||
	fail "udev did not assemble the halves on $la and $lb: this VM cannot show what the rule prevents"
mdadm --stop --scan
losetup -d "$la" "$lb"
udevadm settle --timeout=60

# The same halves attached by lvnbd: udev sees the devices connect, and leaves them alone.
lvnbd serve --listen "tcp://127.0.0.1:$PORT" --export "a=$PWD/a.img" --export "b=$PWD/b.img" 2>server.log &
server=$!
wait_started "$server" server.log "[[ \$(tcp_sockets $PORT 0A) == 1 ]]" 10
# Every event udev handles for the nbd devices: the kernel announces a connect before it writes
# the backend the rule matches, so lvnbd connects with size 0 and gives the size afterwards. No
# event may have been probed (ID_FS_TYPE), whichever came first.
udevadm monitor --udev --property --subsystem-match=block >monitor.log &
monitor=$!
wait_for "grep -q '^UDEV - the event' monitor.log" 10
da=$(lvnbd attach "nbd://127.0.0.1:$PORT/a")
db=$(lvnbd attach "nbd://127.0.0.1:$PORT/b")
udevadm settle --timeout=60
kill "$monitor"
cat /proc/mdstat monitor.log
probed=$(awk '/^UDEV /{nbd = ($0 ~ /\/nbd[0-9]+ /)} nbd && /^ID_FS_TYPE=/' monitor.log)
assert_eq "" "$probed" "properties of blkid's probes in udev's nbd events"
grep -q '^UDEV .*/nbd0 (block)' monitor.log || fail "udevadm monitor saw no event of nbd0"
for d in "$da" "$db"; do
	props=$(udevadm info --query=property "$d")
	echo "$props"
	# The rule ran on the event of the connected device (it matched the backend URI).
	grep -qx 'UDEV_DISABLE_PERSISTENT_STORAGE_RULES_FLAG=1' <<<"$props" || fail "59-lvnbd.rules did not match $d"
	! grep -q '^ID_FS_TYPE=' <<<"$props" || fail "udev probed $d: $(grep '^ID_FS_TYPE=' <<<"$props")"
	assert_eq "" "$(in_use "$d")" "what holds $d"
done
grep -q '^md' /proc/mdstat && fail "an md array was assembled: $(cat /proc/mdstat)"

# A grow is another change event: still left alone.
truncate -s 96M a.img
lvnbd reconnect --size "$da"
udevadm settle --timeout=60
assert_eq $((96 << 20)) "$(blockdev --getsize64 "$da")" "size of $da after the grow"
assert_eq "" "$(in_use "$da")" "what holds $da after the grow"
grep -q '^md' /proc/mdstat && fail "an md array was assembled after the grow: $(cat /proc/mdstat)"

lvnbd detach "$da"
lvnbd detach "$db"
kill "$server"
wait "$server" || fail "server exited with $?: $(cat server.log)"
