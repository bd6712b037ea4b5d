#!/usr/bin/env bash
# VM test suite for lvnbd.
#
# The host kernel may lack nbd, device-mapper and md, so this boots Debian's kernel
# (linux-image-amd64) under qemu (TCG, no KVM needed) with a small initramfs built here, and
# runs test/vm/scenarios/NAME.sh inside it. See test/vm/README.md.
#
# Usage: test/vm/run.sh [--lvnbd PATH] [--no-skip] [--keep] [--verbose] [--capture DIR]
#                       [--log FILE] [SCENARIO...]
set -euo pipefail

# Kernel modules /init loads, in order, one per entry: "name [param=value...]".
# Their dependencies are resolved on the host and copied too.
# crc32c first: ext4 and dm-persistent-data need the crc32c crypto driver, which the kernel would
# otherwise have to request through a usermode modprobe at an awkward moment.
MODULES=(
	"crc32c_generic"
	"crc32c-intel"             # optional: needs SSE4.2 (-cpu max has it); failure is harmless
	"nbd nbds_max=16"
	"dm-mod"
	"dm-bufio"
	"dm-persistent-data"
	"dm-snapshot"
	"dm-thin-pool"
	"md-mod"
	"raid1"
	"brd rd_nr=4 rd_size=262144" # 4 x 256 MiB ramdisks; pages are only allocated when written
	"loop"
	"ext4"
	"veth"
	"sch_tbf"
)

# Host executables copied into the initramfs (with their shared libraries and the symlinks that
# point at them, such as lvcreate -> lvm). They take precedence over busybox applets of the same
# name. bash runs the scenarios: busybox ash always prefers its own applets (ip, tc, losetup...)
# over anything on PATH, and those applets lack features the scenarios need (ip netns, tc qdisc).
BINARIES=(
	bash
	dd # GNU dd: busybox's lacks oflag=dsync, which makes the kernel send FUA writes
	lvm dmsetup
	mdadm
	mke2fs e2fsck resize2fs dumpe2fs tune2fs
	blkdiscard blockdev losetup wipefs
	ip tc
	udevadm # also systemd-udevd, under that name: only 18-attach-udev starts it
)

# Debian packages the suite needs on the host.
PACKAGES=(
	qemu-system-x86 linux-image-amd64 busybox-static kmod cpio gzip xz-utils
	lvm2 dmsetup mdadm e2fsprogs util-linux iproute2 udev
)

# How the initramfs archive is compressed. The kernel unpacks an uncompressed archive directly;
# "gzip -1" works too but costs about 1.5 s of emulated decompression on every boot.
COMPRESS=(cat)

DEFAULT_TIMEOUT=120 # seconds per scenario unless it has a "# timeout: N" header
BOOT_MARGIN=90      # seconds on top of the scenario timeouts for boot, cleanup and power-off

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache="$here/.cache"

usage() {
	cat <<EOF
Usage: $0 [options] [SCENARIO...]

Boots Debian's kernel under qemu and runs the named scenarios from test/vm/scenarios
(NAME or NAME.sh; default: all of them, in order).

Options:
  --lvnbd PATH    lvnbd binary to put in the guest as /bin/lvnbd (default: bin/lvnbd in the
                  repository, if it exists)
  --no-skip       count a skipped scenario as failed (make test-vm: CI cannot pass by skipping)
  --keep          do not power off after the scenarios: leave a shell on the console
                  (interactive; needs a terminal; no overall timeout)
  --verbose       print every scenario's output once it ends, not only the failing ones
  --capture DIR   save the blocks that scenarios print with lib.sh's capture helper to DIR/NAME
  --log FILE      console log file (default: test/vm/.cache/console.log)
  -h, --help      this text
EOF
}

lvnbd="$repo/bin/lvnbd"
lvnbd_explicit=0
no_skip=0
keep=0
verbose=0
capture_dir=
log="$cache/console.log"
selected=()
while (($#)); do
	case "$1" in
	--lvnbd) lvnbd=${2:?--lvnbd needs a path}; lvnbd_explicit=1; shift 2 ;;
	--no-skip) no_skip=1; shift ;;
	--keep) keep=1; shift ;;
	--verbose) verbose=1; shift ;;
	--capture) capture_dir=${2:?--capture needs a directory}; shift 2 ;;
	--log) log=${2:?--log needs a file}; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	-*) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
	*) selected+=("$(basename "${1%.sh}")"); shift ;;
	esac
done

log_step() { echo "vm: $*" >&2; }
die() { echo "vm: $*" >&2; exit 1; }

# --- host packages ---------------------------------------------------------------------------

# install_packages, shared with test/systemd/run.sh.
# shellcheck source=SCRIPTDIR/../lib/packages.sh
source "$repo/test/lib/packages.sh"

# --- inputs ------------------------------------------------------------------------------------

# find_kernel and boot_kernel, shared with test/systemd/run.sh.
# shellcheck source=SCRIPTDIR/../lib/kernel.sh
source "$repo/test/lib/kernel.sh"

scenario_names() {
	local f n
	for f in "$here"/scenarios/*.sh; do
		n=$(basename "$f" .sh)
		# lib.sh and *-lib.sh are sourced by scenarios, not run as one.
		[[ $n == lib || $n == *-lib ]] || echo "$n"
	done
}

scenario_timeout() {
	local t
	t=$(sed -n 's/^# timeout: *\([0-9][0-9]*\).*/\1/p' "$here/scenarios/$1.sh" | head -n1)
	echo "${t:-$DEFAULT_TIMEOUT}"
}

# --- initramfs ---------------------------------------------------------------------------------

# Copies a host file to the same path under the staging root, following symlinks.
stage_file() {
	local src=$1 dst=$root${2:-$1}
	[[ -e $dst ]] && return 0
	mkdir -p "$(dirname "$dst")"
	cp -L "$src" "$dst"
}

# Copies an executable and every shared library ldd resolves for it (ldd already lists the whole
# closure), plus the dynamic loader it names.
stage_executable() {
	local exe=$1 dst=${2:-$1} lib
	stage_file "$exe" "$dst"
	# "not a dynamic executable" (static binaries such as lvnbd) leaves nothing to copy.
	while read -r lib; do
		stage_file "$lib"
	done < <(ldd "$exe" 2>/dev/null | grep -oE '(^|[[:space:]])/[^ ]+' | sed 's/^[[:space:]]*//' | sort -u)
}

stage_binaries() {
	local name path real link
	for name in "${BINARIES[@]}"; do
		path=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin command -v "$name") || die "$name not found on the host"
		real=$(readlink -f "$path")
		# Usr-merged Debian: /sbin is /usr/sbin, so keep the /usr path only.
		stage_executable "$real" "/usr/${real#/usr/}"
		# Aliases such as lvcreate -> lvm, mkfs.ext4 -> mke2fs, fsck.ext4 -> e2fsck.
		while read -r link; do
			[[ $(readlink -f "$link") == "$real" ]] || continue
			[[ -e $root$link || -L $root$link ]] || ln -s "$(basename "$real")" "$root$link"
		done < <(find "$(dirname "$real")" -maxdepth 1 -type l \( -lname "$(basename "$real")" -o -lname "*/$(basename "$real")" \))
	done
}

stage_modules() {
	local kver=$1 entry name line mods=()
	for entry in "${MODULES[@]}"; do
		name=${entry%% *}
		# -C /dev/null: ignore the host's modprobe.d options (Debian's mdadm sets md-mod start_ro=1).
		while read -r line; do
			case "$line" in
			insmod\ *) line=${line#insmod }; mods+=("${line%% *}") ;;
			builtin\ *) ;;
			*) die "unexpected modprobe output for $name: $line" ;;
			esac
		done < <(modprobe -C /dev/null -S "$kver" --show-depends "$name")
	done
	local m
	for m in $(printf '%s\n' "${mods[@]}" | sort -u); do
		stage_file "$m" "/usr$m"
	done
	# modules.builtin/order let modprobe recognise built-in names; depmod writes a modules.dep
	# for just the copied modules, which busybox modprobe reads.
	for m in modules.builtin modules.builtin.modinfo modules.order; do
		stage_file "/lib/modules/$kver/$m" "/usr/lib/modules/$kver/$m"
	done
	depmod -b "$root" "$kver"
	printf "%s\n" "${MODULES[@]}" >"$root/etc/vm/modules"
}

stage_busybox() {
	local applet base
	# busybox-static's binary (the dynamic "busybox" package conflicts with it).
	stage_file /bin/busybox /usr/bin/busybox
	# Applets fill only the names real binaries do not already own, in either bin directory:
	# a busybox /usr/sbin/ip would shadow the real /usr/bin/ip on PATH.
	while read -r applet; do
		base=${applet##*/}
		[[ -e $root/usr/bin/$base || -e $root/usr/sbin/$base ]] && continue
		ln -s /usr/bin/busybox "$root/usr/${applet#usr/}"
	done < <("$root/usr/bin/busybox" --list-full | grep /)
}

build_initramfs() {
	local kver=$1 out=$2 d
	root=$(mktemp -d "$cache/root.XXXXXX")
	# Usr-merged layout like the host, so absolute paths (/sbin/lvm, /bin/sh, the /lib64 loader)
	# resolve the same way inside the guest.
	mkdir -p "$root"/usr/{bin,sbin,lib,lib64} "$root"/{dev,proc,sys,run,tmp,mnt,etc/vm,etc/lvm,etc/mdadm,vm,root}
	for d in bin sbin lib lib64; do ln -s "usr/$d" "$root/$d"; done

	stage_binaries
	stage_busybox
	stage_modules "$kver"
	stage_file /etc/mke2fs.conf
	cp "$here/guest/lvm.conf" "$root/etc/lvm/lvm.conf"
	# A Debian dom0's udev rules (systemd-udevd's, mdadm's, LVM's) and the one lvnbd ships, for
	# the scenario that runs udevd; no other starts it.
	mkdir -p "$root/usr/lib/udev/rules.d" "$root/usr/lib/systemd"
	cp /usr/lib/udev/rules.d/*.rules "$repo"/packaging/udev/*.rules "$root/usr/lib/udev/rules.d/"
	ln -s /usr/bin/udevadm "$root/usr/lib/systemd/systemd-udevd"
	# No udev (outside 18-attach-udev) and no config scanning: mdadm only assembles what a
	# scenario asks for.
	printf 'DEVICE partitions\nAUTO -all\nHOMEHOST <none>\n' >"$root/etc/mdadm/mdadm.conf"
	ln -s /proc/self/mounts "$root/etc/mtab"
	printf 'root:x:0:0:root:/root:/bin/bash\n' >"$root/etc/passwd"
	printf 'root:x:0:\n' >"$root/etc/group"
	install -m 0755 "$here/guest/init" "$root/init"
	mkdir -p "$root/vm/scenarios"
	cp "$here"/scenarios/*.sh "$root/vm/scenarios/"
	if [[ -f $lvnbd ]]; then
		stage_executable "$lvnbd" /usr/bin/lvnbd
		chmod 0755 "$root/usr/bin/lvnbd"
	fi

	# Sorted, root-owned entries so the archive depends only on its inputs.
	(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) |
		"${COMPRESS[@]}" >"$out.$$.tmp"
	mv "$out.$$.tmp" "$out"
	rm -rf "$root"
}


# Everything the initramfs is made of, so it is rebuilt exactly when one of them changes.
inputs_hash() {
	local kver=$1
	{
		echo "$kver"
		sha256sum "$here/run.sh" "$here"/guest/* "$here"/scenarios/*.sh "$repo"/packaging/udev/*.rules
		if [[ -f $lvnbd ]]; then sha256sum "$lvnbd"; else echo "no lvnbd"; fi
		dpkg-query -W "${PACKAGES[@]}" 2>/dev/null || true
	} | sha256sum | cut -c1-16
}

# --- running -----------------------------------------------------------------------------------

extract_captures() {
	local dir=$1 name='' line n=0
	mkdir -p "$dir"
	while IFS= read -r line; do
		if [[ $line =~ ^VM-CAPTURE-BEGIN\ ([A-Za-z0-9._-]+)$ ]]; then
			name=${BASH_REMATCH[1]}
			: >"$dir/$name"
		elif [[ $line =~ ^VM-CAPTURE-END\  ]]; then
			[[ -n $name ]] && n=$((n + 1))
			name=
		elif [[ -n $name ]]; then
			printf '%s\n' "$line" >>"$dir/$name"
		fi
	done < <(tr -d '\r' <"$log")
	log_step "captured $n file(s) into $dir"
}

main() {
	install_packages

	local all=() s
	mapfile -t all < <(scenario_names)
	if ((${#selected[@]} == 0)); then
		selected=("${all[@]}")
	fi
	((${#selected[@]})) || die "no scenarios in $here/scenarios"
	for s in "${selected[@]}"; do
		[[ -f $here/scenarios/$s.sh && $s != lib && $s != *-lib ]] || die "no such scenario: $s (have: ${all[*]})"
	done
	if [[ ! -f $lvnbd ]]; then
		((lvnbd_explicit)) && die "--lvnbd $lvnbd: no such file"
		log_step "no lvnbd binary at $lvnbd; scenarios that need it will be skipped"
	fi

	mkdir -p "$cache" "$(dirname "$log")"
	local kver hash initrd kernel
	kver=$(find_kernel)
	kernel=$(boot_kernel "$kver")
	hash=$(inputs_hash "$kver")
	initrd="$cache/initramfs-$hash.cpio"
	if [[ ! -f $initrd ]]; then
		log_step "building initramfs for $kver"
		rm -f "$cache"/initramfs-*
		local t0=$SECONDS
		build_initramfs "$kver" "$initrd"
		log_step "built $(basename "$initrd") ($(du -m "$initrd" | cut -f1) MiB) in $((SECONDS - t0))s"
	fi

	local total=$BOOT_MARGIN
	for s in "${selected[@]}"; do
		total=$((total + $(scenario_timeout "$s") + 10))
	done

	local names
	names=$(IFS=,; echo "${selected[*]}")
	local append="console=ttyS0 quiet panic=-1 lvnbd.scenarios=$names"
	((verbose)) && append+=" lvnbd.verbose=1"
	((keep)) && append+=" lvnbd.keep=1"

	local qemu=(
		qemu-system-x86_64
		-machine accel=tcg
		-cpu max -m 1024 -smp 2
		-nographic -no-reboot -nic none
		-kernel "$kernel" -initrd "$initrd"
		-append "$append"
	)
	log_step "booting $kernel with ${selected[*]} (limit ${total}s; console log $log)"
	local start=$SECONDS rc=0
	if ((keep)); then
		"${qemu[@]}" | tee "$log" || rc=$?
	else
		# No stdin: qemu must never wait on (or put into raw mode) a terminal in CI. The timeout
		# is the only bound on a hung guest; -k kills qemu if SIGTERM is not enough.
		timeout -k 10 "$total" "${qemu[@]}" </dev/null | tee "$log" || rc=$?
	fi
	local elapsed=$((SECONDS - start))

	[[ -n $capture_dir ]] && extract_captures "$capture_dir"

	local pass=0 fail=0 skip=0 seen line name
	local failed=()
	declare -A result=()
	while IFS= read -r line; do
		read -r _ verdict name _ <<<"$line"
		result[$name]=$verdict
	done < <(tr -d '\r' <"$log" | grep -aoE 'VM-RESULT: (PASS|FAIL|SKIP) [A-Za-z0-9._-]+')
	for s in "${selected[@]}"; do
		case "${result[$s]:-}" in
		PASS) pass=$((pass + 1)) ;;
		SKIP)
			skip=$((skip + 1))
			if ((no_skip)); then
				fail=$((fail + 1))
				failed+=("$s")
				echo "vm: $s: skipped, which --no-skip makes a failure"
			fi
			;;
		FAIL) fail=$((fail + 1)); failed+=("$s") ;;
		*) fail=$((fail + 1)); failed+=("$s"); echo "vm: $s: no result" ;;
		esac
	done
	seen=$(tr -d '\r' <"$log" | grep -ac '^VM-DONE' || true)

	echo "vm: qemu exited with $rc after ${elapsed}s"
	if ((seen == 0)); then
		echo "vm: the guest never reported VM-DONE (panic, hang or timeout); console tail:"
		tail -n 40 "$log" | tr -d '\r' | sed 's/^/  | /'
	fi
	# CI shows only the end of what a run printed: repeat the end of each failed scenario's output
	# (the guest printed all of it further up), and name the failures on the last line.
	for s in "${failed[@]}"; do
		echo "vm: last lines of $s's output (all of it is further up):"
		failure_tail "$s" | sed 's/^/  | /'
	done
	# What a reset could not undo explains a failure of the scenario after it.
	tr -d '\r' <"$log" | grep -a '^VM-WARN' || true
	((skip)) && echo "VM: $skip skipped"
	if ((fail)); then
		echo "VM: $pass passed, $fail failed: ${failed[*]}"
	else
		echo "VM: $pass passed, $fail failed"
	fi
	((seen > 0 && fail == 0 && pass + skip > 0))
}

# failure_tail NAME prints NAME's result line (with "timed out after" if it did), its failed
# check and its last lines of output: what the guest printed between "--- output of NAME ---"
# and "--- kernel log during NAME ---" after the failure, or with --verbose between
# "vm: running NAME" and "vm: NAME took". A scenario's exit trap may print server logs after
# the check that failed, hence the FAIL: line on its own.
failure_tail() {
	local out
	tr -d '\r' <"$log" | grep -a -A1 "^VM-RESULT: FAIL $1 " | grep -a "^VM-RESULT\|^timed out after" || true
	out=$(tr -d '\r' <"$log" | awk -v name="$1" '
		$0 == "--- output of " name " ---" || index($0, "vm: running " name " (") == 1 { on = 1; n = 0; next }
		$0 == "--- kernel log during " name " ---" || $0 ~ "^vm: " name " took " { on = 0 }
		on { line[n++] = $0 }
		END { for (i = 0; i < n; i++) print line[i] }')
	grep -a -m1 '^FAIL: ' <<<"$out" || true
	echo "..."
	tail -n 15 <<<"$out"
}

main
