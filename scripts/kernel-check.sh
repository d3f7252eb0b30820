#!/usr/bin/env bash
# Asks the real Linux kernel whether it accepts COW images written by cowsnap.
#
# Writes COW images with cowsnap (chunk sizes 4K/8K/64K, more than one metadata area, a
# PO store after an overflow, a store invalidated by an origin overflow: see
# crates/cowsnap-core/tests/kernel_check_cows.rs), then runs
# ../shared/kernel-rig/check-cow.sh on each (a VM, ~10 s per image) and compares the
# kernel's status line and snapshot sha256 with cowsnap's.
#
# Usage: scripts/kernel-check.sh [OUTDIR]      (default: a temp dir, removed)
# Needs the rig built once: apt-get update; ../shared/kernel-rig/build-initramfs.sh --install-deps
# Exit 0 when the kernel agrees on every image.
set -euo pipefail
cd "$(dirname "$0")/.."
RIG="${RIG:-$(cd .. && pwd)/shared/kernel-rig}"
[ -x "$RIG/check-cow.sh" ] || { echo "kernel-check: no rig at $RIG" >&2; exit 2; }
OUT="${1:-}"
if [ -z "$OUT" ]; then OUT="$(mktemp -d "${TMPDIR:-/tmp}/kernel-check.XXXXXX")"; trap 'rm -rf "$OUT"' EXIT; fi
mkdir -p "$OUT"

echo "kernel-check: writing COW images with cowsnap into $OUT"
KERNEL_CHECK_OUT="$OUT" cargo test -q -p cowsnap-core --test kernel_check_cows \
    write_cows_for_the_kernel_check -- --ignored --exact >/dev/null

fail=0
while IFS=$'\t' read -r name chunk store want_status want_sha; do
    log="$OUT/$name.kernel.txt"
    "$RIG/check-cow.sh" -c "$chunk" -p "$store" "$OUT/$name/origin.img" "$OUT/$name/cow.img" > "$log" 2>&1 || true
    got_status="$(sed -n 's/^status: //p' "$log" | cut -d' ' -f4-)"
    got_sha="$(sed -n 's/^sha256_snapshot: //p' "$log")"
    create_rc="$(sed -n 's/^create_rc: //p' "$log")"
    [ "$want_sha" = "-" ] && got_sha_cmp="-" || got_sha_cmp="$got_sha"
    if [ "$create_rc" = 0 ] && [ "$got_status" = "$want_status" ] && [ "$got_sha_cmp" = "$want_sha" ]; then
        verdict=PASS
    else
        verdict=FAIL; fail=1
    fi
    printf '%s %-36s chunk %-4s %-3s kernel: create_rc=%s status="%s" sha256=%s | cowsnap: status="%s" sha256=%s\n' \
        "$verdict" "$name" "$chunk" "$store" "${create_rc:-?}" "$got_status" "${got_sha:0:16}" "$want_status" "${want_sha:0:16}"
    [ $verdict = FAIL ] && sed 's/^/    /' "$log"
done < "$OUT/cases.tsv"
exit $fail
