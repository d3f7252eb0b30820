//! Fuzzes the persistent metadata loader: the input is a COW image (its first byte picks
//! a chunk size to ask for and whether to force a valid header). Opening, loading, the
//! snapshot loader and the inspection tools must return errors, never panic.
//!
//! Run with `cargo +nightly fuzz run load_metadata` from this directory.

#![no_main]

use std::sync::Arc;

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, MemDevice};
use cowsnap_core::exception::persistent::{format, inspect};
use cowsnap_core::exception::{ExceptionStore, PersistentStore};
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::units::ChunkSize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut img = rest.to_vec();
    let chunk = ChunkSize::from_sectors(8 << (ctl & 3)).ok();
    if ctl & 4 != 0 && img.len() >= 16 {
        if let Some(cs) = chunk {
            img[..16].copy_from_slice(&format::encode_header(ctl & 8 != 0, cs)[..16]);
        }
    }
    let _ = inspect::check(&MemDevice::from_bytes(&img));
    let _ = inspect::dump(&MemDevice::from_bytes(&img));
    let _ = inspect::export(
        &MemDevice::new(1 << 20),
        &MemDevice::from_bytes(&img),
        &MemDevice::new(1 << 20),
        &mut |_, _| {},
    );
    let cow = Arc::new(MemDevice::from_bytes(&img));
    if let Ok(store) = PersistentStore::open(cow, chunk, ctl & 16 != 0) {
        let store = Arc::new(store);
        let origin = Origin::new(
            Arc::new(MemDevice::new(64 << 20)),
            Arc::new(Copier::default()),
        );
        if let Ok(snap) = Snapshot::load(&origin, store.clone()) {
            let _ = origin.activate(&snap);
            let mut buf = [0u8; 4096];
            let _ = snap.read_at(&mut buf, 0);
            let _ = store.prepare(cowsnap_core::units::Chunk(1));
            let _ = snap.status().to_string();
        }
    }
});
