#!/bin/bash
# timeout: 120
# A discard on an attached device reaches the server: blkdiscard of a range punches a hole of
# that size into the server's backing file, and the range reads back as zeroes while the data
# around it is untouched.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
need_lvnbd

PORT=10809
URI=nbd://127.0.0.1:$PORT/disk

# allocated FILE: bytes of FILE backed by storage.
allocated() { echo $(($(stat -c %b "$1") * 512)); }

truncate -s 64M disk.img
lvnbd serve --listen "tcp://127.0.0.1:$PORT" --export "disk=$PWD/disk.img" 2>server.log &
server=$!
wait_for "[[ \$(tcp_sockets $PORT 0A) == 1 ]]" 10

dev=$(lvnbd attach "$URI")
n=${dev#/dev/nbd}
[[ $(cat "/sys/block/nbd$n/queue/discard_max_bytes") -gt 0 ]] || fail "$dev does not support discard"

# 16 MiB of data at offset 0.
dd if=/dev/urandom of=src bs=1M count=16 status=none
dd if=src of="$dev" bs=1M oflag=direct conv=fsync status=none
before=$(allocated disk.img)
[[ $before -ge $((16 << 20)) ]] || fail "only $before bytes allocated after writing 16 MiB"

# Discard 8 MiB at offset 4 MiB.
blkdiscard -o $((4 << 20)) -l $((8 << 20)) "$dev"
after=$(allocated disk.img)
freed=$((before - after))
echo "allocated before $before, after $after: $freed bytes freed"
[[ $freed -ge $((8 << 20)) && $freed -le $(((8 << 20) + (64 << 10))) ]] ||
	fail "discarding 8 MiB freed $freed bytes of the server's file"

# The hole reads as zeroes, on the server and through the device; the rest is intact.
echo 3 >/proc/sys/vm/drop_caches
zero=$(head -c $((8 << 20)) /dev/zero | sha256sum | cut -d' ' -f1)
assert_eq "$zero" "$(dd if=disk.img bs=1M skip=4 count=8 status=none | sha256sum | cut -d' ' -f1)" "hole in the file"
assert_eq "$zero" "$(dd if="$dev" bs=1M skip=4 count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1)" "hole through $dev"
for range in "0 4" "12 4"; do
	read -r skip count <<<"$range"
	want=$(dd if=src bs=1M skip="$skip" count="$count" status=none | sha256sum | cut -d' ' -f1)
	got=$(dd if="$dev" bs=1M skip="$skip" count="$count" iflag=direct status=none | sha256sum | cut -d' ' -f1)
	assert_eq "$want" "$got" "data at ${skip} MiB"
done

lvnbd detach "$dev"
kill "$server"
wait "$server" || fail "server exited with $?: $(cat server.log)"
