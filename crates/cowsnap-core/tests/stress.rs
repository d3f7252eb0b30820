//! Stress: concurrent origin writers, snapshot writers and snapshot readers on one origin
//! with 8 snapshots of mixed chunk sizes, plus a 9th snapshot taken live in the middle.
//!
//! Layout of the origin (2 MiB), per origin writer `t` of 4: 1 KiB slots in region A
//! shared with the other writers at chunk granularity (slot `i` belongs to `i % 4`), a
//! 256 KiB block in region B, a 192 KiB block in region C. Snapshot writers write only into
//! region C of their snapshots; readers check regions A and B of every snapshot *while*
//! the origin is being written (a failure there is a read/write race). At the end every
//! snapshot is compared byte for byte with its expected content. The live snapshot must
//! hold, for each writer, exactly the state after some prefix of its writes that includes
//! every write acknowledged before the snapshot was requested: a consistent, untorn cut.

#![allow(
    clippy::cast_possible_truncation,
    clippy::too_many_lines,
    reason = "test sizes are small constants; a scenario test reads best top to bottom"
)]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use common::*;
use cowsnap_core::dev::{BlockDevice, Fua};
use cowsnap_core::targets::Snapshot;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 2048 * KIB;
const WRITERS: u64 = 4;
const SLOT: u64 = KIB;
const A_END: u64 = 256 * KIB;
const B_BLOCK: u64 = 256 * KIB;
const C_START: u64 = A_END + WRITERS * B_BLOCK;
const C_BLOCK: u64 = 192 * KIB;
const OPS_PER_WRITER: u64 = 400;

/// The writes one origin writer made, in order: (offset, data).
type WriteLog = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// The byte ranges owned by origin writer `t`.
fn owned_ranges(t: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = (0..A_END / SLOT)
        .filter(|i| i % WRITERS == t)
        .map(|i| (i * SLOT, SLOT))
        .collect();
    v.push((A_END + t * B_BLOCK, B_BLOCK));
    v.push((C_START + t * C_BLOCK, C_BLOCK));
    v
}

fn random_write(rng: &mut StdRng, t: u64) -> (u64, Vec<u8>) {
    let (off, len) = match rng.random_range(0..3) {
        0 => {
            let slots: Vec<u64> = (0..A_END / SLOT).filter(|i| i % WRITERS == t).collect();
            (slots[rng.random_range(0..slots.len())] * SLOT, SLOT)
        }
        k => {
            let (start, size) = if k == 1 {
                (A_END + t * B_BLOCK, B_BLOCK)
            } else {
                (C_START + t * C_BLOCK, C_BLOCK)
            };
            let len = rng.random_range(1..=96u64) * 512;
            let off = start + rng.random_range(0..=(size - len) / 512) * 512;
            (off, len)
        }
    };
    let seed = rng.random::<u64>();
    (off, pattern(seed, off, len))
}

#[test]
fn concurrent_writers_and_readers_with_eight_snapshots_and_a_live_one() {
    let seed = seed();

    let (origin, _) = mem_origin(SIZE, seed);
    let initial = Arc::new(read(&*origin, 0, SIZE));
    let chunk_sizes = [8, 16, 128, 8, 32, 16, 8, 64];
    let snaps: Vec<Arc<Snapshot>> = chunk_sizes
        .iter()
        .map(|&c| transient_snapshot(&origin, 2 * SIZE, cs(c)))
        .collect();
    let snap_models: Vec<Arc<Mutex<Vec<u8>>>> = snaps
        .iter()
        .map(|_| Arc::new(Mutex::new((*initial).clone())))
        .collect();

    let logs: Vec<WriteLog> = (0..WRITERS)
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let writers_done = Arc::new(AtomicBool::new(false));

    let mut handles = Vec::new();
    for t in 0..WRITERS {
        let (origin, log, acked) = (origin.clone(), logs[t as usize].clone(), acked.clone());
        handles.push(thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ (t + 1));
            for _ in 0..OPS_PER_WRITER {
                let (off, data) = random_write(&mut rng, t);
                let fua = if rng.random_bool(0.1) {
                    Fua::Yes
                } else {
                    Fua::No
                };
                origin.write_at(&data, off, fua).unwrap();
                log.lock().push((off, data));
                acked[t as usize].fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // Snapshot writers: writer k owns snapshots k, k+2, k+4, k+6; writes land in region C.
    for k in 0..2usize {
        let snaps: Vec<_> = (k..8)
            .step_by(2)
            .map(|i| (snaps[i].clone(), snap_models[i].clone()))
            .collect();
        handles.push(thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ (100 + k as u64));
            for _ in 0..300 {
                let (s, model) = &snaps[rng.random_range(0..snaps.len())];
                let len = rng.random_range(1..=64u64) * 512;
                let off = C_START + rng.random_range(0..=(SIZE - C_START - len) / 512) * 512;
                let data = pattern(rng.random(), off, len);
                s.write_at(&data, off, Fua::No).unwrap();
                model.lock()[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }));
    }
    // Readers: regions A and B of every snapshot never change while origin writes run.
    let mut readers = Vec::new();
    for k in 0..2u64 {
        let (snaps, initial, done) = (snaps.clone(), initial.clone(), writers_done.clone());
        readers.push(thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ (200 + k));
            let mut reads = 0u64;
            while !done.load(Ordering::SeqCst) || reads < 50 {
                let s = &snaps[rng.random_range(0..snaps.len())];
                let len = rng.random_range(1..=128u64) * 512;
                let off = rng.random_range(0..=(C_START - len) / 512) * 512;
                let got = read(&**s, off, len);
                assert!(
                    got == initial[off as usize..(off + len) as usize],
                    "live read of a snapshot at {off}+{len} saw origin data written after it"
                );
                reads += 1;
            }
            reads
        }));
    }

    // Take a snapshot live, once the writers are well under way.
    wait_until(|| {
        acked
            .iter()
            .all(|a| a.load(Ordering::SeqCst) >= OPS_PER_WRITER / 3)
    });
    let acked_before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    let live = transient_snapshot(&origin, 2 * SIZE, cs(16));
    let live_views: Vec<Vec<u8>> = (0..WRITERS).map(|t| view(&*live, t)).collect();

    for h in handles {
        h.join().unwrap();
    }
    writers_done.store(true, Ordering::SeqCst);
    let total_reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    println!("stress: {total_reads} live snapshot reads checked");

    // Every snapshot, byte for byte.
    for (i, (s, m)) in snaps.iter().zip(&snap_models).enumerate() {
        assert!(
            read(&**s, 0, SIZE) == *m.lock(),
            "snapshot {i} differs from its model"
        );
        assert_eq!(s.exceptions().pending_count(), 0);
    }
    // The origin: initial data with every writer's log applied in order.
    let mut model = (*initial).clone();
    for log in &logs {
        for (off, data) in log.lock().iter() {
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
    }
    assert!(
        read(&*origin, 0, SIZE) == model,
        "origin differs from its model"
    );

    // The live snapshot: a consistent cut of each writer's history, unchanged since.
    for t in 0..WRITERS {
        assert_eq!(
            view(&*live, t),
            live_views[t as usize],
            "live snapshot changed"
        );
        let log = logs[t as usize].lock();
        let mut state = (*initial).clone();
        let mut found = None;
        for k in 0..=log.len() {
            if k > 0 {
                let (off, data) = &log[k - 1];
                state[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
            if k as u64 >= acked_before[t as usize] && project(&state, t) == live_views[t as usize]
            {
                found = Some(k);
                break;
            }
        }
        let k = found.unwrap_or_else(|| {
            panic!("live snapshot holds no prefix state of writer {t} (torn or missing write)")
        });
        println!(
            "writer {t}: live snapshot holds its first {k} writes ({} acknowledged before)",
            acked_before[t as usize]
        );
    }
}

/// The bytes of writer `t`'s ranges on `dev`, concatenated.
fn view(dev: &dyn BlockDevice, t: u64) -> Vec<u8> {
    owned_ranges(t)
        .into_iter()
        .flat_map(|(o, l)| read(dev, o, l))
        .collect()
}

/// The bytes of writer `t`'s ranges in a full image, concatenated.
fn project(image: &[u8], t: u64) -> Vec<u8> {
    owned_ranges(t)
        .into_iter()
        .flat_map(|(o, l)| image[o as usize..(o + l) as usize].to_vec())
        .collect()
}
