#!/bin/bash
# timeout: 360
# lvnbd guest create: the mirror a domU builds over a volume's two legs. Two storage boxes (lvnbd
# serve, each with an LVM VG on a ramdisk) export vm1; both legs are attached as NBD devices and
# mirrored with md RAID1 (metadata 1.2, internal bitmap, failfast legs), with ext4 on top. Files
# written with fsync by a background writer read back with their checksums, a check of the
# mirror finds no mismatch, and lvnbd guest status reports it. Also: guest create refuses legs
# that carry a filesystem or are in use, naming what it found, and --force overrides the former.
#
# Scenarios 26-29 source this file for its helpers (GUEST_LIB_ONLY=1): it then only defines them.
# Between the VM-CAPTURE markers it prints real md output for guest/'s parser tests
# (test/vm/run.sh --capture guest/testdata 25-guest-mirror 26-guest-failover ...).
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
need_lvnbd

ARRAY=/dev/md/vm1
PORT_A=10809
PORT_B=10810
CTL_A=/run/lvnbd/a.sock
CTL_B=/run/lvnbd/b.sock
# When a storage box dies, requests in flight on its connection fail after the request timeout
# (--timeout), and later ones after the dead-connection timeout: the kernel marks the connection
# dead at once (ECONNRESET) but does not requeue what was in flight. So a leg fails within
# --timeout plus --dead-timeout. The request timeout must also outlast a slow but live server:
# an unanswered request fails the connection, and the leg.
ATTACH=(--timeout 10s --dead-timeout 5s)
srv_a='' srv_b='' # pids of the storage boxes, set by serve_box
watcher='' # pid of a scenario's lvnbd guest watch

# serve_box a|b: (re)start storage box A or B; sets srv_a or srv_b.
serve_box() {
	local box=$1 port ctl
	if [[ $box == a ]]; then port=$PORT_A ctl=$CTL_A; else port=$PORT_B ctl=$CTL_B; fi
	rm -f "$ctl" # a killed server leaves its socket behind
	lvnbd serve --volumes "lvm://vg$box" --listen "tcp://127.0.0.1:$port" --control "$ctl" \
		--fence-file= --failure-file "$PWD/failures-$box.json" --rescan 0 >>"server-$box.log" 2>&1 &
	printf -v "srv_$box" %s "$!"
	wait_started $! "server-$box.log" "[[ -S $ctl && \$(tcp_sockets $port 0A) == 1 ]]" 90
}

# box a|b ARGS...: lvnbd ARGS... against storage box A's or B's volumes (volume, snapshot).
box() {
	local b=$1
	shift
	if [[ $b == a ]]; then lvnbd "$@" --volumes lvm://vga --control "$CTL_A"; else lvnbd "$@" --volumes lvm://vgb --control "$CTL_B"; fi
}

# guest_setup [SIZE]: two storage boxes, each with volume vm1 of SIZE (default 64M) on its own
# ramdisk VG; both attached (LEG_A, LEG_B); the mirror $ARRAY over them with ext4, mounted on mnt.
# MD is the array's kernel name (md127).
guest_setup() {
	local size=${1:-64M}
	pvcreate -q /dev/ram0 /dev/ram1
	vgcreate -q vga /dev/ram0
	vgcreate -q vgb /dev/ram1
	trap guest_cleanup EXIT
	serve_box a
	serve_box b
	box a volume create vm1 --size "$size"
	box b volume create vm1 --size "$size"
	LEG_A=$(lvnbd attach "${ATTACH[@]}" "nbd://127.0.0.1:$PORT_A/vm1")
	LEG_B=$(lvnbd attach "${ATTACH[@]}" "nbd://127.0.0.1:$PORT_B/vm1")
	# 1 MiB bitmap chunks (mdadm's default is 64 MiB, the whole test volume): a returning leg
	# then visibly resyncs only part of the array.
	assert_eq "$ARRAY" "$(lvnbd guest create --name vm1 --filesystem ext4 --bitmap-chunk 1M "$LEG_A" "$LEG_B")" \
		"guest create prints the array"
	MD=$(basename "$(readlink -f "$ARRAY")")
	[[ $MD == md* && -d /sys/block/$MD/md ]] || fail "$ARRAY is not an md array"
	mkdir -p mnt
	mount "$ARRAY" mnt
}

# guest_cleanup: unmount and stop the array, detach the legs, so that even a failed scenario
# leaves the nbd devices free for the next one.
guest_cleanup() {
	local rc=$? m
	{ set +ex; } 2>/dev/null
	for m in snapmnt mnt; do grep -q " $PWD/$m " /proc/mounts && umount "$m"; done
	[[ -e /sys/block/${MD:-none}/md ]] && mdadm --stop "$ARRAY" >/dev/null 2>&1
	for m in ${LEG_A:-} ${LEG_B:-}; do [[ -e /sys/block/${m#/dev/}/pid ]] && lvnbd detach "$m" >/dev/null 2>&1; done
	# Background processes holding the scenario's output open would keep run.sh --verbose's tee
	# waiting.
	for m in ${watcher:-} ${srv_a:-} ${srv_b:-}; do kill "$m" 2>/dev/null; done
	exit "$rc"
}

# mdattr NAME: /sys/block/$MD/md/NAME.
mdattr() { cat "/sys/block/$MD/md/$1"; }
# legstate DEV: the md state flags of leg DEV.
legstate() { cat "/sys/block/$MD/md/dev-${1#/dev/}/state"; }

# wait_in_sync SECS: wait until no sync action runs and no slot lacks an in-sync leg.
wait_in_sync() {
	wait_for "[[ \$(mdattr sync_action) == idle && \$(mdattr degraded) == 0 ]]" "$1"
}

# check_mirror SECS: a full check of the mirror (both legs read and compared) finds no mismatch.
check_mirror() {
	sync
	echo check >"/sys/block/$MD/md/sync_action"
	wait_for "[[ \$(mdattr last_sync_action) == check && \$(mdattr sync_action) == idle ]]" "$1"
	assert_eq 0 "$(mdattr mismatch_cnt)" "mismatch_cnt after a check"
}

# writer NAME COUNT: writes COUNT files of 128 KiB to mnt/NAME/, each with fsync, appending its
# checksum to NAME.sums once written; fails at the first error. Run it in the background.
writer() {
	local name=$1 count=$2 i
	mkdir -p "mnt/$name"
	for ((i = 1; i <= count; i++)); do
		head -c $((128 << 10)) /dev/urandom >"$name.tmp"
		dd if="$name.tmp" of="mnt/$name/f$i" bs=128k conv=fsync status=none
		echo "$(sha "$name.tmp")  $name/f$i" >>"$name.sums"
	done
}

# written NAME: how many files writer NAME has finished.
written() { if [[ -f $1.sums ]]; then wc -l <"$1.sums"; else echo 0; fi; }

# verify_files SUMS...: every file in the checksum lists reads back intact, from the disks.
verify_files() {
	echo 3 >/proc/sys/vm/drop_caches
	local s
	for s in "$@"; do
		(cd mnt && sha256sum -c "../$s" >/dev/null) || fail "files of $s do not match their checksums"
	done
}

# no_fs_errors: the kernel logged no filesystem or md-level I/O error during the scenario (the
# failed leg's own nbd errors are expected).
no_fs_errors() {
	if dmesg | grep -E "EXT4-fs (error|warning)|I/O error, dev $MD|Buffer I/O error on dev $MD|JBD2.*error"; then
		fail "filesystem or md I/O errors in the kernel log"
	fi
}

# json_field JSON KEY: the first string or number value of KEY in JSON (flat grep, enough here).
json_field() { grep -o "\"$2\": *\"\{0,1\}[^\",]*" <<<"$1" | head -n1 | sed 's/.*: *"\{0,1\}//'; }

# capture_md PREFIX: capture /proc/mdstat, the array's sysfs attributes and mdadm's export.
capture_md() {
	capture "mdstat-$1.txt" cat /proc/mdstat
	capture "sysfs-$1.txt" sysfs_dump "$MD"
	capture "detail-export-$1.txt" mdadm --detail --export "$ARRAY"
}

# sysfs_dump MDX: dev, size and md/... of /sys/block/MDX as PATH:VALUE lines, sorted; what
# guest/'s tests load as a fake sysfs.
sysfs_dump() {
	# grep exits 2 for the write-only attributes (new_dev, bitmap_set_bits).
	(cd "/sys/block/$1" && { grep -r . dev size md 2>/dev/null || true; } | sort)
}

[[ -n ${GUEST_LIB_ONLY:-} ]] && return 0

# --- guest create refuses legs with data, and legs in use ------------------------------------
mkfs.ext4 -q /dev/ram2
if lvnbd guest create --name scratch /dev/ram2 /dev/ram3 2>err; then fail "guest create over an ext4 leg succeeded"; fi
cat err
grep -q "/dev/ram2: ext2/3/4 filesystem" err || fail "the refusal does not name the filesystem: $(cat err)"
[[ ! -e /dev/md/scratch ]] || fail "a refused create left /dev/md/scratch"
if lvnbd guest create --name scratch /dev/ram3 /dev/ram3 2>err; then fail "guest create with one device twice succeeded"; fi
grep -q "same device" err || fail "same device twice: $(cat err)"
lvnbd guest create --name scratch --force /dev/ram2 /dev/ram3 2>err
grep -q "overwrote: /dev/ram2: ext2/3/4 filesystem" err || fail "--force does not say what it overwrote: $(cat err)"
[[ -b /dev/md/scratch ]] || fail "no /dev/md/scratch after --force"
# The legs now carry md superblocks and are in use.
if lvnbd guest create --name again /dev/ram2 /dev/ram3 2>err; then fail "guest create over legs in use succeeded"; fi
grep -q "in use by md" err || fail "in use: $(cat err)"

# --- the mirror over two NBD legs -----------------------------------------------------------
capture examine-blank.txt bash -c 'mdadm --examine --export /dev/ram0 2>&1; echo "exit status: $?"'
# Slow the initial resync down to capture it in progress.
echo 200 >/proc/sys/dev/raid/speed_limit_max
echo 100 >/proc/sys/dev/raid/speed_limit_min
guest_setup 64M
for leg in "$LEG_A" "$LEG_B"; do
	[[ $(legstate "$leg") == *failfast* ]] || fail "leg $leg is not failfast: $(legstate "$leg")"
done
assert_eq internal "$(mdattr bitmap/metadata)" "bitmap"
assert_eq 1048576 "$(mdattr bitmap/chunksize)" "bitmap chunk"
assert_eq 1.2 "$(mdattr metadata_version)" "metadata"
wait_for "[[ \$(mdattr sync_action) == resync ]]" 30
capture_md resync
mdadm --stop /dev/md/scratch
json=$(lvnbd guest status --json)
echo "$json"
assert_eq resyncing "$(json_field "$json" health)" "health during the initial resync"
grep -q '"action": "resync"' <<<"$json" || fail "status --json shows no resync"
echo 200000 >/proc/sys/dev/raid/speed_limit_max
echo 1000 >/proc/sys/dev/raid/speed_limit_min
wait_in_sync 180
capture_md healthy
capture examine-export-member.txt mdadm --examine --export "$LEG_A"
capture dumpe2fs-h.txt dumpe2fs -h "$ARRAY"
capture mountinfo.txt cat /proc/self/mountinfo

json=$(lvnbd guest status --json)
echo "$json"
assert_eq healthy "$(json_field "$json" health)" "health"
assert_eq "$ARRAY" "$(json_field "$json" path)" "status path"
assert_eq 2 "$(grep -c '"in_sync"' <<<"$json")" "in-sync legs in status --json"
lvnbd guest status | tee status
grep -qE "^$ARRAY +/dev/$MD +[0-9.]+ MiB +healthy" status || fail "guest status table: $(cat status)"

# Files with fsync from a background writer, and a second batch in the foreground.
writer w1 40 >w1.log 2>&1 &
wpid=$!
writer w2 20
wait "$wpid" || fail "writer failed: $(cat w1.log)"
assert_eq 40 "$(written w1)" "files written by w1"
verify_files w1.sums w2.sums
check_mirror 180
no_fs_errors

umount mnt
e2fsck -fn "$ARRAY"
mdadm --stop "$ARRAY"
lvnbd detach "$LEG_A"
lvnbd detach "$LEG_B"
kill "$srv_a" "$srv_b"
wait "$srv_a" || fail "server A exited with $?: $(cat server-a.log)"
wait "$srv_b" || fail "server B exited with $?: $(cat server-b.log)"
