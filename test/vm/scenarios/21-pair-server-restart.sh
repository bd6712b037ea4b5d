#!/bin/bash
# timeout: 600
# Storage box A's server dies (SIGKILL) and comes back: lvnbd pair status shows leg a
# reconnecting with the error, then connected again by itself, on the same device, with one
# more reconnect; leg b is untouched; data written through the device after the reconnect lands
# on box A's LV, and data written before it is still there. Then box A's volume is made anew
# under the same name: leg a refuses to reconnect to it, also after a reload of the daemon.
# While something holds leg a's device open, pair down --leg a keeps its volume ID, and pair up
# (adopting the still-configured device) still refuses the new volume. Once let go, taking leg
# a alone down and up (pair down/up --leg a) attaches it to the new volume, as a new half of
# the mirror, while leg b stays attached and connected throughout.
# shellcheck source-path=SCRIPTDIR source=20-pair-lib.sh
. "$(dirname "$0")/20-pair-lib.sh"

setup_boxes
box_volume a create vm1 --size 128M
box_volume b create vm1 --size 128M
write_config
start_client
dev_a=$(leg a device)
dev_b=$(leg b device)

dd if=/dev/urandom of=before bs=1M count=8 status=none
dd if=before of=/dev/lvnbd/vm1/a bs=1M oflag=direct conv=fsync status=none
reconnects=$(own_reconnects a)

# shellcheck disable=SC2154 # set by start_box
kill -9 "$server_a"
wait "$server_a" || true
wait_secs "[[ \$(leg a state) == reconnecting ]]" 30
lvnbd pair status --control "$CLIENT_SOCK"
[[ -n $(leg a last_error) ]] || fail "no last error for leg a while its server is dead"
[[ -n $(leg a last_error_at) ]] || fail "no time for leg a's last error"
assert_connected b "leg b while box a is down"
assert_eq "$dev_a" "$(leg a device)" "leg a keeps its device while reconnecting"
[[ -e /sys/block/${dev_a#/dev/}/pid ]] || fail "$dev_a was detached"
# Still down a while later: the daemon keeps trying (with backoff), without new devices.
sleep 5
assert_eq reconnecting "$(leg a state)" "leg a with its server still dead"
assert_eq 2 "$(nbd_running)" "attached nbd devices while box a is down"

start_box a
# The backoff is at most 30 s (plus jitter) between attempts.
wait_secs "[[ \$(leg a state) == connected ]]" 90
lvnbd pair status --control "$CLIENT_SOCK"
assert_eq "$dev_a" "$(leg a device)" "leg a's device after the reconnect"
assert_eq "$dev_a" "$(readlink /dev/lvnbd/vm1/a)" "link a after the reconnect"
assert_eq $((reconnects + 1)) "$(own_reconnects a)" "reconnects of leg a"
assert_eq "$dev_b" "$(leg b device)" "leg b's device"
assert_eq 2 "$(nbd_running)" "attached nbd devices after the reconnect"
wait_secs "[[ \$(box_tcp a 01) == 2 ]]" 20

echo 3 >/proc/sys/vm/drop_caches
assert_eq "$(sha before)" "$(dd if=/dev/lvnbd/vm1/a bs=1M count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1)" \
	"data written before the kill"
dd if=/dev/urandom of=after bs=1M count=8 status=none
dd if=after of=/dev/lvnbd/vm1/a bs=1M seek=16 oflag=direct conv=fsync status=none
assert_eq "$(sha after)" "$(dd if=/dev/vga/vm1 bs=1M skip=16 count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1)" \
	"data written after the reconnect, on box a's LV"

# Box A's volume is removed and made anew under the same name while its server is down: the
# export's volume ID changes, and leg a refuses to reconnect to it. Its data is not this leg's,
# and the guest's mirror would read it as if it were.
kill -9 "$server_a"
wait "$server_a" || true
box_volume a remove vm1
box_volume a create vm1 --size 128M
start_box a
wait_secs "[[ \$(leg a last_error) == *'volume was made anew'* ]]" 90
lvnbd pair status --control "$CLIENT_SOCK"
assert_eq reconnecting "$(leg a state)" "leg a with its volume made anew"
assert_eq "$dev_a" "$(leg a device)" "leg a keeps its device, without connections"
# A reload (a new supervisor, which adopts the devices) still refuses it: the ID is kept in /run.
supervising=$(grep -c 'supervising' client.log)
kill -HUP "$client"
wait_secs "(( \$(grep -c supervising client.log) > $supervising ))" 30
wait_secs "[[ \$(leg a last_error) == *'volume was made anew'* ]]" 60
assert_eq reconnecting "$(leg a state)" "leg a after a reload"
[[ -s /run/lvnbd/volume-ids.json ]] || fail "no volume IDs recorded"

# A device something still holds open (blkback, when xl block-detach failed and the pair was
# taken down with --force) stays configured after its disconnect, until the last close, and
# is found by its backend (the kernel refuses it new connections). pair down --leg a keeps its volume ID then, so pair up,
# which adopts that device, still refuses the new volume.
exec 7<"$dev_a"
if lvnbd pair down --control "$CLIENT_SOCK" --leg a vm1 2>err; then fail "pair down --leg a of a held device succeeded"; fi
cat err
grep -q 'still holds it open' err || fail "pair down --leg a does not say the device is held: $(cat err)"
assert_eq down "$(leg a state)" "leg a after pair down of its held device"
[[ -e /sys/block/${dev_a#/dev/}/pid ]] || fail "$dev_a, held open, lost its configuration at the disconnect"
lvnbd pair up --control "$CLIENT_SOCK" --leg a vm1 || true
wait_secs "[[ \$(leg a last_error) == *'volume was made anew'* && \$(leg a device) == $dev_a ]]" 60
lvnbd pair status --control "$CLIENT_SOCK"
assert_eq reconnecting "$(leg a state)" "leg a adopting its held device"
exec 7<&-
wait_secs "[[ ! -e /sys/block/${dev_a#/dev/}/pid ]]" 30

# The new volume is taken into use as a new half: leg a alone goes down and up.
reconnects_b=$(own_reconnects b)
# It refuses while the other leg is not connected.
assert_connected b "leg b before pair down --leg a"
lvnbd pair down --control "$CLIENT_SOCK" --leg a vm1
assert_eq down "$(leg a state)" "leg a after pair down --leg a"
assert_connected b "leg b after pair down --leg a"
[[ ! -e /dev/lvnbd/vm1/a ]] || fail "link a left after pair down --leg a"
assert_eq "$dev_b" "$(readlink /dev/lvnbd/vm1/b)" "link b after pair down --leg a"
assert_eq 1 "$(nbd_running)" "attached nbd devices with leg a down"
lvnbd pair up --control "$CLIENT_SOCK" --leg a vm1
assert_connected a "leg a after pair up --leg a"
dd if=/dev/urandom of=new bs=1M count=8 status=none
dd if=new of=/dev/lvnbd/vm1/a bs=1M oflag=direct conv=fsync status=none
assert_eq "$(sha new)" "$(dd if=/dev/vga/vm1 bs=1M count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1)" \
	"data written through leg a, on box a's new LV"
assert_eq "$dev_b" "$(leg b device)" "leg b's device after leg a came back"
assert_connected b "leg b after leg a came back"
assert_eq "$reconnects_b" "$(own_reconnects b)" "reconnects of leg b while leg a was replaced"
assert_eq 2 "$(nbd_running)" "attached nbd devices after pair up --leg a"

lvnbd pair down --control "$CLIENT_SOCK" vm1
stop_client
