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
#   - one raw image on tmpfs (/dev/shm), recreated empty before each server, so
#     every server's writes allocate the same pages and no disk is measured;
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
# 1024), BENCH_RUNTIME (seconds per fio run, default 10), BENCH_TIMEOUT
# (seconds before a copy is cut short and reported as an upper bound,
# default 45).
set -euo pipefail
cd "$(dirname "$0")/.."

LVNBD=${LVNBD:-bin/lvnbd}
MIB=${BENCH_MIB:-2048}
LINK_MIB=${BENCH_LINK_MIB:-1024}
RUNTIME=${BENCH_RUNTIME:-10}
TIMEOUT=${BENCH_TIMEOUT:-45}
GBE_PAYLOAD=117.6 # MB/s of TCP payload on one GbE link (1448 of every 1538 bytes on the wire)

die() { echo "bench: $*" >&2; exit 1; }

# --- tools --------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root: the link runs create network namespaces"
[ -x "$LVNBD" ] || die "$LVNBD not found: run make build (make bench does)"
missing=()
for t in nbdkit qemu-nbd nbd-server nbdcopy nbdinfo fio jq ip tc ss timeout; do
	command -v "$t" >/dev/null || missing+=("$t")
done
((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (scripts/deps.sh all installs them; jq: apt-get install jq)"
[ -d /dev/shm ] || die "no /dev/shm tmpfs"

# --- clean-up, even on failure or Ctrl-C --------------------------------------
WORK=$(mktemp -d /dev/shm/lvnbd-bench.XXXXXX)
NS_SRV=lvb-srv-$$
NS_CLI=lvb-cli-$$
pids=()
cleanup() {
	local rc=$?
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
echo "lvnbd:      $("$LVNBD" --version)"
echo "nbdkit:     $(nbdkit --version)"
echo "qemu-nbd:   $(qemu-nbd --version | head -1)"
echo "nbd-server: $(nbd-server -V 2>&1 | awk '/version/ {print $NF; exit}')"
echo "nbdcopy:    $(nbdcopy --version | head -1)"
echo "fio:        $(fio --version)"
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

# timed BYTES LOG CMD...: runs CMD under the timeout and prints its MB/s, or
# "<N" (an upper bound) when it was cut short. Any other failure is fatal.
timed() {
	local bytes=$1 log=$2 start end rc=0
	shift 2
	start=$(date +%s.%N)
	timeout "$TIMEOUT" "$@" >>"$log" 2>&1 || rc=$?
	end=$(date +%s.%N)
	case $rc in
	0) awk -v b="$bytes" -v s="$start" -v e="$end" 'BEGIN {printf "%.1f", b / (e - s) / 1e6}' ;;
	124) awk -v b="$bytes" -v t="$TIMEOUT" 'BEGIN {printf "<%.1f", b / t / 1e6}' ;;
	*) tail -20 "$log" >&2; die "$1 failed (exit $rc): $*" ;;
	esac
}

# fio_run URI RW LOG: prints "IOPS MB/s" of a 4 KiB QD32 run.
fio_run() {
	local uri=$1 rw=$2 log=$3 out=$WORK/fio-$2.json dir="read"
	[ "$rw" = randwrite ] && dir="write"
	fio --name="$rw" --ioengine=nbd --uri="$uri" --rw="$rw" --bs=4k --iodepth=32 \
		--runtime="$RUNTIME" --time_based --output-format=json --output="$out" >>"$log" 2>&1 ||
		{ tail -20 "$log" >&2; die "fio $rw against $uri failed"; }
	jq -r --arg d "$dir" '.jobs[0][$d] | "\(.iops) \(.bw_bytes / 1e6)"' "$out" | awk '{printf "%.0f %.1f\n", $1, $2}'
}

# Random data for nbdcopy to write: 64 MiB from /dev/urandom repeated (the
# kernel's urandom is too slow here to draw gigabytes).
make_source() {
	local out=$1 mib=$2
	[ -f "$WORK/random64" ] || head -c 64M /dev/urandom >"$WORK/random64"
	: >"$out"
	for _ in $(seq $((mib / 64))); do cat "$WORK/random64" >>"$out"; done
	truncate -s "${mib}M" "$out"
}

fresh_image() { rm -f "$1"; truncate -s "${2}M" "$1"; }

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

# --- 1. four servers on loopback ----------------------------------------------
declare -A W R RRI RRM RWI RWM
servers=(lvnbd nbdkit qemu-nbd nbd-server)
for srv in "${servers[@]}"; do
	fresh_image "$IMG" "$MIB"
	port=$(free_port)
	log=$WORK/$srv.log
	uri=nbd://127.0.0.1:$port/bench
	case $srv in
	lvnbd) "$LVNBD" serve --listen "tcp://127.0.0.1:$port" --export "bench=$IMG" --log-level warn >"$log" 2>&1 & ;;
	nbdkit) nbdkit -f -t 16 -p "$port" -i 127.0.0.1 file "file=$IMG" >"$log" 2>&1 & ;;
	qemu-nbd) qemu-nbd -f raw -t -e 8 -b 127.0.0.1 -p "$port" -x bench --cache=writeback --aio=threads "$IMG" >"$log" 2>&1 & ;;
	nbd-server)
		# It drops to user nbd unless told otherwise, and could not open
		# the image read-write; -d would serve a single connection, so
		# it daemonizes and we track it by its pid file.
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
		nbd-server -C "$WORK/nbd-server.conf" -p "$WORK/nbd-server.pid" >"$log" 2>&1 || die "nbd-server failed to start"
		sleep 0.2
		;;
	esac
	if [ "$srv" = nbd-server ]; then pid=$(cat "$WORK/nbd-server.pid"); else pid=$!; fi
	pids+=("$pid")
	wait_ready "$uri" "$pid"
	mc=$(nbdinfo --can multi-conn "$uri" && echo yes || echo no)
	echo "-- $srv on $uri (multi-conn: $mc)"
	W[$srv]=$(timed "$BYTES" "$log" nbdcopy --flush --no-extents -C 4 "$SRC" "$uri")
	alive "$pid" "$srv" "$log"
	echo "   nbdcopy write ${W[$srv]} MB/s"
	R[$srv]=$(timed "$BYTES" "$log" nbdcopy --no-extents -C 4 "$uri" null:)
	alive "$pid" "$srv" "$log"
	echo "   nbdcopy read  ${R[$srv]} MB/s"
	out=$(fio_run "$uri" randread "$log")
	read -r "RRI[$srv]" "RRM[$srv]" <<<"$out"
	alive "$pid" "$srv" "$log"
	echo "   fio randread  ${RRI[$srv]} IOPS"
	out=$(fio_run "$uri" randwrite "$log")
	read -r "RWI[$srv]" "RWM[$srv]" <<<"$out"
	alive "$pid" "$srv" "$log"
	echo "   fio randwrite ${RWI[$srv]} IOPS"
	if [ "$srv" = lvnbd ]; then LVNBD_URI=$uri; LVNBD_PID=$pid; continue; fi
	pkill -TERM -P "$pid" 2>/dev/null || true
	kill -TERM "$pid"
	for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done

# --- 2. lvnbd bench against lvnbd (the server is still up, image written) ------
echo
echo "== lvnbd bench against lvnbd serve on loopback =="
lb() {
	local name=$1
	shift
	timeout $((TIMEOUT + 30)) "$LVNBD" bench --json "$@" >"$WORK/lb-$name.json" 2>>"$WORK/lvnbd.log" || {
		local rc=$?
		[ $rc = 124 ] && { echo "   $name: cut short after $((TIMEOUT + 30)) s"; return; }
		tail -5 "$WORK/lvnbd.log" >&2
		die "lvnbd bench $name failed (exit $rc)"
	}
	jq -r '[.mb_per_s, .iops, .read.latency_us.p50 + .write.latency_us.p50,
		.read.latency_us.p99 + .write.latency_us.p99, .connections, .queue_depth, .block_size] | @tsv' "$WORK/lb-$name.json" |
		awk -v n="$name" -F'\t' '{printf "   %-12s %8.1f MB/s %8.0f IOPS   p50 %7.0f µs   p99 %7.0f µs   (%d conns, QD %d, bs %d)\n", n, $1, $2, $3, $4, $5, $6, $7}'
}
LB_SIZE=$((MIB < 1024 ? MIB : 1024))M
lb seq-write --mode write --force --bs 1M --qd 8 --conns 4 --size "$LB_SIZE" --runtime "${TIMEOUT}s" "$LVNBD_URI"
lb seq-read --mode read --bs 1M --qd 8 --conns 4 --size "$LB_SIZE" --runtime "${TIMEOUT}s" "$LVNBD_URI"
lb randread --mode randread --bs 4k --qd 32 --conns 1 --runtime "${RUNTIME}s" "$LVNBD_URI"
lb randread-4c --mode randread --bs 4k --qd 32 --conns 4 --runtime "${RUNTIME}s" "$LVNBD_URI"
alive "$LVNBD_PID" lvnbd "$WORK/lvnbd.log"
kill -TERM "$LVNBD_PID"
for _ in $(seq 50); do kill -0 "$LVNBD_PID" 2>/dev/null || break; sleep 0.1; done

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
fresh_image "$WORK/link.img" "$LINK_MIB"
fresh_image "$WORK/half0.img" "$HALF"
fresh_image "$WORK/half1.img" "$HALF"
rm -f "$IMG" # room in tmpfs
make_source "$WORK/link-src.img" "$LINK_MIB"
make_source "$WORK/half-src.img" "$HALF"
log=$WORK/lvnbd-link.log
ip netns exec "$NS_SRV" "$LVNBD" serve --listen tcp://192.0.2.1:10809 --listen tcp://192.0.2.5:10809 \
	--export "link=$WORK/link.img" --export "half0=$WORK/half0.img" --export "half1=$WORK/half1.img" \
	--log-level warn >"$log" 2>&1 &
pid=$!
pids+=("$pid")
wait_ready nbd://192.0.2.1/link "$pid" "$NS_CLI"
wait_ready nbd://192.0.2.5/link "$pid" "$NS_CLI"
inc() { ip netns exec "$NS_CLI" "$@"; }

L1W=$(timed "$LINK_BYTES" "$log" ip netns exec "$NS_CLI" nbdcopy --flush --no-extents -C 4 "$WORK/link-src.img" nbd://192.0.2.1/link)
L1R=$(timed "$LINK_BYTES" "$log" ip netns exec "$NS_CLI" nbdcopy --no-extents -C 4 nbd://192.0.2.1/link null:)
alive "$pid" "lvnbd (links)" "$log"

# Two links: nbdcopy cannot spread one copy over two URIs, so two nbdcopy
# processes run at once, each over its own link, each moving half the data
# (one export per half); the rate is all bytes over the slower one's time.
two_links() {
	local dir=$1 start end rc0=0 rc1=0 p0 p1
	start=$(date +%s.%N)
	if [ "$dir" = write ]; then
		timeout "$TIMEOUT" ip netns exec "$NS_CLI" nbdcopy --flush --no-extents -C 2 "$WORK/half-src.img" nbd://192.0.2.1/half0 >>"$log" 2>&1 & p0=$!
		timeout "$TIMEOUT" ip netns exec "$NS_CLI" nbdcopy --flush --no-extents -C 2 "$WORK/half-src.img" nbd://192.0.2.5/half1 >>"$log" 2>&1 & p1=$!
	else
		timeout "$TIMEOUT" ip netns exec "$NS_CLI" nbdcopy --no-extents -C 2 nbd://192.0.2.1/half0 null: >>"$log" 2>&1 & p0=$!
		timeout "$TIMEOUT" ip netns exec "$NS_CLI" nbdcopy --no-extents -C 2 nbd://192.0.2.5/half1 null: >>"$log" 2>&1 & p1=$!
	fi
	wait "$p0" || rc0=$?
	wait "$p1" || rc1=$?
	end=$(date +%s.%N)
	if [ $rc0 = 124 ] || [ $rc1 = 124 ]; then
		awk -v b="$((HALF * 2 * 1048576))" -v t="$TIMEOUT" 'BEGIN {printf "<%.1f", b / t / 1e6}'
	elif [ $rc0 != 0 ] || [ $rc1 != 0 ]; then
		tail -20 "$log" >&2
		die "two-link nbdcopy $dir failed (exit $rc0, $rc1)"
	else
		awk -v b="$((HALF * 2 * 1048576))" -v s="$start" -v e="$end" 'BEGIN {printf "%.1f", b / (e - s) / 1e6}'
	fi
}
L2W=$(two_links write)
L2R=$(two_links read)
alive "$pid" "lvnbd (links)" "$log"

# The same over lvnbd bench, which spreads its connections over both URIs
# of one export, as a dom0 with two links per leg would.
lbl() {
	inc timeout $((TIMEOUT + 30)) "$LVNBD" bench --json --bs 1M --qd 8 --conns 4 --size "${LINK_MIB}M" \
		--runtime "${TIMEOUT}s" "$@" 2>>"$log" | jq -r '.mb_per_s * 10 | round / 10' ||
		die "lvnbd bench over the links failed: $*"
}
LB1W=$(lbl --mode write --force nbd://192.0.2.1/link)
LB1R=$(lbl --mode read nbd://192.0.2.1/link)
LB2W=$(lbl --mode write --force nbd://192.0.2.1/link nbd://192.0.2.5/link)
LB2R=$(lbl --mode read nbd://192.0.2.1/link nbd://192.0.2.5/link)
alive "$pid" "lvnbd (links)" "$log"

# --- report --------------------------------------------------------------------
echo
echo "== results: loopback TCP, ${MIB} MiB tmpfs image; nbdcopy -C 4 (MB/s), fio nbd 4 KiB QD32 ${RUNTIME} s =="
printf '%-18s %11s %11s %14s %14s %15s %15s\n' server "write MB/s" "read MB/s" "randread IOPS" "randread MB/s" "randwrite IOPS" "randwrite MB/s"
for s in "${servers[@]}"; do
	printf '%-18s %11s %11s %14s %14s %15s %15s\n' "$s" "${W[$s]}" "${R[$s]}" "${RRI[$s]}" "${RRM[$s]}" "${RWI[$s]}" "${RWM[$s]}"
done
for s in "${servers[@]:1}"; do
	printf '%-18s %11s %11s %14s %14s %15s %15s\n' "lvnbd/$s" "$(ratio "${W[lvnbd]}" "${W[$s]}")" "$(ratio "${R[lvnbd]}" "${R[$s]}")" \
		"$(ratio "${RRI[lvnbd]}" "${RRI[$s]}")" "" "$(ratio "${RWI[lvnbd]}" "${RWI[$s]}")" ""
done
echo "('<N': cut short at ${TIMEOUT} s, so at most N; ratios with it are bounds)"
echo
echo "== results: lvnbd over shaped GbE links, ${LINK_MIB} MiB per run (MB/s; share of payload line rate) =="
share() { ratio "$1" "$2"; }
printf '%-44s %10s %7s %10s %7s\n' "" write share read share
printf '%-44s %10s %7s %10s %7s\n' "1 link, nbdcopy -C 4" "$L1W" "$(share "$L1W" $GBE_PAYLOAD)" "$L1R" "$(share "$L1R" $GBE_PAYLOAD)"
printf '%-44s %10s %7s %10s %7s\n' "1 link, lvnbd bench 4 conns QD8 1M" "$LB1W" "$(share "$LB1W" $GBE_PAYLOAD)" "$LB1R" "$(share "$LB1R" $GBE_PAYLOAD)"
printf '%-44s %10s %7s %10s %7s\n' "2 links, 2 x nbdcopy -C 2, one half each" "$L2W" "$(share "$L2W" 235.2)" "$L2R" "$(share "$L2R" 235.2)"
printf '%-44s %10s %7s %10s %7s\n' "2 links, lvnbd bench 4 conns over both URIs" "$LB2W" "$(share "$LB2W" 235.2)" "$LB2R" "$(share "$LB2R" 235.2)"
echo "(line rate: $GBE_PAYLOAD MB/s of TCP payload per GbE link, 235.2 for two)"
