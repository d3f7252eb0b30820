//! Writes COW images with cowsnap for `scripts/kernel-check.sh`, which asks the real
//! kernel (shared/kernel-rig/check-cow.sh) to activate each and compares its status line
//! and snapshot sha256 with cowsnap's. The writer is `#[ignore]`d (it only runs when the
//! script asks, with `KERNEL_CHECK_OUT=DIR`); the cases themselves also run as a normal
//! test, which checks that each COW reopens in cowsnap with the recorded answers.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

mod kernel_fixtures;

use std::path::Path;
use std::sync::Arc;

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, Fua, MemDevice};
use cowsnap_core::exception::PersistentStore;
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::units::ChunkSize;
use kernel_fixtures::{pattern, sha256_dev};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ORIGIN_BYTES: u64 = 16 << 20;

struct Case {
    name: &'static str,
    chunk_sectors: u64,
    overflow: bool,
    cow_bytes: u64,
    /// (through the snapshot?, start sector, sectors)
    writes: Vec<(bool, u64, u64)>,
}

fn cases() -> Vec<Case> {
    let mut rng = StdRng::seed_from_u64(0x6b65726e);
    let sectors = ORIGIN_BYTES / 512;
    let mut random = |n: usize, max: u64| -> Vec<(bool, u64, u64)> {
        (0..n)
            .map(|_| {
                let s = rng.random_range(0..sectors - max);
                (rng.random_bool(0.3), s, rng.random_range(1..=max))
            })
            .collect()
    };
    vec![
        Case {
            name: "c4k-multiarea",
            chunk_sectors: 8,
            overflow: false,
            cow_bytes: 8 << 20,
            // 600 single-sector writes to distinct 4 KiB chunks: 3 metadata areas.
            writes: (0..600u64)
                .map(|i| (i % 5 == 0, i * 8 * 3 + (i % 8), 1))
                .collect(),
        },
        Case {
            name: "c8k-random",
            chunk_sectors: 16,
            overflow: false,
            cow_bytes: 8 << 20,
            writes: random(120, 40),
        },
        Case {
            name: "c64k-random",
            chunk_sectors: 128,
            overflow: false,
            cow_bytes: 16 << 20,
            writes: random(60, 300),
        },
        Case {
            name: "po8k-after-overflow",
            chunk_sectors: 16,
            overflow: true,
            // Header + area + 30 data chunks; snapshot writes go on after it is full.
            cow_bytes: 32 * 8192,
            writes: (0..40u64).map(|i| (true, i * 48 + 3, 2)).collect(),
        },
        Case {
            name: "p8k-invalid-after-origin-overflow",
            chunk_sectors: 16,
            overflow: false,
            cow_bytes: 32 * 8192,
            writes: (0..40u64).map(|i| (false, i * 48 + 3, 2)).collect(),
        },
    ]
}

/// Builds a case; returns (origin, cow, status on reopen, snapshot sha256 or "-").
fn build(case: &Case) -> (Arc<MemDevice>, Arc<MemDevice>, String, String) {
    let origin_dev = Arc::new(MemDevice::new(ORIGIN_BYTES));
    let step = 4096;
    for s in (0..ORIGIN_BYTES / 512).step_by(step) {
        origin_dev
            .write_at(&pattern("ORIGINAL", s, step as u64), s * 512, Fua::No)
            .unwrap();
    }
    let cow = Arc::new(MemDevice::new(case.cow_bytes));
    let cs = ChunkSize::from_sectors(case.chunk_sectors).unwrap();
    {
        let origin = Origin::new(origin_dev.clone(), Arc::new(Copier::default()));
        let store = Arc::new(PersistentStore::open(cow.clone(), Some(cs), case.overflow).unwrap());
        let snap = Snapshot::load(&origin, store).unwrap();
        origin.activate(&snap).unwrap();
        for (i, &(via_snap, start, n)) in case.writes.iter().enumerate() {
            let data = pattern(&format!("CK{i:06}"), start, n);
            let r = if via_snap {
                snap.write_at(&data, start * 512, Fua::No)
            } else {
                origin.write_at(&data, start * 512, Fua::No)
            };
            if !via_snap {
                r.unwrap();
            }
        }
        println!("{}: status while active: {}", case.name, snap.status());
    }
    // What a fresh activation shows: the kernel's check is compared with this.
    let origin = Origin::new(origin_dev.clone(), Arc::new(Copier::default()));
    let store = Arc::new(
        PersistentStore::open(
            Arc::new(MemDevice::from_bytes(&cow.to_vec())),
            Some(cs),
            case.overflow,
        )
        .unwrap(),
    );
    let snap = Snapshot::load(&origin, store).unwrap();
    origin.activate(&snap).unwrap();
    let status = snap.status().to_string();
    let sha = if snap.is_valid() {
        sha256_dev(&*snap).unwrap()
    } else {
        "-".into()
    };
    (origin_dev, cow, status, sha)
}

fn write_all(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut tsv = String::new();
    for case in cases() {
        let (origin, cow, status, sha) = build(&case);
        let d = dir.join(case.name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("origin.img"), origin.to_vec()).unwrap();
        std::fs::write(d.join("cow.img"), cow.to_vec()).unwrap();
        let store = if case.overflow { "PO" } else { "P" };
        tsv.push_str(&format!(
            "{}\t{}\t{store}\t{status}\t{sha}\n",
            case.name, case.chunk_sectors
        ));
    }
    std::fs::write(dir.join("cases.tsv"), tsv).unwrap();
}

#[test]
#[ignore = "run by scripts/kernel-check.sh with KERNEL_CHECK_OUT=DIR"]
fn write_cows_for_the_kernel_check() {
    let dir = std::env::var("KERNEL_CHECK_OUT").expect("KERNEL_CHECK_OUT=DIR");
    write_all(Path::new(&dir));
}

#[test]
fn kernel_check_cases_reopen_as_expected() {
    for case in cases() {
        let (_o, _c, status, sha) = build(&case);
        match case.name {
            "po8k-after-overflow" => assert_eq!(status, "512/512 32"),
            "p8k-invalid-after-origin-overflow" => {
                assert_eq!((status.as_str(), sha.as_str()), ("Invalid", "-"))
            }
            "c4k-multiarea" => {
                assert_eq!(status, format!("{}/16384 {}", (600 + 4) * 8, (2 + 2) * 8))
            }
            _ => assert!(
                !status.contains("Invalid") && sha.len() == 64,
                "{}: {status}",
                case.name
            ),
        }
    }
}
