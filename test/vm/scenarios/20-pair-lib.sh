#!/bin/bash
# timeout: 10
# Helpers for the pair scenarios (20-24, 30, 32), which source this file; run on its own it only skips.
#
# Two storage boxes, each an lvnbd serve in its own network namespace joined to the guest's root
# namespace (the "dom0") by a veth pair, exporting the volumes of a VG on two brd ramdisks:
#   box a: netns boxa, 192.0.2.2 (dom0 side: vetha, 192.0.2.1/30),      vga on ram0+ram1
#   box b: netns boxb, 198.51.100.2 (dom0 side: vethb, 198.51.100.1/30), vgb on ram2+ram3
# and the dom0 daemon, lvnbd client, for pair vm1 of one volume on each box.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
[[ ${BASH_SOURCE[0]} != "$0" ]] || skip "helpers for the pair scenarios, not a scenario"
need_lvnbd

CLIENT_SOCK=/run/lvnbd/client.sock
export CLIENT_SOCK

# At exit: on failure the logs of the servers and the daemon; always, detach what is still
# attached and delete the namespaces, which /init's reset does not.
on_exit() {
	local rc=$? f p
	{ set +x; } 2>/dev/null
	set +e
	if ((rc != 0)); then
		for f in server-a.log server-b.log client.log; do
			[[ -s $f ]] && { echo "--- $f"; tail -n 60 "$f"; }
		done
	fi
	[[ -n ${client:-} ]] && kill "$client" 2>/dev/null
	for p in /sys/block/nbd*/pid; do
		[[ -e $p ]] && lvnbd detach --force "/dev/$(basename "$(dirname "$p")")"
	done
	[[ -e /run/netns/boxa ]] && ip netns del boxa
	[[ -e /run/netns/boxb ]] && ip netns del boxb
	return 0
}
trap on_exit EXIT

# wait_secs COND SECS: wait_for with 0.2 s between polls: these conditions (lvnbd pair status)
# cost a good part of a second each under emulation, and polling them harder only loads the VM.
wait_secs() {
	local cond=$1 end=$((SECONDS + $2))
	{ set +x; } 2>/dev/null
	while ((SECONDS < end)); do
		if eval "$cond" >/dev/null 2>&1; then
			set -x
			return 0
		fi
		sleep 0.2
	done
	set -x
	fail "timed out after ${2}s waiting for: $cond"
}

box_ip() { case $1 in a) echo 192.0.2.2 ;; b) echo 198.51.100.2 ;; esac; }
# box_tcp BOX STATE: TCP sockets on port 10809 (0x2A39) in BOX's namespace in STATE (0A listen, 01 established).
box_tcp() {
	# shellcheck disable=SC2016 # awk's fields
	ip netns exec "box$1" awk -v st="$2" 'substr($2, length($2) - 4) == ":2A39" && $4 == st' /proc/net/tcp | wc -l
}

# box_control BOX: whether BOX's control socket listens (a killed server leaves its file behind).
box_control() {
	# shellcheck disable=SC2016 # awk's fields; 00010000: __SO_ACCEPTCON, a listening socket
	[[ $(ip netns exec "box$1" awk -v p="/run/lvnbd/$1.sock" '$4 == "00010000" && $8 == p' /proc/net/unix) ]]
}

# start_box BOX: run BOX's server (again) and wait until it serves and its control socket
# listens (box_volume goes through it); sets server_BOX to its pid. nsenter enters only the
# network namespace: ip netns exec would also give the server a copy of the mount table, in which
# a filesystem mounted before (the guest's, scenario 30) stays mounted, and its md array busy,
# after the scenario unmounts it.
start_box() {
	local box=$1
	nsenter --net="/run/netns/box$box" lvnbd serve --volumes "lvm://vg$box" --listen "tcp://$(box_ip "$box"):10809" \
		--control "/run/lvnbd/$box.sock" --fence-file= --failure-file "$PWD/failures-$box.json" --rescan 1s \
		2>>"server-$box.log" &
	printf -v "server_$box" %s $!
	wait_started $! "server-$box.log" "[[ \$(box_tcp $box 0A) == 1 ]] && box_control $box" 90
}

# setup_box BOX RAM1 RAM2 DOM0_IP: namespace, link, VG and server of BOX.
setup_box() {
	local box=$1
	ip netns add "box$box"
	ip link add "veth$box" type veth peer name eth0 netns "box$box"
	ip addr add "$4/30" dev "veth$box"
	ip link set "veth$box" up
	ip -n "box$box" link set lo up
	ip -n "box$box" addr add "$(box_ip "$box")/30" dev eth0
	ip -n "box$box" link set eth0 up
	pvcreate -q "/dev/$2" "/dev/$3"
	vgcreate -q "vg$box" "/dev/$2" "/dev/$3"
	start_box "$box"
}

setup_boxes() {
	setup_box a ram0 ram1 192.0.2.1
	setup_box b ram2 ram3 198.51.100.1
	ping -c1 -W5 192.0.2.2 >/dev/null
	ping -c1 -W5 198.51.100.2 >/dev/null
}

# box_volume BOX ARGS...: lvnbd volume ARGS on BOX, through its server.
box_volume() {
	local box=$1
	shift
	lvnbd volume "$@" --volumes "lvm://vg$box" --control "/run/lvnbd/$box.sock"
}

# write_config [EXTRA...]: client.toml with pair vm1 (2 connections per leg, 30 s request timeout:
# emulation is slow; 10 s dead timeout), plus the EXTRA lines in its table.
# shellcheck disable=SC2120 # the EXTRA lines are optional
write_config() {
	{
		echo '[[pair]]'
		echo 'name = "vm1"'
		echo 'a = "nbd://192.0.2.2/vm1"'
		echo 'b = "nbd://198.51.100.2/vm1"'
		echo 'connections = 2'
		echo 'timeout = "30s"'
		echo 'dead_timeout = "10s"'
		printf '%s\n' "$@"
	} >client.toml
}

# start_client: run the daemon (again) and wait until both legs are connected; sets $client.
start_client() {
	lvnbd client --config client.toml --control "$CLIENT_SOCK" --poll-interval 2s --health-interval 1s \
		--log-level debug 2>>client.log &
	client=$!
	wait_secs "[[ \$(leg a state) == connected && \$(leg b state) == connected ]]" 60
}

# stop_client: SIGTERM the daemon and wait for it; it must exit 0.
stop_client() {
	kill "$client"
	wait "$client" || fail "lvnbd client exited with $?: $(tail -20 client.log)"
}

# leg LEG FIELD: a field of leg LEG of pair vm1 in lvnbd pair status --json (strings unquoted).
leg() {
	lvnbd pair status --json --control "$CLIENT_SOCK" vm1 | grep -o "\"leg\":\"$1\"[^}]*" |
		grep -o "\"$2\":\"\\?[^,\"]*" | sed 's/^[^:]*:"\{0,1\}//'
}

# kernel_retries DEV: how often the kernel gave up on one of DEV's connections after a request
# timeout and resent the request on another ("Connection timed out, retrying"), this scenario.
kernel_retries() {
	dmesg | grep -c "${1#/dev/}: Connection timed out, retrying" || true
}

# last_kernel_retry DEV: the uptime second of the kernel's last kernel_retries line for DEV, if any.
last_kernel_retry() {
	{ dmesg | grep "${1#/dev/}: Connection timed out, retrying" | tail -n1 | sed -n 's/^\[ *\([0-9]*\)\..*/\1/p'; } || true
}

# assert_connected LEG MSG: LEG is connected; or, if the kernel gave up on one of its connections
# by itself within the last minute (kernel_retries, as own_reconnects allows for), it is
# connected again within 60 s. Anything else fails with MSG.
assert_connected() {
	local st dev='' at='' now end=$((SECONDS + 60))
	{ set +x; } 2>/dev/null
	st=$(leg "$1" state) || true
	if [[ $st != connected ]]; then
		dev=$(leg "$1" device) || true
		[[ -n $dev ]] && at=$(last_kernel_retry "$dev")
		read -r now _ </proc/uptime
		if [[ -z $at ]] || ((${now%.*} - at > 60)); then
			fail "$2: want 'connected', got '$st'"
		fi
		echo "leg $1 is $st after the kernel gave up on a connection of $dev at ${at}s; waiting" >&2
		while :; do
			st=$(leg "$1" state) || true
			[[ $st == connected ]] && break
			((SECONDS < end)) || fail "$2: not connected again within 60 s (still '$st')"
			sleep 0.2
		done
	fi
	set -x
}

# own_reconnects LEG: the reconnects of leg LEG less those that followed the kernel giving up on a
# connection by itself (kernel_retries), waiting up to 10 s for the daemon to catch up. Linux's
# nbd can leave a connection of a fresh device without a receiver (README, "A kernel issue"): its
# first request then times out, and the daemon reconnects it. Only that is allowed for.
own_reconnects() {
	local dev n k end=$((SECONDS + 10))
	{ set +x; } 2>/dev/null
	dev=$(leg "$1" device)
	while :; do
		n=$(leg "$1" reconnects)
		k=$(kernel_retries "$dev")
		((n >= k || SECONDS >= end)) && break
		sleep 0.2
	done
	((k > 0)) && echo "leg $1: $k request timeouts of $dev in the kernel log" >&2
	set -x
	echo $((n > k ? n - k : 0))
}

# nbd_running: how many nbd devices are attached.
nbd_running() {
	local p n=0
	for p in /sys/block/nbd*/pid; do
		[[ -e $p ]] && n=$((n + 1))
	done
	echo "$n"
}
