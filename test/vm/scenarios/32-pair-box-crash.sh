#!/bin/bash
# timeout: 600
# Storage box A goes down under its server (power loss, panic, reset): the writes it had
# acknowledged but not flushed are lost, so when its server starts again it exports vm1 under a
# new ID (a new epoch, which box A's VG keeps as a tag), and leg a refuses to reconnect, saying
# the box went down, while leg b stays connected. A clean restart of the server keeps that ID,
# and the refusal, and so does a restart of the dom0 (its devices and volume IDs gone; the
# refusal kept in /var/lib/lvnbd). Taking leg a alone down and up attaches it as a new half. A
# server killed while its box stays up (scenario 21) changes no ID.
#
# The VM cannot reboot under a running scenario, so the crash is the server's SIGKILL followed
# by what the next boot would find: its record on the VG (a tag lvnbd-run-BOOT-PID-START) under
# another boot ID.
# shellcheck source-path=SCRIPTDIR source=20-pair-lib.sh
. "$(dirname "$0")/20-pair-lib.sh"

# vg_tags VG: VG's tags, one per line.
vg_tags() { vgs --noheadings -o vg_tags "$1" | tr -d ' ' | tr ',' '\n'; }

# description URI: the export's description, as lvnbd info --json gives it.
description() { lvnbd info --json "$1" | sed -n 's/^ *"description": "\(.*\)",\{0,1\}$/\1/p' | head -n1; }

setup_boxes
box_volume a create vm1 --size 64M
box_volume b create vm1 --size 64M
write_config
start_client
dev_a=$(leg a device)
dev_b=$(leg b device)
desc_before=$(description nbd://192.0.2.2/vm1)
[[ $desc_before == *'(lvnbd-id '*')' && $desc_before != *'--c'* ]] || fail "vm1 on box a before the crash: $desc_before"

boot=$(tr -d - </proc/sys/kernel/random/boot_id)
[[ $(vg_tags vgb) == "lvnbd-run-$boot-"* ]] || fail "vgb does not record box b's server: $(vg_tags vgb)"
# shellcheck disable=SC2154 # set by start_box
kill -9 "$server_a"
wait "$server_a" || true
run_tag=$(vg_tags vga)
[[ $run_tag == "lvnbd-run-$boot-"* ]] || fail "vga does not record box a's server (only): $run_tag"
vgchange --deltag "$run_tag" --addtag "lvnbd-run-00000000000000000000000000000000-${run_tag#"lvnbd-run-$boot-"}" vga
start_box a
epoch=$(vg_tags vga | sed -n 's/^lvnbd-epoch-//p')
[[ $epoch =~ ^[0-9a-f]{8}$ ]] || fail "vga does not keep a new epoch: $(vg_tags vga)"
grep -q 'this box went down while lvnbd served' server-a.log || fail "box a's server did not log the crash"
desc_after=$(description nbd://192.0.2.2/vm1)
assert_eq "${desc_before%)}--c$epoch)" "$desc_after" "vm1's description on box a after the crash"
[[ $(vg_tags vga) != *lvnbd-run-0000* ]] || fail "vga still records the server that ran when the box went down"
[[ $(vg_tags vgb) != *lvnbd-epoch* ]] || fail "vgb, whose box did not crash, has an epoch"
[[ $(lvnbd status --control /run/lvnbd/a.sock) == *"crash epoch $epoch"* ]] || fail "lvnbd status on box a does not show the epoch"
wait_secs "[[ \$(leg a last_error) == *'went down'* ]]" 90
lvnbd pair status --control "$CLIENT_SOCK"
assert_eq reconnecting "$(leg a state)" "leg a after box a's crash"
assert_eq "$dev_a" "$(leg a device)" "leg a keeps its device, without connections"
assert_connected b "leg b after box a's crash"
assert_eq "$dev_b" "$(leg b device)" "leg b's device"

# A clean stop takes the server's record out; a clean restart keeps the epoch: still refused.
kill "$server_a"
wait "$server_a" || fail "box a's server did not stop cleanly: $(tail -20 server-a.log)"
assert_eq "lvnbd-epoch-$epoch" "$(vg_tags vga)" "vga's tags after a clean stop"
start_box a
assert_eq "$desc_after" "$(description nbd://192.0.2.2/vm1)" "vm1's description on box a after a clean restart"
errors_at=$(leg a last_error_at)
wait_secs "[[ \$(leg a last_error_at) != '$errors_at' && \$(leg a last_error) == *'went down'* ]]" 90
assert_eq reconnecting "$(leg a state)" "leg a after box a's clean restart"

# The dom0 restarts before leg a is replaced: its nbd devices and /run go, and only
# /var/lib/lvnbd/refused-legs.json still says leg a was refused. The daemon attaches leg b anew
# and refuses leg a without attaching it.
stop_client
lvnbd detach --force "$dev_a"
lvnbd detach --force "$dev_b"
rm -f /run/lvnbd/volume-ids.json
grep -q '"nbd://192.0.2.2:10809/vm1"' /var/lib/lvnbd/refused-legs.json || fail "no refusal of leg a kept: $(cat /var/lib/lvnbd/refused-legs.json)"
lvnbd client --config client.toml --control "$CLIENT_SOCK" --poll-interval 2s --health-interval 1s \
	--log-level debug 2>>client.log &
client=$!
wait_secs "[[ \$(leg a last_error) == *'refused on '* && \$(leg b state) == connected ]]" 60
assert_eq failed "$(leg a state)" "leg a after the dom0's restart"
lvnbd pair status --json --control "$CLIENT_SOCK" vm1 | grep -q 'refused on [^"]*went down' ||
	fail "leg a's refusal after the dom0's restart does not say its box went down"
assert_eq "" "$(leg a device)" "leg a's device after the dom0's restart"
assert_eq 1 "$(nbd_running)" "nbd devices attached after the dom0's restart (leg b's only)"

# Replaced as a new half: leg a alone goes down and up.
# It refuses while the other leg is not connected.
assert_connected b "leg b before pair down --leg a"
lvnbd pair down --control "$CLIENT_SOCK" --leg a vm1
lvnbd pair up --control "$CLIENT_SOCK" --leg a vm1
assert_connected a "leg a after pair up --leg a"
dd if=/dev/urandom of=new bs=1M count=4 status=none
dd if=new of=/dev/lvnbd/vm1/a bs=1M oflag=direct conv=fsync status=none
assert_eq "$(sha new)" "$(dd if=/dev/vga/vm1 bs=1M count=4 iflag=direct status=none | sha256sum | cut -d' ' -f1)" \
	"data written through leg a, on box a's LV"
assert_connected b "leg b after leg a came back"

lvnbd pair down --control "$CLIENT_SOCK" vm1
stop_client
