#!/usr/bin/env bash
# First-write replay: how much one origin first write costs a cowsnap daemon, for comparing
# builds side by side on this noisy 2-core machine.
#
#   bench/firstwrite.sh [-n SNAPSHOTS] [-r ROUNDS] [-s SIZE] BIN [BIN...]
#
# Each run makes a fresh pool in a temporary directory under /var/tmp (O_DIRECT needs a
# real file system): an origin of SIZE (default 1G) filled with fio, SNAPSHOTS snapshots
# (default 1) with 4K chunks and COWs as large as the origin, then `BIN serve --direct` on a
# unix socket, and replays with fio's nbd engine at QD16 a seeded log of one 4 KiB write into
# every 64 KiB slot of the origin in random order (the same log as cowbench.py's
# firstwrite-qd16 job). The binaries are run in turn, ROUNDS times (default 2), so that they
# see the same drift of the machine. One line per run:
#
#   BIN  snaps N  iops I  p50_us P  cpu_us_per_write C  cs_per_write S
#
# cpu_us_per_write is the daemon's user+system CPU over the replay divided by the writes;
# cs_per_write is system-wide context switches during the replay (`perf stat`) divided by
# the writes: both steadier than IOPS here. Needs fio (with the nbd engine), python3 and,
# for cs_per_write, perf (printed as '-' without it).
set -euo pipefail

snaps=1 rounds=2 size=1G
while getopts "n:r:s:h" o; do
  case $o in
    n) snaps=$OPTARG ;;
    r) rounds=$OPTARG ;;
    s) size=$OPTARG ;;
    *) sed -n '2,21p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { sed -n '2,21p' "$0"; exit 2; }
for b in "$@"; do [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 2; }; done
command -v fio >/dev/null || { echo "fio is needed (apt-get install fio)" >&2; exit 2; }
py=/usr/bin/python3; [ -x $py ] || py=python3

work=$(mktemp -d /var/tmp/cowsnap-fw.XXXXXX)
daemon=
cleanup() {
  [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

bytes=$(numfmt --from=iec "$size")
# The same log as cowbench.py's firstwrite-qd16 job, written by its own function.
$py - "$(dirname "$0")" "$bytes" "$work/fw.iolog" <<'PY'
import random, sys
sys.path.insert(0, sys.argv[1])
from cowbench import SLOT, write_log
slots = list(range(int(sys.argv[2]) // SLOT))
random.Random(5).shuffle(slots)
write_log(sys.argv[3], [s * SLOT for s in slots], 4096, pad_reads=256)
PY
run() {
  local bin=$1 p=$work/pool
  rm -rf "$p" "$work/s.sock"
  "$bin" --pool "$p" init >/dev/null
  "$bin" --pool "$p" origin create base --size "$size" >/dev/null
  fio --name=fill --filename="$p/base.img" --rw=write --bs=1M --iodepth=8 --ioengine=io_uring \
    --direct=1 --size="$bytes" --output-format=terse >/dev/null
  for i in $(seq 0 $((snaps - 1))); do
    "$bin" --pool "$p" snapshot create "snap$i" --origin base --cow-size "$size" --chunk-size 4K >/dev/null
  done
  "$bin" --pool "$p" serve --direct --listen "unix:$work/s.sock" >"$work/serve.log" 2>&1 &
  daemon=$!
  for _ in $(seq 100); do [ -S "$work/s.sock" ] && break; sleep 0.1; done
  [ -S "$work/s.sock" ] || { cat "$work/serve.log" >&2; exit 1; }
  local t0 t1
  t0=$(awk '{print $14+$15}' "/proc/$daemon/stat")
  local fio=(fio --name=fw --ioengine=nbd "--uri=nbd+unix:///base?socket=$work/s.sock"
    "--read_iolog=$work/fw.iolog" --replay_no_stall=1 --iodepth=16 --output-format=json)
  if command -v perf >/dev/null && perf stat -a -e context-switches -x, -o "$work/cs.txt" -- true 2>/dev/null; then
    perf stat -a -e context-switches -x, -o "$work/cs.txt" -- "${fio[@]}" >"$work/fio.json"
  else
    rm -f "$work/cs.txt"
    "${fio[@]}" >"$work/fio.json"
  fi
  t1=$(awk '{print $14+$15}' "/proc/$daemon/stat")
  kill "$daemon"; wait "$daemon" 2>/dev/null || true; daemon=
  $py - "$work" "$bin" "$snaps" "$t0" "$t1" "$(getconf CLK_TCK)" <<'PY'
import json, sys
work, binary, snaps, t0, t1, hz = sys.argv[1:]
text = open(f"{work}/fio.json").read()
w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
n = w["total_ios"]
cs = "-"
try:
    line = [l for l in open(f"{work}/cs.txt") if "context-switches" in l][0]
    cs = f"{int(line.split(',')[0]) / n:.1f}"
except (OSError, IndexError, ValueError):
    pass
cpu = (float(t1) - float(t0)) / float(hz) * 1e6 / n
p50 = w["clat_ns"]["percentile"]["50.000000"] // 1000
print(f"{binary}  snaps {snaps}  iops {int(w['iops'])}  p50_us {p50}  "
      f"cpu_us_per_write {cpu:.1f}  cs_per_write {cs}")
PY
}

for _ in $(seq "$rounds"); do
  for b in "$@"; do run "$b"; done
done
