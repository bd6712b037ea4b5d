#!/usr/bin/env bash
# `make bench`: lvnbd's throughput and IOPS next to nbdkit, qemu-nbd and
# nbd-server, as ratios, measured by the same outside clients (nbdcopy, fio's
# nbd engine) in the same run; then lvnbd over shaped 1 GbE links in network
# namespaces; then `lvnbd bench` itself.
#
# A benchmark, not a test: it reports numbers and never fails on them. It
# fails only when a tool crashes or a server dies. It installs nothing
# (scripts/deps.sh does); run as root (network namespaces, tc).
#
# Fairness choices, the same for every server:
#   - one raw image on tmpfs (/dev/shm), recreated before each server with
#     every page written (zeroes), as an LV's blocks all exist: every server
#     writes into the same pages and no disk is measured (see fresh_image);
#   - every server reads and writes it through the page cache, as lvnbd does:
#     nbdkit's file plugin with its default cache=default (cache=none adds
#     fadvise/sync_file_range calls lvnbd does not make), qemu-nbd with
#     --cache=writeback --aio=threads (its defaults; cache=none would be
#     O_DIRECT), nbd-server with its defaults; nbdkit at its default 16
#     threads (-t 16, explicit);
#   - every server advertises multi-conn (qemu-nbd with -e 8), so nbdcopy
#     uses 4 connections (-C 4) with each; fio's nbd engine uses one;
#   - nbdcopy --no-extents: servers that answer block-status would otherwise
#     skip reading holes; every copy reads and writes all the data. Writes
#     end with --flush. The copy source is random data (no zero blocks for
#     nbdcopy to skip).
#
# Environment: LVNBD (binary, default bin/lvnbd), BENCH_MIB (image size,
# default 2048), BENCH_LINK_MIB (data moved per shaped-link run, default
# 512), BENCH_RUNTIME (seconds per fio or lvnbd bench run, default 10),
# BENCH_TIMEOUT (seconds before a copy is cut short and reported as an upper
# bound, default 25), BENCH_ROUNDS (rounds of the four servers, default 3),
# BENCH_PIN (1: every server runs on CPU 1 and every client on CPU 0, with
# taskset, so a server has a core of its own, as it does when its clients are
# other machines; on loopback the kernel's TCP work for a connection still
# lands on either side). The whole run takes 6 to 8 minutes.
set -euo pipefail
# Numbers are read and printed with a decimal point: under a locale with a
# decimal comma bash's printf would refuse awk's "1.23".
export LC_ALL=C
cd "$(dirname "$0")/.."

LVNBD=${LVNBD:-bin/lvnbd}
MIB=${BENCH_MIB:-2048}
LINK_MIB=${BENCH_LINK_MIB:-512}
RUNTIME=${BENCH_RUNTIME:-10}
TIMEOUT=${BENCH_TIMEOUT:-25}
PIN=${BENCH_PIN:-0}
GBE_PAYLOAD=117.6 # MB/s of TCP payload on one GbE link (1448 of every 1538 bytes on the wire)

die() { echo "bench: $*" >&2; exit 1; }

# --- tools --------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root: the link runs create network namespaces"
[ -x "$LVNBD" ] || die "$LVNBD not found: run make build (make bench does)"
# pin_server and pin_client prefix every server's and client's command;
# cpus and pinned say in the report which way the CPUs were shared.
case $PIN in
0)
	pin_server=() pin_client=() pinned=""
	cpus="servers and clients share them (BENCH_PIN=1 gives each a core)"
	;;
1)
	(($(nproc) >= 2)) || die "BENCH_PIN=1 puts servers on CPU 1 and clients on CPU 0, and this machine has $(nproc) CPU"
	pin_server=(taskset -c 1) pin_client=(taskset -c 0) pinned="; servers on CPU 1, clients on CPU 0"
	cpus="every server on CPU 1, every client on CPU 0 (BENCH_PIN=1)"
	;;
*) die "BENCH_PIN is 0 or 1, not '$PIN'" ;;
esac
missing=()
for t in nbdkit qemu-nbd nbd-server nbdcopy nbdinfo fio jq ip tc ss timeout ${pin_server[0]:+taskset}; do
	command -v "$t" >/dev/null || missing+=("$t")
done
((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (scripts/deps.sh bench installs them)"
[ -d /dev/shm ] || die "no /dev/shm tmpfs"

# --- clean-up, even on failure or Ctrl-C --------------------------------------
WORK=$(mktemp -d /dev/shm/lvnbd-bench.XXXXXX)
NS_SRV=lvb-srv-$$
NS_CLI=lvb-cli-$$
pids=()     # servers
children=() # clients running now
cleanup() {
	local rc=$?
	trap - INT TERM
	for p in "${children[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do
		pkill -TERM -P "$p" 2>/dev/null || true # nbd-server's per-client children
		kill -TERM "$p" 2>/dev/null || true
	done
	for p in "${pids[@]}"; do
		for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
		kill -KILL "$p" 2>/dev/null || true
	done
	ip netns del "$NS_SRV" 2>/dev/null || true
	ip netns del "$NS_CLI" 2>/dev/null || true
	rm -rf "$WORK"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- machine ------------------------------------------------------------------
echo "== machine =="
echo "nproc (coreutils nproc):        $(nproc)"
echo "kernel (uname -r):              $(uname -r)"
echo "CPU (/proc/cpuinfo model name): $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
echo "memory (/proc/meminfo):         $(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
# The senders' congestion control counts even on loopback: bbr, for one, paces.
echo "TCP congestion control:         $(sysctl -n net.ipv4.tcp_congestion_control)"
echo "lvnbd:      $("$LVNBD" --version)"
echo "nbdkit:     $(nbdkit --version)"
echo "qemu-nbd:   $(qemu-nbd --version | head -1)"
echo "nbd-server: $(nbd-server -V 2>&1 | awk '/version/ {print $NF; exit}')"
echo "nbdcopy:    $(nbdcopy --version | head -1)"
echo "fio:        $(fio --version)"
echo "CPUs:       $cpus"
echo

# --- helpers ------------------------------------------------------------------
# free_port prints a TCP port nothing listens on.
free_port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 20000))
		ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
	done
}

# wait_ready URI PID [NETNS]: until the export answers, or fail if PID died.
wait_ready() {
	local uri=$1 pid=$2 ns=${3:-}
	for _ in $(seq 100); do
		kill -0 "$pid" 2>/dev/null || die "server for $uri exited at start (see $WORK/*.log)"
		if ${ns:+ip netns exec "$ns"} nbdinfo --size "$uri" >/dev/null 2>&1; then return; fi
		sleep 0.1
	done
	die "server for $uri not ready after 10 s"
}

alive() { kill -0 "$1" 2>/dev/null || die "$2 died during the run (log: $3)"; }

# stop_server PID: SIGTERM, then SIGKILL after 5 s (a server draining a
# backlog for a client that is gone is not worth waiting for).
stop_server() {
	pkill -TERM -P "$1" 2>/dev/null || true # nbd-server's per-client children
	kill -TERM "$1" 2>/dev/null || true
	for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
	pkill -KILL -P "$1" 2>/dev/null || true
	kill -KILL "$1" 2>/dev/null || true
}

# Clients run in the background and are waited for: bash runs a trap only
# between commands and `wait` is one it interrupts, so Ctrl-C cleans up at
# once, not after the step. (timeout(1) also moves its child out of the
# terminal's process group, where Ctrl-C would not reach it; cleanup does.)
#
# start_bounded SECONDS LOG CMD...: starts CMD, killed after SECONDS.
start_bounded() {
	local secs=$1 log=$2
	shift 2
	timeout "$secs" "$@" >>"$log" 2>&1 &
	children+=($!)
}

# wait_children: waits for every started client; sets rc to the first
# non-zero exit (124: cut short by the timeout) and took to the seconds since
# started.
wait_children() {
	local c r
	rc=0
	for c in "${children[@]}"; do
		r=0
		wait "$c" || r=$?
		case $r in # a crash outranks a timeout, which outranks success
		0) ;;
		124) [ "$rc" != 0 ] || rc=124 ;;
		*) rc=$r ;;
		esac
	done
	children=()
	took=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN {print e - s}')
}

# bounded SECONDS LOG CMD...: runs CMD to its end or the timeout.
bounded() {
	started=$(date +%s.%N)
	start_bounded "$@"
	wait_children
}

# mbps BYTES: MB/s of the last run, or "<N" (an upper bound) if cut short.
mbps() {
	case $rc in
	124) awk -v b="$1" -v t="$TIMEOUT" 'BEGIN {printf "<%.1f", b / t / 1e6}' ;;
	*) awk -v b="$1" -v s="$took" 'BEGIN {printf "%.1f", b / s / 1e6}' ;;
	esac
}

# check LOG WHAT: a failure other than the timeout is fatal; a crashed tool
# is the one way `make bench` fails.
check() {
	case $rc in
	0 | 124) ;;
	*) tail -20 "$1" >&2; die "$2 failed (exit $rc)" ;;
	esac
}

# copy VAR BYTES LOG NBDCOPY-ARGS...: sets VAR to nbdcopy's MB/s, and
# copy_client to nbdcopy's CPU seconds (user and system): what `times`, run in
# this shell (in a subshell it would see the subshell's children), counts for
# reaped children grew by across the copy; the server, still running, is not
# among them.
copy() {
	local var=$1 bytes=$2 log=$3
	shift 3
	times >"$WORK/times.0"
	bounded "$TIMEOUT" "$log" "${client_exec[@]}" nbdcopy --no-extents "$@"
	times >"$WORK/times.1"
	check "$log" "nbdcopy $*"
	printf -v "$var" '%s' "$(mbps "$bytes")"
	# times prints the shell's user and system time, then its children's,
	# as 0m1.234s 0m0.567s.
	copy_client=$(awk 'FNR == 1 { f++ } FNR == 2 { for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); c[f] += t[1] * 60 + t[2] } }
		END { print c[2] - c[1] }' "$WORK/times.0" "$WORK/times.1")
}
# client_exec prefixes every client's command: pinned (BENCH_PIN), and for
# the link runs in the clients' network namespace.
client_exec=("${pin_client[@]}")

# fio_run IOPSVAR MBVAR URI RW LOG: a 4 KiB QD32 run of RUNTIME seconds.
fio_run() {
	local out=$WORK/fio-$4.json dir="read" line
	[ "$4" = randwrite ] && dir="write"
	bounded $((RUNTIME + 30)) "$5" "${client_exec[@]}" fio --name="$4" --ioengine=nbd --uri="$3" --rw="$4" --bs=4k --iodepth=32 \
		--runtime="$RUNTIME" --time_based --output-format=json --output="$out"
	[ "$rc" = 0 ] || { tail -20 "$5" >&2; die "fio $4 against $3 failed (exit $rc)"; }
	line=$(jq -r --arg d "$dir" '.jobs[0][$d] | "\(.iops) \(.bw_bytes / 1e6)"' "$out")
	printf -v "$1" '%.0f' "${line% *}"
	printf -v "$2" '%.1f' "${line#* }"
}

# lvnbd_bench JSON LOG ARGS...: runs lvnbd bench --json, the report to JSON.
lvnbd_bench() {
	local json=$1 log=$2
	shift 2
	: >"$json"
	# shellcheck disable=SC2016 # $0 and $@ belong to the inner sh
	bounded $((TIMEOUT + 30)) "$log" sh -c 'exec "$@" >"$0"' "$json" "${client_exec[@]}" "$LVNBD" bench --json "$@"
	check "$log" "lvnbd bench $*"
}

# Random data for nbdcopy to write: 64 MiB from /dev/urandom repeated (the
# kernel's urandom is too slow here to draw gigabytes).
make_source() {
	local out=$1 mib=$2
	[ -f "$WORK/random64" ] || head -c 64M /dev/urandom >"$WORK/random64"
	: >"$out"
	# Rounded up, then cut: a source of zeroes would be sent as zeroes (nbdcopy
	# finds them) and read back as holes, measuring neither.
	for _ in $(seq $(((mib + 63) / 64))); do cat "$WORK/random64" >>"$out"; done
	truncate -s "${mib}M" "$out"
}

# fresh_image FILE MIB: a new image of MIB MiB, every page of it written
# (zeroes), as every block of a logical volume exists. A server's write then
# copies into pages that are there, as it would into an LV's page cache. A
# sparse image made each write allocate its pages too, and what that costs
# here is the host's, not the server's: a write into fresh tmpfs pages ran at
# 0.25 to 2.8 GB/s from one minute to the next on this project's machine
# (likely memory the host had taken back: the VM's virtio balloon reports
# free pages to it, and touching them again faults them back in), while
# overwriting the same pages ran at 7 to 11 GB/s; sequential write figures
# swung 4 times with it, for every server alike.
fresh_image() {
	rm -f "$1"
	dd if=/dev/zero of="$1" bs=1M count="$2" status=none || die "writing the image $1 failed"
}

ratio() { # ratio A B: A/B, or a bound when either is one
	awk -v a="$1" -v b="$2" 'BEGIN {
		la = substr(a, 1, 1) == "<"; lb = substr(b, 1, 1) == "<"
		if (la) a = substr(a, 2); if (lb) b = substr(b, 2)
		if (b + 0 == 0 || (la && lb)) { print "?"; exit }
		r = a / b
		if (la) printf "<%.2f", r; else if (lb) printf ">%.2f", r; else printf "%.2f", r }'
}

IMG=$WORK/disk.img
SRC=$WORK/source.img
BYTES=$((MIB * 1048576))
echo "preparing a ${MIB} MiB random source in $WORK ..."
make_source "$SRC" "$MIB"

# --- 1. four servers on loopback, in alternating rounds ---------------------
# One run of one server says little on a shared or noisy machine: its speed
# drifts by more than the differences measured. So every server is measured
# once per round, in an order that rotates, and each figure is the median
# over the rounds; a ratio is the median of the rounds' ratios, each taken
# between runs minutes apart at most.
# shellcheck disable=SC2034 # RRM and RWM are read through namerefs (med)
declare -A W R RRI RRM RWI RWM RRC RWC RRF RWF RRFU RWFU WC RC WN RN WB RB RRB RWB WX RX RRX RWX WU RU RRU RWU WF FLOOR
FLOOR_SPG=()
servers=(lvnbd nbdkit qemu-nbd nbd-server)
# start_server NAME: starts it on a free loopback port serving IMG as
# "bench"; sets pid, uri and log.
start_server() {
	local srv=$1 port
	port=$(free_port)
	log=$WORK/$srv.log
	uri=nbd://127.0.0.1:$port/bench
	case $srv in
	lvnbd) "${pin_server[@]}" "$LVNBD" serve --listen "tcp://127.0.0.1:$port" --export "bench=$IMG" --log-level warn >>"$log" 2>&1 & ;;
	nbdkit) "${pin_server[@]}" nbdkit -f -t 16 -p "$port" -i 127.0.0.1 file "file=$IMG" >>"$log" 2>&1 & ;;
	qemu-nbd) "${pin_server[@]}" qemu-nbd -f raw -t -e 8 -b 127.0.0.1 -p "$port" -x bench --cache=writeback --aio=threads "$IMG" >>"$log" 2>&1 & ;;
	nbd-server)
		# It drops to user nbd unless told otherwise, and then cannot
		# open the image read-write; -d would serve one connection only,
		# so it daemonizes and is tracked by its pid file.
		cat >"$WORK/nbd-server.conf" <<-EOF
			[generic]
			    user = root
			    group = root
			    listenaddr = 127.0.0.1
			    port = $port
			    allowlist = false
			[bench]
			    exportname = $IMG
			    flush = true
			    fua = true
		EOF
		rm -f "$WORK/nbd-server.pid"
		"${pin_server[@]}" nbd-server -C "$WORK/nbd-server.conf" -p "$WORK/nbd-server.pid" >>"$log" 2>&1 || die "nbd-server failed to start"
		# Its daemon writes the pid file after the parent has returned.
		for _ in $(seq 50); do [ -s "$WORK/nbd-server.pid" ] && break; sleep 0.1; done
		[ -s "$WORK/nbd-server.pid" ] || die "nbd-server wrote no pid file in 5 s; see $log"
		;;
	esac
	if [ "$srv" = nbd-server ]; then pid=$(cat "$WORK/nbd-server.pid"); else pid=$!; fi
	pids+=("$pid")
	wait_ready "$uri" "$pid"
}

# after_step NAME: checks the server survived; if the step was cut short,
# restarts it, so the backlog a killed client left does not slow the next
# step.
after_step() {
	alive "$pid" "$1" "$log"
	if [ "$rc" = 124 ]; then
		stop_server "$pid"
		start_server "$1"
	fi
}

# proc_ticks PID SUM: the sum SUM (an awk expression of the fields of
# /proc/PID/stat after the command name, which may hold spaces: utime stime
# cutime cstime are $12 to $15) over PID and its children, live (nbd-server's
# per-client processes) and reaped. A child gone before its stat is read
# counts 0 (awk prints the sum of no lines).
proc_ticks() {
	local p t=0
	for p in "$1" $(pgrep -P "$1" || true); do
		t=$((t + $(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk "{s = $2} END {print s + 0}")))
	done
	echo "$t"
}
# cpu_ticks PID: CPU time (clock ticks) used by PID and its children.
# shellcheck disable=SC2016 # the $N are awk's
cpu_ticks() { proc_ticks "$1" '$12 + $13 + $14 + $15'; }
# user_ticks PID: the part of cpu_ticks spent in user space, the server's
# own code (utime and cutime); the rest is the kernel's work for it.
# shellcheck disable=SC2016 # the $N are awk's
user_ticks() { proc_ticks "$1" '$12 + $14'; }
TICKS=$(getconf CLK_TCK)
NCPU=$(nproc)

# busy_ticks: the whole machine's CPU time at work (user, nice, system, irq,
# softirq; not idle, iowait or steal), in clock ticks over all CPUs.
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }

# step_start: notes the server's and the machine's CPU, and the time, before
# a step.
step_start() {
	t0=$(cpu_ticks "$pid")
	v0=$(user_ticks "$pid")
	b0=$(busy_ticks)
	w0=$(date +%s.%N)
}

# How far could any server go on this machine? The server's share of the
# CPU the machine spent on a step bounds what a cheaper server could gain
# while the clients and the kernel's own work stay as they are: one that used
# no CPU at all would finish the same work in (1 - share) of the CPU, so at
# most 1 / (1 - share) times as fast, as long as the CPU is what limits it
# (the machine near 100% busy).
#
# Every bound here holds the clients' work per request as it was, and that
# is not fixed: how a server delivers its replies changes what they cost the
# client. fio's nbd engine is one thread near 100% of a core, yet it needed
# about a tenth less CPU per request against lvnbd than against nbdkit, and
# lvnbd's random runs beat nbdkit's by more than 100 / fio's CPU %. fio makes
# the same system calls per request against both (a poll, a send, four
# receives per read); what differed, measured once, is how often its poll
# had to sleep: 0.005 times per request against lvnbd, whose replies go out
# together, 0.12 against nbdkit. So fio's CPU per request is reported, and
# not used as a cap.
#
# The same reasoning with less taken away gives closer bounds. What the
# server's own code could still gain is 1 / (1 - its user-space share of the
# machine's busy CPU): the kernel's work for the server (TCP, page cache,
# copies into and out of it) stays. And a write must at least put the bytes
# into the image, which costs the kernel floor_ticks of CPU however the
# server does it (see write_floor); only the rest of the server's CPU could go.
#
# step_load BUSYVAR CEILVAR CODEVAR: after a step, the machine's busy
# % (of all its CPUs, over the step's time), that ceiling, and the one for the
# server's own code. Leaves step_server and step_busy (ticks) for write_bound.
step_load() {
	local t1 v1 b1 w1
	t1=$(cpu_ticks "$pid")
	v1=$(user_ticks "$pid")
	b1=$(busy_ticks)
	w1=$(date +%s.%N)
	step_server=$((t1 - t0)) step_busy=$((b1 - b0))
	printf -v "$1" '%.0f' "$(awk -v b="$step_busy" -v hz="$TICKS" -v t="$w0" -v u="$w1" -v n="$NCPU" 'BEGIN {print b / hz / (u - t) / n * 100}')"
	printf -v "$2" '%.2f' "$(gain "$step_server" "$step_busy")"
	printf -v "$3" '%.2f' "$(gain $((v1 - v0)) "$step_busy")"
}

# gain TICKS BUSY: 1 / (1 - TICKS/BUSY), 99 for all of it.
gain() {
	awk -v s="$1" -v b="$2" 'BEGIN {
		if (s < 0) s = 0
		print (b > s) ? b / (b - s) : 99 }'
}

# write_floor: the kernel's CPU (clock ticks) to write MIB MiB over an image
# made by fresh_image, 1 MiB per write(2) from one buffer (perl is in every
# Debian): the least any server's writes cost, however they get the bytes
# there. On tmpfs it is mostly copying into the pages.
write_floor() {
	local f=$IMG secs
	fresh_image "$f" "$MIB"
	secs=$({ TIMEFORMAT=%3S; time perl -e '
		my $b = "\x55" x 1048576;
		open(my $f, "+<", $ARGV[0]) or die "$ARGV[0]: $!\n";
		for (1 .. $ARGV[1]) { defined(syswrite($f, $b)) or die "$ARGV[0]: $!\n" }
		close($f) or die "$ARGV[0]: $!\n"' "$f" "$MIB"; } 2>&1) || die "timing writes to $f failed: $secs"
	rm -f "$f"
	awk -v s="$secs" -v hz="$TICKS" 'BEGIN {printf "%.0f", s * hz}'
}

# write_bound VAR FLOOR: after a write step, what a server doing nothing but
# the image's own work (FLOOR ticks) could gain over this one.
write_bound() { printf -v "$1" '%.2f' "$(gain $((step_server - $2)) "$step_busy")"; }

# per_gib AMOUNT UNITS: AMOUNT (UNITS to the second: TICKS for clock ticks,
# 1 for seconds) as seconds per GiB of a BYTES copy, to two places.
per_gib() { awk -v a="$1" -v u="$2" -v b="$BYTES" 'BEGIN {printf "%.2f", a / u / (b / 1073741824)}'; }

# copy_cpu VAR CLIENTVAR: the server's CPU seconds per GiB in the last copy
# (from t0), and nbdcopy's.
copy_cpu() {
	local t1
	t1=$(cpu_ticks "$pid")
	printf -v "$1" '%s' "$(per_gib $((t1 - t0)) "$TICKS")"
	printf -v "$2" '%s' "$(per_gib "$copy_client" 1)"
}

# fio_cpu USVAR CLIENTVAR CLIENTUSVAR IOPS RW: the server's CPU per request
# (µs) in the last fio run, from cpu_ticks before (t0) and after; fio's own
# CPU (% of a core) and fio's CPU per request (µs).
fio_cpu() {
	local t1 pct
	t1=$(cpu_ticks "$pid")
	printf -v "$1" '%.1f' "$(awk -v d=$((t1 - t0)) -v hz="$TICKS" -v i="$4" -v s="$RUNTIME" 'BEGIN {print d / hz / (i * s) * 1e6}')"
	pct=$(jq -r '.jobs[0] | .usr_cpu + .sys_cpu' "$WORK/fio-$5.json")
	printf -v "$2" '%.0f' "$pct"
	printf -v "$3" '%.1f' "$(awk -v p="$pct" -v i="$4" 'BEGIN {print (i > 0) ? p / 100 / i * 1e6 : 0}')"
}

ROUNDS=${BENCH_ROUNDS:-3}
for round in $(seq "$ROUNDS"); do
	echo "== round $round of $ROUNDS =="
	FLOOR[$round]=$(write_floor)
	FLOOR_SPG+=("$(per_gib "${FLOOR[$round]}" "$TICKS")")
	echo "-- the image's own work for a write: ${FLOOR_SPG[-1]} s/GiB (kernel CPU, ${MIB} MiB written over the image)"
	order=("${servers[@]:$(((round - 1) % ${#servers[@]}))}" "${servers[@]:0:$(((round - 1) % ${#servers[@]}))}")
	for srv in "${order[@]}"; do
		k=$srv/$round
		fresh_image "$IMG" "$MIB"
		start_server "$srv"
		mc=$(nbdinfo --can multi-conn "$uri" && echo yes || echo no)
		echo "-- $srv on $uri (multi-conn: $mc)"
		step_start
		copy "W[$k]" "$BYTES" "$log" --flush -C 4 "$SRC" "$uri"
		copy_cpu "WC[$k]" "WN[$k]"
		step_load "WB[$k]" "WX[$k]" "WU[$k]"
		write_bound "WF[$k]" "${FLOOR[$round]}"
		after_step "$srv"
		step_start
		copy "R[$k]" "$BYTES" "$log" -C 4 "$uri" null:
		copy_cpu "RC[$k]" "RN[$k]"
		step_load "RB[$k]" "RX[$k]" "RU[$k]"
		after_step "$srv"
		step_start
		fio_run "RRI[$k]" "RRM[$k]" "$uri" randread "$log"
		fio_cpu "RRC[$k]" "RRF[$k]" "RRFU[$k]" "${RRI[$k]}" randread
		step_load "RRB[$k]" "RRX[$k]" "RRU[$k]"
		after_step "$srv"
		step_start
		fio_run "RWI[$k]" "RWM[$k]" "$uri" randwrite "$log"
		fio_cpu "RWC[$k]" "RWF[$k]" "RWFU[$k]" "${RWI[$k]}" randwrite
		step_load "RWB[$k]" "RWX[$k]" "RWU[$k]"
		after_step "$srv"
		printf '   nbdcopy write %s MB/s (server %s s/GiB, nbdcopy %s), read %s MB/s (%s s/GiB, %s); fio randread %s IOPS (server %s µs/request; fio %s µs, %s%% CPU), randwrite %s IOPS (%s µs; %s µs, %s%%)\n' \
			"${W[$k]}" "${WC[$k]}" "${WN[$k]}" "${R[$k]}" "${RC[$k]}" "${RN[$k]}" "${RRI[$k]}" "${RRC[$k]}" "${RRFU[$k]}" "${RRF[$k]}" "${RWI[$k]}" "${RWC[$k]}" "${RWFU[$k]}" "${RWF[$k]}"
		stop_server "$pid"
	done
done

# rounds ARRAY A [B]: A's figure in each round, a line each; or A's over B's.
rounds() {
	local -n a=$1
	local r
	for r in $(seq "$ROUNDS"); do
		if (($# == 3)); then ratio "${a[$2/$r]}" "${a[$3/$r]}" && echo; else echo "${a[$2/$r]}"; fi
	done
}
# med ARRAY A [B]: the median over the rounds (the lower middle of an even
# count) of A's figure, or of A's over B's; a bound ("<N", ">N") keeps its mark.
med() {
	rounds "$@" | awk '{v = $0; sub(/^[<>]/, "", v); print v "\t" $0}' | sort -g | awk -F'\t' '{a[NR] = $2} END {print a[int((NR + 1) / 2)]}'
}
# spread ARRAY A B: the lowest and highest of the rounds' ratios.
spread() {
	rounds "$@" | awk '{sub(/^[<>]/, ""); print}' | sort -g | awk 'NR == 1 {lo = $0} {hi = $0} END {print lo "-" hi}'
}

# --- 2. lvnbd bench against lvnbd, on a fresh image ----------------------------
echo
echo "== lvnbd bench against lvnbd serve on loopback =="
fresh_image "$IMG" "$MIB"
start_server lvnbd
LVNBD_URI=$uri LVNBD_PID=$pid
lb() {
	local name=$1
	shift
	lvnbd_bench "$WORK/lb.json" "$WORK/lvnbd.log" "$@"
	jq -r '[.mb_per_s, .iops, .read.latency_us.p50 + .write.latency_us.p50,
		.read.latency_us.p99 + .write.latency_us.p99, .connections, .queue_depth, .block_size,
		(if .interrupted or .error != "" then " (cut short)" else "" end)] | @tsv' "$WORK/lb.json" |
		awk -v n="$name" -F'\t' '{printf "   %-12s %8.1f MB/s %8.0f IOPS   p50 %7.0f µs   p99 %7.0f µs   (%d conns, QD %d, bs %d)%s\n", n, $1, $2, $3, $4, $5, $6, $7, $8}'
}
LB_SIZE=$((MIB < 1024 ? MIB : 1024))M
lb seq-write --mode write --force --bs 1M --qd 8 --conns 4 --size "$LB_SIZE" --runtime "${RUNTIME}s" "$LVNBD_URI"
lb seq-read --mode read --bs 1M --qd 8 --conns 4 --size "$LB_SIZE" --runtime "${RUNTIME}s" "$LVNBD_URI"
lb randread --mode randread --bs 4k --qd 32 --conns 4 --runtime "${RUNTIME}s" "$LVNBD_URI"
alive "$LVNBD_PID" lvnbd "$WORK/lvnbd.log"
stop_server "$LVNBD_PID"

# --- 3. shaped GbE links in network namespaces ---------------------------------
# Two namespaces joined by two veth pairs, each shaped to 1 Gbit/s in both
# directions with tbf. The addresses are TEST-NET-1 (192.0.2.0/24) and exist
# only inside these namespaces. tbf counts Ethernet frames without preamble,
# inter-frame gap and FCS, so the shaped ceiling is ~119.5 MB/s of payload,
# a little above real GbE's 117.6 MB/s, which the figures are compared with.
echo
echo "== lvnbd over shaped links (tbf rate 1gbit burst 256kb latency 50ms, both ends) =="
ip netns add "$NS_SRV"
ip netns add "$NS_CLI"
ip -n "$NS_SRV" link set lo up
ip -n "$NS_CLI" link set lo up
for l in 1 2; do
	s=lvb$$s$l c=lvb$$c$l
	ip link add "$s" netns "$NS_SRV" type veth peer name "$c" netns "$NS_CLI"
	ip -n "$NS_SRV" addr add "192.0.2.$((4 * l - 3))/30" dev "$s"
	ip -n "$NS_CLI" addr add "192.0.2.$((4 * l - 2))/30" dev "$c"
	ip -n "$NS_SRV" link set "$s" up
	ip -n "$NS_CLI" link set "$c" up
	ip netns exec "$NS_SRV" tc qdisc add dev "$s" root tbf rate 1gbit burst 256kb latency 50ms
	ip netns exec "$NS_CLI" tc qdisc add dev "$c" root tbf rate 1gbit burst 256kb latency 50ms
done
LINK_BYTES=$((LINK_MIB * 1048576))
HALF=$((LINK_MIB / 2))
rm -f "$IMG" "$SRC" # room in tmpfs
fresh_image "$WORK/link.img" "$LINK_MIB"
fresh_image "$WORK/half0.img" "$HALF"
fresh_image "$WORK/half1.img" "$HALF"
make_source "$WORK/link-src.img" "$LINK_MIB"
make_source "$WORK/half-src.img" "$HALF"
log=$WORK/lvnbd-link.log
start_link_server() {
	ip netns exec "$NS_SRV" "${pin_server[@]}" "$LVNBD" serve --listen tcp://192.0.2.1:10809 --listen tcp://192.0.2.5:10809 \
		--export "link=$WORK/link.img" --export "half0=$WORK/half0.img" --export "half1=$WORK/half1.img" \
		--log-level warn >>"$log" 2>&1 &
	pid=$!
	pids+=("$pid")
	wait_ready nbd://192.0.2.1/link "$pid" "$NS_CLI"
	wait_ready nbd://192.0.2.5/link "$pid" "$NS_CLI"
}
after_link_step() {
	alive "$pid" "lvnbd (links)" "$log"
	if [ "$rc" = 124 ]; then
		stop_server "$pid"
		start_link_server
	fi
}
start_link_server
client_exec=(ip netns exec "$NS_CLI" "${pin_client[@]}")

# (a) one link: nbdcopy with 4 connections, as a leg with 4 sockets.
copy L1W "$LINK_BYTES" "$log" --flush -C 4 "$WORK/link-src.img" nbd://192.0.2.1/link
after_link_step
copy L1R "$LINK_BYTES" "$log" -C 4 nbd://192.0.2.1/link null:
after_link_step

# (b) two links: nbdcopy cannot spread one copy over two URIs, so two
# nbdcopy processes run at once, each over its own link moving half the data
# (an export per half); the rate is all the bytes over the time both took.
two_links() { # two_links VAR write|read
	started=$(date +%s.%N)
	if [ "$2" = write ]; then
		start_bounded "$TIMEOUT" "$log" "${client_exec[@]}" nbdcopy --no-extents --flush -C 2 "$WORK/half-src.img" nbd://192.0.2.1/half0
		start_bounded "$TIMEOUT" "$log" "${client_exec[@]}" nbdcopy --no-extents --flush -C 2 "$WORK/half-src.img" nbd://192.0.2.5/half1
	else
		start_bounded "$TIMEOUT" "$log" "${client_exec[@]}" nbdcopy --no-extents -C 2 nbd://192.0.2.1/half0 null:
		start_bounded "$TIMEOUT" "$log" "${client_exec[@]}" nbdcopy --no-extents -C 2 nbd://192.0.2.5/half1 null:
	fi
	wait_children
	check "$log" "two-link nbdcopy $2"
	printf -v "$1" '%s' "$(mbps $((HALF * 2 * 1048576)))"
}
two_links L2W write
after_link_step
two_links L2R read
after_link_step

# The same through lvnbd bench, which spreads its connections over both URIs
# of one export, as a dom0 with two links per leg would.
lbl() { # lbl VAR ARGS...
	local var=$1
	shift
	lvnbd_bench "$WORK/lb.json" "$log" --bs 1M --qd 8 --conns 4 --size "${LINK_MIB}M" --runtime "${TIMEOUT}s" "$@"
	printf -v "$var" '%.1f' "$(jq -r .mb_per_s "$WORK/lb.json")"
}
lbl LB1W --mode write --force nbd://192.0.2.1/link
lbl LB1R --mode read nbd://192.0.2.1/link
lbl LB2W --mode write --force nbd://192.0.2.1/link nbd://192.0.2.5/link
lbl LB2R --mode read nbd://192.0.2.1/link nbd://192.0.2.5/link
alive "$pid" "lvnbd (links)" "$log"

# --- report --------------------------------------------------------------------
echo
echo "== results: loopback TCP, ${MIB} MiB tmpfs image; nbdcopy -C 4 (MB/s), fio nbd 4 KiB QD32 ${RUNTIME} s; medians of $ROUNDS rounds$pinned =="
row() { printf '%-18s %11s %11s %14s %14s %15s %15s\n' "$@"; }
row server "write MB/s" "read MB/s" "randread IOPS" "randread MB/s" "randwrite IOPS" "randwrite MB/s"
for s in "${servers[@]}"; do
	row "$s" "$(med W "$s")" "$(med R "$s")" "$(med RRI "$s")" "$(med RRM "$s")" "$(med RWI "$s")" "$(med RWM "$s")"
done
for s in "${servers[@]:1}"; do
	row "lvnbd/$s" "$(med W lvnbd "$s")" "$(med R lvnbd "$s")" "$(med RRI lvnbd "$s")" "" "$(med RWI lvnbd "$s")" ""
done
row "  rounds' range" "$(spread W lvnbd nbdkit)" "$(spread R lvnbd nbdkit)" "$(spread RRI lvnbd nbdkit)" "" "$(spread RWI lvnbd nbdkit)" ""
echo "(ratios: the median of each round's ratio; range: lvnbd/nbdkit's lowest and highest round;"
echo " '<N': cut short at ${TIMEOUT} s, so at most N; ratios with it are bounds)"
echo
echo "== the server's CPU for the same work, and its clients' (nbdcopy; fio, one thread) =="
crow() { printf '%-14s %6s %8s %6s %8s %8s %7s %5s %8s %7s %5s\n' "$@"; }
crow "" write "" read "" randread "" "" randwrite "" ""
crow server "s/GiB" nbdcopy "s/GiB" nbdcopy "µs/req" "fio µs" "fio %" "µs/req" "fio µs" "fio %"
for s in "${servers[@]}"; do
	crow "$s" "$(med WC "$s")" "$(med WN "$s")" "$(med RC "$s")" "$(med RN "$s")" "$(med RRC "$s")" "$(med RRFU "$s")" "$(med RRF "$s")" "$(med RWC "$s")" "$(med RWFU "$s")" "$(med RWF "$s")"
done
crow "nbdkit/lvnbd" "$(med WC nbdkit lvnbd)" "$(med WN nbdkit lvnbd)" "$(med RC nbdkit lvnbd)" "$(med RN nbdkit lvnbd)" "$(med RRC nbdkit lvnbd)" "$(med RRFU nbdkit lvnbd)" "" "$(med RWC nbdkit lvnbd)" "$(med RWFU nbdkit lvnbd)" ""
echo "(CPU time of the server process and its children; nbdcopy's per GiB; fio's per request and as %"
echo " of a core. On two cores the clients' CPU bounds the figures above, and what a client spends"
echo " per byte or request depends on the server too: fio is one thread near 100% of a core, so its"
echo " IOPS follow its CPU per request, and replies ready when it polls spare it a sleep and a"
echo " wake-up. nbdkit/lvnbd above 1: lvnbd, or its client, needs less.)"
echo
echo "== the most any server could gain here: a server using no CPU at all, against each server's runs =="
xrow() { printf '%-18s %9s %7s %9s %7s %9s %7s %9s %7s\n' "$@"; }
xrow "" write busy read busy randread busy randwrite busy
for s in "${servers[@]}"; do
	xrow "$s" "$(med WX "$s")" "$(med WB "$s")%" "$(med RX "$s")" "$(med RB "$s")%" "$(med RRX "$s")" "$(med RRB "$s")%" "$(med RWX "$s")" "$(med RWB "$s")%"
done
echo "(1 / (1 - the server's share of the machine's busy CPU): the factor by which a free server could"
echo " beat that server while the clients and the kernel do what they did per request. 'busy': of all"
echo " ${NCPU} CPUs during the step; well under 100% the limit is latency, not CPU, and the factor does"
echo " not bound it. It is generous: the server's CPU includes kernel TCP work that any server"
echo " causes. lvnbd/nbdkit above nbdkit's factor needs the clients or the kernel to do less per"
echo " request, as fio does with lvnbd's replies; see fio µs above.)"
echo
echo "== closer bounds: the kernel's work for the server stays, or for writes the image's own work =="
frow() { printf '%-18s %9s %9s %9s %9s %14s\n' "$@"; }
frow "" write read randread randwrite "write, image"
for s in "${servers[@]}"; do
	frow "$s" "$(med WU "$s")" "$(med RU "$s")" "$(med RRU "$s")" "$(med RWU "$s")" "$(med WF "$s")"
done
echo "(The first four: what the server's own code could still gain if it cost nothing, 1 / (1 - its"
echo " user-space share of the machine's busy CPU); the kernel's TCP, page-cache and copying work"
echo " for it stays, and so does the clients'. 'write, image': what a server that did nothing but"
echo " put the bytes into the image could gain over this one; that work alone, measured each round"
echo " by writing ${MIB} MiB over the image, took ${FLOOR_SPG[*]} s/GiB. lvnbd/nbdkit above nbdkit's"
echo " 'write, image' is beyond any server that has to write the image through the kernel.)"
echo
echo "== results: lvnbd over shaped GbE links, ${LINK_MIB} MiB per run (MB/s; share of payload line rate)$pinned =="
lrow() { printf '%-46s %9s %6s %9s %6s\n' "$1" "$2" "$(ratio "$2" "$4")" "$3" "$(ratio "$3" "$4")"; }
printf '%-46s %9s %6s %9s %6s\n' "" write share read share
lrow "1 link, nbdcopy -C 4" "$L1W" "$L1R" $GBE_PAYLOAD
lrow "1 link, lvnbd bench 4 conns QD8 1M" "$LB1W" "$LB1R" $GBE_PAYLOAD
lrow "2 links, 2 x nbdcopy -C 2, one half each" "$L2W" "$L2R" 235.2
lrow "2 links, lvnbd bench 4 conns over both URIs" "$LB2W" "$LB2R" 235.2
echo "(line rate: $GBE_PAYLOAD MB/s of TCP payload per GbE link, 235.2 for two)"
