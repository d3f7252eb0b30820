#!/usr/bin/env bash
# Runs the tests that drive qemu-io, qemu-img and qemu-nbd again with qemu 7.2 (Debian
# bookworm's qemu-utils), unpacked into a cache directory and put first on PATH. It is never
# installed: installing it would downgrade the machine's qemu-utils 10.
#
#   scripts/test-qemu72.sh            (cache: $QEMU72_DIR, default ~/.cache/cowsnap/qemu72)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${QEMU72_DIR:-$HOME/.cache/cowsnap/qemu72}
find_version() {
  apt-cache madison qemu-utils 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -m1 '^1:7\.2' || true
}
if [ ! -x "$cache/root/usr/bin/qemu-io" ]; then
  ver=$(find_version)
  if [ -z "$ver" ]; then apt-get update -qq; ver=$(find_version); fi
  if [ -z "$ver" ]; then
    echo "test-qemu72: no qemu-utils 7.2 in the apt sources" >&2
    exit 1
  fi
  rm -rf "$cache" && mkdir -p "$cache"
  (cd "$cache" && apt-get download -qq "qemu-utils=$ver" 2>/dev/null && dpkg-deb -x qemu-utils_*.deb root)
fi
export PATH="$cache/root/usr/bin:$PATH"
qemu-io --version | head -1
case "$(qemu-io --version | head -1)" in
  *"version 7.2"*) ;;
  *) echo "test-qemu72: qemu-io on PATH is not 7.2" >&2; exit 1 ;;
esac
cd "$repo"
cargo test -p cowsnap --test daemon --test exclusive --test tls
cargo test -p cowsnap-nbd --test qemu
