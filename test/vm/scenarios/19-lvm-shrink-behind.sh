#!/bin/bash
# timeout: 300
# A volume shrunk and grown back behind the server (lvreduce, then lvextend, back to back) while
# a client has it: with the rescan an hour away, only the server's device watch can see it, from
# the kernel's events for the device-mapper reloads. It cuts the volume's clients and counts a
# rollback, so the volume comes back under another ID, which a dom0 leg refuses (its tail is
# lost; the same size would not tell). A grow alone keeps the ID and the client.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
need_lvnbd

CTL=/run/lvnbd/box.sock
V=(--volumes lvm://vg0 --control "$CTL")
desc() { lvnbd info --json nbd://127.0.0.1/vm1 | grep -o '"description": *"[^"]*"'; }
size() { lvnbd info --json nbd://127.0.0.1/vm1 | grep -o '"size": *[0-9]*' | grep -o '[0-9]*$'; }

serve_vg0 1h
lvnbd volume create vm1 --size 64M --stripes 2 "${V[@]}"
dev=$(lvnbd attach nbd://127.0.0.1/vm1)
id=$(desc)
[[ $id == *'(lvnbd-id '* ]] || fail "vm1's description carries no volume ID: $id"
conns=$(tcp_sockets 10809 01)
((conns > 0)) || fail "no connection of $dev to the server"

# A grow keeps the volume's ID and its client.
lvm lvextend -y -L 96M vg0/vm1
wait_for "[[ \$(size) == $((96 << 20)) ]]" 20
assert_eq "$id" "$(desc)" "vm1's description after a grow"
assert_eq "$conns" "$(tcp_sockets 10809 01)" "connections after a grow"

# Shrunk and grown back to the same size, faster than any rescan.
lvm lvreduce -f -y -L 64M vg0/vm1
lvm lvextend -y -L 96M vg0/vm1
wait_for "[[ \$(desc) == *-r1* ]]" 30
assert_eq $((96 << 20)) "$(size)" "vm1's size after the shrink and grow back"
wait_for "[[ \$(tcp_sockets 10809 01) == 0 ]]" 10
grep -q 'export shrank under its clients' server.log || fail "the server did not log the shrink"
grep -q 'volume that shrank behind the server now has another ID' server.log ||
	fail "the server did not log the new ID"

lvnbd detach "$dev"
lvnbd volume remove vm1 --force "${V[@]}"
kill "$server"
wait "$server"
