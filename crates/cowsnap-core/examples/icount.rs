//! One engine workload, for counting its instructions under callgrind (`bench/icount.sh`).
//!
//! Wall-clock numbers on a shared 2-core VM swing by tens of percent; instruction counts
//! of the same workload are repeatable to a fraction of a percent, so they compare two
//! versions of the engine. Everything runs in memory (persistent stores on memory devices),
//! single-threaded: what is counted is the engine's own work per operation, not the disk
//! and not the scheduler. Only [`measure`] is counted (`--toggle-collect`); setup is not.
//!
//! Usage: `icount WORKLOAD SNAPSHOTS OPS`, WORKLOAD one of `first-write`, `rewrite`,
//! `snap-read-hit`, `snap-read-miss`.

#![allow(
    clippy::cast_possible_truncation,
    reason = "workload sizes are small constants"
)]

use std::sync::Arc;

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, Fua, MemDevice};
use cowsnap_core::exception::persistent::PersistentStore;
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::units::ChunkSize;

const CHUNK: u64 = 4096;

#[derive(Clone, Copy)]
enum Workload {
    FirstWrite,
    Rewrite,
    SnapReadHit,
    SnapReadMiss,
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: icount first-write|rewrite|snap-read-hit|snap-read-miss SNAPSHOTS OPS";
    let [_, w, n, ops] = args.as_slice() else {
        return Err(usage.into());
    };
    let workload = match w.as_str() {
        "first-write" => Workload::FirstWrite,
        "rewrite" => Workload::Rewrite,
        "snap-read-hit" => Workload::SnapReadHit,
        "snap-read-miss" => Workload::SnapReadMiss,
        _ => return Err(usage.into()),
    };
    let snapshots: usize = n.parse().map_err(|_| usage.to_string())?;
    let ops: u64 = ops.parse().map_err(|_| usage.to_string())?;
    let needs_snapshot = matches!(workload, Workload::SnapReadHit | Workload::SnapReadMiss);
    if ops == 0 || (needs_snapshot && snapshots == 0) {
        return Err(format!(
            "{usage}\n(OPS > 0; the read workloads need a snapshot)"
        ));
    }
    let (origin, snaps) = setup(snapshots, ops).map_err(|e| e.to_string())?;
    let data = vec![0xA5u8; CHUNK as usize];
    if matches!(workload, Workload::Rewrite | Workload::SnapReadHit) {
        // Every chunk copied out once, so the measured operations find them remapped.
        for i in 0..ops {
            origin
                .write_at(&data, i * CHUNK, Fua::No)
                .map_err(|e| e.to_string())?;
        }
    }
    let done = measure(workload, &origin, snaps.first(), ops, &data);
    if done != ops {
        return Err(format!("only {done} of {ops} operations succeeded"));
    }
    println!("{ops} operations");
    Ok(())
}

/// The counted part: `ops` operations, one per chunk. Returns how many succeeded.
#[inline(never)]
fn measure(
    w: Workload,
    origin: &Origin,
    snap: Option<&Arc<Snapshot>>,
    ops: u64,
    data: &[u8],
) -> u64 {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut ok = 0;
    for i in 0..ops {
        let r = match (w, snap) {
            (Workload::FirstWrite | Workload::Rewrite, _) => {
                origin.write_at(data, i * CHUNK, Fua::No)
            }
            (_, Some(s)) => s.read_at(&mut buf, i * CHUNK),
            (_, None) => continue,
        };
        ok += u64::from(r.is_ok());
    }
    ok
}

/// An origin of `chunks` chunks with `snapshots` persistent snapshots (4 KiB chunks), every
/// page of every memory device touched first so page faults are not counted.
fn setup(snapshots: usize, chunks: u64) -> cowsnap_core::Result<(Arc<Origin>, Vec<Arc<Snapshot>>)> {
    let size = chunks * CHUNK;
    let dev = Arc::new(MemDevice::new(size));
    dev.write_at(&vec![0x5A; size as usize], 0, Fua::No)?;
    let origin = Origin::new(dev, Arc::new(Copier::default()));
    let cs = ChunkSize::from_bytes(CHUNK)
        .map_err(|e| cowsnap_core::Error::InvalidArgument(format!("chunk size: {e:?}")))?;
    // Data chunks plus one metadata area per 256 exceptions, and room to spare.
    let cow_size = (chunks + chunks / 200 + 16) * CHUNK;
    let mut snaps = Vec::with_capacity(snapshots);
    for _ in 0..snapshots {
        let cow = Arc::new(MemDevice::new(cow_size));
        cow.write_at(&vec![0u8; cow_size as usize], 0, Fua::No)?;
        let store = PersistentStore::open(cow, Some(cs), false)?;
        let snap = Snapshot::load(&origin, Arc::new(store))?;
        origin.activate(&snap)?;
        snaps.push(snap);
    }
    Ok((origin, snaps))
}
