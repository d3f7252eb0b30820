#!/usr/bin/env bash
# Builds cowsnap and serves an example origin with a snapshot over NBD.
#
#   scripts/quickstart.sh [POOL_DIR]        (default: ./demo-pool)
#
# On first run it creates the pool with a 256 MiB origin `example` (a few patterns
# written into it) and a snapshot `example-snap`; then it serves both until Ctrl-C and
# prints the NBD URIs. Try, in another terminal:
#   nbdinfo --list 'nbd+unix:///?socket=POOL_DIR/nbd.sock'
#   qemu-io -f raw -c 'write -P 0xbb 0 1M' 'nbd+unix:///example?socket=POOL_DIR/nbd.sock'
#   qemu-io -f raw -c 'read -P 0xaa 0 1M' 'nbd+unix:///example-snap?socket=POOL_DIR/nbd.sock'
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
pool=$(realpath -m "${1:-demo-pool}")
cargo build --release -q --manifest-path "$repo/Cargo.toml" -p cowsnap
bin="$repo/target/release/cowsnap"
export COWSNAP_POOL="$pool"
if [ ! -f "$pool/pool.json" ]; then
  "$bin" init
  "$bin" origin create example --size 256M
  # Something to see: 0xaa in the first MiB, 0x55 at 128 MiB (written to the image
  # directly, before any snapshot exists).
  img="$pool/example.img"
  head -c 1048576 /dev/zero | tr '\0' '\252' | dd of="$img" conv=notrunc status=none
  head -c 1048576 /dev/zero | tr '\0' '\125' | dd of="$img" bs=1M seek=128 conv=notrunc status=none
  "$bin" snapshot create example-snap --origin example --cow-size 64M
fi
"$bin" list
echo
echo "Ctrl-C stops the server (it flushes everything first)."
exec "$bin" serve
