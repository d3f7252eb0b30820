//! Origin and snapshot semantics through the public API: copy-on-write, snapshot writes,
//! I/O at any sector-aligned offset crossing chunks, COW full, errors and statuses.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use cowsnap_core::copy::{Copier, DEFAULT_BUDGET, DEFAULT_SEGMENT};
use cowsnap_core::dev::{BlockDevice, FaultRule, FaultyDevice, Fua, MemDevice, OpKind};
use cowsnap_core::exception::{ExceptionStore, TransientStore};
use cowsnap_core::targets::{Origin, Snapshot, SnapshotStatus};
use cowsnap_core::Error;

#[test]
fn origin_write_preserves_snapshot_view() {
    let (origin, _) = mem_origin(256 * KIB, 1);
    let before = read(&*origin, 0, 256 * KIB);
    let snap = transient_snapshot(&origin, 256 * KIB, cs(8));
    origin
        .write_at(&pattern(2, 4096, 8192), 4096, Fua::No)
        .unwrap();
    assert_eq!(read(&*snap, 0, 256 * KIB), before);
    assert_eq!(read(&*origin, 4096, 8192), pattern(2, 4096, 8192));
    assert_eq!(snap.exceptions().completed_count(), 2);
    // A second write to the same chunks copies nothing more.
    origin
        .write_at(&pattern(3, 4096, 512), 4096, Fua::No)
        .unwrap();
    assert_eq!(snap.exceptions().completed_count(), 2);
    assert_eq!(read(&*snap, 0, 256 * KIB), before);
}

#[test]
fn snapshot_writes_do_not_touch_the_origin() {
    let (origin, _) = mem_origin(128 * KIB, 1);
    let orig = read(&*origin, 0, 128 * KIB);
    let snap = transient_snapshot(&origin, 128 * KIB, cs(16));
    // Partial chunk: the rest of the chunk must come from the origin copy.
    snap.write_at(&pattern(5, 512, 1024), 512, Fua::Yes)
        .unwrap();
    let mut expect = orig.clone();
    expect[512..1536].copy_from_slice(&pattern(5, 512, 1024));
    assert_eq!(read(&*snap, 0, 128 * KIB), expect);
    assert_eq!(read(&*origin, 0, 128 * KIB), orig);
}

#[test]
fn whole_chunk_snapshot_write_skips_the_origin_read() {
    let mem = Arc::new(MemDevice::new(64 * KIB));
    let counting = Arc::new(FaultyDevice::new(mem));
    let origin = Origin::new(counting.clone(), Default::default());
    let snap = transient_snapshot(&origin, 64 * KIB, cs(8));
    snap.write_at(&pattern(9, 8192, 8192), 8192, Fua::No)
        .unwrap();
    assert_eq!(counting.count(OpKind::Read), 0, "full chunks need no copy");
    snap.write_at(&pattern(9, 0, 512), 0, Fua::No).unwrap();
    assert_eq!(
        counting.count(OpKind::Read),
        1,
        "a partial chunk is copied first"
    );
    assert_eq!(read(&*snap, 8192, 8192), pattern(9, 8192, 8192));
}

#[test]
fn unaligned_multi_chunk_io_is_correct_everywhere() {
    // Every sector-aligned offset and length in a window crossing chunk boundaries, on a
    // fresh origin+snapshot each time, checked against a plain byte-vector model.
    for (chunk, step) in [(8u64, 1536u64), (16, 2560)] {
        let size = 64 * KIB;
        let mut off = 0;
        while off < 20 * KIB {
            for len in [512, 1024, 4096 - 512, 4096 + 512, 3 * 4096 + 1024] {
                let (origin, _) = mem_origin(size, 7);
                let mut model_origin = read(&*origin, 0, size);
                let snap = transient_snapshot(&origin, size * 2, cs(chunk));
                let mut model_snap = model_origin.clone();
                let w = pattern(off + len, off, len);
                origin.write_at(&w, off, Fua::No).unwrap();
                model_origin[off as usize..(off + len) as usize].copy_from_slice(&w);
                let sw = pattern(off * 3 + 1, off + 512, len);
                snap.write_at(&sw, off + 512, Fua::No).unwrap();
                model_snap[(off + 512) as usize..(off + 512 + len) as usize].copy_from_slice(&sw);
                assert_eq!(
                    read(&*origin, 0, size),
                    model_origin,
                    "origin off={off} len={len}"
                );
                assert_eq!(
                    read(&*snap, 0, size),
                    model_snap,
                    "snap off={off} len={len}"
                );
                // Reads at the same odd offsets agree with the model too.
                assert_eq!(
                    read(&*snap, off, len),
                    model_snap[off as usize..(off + len) as usize]
                );
            }
            off += step;
        }
    }
}

#[test]
fn misaligned_and_out_of_range_requests_are_refused() {
    let (origin, _) = mem_origin(64 * KIB, 1);
    let snap = transient_snapshot(&origin, 64 * KIB, cs(8));
    let mut b = vec![0u8; 512];
    for dev in [&*origin as &dyn BlockDevice, &*snap] {
        assert!(matches!(
            dev.read_at(&mut b, 100).unwrap_err(),
            Error::Misaligned { .. }
        ));
        assert!(matches!(
            dev.write_at(&b, 64 * KIB, Fua::No).unwrap_err(),
            Error::OutOfRange { .. }
        ));
        assert!(matches!(
            dev.read_at(&mut b[..100], 0).unwrap_err(),
            Error::Misaligned { .. }
        ));
    }
}

#[test]
fn cow_full_on_origin_write_invalidates_and_origin_goes_on() {
    let (origin, _) = mem_origin(64 * KIB, 1);
    let snap = transient_snapshot(&origin, 2 * 4096, cs(8));
    origin.write_at(&[1u8; 4096], 0, Fua::No).unwrap();
    origin.write_at(&[2u8; 4096], 4096, Fua::No).unwrap();
    assert!(matches!(snap.status(), SnapshotStatus::Usage(_)));
    assert_eq!(snap.status().to_string(), "16/16 0");
    origin.write_at(&[3u8; 4096], 8192, Fua::No).unwrap();
    assert_eq!(snap.status(), SnapshotStatus::Invalid);
    assert_eq!(snap.status().to_string(), "Invalid");
    assert_eq!(read(&*origin, 8192, 4096), vec![3u8; 4096]);
    let mut b = vec![0u8; 512];
    let e = snap.read_at(&mut b, 0).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)));
    assert_eq!(e.errno(), 5);
    // Later origin writes skip the invalid snapshot.
    origin.write_at(&[4u8; 4096], 12288, Fua::No).unwrap();
}

#[test]
fn cow_full_on_snapshot_write_invalidates_a_transient_store() {
    let (origin, _) = mem_origin(64 * KIB, 1);
    let snap = transient_snapshot(&origin, 4096, cs(8));
    snap.write_at(&[1u8; 4096], 0, Fua::No).unwrap();
    let e = snap.write_at(&[1u8; 512], 4096, Fua::No).unwrap_err();
    assert!(matches!(e, Error::CowFull { .. }));
    assert_eq!(snap.status(), SnapshotStatus::Invalid);
}

#[test]
fn copy_errors_invalidate_only_the_failing_snapshot() {
    let (origin, _) = mem_origin(64 * KIB, 1);
    let before = read(&*origin, 0, 64 * KIB);
    let bad_cow = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(64 * KIB))));
    bad_cow.add_rule(FaultRule::Nth {
        kind: OpKind::Write,
        n: 1,
    });
    let bad = snapshot_on(&origin, bad_cow, cs(8));
    let good = transient_snapshot(&origin, 64 * KIB, cs(8));
    origin.write_at(&[7u8; 4096], 0, Fua::No).unwrap();
    assert_eq!(bad.status(), SnapshotStatus::Invalid);
    let why = bad.invalid_reason().unwrap();
    assert!(why.starts_with("copy-out failed: write at byte"), "{why}");
    assert_eq!(read(&*good, 0, 64 * KIB), before);
}

#[test]
fn snapshots_with_different_chunk_sizes_each_keep_their_view() {
    let (origin, _) = mem_origin(256 * KIB, 1);
    let before = read(&*origin, 0, 256 * KIB);
    let snaps: Vec<_> = [8, 16, 128, 8]
        .iter()
        .map(|&c| transient_snapshot(&origin, 512 * KIB, cs(c)))
        .collect();
    origin
        .write_at(&pattern(4, 60 * KIB, 70 * KIB), 60 * KIB, Fua::No)
        .unwrap();
    for s in &snaps {
        assert_eq!(
            read(&**s, 0, 256 * KIB),
            before,
            "chunk size {}",
            s.chunk_size()
        );
    }
}

#[test]
fn snapshot_io_before_activation_and_after_removal_is_refused() {
    let (origin, _) = mem_origin(64 * KIB, 1);
    let store = Arc::new(TransientStore::new(
        Arc::new(MemDevice::new(64 * KIB)),
        cs(8),
    ));
    let snap = Snapshot::load(&origin, store.clone()).unwrap();
    let mut b = vec![0u8; 512];
    assert!(matches!(
        snap.read_at(&mut b, 0).unwrap_err(),
        Error::WrongState(_)
    ));
    // Not active: origin writes do not copy into it.
    origin.write_at(&[1u8; 512], 0, Fua::No).unwrap();
    assert_eq!(store.usage().allocated_sectors, 0);
    origin.activate(&snap).unwrap();
    assert!(matches!(
        origin.activate(&snap).unwrap_err(),
        Error::WrongState(_)
    ));
    snap.read_at(&mut b, 0).unwrap();
    origin.deactivate(&snap).unwrap();
    assert!(matches!(
        snap.read_at(&mut b, 0).unwrap_err(),
        Error::WrongState(_)
    ));
    assert!(origin.snapshots().is_empty());
}

#[test]
fn discard_and_write_zeroes_on_the_origin_copy_out_first() {
    let (origin, _) = mem_origin(64 * KIB, 1);
    let before = read(&*origin, 0, 64 * KIB);
    let snap = transient_snapshot(&origin, 64 * KIB, cs(8));
    origin.write_zeroes(4096, 8192, Fua::No).unwrap();
    origin.discard(16384, 4096).unwrap();
    assert_eq!(read(&*origin, 4096, 8192), vec![0u8; 8192]);
    assert_eq!(read(&*snap, 0, 64 * KIB), before);
    // Snapshot write_zeroes really zeroes the snapshot's view.
    snap.write_zeroes(0, 6144, Fua::No).unwrap();
    assert_eq!(read(&*snap, 0, 6144), vec![0u8; 6144]);
    assert_eq!(read(&*snap, 6144, 2048), before[6144..8192]);
}

#[test]
fn last_partial_chunk_of_the_origin_is_handled() {
    // 20 KiB origin with 16 KiB chunks: the second chunk is only 4 KiB long.
    let (origin, _) = mem_origin(20 * KIB, 3);
    let before = read(&*origin, 0, 20 * KIB);
    let snap = transient_snapshot(&origin, 64 * KIB, cs(32));
    origin.write_at(&[1u8; 4096], 16 * KIB, Fua::No).unwrap();
    snap.write_at(&[2u8; 512], 16 * KIB + 512, Fua::No).unwrap();
    let mut expect = before.clone();
    expect[16 * 1024 + 512..16 * 1024 + 1024].fill(2);
    assert_eq!(read(&*snap, 0, 20 * KIB), expect);
}

/// A device that panics on one chosen write, standing in for a bug in a request thread.
#[derive(Debug)]
struct PanicOnWrite {
    inner: MemDevice,
    panic_at: std::sync::atomic::AtomicI64,
}

impl BlockDevice for PanicOnWrite {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> cowsnap_core::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> cowsnap_core::Result<()> {
        if self
            .panic_at
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            panic!("simulated bug while copying");
        }
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> cowsnap_core::Result<()> {
        self.inner.flush()
    }
}

/// A persistent snapshot of `origin`, active, on a COW that panics on a chosen write.
fn panicking_snapshot(origin: &Origin) -> (Arc<PanicOnWrite>, Arc<Snapshot>) {
    use cowsnap_core::exception::persistent::PersistentStore;
    let cow = Arc::new(PanicOnWrite {
        inner: MemDevice::new(256 * KIB),
        panic_at: std::sync::atomic::AtomicI64::new(i64::MAX),
    });
    let store = PersistentStore::open(cow.clone(), Some(cs(8)), false).unwrap();
    let snap = Snapshot::load(origin, Arc::new(store)).unwrap();
    origin.activate(&snap).unwrap();
    (cow, snap)
}

#[test]
fn a_request_that_panics_mid_copy_never_blocks_later_commits() {
    // A 4 KiB copier segment: the 8 KiB run below is copied in the request's own thread
    // (not through the batcher), so the panic unwinds the request holding its exceptions.
    let dev = Arc::new(MemDevice::new(64 * KIB));
    let origin = Origin::new(dev, Arc::new(Copier::new(DEFAULT_BUDGET, 4096)));
    let (cow, snap) = panicking_snapshot(&origin);
    // The next COW write (the copy of chunks 0 and 1) panics.
    cow.panic_at.store(1, std::sync::atomic::Ordering::SeqCst);
    let o = origin.clone();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        o.write_at(&[1u8; 8192], 0, Fua::No)
    }));
    assert!(r.is_err(), "the write panicked");
    // The abandoned allocation was aborted: a later write to another chunk completes
    // (its commit does not wait for the dead one), and the snapshot is invalid.
    let o = origin.clone();
    let later = std::thread::spawn(move || o.write_at(&[2u8; 4096], 16384, Fua::No));
    wait_until(|| later.is_finished());
    later.join().unwrap().unwrap();
    assert_eq!(snap.status(), SnapshotStatus::Invalid);
    assert_eq!(snap.exceptions().pending_count(), 0);
}

#[test]
fn a_panic_inside_the_batcher_fails_the_copy_and_blocks_nothing() {
    let (origin, _) = mem_origin(64 * KIB, 1);
    let (cow, snap) = panicking_snapshot(&origin);
    cow.panic_at.store(1, std::sync::atomic::Ordering::SeqCst);
    // The batch leader's write panics: the copy fails (the snapshot is invalid, nothing is
    // left pending) and the origin write itself completes.
    origin.write_at(&[1u8; 4096], 0, Fua::No).unwrap();
    assert_eq!(snap.status(), SnapshotStatus::Invalid);
    assert_eq!(snap.exceptions().pending_count(), 0);
    let o = origin.clone();
    let later = std::thread::spawn(move || o.write_at(&[2u8; 4096], 8192, Fua::No));
    wait_until(|| later.is_finished());
    later.join().unwrap().unwrap();
    assert_eq!(read(&*origin, 0, 4096), vec![1u8; 4096]);
}

#[test]
fn snapshot_reads_are_coalesced_into_one_call_per_contiguous_run() {
    let ocount = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(256 * KIB))));
    let origin = Origin::new(ocount.clone(), Default::default());
    let cow = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(256 * KIB))));
    let snap = snapshot_on(&origin, cow.clone(), cs(8));
    // 64 KiB of untouched 4 KiB chunks: one origin read.
    let r0 = ocount.count(OpKind::Read);
    read(&*snap, 0, 64 * KIB);
    assert_eq!(ocount.count(OpKind::Read) - r0, 1);
    // Chunks 16..24 copied in order land on consecutive COW chunks: one COW read for them,
    // plus one origin read for the untouched chunks after them.
    origin.write_at(&[1u8; 32768], 64 * KIB, Fua::No).unwrap();
    let (c0, r0) = (cow.count(OpKind::Read), ocount.count(OpKind::Read));
    let got = read(&*snap, 64 * KIB, 64 * KIB);
    assert_eq!(cow.count(OpKind::Read) - c0, 1);
    assert_eq!(ocount.count(OpKind::Read) - r0, 1);
    assert_eq!(got, vec![0u8; 65536]);
}

#[test]
fn origin_copy_out_copies_runs_of_chunks_with_one_read_and_one_write_per_cow() {
    let ocount = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(256 * KIB))));
    ocount
        .write_at(&pattern(3, 0, 256 * KIB), 0, Fua::No)
        .unwrap();
    let before = read(&*ocount, 0, 256 * KIB);
    let origin = Origin::new(ocount.clone(), Default::default());
    let cows: Vec<_> = (0..2)
        .map(|_| Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(256 * KIB)))))
        .collect();
    let snaps: Vec<_> = cows
        .iter()
        .map(|c| snapshot_on(&origin, c.clone(), cs(8)))
        .collect();
    let r0 = ocount.count(OpKind::Read);
    origin.write_at(&[7u8; 65536], 0, Fua::No).unwrap();
    assert_eq!(
        ocount.count(OpKind::Read) - r0,
        1,
        "16 chunks, one origin read"
    );
    for (c, s) in cows.iter().zip(&snaps) {
        assert_eq!(c.count(OpKind::Write), 1, "one COW write per snapshot");
        assert_eq!(read(&**s, 0, 256 * KIB), before);
    }
}

#[test]
fn snapshot_writes_copy_runs_of_chunks_in_one_write() {
    let ocount = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(256 * KIB))));
    ocount
        .write_at(&pattern(5, 0, 256 * KIB), 0, Fua::No)
        .unwrap();
    let before = read(&*ocount, 0, 256 * KIB);
    let origin = Origin::new(ocount.clone(), Default::default());
    let cow = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(256 * KIB))));
    let snap = snapshot_on(&origin, cow.clone(), cs(8));
    // 16 whole chunks: no origin read, one COW write.
    let (r0, w0) = (ocount.count(OpKind::Read), cow.count(OpKind::Write));
    snap.write_at(&[3u8; 65536], 0, Fua::No).unwrap();
    assert_eq!(ocount.count(OpKind::Read) - r0, 0);
    assert_eq!(cow.count(OpKind::Write) - w0, 1);
    // Starting mid-chunk: the first chunk's old bytes come from the origin, in the same run.
    let (r0, w0) = (ocount.count(OpKind::Read), cow.count(OpKind::Write));
    let data = pattern(6, 64 * KIB + 1024, 16 * KIB);
    snap.write_at(&data, 64 * KIB + 1024, Fua::No).unwrap();
    assert_eq!(ocount.count(OpKind::Read) - r0, 1);
    assert_eq!(cow.count(OpKind::Write) - w0, 1);
    let mut expect = before.clone();
    expect[..65536].fill(3);
    expect[65536 + 1024..65536 + 1024 + 16384].copy_from_slice(&data);
    assert_eq!(read(&*snap, 0, 256 * KIB), expect);
    assert_eq!(read(&*origin, 0, 256 * KIB), before);
}

#[test]
fn a_failed_copy_in_a_snapshot_write_run_invalidates_cleanly() {
    let (origin, _) = mem_origin(256 * KIB, 8);
    let cow = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(256 * KIB))));
    let snap = snapshot_on(&origin, cow.clone(), cs(8));
    cow.add_rule(FaultRule::Nth {
        kind: OpKind::Write,
        n: 1,
    });
    // The request gets the copy's own error: a write error of the COW, errno intact.
    let e = snap.write_at(&[1u8; 32768], 4096, Fua::No).unwrap_err();
    assert!(matches!(e, Error::Io { op: "write", .. }), "{e}");
    assert_eq!(e.errno(), cowsnap_core::error::EIO);
    assert_eq!(snap.status(), SnapshotStatus::Invalid);
    assert_eq!(snap.exceptions().pending_count(), 0);
    // The origin is unaffected and keeps working.
    origin.write_at(&[2u8; 4096], 0, Fua::No).unwrap();
}

#[test]
fn failed_and_successful_runs_of_one_snapshot_in_one_write_leave_nothing_pending() {
    // Chunk 0 is already copied in `good`, so a write of chunks 0..8 is two runs: chunk 0
    // (owned by `bad` only) and chunks 1..8 (owned by both). With a 4 KiB copier segment the
    // first run goes through the batcher and the second is copied directly; `bad`'s COW
    // fails its first or its second write, i.e. either run. With the default segment both
    // runs go through the batcher, which merges them into one write to `bad`, and that
    // write fails. Every exception of `bad` must end failed or committed (none pending),
    // `good` keeps its view, the origin write lands.
    for (segment, n) in [(4096, 1), (4096, 2), (DEFAULT_SEGMENT, 1)] {
        let what = format!("segment {segment}, failing write {n}");
        let dev = Arc::new(MemDevice::new(256 * KIB));
        dev.write_at(&pattern(4, 0, 256 * KIB), 0, Fua::No).unwrap();
        let origin = Origin::new(dev, Arc::new(Copier::new(DEFAULT_BUDGET, segment)));
        let before = read(&*origin, 0, 256 * KIB);
        let good = transient_snapshot(&origin, 256 * KIB, cs(8));
        origin.write_at(&[1u8; 4096], 0, Fua::No).unwrap();
        let bad_cow = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(256 * KIB))));
        let bad = snapshot_on(&origin, bad_cow.clone(), cs(8));
        bad_cow.add_rule(FaultRule::Nth {
            kind: OpKind::Write,
            n,
        });
        let writes = origin.batcher_stats().device_writes;
        origin.write_at(&[2u8; 32768], 0, Fua::No).unwrap();
        assert_eq!(bad.status(), SnapshotStatus::Invalid, "{what}");
        assert_eq!(bad.exceptions().pending_count(), 0, "{what}");
        assert_eq!(good.exceptions().pending_count(), 0, "{what}");
        assert_eq!(read(&*good, 0, 256 * KIB), before, "{what}");
        assert_eq!(read(&*origin, 0, 32768), vec![2u8; 32768], "{what}");
        let merged = origin.batcher_stats().device_writes - writes;
        if segment == DEFAULT_SEGMENT {
            // One write to `bad` (both runs), one to `good` (chunks 1..8).
            assert_eq!(merged, 2, "{what}");
        } else {
            assert_eq!(merged, 1, "{what}: only the 4 KiB run is batched");
        }
    }
}

#[test]
fn a_request_hands_the_batcher_at_most_one_segment_and_copies_the_rest_itself() {
    // Chunks 1, 3, 5, 7 are already copied, so a write of chunks 0..8 owns four one-chunk
    // runs (0, 2, 4, 6). With an 8 KiB segment the first two go through the batcher and
    // the other two are copied directly: a request never holds more than one segment.
    let dev = Arc::new(MemDevice::new(256 * KIB));
    dev.write_at(&pattern(9, 0, 256 * KIB), 0, Fua::No).unwrap();
    let origin = Origin::new(dev, Arc::new(Copier::new(DEFAULT_BUDGET, 8192)));
    let before = read(&*origin, 0, 256 * KIB);
    let snap = transient_snapshot(&origin, 256 * KIB, cs(8));
    for c in [1u64, 3, 5, 7] {
        origin
            .write_at(&[c as u8; 4096], c * 4096, Fua::No)
            .unwrap();
    }
    let handed = origin.batcher_stats().writes;
    origin.write_at(&[0xEE; 32768], 0, Fua::No).unwrap();
    assert_eq!(origin.batcher_stats().writes - handed, 2);
    assert_eq!(read(&*snap, 0, 256 * KIB), before);
    assert_eq!(read(&*origin, 0, 32768), vec![0xEE; 32768]);
    assert_eq!(origin.copier().in_use(), 0);
}
