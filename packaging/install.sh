#!/bin/sh
# Installs lvnbd: packaging/install.sh DESTDIR PREFIX BIN
#
#   DESTDIR  staging root ("" or / for the running system)
#   PREFIX   /usr for a package, /usr/local by hand
#   BIN      the lvnbd binary to install (it is run to write the man pages
#            and shell completions, so it must run on this machine)
#
# Installs the binary, the fence_lvnbd wrapper for Pacemaker, the systemd
# units (to /lib/systemd/system, or $UNITDIR), the udev rule that keeps the
# host's blkid, mdadm and LVM off the devices lvnbd attaches (to
# /lib/udev/rules.d, or $UDEVRULESDIR), /etc/default/lvnbd and the
# example configurations /etc/lvnbd/server.toml and client.toml, the bash,
# zsh and fish completions, the man pages and the README. Files in /etc that
# already exist are kept: the package manager, or the administrator, merges
# new versions (they are also in $PREFIX/share/doc/lvnbd/examples).
set -eu

if [ $# -ne 3 ]; then
	echo "usage: $0 DESTDIR PREFIX BIN" >&2
	exit 2
fi
destdir=${1%/}
prefix=${2%/}
bin=$3
unitdir=${UNITDIR:-/lib/systemd/system}
# Where the units go, whatever the prefix: a package and make install agree.
udevrulesdir=${UDEVRULESDIR:-/lib/udev/rules.d}
here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")

case $prefix in
/*) ;;
*) echo "install.sh: PREFIX must be an absolute path, not $prefix" >&2; exit 2 ;;
esac
if [ ! -x "$bin" ]; then
	echo "install.sh: $bin is not an executable (build it first: make build)" >&2
	exit 1
fi
if [ -n "$destdir" ]; then
	mkdir -p "$destdir"
	destdir=$(cd "$destdir" && pwd)
	[ "$destdir" != / ] || destdir=
fi

umask 022
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# put MODE SRC DEST: install a file, creating its directory.
put() {
	install -D -m "$1" "$2" "$destdir$3"
}

# conffile SRC DEST: install a configuration file unless one is there.
conffile() {
	if [ -e "$destdir$2" ]; then
		echo "install.sh: keeping $destdir$2 (the new version is in $prefix/share/doc/lvnbd/examples)" >&2
	else
		put 0644 "$1" "$2"
	fi
}

# The program.
put 0755 "$bin" "$prefix/bin/lvnbd"
printf '#!/bin/sh\n# Pacemaker fence agent: see lvnbd-fence-agent(1).\nexec %s/bin/lvnbd fence-agent "$@"\n' "$prefix" >"$tmp/fence_lvnbd"
put 0755 "$tmp/fence_lvnbd" "$prefix/sbin/fence_lvnbd"

# systemd units, pointing at this prefix's binary.
for unit in lvnbd-server.service lvnbd-server.socket lvnbd-client.service; do
	sed "s|/usr/bin/lvnbd|$prefix/bin/lvnbd|g" "$top/systemd/$unit" >"$tmp/$unit"
	put 0644 "$tmp/$unit" "$unitdir/$unit"
done

# udev: a dom0 must not assemble or activate the guests' md halves and LVM
# (packaging/udev/59-lvnbd.rules says why).
put 0644 "$here/udev/59-lvnbd.rules" "$udevrulesdir/59-lvnbd.rules"

# Configuration.
conffile "$here/default/lvnbd" /etc/default/lvnbd
conffile "$here/server.toml" /etc/lvnbd/server.toml
conffile "$here/client.toml" /etc/lvnbd/client.toml

# Shell completions, where each shell looks for them under this prefix.
"$bin" completion bash >"$tmp/lvnbd.bash"
"$bin" completion zsh >"$tmp/_lvnbd"
"$bin" completion fish >"$tmp/lvnbd.fish"
if [ "$prefix" = /usr ]; then
	zshdir=$prefix/share/zsh/vendor-completions
else
	zshdir=$prefix/share/zsh/site-functions
fi
put 0644 "$tmp/lvnbd.bash" "$prefix/share/bash-completion/completions/lvnbd"
put 0644 "$tmp/_lvnbd" "$zshdir/_lvnbd"
put 0644 "$tmp/lvnbd.fish" "$prefix/share/fish/vendor_completions.d/lvnbd.fish"

# Man pages, compressed as Debian wants them (-n: no name or time stamp).
"$bin" man "$tmp/man1" >/dev/null
for page in "$tmp"/man1/*.1; do
	gzip -9n <"$page" >"$page.gz"
	put 0644 "$page.gz" "$prefix/share/man/man1/$(basename "$page").gz"
done

# fence_lvnbd's page, in the section of /usr/sbin, is the fence agent's.
printf '.so man1/lvnbd-fence-agent.1\n' | gzip -9n >"$tmp/fence_lvnbd.8.gz"
put 0644 "$tmp/fence_lvnbd.8.gz" "$prefix/share/man/man8/fence_lvnbd.8.gz"

# Documentation.
put 0644 "$top/README.md" "$prefix/share/doc/lvnbd/README.md"
put 0644 "$here/server.toml" "$prefix/share/doc/lvnbd/examples/server.toml"
put 0644 "$here/client.toml" "$prefix/share/doc/lvnbd/examples/client.toml"
put 0644 "$here/default/lvnbd" "$prefix/share/doc/lvnbd/examples/default-lvnbd"

if [ -z "$destdir" ] && [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
	echo "install.sh: installed; start the server with: systemctl enable --now lvnbd-server" >&2
fi
