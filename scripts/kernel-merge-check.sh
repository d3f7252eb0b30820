#!/usr/bin/env bash
# cowsnap merges part of a COW and stops; the real Linux kernel finishes the merge.
#
# Writes half-merged images with cowsnap (the base COW of
# crates/cowsnap-core/tests/fixtures/kernel-merge/, merged by cowsnap down to 512, 384
# and 200 entries: see crates/cowsnap-core/tests/kernel_merge.rs, `partial_cases`), then
# runs scripts/kernel-merge-finish.sh on each (the kernel's `snapshot-merge` in a VM of
# ../shared/kernel-rig, ~15 s per image) and compares
#   * the kernel's merged origin sha256 with the snapshot's content (what cowsnap's view
#     showed when it stopped),
#   * the kernel's merged COW sha256 with the kernel's own complete merge of the base COW,
#   * the kernel's final status: done (allocated == metadata).
#
# Usage: scripts/kernel-merge-check.sh [OUTDIR]   (default: a temp dir, removed)
# Needs the rig built once: ../shared/kernel-rig/build-initramfs.sh
# Exit 0 when the kernel agrees on every image.
set -euo pipefail
cd "$(dirname "$0")/.."
RIG="${RIG:-$(cd .. && pwd)/shared/kernel-rig}"
[ -x "$RIG/check-cow.sh" ] || { echo "kernel-merge-check: no rig at $RIG" >&2; exit 2; }
OUT="${1:-}"
if [ -z "$OUT" ]; then OUT="$(mktemp -d "${TMPDIR:-/tmp}/kernel-merge-check.XXXXXX")"; trap 'rm -rf "$OUT"' EXIT; fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

echo "kernel-merge-check: writing half-merged images with cowsnap into $OUT"
KERNEL_CHECK_OUT="$OUT" cargo test -q -p cowsnap-core --test kernel_merge \
    write_half_merged_cows_for_the_kernel_to_finish -- --ignored --exact >/dev/null

fail=0
start_all=$SECONDS
while IFS=$'\t' read -r name left status want_origin want_cow; do
    log="$OUT/$name.kernel.txt"
    t0=$SECONDS
    rc=0
    scripts/kernel-merge-finish.sh -o "$OUT/$name/kernel" "$OUT/$name/origin.img" "$OUT/$name/cow.img" < /dev/null > "$log" 2>&1 || rc=$?
    got_origin="$(sed -n 's/^sha256_merged_origin: //p' "$log" | tail -1)"
    got_status="$(sed -n 's/^status: //p' "$log" | tail -1 | cut -d' ' -f4-)"
    # informational: the merge target's status right after create (the merge may already run)
    got_initial="$(sed -n 's/^status_initial: //p' "$log" | tail -1 | cut -d' ' -f4-)"
    got_cow="-"
    [ -f "$OUT/$name/kernel/cow.img" ] && got_cow="$(sha256sum "$OUT/$name/kernel/cow.img" | cut -d' ' -f1)"
    # done: a == m in "a/b m"
    done_ok=0
    if [[ "$got_status" =~ ^([0-9]+)/[0-9]+\ ([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" = "${BASH_REMATCH[2]}" ]; then done_ok=1; fi
    if [ "$rc" = 0 ] && [ "$got_origin" = "$want_origin" ] && [ "$got_cow" = "$want_cow" ] && [ $done_ok = 1 ]; then
        verdict=PASS
    else
        verdict=FAIL; fail=1
    fi
    printf '%s %-30s cowsnap left %-3s (status %s) | kernel: initial="%s" exit=%s final="%s" origin=%s cow=%s | want origin=%s cow=%s | %ss\n' \
        "$verdict" "$name" "$left" "$status" "$got_initial" "$rc" "$got_status" "${got_origin:0:16}" "${got_cow:0:16}" \
        "${want_origin:0:16}" "${want_cow:0:16}" "$((SECONDS - t0))"
    [ $verdict = FAIL ] && sed 's/^/    /' "$log"
done < "$OUT/cases.tsv"
echo "kernel-merge-check: $((SECONDS - start_all)) s in the VM; $([ $fail = 0 ] && echo 'all PASS' || echo 'FAILURES')"
exit $fail
