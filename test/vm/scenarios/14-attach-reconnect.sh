#!/bin/bash
# timeout: 360
# The server dies (SIGKILL): the kernel reports the dead connections (lvnbd list --watch), and
# I/O on the device fails after the dead-connection timeout instead of hanging. The server comes
# back with a grown file; lvnbd reconnect gives the device fresh connections and the new size
# without detaching, and the data flushed before the kill is intact. Also: lvnbd reconnect
# --size pushes a grown export's size to a live device, never shrinks it, and reconnect refuses
# another export's URI.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
need_lvnbd

PORT=10809
URI=nbd://127.0.0.1:$PORT/disk

# serve PORT: start a server for disk.img on PORT; sets $server.
serve() {
	lvnbd serve --listen "tcp://127.0.0.1:$1" --export "disk=$PWD/disk.img" 2>>"server-$1.log" &
	server=$!
	wait_for "[[ \$(tcp_sockets $1 0A) == 1 ]]" 10
}
size_of() { blockdev --getsize64 "$1"; }

truncate -s 64M disk.img
serve $PORT
# A request timeout well above what an emulated (TCG) guest under load can take for a
# healthy request; the dead-connection timeout is what this scenario is about.
dev=$(lvnbd attach --connections 2 --timeout 30s --dead-timeout 10s "$URI")
n=${dev#/dev/nbd}

dd if=/dev/urandom of=src bs=1M count=16 status=none
want=$(sha src)
dd if=src of="$dev" bs=1M oflag=direct conv=fsync status=none

# The export grows (lvextend, say): reconnect --size asks the device's server for the new size,
# and the live device grows.
truncate -s 96M disk.img
lvnbd reconnect --size "$dev"
assert_eq $((96 << 20)) "$(size_of "$dev")" "size after reconnect --size"
# Nothing to do when the size is unchanged.
assert_eq "$dev" "$(lvnbd reconnect --size "$dev")" "reconnect --size, same size"
assert_eq $((96 << 20)) "$(size_of "$dev")" "size after a second reconnect --size"

# Watch for LINK_DEAD, then kill the server.
lvnbd list --watch --json >events 2>watch.err &
watcher=$!
sleep 1
kill -9 "$server"
wait "$server" || true
wait_for "grep -q '\"device\":\"$dev\"' events" 20
grep '"event":"link-dead"' events

# I/O fails after the dead-connection timeout (10 s) instead of hanging.
start=$SECONDS
rc=0
timeout 90 dd if="$dev" of=/dev/null bs=4k count=1 skip=100 iflag=direct || rc=$?
elapsed=$((SECONDS - start))
echo "read with the server dead: exit $rc after ${elapsed}s"
[[ $rc -ne 0 ]] || fail "read succeeded with the server dead"
# busybox timeout exits 143 (SIGTERM) when it had to stop dd; coreutils 124.
[[ $rc -ne 124 && $rc -ne 143 ]] || fail "read hung for 90 s with the server dead"
[[ $elapsed -le 60 ]] || fail "read took ${elapsed}s to fail"
[[ $elapsed -ge 8 ]] || fail "read failed after ${elapsed}s, before the 10 s dead-connection timeout"
# The device is still attached, waiting for new connections.
[[ -e /sys/block/nbd$n/pid ]] || fail "$dev was torn down"
lvnbd list | grep -qE "^$dev .* connected +$URI\$" || fail "lvnbd list: $(lvnbd list)"

# The server comes back, its file grown again; reconnect brings the device back without a detach
# and grows it along.
truncate -s 128M disk.img
serve $PORT
lvnbd reconnect --connections 2 "$dev"
assert_eq $((128 << 20)) "$(size_of "$dev")" "size after reconnect"
echo 3 >/proc/sys/vm/drop_caches
got=$(dd if="$dev" bs=1M count=16 iflag=direct status=none | sha256sum | cut -d' ' -f1)
assert_eq "$want" "$got" "data written before the kill"
assert_eq 2 "$(tcp_sockets $PORT 01)" "server-side connections after reconnect"

# Writes work again, in the grown part too.
dd if=src of="$dev" bs=1M seek=100 oflag=direct conv=fsync status=none
got=$(dd if="$dev" bs=1M skip=100 count=16 iflag=direct status=none | sha256sum | cut -d' ' -f1)
assert_eq "$want" "$got" "data written after reconnect"

# I/O waiting for the dead-connection timeout resumes when fresh connections come in time
# (the timeout raised to 60 s for slow emulation).
lvnbd reconnect --dead-timeout 60s "$dev"
kill -9 "$server"
wait "$server" || true
wait_for "[[ \$(grep -c '\"device\":\"$dev\"' events) -ge 4 ]]" 20
start=$SECONDS
dd if="$dev" bs=1M count=16 iflag=direct status=none >during &
reader=$!
sleep 2
serve $PORT
lvnbd reconnect --connections 2 "$dev"
wait "$reader" || fail "read across the reconnect failed"
echo "read across the reconnect took $((SECONDS - start))s"
assert_eq "$want" "$(sha during)" "data read across the reconnect"

# A device never shrinks in place.
truncate -s 64M disk.img
if lvnbd reconnect --size "$dev" 2>err; then fail "reconnect shrank $dev"; fi
grep -q "shrank" err || fail "reconnect to a smaller export: $(cat err)"
truncate -s 96M disk.img

# A device is never reconnected to another export: its data would change under its users.
truncate -s 96M disk2.img
lvnbd serve --listen tcp://127.0.0.1:10811 --export "disk=$PWD/disk2.img" 2>>server-10811.log &
other=$!
wait_for "[[ \$(tcp_sockets 10811 0A) == 1 ]]" 10
for opt in "" --size; do
	if lvnbd reconnect ${opt:+"$opt"} "$dev" nbd://127.0.0.1:10811/disk 2>err; then fail "reconnect $opt moved $dev to another export"; fi
	grep -q "fresh connections to its own export" err || fail "reconnect $opt to another export: $(cat err)"
done
kill "$other"

kill "$watcher"
lvnbd detach "$dev"
kill "$server"
wait "$server" || fail "server exited with $?: $(cat server-$PORT.log)"
