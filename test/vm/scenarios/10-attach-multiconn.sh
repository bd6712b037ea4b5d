#!/bin/bash
# timeout: 300
# lvnbd attach with 4 connections to an lvnbd serve export on a sparse tmpfs file: 64 MiB of
# random data written with O_DIRECT reads back identical after dropping caches (through the
# device and in the server's file), lvnbd list shows the device, and detach leaves the device
# unconfigured.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
need_lvnbd

PORT=10809
URI=nbd://127.0.0.1:$PORT/disk

# tcp_sockets PORT STATE: how many TCP sockets have local port PORT in STATE (hex, as in
# /proc/net/tcp: 0A listening, 01 established).

truncate -s 128M disk.img
lvnbd serve --listen "tcp://127.0.0.1:$PORT" --export "disk=$PWD/disk.img" 2>server.log &
server=$!
wait_for "[[ \$(tcp_sockets $PORT 0A) == 1 ]]" 10

dev=$(lvnbd attach --connections 4 --timeout 30s "$URI")
[[ $dev =~ ^/dev/nbd[0-9]+$ ]] || fail "attach printed '$dev', not a device"
n=${dev#/dev/nbd}
[[ -b $dev ]] || fail "$dev is not a block device"
assert_eq $((128 << 20)) "$(blockdev --getsize64 "$dev")" "device size"
assert_eq 0 "$(blockdev --getro "$dev")" "read-only flag"
assert_eq "$URI" "$(cat "/sys/block/nbd$n/backend")" "backend identifier in sysfs"
# The server holds exactly the 4 connections: none left over from the handshakes.
assert_eq 4 "$(tcp_sockets $PORT 01)" "server-side connections"

# lvnbd list: table and JSON.
list=$(lvnbd list)
echo "$list"
grep -qE "^$dev +128 MiB +rw +connected +$URI\$" <<<"$list" || fail "lvnbd list does not show $dev"
json=$(lvnbd list --json)
echo "$json"
grep -q "\"device\":\"$dev\"" <<<"$json" || fail "lvnbd list --json lacks $dev"
grep -q '"state":"connected"' <<<"$json" || fail "lvnbd list --json: not connected"
grep -q "\"backend\":\"$URI\"" <<<"$json" || fail "lvnbd list --json lacks the backend"

# Attaching the same export twice is refused.
if lvnbd attach "$URI" 2>err; then fail "second attach of $URI succeeded"; fi
grep -q "already attached as $dev" err || fail "second attach: $(cat err)"

# 64 MiB of random data, written with O_DIRECT at offset 1 MiB.
dd if=/dev/urandom of=src bs=1M count=64 status=none
want=$(sha src)
dd if=src of="$dev" bs=1M seek=1 oflag=direct conv=fsync status=none
echo 3 >/proc/sys/vm/drop_caches
got=$(dd if="$dev" bs=1M skip=1 count=64 iflag=direct status=none | sha256sum | cut -d' ' -f1)
assert_eq "$want" "$got" "data read back through $dev"
# The server wrote it to its file (flushed by conv=fsync).
got=$(dd if=disk.img bs=1M skip=1 count=64 status=none | sha256sum | cut -d' ' -f1)
assert_eq "$want" "$got" "data in the server's file"
# Buffered reads (through the page cache, several requests in flight) agree too.
echo 3 >/proc/sys/vm/drop_caches
got=$(dd if="$dev" bs=1M skip=1 count=64 status=none | sha256sum | cut -d' ' -f1)
assert_eq "$want" "$got" "buffered read back through $dev"

# Detach by device: no configuration left.
lvnbd detach "$dev"
[[ ! -e /sys/block/nbd$n/pid ]] || fail "$dev still has a pid after detach"
assert_eq 0 "$(cat "/sys/block/nbd$n/size")" "size after detach"
[[ ! -e /sys/block/nbd$n/backend ]] || fail "$dev still has a backend after detach"
list=$(lvnbd list)
if grep -q "^$dev " <<<"$list"; then fail "lvnbd list still shows $dev: $list"; fi
if lvnbd detach "$dev" 2>err; then fail "second detach succeeded"; fi
grep -q "not attached" err || fail "second detach: $(cat err)"

# Attach again and detach by URI.
dev=$(lvnbd attach --connections 2 "$URI")
lvnbd detach "$URI"
[[ ! -e /sys/block/nbd${dev#/dev/nbd}/pid ]] || fail "$dev still running after detach by URI"

kill "$server"
wait "$server" || fail "server exited with $?: $(cat server.log)"
