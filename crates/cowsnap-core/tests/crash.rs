//! Crash tests of the persistent store with the engine on top: random workloads of origin
//! and snapshot writes and flushes run on `CrashDevice`s sharing one power domain; the
//! power is cut at every write and flush boundary in turn; the devices crash (unflushed
//! sectors lost or torn, seeded); the snapshot is reopened and checked:
//! * it loads (no corrupt metadata) and its exceptions are dense in allocation order
//!   (nothing leaked);
//! * every sector of the snapshot view holds the origin's data at snapshot time or data
//!   written through the snapshot, never data written to the origin afterwards;
//! * every write acknowledged with FUA, or followed by an acknowledged flush, is present
//!   (or a later write to the same sector is), on the origin and on the snapshot.
//!
//! Seeds are printed; `COWSNAP_SEED=n` reruns a test's workloads.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, CrashDevice, Fua, PowerDomain};
use cowsnap_core::exception::index::{IndexConfig, PageCache, Tuning};
use cowsnap_core::exception::persistent::format::Geometry;
use cowsnap_core::exception::{ExceptionStore, ExceptionTable, PersistentStore};
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::testkit::tagged::{self, sector_tag, tag};
use cowsnap_core::units::ChunkSize;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHUNK_SECTORS: u64 = 8;
const BASE: &[u8; 8] = b"ORIGINAL";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Target {
    Origin,
    Snap,
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        target: Target,
        start: u64,
        count: u64,
        fua: bool,
    },
    Flush(Target),
}

fn workload(seed: u64, sectors: u64, n: usize, chunk_range: Option<(u64, u64)>) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let r: u32 = rng.random_range(0..100);
            let target = if r < 55 { Target::Origin } else { Target::Snap };
            if r >= 88 {
                return Op::Flush(if r < 94 { Target::Origin } else { Target::Snap });
            }
            let (lo, hi) = chunk_range.map_or((0, sectors), |(a, b)| {
                (a * CHUNK_SECTORS, b * CHUNK_SECTORS)
            });
            let start = rng.random_range(lo..hi);
            let count = rng.random_range(1..=20).min(hi - start);
            Op::Write {
                target,
                start,
                count,
                fua: rng.random_bool(0.25),
            }
        })
        .collect()
}

struct Machine {
    power: Arc<PowerDomain>,
    origin: Arc<CrashDevice>,
    cow: Arc<CrashDevice>,
    /// The snapshot's exception index: it survives the crash like a file would (its
    /// writes before the cut stay), so every reopen resumes from what it covered.
    index: cowsnap_core::testkit::Scratch,
}

impl Machine {
    fn new(origin_sectors: u64, cow_bytes: u64) -> Machine {
        let power = PowerDomain::new();
        let origin = Arc::new(CrashDevice::from_bytes(
            &tagged::sectors(BASE, 0, origin_sectors),
            power.clone(),
            "origin",
        ));
        let cow = Arc::new(CrashDevice::in_domain(cow_bytes, power.clone(), "cow"));
        Machine {
            power,
            origin,
            cow,
            index: cowsnap_core::testkit::scratch("crash-index"),
        }
    }

    fn open(&self) -> cowsnap_core::Result<(Arc<Origin>, Arc<Snapshot>, Arc<PersistentStore>)> {
        let origin = Origin::new(self.origin.clone(), Arc::new(Copier::default()));
        let cs = ChunkSize::from_sectors(CHUNK_SECTORS).unwrap();
        let store = Arc::new(PersistentStore::open(self.cow.clone(), Some(cs), false)?);
        let config = IndexConfig {
            dir: Some(self.index.path().to_path_buf()),
            temporary_in: None,
            cache: PageCache::new(2 * 4096),
            // Checkpoints every few exceptions, on the background thread, racing the cut.
            tuning: Tuning {
                flush_at: 4,
                level0_runs: 3,
                rebuild_batch: 8,
            },
            identity: 1,
            fault: None,
        };
        let snap = Snapshot::load_with(&origin, store.clone(), config)?;
        origin.activate(&snap)?;
        Ok((origin, snap, store))
    }
}

/// What happened to each op: issued, acknowledged.
#[derive(Clone, Copy, Debug, Default)]
struct Outcome {
    issued: bool,
    acked: bool,
}

fn run(origin: &Origin, snap: &Snapshot, ops: &[Op], tag_base: usize) -> Vec<Outcome> {
    let mut out = vec![Outcome::default(); ops.len()];
    for (i, op) in ops.iter().enumerate() {
        out[i].issued = true;
        let r = match op {
            Op::Write {
                target,
                start,
                count,
                fua,
            } => {
                let data = tagged::sectors(&tag(tag_base + i), *start, *count);
                let fua = Fua::from(*fua);
                match target {
                    Target::Origin => origin.write_at(&data, start * 512, fua),
                    Target::Snap => snap.write_at(&data, start * 512, fua),
                }
            }
            Op::Flush(Target::Origin) => origin.flush(),
            Op::Flush(Target::Snap) => snap.flush(),
        };
        out[i].acked = r.is_ok();
        if r.is_err() {
            // The power is out (or the snapshot failed): nothing later is issued.
            break;
        }
    }
    out
}

/// The tags each sector may hold after the crash, per view.
fn allowed(
    ops: &[Op],
    outcomes: &[Outcome],
    tag_base: usize,
) -> HashMap<(Target, u64), Vec<[u8; 8]>> {
    let mut hist: HashMap<(Target, u64), Vec<(usize, bool)>> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if let Op::Write {
            target,
            start,
            count,
            fua,
        } = op
        {
            if !outcomes[i].issued {
                continue;
            }
            // Durable: acknowledged with FUA, or acknowledged and followed by an
            // acknowledged flush of the same view.
            let flushed = ops[i + 1..]
                .iter()
                .zip(&outcomes[i + 1..])
                .any(|(o, r)| matches!(o, Op::Flush(t) if t == target) && r.acked);
            let durable = outcomes[i].acked && (*fua || flushed);
            for s in *start..start + count {
                hist.entry((*target, s)).or_default().push((i, durable));
            }
        }
    }
    hist.into_iter()
        .map(|(k, h)| {
            let last_durable = h.iter().rposition(|(_, d)| *d);
            let mut tags: Vec<[u8; 8]> = match last_durable {
                Some(p) => h[p..].iter().map(|(i, _)| tag(tag_base + i)).collect(),
                None => h.iter().map(|(i, _)| tag(tag_base + i)).collect(),
            };
            if last_durable.is_none() {
                tags.push(*BASE);
            }
            (k, tags)
        })
        .collect()
}

/// Reopens after a crash and checks the three properties.
fn check_after_crash(m: &Machine, ops: &[Op], outcomes: &[Outcome], tag_base: usize, ctx: &str) {
    let (origin, snap, store) = m
        .open()
        .unwrap_or_else(|e| panic!("{ctx}: reopen after crash failed: {e}"));
    assert!(snap.is_valid(), "{ctx}: snapshot invalid after crash");
    // Nothing leaked: entry j of area k records the j-th data chunk after area k.
    let geo = Geometry::new(store.chunk_size());
    let table = snap.exceptions().table().unwrap();
    let mut scan = ExceptionTable::new();
    cowsnap_core::exception::persistent::read::load_exceptions(
        &*m.cow,
        &geo,
        None,
        Default::default(),
        &mut |_, e| {
            scan.insert(e).unwrap();
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(
        table,
        scan,
        "{ctx}: the index ({:?}) differs from a full scan",
        snap.exceptions().index().status().state
    );
    let mut news: Vec<u64> = table.iter().map(|e| e.new.0).collect();
    news.sort_unstable();
    let mut want = Vec::new();
    let mut c = 2;
    while want.len() < news.len() {
        if geo.is_data_chunk(cowsnap_core::units::Chunk(c)) {
            want.push(c);
        }
        c += 1;
    }
    assert_eq!(
        news, want,
        "{ctx}: exceptions are not dense (a chunk leaked)"
    );
    let next_free = geo.skip_metadata(cowsnap_core::units::Chunk(c)).0;
    assert_eq!(
        store.usage().allocated_sectors,
        next_free * CHUNK_SECTORS,
        "{ctx}"
    );

    let allowed = allowed(ops, outcomes, tag_base);
    let sectors = origin.size() / 512;
    let mut obuf = vec![0u8; origin.size() as usize];
    origin.read_at(&mut obuf, 0).unwrap();
    let mut sbuf = vec![0u8; snap.size() as usize];
    snap.read_at(&mut sbuf, 0).unwrap();
    for (target, buf) in [(Target::Origin, &obuf), (Target::Snap, &sbuf)] {
        for s in 0..sectors {
            let data = &buf[(s * 512) as usize..((s + 1) * 512) as usize];
            let t = sector_tag(data, s).unwrap_or_else(|e| panic!("{ctx}: {target:?}: {e}"));
            let ok = match allowed.get(&(target, s)) {
                Some(tags) => tags.contains(&t),
                None => t == *BASE,
            };
            assert!(
                ok,
                "{ctx}: {target:?} sector {s} holds {:?}, allowed {:?}",
                String::from_utf8_lossy(&t),
                allowed.get(&(target, s)).map(|v| v
                    .iter()
                    .map(|t| String::from_utf8_lossy(t).into_owned())
                    .collect::<Vec<_>>())
            );
        }
    }
    drop(origin);
}

/// Runs `ops` (after `prefix`, which is never cut) with the power cut at every boundary
/// and a few crash seeds each.
fn crash_everywhere(
    seed: u64,
    origin_sectors: u64,
    cow_bytes: u64,
    prefix: &[Op],
    ops: &[Op],
) -> (u64, usize, u64) {
    // A dry run counts the boundaries of `ops`.
    let m = Machine::new(origin_sectors, cow_bytes);
    let (o, s, _) = m.open().unwrap();
    run(&o, &s, prefix, 0);
    let before = m.power.boundaries();
    let done = run(&o, &s, ops, prefix.len());
    assert!(
        done.iter().all(|r| r.acked),
        "seed {seed}: the dry run must succeed"
    );
    let total = m.power.boundaries() - before;
    let metadata_sectors = s.store().usage().metadata_sectors;
    drop((o, s));

    let mut runs = 0;
    for cut in 0..=total {
        for crash_seed in [
            0,
            seed.wrapping_mul(31).wrapping_add(cut),
            seed ^ (cut << 20) ^ 0x5a5a,
        ] {
            let m = Machine::new(origin_sectors, cow_bytes);
            let (o, s, _) = m.open().unwrap();
            let pre = run(&o, &s, prefix, 0);
            assert!(pre.iter().all(|r| r.acked));
            m.power.cut_after(cut);
            let outcomes = run(&o, &s, ops, prefix.len());
            drop((o, s));
            m.origin.crash(crash_seed);
            m.cow.crash(crash_seed.wrapping_add(1));
            m.power.restore();
            let mut all_ops = prefix.to_vec();
            all_ops.extend_from_slice(ops);
            let mut all_out: Vec<Outcome> = pre;
            all_out.extend(outcomes);
            check_after_crash(
                &m,
                &all_ops,
                &all_out,
                0,
                &format!("seed {seed} cut after {cut}/{total} crash seed {crash_seed}"),
            );
            runs += 1;
        }
    }
    (total, runs, metadata_sectors)
}

/// `n` workload seeds from the test kit's seed (printed, with how to rerun them all).
fn seeds(n: u64) -> Vec<u64> {
    let base = cowsnap_core::testkit::seed();
    (0..n).map(|i| base.wrapping_add(i)).collect()
}

#[test]
fn crash_at_every_boundary_of_random_workloads() {
    for seed in seeds(3) {
        println!("crash workload seed {seed}");
        let ops = workload(seed, 64 * CHUNK_SECTORS, 24, None);
        let (boundaries, runs, _) = crash_everywhere(seed, 64 * CHUNK_SECTORS, 1 << 20, &[], &ops);
        println!("  {boundaries} boundaries, {runs} crashes checked");
        assert!(boundaries > 20);
    }
}

#[test]
fn crash_at_every_boundary_across_a_metadata_area_boundary() {
    // 4 KiB chunks: 256 entries per area. 250 origin writes to distinct chunks first,
    // then a random workload over fresh chunks that fills area 0 and starts area 1.
    for seed in seeds(1) {
        println!("multi-area crash workload seed {seed}");
        let prefix: Vec<Op> = (0..250)
            .map(|c| Op::Write {
                target: Target::Origin,
                start: c * CHUNK_SECTORS,
                count: 1,
                fua: false,
            })
            .collect();
        let ops = workload(seed, 320 * CHUNK_SECTORS, 16, Some((250, 320)));
        let (boundaries, runs, metadata) =
            crash_everywhere(seed, 320 * CHUNK_SECTORS, 2 << 20, &prefix, &ops);
        println!("  {boundaries} boundaries, {runs} crashes checked");
        assert_eq!(
            metadata,
            3 * CHUNK_SECTORS,
            "the workload must reach area 1"
        );
    }
}

#[test]
fn crash_during_format_leaves_a_fresh_or_formatted_store() {
    for cut in 0..4 {
        let m = Machine::new(16 * CHUNK_SECTORS, 1 << 20);
        m.power.cut_after(cut);
        let first = m.open();
        assert_eq!(
            first.is_ok(),
            cut >= 3,
            "format is 3 boundaries: zero, flush, header"
        );
        drop(first);
        m.cow.crash(cut + 7);
        m.power.restore();
        let (_o, s, st) = m.open().unwrap();
        assert_eq!(s.status().to_string(), "16/2048 16");
        assert_eq!(st.usage().metadata_sectors, 16);
    }
}

#[test]
fn crash_at_random_boundaries_under_concurrent_writers() {
    // Four threads write disjoint chunk sets through the origin and the snapshot, so each
    // sector's history comes from one thread; the power is cut at a random boundary.
    const THREADS: u64 = 4;
    const CHUNKS: u64 = 96;
    for seed in seeds(6) {
        println!("concurrent crash seed {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let m = Machine::new(CHUNKS * CHUNK_SECTORS, 1 << 20);
        let (o, s, _) = m.open().unwrap();
        let cut = rng.random_range(0..200);
        m.power.cut_after(cut);
        let per_thread: Vec<Vec<Op>> = (0..THREADS)
            .map(|t| {
                // Thread t owns the chunks c with c % THREADS == t: writes stay inside one.
                workload(seed ^ (t << 32), CHUNKS * CHUNK_SECTORS, 30, None)
                    .into_iter()
                    .map(|op| match op {
                        Op::Write {
                            target, start, fua, ..
                        } => {
                            let c = (start / CHUNK_SECTORS) / THREADS * THREADS + t;
                            let off = start % CHUNK_SECTORS;
                            Op::Write {
                                target,
                                start: c * CHUNK_SECTORS + off,
                                count: (CHUNK_SECTORS - off).min(1 + start % 5),
                                fua,
                            }
                        }
                        f => f,
                    })
                    .collect()
            })
            .collect();
        let outcomes: Vec<Vec<Outcome>> = std::thread::scope(|sc| {
            let hs: Vec<_> = per_thread
                .iter()
                .enumerate()
                .map(|(t, ops)| {
                    let (o, s) = (&o, &s);
                    sc.spawn(move || run(o, s, ops, t * 10_000))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        drop((o, s));
        m.origin.crash(seed);
        m.cow.crash(seed.wrapping_add(99));
        m.power.restore();
        // Check each thread's sectors against its own history.
        let (origin, snap, _) = m.open().unwrap();
        assert!(snap.is_valid());
        let mut allowed_all = HashMap::new();
        for (t, ops) in per_thread.iter().enumerate() {
            allowed_all.extend(allowed(ops, &outcomes[t], t * 10_000));
        }
        let sectors = origin.size() / 512;
        for (target, dev) in [
            (Target::Origin, &*origin as &dyn BlockDevice),
            (Target::Snap, &*snap),
        ] {
            let mut buf = vec![0u8; dev.size() as usize];
            dev.read_at(&mut buf, 0).unwrap();
            for sct in 0..sectors {
                let data = &buf[(sct * 512) as usize..((sct + 1) * 512) as usize];
                let t = sector_tag(data, sct).unwrap();
                let ok = allowed_all
                    .get(&(target, sct))
                    .map_or(t == *BASE, |tags: &Vec<[u8; 8]>| tags.contains(&t));
                assert!(
                    ok,
                    "seed {seed} cut {cut}: {target:?} sector {sct} holds {:?}",
                    String::from_utf8_lossy(&t)
                );
            }
        }
    }
}
