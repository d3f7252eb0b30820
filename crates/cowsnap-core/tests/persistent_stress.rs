//! Concurrency on persistent stores: 4 origin writers and a snapshot writer against 8
//! persistent snapshots (commits of several stores run side by side), then every COW is
//! reopened from its metadata alone and must show the same view. Prints its seed.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::thread;

use common::*;
use cowsnap_core::dev::{BlockDevice, Fua, MemDevice};
use cowsnap_core::exception::persistent::PersistentStore;
use cowsnap_core::targets::{Origin, Snapshot};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 1024 * KIB;

#[test]
fn eight_persistent_snapshots_under_concurrent_writers_reload_identically() {
    let seed: u64 = std::env::var("COWSNAP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("persistent stress seed: {seed} (rerun with COWSNAP_SEED={seed})");
    let (origin, odev) = mem_origin(SIZE, seed);
    let initial = read(&*origin, 0, SIZE);
    let chunks = [8u64, 16, 8, 32, 8, 16, 64, 8];
    let cows: Vec<Arc<MemDevice>> = chunks
        .iter()
        .map(|_| Arc::new(MemDevice::new(2 * SIZE)))
        .collect();
    let snaps: Vec<Arc<Snapshot>> = chunks
        .iter()
        .zip(&cows)
        .map(|(&c, cow)| {
            let store = PersistentStore::open(cow.clone(), Some(cs(c)), false).unwrap();
            let snap = Snapshot::load(&origin, Arc::new(store)).unwrap();
            origin.activate(&snap).unwrap();
            snap
        })
        .collect();
    let models: Vec<Arc<Mutex<Vec<u8>>>> = snaps
        .iter()
        .map(|_| Arc::new(Mutex::new(initial.clone())))
        .collect();

    let mut handles = Vec::new();
    for t in 0..4u64 {
        let origin = origin.clone();
        handles.push(thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ t);
            // Each writer owns a quarter of the origin; chunks are shared by nothing else.
            let base = t * SIZE / 4;
            for _ in 0..150 {
                let len = rng.random_range(1..=40u64) * 512;
                let off = base + rng.random_range(0..=(SIZE / 4 - len) / 512) * 512;
                origin
                    .write_at(&pattern(rng.random(), off, len), off, Fua::No)
                    .unwrap();
            }
        }));
    }
    {
        let (snaps, models) = (snaps.clone(), models.clone());
        handles.push(thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ 99);
            for _ in 0..150 {
                let i = rng.random_range(0..snaps.len());
                let len = rng.random_range(1..=24u64) * 512;
                let off = rng.random_range(0..=(SIZE - len) / 512) * 512;
                let data = pattern(rng.random(), off, len);
                snaps[i].write_at(&data, off, Fua::No).unwrap();
                models[i].lock()[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    let final_origin = read(&*origin, 0, SIZE);
    for (i, s) in snaps.iter().enumerate() {
        assert!(
            read(&**s, 0, SIZE) == *models[i].lock(),
            "snapshot {i} differs"
        );
        assert!(s.is_valid(), "snapshot {i}: {:?}", s.invalid_reason());
    }
    // Reopen every COW from its bytes alone, against the final origin.
    let origin2 = Origin::new(
        Arc::new(MemDevice::from_bytes(&final_origin)),
        Default::default(),
    );
    drop(odev);
    for (i, cow) in cows.iter().enumerate() {
        let copy = Arc::new(MemDevice::from_bytes(&cow.to_vec()));
        let store = PersistentStore::open(copy, None, false).unwrap();
        let snap = Snapshot::load(&origin2, Arc::new(store)).unwrap();
        origin2.activate(&snap).unwrap();
        assert!(
            read(&*snap, 0, SIZE) == *models[i].lock(),
            "reloaded snapshot {i} differs"
        );
        assert_eq!(snap.status().to_string(), snaps[i].status().to_string());
    }
}
