#!/usr/bin/env bash
# The Debian package under a real systemd.
#
# Builds a clean Debian root file system with mmdebstrap (cached), boots it under qemu (TCG, no
# KVM) on the host's Debian kernel with systemd as PID 1, and inside it installs the .deb with
# dpkg -i, runs lvnbd-server on the file driver through systemctl (start, volume create, bench
# --verify, reload, stop, socket activation) and purges the package: guest/lvnbd-systemd-test.sh.
#
# The root file system is the initramfs itself, unpacked into RAM; no /etc/initrd-release, so
# systemd boots it as a normal system. The package and the test go in a second, small archive
# appended to the cached one.
set -euo pipefail

SUITE=bookworm
MIRROR=${LVNBD_DEBIAN_MIRROR:-} # default: the Debian mirror this machine's apt uses
# Installed on top of minbase; what the package depends on is added from its control file.
GUEST_PACKAGES=(systemd systemd-sysv)

# Debian packages this script needs on the host (make deb needs dpkg and Go, as make test has).
PACKAGES=(mmdebstrap qemu-system-x86 linux-image-amd64 cpio)

TIMEOUT=600 # seconds for the whole boot, test and power-off; the guest gives up at 500 s

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache="$here/.cache"

usage() {
	cat <<EOF
Usage: $0 [options]

Installs the lvnbd package on a clean Debian $SUITE booted with systemd as PID 1 under qemu,
and runs lvnbd-server through systemctl. The root file system is built once with mmdebstrap
and kept in test/systemd/.cache.

Options:
  --lvnbd-deb PATH  the package to test (default: build one with make deb)
  --log FILE        console log (default: test/systemd/.cache/console.log)
  --rebuild         build the root file system again even when it is cached
  -h, --help        this text

Environment: LVNBD_DEBIAN_MIRROR, the Debian archive to build from (default: the one this
machine's apt uses).
EOF
}

deb=
log="$cache/console.log"
rebuild=0
while (($#)); do
	case "$1" in
	--lvnbd-deb) deb=${2:?--lvnbd-deb needs a path}; shift 2 ;;
	--log) log=${2:?--log needs a file}; shift 2 ;;
	--rebuild) rebuild=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
	esac
done

log_step() { echo "systemd: $*" >&2; }
die() { echo "systemd: $*" >&2; exit 1; }

# install_packages, shared with test/vm/run.sh.
# shellcheck source=SCRIPTDIR/../lib/packages.sh
source "$repo/test/lib/packages.sh"

# The first Debian archive in this machine's apt sources (not security or a third party's).
host_mirror() {
	# shellcheck disable=SC2016 # apt's own $(FIELD) syntax
	apt-get indextargets --format '$(REPO_URI)' 'Origin: Debian' 'Label: Debian' 'Identifier: Packages' |
		head -n1
}

# The packages named in Depends: of the package's control file, without versions; of
# alternatives, the first.
package_depends() {
	sed -n 's/^Depends: *//p' "$repo/packaging/debian/control" | tr ',' '\n' |
		sed -e 's/|.*//' -e 's/(.*)//' -e 's/[[:space:]]//g' | grep .
}

# --- kernel ------------------------------------------------------------------------------------
# As test/vm/run.sh does (find_kernel, boot_kernel), with a cache of its own.
# shellcheck source=SCRIPTDIR/../lib/kernel.sh
source "$repo/test/lib/kernel.sh"

# --- root file system --------------------------------------------------------------------------

# A newc archive of a directory, root-owned and sorted, so that it depends only on its contents.
# With "files", directories are left out: the archive is unpacked over another that has them.
pack() {
	local dir=$1 out=$2 what=${3:-all} find=(find .)
	[[ $what == files ]] && find+=(! -type d)
	(cd "$dir" && "${find[@]}" -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$out.$$.tmp"
	mv "$out.$$.tmp" "$out"
}

# Debian minbase with systemd, as mmdebstrap makes it, without documentation, man pages and
# translations (dpkg leaves them out; the setting is removed afterwards, so the package under
# test installs in full). usr-is-merged by the debootstrap method keeps usrmerge and perl out.
build_rootfs() {
	local out=$1 dir include
	dir=$(mktemp -d "$cache/rootfs.XXXXXX")
	scratch+=("$dir")
	include=$(IFS=,; echo "${guest_packages[*]}")
	mmdebstrap --quiet --mode=root --variant=minbase --include="$include" \
		--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
		--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
		--dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
		--format=directory "$SUITE" "$dir" "$MIRROR" </dev/null >"$cache/mmdebstrap.log" 2>&1 || {
		tail -n 30 "$cache/mmdebstrap.log" >&2
		die "mmdebstrap failed; its log: $cache/mmdebstrap.log"
	}
	rm -f "$dir/etc/dpkg/dpkg.cfg.d/99mmdebstrap"
	# An installed system, not a first boot (which would prompt for a locale and a password).
	echo 6c766e62642d73797374656d642d7465 >"$dir/etc/machine-id"
	echo lvnbd-systemd-test >"$dir/etc/hostname"
	# Nothing logs in: the serial console is the test's.
	ln -sf /dev/null "$dir/etc/systemd/system/getty.target"
	# No generator has anything to do here (no fstab entries, crypttab, init scripts, swap or
	# hibernation), and under TCG they cost seconds at boot and at every daemon-reload, which
	# the maintainer scripts and systemctl enable do five times in all.
	local g
	mkdir -p "$dir/etc/systemd/system-generators"
	for g in "$dir"/usr/lib/systemd/system-generators/*; do
		ln -s /dev/null "$dir/etc/systemd/system-generators/${g##*/}"
	done
	pack "$dir" "$out"
	rm -rf "$dir"
}

# Everything the cached root file system is made from.
rootfs_key() {
	{
		echo "$SUITE $MIRROR ${guest_packages[*]}"
		mmdebstrap --version
		declare -f build_rootfs pack
	} | sha256sum | cut -c1-16
}

# The package and the test, unpacked over the root file system at boot.
build_overlay() {
	local out=$1 dir
	dir=$(mktemp -d "$work/overlay.XXXXXX")
	mkdir -p "$dir/root" "$dir/etc/systemd/system/multi-user.target.wants"
	install -m 0755 "$here/guest/lvnbd-systemd-test.sh" "$dir/root/"
	install -m 0644 "$deb" "$dir/root/lvnbd.deb"
	install -m 0644 "$here/guest/lvnbd-systemd-test.service" "$dir/etc/systemd/system/"
	ln -s ../lvnbd-systemd-test.service "$dir/etc/systemd/system/multi-user.target.wants/"
	pack "$dir" "$out" files
}

# --- running -----------------------------------------------------------------------------------

# Temporary directories, removed however the script ends.
scratch=()
trap 'rm -rf "${scratch[@]}"' EXIT

main() {
	install_packages
	mkdir -p "$cache" "$(dirname "$log")"
	work=$(mktemp -d "$cache/run.XXXXXX")
	scratch+=("$work")

	if [[ -z $deb ]]; then
		log_step "make deb"
		make -C "$repo" --no-print-directory -s deb DEBDIR="$work/dist" >/dev/null
		deb=$(echo "$work"/dist/lvnbd_*.deb)
	fi
	[[ -f $deb ]] || die "--lvnbd-deb $deb: no such file"

	if [[ -z $MIRROR ]]; then
		MIRROR=$(host_mirror)
		# apt knows a source's origin from its Release file: none before apt-get update.
		if [[ -z $MIRROR ]] && ((EUID == 0)); then
			apt-get -o DPkg::Lock::Timeout=600 update -qq </dev/null
			MIRROR=$(host_mirror)
		fi
		[[ -n $MIRROR ]] || die "no Debian archive in this machine's apt sources: set LVNBD_DEBIAN_MIRROR"
	fi
	mapfile -t guest_packages < <(printf '%s\n' "${GUEST_PACKAGES[@]}" && package_depends)
	local key rootfs t0=$SECONDS
	key=$(rootfs_key)
	rootfs="$cache/rootfs-$key.cpio"
	if ((rebuild)) || [[ ! -f $rootfs ]]; then
		log_step "building Debian $SUITE with ${guest_packages[*]} (mmdebstrap, $MIRROR)"
		rm -f "$cache"/rootfs-*.cpio
		build_rootfs "$rootfs"
		log_step "built $(basename "$rootfs") ($(du -m "$rootfs" | cut -f1) MiB) in $((SECONDS - t0))s"
	fi

	local kver kernel initrd="$work/initrd.cpio"
	kver=$(find_kernel)
	kernel=$(boot_kernel "$kver")
	build_overlay "$work/overlay.cpio"
	cat "$rootfs" "$work/overlay.cpio" >"$initrd"

	local qemu=(
		qemu-system-x86_64
		-machine accel=tcg
		-cpu max -m 1024 -smp 2
		-nographic -no-reboot -nic none
		-kernel "$kernel" -initrd "$initrd"
		-append "console=ttyS0 quiet panic=-1 rdinit=/sbin/init systemd.firstboot=off"
	)
	log_step "booting $(basename "$kernel") with $(basename "$deb") (limit ${TIMEOUT}s; console log $log)"
	local start=$SECONDS rc=0
	# No stdin: qemu must never wait on a terminal. -k kills qemu if SIGTERM is not enough.
	timeout -k 10 "$TIMEOUT" "${qemu[@]}" </dev/null | tee "$log" || rc=$?
	log_step "qemu exited with $rc after $((SECONDS - start))s"

	local result checks
	result=$(tr -d '\r' <"$log" | grep -aoE 'SYSTEMD-RESULT: (PASS|FAIL).*' | tail -n1 || true)
	checks=$(tr -d '\r' <"$log" | grep -ac 'SYSTEMD-CHECK: ok' || true)
	case "$result" in
	"SYSTEMD-RESULT: PASS"*)
		echo "systemd: $checks passed, 0 failed"
		return 0
		;;
	"")
		echo "systemd: the guest never reported a result (boot failure, hang or timeout); console tail:"
		tail -n 40 "$log" | tr -d '\r' | sed 's/^/  | /'
		;;
	esac
	echo "systemd: $checks passed, 1 failed"
	return 1
}

main
