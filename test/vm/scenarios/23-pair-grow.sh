#!/bin/bash
# timeout: 600
# Online grow: the volume grows on both storage boxes (lvnbd volume resize +128M); within the
# daemon's poll interval both kernel devices have the new size, without a detach (same device,
# same connections, data intact), and lvnbd pair status shows it. The server does not shrink a
# volume in use, and a device never shrinks: shrunk behind the server, the volume is refused by
# its leg, also once grown back.
# shellcheck source-path=SCRIPTDIR source=20-pair-lib.sh
. "$(dirname "$0")/20-pair-lib.sh"

setup_boxes
box_volume a create vm1 --size 256M
box_volume b create vm1 --size 256M
write_config
start_client
dev_a=$(leg a device)
dev_b=$(leg b device)
pid_a=$(cat "/sys/block/${dev_a#/dev/}/pid")
dd if=/dev/urandom of=data bs=1M count=8 status=none
dd if=data of=/dev/lvnbd/vm1/a bs=1M oflag=direct conv=fsync status=none

box_volume a resize vm1 --size +128M
box_volume b resize vm1 --size +128M
want=$((384 << 20))
# Poll interval 2 s; generous for the emulated guest.
wait_secs "[[ \$(blockdev --getsize64 /dev/lvnbd/vm1/a) == $want && \$(blockdev --getsize64 /dev/lvnbd/vm1/b) == $want ]]" 30
wait_secs "[[ \$(leg a size) == $want && \$(leg b size) == $want ]]" 10
lvnbd pair status --control "$CLIENT_SOCK"
assert_eq "$dev_a" "$(readlink /dev/lvnbd/vm1/a)" "leg a's device after the grow"
assert_eq "$dev_b" "$(readlink /dev/lvnbd/vm1/b)" "leg b's device after the grow"
assert_eq "$pid_a" "$(cat "/sys/block/${dev_a#/dev/}/pid")" "leg a's device was not re-attached"
assert_eq 0 "$(own_reconnects a)" "reconnects of leg a"
assert_eq 2 "$(nbd_running)" "attached nbd devices"
grep -q '"msg":"grew"\|grew' client.log || fail "no grow in the daemon's log"

# The new space is usable, the old data intact.
dd if=data of=/dev/lvnbd/vm1/a bs=1M seek=300 oflag=direct conv=fsync status=none
assert_eq "$(sha data)" "$(dd if=/dev/vga/vm1 bs=1M skip=300 count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1)" \
	"data in the grown part, on box a's LV"
assert_eq "$(sha data)" "$(dd if=/dev/lvnbd/vm1/a bs=1M count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1)" \
	"data from before the grow"

# Through the server, a volume in use is not shrunk.
if box_volume b resize vm1 --size 320M --allow-shrink 2>err; then fail "the server shrank a volume in use"; fi
grep -q "in use by 2 client" err || fail "shrink of a volume in use: $(cat err)"
# Shrunk behind the server (lvm itself), the volume does not shrink the device: the server cuts
# its clients and gives the volume another ID, and leg b refuses the export, saying why: it
# shrank (if the size poll saw that first) or was rolled back (the new ID).
lvm lvreduce -f -y -L 320M vgb/vm1
refused="\$(leg b last_error) == *shrank* || \$(leg b last_error) == *'rolled back since'*"
wait_secs "[[ ( $refused ) && \$(leg b state) == reconnecting ]]" 30
assert_eq "$want" "$(blockdev --getsize64 /dev/lvnbd/vm1/b)" "leg b's size after the volume shrank"
# Grown back, it is still refused: its tail is lost, and the half must be replaced as a new
# member.
lvm lvextend -y -L "${want}b" vgb/vm1
wait_secs "[[ \$(leg b last_error) == *'shrank under the device'* || \$(leg b last_error) == *'rolled back since'* ]]" 30
assert_eq reconnecting "$(leg b state)" "leg b after its volume grew back"
assert_connected a "leg a throughout"

lvnbd pair down --control "$CLIENT_SOCK" vm1
stop_client
