#!/usr/bin/env bash
# `make run`: serve the file driver's volumes (./lvnbd-data) on the default
# address, with a 1 GiB volume disk0, show what a client sees, benchmark the
# server on a scratch volume (never disk0, whose data survives between runs),
# then keep serving (on a terminal) or stop.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=bin/lvnbd
DATA=lvnbd-data
URI=nbd://127.0.0.1:10809/disk0
# The benchmark writes: it gets a volume of its own, made anew for each run.
SCRATCH=bench-scratch
BENCH_URI=nbd://127.0.0.1:10809/$SCRATCH
CTL=$(mktemp -u /tmp/lvnbd-run.XXXXXX.sock)
VOLS=(--volumes "file://./$DATA" --control "$CTL")
"$BIN" volume list "${VOLS[@]}" | grep -q '^disk0 ' || "$BIN" volume create disk0 --size 1G "${VOLS[@]}"
if "$BIN" volume list "${VOLS[@]}" | grep -q "^$SCRATCH "; then
	"$BIN" volume remove "$SCRATCH" "${VOLS[@]}"
fi
"$BIN" volume create "$SCRATCH" --size 1G "${VOLS[@]}"

# No flags needed: file://./lvnbd-data and 127.0.0.1:10809 are the defaults.
# A private control socket keeps this demo apart from a system server.
"$BIN" serve --control "$CTL" 2>"$DATA/server.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT

# Wait until the server answers (bounded), or report why it did not start.
for _ in $(seq 100); do
	if ! kill -0 $pid 2>/dev/null; then
		echo "run: lvnbd serve exited; is port 10809 already in use? (ss -ltnp 'sport = :10809')" >&2
		cat "$DATA/server.log" >&2
		exit 1
	fi
	nbdinfo --size "$URI" >/dev/null 2>&1 && break
	sleep 0.1
done

echo
echo "== what a client sees (nbdinfo $URI)"
nbdinfo "$URI"

echo
echo "== benchmark (on the scratch volume $SCRATCH, not disk0)"
"$BIN" bench "$BENCH_URI" --mode write --bs 1M --size 512M --force
"$BIN" bench "$BENCH_URI" --mode read --bs 1M --size 512M
"$BIN" bench "$BENCH_URI" --mode randread --bs 4k --qd 32 --runtime 5s
"$BIN" volume remove "$SCRATCH" "${VOLS[@]}"

echo
echo "Serving $URI (the file driver's volume disk0 in $DATA/; log in $DATA/server.log). Try:"
echo "  nbdinfo $URI"
echo "  $BIN info --map $URI"
echo "  $BIN status --control $CTL"
echo "  $BIN snapshot create disk0@demo ${VOLS[*]}   # appears as export disk0@demo"
echo "  $BIN attach $URI        # on a host with the nbd module"
if [ -t 0 ]; then
	echo "Press Ctrl-C to stop."
	wait $pid
else
	echo "(not a terminal: stopping the server)"
fi
