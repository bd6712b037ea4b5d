#!/bin/bash
# Inside a clean Debian booted with systemd as PID 1: installs the lvnbd
# package, runs lvnbd-server on the file driver the way an administrator
# would, and purges the package. Every check prints a SYSTEMD-CHECK line; the
# last line is SYSTEMD-RESULT: PASS or FAIL, which test/systemd/run.sh reads
# from the serial console.
#
# Usage: lvnbd-systemd-test.sh PACKAGE.deb
set -uo pipefail

deb=${1:?usage: $0 PACKAGE.deb}
config=/etc/lvnbd/server.toml
volumes=/var/lib/lvnbd/lvnbd-data
nbd=nbd://127.0.0.1
checks=0
export SYSTEMD_PAGER='' SYSTEMD_COLORS=0 LC_ALL=C.UTF-8

step() { echo "== [$(cut -d" " -f1 /proc/uptime)s] $*"; }

fail() {
	echo "SYSTEMD-CHECK: FAIL $*"
	echo "---- systemctl status lvnbd-server.service lvnbd-server.socket"
	systemctl status --no-pager --full lvnbd-server.service lvnbd-server.socket 2>&1
	echo "---- journalctl -u lvnbd-server.service -u lvnbd-server.socket"
	journalctl --no-pager -o short-monotonic -u lvnbd-server.service -u lvnbd-server.socket 2>&1 | tail -n 80
	echo "SYSTEMD-RESULT: FAIL ($checks checks passed before: $*)"
	exit 1
}
trap 'fail "timed out (TimeoutStartSec=)"' TERM

ok() {
	checks=$((checks + 1))
	echo "SYSTEMD-CHECK: ok $*"
}

# Runs a command, bounded, showing its output; a failure fails the test.
must() {
	local out rc=0 t0=${EPOCHREALTIME/./} ds
	out=$(timeout 120 "$@" 2>&1) || rc=$?
	[[ -n $out ]] && printf '%s\n' "$out" | sed 's/^/   | /'
	ds=$(((${EPOCHREALTIME/./} - t0) / 100000))
	printf '   + %s (%d.%ds)\n' "$*" $((ds / 10)) $((ds % 10))
	((rc == 0)) || fail "exit status $rc: $*"
}

# The value of one property of a unit.
prop() { systemctl show -P "$2" "$1"; }

# Checks properties of a unit, given as NAME=VALUE..., with one systemctl
# (each costs most of a second under TCG).
expect() {
	local unit=$1 want got names
	shift
	want=$(printf '%s\n' "$@" | sort)
	names=$(printf '%s\n' "$@" | cut -d= -f1 | paste -sd,)
	got=$(systemctl show -p "$names" "$unit" | sort)
	[[ $got == "$want" ]] || fail "$unit: $(echo "$got" | paste -sd' '), want $*"
}

# Waits up to 20 s for a unit's property NAME=VALUE.
wait_for() {
	local i
	for ((i = 0; i < 40; i++)); do
		[[ $(prop "$1" "${2%%=*}") == "${2#*=}" ]] && return 0
		sleep 0.5
	done
	expect "$@"
}

# A place in the journal, and what lvnbd-server's unit logged after it
# (systemd's lines and the server's own). Unit properties cannot say how a
# stopped service ended: systemd unloads an inactive unit, forgetting them.
journal_mark() { journalctl -q -n 1 --show-cursor | sed -n 's/^-- cursor: //p'; }
journal_since() { journalctl -q --no-pager -o cat -u lvnbd-server.service --after-cursor="$1"; }

# Waits up to 20 s for lvnbd-server's unit to log a line matching $2 after
# mark $1 (journald writes what it receives a little later).
journal_wait() {
	local i
	for ((i = 0; i < 40; i++)); do
		journal_since "$1" | grep -q -- "$2" && return 0
		sleep 0.5
	done
	return 1
}

# Waits up to 20 s for a command to succeed (for what a reload changes: the
# reload returns once SIGHUP is sent, not once it took effect).
eventually() {
	local i
	for ((i = 0; i < 40; i++)); do
		timeout 10 "$@" >/dev/null 2>&1 && return 0
		sleep 0.5
	done
	return 1
}

step "systemd $(systemctl --version | head -n1), kernel $(uname -r), $(systemctl is-system-running 2>/dev/null)"
[[ $(ps -o comm= -p 1) == systemd ]] || fail "PID 1 is $(ps -o comm= -p 1), not systemd"
ok "PID 1 is systemd"

step "dpkg -i $deb"
must dpkg -i "$deb"
for u in lvnbd-server.service lvnbd-server.socket lvnbd-client.service; do
	expect "$u" LoadState=loaded UnitFileState=disabled ActiveState=inactive
done
[[ -d /var/lib/lvnbd ]] || fail "postinst did not create /var/lib/lvnbd"
ok "installed; the units are loaded, disabled and not started"

step "configure the file driver in $config"
[[ -f $config ]] || fail "the package did not install $config"
# The shipped example with its [server] table switched on: TCP on loopback
# and a Unix socket, the file volumes, the control socket.
sed -i \
	-e 's|^#\[server\]$|[server]|' \
	-e 's|^#listen = \[.*|listen = ["tcp://127.0.0.1:10809", "unix:///run/lvnbd/nbd.sock"]|' \
	-e "s|^#volumes = .*|volumes = \"file://$volumes\"|" \
	-e 's|^#control = .*|control = "/run/lvnbd/control.sock"|' \
	"$config"
[[ $(grep -c -E '^(\[server\]$|listen =|volumes =|control =)' "$config") == 4 ]] ||
	fail "editing $config: the example's [server] lines changed"
must lvnbd serve --config "$config" --check-config
ok "server.toml: the packaged example, [server] switched on"

step "systemctl start lvnbd-server"
mark=$(journal_mark)
must systemctl start lvnbd-server.service
expect lvnbd-server.service ActiveState=active SubState=running
pid=$(prop lvnbd-server.service MainPID)
[[ $pid != 0 ]] || fail "no MainPID"
# ProtectSystem=strict: in the server's mount namespace / is read-only.
rootopts=$(awk '$5 == "/" { print $6 }' "/proc/$pid/mountinfo")
[[ $rootopts == ro,* ]] || fail "/ is mounted \"$rootopts\" for the server, not read-only: no sandbox"
ok "started (Type=notify: READY=1 reached systemd), MainPID $pid, / read-only for it"
# The sandbox lets it read the kernel's device events (a netlink socket), by which it sees a
# volume resized behind it at once.
journal_wait "$mark" "watching the volumes' devices: the kernel tells" ||
	fail "the server does not watch the volumes' devices: $(journal_since "$mark" | grep -i 'devices' | tail -n 3)"
ok "the server reads the kernel's device events"
# The sandbox lets it record with its volumes that it serves them, which is how its next start
# notices a crash of the box.
boot=$(tr -d - </proc/sys/kernel/random/boot_id)
tr -d ' \n' <"$volumes/lvnbd.json" | grep -q "\"boot\":\"$boot\",\"pid\":$pid," ||
	fail "$volumes/lvnbd.json does not record the server in this boot: $(cat "$volumes/lvnbd.json" 2>&1)"
ok "$volumes/lvnbd.json records the server serving in this boot"

# start returned at READY=1, so the listeners are open now: no retry.
must lvnbd status
must lvnbd info --list $nbd
must lvnbd info --list 'nbd+unix:///?socket=/run/lvnbd/nbd.sock'
ok "listening on TCP, the Unix socket and the control socket as soon as start returned"

step "lvnbd volume create through the control socket"
out=$(timeout 120 lvnbd volume create disk0 --size 64M --volumes "file://$volumes" 2>&1) || fail "volume create: $out"
printf '%s\n' "$out" | sed 's/^/   | /'
[[ $out != *note:* ]] || fail "volume create did not go through the server's control socket"
must lvnbd status
timeout 10 lvnbd status --json | grep -q '"name": "disk0"' || fail "lvnbd status does not list disk0"
[[ -f $volumes/disk0.img ]] || fail "no $volumes/disk0.img"
mode="$(stat -c %a /var/lib/lvnbd) $(stat -c %a "$volumes")"
[[ $mode == "750 700" ]] || fail "/var/lib/lvnbd and $volumes have modes $mode, want 750 700"
ok "volume disk0 created by the server and exported at once; directory modes $mode"

step "lvnbd bench --verify against $nbd/disk0"
must lvnbd bench --mode write --verify --seed 8 --size 16M --force "$nbd/disk0"
must lvnbd bench --mode read --verify --seed 8 --size 16M "$nbd/disk0"
ok "written and read back through the sandboxed server"

step "systemctl reload lvnbd-server: add an [[export]]"
truncate -s 8M /var/lib/lvnbd/extra.img
printf '\n[[export]]\nname = "extra"\npath = "/var/lib/lvnbd/extra.img"\n' >>"$config"
must systemctl reload lvnbd-server.service
eventually lvnbd info "$nbd/extra" || fail "the export added to $config is not served after the reload"
wait_for lvnbd-server.service ActiveState=active
[[ $(prop lvnbd-server.service MainPID) == "$pid" ]] || fail "the reload restarted the server"
must lvnbd bench --mode randrw --verify --bs 4k --qd 8 --conns 2 --runtime 3s --force "$nbd/extra"
must lvnbd bench --mode read --verify --seed 8 --size 16M "$nbd/disk0"
ok "reloaded in place (MainPID $pid): the new export is served, disk0 kept its data"

step "systemctl stop lvnbd-server"
mark=$(journal_mark)
must systemctl stop lvnbd-server.service
expect lvnbd-server.service ActiveState=inactive
# "Deactivated successfully" is systemd's word for an exit status of 0 after
# SIGTERM, not killed at the timeout.
journal_wait "$mark" 'Deactivated successfully' || fail "systemd did not log a clean exit"
journal_wait "$mark" 'server stopped' || fail "the server did not log that it stopped"
if journal_since "$mark" | grep -E 'Failed with result|Main process exited|Killing|timed out'; then
	fail "the stop was not clean"
fi
if grep -q '"runs"' "$volumes/lvnbd.json"; then
	fail "the clean stop left the server recorded: $(cat "$volumes/lvnbd.json")"
fi
ok "stopped cleanly: inactive, exit status 0 after SIGTERM, drained, its record taken out of lvnbd.json"

step "socket activation: systemctl start lvnbd-server.socket"
must systemctl start lvnbd-server.socket
expect lvnbd-server.socket ActiveState=active
expect lvnbd-server.service ActiveState=inactive
mark=$(journal_mark)
must lvnbd info "$nbd/disk0"
# The server may answer before systemd has read its READY=1.
wait_for lvnbd-server.service ActiveState=active
journal_wait "$mark" 'using the sockets systemd passed' || fail "the server did not use the socket systemd passed"
must lvnbd bench --mode read --verify --seed 8 --size 16M "$nbd/disk0"
mark=$(journal_mark)
must systemctl stop lvnbd-server.socket lvnbd-server.service
journal_wait "$mark" 'Deactivated successfully' || fail "systemd did not log a clean exit"
ok "the first connection to the socket started the server on systemd's socket, which served it"

step "dpkg --purge lvnbd, with the service enabled and running"
must systemctl enable --now lvnbd-server.service
[[ -L /etc/systemd/system/multi-user.target.wants/lvnbd-server.service ]] || fail "enable made no symlink"
expect lvnbd-server.service ActiveState=active
must dpkg --purge lvnbd
if pgrep -a -x lvnbd; then fail "lvnbd still runs after the purge"; fi
[[ ! -e /usr/bin/lvnbd ]] || fail "/usr/bin/lvnbd is still there"
[[ ! -e /etc/lvnbd ]] || fail "/etc/lvnbd is still there"
[[ ! -e /etc/systemd/system/multi-user.target.wants/lvnbd-server.service ]] || fail "the enable symlink is still there"
[[ -f $volumes/disk0.img ]] || fail "purging removed the volumes in $volumes"
expect lvnbd-server.service LoadState=not-found ActiveState=inactive
ok "purged: stopped, units and configuration gone, volumes kept"

echo "SYSTEMD-RESULT: PASS ($checks checks)"
