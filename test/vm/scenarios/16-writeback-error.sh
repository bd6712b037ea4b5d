#!/bin/bash
# timeout: 120
# A write-back the disk failed is never forgotten. The server writes to its page cache and syncs
# on FLUSH; Linux reports a failed write-back to an open file once, so a second FLUSH would
# succeed although the data never reached the disk. Here the export's device fails while a
# written block is still dirty on the server, the first flush through the kernel's nbd device
# fails, the device is repaired, and every later flush, write and read must still fail: the
# export's contents can no longer be trusted, and a guest's mirror must not take it back.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
need_lvnbd

PORT=10809
URI=nbd://127.0.0.1:$PORT/disk
SECTORS=$((64 << 11)) # 64 MiB

tcp_sockets() { awk -v p="$(printf ':%04X' "$1")" -v st="$2" 'substr($2, length($2) - 4) == p && $4 == st' /proc/net/tcp | wc -l; }
# table TARGET: swap the device's table without writing back its dirty pages first (no lockfs,
# no flush), as a disk failing under them would.
table() {
	dmsetup suspend --nolockfs --noflush wb
	if [[ $1 == linear ]]; then
		dmsetup load wb --table "0 $SECTORS linear /dev/ram3 0"
	else
		dmsetup load wb --table "0 $SECTORS error"
	fi
	dmsetup resume wb
}
# flush: fsync the nbd device, which sends NBD_CMD_FLUSH; nothing is dirty on this side.
flush() { dd if=/dev/null of="$dev" conv=fsync,notrunc status=none; }

dmsetup create wb --table "0 $SECTORS linear /dev/ram3 0"
dmsetup mknodes wb # no udev in the guest
[[ -b /dev/mapper/wb ]] || fail "dmsetup made no /dev/mapper/wb: $(ls -l /dev/mapper)"
lvnbd serve --listen "tcp://127.0.0.1:$PORT" --export "disk=/dev/mapper/wb" 2>server.log &
server=$!
wait_for "[[ \$(tcp_sockets $PORT 0A) == 1 ]] || ! kill -0 $server" 10
kill -0 "$server" || fail "the server exited: $(cat server.log)"
dev=$(lvnbd attach "$URI")
flush || fail "a flush on a healthy device failed"

# 1 MiB reaches the server's page cache (direct on this side), then the disk fails.
dd if=/dev/urandom of="$dev" bs=1M count=1 oflag=direct status=none
table error
if flush; then fail "the flush after the disk failed under a dirty block succeeded"; fi
table linear

# The disk works again, but the block written before is lost: flushes keep failing.
for i in 1 2; do
	if flush; then fail "flush $i after a failed write-back succeeded"; fi
done
if dd if=/dev/zero of="$dev" bs=4k count=1 seek=100 oflag=direct,dsync status=none; then
	fail "a FUA write after a failed write-back succeeded"
fi
if dd if=/dev/zero of="$dev" bs=4k count=1 seek=200 oflag=direct status=none; then
	fail "a write after a failed write-back succeeded"
fi
if dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none; then
	fail "a read after a failed write-back succeeded"
fi
grep -q 'every read, write and flush of it fails' server.log || fail "the server did not log why flushes fail"
grep -q 'restart lvnbd' server.log || fail "the server's log does not say what to do"
lvnbd status >status
grep -q 'FAILED' status || fail "lvnbd status does not show the export failed: $(cat status)"
lvnbd status --json | grep -q '"failed": ".*restart lvnbd' || fail "lvnbd status --json has no reason"

lvnbd detach "$dev"
kill "$server"
wait "$server" || true
dmsetup remove wb
