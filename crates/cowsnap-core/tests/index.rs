//! The exception index's sidecar against the store's log: a valid sidecar is resumed
//! without a scan, a tail is replayed, a COW changed behind the index is rebuilt, a damaged
//! page is an error and never wrong data, and a crash at every write, sync, rename and
//! removal of a checkpoint leaves an index that, after activation, holds exactly what a
//! full scan of the COW holds.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use cowsnap_core::dev::{BlockDevice, Fua, MemDevice};
use cowsnap_core::exception::index::dir::{FaultHook, Op};
use cowsnap_core::exception::index::{IndexConfig, IndexState, PageCache, Tuning};
use cowsnap_core::exception::persistent::format::Geometry;
use cowsnap_core::exception::persistent::{read as cow_read, PersistentStore};
use cowsnap_core::exception::{ExceptionTable, Resume};
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::testkit::{scratch, seed, SplitMix};
use cowsnap_core::units::Chunk;
use cowsnap_core::Error;

const CHUNKS: u64 = 2048;
const ORIGIN: u64 = CHUNKS * 4 * KIB;
const COW: u64 = 8 << 20;

/// Checkpoints only when asked (deterministic steps), level 0 full at 3 runs, rebuilds
/// sorting 16 entries at a time, and a cache of two pages.
const TUNING: Tuning = Tuning {
    flush_at: usize::MAX,
    level0_runs: 3,
    rebuild_batch: 16,
};

struct Rig {
    origin: Arc<Origin>,
    origin_dev: Arc<MemDevice>,
    cow: Arc<MemDevice>,
}

impl Rig {
    fn new() -> Rig {
        let (origin, origin_dev) = mem_origin(ORIGIN, 1);
        Rig {
            origin,
            origin_dev,
            cow: Arc::new(MemDevice::new(COW)),
        }
    }

    fn config(dir: &Path, fault: Option<FaultHook>) -> IndexConfig {
        IndexConfig {
            dir: Some(dir.to_path_buf()),
            temporary_in: None,
            cache: PageCache::new(2 * 4096),
            tuning: TUNING,
            identity: 42,
            fault,
        }
    }

    fn load(&self, config: IndexConfig) -> cowsnap_core::Result<Arc<Snapshot>> {
        let store = PersistentStore::open(self.cow.clone(), Some(cs(8)), false)?;
        let snap = Snapshot::load_with(&self.origin, Arc::new(store), config)?;
        self.origin.activate(&snap)?;
        Ok(snap)
    }

    fn close(&self, snap: Arc<Snapshot>) {
        self.origin.deactivate(&snap).unwrap();
        drop(snap);
    }

    /// Writes chunk `c` of the origin (copying it out to the snapshot).
    fn write(&self, c: u64, tag: u64) {
        self.origin
            .write_at(&pattern(tag, c * 4096, 4096), c * 4096, Fua::No)
            .unwrap();
    }

    /// The table a full scan of the COW gives.
    fn scan(&self) -> ExceptionTable {
        let geo = Geometry::new(cs(8));
        let mut t = ExceptionTable::new();
        cow_read::load_exceptions(&*self.cow, &geo, None, Resume::default(), &mut |_, e| {
            t.insert(e).unwrap();
            Ok(())
        })
        .unwrap();
        t
    }
}

fn state(snap: &Snapshot) -> IndexState {
    snap.exceptions().index().status().state
}

/// Distinct random chunks.
fn chunks(seed: u64, n: usize) -> Vec<u64> {
    let mut r = SplitMix(seed);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    while out.len() < n {
        let c = r.below(CHUNKS);
        if seen.insert(c) {
            out.push(c);
        }
    }
    out
}

/// Every chunk of the snapshot reads as the origin's first image.
fn assert_view(rig: &Rig, snap: &Snapshot) {
    for c in 0..CHUNKS {
        assert_eq!(
            read(snap, c * 4096, 4096),
            pattern(1, c * 4096, 4096),
            "chunk {c} of the snapshot"
        );
    }
    let _ = &rig.origin_dev;
}

#[test]
fn a_valid_sidecar_is_resumed_without_a_scan_and_a_tail_is_replayed() {
    let s = seed();
    let dir = scratch("index-resume");
    let rig = Rig::new();
    let cs_ = chunks(s, 600);
    let snap = rig.load(Rig::config(dir.path(), None)).unwrap();
    assert!(matches!(state(&snap), IndexState::Rebuilt { .. }));
    for (i, &c) in cs_[..300].iter().enumerate() {
        rig.write(c, 100 + i as u64);
    }
    rig.close(snap);

    // The power fails once `dead` is set: no later change reaches the sidecar.
    let dead = Arc::new(AtomicBool::new(false));
    let d = dead.clone();
    let hook: FaultHook = Arc::new(move |_: &Op| {
        if d.load(Ordering::SeqCst) {
            Err(Error::Invalid("power cut".into()))
        } else {
            Ok(())
        }
    });
    let snap = rig.load(Rig::config(dir.path(), Some(hook))).unwrap();
    assert_eq!(state(&snap), IndexState::Loaded { replayed: 0 }, "seed {s}");
    assert_eq!(snap.exceptions().table().unwrap(), rig.scan());
    assert_view(&rig, &snap);
    // Checkpointed up to here; then 300 more, and the final checkpoint is lost.
    snap.exceptions().index().checkpoint().unwrap();
    for (i, &c) in cs_[300..].iter().enumerate() {
        rig.write(c, 500 + i as u64);
    }
    dead.store(true, Ordering::SeqCst);
    rig.close(snap);

    // A tail longer than the checkpoint threshold is checkpointed as it is replayed: the
    // memory held stays bounded by the threshold.
    let mut config = Rig::config(dir.path(), None);
    config.tuning.flush_at = 64;
    let snap = rig.load(config).unwrap();
    assert_eq!(
        state(&snap),
        IndexState::Loaded { replayed: 300 },
        "seed {s}"
    );
    let st = snap.exceptions().index().status();
    assert!(st.recent < 64 && st.checkpoints >= 4, "{st:?}");
    assert_eq!(snap.exceptions().table().unwrap(), rig.scan());
    assert_eq!(snap.exceptions().completed_count(), 600);
    assert_view(&rig, &snap);
}

#[test]
fn a_cow_changed_behind_the_index_or_another_identity_is_rebuilt() {
    let dir = scratch("index-stale");
    let rig = Rig::new();
    let snap = rig.load(Rig::config(dir.path(), None)).unwrap();
    for c in 0..40 {
        rig.write(c * 3, 7);
    }
    rig.close(snap);

    // Another COW owns the index: rebuilt.
    let mut other = Rig::config(dir.path(), None);
    other.identity = 43;
    let snap = rig.load(other).unwrap();
    match state(&snap) {
        IndexState::Rebuilt { reason } => assert!(reason.contains("another COW"), "{reason}"),
        s => panic!("{s:?}"),
    }
    rig.close(snap);
    let snap = rig.load(Rig::config(dir.path(), None)).unwrap();
    assert!(matches!(state(&snap), IndexState::Rebuilt { .. }));
    rig.close(snap);
    let snap = rig.load(Rig::config(dir.path(), None)).unwrap();
    assert_eq!(state(&snap), IndexState::Loaded { replayed: 0 });
    rig.close(snap);

    // Entry 39 (the last covered) rewritten behind the index: old chunk 117 becomes 2000.
    let geo = Geometry::new(cs(8));
    let at = geo.entry_offset(0, 39);
    let mut area = vec![0u8; 4096];
    rig.cow.read_at(&mut area, geo.area_offset(0)).unwrap();
    let j = (at - geo.area_offset(0)) as usize;
    area[j..j + 8].copy_from_slice(&2000u64.to_le_bytes());
    rig.cow
        .write_at(&area, geo.area_offset(0), Fua::No)
        .unwrap();
    let snap = rig.load(Rig::config(dir.path(), None)).unwrap();
    match state(&snap) {
        IndexState::Rebuilt { reason } => assert!(reason.contains("changed"), "{reason}"),
        s => panic!("{s:?}"),
    }
    let table = snap.exceptions().table().unwrap();
    assert_eq!(table, rig.scan());
    assert!(snap.exceptions().lookup(Chunk(2000)).unwrap().is_some());
    assert!(snap.exceptions().lookup(Chunk(117)).unwrap().is_none());
}

/// Flips a bit in data page 0 of the only run file of `dir`.
fn damage_the_run(dir: &Path) {
    let runs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("run-"))
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let mut bytes = std::fs::read(&runs[0]).unwrap();
    bytes[4096 + 100] ^= 0x40;
    std::fs::write(&runs[0], &bytes).unwrap();
}

#[test]
fn a_damaged_index_page_is_an_error_never_wrong_data() {
    let dir = scratch("index-damage");
    let rig = Rig::new();
    let snap = rig.load(Rig::config(dir.path(), None)).unwrap();
    // Three checkpoints: level 0 is full and compacted into one level-1 run.
    for batch in 0..3 {
        for c in batch * 100..(batch + 1) * 100 {
            rig.write(c, 9);
        }
        snap.exceptions().index().checkpoint().unwrap();
    }
    assert_eq!(snap.exceptions().index().status().runs, 1);
    rig.close(snap);
    damage_the_run(dir.path());
    // Level 1 is not read at activation (that is what makes it O(1)): the damage is
    // found by the lookup that reads the page, which fails.
    let snap = rig.load(Rig::config(dir.path(), None)).unwrap();
    assert_eq!(state(&snap), IndexState::Loaded { replayed: 0 });
    let mut buf = vec![0u8; 4096];
    let err = snap.read_at(&mut buf, 6 * 4096).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    // Chunks on other pages still read right.
    assert_eq!(read(&*snap, 280 * 4096, 4096), pattern(1, 280 * 4096, 4096));
    rig.close(snap);
}

#[test]
fn a_damaged_level_0_run_is_found_at_activation_and_rebuilt() {
    let dir = scratch("index-damage-l0");
    let rig = Rig::new();
    let snap = rig.load(Rig::config(dir.path(), None)).unwrap();
    for c in 0..300 {
        rig.write(c, 9);
    }
    rig.close(snap);
    damage_the_run(dir.path());
    let snap = rig.load(Rig::config(dir.path(), None)).unwrap();
    match state(&snap) {
        IndexState::Rebuilt { reason } => assert!(reason.contains("checksum"), "{reason}"),
        s => panic!("{s:?}"),
    }
    assert_eq!(snap.exceptions().table().unwrap(), rig.scan());
    assert_view(&rig, &snap);
}

/// Records every operation on the sidecar and fails from operation `cut` on.
fn recorder(cut: usize) -> (FaultHook, Arc<Mutex<Vec<Op>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let n = Arc::new(AtomicUsize::new(0));
    let l = log.clone();
    let hook: FaultHook = Arc::new(move |op: &Op| {
        if n.fetch_add(1, Ordering::SeqCst) >= cut {
            return Err(Error::Invalid("power cut".into()));
        }
        l.lock().unwrap().push(op.clone());
        Ok(())
    });
    (hook, log)
}

/// What a power cut loses of what `ops` did: the data of files written since their last
/// sync (truncated to nothing), and renames and removals since the last directory sync
/// (renames undone: `saved` holds what each replaced name held before).
fn lose_unsynced(dir: &Path, ops: &[Op], saved: &[(String, Option<Vec<u8>>)]) {
    let mut dirty: Vec<String> = Vec::new();
    let mut renames: Vec<(String, String)> = Vec::new();
    for op in ops {
        match op {
            Op::Write { file, .. } => dirty.push(file.clone()),
            Op::SyncFile(f) => dirty.retain(|d| d != f),
            Op::Rename { from, to } => renames.push((from.clone(), to.clone())),
            Op::SyncDir => renames.clear(),
            Op::Remove(_) => {}
        }
    }
    for f in dirty {
        let p = dir.join(&f);
        if p.exists() {
            std::fs::write(&p, b"").unwrap();
        }
    }
    for (from, to) in renames.iter().rev() {
        let moved = std::fs::read(dir.join(to)).unwrap();
        std::fs::write(dir.join(from), moved).unwrap();
        match saved
            .iter()
            .rev()
            .find(|(n, _)| n == to)
            .and_then(|(_, b)| b.clone())
        {
            Some(b) => std::fs::write(dir.join(to), b).unwrap(),
            None => std::fs::remove_file(dir.join(to)).unwrap(),
        }
    }
}

/// The workload: three batches of origin writes, each followed by a checkpoint (the third
/// compacts level 0 into level 1). Returns the operations the sidecar saw.
type Saved = Vec<(String, Option<Vec<u8>>)>;

/// The workload's sidecar operations, what renames replaced, and how many operations the
/// first activation (its rebuild) made.
fn workload(rig: &Rig, dir: &Path, s: u64, cut: usize) -> (Vec<Op>, Saved, usize) {
    let (hook, log) = recorder(cut);
    let saved = Arc::new(Mutex::new(Vec::new()));
    let (sv, d) = (saved.clone(), dir.to_path_buf());
    let inner = hook.clone();
    // Keeps what a rename is about to replace, for `lose_unsynced`.
    let hook: FaultHook = Arc::new(move |op: &Op| {
        inner(op)?;
        if let Op::Rename { to, .. } = op {
            sv.lock()
                .unwrap()
                .push((to.clone(), std::fs::read(d.join(to)).ok()));
        }
        Ok(())
    });
    let Ok(snap) = rig.load(Rig::config(dir, Some(hook))) else {
        // The cut came in the first activation's rebuild.
        let ops = log.lock().unwrap().clone();
        let saved = saved.lock().unwrap().clone();
        let n = ops.len();
        return (ops, saved, n);
    };
    let loaded = log.lock().unwrap().len();
    let cs_ = chunks(s, 90);
    for batch in cs_.chunks(30) {
        for &c in batch {
            rig.write(c, c);
        }
        let _ = snap.exceptions().index().checkpoint();
    }
    rig.close(snap);
    let ops = log.lock().unwrap().clone();
    let saved = saved.lock().unwrap().clone();
    (ops, saved, loaded)
}

#[test]
fn a_crash_at_every_step_of_a_checkpoint_leaves_an_index_equal_to_a_full_scan() {
    let s = seed();
    let (count, at_load) = {
        let dir = scratch("index-crash-count");
        let rig = Rig::new();
        let (ops, _, at_load) = workload(&rig, dir.path(), s, usize::MAX);
        (ops.len(), at_load)
    };
    assert!(count > 20, "the workload has {count} sidecar operations");
    for cut in 0..=count {
        for lose in [false, true] {
            let dir = scratch("index-crash");
            let rig = Rig::new();
            let (ops, saved, _) = workload(&rig, dir.path(), s, cut);
            if lose {
                lose_unsynced(dir.path(), &ops, &saved);
            }
            let snap = rig
                .load(Rig::config(dir.path(), None))
                .unwrap_or_else(|e| panic!("seed {s} cut {cut} lose {lose}: {e}"));
            assert_eq!(
                snap.exceptions().table().unwrap(),
                rig.scan(),
                "seed {s} cut {cut} lose {lose}: {:?}",
                state(&snap)
            );
            // Once the first superblock is durable, every crash leaves one that is valid
            // with the runs it names: the index is resumed, never rebuilt.
            if cut >= at_load {
                assert!(
                    matches!(state(&snap), IndexState::Loaded { .. }),
                    "seed {s} cut {cut} lose {lose}: {:?}",
                    state(&snap)
                );
            }
            let n = snap.exceptions().completed_count();
            assert!(n == 90 || n == 0, "seed {s} cut {cut}: {n} exceptions");
            for c in chunks(s, 90) {
                assert_eq!(
                    read(&*snap, c * 4096, 4096),
                    pattern(1, c * 4096, 4096),
                    "seed {s} cut {cut} lose {lose} chunk {c}"
                );
            }
            rig.close(snap);
        }
    }
}

#[test]
fn a_replayed_entry_that_could_repeat_a_covered_cow_chunk_makes_a_rebuild() {
    use cowsnap_core::exception::persistent::format::{encode_area, encode_header};
    use cowsnap_core::exception::Exception;
    let dir = scratch("index-refuse");
    let rig = Rig::new();
    let geo = Geometry::new(cs(8));
    // A COW as an older writer may leave it: COW chunk 5 unused, entries not dense.
    let mut entries: Vec<Exception> = (0..10u64)
        .map(|i| Exception::new(100 + i, if i < 3 { 2 + i } else { 3 + i }))
        .collect();
    let write_cow = |entries: &[Exception]| {
        rig.cow
            .write_at(&encode_header(true, cs(8)), 0, Fua::No)
            .unwrap();
        rig.cow
            .write_at(&encode_area(entries, &geo), geo.area_offset(0), Fua::No)
            .unwrap();
    };
    write_cow(&entries);
    let snap = rig.load(Rig::config(dir.path(), None)).unwrap();
    assert!(matches!(state(&snap), IndexState::Rebuilt { .. }));
    rig.close(snap);
    // Another writer appends an entry using COW chunk 5, below the covered entries' 12.
    entries.push(Exception::new(500, 5));
    write_cow(&entries);
    let snap = rig.load(Rig::config(dir.path(), None)).unwrap();
    match state(&snap) {
        IndexState::Rebuilt { reason } => assert!(reason.contains("not above"), "{reason}"),
        s => panic!("{s:?}"),
    }
    assert_eq!(snap.exceptions().table().unwrap(), rig.scan());
    assert_eq!(
        snap.exceptions().lookup(Chunk(500)).unwrap(),
        Some(Chunk(5))
    );
}
