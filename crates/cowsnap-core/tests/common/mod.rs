//! Helpers shared by the engine's integration tests: building origins and snapshots over
//! memory, gated and counting devices. Seeds, data patterns and scratch dirs come from
//! `cowsnap_core::testkit`.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::sync::Arc;

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, FaultyDevice, Fua, GatedDevice, MemDevice};
use cowsnap_core::exception::TransientStore;
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::units::ChunkSize;

pub use cowsnap_core::testkit::{pattern, scratch, seed, wait_for, wait_until};

pub const KIB: u64 = 1024;

/// A chunk size from sectors.
pub fn cs(sectors: u64) -> ChunkSize {
    ChunkSize::from_sectors(sectors).unwrap()
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
