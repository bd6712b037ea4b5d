#!/usr/bin/env bash
# Runs every fuzz target of the given packages (default: all) for FUZZTIME
# each, on top of the seeds `go test` replays; `make fuzz` calls it. A target
# that fails prints Go's output, with the failing input Go wrote under the
# package's testdata/fuzz/, and stops the run.
#
# --grow-corpus also copies what the fuzzer found interesting (kept in Go's
# cache) into each package's testdata/fuzz/, where `go test` replays it on
# every run; commit what it adds.
#
# Usage: scripts/fuzz.sh [--grow-corpus] [FUZZTIME] [PACKAGE...]
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
grow=false
if [ "${1:-}" = --grow-corpus ]; then
	grow=true
	shift
fi
fuzztime=${1:-5s}
shift || true
pkgs=("$@")
# One package per go test -fuzz: patterns (./volume/...) are expanded here.
((${#pkgs[@]})) || pkgs=(./...)
list=$("$GO" list "${pkgs[@]}") # fails the script on a bad pattern
mapfile -t pkgs <<<"$list"
cache=$("$GO" env GOCACHE)/fuzz
log=$(mktemp)
trap 'rm -f "$log"' EXIT

for pkg in "${pkgs[@]}"; do
	import=$("$GO" list "$pkg")
	dir=$("$GO" list -f '{{.Dir}}' "$pkg")
	for f in $("$GO" test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		echo "fuzz $import $f for $fuzztime"
		if ! "$GO" test "$pkg" -run '^$' -fuzz "^$f\$" -fuzztime "$fuzztime" >"$log" 2>&1; then
			# Go 1.26's fuzz coordinator can report its own -fuzztime
			# deadline as the target failing, when a worker is still busy
			# as the time runs out (golang/go#75804, fixed in Go 1.27).
			# That report is the one line below and names no input; any
			# failure of the target names the input it wrote.
			if [ "$(grep -c -- '^--- FAIL' "$log")" = 1 ] && grep -qx '    context deadline exceeded' "$log" &&
				! grep -q 'Failing input written' "$log"; then
				echo "   Go's -fuzztime race (golang/go#75804): no failing input, not a failure"
			else
				cat "$log"
				exit 1
			fi
		fi
		src="$cache/$import/$f"
		if $grow && [ -d "$src" ]; then
			mkdir -p "$dir/testdata/fuzz/$f"
			# The newest 64 entries are plenty to replay; keep the corpus small.
			# (Not `| head -64` in the pipeline: with pipefail, sort's SIGPIPE
			# when there are more would stop the script.)
			mapfile -t newest < <(find "$src" -type f -printf '%T@ %f\n' | sort -rn)
			for entry in "${newest[@]:0:64}"; do
				cp -n "$src/${entry#* }" "$dir/testdata/fuzz/$f/"
			done
		fi
	done
done
