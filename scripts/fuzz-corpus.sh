#!/usr/bin/env bash
# Grows the committed fuzz corpus: runs every fuzz target of a package for
# FUZZTIME, then copies what the fuzzer found interesting (kept in Go's
# cache) into the package's testdata/fuzz/, where `go test` replays it on
# every run. Usage: scripts/fuzz-corpus.sh [FUZZTIME] [PACKAGE...]
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${1:-30s}
shift || true
pkgs=("$@")
((${#pkgs[@]})) || pkgs=(./nbd ./server ./client ./fenceagent)
cache=$(go env GOCACHE)/fuzz
for pkg in "${pkgs[@]}"; do
	import=$(go list "$pkg")
	for f in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		echo "fuzz $pkg $f for $fuzztime"
		go test "$pkg" -run '^$' -fuzz "^$f\$" -fuzztime "$fuzztime" >/dev/null
		src="$cache/$import/$f"
		dst="$pkg/testdata/fuzz/$f"
		[ -d "$src" ] || continue
		mkdir -p "$dst"
		# The newest 64 entries are plenty to replay; keep the corpus small.
		ls -t "$src" | head -64 | while read -r e; do cp -n "$src/$e" "$dst/"; done
	done
done
