#!/usr/bin/env bash
# Instructions per engine operation, counted by callgrind: repeatable to a fraction of a
# percent where wall-clock numbers on this VM swing by tens of percent. Compare two
# versions of the engine with it (checkout, run, checkout, run).
#
#   bench/icount.sh              # every workload, 2000 operations each
#   OPS=500 bench/icount.sh      # quicker
#
# Needs valgrind (apt-get install valgrind). Runs the in-memory workloads of
# crates/cowsnap-core/examples/icount.rs (persistent stores on memory devices, one
# thread); only its `measure` function is counted. Prints a Markdown table.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
ops=${OPS:-2000}
command -v valgrind >/dev/null || { echo "icount.sh: valgrind is missing (apt-get install valgrind)" >&2; exit 2; }
target=${CARGO_TARGET_DIR:-$repo/target}
(cd "$repo" && cargo build -q --release -p cowsnap-core --example icount)
bin=$target/release/examples/icount
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "commit $(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && git diff --quiet || echo ' (modified)'), $ops operations per workload"
echo
echo "| workload | snapshots | instructions per operation |"
echo "| --- | ---: | ---: |"
for spec in first-write:0 first-write:1 first-write:2 first-write:8 rewrite:1 rewrite:8 snap-read-hit:1 snap-read-miss:1; do
  w=${spec%:*}; n=${spec#*:}
  valgrind --tool=callgrind --callgrind-out-file="$out/cg" --toggle-collect='icount::measure*' \
    "$bin" "$w" "$n" "$ops" >"$out/log" 2>&1 || { cat "$out/log" >&2; exit 1; }
  ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$out/cg")
  [ -n "$ir" ] && [ "$ir" -gt 0 ] || { echo "icount.sh: no instructions counted for $spec" >&2; exit 1; }
  printf '| %s | %s | %s |\n' "$w" "$n" "$(( ir / ops ))"
done
