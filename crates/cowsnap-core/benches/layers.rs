//! The cost of a layer (`cowsnap_core::layers`) on the hot path: a 4 KiB read and a 4 KiB
//! write on a `MemDevice` directly, then through `test-delay 0 0 0` (a pass-through that
//! must not sleep), an empty enabled `test-dust` (one lock and a bad-list lookup per
//! request), `linear` (an offset added) and `bbr` with an empty table (a tracked route
//! per chunk and an unreadable-list lookup per request), and 64 KiB requests (16 chunks of
//! `bbr`, one device request).
//!
//! Run: `cargo bench -p cowsnap-core --bench layers`.

#![allow(
    clippy::cast_possible_truncation,
    reason = "benchmark sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;

use cowsnap_core::dev::{BlockDevice, Fua, MemDevice};
use cowsnap_core::exception::persistent::format::TableKind;
use cowsnap_core::exception::PersistentStore;
use cowsnap_core::layers::LayerSpec;
use cowsnap_core::targets::bbr::Bbr;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BLOCK: u64 = 4096;
const SIZE: u64 = 16 << 20;

/// The devices compared: a name and the device requests go to.
fn devices() -> Vec<(&'static str, Arc<dyn BlockDevice>)> {
    let base: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(SIZE));
    // Pre-fault every page: the bench measures layers, not page allocation.
    base.write_at(&vec![0x5Au8; SIZE as usize], 0, Fua::No)
        .unwrap();
    let over = |line: &str| {
        LayerSpec::parse(line)
            .unwrap()
            .build(Arc::clone(&base))
            .unwrap()
            .as_device()
    };
    vec![
        ("mem", Arc::clone(&base)),
        ("delay_0", over("test-delay 0 0 0")),
        ("dust_empty", over("test-dust 1 0 enabled")),
        ("linear", over(&format!("linear 0 {}", SIZE / 512))),
        ("bbr_empty", bbr(&base)),
    ]
}

/// A `bbr` over `base` with an empty relocation table on a spare device in memory.
fn bbr(base: &Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> {
    let spares: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let store = PersistentStore::open_as(spares, None, false, TableKind::Relocation).unwrap();
    Bbr::in_memory(Arc::clone(base), Arc::new(store)).unwrap()
}

fn layers(c: &mut Criterion) {
    let devs = devices();
    for block in [BLOCK, 16 * BLOCK] {
        let blocks = SIZE / block;
        let kib = block / 1024;
        let mut g = c.benchmark_group(format!("layer_read_{kib}k"));
        g.throughput(Throughput::Bytes(block));
        for (name, dev) in &devs {
            let mut buf = vec![0u8; block as usize];
            let mut i = 0u64;
            g.bench_function(*name, |b| {
                b.iter(|| {
                    i = (i + 1) % blocks;
                    dev.read_at(black_box(&mut buf), i * block).unwrap();
                });
            });
        }
        g.finish();
        let mut g = c.benchmark_group(format!("layer_write_{kib}k"));
        g.throughput(Throughput::Bytes(block));
        for (name, dev) in &devs {
            let buf = vec![0xA5u8; block as usize];
            let mut i = 0u64;
            g.bench_function(*name, |b| {
                b.iter(|| {
                    i = (i + 1) % blocks;
                    dev.write_at(black_box(&buf), i * block, Fua::No).unwrap();
                });
            });
        }
        g.finish();
    }
}

criterion_group!(benches, layers);
criterion_main!(benches);
