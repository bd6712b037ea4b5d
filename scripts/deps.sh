#!/usr/bin/env bash
# Installs what building and testing lvnbd needs on a fresh Debian machine, as
# root, non-interactively; does nothing for what is already there. Both
# `make run` and `make test` call it, so a clean clone needs no manual set-up.
set -euo pipefail

# Debian packages, by what needs them:
#   interop peers and clients: nbdkit qemu-utils nbd-server libnbd-bin fio
#   the VM suite:              qemu-system-x86 linux-image-amd64 busybox-static
#                              lvm2 mdadm e2fsprogs cpio kmod
#   network-namespace tests:   iproute2
#   make bench:                jq (reads fio's JSON), procps (pgrep, pkill, sysctl),
#                              util-linux (taskset)
#   packaging tests:           systemd (systemd-analyze, systemd-socket-activate),
#                              man-db, shellcheck
#   the systemd test:          mmdebstrap (and the VM suite's qemu, kernel, cpio)
#   unit tests:                xfsprogs (mkfs.xfs: the guest's signature probe on a real
#                              image, the file driver's reflink snapshots on a loop-mounted XFS),
#                              e2fsprogs (mkfs.ext4: the file driver over a failing disk)
packages=(nbdkit qemu-utils nbd-server libnbd-bin fio
	qemu-system-x86 linux-image-amd64 busybox-static lvm2 mdadm e2fsprogs cpio kmod
	iproute2 util-linux procps gcc make jq systemd man-db shellcheck mmdebstrap xfsprogs)
case "${1:-all}" in
run) packages=(libnbd-bin) ;; # make run needs only a client to show the export
# make bench: the peers and clients it measures, and what shapes and reads the links
bench) packages=(nbdkit qemu-utils nbd-server libnbd-bin fio jq iproute2 procps util-linux) ;;
all) ;;
*) echo "usage: $0 [run|bench|all]" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	if [ "$(id -u)" != 0 ]; then
		echo "deps: missing Debian packages: ${missing[*]}; run as root or install them" >&2
		exit 1
	fi
	echo "deps: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1; then
	echo "deps: no Go toolchain on PATH (need Go 1.26 or later; /usr/local/go/bin?)" >&2
	exit 1
fi
go mod download
