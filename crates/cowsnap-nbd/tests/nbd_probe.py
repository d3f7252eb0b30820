"""Protocol probe with libnbd's Python bindings (Debian python3-libnbd; run it with
/usr/bin/python3). Usage: nbd_probe.py SOCKET

Exercises option mode, error paths with strict mode off, block status, simple-reply mode,
the EXPORT_NAME path and many requests in flight. Prints OK and exits 0 when every check
holds; any failed check raises.
"""

import errno
import sys

import nbd

sock = sys.argv[1]
MIB = 1 << 20


def uri(export):
    return "nbd+unix:///%s?socket=%s" % (export, sock)


def expect_err(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        # libnbd 1.14 gives the symbolic name, newer versions may give the number.
        got = e.errno
        ok = got == want or got == errno.errorcode.get(want)
        assert ok, "%s: expected %s, got %r (%s)" % (what, errno.errorcode[want], got, e)
        return
    raise AssertionError("%s: succeeded, expected %s" % (what, errno.errorcode[want]))


# Option mode: LIST, INFO with block sizes, LIST_META_CONTEXT, missing export, ABORT.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri(""))
names = []
h.opt_list(lambda n, d: names.append((n, d)))
assert [n for n, _ in names] == ["disk", "ro"], names
assert dict(names)["ro"] == "read-only twin", names
h.set_export_name("disk")
h.opt_info()
assert h.get_size() == 64 * MIB
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MIB
ctx = []
h.opt_list_meta_context(lambda c: ctx.append(c))
assert ctx == ["base:allocation"], ctx
h.set_export_name("missing")
try:
    h.opt_info()
    raise AssertionError("INFO on a missing export succeeded")
except nbd.Error:
    pass
h.opt_abort()
del h

# Transmission with strict mode off so the server's checks are exercised.
h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri("disk"))
sz = h.get_size()
assert h.can_multi_conn() and h.can_fua() and h.can_flush() and h.can_trim()
assert h.can_zero() and h.can_fast_zero() and h.can_cache() and h.can_df()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
expect_err(lambda: h.pread(512, sz), errno.EINVAL, "read past the end")
expect_err(lambda: h.pwrite(b"x" * 512, sz), errno.ENOSPC, "write past the end")
expect_err(lambda: h.zero(512, sz), errno.ENOSPC, "zero past the end")
expect_err(lambda: h.trim(512, sz), errno.EINVAL, "trim past the end")
expect_err(lambda: h.pread(512, 1), errno.EINVAL, "misaligned read")
expect_err(lambda: h.pwrite(b"x" * 100, 0), errno.EINVAL, "misaligned write")
expect_err(lambda: h.pread(512, 0, flags=0x80), errno.EINVAL, "unknown flag")
expect_err(lambda: h.pread(32 * MIB + 512, 0), errno.EINVAL, "oversized read")
expect_err(lambda: h.pwrite(b"\xee" * (32 * MIB + 512), 0), errno.EINVAL, "oversized write")
expect_err(lambda: h.zero(64 * 1024, 0, flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE),
           errno.ENOTSUP, "fast zero that cannot be fast")
# The connection is still good, and the refused oversized write wrote nothing.
assert h.pread(4096, 0) == b"\0" * 4096

# Data, FUA, zeroing (fast and NO_HOLE), block status.
h.pwrite(b"\x11" * MIB, 2 * MIB, flags=nbd.CMD_FLAG_FUA)
h.zero(MIB, 4 * MIB, flags=nbd.CMD_FLAG_FAST_ZERO)
h.pwrite(b"\x22" * 4096, 6 * MIB)
h.zero(4096, 6 * MIB, flags=nbd.CMD_FLAG_NO_HOLE)
h.flush()
assert h.pread(MIB, 2 * MIB) == b"\x11" * MIB
assert h.pread(4096, 6 * MIB) == b"\0" * 4096
h.cache(MIB, 0)
extents = []


def collect(meta, offset, entries, err):
    assert meta == nbd.CONTEXT_BASE_ALLOCATION
    extents.append((offset, list(entries)))
    return 0


h.block_status(8 * MIB, 0, collect)
off, entries = extents[-1]
pairs = list(zip(entries[0::2], entries[1::2]))
assert sum(l for l, _ in pairs) <= 8 * MIB
pos = 0
for length, flags in pairs:
    if flags & 2:  # zero: must really read as zeros
        assert h.pread(length, pos) == b"\0" * length, (pos, length)
    if pos <= 2 * MIB < pos + length:
        assert flags == 0, pairs
    pos += length
h.block_status(8 * MIB, 0, collect, flags=nbd.CMD_FLAG_REQ_ONE)
assert len(extents[-1][1]) == 2 and extents[-1][1][0] <= 8 * MIB
expect_err(lambda: h.block_status(1024, sz - 512, collect), errno.EINVAL, "block status past the end")

# Many requests in flight; replies may come in any order.
cookies = []
for i in range(64):
    cookies.append(h.aio_pwrite(bytes([i + 1]) * 65536, 16 * MIB + i * 65536))
for c in cookies:
    while not h.aio_command_completed(c):
        h.poll(-1)
reads = []
for i in range(64):
    b = nbd.Buffer(65536)
    reads.append((i, b, h.aio_pread(b, 16 * MIB + i * 65536)))
for i, b, c in reads:
    while not h.aio_command_completed(c):
        h.poll(-1)
    assert b.to_bytearray() == bytes([i + 1]) * 65536, i
h.shutdown()
del h

# Read-only export: EPERM.
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri("ro"))
assert h.is_read_only()
expect_err(lambda: h.pwrite(b"x" * 512, 0), errno.EPERM, "write to read-only")
expect_err(lambda: h.trim(512, 0), errno.EPERM, "trim on read-only")
h.shutdown()
del h

# Simple replies only, then the oldest path: no fixed newstyle flags, EXPORT_NAME.
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(uri("disk"))
assert h.pread(MIB, 2 * MIB) == b"\x11" * MIB
h.shutdown()
del h
h = nbd.NBD()
h.set_handshake_flags(0)
h.connect_uri(uri("disk"))
assert h.pread(4096, 2 * MIB) == b"\x11" * 4096
h.shutdown()
del h

print("OK")
