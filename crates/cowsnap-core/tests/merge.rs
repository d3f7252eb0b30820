//! Merge: an origin rolled back to a snapshot, with I/O through the merge view and on the
//! other snapshots while the data moves back.
//!
//! * a model test: random view writes and writes to another snapshot (of another chunk
//!   size) during a merge in small batches; the origin ends as the snapshot's content plus
//!   the view writes, the other snapshot as its own point in time plus its writes, and the
//!   merged COW is an empty valid table;
//! * crash tests: the power is cut at every write and flush boundary of a merge with view
//!   and other-snapshot I/O; after the restart the merge resumes and completes, and every
//!   sector holds what it may (M1, M2, M3, M7), acknowledged durable writes included;
//! * the window (M5): a view write to a chunk of the batch being merged waits for its
//!   commit, deterministically with a gated origin;
//! * refusals, status lines and percent, and the kernel's own merge of the same COW
//!   (`p16-merge`) giving the same origin and the same COW bytes.
//!
//! Seeds are printed; `COWSNAP_SEED=n` reruns a test's workloads.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

mod kernel_fixtures;

use std::collections::HashMap;
use std::sync::Arc;

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{
    BlockDevice, CrashDevice, Fua, GatedDevice, MemDevice, OpKind, PowerDomain,
};
use cowsnap_core::exception::{ExceptionStore, PersistentStore, StoreKind, TransientStore};
use cowsnap_core::targets::{MergeSettings, MergeState, Origin, Snapshot, SnapshotStatus};
use cowsnap_core::testkit::tagged::{self, sector_tag, tag};
use cowsnap_core::testkit::{seed, SplitMix};
use cowsnap_core::units::ChunkSize;
use cowsnap_core::Error;

const KIB: u64 = 1024;
const BASE: &[u8; 8] = b"ORIGINAL";

fn cs(sectors: u64) -> ChunkSize {
    ChunkSize::from_sectors(sectors).unwrap()
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0).unwrap();
    buf
}

fn persistent(cow: Arc<dyn BlockDevice>, chunk: u64) -> Arc<PersistentStore> {
    Arc::new(PersistentStore::open(cow, Some(cs(chunk)), false).unwrap())
}

fn snapshot(origin: &Origin, store: Arc<dyn ExceptionStore>) -> Arc<Snapshot> {
    let s = Snapshot::load(origin, store).unwrap();
    origin.activate(&s).unwrap();
    s
}

fn paused() -> MergeSettings {
    MergeSettings {
        batch_bytes: 16 * KIB,
        paused: true,
        ..Default::default()
    }
}

/// A random write of 1 to 24 sectors inside `sectors`.
fn random_range(rng: &mut SplitMix, sectors: u64) -> (u64, u64) {
    let start = rng.below(sectors);
    let count = (1 + rng.below(24)).min(sectors - start);
    (start, count)
}

/// A random write of write number `n` to `dev`.
fn random_write(dev: &dyn BlockDevice, rng: &mut SplitMix, n: usize) {
    let (start, count) = random_range(rng, dev.size() / 512);
    let data = tagged::sectors(&tag(n), start, count);
    dev.write_at(&data, start * 512, Fua::No).unwrap();
}

/// A random write of write number `n` to `dev`, applied to its model image too.
fn write_and_model(dev: &dyn BlockDevice, model: &mut [u8], rng: &mut SplitMix, n: usize) {
    let sectors = dev.size() / 512;
    let (start, count) = random_range(rng, sectors);
    let data = tagged::sectors(&tag(n), start, count);
    dev.write_at(&data, start * 512, Fua::No).unwrap();
    model[(start * 512) as usize..((start + count) * 512) as usize].copy_from_slice(&data);
}

#[test]
fn a_merge_rolls_the_origin_back_while_the_view_and_other_snapshots_take_writes() {
    // The other snapshot's chunks larger, then smaller, than the merging one's.
    for (merging, other) in [(8, 32), (32, 8)] {
        merge_with_another_snapshot(merging, other);
    }
}

/// The model test with chunks of `merging` sectors for the merging snapshot and `other`
/// for the other one.
fn merge_with_another_snapshot(merging: u64, other: u64) {
    let seed = seed();
    let mut rng = SplitMix(seed);
    let size = 2 << 20;
    let sectors = size / 512;
    let odev = Arc::new(MemDevice::new(size));
    odev.write_at(&tagged::sectors(BASE, 0, sectors), 0, Fua::No)
        .unwrap();
    let origin = Origin::new(odev.clone(), Arc::new(Copier::default()));
    let a = snapshot(
        &origin,
        persistent(Arc::new(MemDevice::new(8 << 20)), merging),
    );
    let mut n = 0;
    let mut write = |dev: &dyn BlockDevice, rng: &mut SplitMix| {
        n += 1;
        random_write(dev, rng, n);
    };
    for _ in 0..150 {
        write(&*origin, &mut rng);
        write(&*a, &mut rng);
    }
    // Another snapshot, of another chunk size, taken later.
    let b = snapshot(
        &origin,
        persistent(Arc::new(MemDevice::new(8 << 20)), other),
    );
    for _ in 0..100 {
        write(&*origin, &mut rng);
        write(&*b, &mut rng);
        write(&*a, &mut rng);
    }
    let mut want_origin = read_all(&*a);
    let mut want_b = read_all(&*b);
    let entries = a.store().usage();
    eprintln!(
        "TEST: seed {seed}: merging {entries:?} ({merging}-sector chunks, the other {other})"
    );

    let merge = origin.start_merge(&a, paused()).unwrap();
    assert!(
        !a.is_active(),
        "the merging snapshot serves no I/O of its own"
    );
    assert!(matches!(
        a.read_at(&mut [0u8; 512], 0),
        Err(Error::WrongState(_))
    ));
    assert_eq!(
        read_all(&*origin),
        want_origin,
        "the view shows the snapshot at once"
    );
    let mut batches = 0;
    loop {
        // Writes through the view and to the other snapshot between batches.
        for _ in 0..3 {
            n += 2;
            write_and_model(&*origin, &mut want_origin, &mut rng, n);
            write_and_model(&*b, &mut want_b, &mut rng, n + 1);
        }
        if batches % 7 == 0 {
            assert_eq!(
                read_all(&*origin),
                want_origin,
                "M6 after {batches} batches"
            );
            assert_eq!(
                read_all(&*b),
                want_b,
                "the other snapshot after {batches} batches"
            );
        }
        if !merge.merge_batch(&origin).unwrap() {
            break;
        }
        batches += 1;
    }
    assert!(batches > 20, "{batches} batches");
    assert_eq!(merge.status().state, MergeState::Done);
    assert_eq!(merge.status().percent, 100.0);
    let u = a.store().usage();
    assert_eq!(u.allocated_sectors, u.metadata_sectors, "a == m: done");
    assert_eq!(a.store().merge_remaining(), 0);
    assert_eq!(a.exceptions().completed_count(), 0);
    origin.end_merge().unwrap();
    assert_eq!(read_all(&*odev), want_origin, "the origin device itself");
    assert_eq!(read_all(&*origin), want_origin);
    assert_eq!(read_all(&*b), want_b);
    // After the merge the origin writes normally and still copies out to b.
    origin.write_at(&[7u8; 4096], 0, Fua::No).unwrap();
    assert_eq!(read_all(&*b), want_b);
    // The merged COW: a valid, empty table.
    let again = PersistentStore::open(a.cow().clone(), None, false).unwrap();
    let mut left = 0;
    again
        .load(Default::default(), &mut |_, _| {
            left += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(left, 0);
}

#[test]
fn the_merger_thread_pauses_resumes_and_ends_the_merge() {
    let size = 1 << 20;
    let odev = Arc::new(MemDevice::new(size));
    odev.write_at(&tagged::sectors(BASE, 0, size / 512), 0, Fua::No)
        .unwrap();
    let origin = Origin::new(odev.clone(), Arc::new(Copier::default()));
    let a = snapshot(&origin, persistent(Arc::new(MemDevice::new(2 << 20)), 8));
    for i in 0..200u64 {
        origin
            .write_at(
                &tagged::sectors(&tag(i as usize), i * 8, 8),
                i * 8 * 512,
                Fua::No,
            )
            .unwrap();
    }
    let want = read_all(&*a);
    let merge = origin
        .start_merge(
            &a,
            MergeSettings {
                rate: Some(64 * KIB),
                ..paused()
            },
        )
        .unwrap();
    assert_eq!(merge.wait(), MergeState::Paused);
    // While its thread runs (or waits paused), nobody else runs a batch.
    merge.resume(&origin).unwrap();
    assert!(matches!(
        merge.merge_batch(&origin),
        Err(Error::WrongState(_))
    ));
    merge.pause();
    assert!(matches!(
        merge.merge_batch(&origin),
        Err(Error::WrongState(_))
    ));
    merge.set_rate(None);
    let (tx, rx) = std::sync::mpsc::channel();
    merge.on_finish(move |s| tx.send(s.clone()).unwrap());
    merge.resume(&origin).unwrap();
    assert_eq!(rx.recv().unwrap(), MergeState::Done);
    assert_eq!(merge.wait(), MergeState::Done);
    assert!(matches!(
        origin.start_merge(&a, paused()),
        Err(Error::WrongState(_))
    ));
    origin.end_merge().unwrap();
    assert_eq!(read_all(&*odev), want);
    merge.stop();
    assert!(
        merge.resume(&origin).is_ok(),
        "a done merge has nothing to resume"
    );
}

#[test]
fn a_stopped_merge_is_not_resumed_in_the_same_process() {
    let odev = Arc::new(MemDevice::new(1 << 20));
    let origin = Origin::new(odev, Arc::new(Copier::default()));
    let a = snapshot(&origin, persistent(Arc::new(MemDevice::new(2 << 20)), 8));
    for i in 0..64u64 {
        origin.write_at(&[1u8; 4096], i * 8192, Fua::No).unwrap();
    }
    let merge = origin
        .start_merge(
            &a,
            MergeSettings {
                rate: Some(16 * KIB),
                ..MergeSettings::default()
            },
        )
        .unwrap();
    merge.stop();
    assert_eq!(merge.status().state, MergeState::Stopped);
    let e = merge.resume(&origin).unwrap_err();
    assert!(e.to_string().contains("shutdown"), "{e}");
    assert_eq!(merge.status().state, MergeState::Stopped);
}

#[test]
fn merges_are_refused_for_transient_invalid_and_already_merging_snapshots() {
    let odev = Arc::new(MemDevice::new(1 << 20));
    let origin = Origin::new(odev, Arc::new(Copier::default()));
    let n = snapshot(
        &origin,
        Arc::new(TransientStore::new(
            Arc::new(MemDevice::new(1 << 20)),
            cs(8),
        )),
    );
    assert_eq!(n.store().kind(), StoreKind::Transient);
    let err = origin.start_merge(&n, paused()).unwrap_err();
    assert!(err.to_string().contains("transient"), "{err}");
    assert!(
        n.is_active(),
        "a refused merge leaves the snapshot as it was"
    );
    let bad = snapshot(&origin, persistent(Arc::new(MemDevice::new(1 << 20)), 8));
    bad.invalidate("test");
    let err = origin.start_merge(&bad, paused()).unwrap_err();
    assert!(err.to_string().contains("invalid"), "{err}");
    let a = snapshot(&origin, persistent(Arc::new(MemDevice::new(1 << 20)), 8));
    let b = snapshot(&origin, persistent(Arc::new(MemDevice::new(1 << 20)), 8));
    origin.start_merge(&a, paused()).unwrap();
    let err = origin.start_merge(&b, paused()).unwrap_err();
    assert!(err.to_string().contains("already merging"), "{err}");
    assert!(
        matches!(origin.end_merge(), Err(Error::WrongState(_))),
        "not done yet"
    );
}

/// M5: a view write to a chunk of the batch being merged waits for the batch's commit and
/// then lands on the origin; without the wait it would land in the COW after the merger
/// read it, and be lost.
#[test]
fn a_view_write_into_the_merging_window_waits_for_the_commit() {
    let size = 256 * KIB;
    let mem = Arc::new(MemDevice::new(size));
    mem.write_at(&tagged::sectors(BASE, 0, size / 512), 0, Fua::No)
        .unwrap();
    let gated = Arc::new(GatedDevice::new(mem.clone()));
    let origin = Origin::new(gated.clone(), Arc::new(Copier::default()));
    let a = snapshot(&origin, persistent(Arc::new(MemDevice::new(1 << 20)), 8));
    // One exception: chunk 3 (bytes 12288..16384).
    origin.write_at(&[1u8; 4096], 3 * 4096, Fua::No).unwrap();
    let merge = origin.start_merge(&a, paused()).unwrap();
    // Hold the merger's origin write of chunk 3: the batch is in its window.
    let gate = gated.gate(OpKind::Write, 3 * 4096, 4 * 4096, 1);
    let merger = {
        let (merge, origin) = (merge.clone(), origin.clone());
        std::thread::spawn(move || merge.merge_batch(&origin))
    };
    gate.wait_arrived(1);
    let writer = {
        let origin = origin.clone();
        std::thread::spawn(move || origin.write_at(&[9u8; 512], 3 * 4096 + 512, Fua::No))
    };
    // The writer must not finish while the batch holds its chunk.
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !writer.is_finished(),
        "a write into the merging window went on before the batch committed"
    );
    gate.release();
    assert!(merger.join().unwrap().unwrap());
    writer.join().unwrap().unwrap();
    assert!(!merge.merge_batch(&origin).unwrap(), "done");
    let mut got = vec![0u8; 4096];
    mem.read_at(&mut got, 3 * 4096).unwrap();
    let mut want = tagged::sectors(BASE, 24, 8);
    want[512..1024].fill(9);
    assert_eq!(got, want, "the view write survived the merge");
}

/// A view write waiting for the merger's window holds no lock the merger needs: with a
/// deactivation queued on the origin's snapshot list, the merger's next overwrite (which
/// takes the list shared) must still get through.
#[test]
fn a_view_write_waiting_on_the_window_never_blocks_the_merger_behind_a_deactivation() {
    let size = 256 * KIB;
    let mem = Arc::new(MemDevice::new(size));
    let gated = Arc::new(GatedDevice::new(mem.clone()));
    let origin = Origin::new(gated.clone(), Arc::new(Copier::default()));
    let a = snapshot(&origin, persistent(Arc::new(MemDevice::new(1 << 20)), 8));
    // Two exceptions, one batch, two separate overwrites: chunks 3 and 9.
    origin.write_at(&[1u8; 4096], 3 * 4096, Fua::No).unwrap();
    origin.write_at(&[1u8; 4096], 9 * 4096, Fua::No).unwrap();
    let b = snapshot(&origin, persistent(Arc::new(MemDevice::new(1 << 20)), 8));
    let merge = origin.start_merge(&a, paused()).unwrap();
    let gate = gated.gate(OpKind::Write, 3 * 4096, 4 * 4096, 1);
    let (tx, rx) = std::sync::mpsc::channel();
    let merger = {
        let (merge, origin, tx) = (merge.clone(), origin.clone(), tx.clone());
        std::thread::spawn(move || tx.send(("merger", merge.merge_batch(&origin).map(|_| ()))))
    };
    gate.wait_arrived(1);
    let writer = {
        let (origin, tx) = (origin.clone(), tx.clone());
        std::thread::spawn(move || {
            tx.send(("writer", origin.write_at(&[9u8; 512], 9 * 4096, Fua::No)))
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    let remover = {
        let (origin, b, tx) = (origin.clone(), b.clone(), tx);
        std::thread::spawn(move || tx.send(("deactivate", origin.deactivate(&b))))
    };
    cowsnap_core::testkit::wait_for("the deactivation to queue", || {
        origin.activations_waiting() == 1
    });
    gate.release();
    for _ in 0..3 {
        let (who, r) = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("deadlock: the merger, the view write and the deactivation wait on each other");
        r.unwrap_or_else(|e| panic!("{who}: {e}"));
    }
    for t in [merger, writer, remover] {
        t.join().unwrap().unwrap();
    }
    let mut got = vec![0u8; 4096];
    mem.read_at(&mut got, 9 * 4096).unwrap();
    assert!(got[..512].iter().all(|&x| x == 9) && got[512..].iter().all(|&x| x == 0));
}

/// The switch waits for the merging snapshot's own writes under way: one still writing a
/// remapped chunk in the COW would land after the merger copied that chunk, and be lost.
#[test]
fn the_switch_waits_for_the_snapshots_own_writes_in_flight() {
    let size = 256 * KIB;
    let mem = Arc::new(MemDevice::new(size));
    let origin = Origin::new(mem.clone(), Arc::new(Copier::default()));
    let cow = Arc::new(GatedDevice::new(Arc::new(MemDevice::new(1 << 20))));
    let a = snapshot(&origin, persistent(cow.clone(), 8));
    // Chunk 5 remapped by a first snapshot write; a second one is held in the COW.
    a.write_at(&[1u8; 4096], 5 * 4096, Fua::No).unwrap();
    let gate = cow.gate(OpKind::Write, 0, 1 << 20, 1);
    let writer = {
        let a = a.clone();
        std::thread::spawn(move || a.write_at(&[2u8; 4096], 5 * 4096, Fua::No))
    };
    gate.wait_arrived(1);
    let switch = {
        let (origin, a) = (origin.clone(), a.clone());
        std::thread::spawn(move || origin.start_merge(&a, paused()).map(|_| ()))
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !switch.is_finished(),
        "the switch did not wait for a snapshot write in flight"
    );
    gate.release();
    writer.join().unwrap().unwrap();
    switch.join().unwrap().unwrap();
    let merge = origin.merge().unwrap();
    while merge.merge_batch(&origin).unwrap() {}
    let mut got = vec![0u8; 4096];
    mem.read_at(&mut got, 5 * 4096).unwrap();
    assert!(
        got.iter().all(|&b| b == 2),
        "the snapshot's last write is on the origin"
    );
}

/// The kernel's own merge of the `p16-basic`-style source COW (`p16-merge` fixture) gives
/// an origin and an emptied COW; cowsnap's merge of the same COW gives the same bytes.
#[test]
fn a_merge_gives_the_kernels_origin_and_cow_bytes() {
    use kernel_fixtures::{sha256, Fixture};
    let fx = Fixture::load("p16-merge");
    let src = Fixture::load(fx.manifest["merged_from"].as_str().unwrap());
    let odev = src.image("final");
    let cow = Arc::new(MemDevice::new(src.cow_bytes().len() as u64));
    cow.write_at(&src.cow_bytes(), 0, Fua::No).unwrap();
    let origin = Origin::new(odev.clone(), Arc::new(Copier::default()));
    let store = Arc::new(PersistentStore::open(cow.clone(), None, false).unwrap());
    let snap = Snapshot::load(&origin, store).unwrap();
    let before = snap.status().to_string();
    let kernel_before = kernel_fixtures::strip_status(&fx.status("status.snapshot_before"))
        .replace("snapshot ", "");
    assert_eq!(before, kernel_before, "status before the merge");
    let merge = origin.start_merge(&snap, paused()).unwrap();
    while merge.merge_batch(&origin).unwrap() {}
    assert_eq!(
        merge.kernel_status().to_string(),
        kernel_fixtures::strip_status(&fx.status("status.merge.final"))
            .replace("snapshot-merge ", "")
    );
    assert_eq!(
        sha256(&odev.to_vec()),
        fx.expected("origin_after_merge_sha256")
    );
    assert_eq!(
        sha256(&cow.to_vec()),
        sha256(&fx.cow_bytes()),
        "the COW after the merge"
    );
}

// ---- crash tests ----

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum View {
    Origin,
    Other,
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        view: View,
        start: u64,
        count: u64,
        fua: bool,
    },
    Flush(View),
    Batch,
}

struct Machine {
    power: Arc<PowerDomain>,
    origin: Arc<CrashDevice>,
    cow_a: Arc<CrashDevice>,
    cow_b: Arc<CrashDevice>,
}

const SECTORS: u64 = 512;

impl Machine {
    /// Origin, snapshot `a` (4 KiB chunks) with origin and own writes, then `b` (8 KiB
    /// chunks) with more; everything flushed. Returns the machine and the images the
    /// merge must produce: `a`'s content, `b`'s content.
    fn prepared(seed: u64) -> (Machine, Vec<u8>, Vec<u8>) {
        let power = PowerDomain::new();
        let m = Machine {
            origin: Arc::new(CrashDevice::from_bytes(
                &tagged::sectors(BASE, 0, SECTORS),
                power.clone(),
                "origin",
            )),
            cow_a: Arc::new(CrashDevice::in_domain(512 * KIB, power.clone(), "cow-a")),
            cow_b: Arc::new(CrashDevice::in_domain(512 * KIB, power.clone(), "cow-b")),
            power,
        };
        let origin = Origin::new(m.origin.clone(), Arc::new(Copier::default()));
        let a = snapshot(&origin, persistent(m.cow_a.clone(), 8));
        let mut rng = SplitMix(seed);
        let mut n = 1_000_000;
        let mut write = |dev: &dyn BlockDevice, rng: &mut SplitMix| {
            n += 1;
            random_write(dev, rng, n);
        };
        for _ in 0..12 {
            write(&*origin, &mut rng);
            write(&*a, &mut rng);
        }
        let b = snapshot(&origin, persistent(m.cow_b.clone(), 16));
        for _ in 0..6 {
            write(&*origin, &mut rng);
            write(&*b, &mut rng);
        }
        for d in [&*origin as &dyn BlockDevice, &*a, &*b] {
            d.flush().unwrap();
        }
        let (want_a, want_b) = (read_all(&*a), read_all(&*b));
        drop((a, b, origin));
        (m, want_a, want_b)
    }

    /// Opens the pool of devices as a restarted daemon would: `b` active, `a` merging
    /// (paused: the test runs the batches).
    fn open(
        &self,
    ) -> cowsnap_core::Result<(
        Arc<Origin>,
        Arc<Snapshot>,
        Arc<cowsnap_core::targets::Merge>,
    )> {
        let origin = Origin::new(self.origin.clone(), Arc::new(Copier::default()));
        let b = Snapshot::load(
            &origin,
            Arc::new(PersistentStore::open(self.cow_b.clone(), None, false)?),
        )?;
        origin.activate(&b)?;
        let a = Snapshot::load(
            &origin,
            Arc::new(PersistentStore::open(self.cow_a.clone(), None, false)?),
        )?;
        let merge = origin.start_merge(
            &a,
            MergeSettings {
                batch_bytes: 12 * KIB,
                paused: true,
                ..Default::default()
            },
        )?;
        Ok((origin, b, merge))
    }
}

fn merge_workload(seed: u64, n: usize) -> Vec<Op> {
    let mut rng = SplitMix(seed ^ 0x006d_6572_6765);
    (0..n)
        .map(|_| match rng.below(100) {
            0..=34 => Op::Batch,
            35..=89 => {
                let (start, count) = random_range(&mut rng, SECTORS);
                Op::Write {
                    view: if rng.below(3) == 0 {
                        View::Other
                    } else {
                        View::Origin
                    },
                    start,
                    count,
                    fua: rng.below(4) == 0,
                }
            }
            r => Op::Flush(if r < 95 { View::Origin } else { View::Other }),
        })
        .collect()
}

/// Runs `ops`; returns how many were acknowledged (the first failure stops the run).
fn run(origin: &Origin, b: &Snapshot, merge: &cowsnap_core::targets::Merge, ops: &[Op]) -> usize {
    for (i, op) in ops.iter().enumerate() {
        let r = match op {
            Op::Write {
                view,
                start,
                count,
                fua,
            } => {
                let data = tagged::sectors(&tag(i), *start, *count);
                let dev: &dyn BlockDevice = match view {
                    View::Origin => origin,
                    View::Other => b,
                };
                dev.write_at(&data, start * 512, Fua::from(*fua))
            }
            Op::Flush(View::Origin) => origin.flush(),
            Op::Flush(View::Other) => b.flush(),
            Op::Batch => merge.merge_batch(origin).map(|_| ()),
        };
        if r.is_err() {
            return i;
        }
    }
    ops.len()
}

/// Checks every sector of `img` (the view `view` after the crash and the completed merge):
/// it holds the base image's tag, or one written through the view since, never an older
/// one than the last acknowledged durable write.
fn check_view(img: &[u8], base: &[u8], ops: &[Op], acked: usize, view: View, ctx: &str) {
    let mut hist: HashMap<u64, Vec<(usize, bool)>> = HashMap::new();
    for (i, op) in ops.iter().enumerate().take((acked + 1).min(ops.len())) {
        if let Op::Write {
            view: v,
            start,
            count,
            fua,
        } = op
        {
            if *v != view {
                continue;
            }
            let ok = i < acked;
            let flushed = ops[i + 1..acked.max(i + 1)]
                .iter()
                .any(|o| matches!(o, Op::Flush(f) if *f == view));
            for s in *start..start + count {
                hist.entry(s)
                    .or_default()
                    .push((i, ok && (*fua || flushed)));
            }
        }
    }
    for s in 0..SECTORS {
        let sector = |img: &[u8]| img[(s * 512) as usize..((s + 1) * 512) as usize].to_vec();
        let got = sector_tag(&sector(img), s).unwrap_or_else(|e| panic!("{ctx}: {view:?}: {e}"));
        let base_tag = sector_tag(&sector(base), s).unwrap();
        let allowed: Vec<[u8; 8]> = match hist.get(&s) {
            None => vec![base_tag],
            Some(h) => {
                let last = h.iter().rposition(|(_, d)| *d);
                let mut v: Vec<_> = h[last.unwrap_or(0)..]
                    .iter()
                    .map(|(i, _)| tag(*i))
                    .collect();
                if last.is_none() {
                    v.push(base_tag);
                }
                v
            }
        };
        assert!(
            allowed.contains(&got),
            "{ctx}: {view:?} sector {s} holds {:?}, allowed {:?}",
            String::from_utf8_lossy(&got),
            allowed
                .iter()
                .map(|t| String::from_utf8_lossy(t).into_owned())
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_merge_survives_a_crash_at_every_write_and_flush() {
    let seed = seed();
    eprintln!("TEST: seed {seed} (rerun with COWSNAP_SEED={seed})");
    let ops = merge_workload(seed, 70);
    // A dry run counts the boundaries.
    let (m, _, _) = Machine::prepared(seed);
    let (origin, b, merge) = m.open().unwrap();
    let before = m.power.boundaries();
    assert_eq!(run(&origin, &b, &merge, &ops), ops.len());
    let total = m.power.boundaries() - before;
    drop((origin, b, merge));
    assert!(total > 40, "{total} boundaries");
    for cut in 0..total {
        for crash_seed in 0..2 {
            let ctx = format!("seed {seed} cut {cut}/{total} crash {crash_seed}");
            let (m, want_a, want_b) = Machine::prepared(seed);
            let (origin, b, merge) = m.open().unwrap();
            m.power.cut_after(cut);
            let acked = run(&origin, &b, &merge, &ops);
            merge.stop();
            drop((origin, b, merge));
            for d in [&m.origin, &m.cow_a, &m.cow_b] {
                d.crash(crash_seed * 7919 + cut);
            }
            m.power.restore();
            let (origin, b, merge) = m
                .open()
                .unwrap_or_else(|e| panic!("{ctx}: restart failed: {e}"));
            while merge
                .merge_batch(&origin)
                .unwrap_or_else(|e| panic!("{ctx}: merge after restart: {e}"))
            {}
            origin.end_merge().unwrap();
            check_view(
                &read_all(&*m.origin),
                &want_a,
                &ops,
                acked,
                View::Origin,
                &ctx,
            );
            check_view(&read_all(&*b), &want_b, &ops, acked, View::Other, &ctx);
        }
    }
}

#[test]
fn a_failed_merge_keeps_serving_and_a_resume_completes_it() {
    use cowsnap_core::dev::{FaultRule, FaultyDevice};
    let size = 512 * KIB;
    let odev = Arc::new(MemDevice::new(size));
    odev.write_at(&tagged::sectors(BASE, 0, size / 512), 0, Fua::No)
        .unwrap();
    let faulty = Arc::new(FaultyDevice::new(odev.clone()));
    let origin = Origin::new(faulty.clone(), Arc::new(Copier::default()));
    let cow = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(1 << 20))));
    let a = snapshot(&origin, persistent(cow.clone(), 8));
    for i in 0..40u64 {
        origin
            .write_at(
                &tagged::sectors(&tag(i as usize), i * 16, 8),
                i * 16 * 512,
                Fua::No,
            )
            .unwrap();
    }
    let want = read_all(&*a);
    let merge = origin.start_merge(&a, paused()).unwrap();
    // The hook hears every end: each failure, then the end.
    let (tx, ends) = std::sync::mpsc::channel();
    merge.on_finish(move |s| tx.send(s.clone()).unwrap());
    assert!(
        merge.merge_batch(&origin).unwrap(),
        "one batch moves before the fault"
    );
    // A COW read error stops it.
    cow.add_rule(FaultRule::Range {
        kind: OpKind::Read,
        start: 0,
        end: 1 << 20,
    });
    merge.resume(&origin).unwrap();
    let MergeState::Failed(why) = merge.wait() else {
        panic!("the merge must fail on the COW's read error");
    };
    assert!(why.contains("read"), "{why}");
    cow.clear_rules();
    // So does an origin write error, after a resume.
    faulty.add_rule(FaultRule::Range {
        kind: OpKind::Write,
        start: 0,
        end: size,
    });
    merge.resume(&origin).unwrap();
    let MergeState::Failed(why) = merge.wait() else {
        panic!("the merge must fail on the origin's write error");
    };
    assert!(why.contains("write"), "{why}");
    assert_eq!(merge.kernel_status(), SnapshotStatus::MergeFailed);
    assert_eq!(merge.status().to_string(), "Merge failed");
    assert_eq!(
        read_all(&*origin),
        want,
        "the view still shows the snapshot"
    );
    // View writes still work where they go to the COW; the origin device is failing.
    assert!(matches!(origin.end_merge(), Err(Error::WrongState(_))));
    faulty.clear_rules();
    merge.resume(&origin).unwrap();
    assert_eq!(merge.wait(), MergeState::Done);
    // The hook runs after the state changes: wait for it.
    let heard: Vec<MergeState> = (0..3)
        .map(|_| {
            ends.recv_timeout(std::time::Duration::from_secs(20))
                .unwrap()
        })
        .collect();
    assert!(matches!(heard[0], MergeState::Failed(_)) && matches!(heard[1], MergeState::Failed(_)));
    assert_eq!(heard[2], MergeState::Done);
    origin.end_merge().unwrap();
    assert_eq!(read_all(&*odev), want);
}
