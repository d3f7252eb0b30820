//! Group commit of the persistent store under concurrency: 16 threads make 1000 first
//! writes to distinct origin chunks through `Origin`; the store commits them in
//! allocation order with far fewer metadata area writes than exceptions. Prints the
//! number of area writes per 1000 concurrent first writes, on memory and on files.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, FileDevice, Fua, MemDevice};
use cowsnap_core::exception::persistent::format::Geometry;
use cowsnap_core::exception::PersistentStore;
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::units::{Chunk, ChunkSize};

const THREADS: u64 = 16;
const WRITES: u64 = 1000;
const CHUNK: u64 = 4096;

fn first_writes(origin_dev: Arc<dyn BlockDevice>, cow: Arc<dyn BlockDevice>, what: &str) -> u64 {
    let before: Vec<u8> = {
        let mut b = vec![0u8; origin_dev.size() as usize];
        origin_dev.read_at(&mut b, 0).unwrap();
        b
    };
    let origin = Origin::new(origin_dev.clone(), Arc::new(Copier::default()));
    let cs = ChunkSize::from_bytes(CHUNK).unwrap();
    let store = Arc::new(PersistentStore::open(cow.clone(), Some(cs), false).unwrap());
    let snap = Snapshot::load(&origin, store.clone()).unwrap();
    origin.activate(&snap).unwrap();
    std::thread::scope(|sc| {
        for t in 0..THREADS {
            let origin = &origin;
            sc.spawn(move || {
                let mut c = t;
                while c < WRITES {
                    origin
                        .write_at(&[0xAB; 512], c * CHUNK + 512, Fua::No)
                        .unwrap();
                    c += THREADS;
                }
            });
        }
    });
    let st = store.stats();
    println!(
        "{what}: {} area writes, {} group commits, {} flushes for {} concurrent first writes ({THREADS} threads); {:.1} exceptions per area write",
        st.area_writes,
        st.group_commits,
        st.flushes,
        st.exceptions_committed,
        st.exceptions_committed as f64 / st.area_writes as f64
    );
    assert_eq!(st.exceptions_committed, WRITES);
    // 1000 entries over 256-entry areas: at most 3 extra writes for the area crossings.
    assert!(st.area_writes <= WRITES + 3);
    assert!(st.group_commits <= st.area_writes);
    assert_eq!(
        snap.status().to_string(),
        format!(
            "{}/{} {}",
            (WRITES + 2 + 3) * 8,
            cow.size() / 512,
            (3 + 2) * 8
        )
    );
    drop((snap, origin));

    // Reopen: the table is dense in allocation order and the snapshot shows the origin
    // as it was before the writes.
    let origin = Origin::new(origin_dev, Arc::new(Copier::default()));
    let store = Arc::new(PersistentStore::open(cow, None, false).unwrap());
    let mut news = Vec::new();
    let snap = Snapshot::load(&origin, store.clone()).unwrap();
    news.extend(snap.exceptions().table().unwrap().iter().map(|e| e.new.0));
    news.sort_unstable();
    let geo = Geometry::new(cs);
    let want: Vec<u64> = (2..)
        .filter(|&c| geo.is_data_chunk(Chunk(c)))
        .take(WRITES as usize)
        .collect();
    assert_eq!(news, want);
    origin.activate(&snap).unwrap();
    let mut view = vec![0u8; snap.size() as usize];
    snap.read_at(&mut view, 0).unwrap();
    assert!(view == before, "{what}: snapshot view changed");
    st.area_writes
}

fn pattern(size: u64) -> Vec<u8> {
    (0..size).map(|i| (i / 512 % 251) as u8).collect()
}

#[test]
fn group_commit_on_memory_devices() {
    let origin = Arc::new(MemDevice::from_bytes(&pattern(WRITES * CHUNK)));
    let cow = Arc::new(MemDevice::new(8 << 20));
    first_writes(origin, cow, "memory devices");
}

#[test]
fn group_commit_on_files_with_fdatasync() {
    let dir = cowsnap_core::testkit::scratch("group");
    let op = dir.join("origin.img");
    std::fs::write(&op, pattern(WRITES * CHUNK)).unwrap();
    let origin = Arc::new(FileDevice::open(&op).unwrap());
    let cow = Arc::new(FileDevice::create(dir.join("cow.img"), 8 << 20).unwrap());
    let writes = first_writes(origin, cow, "files (fdatasync)");
    assert!(
        writes < WRITES,
        "with real flushes, commits must be grouped"
    );
}
