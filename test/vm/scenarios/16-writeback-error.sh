#!/bin/bash
# timeout: 120
# A write-back the disk failed is never forgotten. The server writes to its page cache and syncs
# on FLUSH; Linux reports a failed write-back to an open file once, so a second FLUSH would
# succeed although the data never reached the disk. Here the export's device fails while a
# written block is still dirty on the server, the first flush through the kernel's nbd device
# fails, the device is repaired, and every later flush, write and read must still fail: the
# export's contents can no longer be trusted, and a guest's mirror must not take it back.
# The failure is recorded: after a restart the export still fails, until lvnbd recover opens it
# anew, cuts its clients, and a reconnected device reads and writes again.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
need_lvnbd

PORT=10809
URI=nbd://127.0.0.1:$PORT/disk
SECTORS=$((64 << 11)) # 64 MiB

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
serve() {
	lvnbd serve --listen "tcp://127.0.0.1:$PORT" --export "disk=/dev/mapper/wb" \
		--failure-file "$PWD/failures.json" 2>>server.log &
	server=$!
	wait_for "[[ \$(tcp_sockets $PORT 0A) == 1 ]] || ! kill -0 $server" 10
	kill -0 "$server" || fail "the server exited: $(cat server.log)"
}
serve
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
grep -q 'lvnbd recover --help' server.log || fail "the server's log does not say what to do"
lvnbd status >status.out
grep -q 'FAILED' status.out || fail "lvnbd status does not show the export failed: $(cat status.out)"
lvnbd status --json | grep -q '"failed": ".*lvnbd recover' || fail "lvnbd status --json has no reason"
grep -q '"export": "disk"' failures.json || fail "the failure was not recorded: $(cat failures.json)"

# A restart does not make the export trustworthy again.
lvnbd detach "$dev"
kill "$server"
wait "$server" || true
serve
dev=$(lvnbd attach "$URI")
if dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none; then
	fail "a read after a restart succeeded although the write-back had failed before it"
fi
if dd if=/dev/zero of="$dev" bs=4k count=1 seek=300 oflag=direct status=none; then
	fail "a write after a restart succeeded although the write-back had failed before it"
fi
if flush; then fail "a flush after a restart succeeded although the write-back had failed before it"; fi
lvnbd status >status.out
grep -q 'disk: FAILED: .*recorded' status.out || fail "lvnbd status after the restart: $(cat status.out)"

# lvnbd recover opens it anew and cuts the failed export's connection; the device reconnects.
lvnbd recover disk >recover.out || fail "lvnbd recover: $(cat recover.out)"
grep -q 'export disk recovered.* 1 connection' recover.out || fail "lvnbd recover said: $(cat recover.out)"
if lvnbd status | grep -q FAILED; then fail "still FAILED after lvnbd recover"; fi
if grep -q '"export": "disk"' failures.json; then fail "lvnbd recover left the record: $(cat failures.json)"; fi
lvnbd reconnect "$dev"
dd if=/dev/urandom of=data bs=64k count=1 status=none
dd if=data of="$dev" bs=64k count=1 seek=3 oflag=direct,dsync status=none || fail "a FUA write after recovering failed"
flush || fail "a flush after recovering failed"
dd if="$dev" of=back bs=64k skip=3 count=1 iflag=direct status=none || fail "a read after recovering failed"
cmp data back || fail "the data written after recovering does not read back"

lvnbd detach "$dev"
kill "$server"
wait "$server" || true
dmsetup remove wb
