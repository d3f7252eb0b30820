//! Helpers shared by the engine's integration tests: building origins and snapshots over
//! memory, gated and counting devices, and data patterns.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, FaultyDevice, Fua, GatedDevice, MemDevice};
use cowsnap_core::exception::TransientStore;
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::units::ChunkSize;

pub const KIB: u64 = 1024;

/// A chunk size from sectors.
pub fn cs(sectors: u64) -> ChunkSize {
    ChunkSize::from_sectors(sectors).unwrap()
}

/// Bytes `len` long, deterministic in `seed`, differing per 512-byte sector.
pub fn pattern(seed: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize);
    for s in 0..len / 512 {
        let sector = offset / 512 + s;
        let mut x = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(sector.wrapping_mul(0xD1B5_4A32_D192_ED03))
            | 1;
        for _ in 0..64 {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
    }
    v
}

/// An origin over a memory device filled with pattern `seed`.
pub fn mem_origin(size: u64, seed: u64) -> (Arc<Origin>, Arc<MemDevice>) {
    let dev = Arc::new(MemDevice::new(size));
    dev.write_at(&pattern(seed, 0, size), 0, Fua::No).unwrap();
    (Origin::new(dev.clone(), Arc::new(Copier::default())), dev)
}

/// A transient snapshot of `origin` on a fresh memory COW of `cow_size` bytes, activated.
pub fn transient_snapshot(origin: &Origin, cow_size: u64, chunk: ChunkSize) -> Arc<Snapshot> {
    let cow: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(cow_size));
    snapshot_on(origin, cow, chunk)
}

/// A transient snapshot of `origin` on `cow`, activated.
pub fn snapshot_on(origin: &Origin, cow: Arc<dyn BlockDevice>, chunk: ChunkSize) -> Arc<Snapshot> {
    let store = Arc::new(TransientStore::new(cow, chunk));
    let snap = Snapshot::load(origin, store).unwrap();
    origin.activate(&snap).unwrap();
    snap
}

/// A gated, counting device over a memory device filled with `seed`.
pub fn gated_mem(size: u64, seed: u64) -> (Arc<GatedDevice>, Arc<FaultyDevice>) {
    let mem = Arc::new(MemDevice::new(size));
    mem.write_at(&pattern(seed, 0, size), 0, Fua::No).unwrap();
    let counting = Arc::new(FaultyDevice::new(mem));
    (Arc::new(GatedDevice::new(counting.clone())), counting)
}

/// Reads `len` bytes at `offset` of `dev`.
pub fn read(dev: &dyn BlockDevice, offset: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    dev.read_at(&mut b, offset).unwrap();
    b
}

/// Waits (yielding) until `cond` holds. Used only to observe that another thread reached
/// a blocking point; never to assert timing.
pub fn wait_until(mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "condition not reached in 60 s: deadlock?"
        );
        std::thread::yield_now();
    }
}
