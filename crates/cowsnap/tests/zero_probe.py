"""Zeroing, trimming and caching through a running `cowsnap serve`, with libnbd's Python
bindings (run with /usr/bin/python3). Driven by tests/daemon.rs:
`zero_probe.py URI PHASE`; exits non-zero with a message on the first failed check.

Phases:
  origin-alone      an origin without snapshots: FAST_ZERO punches a hole (fast).
  origin-snapshot   the same origin with a snapshot: FAST_ZERO of a range the snapshot
                    has not copied yet is refused (ENOTSUP) and changes nothing; a plain
                    200 MiB zero succeeds (copying out); after it, FAST_ZERO is fast again.
  snapshot          the snapshot: FAST_ZERO is never fast; 200 MiB zero, trim and cache
                    longer than the 32 MiB maximum block size succeed.
"""

import errno
import sys

import nbd

MiB = 1 << 20
uri, phase = sys.argv[1], sys.argv[2]

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)


def check(cond, what):
    if not cond:
        sys.exit(f"{phase}: {what}")


def reads_as(off, n, byte):
    step = 32 * MiB
    done = 0
    while done < n:
        k = min(step, n - done)
        check(h.pread(k, off + done) == bytes([byte]) * k,
              f"{off + done}+{k} does not read as {byte:#x}")
        done += k


def fast_zero(off, n, flags=0):
    """True if the server zeroed fast, False if it refused with ENOTSUP."""
    try:
        h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO | flags)
        return True
    except nbd.Error as e:
        check(e.errnum == errno.ENOTSUP, f"fast zero failed with {e.errno}, not ENOTSUP")
        return False


def extents(off, n):
    got = []

    def cb(meta, start, entries, err):
        got.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(n, off, cb)
    return got


check(h.can_zero() and h.can_fast_zero(), "zero and fast zero are not advertised")
check(h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB, "maximum block size is not 32 MiB")

if phase == "origin-alone":
    h.pwrite(b"\x55" * MiB, 8 * MiB)
    check(fast_zero(8 * MiB, MiB), "fast zero on an origin without snapshots was refused")
    reads_as(8 * MiB, MiB, 0)
    ext = extents(8 * MiB, MiB)
    check(ext and ext[0][0] >= MiB and ext[0][1] == 3,
          f"a fast-zeroed range is not reported as a hole: {ext}")
    # Kept for the next phases: the snapshot must keep it.
    h.pwrite(b"\x66" * MiB, 16 * MiB)
elif phase == "origin-snapshot":
    check(not fast_zero(16 * MiB, MiB),
          "fast zero was accepted though the snapshot has to copy the range out first")
    reads_as(16 * MiB, MiB, 0x66)
    check(not fast_zero(0, MiB, nbd.CMD_FLAG_NO_HOLE), "fast zero with NO_HOLE was accepted")
    # One request much longer than the maximum block size.
    h.zero(200 * MiB, 0)
    reads_as(0, 200 * MiB, 0)
    # Every chunk of that range is in the snapshot now: zeroing it again is fast.
    check(fast_zero(0, 200 * MiB), "fast zero of a copied-out range was refused")
    reads_as(0, 200 * MiB, 0)
    h.cache(200 * MiB, 0)
elif phase == "snapshot":
    reads_as(16 * MiB, MiB, 0x66)
    check(not fast_zero(16 * MiB, MiB), "fast zero on a snapshot was accepted")
    reads_as(16 * MiB, MiB, 0x66)
    h.zero(200 * MiB, 0)
    reads_as(0, 200 * MiB, 0)
    ext = extents(0, 64 * MiB)
    check(all(flags & 2 for _, flags in ext), f"zeroed range is reported as data: {ext}")
    h.trim(200 * MiB, 0)
    h.cache(200 * MiB, 0)
    h.flush()
else:
    sys.exit(f"unknown phase {phase}")

h.shutdown()
print(f"{phase}: ok")
