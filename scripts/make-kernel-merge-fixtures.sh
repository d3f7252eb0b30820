#!/usr/bin/env bash
# Kernel half-merged COW fixtures: the real kernel's snapshot-merge merges part of a COW
# (tail first) and stops ("Merge failed") at a data chunk mapped to the `error` target.
#
# In one VM of ../shared/kernel-rig (Linux 6.1, dm-snapshot v1.16.0, snapshot-merge v1.5.0):
#   1. origin 8 MiB (make-fixtures.py pattern, tag ORIGINAL), COW 4 MiB, snapshot-origin +
#      `snapshot P 8` (4 KiB chunks, 256 entries per area); 620 single-sector origin writes
#      (copy-outs) and 33 snapshot writes -> 651 exceptions in 3 metadata areas;
#      records the snapshot's sha256 (= the origin after a complete merge) and status;
#   2. per case: copies origin+COW to the case's disks, builds `cowerr` = the COW mapped
#      linearly except the data chunk of table entry POS -> `error`, runs
#      `snapshot-merge ORIGIN /dev/mapper/cowerr P 8` until it stops, records its status,
#      removes it, loads `snapshot ORIGIN COW P 8` over the real COW: status + sha256;
#   3. the same for the status steps (entries left -> status line), and one complete merge.
# On the host: checks everything against a model (make-fixtures.py's pattern), parses every
# saved COW (kernel-merge-fixtures.py check-cow), writes
#   crates/cowsnap-core/tests/fixtures/kernel-merge/{base-manifest.json,base-cow.img.gz,
#   status-steps.tsv,CASE/{origin.img.gz,cow.img.gz,manifest.json,dmesg.txt}}
#
# Usage: scripts/make-kernel-merge-fixtures.sh [-k WORKDIR] [-o FIXDIR]
#   -k WORKDIR   keep the raw images and the guest output there (default: temp, removed)
#   -o FIXDIR    output (default crates/cowsnap-core/tests/fixtures/kernel-merge)
# Needs the rig built (../shared/kernel-rig, or $RIG). TCG: ~2-4 min.
set -euo pipefail
cd "$(dirname "$0")/.."
RIG="${RIG:-$(cd .. && pwd)/shared/kernel-rig}"
export RIG
[ -x "$RIG/run-guest.sh" ] || { echo "no rig at $RIG" >&2; exit 2; }
WORK=; FIX=crates/cowsnap-core/tests/fixtures/kernel-merge
while getopts "k:o:h" opt; do
    case "$opt" in
        k) WORK="$OPTARG" ;;
        o) FIX="$OPTARG" ;;
        *) sed -n '2,/^set /{/^#/p}' "$0"; exit 2 ;;
    esac
done
if [ -z "$WORK" ]; then WORK="$(mktemp -d "${TMPDIR:-/tmp}/kmerge.XXXXXX")"; trap 'rm -rf "$WORK"' EXIT; fi
mkdir -p "$WORK"; WORK="$(cd "$WORK" && pwd)"
PY=scripts/kernel-merge-fixtures.py

python3 $PY plan "$WORK"
python3 "$RIG/make-fixtures.py" gen-origin "$WORK/origin.img" "$WORK/base-manifest.json" initial >/dev/null
rm -f "$WORK/cow.img"; truncate -s 4M "$WORK/cow.img"
DISKS=(-d "origin=$WORK/origin.img" -d "cow=$WORK/cow.img")
for k in err-last-area err-mid-area err-first-area steps; do
    rm -f "$WORK/o-$k.img" "$WORK/c-$k.img"
    truncate -s 8M "$WORK/o-$k.img"; truncate -s 4M "$WORK/c-$k.img"
    DISKS+=(-d "o-$k=$WORK/o-$k.img" -d "c-$k=$WORK/c-$k.img")
done
t0=$(date +%s)
"$RIG/run-guest.sh" -q -t 1200 -o "$WORK/out" "${DISKS[@]}" "$WORK/job" || {
    echo "guest failed, see $WORK/out/console.log (use -k to keep it)" >&2; tail -30 "$WORK/out/console.log" >&2; exit 3; }
echo "VM run: $(( $(date +%s) - t0 )) s"
python3 $PY finish "$WORK" "$FIX"
for d in "$FIX"/*/; do
    want=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["entries_left"])' "$d/manifest.json")
    python3 $PY check-cow "$d/cow.img.gz" --entries "$want"
done
python3 $PY check-cow "$FIX/base-cow.img.gz"
