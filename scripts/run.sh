#!/usr/bin/env bash
# `make run`: serve a sparse 1 GiB file on the default address, show what a
# client sees, benchmark it, then keep serving (on a terminal) or stop.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=bin/lvnbd
DATA=lvnbd-data
URI=nbd://127.0.0.1:10809/disk0
mkdir -p "$DATA"
[ -e "$DATA/disk0.img" ] || truncate -s 1G "$DATA/disk0.img"

"$BIN" serve --export "disk0=$DATA/disk0.img" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT

# Wait until the server answers (bounded), or report why it did not start.
for _ in $(seq 100); do
	if ! kill -0 $pid 2>/dev/null; then
		echo "run: lvnbd serve exited; is port 10809 already in use? (ss -ltnp 'sport = :10809')" >&2
		exit 1
	fi
	nbdinfo --size "$URI" >/dev/null 2>&1 && break
	sleep 0.1
done

echo
echo "== what a client sees (nbdinfo $URI)"
nbdinfo "$URI"

echo
echo "== benchmark"
if "$BIN" bench --help >/dev/null 2>&1; then
	"$BIN" bench "$URI" --mode write --bs 1M --size 512M --force
	"$BIN" bench "$URI" --mode read --bs 1M --size 512M
	"$BIN" bench "$URI" --mode randread --bs 4k --qd 32 --runtime 5s
else
	# Until lvnbd bench exists: time nbdcopy, libnbd's copy tool.
	src=$(mktemp -p /dev/shm lvnbd-run.XXXXXX)
	head -c 512M /dev/urandom >"$src"
	start=$(date +%s.%N); nbdcopy --connections=4 "$src" "$URI"; end=$(date +%s.%N)
	echo "sequential write 512 MiB: $(echo "512 * 1.048576 / ($end - $start)" | bc -l | xargs printf '%.0f') MB/s"
	start=$(date +%s.%N); nbdcopy --connections=4 "$URI" null:; end=$(date +%s.%N)
	echo "sequential read 1 GiB:    $(echo "1024 * 1.048576 / ($end - $start)" | bc -l | xargs printf '%.0f') MB/s"
	rm -f "$src"
fi

echo
echo "Serving $URI (backed by $DATA/disk0.img). Connect with:"
echo "  nbdinfo $URI"
echo "  lvnbd attach $URI        # on a host with the nbd module"
if [ -t 0 ]; then
	echo "Press Ctrl-C to stop."
	wait $pid
else
	echo "(not a terminal: stopping the server)"
fi
