# shellcheck shell=bash
# Helpers for VM scenarios. Source it, do not run it:
#   . "$(dirname "$0")/lib.sh"
# Scenarios run under bash with set -e -o pipefail -x, in a fresh empty working directory.
# The guest is reset after each scenario (processes killed, md/dm/loop stopped, ramdisks and
# nbd devices reloaded), but a scenario should still clean up what it can.

# fail MSG: stop the scenario with a message.
fail() {
	echo "FAIL: $*" >&2
	exit 1
}

# skip REASON: mark the scenario skipped (exit 77), e.g. when lvnbd is not in the initramfs.
skip() {
	echo "SKIP: $*"
	exit 77
}

# need_lvnbd: skip unless run.sh put an lvnbd binary in the guest.
need_lvnbd() {
	command -v lvnbd >/dev/null || skip "no lvnbd binary (build bin/lvnbd or pass --lvnbd)"
}

# assert_eq WANT GOT MSG
assert_eq() {
	[[ "$1" == "$2" ]] || fail "${3:-values differ}: want '$1', got '$2'"
}

# wait_for COND TIMEOUT: poll the shell command COND (a string, eval'd) every 0.1 s until it
# succeeds; fail after TIMEOUT seconds (default 10) of real time, however slow COND is.
wait_for() {
	local cond=$1 limit=${2:-10} end
	{ set +x; } 2>/dev/null
	end=$((SECONDS + limit))
	while ((SECONDS < end)); do
		if eval "$cond" >/dev/null 2>&1; then
			set -x
			return 0
		fi
		sleep 0.1
	done
	set -x
	fail "timed out after ${limit}s waiting for: $cond"
}

# wait_started PID LOG COND SECS: wait_for COND, but fail at once, with the end of LOG, if the
# process PID (a server starting) exits first: a start that failed is not a slow one.
wait_started() {
	local pid=$1 log=$2
	wait_for "$3 || ! kill -0 $pid" "$4"
	kill -0 "$pid" 2>/dev/null || fail "process $pid exited while starting; the end of $log: $(tail -n 20 "$log")"
}

# serve_vg0 RESCAN: volume group vg0 on /dev/ram0 and /dev/ram1, and lvnbd serve exporting its
# volumes on 127.0.0.1:10809, with its control socket at $CTL and a rescan every RESCAN, logging to
# server.log; $server is its pid.
serve_vg0() {
	pvcreate -q /dev/ram0 /dev/ram1
	vgcreate -q vg0 /dev/ram0 /dev/ram1
	lvnbd serve --volumes lvm://vg0 --listen tcp://127.0.0.1:10809 --control "$CTL" --fence-file= \
		--rescan "$1" 2>server.log &
	server=$!
	wait_started "$server" server.log "[[ -S $CTL ]]" 90
}

# tcp_sockets PORT STATE: how many IPv4 TCP sockets on local port PORT are in STATE, as
# /proc/net/tcp gives it in hex (0A listening, 01 established).
tcp_sockets() { awk -v p="$(printf ':%04X' "$1")" -v st="$2" 'substr($2, length($2) - 4) == p && $4 == st' /proc/net/tcp | wc -l; }

# sha FILE: the SHA-256 of FILE (or a block device), hex only.
sha() {
	local sum
	sum=$(sha256sum "$1")
	echo "${sum%% *}"
}

# capture NAME CMD...: run CMD and print its stdout on the console between
#   VM-CAPTURE-BEGIN NAME / VM-CAPTURE-END NAME
# lines, which run.sh --capture DIR saves as DIR/NAME. Fails if CMD fails.
capture() {
	local name=$1 out
	shift
	out=$("$@")
	{
		echo "VM-CAPTURE-BEGIN $name"
		printf '%s\n' "$out"
		echo "VM-CAPTURE-END $name"
	} >/dev/console
}

# Traces show seconds since the scenario started; set here as well as by /init so a scenario run
# by hand (bash -x scenario.sh in --keep's shell) gets them too.
PS4='+ [${SECONDS}s] '
