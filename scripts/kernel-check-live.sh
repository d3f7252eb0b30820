#!/usr/bin/env bash
# Asks the real kernel to judge COW files written by a running `cowsnap serve` under load:
# fio (nbd engine, QD16, random 4K origin writes and 2K snapshot writes) through NBD with
# direct I/O, two snapshots of different chunk sizes; then the daemon stops and
# ../shared/kernel-rig/check-cow.sh activates each COW in a VM. Passes when the kernel's
# status line and snapshot sha256 equal cowsnap's.
#
#   scripts/kernel-check-live.sh        (needs the rig built once, see kernel-check.sh)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
rig="$repo/../shared/kernel-rig"
cargo build --release -q --manifest-path "$repo/Cargo.toml" -p cowsnap
C="$repo/target/release/cowsnap"
P=$(mktemp -d); export COWSNAP_POOL="$P/pool"
trap '[ -n "${pid:-}" ] && kill -TERM "$pid" 2>/dev/null; rm -rf "$P"' EXIT
"$C" init >/dev/null
"$C" origin create o --size 64M >/dev/null
dd if=/dev/urandom of="$COWSNAP_POOL/o.img" bs=1M count=64 conv=notrunc status=none
"$C" snapshot create s8k --origin o --cow-size 40M --chunk-size 8K >/dev/null
"$C" snapshot create s4k --origin o --cow-size 40M >/dev/null
"$C" serve --direct >"$P/serve.log" 2>&1 & pid=$!
for _ in $(seq 50); do [ -S "$COWSNAP_POOL/nbd.sock" ] && break; sleep 0.1; done
sock="$COWSNAP_POOL/nbd.sock"
fio --name=origin --ioengine=nbd --uri="nbd+unix:///o?socket=$sock" --rw=randwrite --bs=4k \
  --iodepth=16 --size=64M --io_size=24M --randseed=7 >/dev/null
fio --name=snap --ioengine=nbd --uri="nbd+unix:///s8k?socket=$sock" --rw=randwrite --bs=2k \
  --iodepth=16 --size=64M --io_size=2M --randseed=8 >/dev/null
fail=0
declare -A want_status want_sha
for s in s8k s4k; do
  nbdcopy "nbd+unix:///$s?socket=$sock" "$P/$s.img"
  want_sha[$s]=$(sha256sum "$P/$s.img" | cut -d' ' -f1)
  want_status[$s]=$("$C" status "$s" | sed 's/^[^:]*: //')
done
kill -TERM $pid; wait $pid || true; pid=
for s in s8k s4k; do
  out=$("$rig/check-cow.sh" "$COWSNAP_POOL/o.img" "$COWSNAP_POOL/$s.cow" 2>&1 || true)
  kstatus=$(sed -n 's/^status: //p' <<<"$out")
  ksha=$(sed -n 's/^sha256_snapshot: //p' <<<"$out")
  if [ "$kstatus" = "${want_status[$s]}" ] && [ "$ksha" = "${want_sha[$s]}" ]; then
    echo "PASS $s: kernel status=\"$kstatus\" sha256=${ksha:0:16} | cowsnap status=\"${want_status[$s]}\" sha256=${want_sha[$s]:0:16}"
  else
    echo "FAIL $s: kernel status=\"$kstatus\" sha256=$ksha | cowsnap status=\"${want_status[$s]}\" sha256=${want_sha[$s]}"
    fail=1
  fi
done
exit $fail
