#!/bin/bash
# timeout: 240
# A storage box alive but stalled for longer than the request timeout (its server stopped with
# SIGSTOP while a writer writes): the kernel gives up on both connections, shutting each down,
# and the requests wait for fresh ones. The server, let go, finds the writes it had not read yet
# on connections whose client hung up without NBD_CMD_DISC, and drops them (and says so) rather
# than doing them late; the kernel resends them on the fresh connections, the writer succeeds,
# and the device holds what it wrote last.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
need_lvnbd

PORT=10809
URI=nbd://127.0.0.1:$PORT/disk

truncate -s 64M disk.img
lvnbd serve --listen "tcp://127.0.0.1:$PORT" --export "disk=$PWD/disk.img" 2>server.log &
server=$!
wait_for "[[ \$(tcp_sockets $PORT 0A) == 1 ]]" 10
# A short request timeout: the stall below outlasts it. The dead-connection timeout leaves time
# to reconnect.
dev=$(lvnbd attach --connections 2 --timeout 5s --dead-timeout 120s "$URI")

dd if=/dev/urandom of=old bs=1M count=16 status=none
dd if=/dev/urandom of=new bs=1M count=16 status=none
dd if=old of="$dev" bs=1M oflag=direct conv=fsync status=none

lvnbd list --watch --json >events 2>watch.err &
watcher=$!
wait_for "[[ -s events ]]" 10 # the first line, the devices as they are: the watch is on

kill -STOP "$server"
dd if=new of="$dev" bs=1M oflag=direct conv=fsync status=none 2>writer.err &
writer=$!
# Each connection's requests time out and are resent on the other, which times out in turn.
wait_for "[[ \$(grep -c '\"event\":\"link-dead\"' events) -ge 2 ]]" 90
kill -CONT "$server"
lvnbd reconnect --connections 2 "$dev"
wait "$writer" || fail "the writer failed across the stall: $(cat writer.err)"

grep -q "client hung up without NBD_CMD_DISC; dropping the writes" server.log ||
	fail "the server did not drop the writes of the connections the kernel gave up on: $(tail -n 20 server.log)"
echo 3 >/proc/sys/vm/drop_caches
assert_eq "$(sha new)" "$(dd if="$dev" bs=1M count=16 iflag=direct status=none | sha256sum | cut -d' ' -f1)" \
	"data after the stall"
assert_eq "$(sha new)" "$(dd if=disk.img bs=1M count=16 status=none | sha256sum | cut -d' ' -f1)" \
	"the export's file after the stall"

kill "$watcher"
lvnbd detach "$dev"
kill "$server"
wait "$server" || fail "server exited with $?: $(tail -n 20 server.log)"
