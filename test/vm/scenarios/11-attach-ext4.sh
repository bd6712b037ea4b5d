#!/bin/bash
# timeout: 180
# ext4 on an attached device: mkfs, mount, write files, umount, e2fsck clean; detach is refused
# while mounted; after detach and a fresh attach the files are there with the same checksums.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
need_lvnbd

PORT=10809
URI=nbd://127.0.0.1:$PORT/fs

truncate -s 96M fs.img
lvnbd serve --listen "tcp://127.0.0.1:$PORT" --export "fs=$PWD/fs.img" 2>server.log &
server=$!
wait_for "[[ \$(tcp_sockets $PORT 0A) == 1 ]]" 10

dev=$(lvnbd attach --connections 2 "$URI")
mkfs.ext4 -q -F "$dev"
mkdir mnt
mount "$dev" mnt
mkdir mnt/dir
dd if=/dev/urandom of=mnt/big bs=1M count=12 status=none
for i in $(seq 1 50); do
	head -c $((i * 997)) /dev/urandom >"mnt/dir/small$i"
done
(cd mnt && find . -type f | sort | xargs sha256sum) >sums
sync

# Mounted: detach refuses and says why.
if lvnbd detach "$dev" 2>err; then fail "detach of a mounted device succeeded"; fi
grep -q "mounted on $PWD/mnt" err || fail "detach while mounted: $(cat err)"

umount mnt
e2fsck -fn "$dev"
lvnbd detach "$dev"
[[ ! -e /sys/block/${dev#/dev/}/pid ]] || fail "$dev still running after detach"

# The file system survives in the server's file, and a fresh attach sees it.
dev=$(lvnbd attach "$URI")
e2fsck -fn "$dev"
mount "$dev" mnt
(cd mnt && find . -type f | sort | xargs sha256sum) >sums2
diff sums sums2 || fail "files changed across detach and attach"
assert_eq 51 "$(wc -l <sums2)" "files after re-attach"
umount mnt
lvnbd detach "$URI"

kill "$server"
wait "$server" || fail "server exited with $?: $(cat server.log)"
