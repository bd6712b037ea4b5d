#!/bin/bash
# timeout: 120
# A read-only export (NAME=PATH:ro) attaches read-only: the block device says so, writes fail,
# reads work, and the server's file is unchanged. --read-only makes a writable export's device
# read-only too.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
need_lvnbd

PORT=10809

dd if=/dev/urandom of=golden.img bs=1M count=8 status=none
want=$(sha golden.img)
truncate -s 8M rw.img
lvnbd serve --listen "tcp://127.0.0.1:$PORT" --export "golden=$PWD/golden.img:ro" --export "rw=$PWD/rw.img" 2>server.log &
server=$!
wait_for "[[ \$(tcp_sockets $PORT 0A) == 1 ]]" 10

# check_read_only DEV: DEV is read-only, refuses writes and reads fine.
check_read_only() {
	local dev=$1 n=${1#/dev/nbd}
	assert_eq 1 "$(blockdev --getro "$dev")" "blockdev --getro $dev"
	assert_eq 1 "$(cat "/sys/block/nbd$n/ro")" "/sys/block/nbd$n/ro"
	if dd if=/dev/urandom of="$dev" bs=4k count=1 oflag=direct conv=notrunc 2>err; then
		fail "O_DIRECT write to read-only $dev succeeded"
	fi
	cat err
	grep -qiE "read-only|not permitted|permission denied|input/output" err || fail "unexpected write error: $(cat err)"
	if dd if=/dev/urandom of="$dev" bs=4k count=1 conv=notrunc,fsync 2>err; then
		fail "buffered write to read-only $dev succeeded"
	fi
	lvnbd list | grep -qE "^$dev +[0-9.]+ MiB +ro +connected " || fail "lvnbd list does not show $dev read-only"
}

dev=$(lvnbd attach --connections 2 nbd://127.0.0.1:$PORT/golden)
check_read_only "$dev"
assert_eq "$want" "$(dd if="$dev" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1)" "read through $dev"
assert_eq "$want" "$(sha golden.img)" "the server's file"
lvnbd detach "$dev"

# A writable export attached with --read-only.
dev=$(lvnbd attach --read-only nbd://127.0.0.1:$PORT/rw)
check_read_only "$dev"
assert_eq 0 "$(stat -c %b rw.img)" "blocks of rw.img after refused writes"
lvnbd detach "$dev"

kill "$server"
wait "$server" || fail "server exited with $?: $(cat server.log)"
