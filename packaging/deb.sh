#!/bin/sh
# Builds the Debian package: packaging/deb.sh BIN OUTDIR [VERSION]
#
#   BIN      the lvnbd binary (make build), for this machine's architecture
#            unless DEB_ARCH says otherwise
#   OUTDIR   where lvnbd_VERSION_ARCH.deb is written; its path is printed
#   VERSION  what `git describe --tags --always --dirty` says (the default),
#            made into a Debian version: v1.2.0 -> 1.2.0, v1.2.0-3-gabc1234
#            -> 1.2.0+git3.abc1234, abc1234 (no tag yet) ->
#            0.0.0+gitN.abc1234 with N commits, so that later builds sort
#            higher; "-dirty" becomes ".dirty", v1.2.0-rc1 -> 1.2.0~rc1.
#
# Environment: DEB_ARCH, DEB_MAINTAINER, DEB_COMPRESS (xz, or gzip for a
# quicker build), SOURCE_DATE_EPOCH (default: the last commit's time, for
# reproducible packages).
set -eu

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
	echo "usage: $0 BIN OUTDIR [VERSION]" >&2
	exit 2
fi
bin=$1
outdir=$2
here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
git() { command git -C "$top" "$@"; }

# shellcheck disable=SC1091 # debversion.sh, beside this script
. "$here/debversion.sh"

describe=${3:-}
if [ -z "$describe" ] || [ "$describe" = dev ]; then
	describe=$(git describe --tags --always --dirty 2>/dev/null || echo 0.0.0)
fi
version=$(debversion "$describe")
arch=${DEB_ARCH:-$(dpkg --print-architecture)}
maintainer=${DEB_MAINTAINER:-lvnbd developers <lvnbd@lvnbd.invalid>}
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

# The binary must be for the package's architecture (it is static, so no
# library dependencies): check its ELF machine.
machine=$(od -An -tx1 -j18 -N2 "$bin" | tr -d ' \n')
case $machine in
3e00) binarch=amd64 ;;
b700) binarch=arm64 ;;
2800) binarch=armhf ;;
0300) binarch=i386 ;;
f300) binarch=riscv64 ;;
1500) binarch=ppc64el ;;
1600) binarch=s390x ;;
*) binarch=unknown-$machine ;;
esac
if [ "$binarch" != "$arch" ]; then
	echo "deb.sh: $bin is an $binarch binary, the package is for $arch (set DEB_ARCH, or build for $arch)" >&2
	exit 1
fi

umask 022
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
"$here/install.sh" "$stage" /usr "$bin"

doc=$stage/usr/share/doc/lvnbd
install -m 0644 "$here/copyright" "$doc/copyright"
{
	if command -v go >/dev/null 2>&1; then
		echo
		echo "Files: usr/bin/lvnbd"
		echo "Comment: Statically linked Go modules, each under its own license:"
		go version -m "$bin" | awk '$1 == "dep" { print " " $2 " " $3 }'
		echo "License: various"
		echo " See each module's LICENSE file."
	fi
} >>"$doc/copyright"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{
	echo "lvnbd ($version) unstable; urgency=medium"
	echo
	echo "  * Built from git commit $commit."
	echo
	echo " -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.gz"

# lvnbd is static on purpose: the same binary runs in the VM suite's
# initramfs and on any storage box.
mkdir -p "$stage/usr/share/lintian/overrides"
printf '%s\n' "lvnbd: statically-linked-binary [usr/bin/lvnbd]" >"$stage/usr/share/lintian/overrides/lvnbd"

mkdir -p "$stage/DEBIAN"
for script in postinst prerm postrm; do
	install -m 0755 "$here/debian/$script" "$stage/DEBIAN/$script"
done
install -m 0644 "$here/debian/conffiles" "$stage/DEBIAN/conffiles"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" \
	-e "s|@SIZE@|$size|" "$here/debian/control" >"$stage/DEBIAN/control"

# Same input, same package: fixed modes and times.
find "$stage" -type d -exec chmod 0755 {} +
find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$outdir"
deb=$outdir/lvnbd_${version}_$arch.deb
dpkg-deb --root-owner-group -Z"${DEB_COMPRESS:-xz}" --build "$stage" "$deb" >/dev/null
echo "$deb"
