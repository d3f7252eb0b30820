//! The four races of the snapshot to-do list, each reproduced in a fixed order with gated
//! devices. Each test fails if its fix is removed: it holds the racing I/O at a gate,
//! lets the other request run as far as it can, and checks what the held request sees.
//!
//! * S1 — a snapshot read of a chunk whose exception is pending sees the old data;
//! * S2 — a snapshot joins origin writes only once loaded, and never in the middle of one;
//! * S3 — many snapshots: an origin write waits on the pending exceptions themselves, the
//!   origin chunk is read once for all snapshots, unrelated chunks are never blocked;
//! * S4 — an origin write waits for snapshot reads still reading the chunk from the origin.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use common::*;
use cowsnap_core::dev::{BlockDevice, FaultyDevice, Fua, GatedDevice, MemDevice, OpKind};
use cowsnap_core::exception::{
    Exception, ExceptionIndex, ExceptionStore, LoadOutcome, Resume, StoreKind, TransientStore,
    Usage,
};
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::units::{Chunk, ChunkSize};
use cowsnap_core::Result;

struct Rig {
    origin: Arc<Origin>,
    /// The origin device, gated.
    odev: Arc<GatedDevice>,
    /// Counts origin operations.
    ocount: Arc<FaultyDevice>,
    /// Snapshots with their gated, counted COW devices.
    snaps: Vec<(Arc<Snapshot>, Arc<GatedDevice>, Arc<FaultyDevice>)>,
}

fn rig(nsnaps: usize, size: u64, chunk: ChunkSize) -> Rig {
    let (odev, ocount) = gated_mem(size, 1);
    let origin = Origin::new(odev.clone(), Default::default());
    let snaps = (0..nsnaps)
        .map(|_| {
            let count = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(size))));
            let gated = Arc::new(GatedDevice::new(count.clone()));
            let snap = snapshot_on(&origin, gated.clone(), chunk);
            (snap, gated, count)
        })
        .collect();
    Rig {
        origin,
        odev,
        ocount,
        snaps,
    }
}

fn spawn_write(
    dev: Arc<dyn BlockDevice>,
    data: Vec<u8>,
    offset: u64,
) -> thread::JoinHandle<Result<()>> {
    thread::spawn(move || dev.write_at(&data, offset, Fua::No))
}

fn spawn_read(dev: Arc<dyn BlockDevice>, offset: u64, len: u64) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || read(&*dev, offset, len))
}

#[test]
fn s1_snapshot_read_of_a_pending_chunk_never_sees_later_origin_data() {
    let r = rig(1, 64 * KIB, cs(8));
    let (snap, cow, _) = &r.snaps[0];
    let old = read(&*r.origin, 8192, 4096);

    // Hold the copy-out's write to the COW: chunk 2's exception stays pending.
    let copy_gate = cow.gate(OpKind::Write, 0, u64::MAX, 1);
    let w = spawn_write(r.origin.clone(), vec![0xAB; 4096], 8192);
    copy_gate.wait_arrived(1);
    assert!(snap.exceptions().pending(Chunk(2)).is_some());

    // A snapshot read of the pending chunk goes to the origin; hold it there.
    let read_gate = r.odev.gate(OpKind::Read, 8192, 8192 + 4096, 1);
    let rd = spawn_read(snap.clone(), 8192, 4096);
    read_gate.wait_arrived(1);

    // Let the copy finish: the exception completes, and the origin write must now wait
    // for the read rather than overwrite what it is about to read.
    copy_gate.release();
    wait_until(|| snap.exceptions().drain_waits() >= 1 || w.is_finished());
    read_gate.release();
    assert_eq!(
        rd.join().unwrap(),
        old,
        "a read of a pending chunk returned data written to the origin after the snapshot"
    );
    w.join().unwrap().unwrap();
    assert_eq!(read(&**snap, 8192, 4096), old);
    assert_eq!(read(&*r.origin, 8192, 4096), vec![0xAB; 4096]);
}

#[test]
fn s4_origin_write_waits_for_snapshot_reads_in_flight_on_the_origin() {
    let r = rig(1, 64 * KIB, cs(8));
    let (snap, _, _) = &r.snaps[0];
    let old = read(&*r.origin, 8192, 4096);

    // A snapshot read of chunk 2 (no exception yet) is reading the origin, held.
    let read_gate = r.odev.gate(OpKind::Read, 8192, 8192 + 4096, 1);
    let rd = spawn_read(snap.clone(), 8192, 4096);
    read_gate.wait_arrived(1);

    // First origin write: copies chunk 2 (its own origin read passes the gate), commits,
    // then must wait for the read.
    let w1 = spawn_write(r.origin.clone(), vec![0xAB; 1024], 8192);
    wait_until(|| snap.exceptions().drain_waits() >= 1 || w1.is_finished());
    // Second origin write to the same chunk: the exception is complete now, but the read
    // from before it is still in flight, so this write must wait too.
    let w2 = spawn_write(r.origin.clone(), vec![0xCD; 1024], 8192 + 2048);
    wait_until(|| snap.exceptions().drain_waits() >= 2 || w2.is_finished());
    assert_eq!(
        r.ocount.count(OpKind::Write),
        0,
        "no origin write may pass the read"
    );

    read_gate.release();
    assert_eq!(
        rd.join().unwrap(),
        old,
        "an origin write overwrote a chunk while a snapshot read of it was in flight"
    );
    w1.join().unwrap().unwrap();
    w2.join().unwrap().unwrap();
    assert_eq!(read(&**snap, 8192, 4096), old);
    let now = read(&*r.origin, 8192, 4096);
    assert_eq!(&now[..1024], &[0xAB; 1024]);
    assert_eq!(&now[2048..3072], &[0xCD; 1024]);
}

#[test]
fn s2_activation_waits_for_origin_writes_in_flight() {
    let (odev, _) = gated_mem(64 * KIB, 1);
    let origin = Origin::new(odev.clone(), Default::default());
    let store = Arc::new(TransientStore::new(
        Arc::new(MemDevice::new(64 * KIB)),
        cs(8),
    ));
    let snap = Snapshot::load(&origin, store).unwrap();

    // An origin write over two chunks is in flight (held at the device) while the
    // snapshot is activated.
    let gate = odev.gate(OpKind::Write, 0, u64::MAX, 1);
    let w1 = spawn_write(origin.clone(), vec![0xAB; 8192], 8192);
    gate.wait_arrived(1);
    let (o, s) = (origin.clone(), snap.clone());
    let act = thread::spawn(move || o.activate(&s));
    wait_until(|| origin.activations_waiting() >= 1 || act.is_finished());
    // If activation did not wait, the snapshot is live now and shows the old data...
    let early = act.is_finished().then(|| read(&*snap, 8192, 8192));
    gate.release();
    w1.join().unwrap().unwrap();
    act.join().unwrap().unwrap();
    let view = read(&*snap, 8192, 8192);
    if let Some(early) = early {
        // ...and then changes under the reader: the in-flight write was never copied.
        assert_eq!(
            early, view,
            "snapshot content changed after activation: an in-flight origin write was not copied"
        );
    }
    // The write finished before the activation took effect, so it is in the snapshot,
    // whole; later origin writes are copied out.
    assert_eq!(view, vec![0xAB; 8192]);
    origin.write_at(&[0xCD; 8192], 8192, Fua::No).unwrap();
    assert_eq!(read(&*snap, 8192, 8192), vec![0xAB; 8192]);
}

/// A store whose `load` blocks until released, and which counts `prepare` calls.
#[derive(Debug)]
struct SlowLoadStore {
    inner: TransientStore,
    load_started: AtomicBool,
    release_load: AtomicBool,
    prepares: AtomicU64,
}

impl ExceptionStore for SlowLoadStore {
    fn kind(&self) -> StoreKind {
        self.inner.kind()
    }
    fn chunk_size(&self) -> ChunkSize {
        self.inner.chunk_size()
    }
    fn cow(&self) -> &Arc<dyn BlockDevice> {
        self.inner.cow()
    }
    fn load(
        &self,
        from: Resume,
        sink: &mut dyn FnMut(u64, Exception) -> Result<()>,
    ) -> Result<LoadOutcome> {
        self.load_started.store(true, Ordering::SeqCst);
        wait_until(|| self.release_load.load(Ordering::SeqCst));
        self.inner.load(from, sink)
    }
    fn attach(&self, index: ExceptionIndex) {
        self.inner.attach(index)
    }
    fn prepare(&self, old: Chunk) -> Result<Chunk> {
        self.prepares.fetch_add(1, Ordering::SeqCst);
        self.inner.prepare(old)
    }
    fn commit(&self, batch: &[Exception]) -> Result<()> {
        self.inner.commit(batch)
    }
    fn abort(&self, e: &Exception) {
        self.inner.abort(e)
    }
    fn invalidate(&self) -> Result<()> {
        self.inner.invalidate()
    }
    fn usage(&self) -> Usage {
        self.inner.usage()
    }
}

#[test]
fn s2_a_snapshot_takes_part_in_origin_writes_only_after_load_and_activation() {
    let (origin, _) = mem_origin(64 * KIB, 1);
    let store = Arc::new(SlowLoadStore {
        inner: TransientStore::new(Arc::new(MemDevice::new(64 * KIB)), cs(8)),
        load_started: AtomicBool::new(false),
        release_load: AtomicBool::new(false),
        prepares: AtomicU64::new(0),
    });
    let (o, st) = (origin.clone(), store.clone());
    let loader = thread::spawn(move || Snapshot::load(&o, st));
    wait_until(|| store.load_started.load(Ordering::SeqCst));
    // While the metadata is loading, origin writes do not involve the snapshot.
    origin.write_at(&[1u8; 4096], 0, Fua::No).unwrap();
    assert_eq!(store.prepares.load(Ordering::SeqCst), 0);
    store.release_load.store(true, Ordering::SeqCst);
    let snap = loader.join().unwrap().unwrap();
    origin.write_at(&[2u8; 4096], 4096, Fua::No).unwrap();
    assert_eq!(
        store.prepares.load(Ordering::SeqCst),
        0,
        "loaded but not active"
    );
    origin.activate(&snap).unwrap();
    let view = read(&*origin, 0, 64 * KIB);
    origin.write_at(&[3u8; 8192], 0, Fua::No).unwrap();
    assert_eq!(store.prepares.load(Ordering::SeqCst), 2);
    assert_eq!(read(&*snap, 0, 64 * KIB), view);
}

#[test]
fn s3_an_origin_chunk_is_read_once_for_sixteen_snapshots() {
    let r = rig(16, 64 * KIB, cs(8));
    let before = read(&*r.origin, 0, 64 * KIB);
    let reads0 = r.ocount.count(OpKind::Read);
    r.origin.write_at(&[9u8; 4096], 12288, Fua::No).unwrap();
    assert_eq!(r.ocount.count(OpKind::Read) - reads0, 1, "one origin read");
    for (snap, _, count) in &r.snaps {
        assert_eq!(count.count(OpKind::Write), 1, "one COW write per snapshot");
        assert_eq!(read(&**snap, 0, 64 * KIB), before);
    }
}

#[test]
fn s3_origin_writes_wait_on_the_pending_exceptions_of_every_snapshot() {
    let r = rig(16, 64 * KIB, cs(8));
    let before = read(&*r.origin, 0, 64 * KIB);
    // The first write's copy-out is held at snapshot 7's COW: all 16 exceptions of
    // chunk 2 stay pending.
    let gate7 = r.snaps[7].1.gate(OpKind::Write, 0, u64::MAX, 1);
    let w1 = spawn_write(r.origin.clone(), vec![0xAA; 1024], 8192);
    gate7.wait_arrived(1);
    // A second write to the same chunk must wait for those exceptions.
    let w2 = spawn_write(r.origin.clone(), vec![0xBB; 1024], 8192 + 2048);
    let first_pending = r.snaps[0].0.exceptions().pending(Chunk(2)).unwrap();
    wait_until(|| first_pending.waiters() >= 1 || w2.is_finished());
    // Snapshot 7 still reads the pending chunk from the origin: it must be unchanged.
    assert_eq!(
        read(&*r.snaps[7].0, 8192, 4096),
        &before[8192..12288],
        "an origin write passed a pending exception"
    );
    assert_eq!(r.ocount.count(OpKind::Write), 0);
    gate7.release();
    w1.join().unwrap().unwrap();
    w2.join().unwrap().unwrap();
    for (snap, _, _) in &r.snaps {
        assert_eq!(read(&**snap, 0, 64 * KIB), before);
        assert_eq!(snap.exceptions().pending_count(), 0);
    }
    let now = read(&*r.origin, 8192, 4096);
    assert_eq!(&now[..1024], &[0xAA; 1024]);
    assert_eq!(&now[2048..3072], &[0xBB; 1024]);
}

#[test]
fn s3_a_pending_exception_never_blocks_unrelated_chunks() {
    let r = rig(4, 64 * KIB, cs(8));
    let before = read(&*r.origin, 0, 64 * KIB);
    // The write of chunks 2 and 3 owns their exceptions and is held reading them for its
    // copy. (Two chunks: a one-chunk write reads before it routes, so held there it owns
    // nothing yet. A held COW write would hold the copy-out batcher's batch instead,
    // which delays other copy-outs of this origin by that batch, as a store's group
    // commit does; that is head-of-line I/O, not waiting on a pending exception.)
    let gate = r.odev.gate(OpKind::Read, 8192, 16384, 1);
    let w1 = spawn_write(r.origin.clone(), vec![0xAA; 8192], 8192);
    gate.wait_arrived(1);
    for (snap, _, _) in &r.snaps {
        assert!(snap.exceptions().pending(Chunk(2)).is_some());
    }
    // While chunk 2 is pending: writes and reads of other chunks, on the origin and on
    // every snapshot, complete (on this thread, so a block would hang the test).
    r.origin.write_at(&[1u8; 4096], 5 * 4096, Fua::No).unwrap();
    for (snap, _, _) in &r.snaps {
        assert_eq!(read(&**snap, 9 * 4096, 4096), &before[9 * 4096..10 * 4096]);
        assert_eq!(read(&**snap, 5 * 4096, 4096), &before[5 * 4096..6 * 4096]);
    }
    r.snaps[0]
        .0
        .write_at(&[2u8; 512], 6 * 4096, Fua::No)
        .unwrap();
    assert!(!w1.is_finished());
    gate.release();
    w1.join().unwrap().unwrap();
    for (snap, _, _) in &r.snaps[1..] {
        assert_eq!(read(&**snap, 0, 64 * KIB), before);
    }
}

/// A one-chunk origin write reads the chunk before it routes (the pre-read). When another
/// write routes the chunk first, the pre-read holds that write's data and must not become
/// the snapshot's copy: the write that owns the exception copies, and the pre-read is
/// dropped.
#[test]
fn s1_a_pre_read_overtaken_by_another_write_is_dropped() {
    let r = rig(1, 64 * KIB, cs(8));
    let (snap, _, cow_count) = &r.snaps[0];
    let old = read(&*r.origin, 8192, 4096);
    // Write A's pre-read of chunk 2 is held before it reads.
    let gate = r.odev.gate(OpKind::Read, 8192, 12288, 1);
    let a = spawn_write(r.origin.clone(), vec![0xAA; 4096], 8192);
    gate.wait_arrived(1);
    assert!(
        snap.exceptions().pending(Chunk(2)).is_none(),
        "A owns nothing yet"
    );
    // Write B of the same chunk runs to the end: it routes, copies the old data, commits
    // and writes the origin.
    r.origin.write_at(&[0xBB; 4096], 8192, Fua::No).unwrap();
    assert_eq!(read(&**snap, 8192, 4096), old);
    let cow_writes = cow_count.count(OpKind::Write);
    assert!(cow_writes >= 1);
    // A's pre-read now reads B's data; A finds the chunk remapped and only writes.
    gate.release();
    a.join().unwrap().unwrap();
    assert_eq!(
        read(&**snap, 8192, 4096),
        old,
        "a pre-read taken after another write became the snapshot's copy"
    );
    assert_eq!(read(&*r.origin, 8192, 4096), vec![0xAA; 4096]);
    assert_eq!(
        cow_count.count(OpKind::Write),
        cow_writes,
        "A copied nothing"
    );
}

#[test]
fn s3_sixteen_snapshots_and_a_bounded_pool_never_deadlock() {
    // A fixed pool of 4 threads serves 800 conflicting requests (8 hot chunks, origin
    // and snapshot writes and reads mixed) against 16 snapshots; it must finish.
    let (origin, _) = mem_origin(256 * KIB, 5);
    let before = read(&*origin, 0, 256 * KIB);
    let snaps: Vec<_> = (0..16)
        .map(|i| transient_snapshot(&origin, 512 * KIB, cs(if i % 2 == 0 { 8 } else { 16 })))
        .collect();
    let next = Arc::new(AtomicU64::new(0));
    let shared_before = Arc::new(before.clone());
    let hot = |i: u64| (i * 7 % 8) * 16 * KIB + (i % 4) * 1024;
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (origin, snaps, next) = (origin.clone(), snaps.clone(), next.clone());
            let before = shared_before.clone();
            thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= 800 {
                    break;
                }
                let off = hot(i);
                match i % 4 {
                    0 | 1 => origin.write_at(&[i as u8; 1024], off, Fua::No).unwrap(),
                    // Snapshot writes go to the snapshots' own upper half.
                    2 => snaps[(i % 16) as usize]
                        .write_at(&[i as u8; 1024], 128 * KIB + off, Fua::No)
                        .unwrap(),
                    _ => {
                        let got = read(&*snaps[(i % 16) as usize], off, 1024);
                        assert_eq!(got, &before[off as usize..off as usize + 1024]);
                    }
                }
            })
        })
        .collect();
    wait_until(|| workers.iter().all(|w| w.is_finished()));
    for w in workers {
        w.join().unwrap();
    }
    for s in &snaps {
        assert_eq!(read(&**s, 0, 128 * KIB), &before[..128 * 1024]);
        assert_eq!(s.exceptions().pending_count(), 0);
    }
}
