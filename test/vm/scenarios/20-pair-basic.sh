#!/bin/bash
# timeout: 600
# lvnbd client attaches both legs of a pair, each from its own storage box (a server in its own
# network namespace, on an LVM volume): /dev/lvnbd/vm1/a and /b point at the nbd devices, data
# written through each lands on its box's LV, lvnbd pair status shows both connected. Restarted,
# the daemon adopts the attached devices (same indexes, no new device, no leftover connection);
# stopped, it leaves them attached. lvnbd pair down detaches both and removes the links; up
# attaches them again.
# shellcheck source-path=SCRIPTDIR source=20-pair-lib.sh
. "$(dirname "$0")/20-pair-lib.sh"

setup_boxes
box_volume a create vm1 --size 256M
box_volume b create vm1 --size 256M
write_config
start_client
cat client.log

for l in a b; do
	link=/dev/lvnbd/vm1/$l
	[[ -L $link ]] || fail "$link is not a symlink"
	dev=$(readlink "$link")
	[[ $dev =~ ^/dev/nbd[0-9]+$ ]] || fail "$link points at '$dev'"
	[[ -b $link ]] || fail "$link does not lead to a block device"
	assert_eq "$dev" "$(leg $l device)" "status device of leg $l"
	assert_eq $((256 << 20)) "$(blockdev --getsize64 "$link")" "size of leg $l"
	assert_eq $((256 << 20)) "$(leg $l size)" "status size of leg $l"
	assert_eq 2 "$(leg $l connections)" "connections of leg $l"
	assert_eq "nbd://$(box_ip $l):10809/vm1" "$(cat "/sys/block/${dev#/dev/}/backend")" "backend of leg $l"
	wait_secs "[[ \$(box_tcp $l 01) == 2 ]]" 20
done
dev_a=$(readlink /dev/lvnbd/vm1/a)
dev_b=$(readlink /dev/lvnbd/vm1/b)
[[ $dev_a != "$dev_b" ]] || fail "both legs on $dev_a"
assert_eq 2 "$(nbd_running)" "attached nbd devices"
lvnbd pair status --control "$CLIENT_SOCK"

# Different data through each leg lands on its own box's LV.
dd if=/dev/urandom of=data-a bs=1M count=16 status=none
dd if=/dev/urandom of=data-b bs=1M count=16 status=none
for l in a b; do
	dd if="data-$l" of="/dev/lvnbd/vm1/$l" bs=1M seek=8 oflag=direct conv=fsync status=none
done
echo 3 >/proc/sys/vm/drop_caches
for l in a b; do
	want=$(sha "data-$l")
	assert_eq "$want" "$(dd if="/dev/lvnbd/vm1/$l" bs=1M skip=8 count=16 iflag=direct status=none | sha256sum | cut -d' ' -f1)" \
		"data read back through leg $l"
	assert_eq "$want" "$(dd if="/dev/vg$l/vm1" bs=1M skip=8 count=16 iflag=direct status=none | sha256sum | cut -d' ' -f1)" \
		"data on box $l's LV"
done

# Stopped, the daemon leaves the devices attached and linked.
stop_client
for dev in "$dev_a" "$dev_b"; do
	[[ -e /sys/block/${dev#/dev/}/pid ]] || fail "$dev was detached when the daemon stopped"
done
assert_eq "$dev_a" "$(readlink /dev/lvnbd/vm1/a)" "link a after the stop"
if lvnbd pair status --control "$CLIENT_SOCK" 2>err; then fail "pair status without a daemon succeeded"; fi
grep -q "lvnbd client is not running" err || fail "pair status without a daemon: $(cat err)"

# Restarted, it adopts them: same devices, nothing new attached, connections not doubled.
start_client
assert_eq "$dev_a" "$(leg a device)" "leg a's device after the restart"
assert_eq "$dev_b" "$(leg b device)" "leg b's device after the restart"
assert_eq true "$(leg a adopted)" "leg a adopted"
assert_eq true "$(leg b adopted)" "leg b adopted"
assert_eq 0 "$(own_reconnects a)" "reconnects of leg a after adoption"
assert_eq 2 "$(nbd_running)" "attached nbd devices after the restart"
for l in a b; do
	wait_secs "[[ \$(box_tcp $l 01) == 2 ]]" 20
done
assert_eq "$(sha data-a)" "$(dd if=/dev/lvnbd/vm1/a bs=1M skip=8 count=16 iflag=direct status=none | sha256sum | cut -d' ' -f1)" \
	"data through leg a after the restart"

# pair down detaches both and removes the links; the daemon leaves them down.
lvnbd pair down --control "$CLIENT_SOCK" vm1
for dev in "$dev_a" "$dev_b"; do
	[[ ! -e /sys/block/${dev#/dev/}/pid ]] || fail "$dev still attached after pair down"
done
[[ ! -e /dev/lvnbd/vm1/a && ! -e /dev/lvnbd/vm1/b ]] || fail "links left after pair down: $(ls -l /dev/lvnbd/vm1)"
assert_eq down "$(leg a state)" "leg a after pair down"
assert_eq 0 "$(nbd_running)" "attached nbd devices after pair down"
sleep 3
assert_eq 0 "$(nbd_running)" "attached nbd devices a while after pair down"

# pair up attaches them again.
lvnbd pair up --control "$CLIENT_SOCK" vm1
assert_connected a "leg a after pair up"
assert_connected b "leg b after pair up"
assert_eq 2 "$(nbd_running)" "attached nbd devices after pair up"
assert_eq "$(sha data-b)" "$(dd if=/dev/lvnbd/vm1/b bs=1M skip=8 count=16 iflag=direct status=none | sha256sum | cut -d' ' -f1)" \
	"data through leg b after pair up"

lvnbd pair down --control "$CLIENT_SOCK" vm1
stop_client
