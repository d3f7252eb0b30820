#!/usr/bin/env python3
"""Helpers of scripts/make-kernel-merge-fixtures.sh (kernel half-merged COW fixtures).

  plan WORK         write WORK/base-manifest.json (gen-origin compatible), WORK/job/{job.sh,blobs.bin}
  finish WORK FIX   check the guest's results against a host model, write FIX/CASE/...
  check-cow FILE [--entries N]
                    parse a COW image (.gz ok) as a kernel persistent COW, print the entry count

Reuses the rig's make-fixtures.py (pattern, GUEST_LIB, parse_cow, write_json) by import;
$RIG points at the rig (default ../shared/kernel-rig next to the checkout).
"""
import gzip
import hashlib
import importlib.util
import json
import os
import struct
import sys

RIG = os.environ.get("RIG") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "kernel-rig")
_spec = importlib.util.spec_from_file_location("rig_make_fixtures", os.path.join(RIG, "make-fixtures.py"))
mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mf)

SECTOR = 512
CS = 8                       # chunk sectors (4 KiB)
CB = CS * SECTOR
EPA = CB // 16               # 256 entries per metadata area
ORIGIN_BYTES = 8 << 20       # 2048 chunks
COW_BYTES = 4 << 20          # 1024 chunks
NCH = ORIGIN_BYTES // CB
N_ORIGIN_OPS = 620
N_SNAP_OPS = 31

# error chunk = the COW data chunk of table entry POS (0-based, allocation order)
CASES = [
    {"name": "err-last-area", "pos": 600, "desc": "error chunk in area 2: the kernel merges the last 50 entries"},
    {"name": "err-mid-area", "pos": 300, "desc": "error chunk in area 1: area 2 merged completely, area 1 partly"},
    {"name": "err-first-area", "pos": 40, "desc": "error chunk in area 0: areas 2 and 1 merged completely, area 0 partly"},
]
STEPS = [640, 511, 256, 255, 100, 0]   # status-steps.tsv (+ before the merge, + a complete merge)


def new_chunk_of(pos):
    """COW chunk of entry `pos`: data chunks are handed out sequentially, skipping metadata chunks."""
    return 2 + pos + pos // EPA


def chunk_of_sector(s):
    return s // CS


def plan_ops():
    """ops in the rig's manifest format: {target, start, count, tag} (sectors)."""
    ops, snap = [], 0
    for i in range(N_ORIGIN_OPS):
        c = (i * 37 + 5) % NCH
        ops.append({"target": "origin", "start": c * CS + (i % CS), "count": 1, "tag": "O%07d" % i})
        if i % 20 == 10 and snap < N_SNAP_OPS:
            c = ((N_ORIGIN_OPS + snap) * 37 + 5) % NCH         # a chunk no origin op touches
            if snap == 0:   # one full-chunk snapshot write (the kernel skips the copy)
                ops.append({"target": "snap", "start": c * CS, "count": CS, "tag": "S%07d" % snap})
            else:           # partial writes: copy-out, then overwrite 3 sectors in the COW copy
                ops.append({"target": "snap", "start": c * CS + 2, "count": 3, "tag": "S%07d" % snap})
            snap += 1
        if i in (200, 450):  # snapshot writes into chunks already copied out (no new exception)
            c = ((i - 100) * 37 + 5) % NCH
            ops.append({"target": "snap", "start": c * CS + 5, "count": 2, "tag": "R%07d" % i})
    return ops


def model_table(ops):
    """[(old, new)] in allocation order, as the kernel should write it."""
    seen, table = set(), []
    for op in ops:
        for c in range(chunk_of_sector(op["start"]), chunk_of_sector(op["start"] + op["count"] - 1) + 1):
            if c not in seen:
                seen.add(c)
                table.append((c, new_chunk_of(len(table))))
    return table


def runs_ok(table):
    """No two adjacent entries form a kernel merge run (old and new both +1), so each merge step is one chunk."""
    return all(not (b[0] == a[0] + 1 and b[1] == a[1] + 1) for a, b in zip(table, table[1:]))


GUEST_PARTIAL = r'''
mark() { echo "RIGMARK $*" > /dev/kmsg; }
copybase() {  # ODEV CDEV   fresh copy of the base origin + COW
    blockdev --flushbufs $ORIG; blockdev --flushbufs $COW
    gnu-dd if=$ORIG of=$1 bs=1M oflag=direct status=none
    gnu-dd if=$COW of=$2 bs=1M oflag=direct status=none
    blockdev --flushbufs $1; blockdev --flushbufs $2
}
waitmerge() {  # DMNAME KEY   poll until done (allocated == metadata) or stopped
    local i=0 s n=$1 key=$2
    while :; do
        s=$(status $n); set -- $s
        [ "${4%%/*}" = "$5" ] && break
        case "$4" in Invalid|Merge*) break ;; esac
        i=$((i+1)); [ $i -gt 1800 ] && { put $key.merge.timeout 1; break; }
        sleep 0.1
    done
    put $key.merge.polls $i
}
partial() {  # KEY ODEV CDEV POS|none   snapshot-merge with COW entry POS's data chunk on the error target
    local k=$1 od=$2 cd=$3 pos=$4 cn s
    mark "begin $k"
    copybase $od $cd
    cn=$(blockdev --getsz $cd)
    if [ "$pos" = none ]; then
        echo "0 $cn linear $cd 0" > /tmp/cowtab
    else
        s=$(( (2 + pos + pos / 256) * 8 ))
        printf '0 %d linear %s 0\n%d 8 error\n%d %d linear %s %d\n' $s $cd $s $((s + 8)) $((cn - s - 8)) $cd $((s + 8)) > /tmp/cowtab
    fi
    put $k.cowtable "$(tr '\n' '|' < /tmp/cowtab)"
    dmrun $k.create.cowerr dmsetup create cowerr < /tmp/cowtab
    dmrun $k.create.merge dmsetup create mrg --table "0 $NSECT snapshot-merge $od /dev/mapper/cowerr P 8"
    put $k.status.merge.initial "$(status mrg)"
    waitmerge mrg $k
    put $k.status.merge.stopped "$(status mrg)"
    dmrun $k.remove.merge dmsetup remove mrg
    dmrun $k.remove.cowerr dmsetup remove cowerr
    dmrun $k.create.reload dmsetup create chk --table "0 $NSECT snapshot $od $cd P 8"
    put $k.status.reload "$(status chk)"
    hashdev $k.sha.reload /dev/mapper/chk
    dmrun $k.remove.reload dmsetup remove chk
    hashdev $k.sha.raw.origin $od
    hashdev $k.sha.raw.cow $cd
    mark "end $k"
}
'''


def cmd_plan(work):
    ops = plan_ops()
    table = model_table(ops)
    assert runs_ok(table), "adjacent entries form a merge run"
    assert 600 <= len(table) <= 700 and len(table) > 2 * EPA, len(table)
    base = {"name": "kernel-merge-base", "origin_bytes": ORIGIN_BYTES, "cow_bytes": COW_BYTES,
            "store": "P", "chunk": CS, "ops": ops}
    mf.write_json(os.path.join(work, "base-manifest.json"), base)
    blobs, offs = [], 0
    L = [mf.GUEST_LIB, GUEST_PARTIAL,
         'dmrun create.base dmsetup create base --table "0 $NSECT snapshot-origin $ORIG"',
         'dmrun create.snap dmsetup create snap --table "0 $NSECT snapshot $ORIG $COW P 8"',
         'dmsetup suspend base && dmsetup resume base',
         'put status.fresh "$(status snap)"']
    for k, op in enumerate(ops):
        dev = "/dev/mapper/base" if op["target"] == "origin" else "/dev/mapper/snap"
        L.append(f'wr op{k} {dev} {op["start"]} {op["count"]} {offs}')
        blobs.append(mf.pattern(op["tag"], op["start"], op["count"]))
        offs += op["count"]
    L += ['put status.base "$(status snap)"',
          'hashdev sha.snap /dev/mapper/snap',
          'hashdev sha.origin.dev /dev/mapper/base',
          'dmrun remove.snap dmsetup remove snap',
          'dmrun remove.base dmsetup remove base',
          'hashdev sha.raw.origin $ORIG',
          'hashdev sha.raw.cow $COW',
          'dmrun create.reload dmsetup create chk --readonly --table "0 $NSECT snapshot $ORIG $COW P 8"',
          'put status.before_merge "$(status chk)"',
          'hashdev sha.before_merge /dev/mapper/chk',
          'dmrun remove.reload dmsetup remove chk']
    for c in CASES:
        n = c["name"]
        L.append(f'partial {n} $(readlink -f $RIG_DISKS/o-{n}) $(readlink -f $RIG_DISKS/c-{n}) {c["pos"]}')
    for p in STEPS + ["none"]:
        L.append(f'partial step-{p} $(readlink -f $RIG_DISKS/o-steps) $(readlink -f $RIG_DISKS/c-steps) {p}')
    L += ["dmesg > $RIG_OUT/dmesg-all.txt", "exit 0"]
    mf.write_job(os.path.join(work, "job"), "\n".join(L) + "\n", b"".join(blobs))
    print(f"plan: {len(ops)} ops, {len(table)} exceptions, areas {(len(table) + EPA - 1) // EPA}")


# ----------------------------------------------------------------------------- COW check
def check_cow(data):
    """Standalone check (no rig import): header + tables. Returns (chunk_sectors, entries, info)."""
    magic, valid, version, chunk = struct.unpack_from("<IIII", data, 0)
    assert magic == 0x70416E53, "magic %#x" % magic
    assert valid == 1 and version == 1 and chunk > 0, (valid, version, chunk)
    assert data[16:chunk * 512] == bytes(chunk * 512 - 16), "header chunk not zero after 16 bytes"
    cb = chunk * 512
    epa = cb // 16
    entries, area, end = [], 0, None
    while end is None:
        off = (1 + area * (epa + 1)) * cb
        if off + cb > len(data):
            break
        for i in range(epa):
            old, new = struct.unpack_from("<QQ", data, off + 16 * i)
            if new == 0:
                end = (area, i)
                break
            entries.append((old, new))
        area += 1
    # what lies after the terminator: the kernel zeroes merged entries (old=0, new=0)
    a, i = end if end else (area - 1, epa)
    off = (1 + a * (epa + 1)) * cb
    tail_zero = data[off + 16 * i: off + cb] == bytes(cb - 16 * i)
    nxt = (1 + (a + 1) * (epa + 1)) * cb
    next_area_zero = nxt + cb > len(data) or data[nxt:nxt + cb] == bytes(cb)
    return chunk, entries, {"end_area": a, "end_index": i, "rest_of_end_area_zero": tail_zero,
                            "next_area_zero": next_area_zero}


def cmd_check_cow(path, want=None):
    data = mf.read_maybe_gz(path)
    chunk, entries, info = check_cow(data)
    print(f"{path}: valid kernel COW, chunk {chunk} sectors, {len(entries)} entries, {info}")
    if want is not None and len(entries) != want:
        print(f"MISMATCH: expected {want} entries", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- finish
def sha(b):
    return hashlib.sha256(b).hexdigest()


def read_results(out):
    res = {}
    for line in open(os.path.join(out, "results.tsv"), encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if "\t" in line:
            k, v = line.split("\t", 1)
            res[k] = v
    return res


def dmesg_between(lines, key):
    out, on = [], False
    for ln in lines:
        if f"RIGMARK begin {key}" in ln:
            on = True
            continue
        if f"RIGMARK end {key}" in ln:
            break
        if on:
            out.append(ln)
    return out


def status_numbers(line):
    f = line.split()
    a, t = f[3].split("/")
    return int(a), int(t), int(f[4])


def cmd_finish(work, fix):
    base = json.load(open(os.path.join(work, "base-manifest.json")))
    ops = base["ops"]
    table = model_table(ops)
    out = os.path.join(work, "out")
    res = read_results(out)
    host = dict(l.strip().split("=", 1) for l in open(os.path.join(out, "host.env")) if "=" in l)
    dmesg = open(os.path.join(out, "dmesg-all.txt"), errors="replace").read().splitlines()
    fails = []

    def chk(what, got, want):
        if got != want:
            fails.append(f"{what}: got {got!r} want {want!r}")

    bad_ops = [k for k in range(len(ops)) if res.get(f"op{k}.rc") != "0"]
    chk("failed ops", bad_ops, [])
    orig0 = mf.origin_initial(ORIGIN_BYTES // SECTOR)
    origin_final = mf.apply_ops(bytearray(orig0), ops, "origin")
    snap_view = mf.apply_ops(bytearray(orig0), ops, "snap")
    chk("kernel snapshot sha", res.get("sha.snap"), sha(snap_view))
    chk("kernel origin sha", res.get("sha.raw.origin"), sha(origin_final))
    chk("reload sha", res.get("sha.before_merge"), sha(snap_view))
    base_cow = open(os.path.join(work, "cow.img"), "rb").read()
    chk("base cow sha", sha(base_cow), res.get("sha.raw.cow"))
    _, ents, _ = check_cow(base_cow)
    chk("base COW table == model", ents, table)
    n = len(table)
    # every COW data chunk holds the snapshot's view of its chunk
    for old, new in ents:
        if base_cow[new * CB:(new + 1) * CB] != snap_view[old * CB:(old + 1) * CB]:
            fails.append(f"COW data chunk {new} != snapshot chunk {old}")
            break
    expect_status = lambda left: _status_for(left, n)  # noqa: E731
    chk("status before merge", status_numbers(res["status.before_merge"]), expect_status(n))

    os.makedirs(fix, exist_ok=True)
    mf.write_json(os.path.join(fix, "base-manifest.json"), dict(base, exceptions=[list(e) for e in table],
                  expected={"origin_initial_sha256": sha(orig0), "origin_final_sha256": sha(origin_final),
                            "snapshot_view_sha256": sha(snap_view), "cow_sha256": sha(base_cow)},
                  status_fresh=res.get("status.fresh"), status_base=res.get("status.base"),
                  status_before_merge=res.get("status.before_merge")))
    with open(os.path.join(fix, "base-cow.img.gz"), "wb") as f:
        f.write(gzip.compress(base_cow, 9, mtime=0))

    def model_after(pos):
        """origin and COW after the kernel merged entries pos+1 .. n-1 (tail first) and stopped at pos."""
        o = bytearray(origin_final)
        c = bytearray(base_cow)
        for p in range(pos + 1, n):
            old, new = table[p]
            o[old * CB:(old + 1) * CB] = snap_view[old * CB:(old + 1) * CB]
            a, i = divmod(p, EPA)
            off = (1 + a * (EPA + 1)) * CB + 16 * i
            c[off:off + 16] = bytes(16)
        return bytes(o), bytes(c)

    full_o, full_c = model_after(-1)   # complete merge: origin = snapshot view, every entry zeroed
    chk("model complete merge origin", sha(full_o), sha(snap_view))
    for case in CASES:
        k, pos = case["name"], case["pos"]
        oimg = open(os.path.join(work, f"o-{k}.img"), "rb").read()
        cimg = open(os.path.join(work, f"c-{k}.img"), "rb").read()
        mo, mc = model_after(pos)
        chk(f"{k} origin == model", sha(oimg), sha(mo))
        chk(f"{k} cow == model", sha(cimg), sha(mc))
        chk(f"{k} raw origin sha (guest)", res.get(f"{k}.sha.raw.origin"), sha(oimg))
        chk(f"{k} raw cow sha (guest)", res.get(f"{k}.sha.raw.cow"), sha(cimg))
        chk(f"{k} reload sha", res.get(f"{k}.sha.reload"), sha(snap_view))
        _, left, info = check_cow(cimg)
        chk(f"{k} entries left", len(left), pos + 1)
        chk(f"{k} status stopped", res.get(f"{k}.status.merge.stopped", "").split()[3:], ["Merge", "failed"])
        chk(f"{k} reload status", status_numbers(res[f"{k}.status.reload"]), expect_status(pos + 1))
        d = os.path.join(fix, k)
        os.makedirs(d, exist_ok=True)
        for nm, b in (("origin.img.gz", oimg), ("cow.img.gz", cimg)):
            with open(os.path.join(d, nm), "wb") as f:
                f.write(gzip.compress(b, 9, mtime=0))
        dl = dmesg_between(dmesg, k)
        with open(os.path.join(d, "dmesg.txt"), "w") as f:
            f.write("\n".join(dl) + "\n")
        err_new = new_chunk_of(pos)
        man = {
            "name": k, "desc": case["desc"], "made_by": "scripts/make-kernel-merge-fixtures.sh",
            "kernel": host.get("kernel"), "store": "P", "chunk_sectors": CS, "exceptions_per_area": EPA,
            "origin_bytes": ORIGIN_BYTES, "cow_bytes": COW_BYTES,
            "base": "../base-manifest.json (ops; make-fixtures.py gen-origin OUT ../base-manifest.json final|snapshot)",
            "entries_before": n,
            "error_entry_position": pos,
            "error_entry": {"area": pos // EPA, "index_in_area": pos % EPA, "old_chunk": table[pos][0],
                            "new_chunk": err_new, "cow_sector": err_new * CS},
            "cow_dm_table": res.get(f"{k}.cowtable", "").rstrip("|").split("|"),
            "merge_table": f"0 {ORIGIN_BYTES // SECTOR} snapshot-merge ORIGIN /dev/mapper/cowerr P 8",
            "entries_left": len(left),
            "entries_merged": n - len(left),
            "cow_after": info,
            "status": {
                "snapshot_before_merge": res.get("status.before_merge"),
                "merge_initial": res.get(f"{k}.status.merge.initial"),
                "merge_stopped": res.get(f"{k}.status.merge.stopped"),
                "snapshot_reload_after": res.get(f"{k}.status.reload"),
            },
            "merge_polls_0.1s": res.get(f"{k}.merge.polls"),
            "expected": {
                "final_origin_sha256_after_complete_merge": sha(snap_view),
                "snapshot_reload_sha256": res.get(f"{k}.sha.reload"),
                "origin_sha256": sha(oimg),
                "cow_sha256": sha(cimg),
                "origin_before_merge_sha256": sha(origin_final),
                "cow_sha256_after_complete_merge": sha(full_c),
            },
        }
        mf.write_json(os.path.join(d, "manifest.json"), man)

    # status steps (one more case, images not kept)
    rows = [(n, res["status.before_merge"])]
    for p in STEPS + ["none"]:
        k = f"step-{p}"
        left = 0 if p == "none" else p + 1
        st = res.get(f"{k}.status.reload", "")
        chk(f"{k} reload sha", res.get(f"{k}.sha.reload"), sha(snap_view))
        if p == "none":
            chk(f"{k} merged origin", res.get(f"{k}.sha.raw.origin"), sha(snap_view))
            chk(f"{k} merged cow == base COW with every entry zeroed", res.get(f"{k}.sha.raw.cow"), sha(full_c))
            chk(f"{k} merge done status", status_numbers(res[f"{k}.status.merge.stopped"])[0],
                status_numbers(res[f"{k}.status.merge.stopped"])[2])
        else:
            chk(f"{k} stopped", res.get(f"{k}.status.merge.stopped", "").split()[3:], ["Merge", "failed"])
            mo, mc = model_after(p)
            chk(f"{k} origin model", res.get(f"{k}.sha.raw.origin"), sha(mo))
            chk(f"{k} cow model", res.get(f"{k}.sha.raw.cow"), sha(mc))
        chk(f"{k} status", status_numbers(st), expect_status(left))
        rows.append((left, st))
    with open(os.path.join(fix, "status-steps.tsv"), "w") as f:
        f.write("# entries_left\tstatus of a plain `snapshot ORIGIN COW P 8` over the half-merged COW "
                "(first row: before the merge; last row: a complete merge)\n")
        for left, st in rows:
            f.write(f"{left}\t{st}\n")
    summary = {"wall_s": host.get("wall_s"), "accel": host.get("accel"), "uptime": open(os.path.join(out, "uptime")).read().strip()
               if os.path.exists(os.path.join(out, "uptime")) else None, "checks_failed": fails}
    print(json.dumps(summary, indent=1))
    return 1 if fails else 0


def _status_for(left, n):
    """(A, T, M) the kernel's `read_exceptions` gives for a COW with `left` entries:
    next_free = last new + 1 (skip a metadata chunk), current_area = area of the terminator."""
    area = left // EPA                      # the terminator's area (left == 256 -> area 1, all zero)
    nf = new_chunk_of(left - 1) + 1 if left else 2
    if nf % (EPA + 1) == 1:                 # skip_metadata
        nf += 1
    return nf * CS, COW_BYTES // SECTOR, (area + 2) * CS


def main():
    a = sys.argv[1:]
    if not a:
        print(__doc__)
        return 2
    if a[0] == "plan":
        return cmd_plan(a[1]) or 0
    if a[0] == "finish":
        return cmd_finish(a[1], a[2])
    if a[0] == "check-cow":
        want = int(a[3]) if len(a) > 3 and a[2] == "--entries" else None
        return cmd_check_cow(a[1], want)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
