//! In-memory engine benchmarks: the cost of the snapshot machinery itself, without disks.
//!
//! * `origin_first_write/N`: a 4 KiB origin write into a chunk never written since N
//!   snapshots were activated (the copy-out path); the number to watch is the cost per
//!   extra snapshot;
//! * `origin_rewrite/N`: the same write into a chunk every snapshot has already copied;
//! * `snapshot_read/hit` (chunk on the COW) and `snapshot_read/miss` (chunk still on the
//!   origin, tracked).
//!
//! Run: `cargo bench -p cowsnap-core --bench engine`.

#![allow(
    clippy::cast_possible_truncation,
    reason = "benchmark sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, Fua, MemDevice};
use cowsnap_core::exception::TransientStore;
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::units::ChunkSize;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const CHUNK: u64 = 4096;
const CHUNKS_PER_BATCH: u64 = 256;

fn setup(snapshots: usize, chunks: u64) -> (Arc<Origin>, Vec<Arc<Snapshot>>) {
    let size = chunks * CHUNK;
    let dev = Arc::new(MemDevice::new(size));
    dev.write_at(&vec![0x5A; size as usize], 0, Fua::No)
        .unwrap();
    let origin = Origin::new(dev, Arc::new(Copier::default()));
    let cs = ChunkSize::from_bytes(CHUNK).unwrap();
    let snaps = (0..snapshots)
        .map(|_| {
            let cow = Arc::new(MemDevice::new(size));
            // Pre-fault the COW's pages: the bench measures the engine, not page faults.
            cow.write_at(&vec![0u8; size as usize], 0, Fua::No).unwrap();
            let snap = Snapshot::load(&origin, Arc::new(TransientStore::new(cow, cs))).unwrap();
            origin.activate(&snap).unwrap();
            snap
        })
        .collect();
    (origin, snaps)
}

fn origin_writes(c: &mut Criterion) {
    let data = vec![0xA5u8; CHUNK as usize];
    let mut g = c.benchmark_group("origin_first_write");
    g.throughput(Throughput::Elements(CHUNKS_PER_BATCH));
    for n in [0usize, 1, 2, 8, 16] {
        g.bench_function(n.to_string(), |b| {
            b.iter_batched_ref(
                || setup(n, CHUNKS_PER_BATCH),
                |(origin, _)| {
                    for i in 0..CHUNKS_PER_BATCH {
                        origin.write_at(&data, i * CHUNK, Fua::No).unwrap();
                    }
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();

    let mut g = c.benchmark_group("origin_rewrite");
    g.throughput(Throughput::Elements(1));
    for n in [0usize, 1, 8] {
        let (origin, _snaps) = setup(n, 64);
        origin.write_at(&data, 0, Fua::No).unwrap();
        g.bench_function(n.to_string(), |b| {
            b.iter(|| origin.write_at(black_box(&data), 0, Fua::No).unwrap())
        });
    }
    g.finish();
}

fn snapshot_reads(c: &mut Criterion) {
    let (origin, snaps) = setup(1, 64);
    origin.write_at(&[1u8; 4096], 0, Fua::No).unwrap();
    let snap = &snaps[0];
    let mut buf = vec![0u8; CHUNK as usize];
    let mut g = c.benchmark_group("snapshot_read");
    g.throughput(Throughput::Elements(1));
    g.bench_function("hit", |b| {
        b.iter(|| snap.read_at(black_box(&mut buf), 0).unwrap())
    });
    g.bench_function("miss", |b| {
        b.iter(|| snap.read_at(black_box(&mut buf), 8 * CHUNK).unwrap())
    });
    g.finish();
}

criterion_group!(benches, origin_writes, snapshot_reads);
criterion_main!(benches);
