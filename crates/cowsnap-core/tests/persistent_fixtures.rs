//! The persistent store against COW devices written by the Linux kernel (6.1,
//! dm-snapshot v1.16.0) in `shared/kernel-rig/fixtures`: every persistent fixture opens
//! with the kernel's snapshot sha256 and status line, the bad-magic one is refused, and
//! replaying each case's writes through cowsnap produces the kernel's COW byte for byte.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

mod kernel_fixtures;

use std::collections::BTreeSet;
use std::sync::Arc;

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, FileDevice, Fua, MemDevice};
use cowsnap_core::exception::{ExceptionStore, LoadOutcome, PersistentStore};
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::units::ChunkSize;
use cowsnap_core::Error;
use kernel_fixtures::{all_cases, sha256, sha256_dev, Fixture};

/// Every persistent case this file checks; a new fixture must be added here.
const PERSISTENT_CASES: &[&str] = &[
    "p16-basic",
    "p8-basic",
    "p8-multiarea",
    "p16-overflow-origin",
    "p16-overflow-snapwrite",
    "po16-overflow-snapwrite",
    "p16-merge",
    "p16-badmagic",
];

struct Opened {
    origin: Arc<Origin>,
    snap: Arc<Snapshot>,
    store: Arc<PersistentStore>,
}

fn open(
    origin_dev: Arc<dyn BlockDevice>,
    cow: Arc<dyn BlockDevice>,
    requested: Option<ChunkSize>,
    overflow: bool,
) -> Result<Opened, Error> {
    let origin = Origin::new(origin_dev, Arc::new(Copier::default()));
    let store = Arc::new(PersistentStore::open(cow, requested, overflow)?);
    let snap = Snapshot::load(&origin, store.clone())?;
    origin.activate(&snap)?;
    Ok(Opened {
        origin,
        snap,
        store,
    })
}

fn chunk(sectors: u64) -> ChunkSize {
    ChunkSize::from_sectors(sectors).unwrap()
}

/// The status and snapshot sha256 the kernel reported when it activated this COW anew.
fn kernel_reactivation(fx: &Fixture) -> (String, Option<String>) {
    let fresh = &fx.manifest["verify_fresh_boot"]["results"];
    if let Some(st) = fresh["status.final"].as_str() {
        let sha = fresh["sha.snap"]
            .as_str()
            .filter(|s| !s.starts_with("ERROR"))
            .map(str::to_string);
        return (kernel_fixtures::strip_status(st), sha);
    }
    // The merge case: reloaded in the same boot; the view is the merged origin.
    (
        fx.status("reload.status"),
        Some(fx.expected("origin_after_merge_sha256")),
    )
}

/// Opens a fixture's COW over its rebuilt origin and checks it against the kernel.
fn check_fixture(name: &str) {
    let fx = Fixture::load(name);
    let cow_bytes = fx.cow_bytes();
    assert_eq!(
        sha256(&cow_bytes),
        fx.manifest["files"]["cow.img.gz"]["uncompressed_sha256"]
            .as_str()
            .unwrap(),
        "{name}: the fixture's COW image itself"
    );
    let origin = fx.image("final");
    let want_origin = if fx.manifest["merged_from"].is_string() {
        fx.expected("origin_after_merge_sha256")
    } else {
        fx.expected("origin_final_sha256")
    };
    assert_eq!(
        sha256_dev(&*origin).unwrap(),
        want_origin,
        "{name}: rebuilt origin"
    );

    let overflow = fx.manifest["store"] == "PO";
    let cow = Arc::new(MemDevice::from_bytes(&cow_bytes));
    let o = open(
        origin,
        cow.clone(),
        Some(chunk(fx.chunk_sectors())),
        overflow,
    )
    .unwrap_or_else(|e| panic!("{name}: open: {e}"));
    let (want_status, want_sha) = kernel_reactivation(&fx);
    assert_eq!(o.snap.status().to_string(), want_status, "{name}: status");
    assert_eq!(
        o.snap.store().kind().to_string(),
        fx.manifest["store"].as_str().unwrap()
    );
    match want_sha {
        Some(sha) => assert_eq!(sha256_dev(&*o.snap).unwrap(), sha, "{name}: snapshot view"),
        None => {
            let mut b = vec![0u8; 512];
            let e = o.snap.read_at(&mut b, 0).unwrap_err();
            assert!(
                matches!(e, Error::Invalid(_)),
                "{name}: reads of an invalid snapshot: {e}"
            );
            assert_eq!(e.errno(), cowsnap_core::error::EIO);
        }
    }

    // The exception table, in on-disk order, is the one the host parsed from the image
    // (an invalid COW loads none, as in the kernel).
    let mut got = Vec::new();
    let again =
        PersistentStore::open(Arc::new(MemDevice::from_bytes(&cow_bytes)), None, false).unwrap();
    let outcome = again
        .load(Default::default(), &mut |_, e| {
            got.push((e.old.0, e.new.0));
            Ok(())
        })
        .unwrap();
    if fx.manifest["cow"]["valid"] == 1 {
        assert_eq!(outcome, LoadOutcome::Valid);
        assert_eq!(got, fx.exceptions(), "{name}: exception table");
        assert_eq!(
            o.snap.exceptions().completed_count(),
            fx.exceptions().len() as u64
        );
    } else {
        assert_eq!(outcome, LoadOutcome::Invalid);
        assert!(got.is_empty());
    }
    // Opening changes nothing on a valid or invalid COW.
    assert_eq!(
        sha256(&cow.to_vec()),
        sha256(&cow_bytes),
        "{name}: COW untouched"
    );
    drop(o.origin);
}

#[test]
fn every_persistent_fixture_is_checked_here() {
    let listed: BTreeSet<String> = all_cases()
        .into_iter()
        .filter(|(_, store)| store.starts_with('P'))
        .map(|(n, _)| n)
        .collect();
    let ours: BTreeSet<String> = PERSISTENT_CASES.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        listed, ours,
        "a persistent fixture is not covered by this file"
    );
}

#[test]
fn p16_basic_matches_the_kernel() {
    check_fixture("p16-basic");
}

#[test]
fn p8_basic_matches_the_kernel() {
    check_fixture("p8-basic");
}

#[test]
fn p8_multiarea_matches_the_kernel() {
    check_fixture("p8-multiarea");
    let fx = Fixture::load("p8-multiarea");
    assert_eq!(
        fx.manifest["cow"]["metadata_area_chunks"],
        serde_json::json!([1, 258])
    );
}

#[test]
fn p16_overflow_origin_is_invalid() {
    check_fixture("p16-overflow-origin");
}

#[test]
fn p16_overflow_snapwrite_is_invalid() {
    check_fixture("p16-overflow-snapwrite");
}

#[test]
fn po16_reopens_full_and_overflows_on_the_next_snapshot_write() {
    check_fixture("po16-overflow-snapwrite");
    let fx = Fixture::load("po16-overflow-snapwrite");
    let cow = Arc::new(MemDevice::from_bytes(&fx.cow_bytes()));
    let o = open(fx.image("final"), cow.clone(), Some(chunk(16)), true).unwrap();
    assert_eq!(o.snap.status().to_string(), "512/512 32");
    // The kernel's op 30: one sector into a chunk with no exception.
    let op = &fx.ops()[30];
    assert!(!op.expect_ok);
    let e = o
        .snap
        .write_at(&op.data(), op.start * 512, Fua::No)
        .unwrap_err();
    assert!(matches!(e, Error::Overflow), "{e}");
    assert_eq!(
        o.snap.status().to_string(),
        op.status_after.clone().unwrap()
    );
    assert_eq!(o.snap.status().to_string(), "Overflow");
    // Reads keep working; the header stays valid on disk.
    assert_eq!(
        sha256_dev(&*o.snap).unwrap(),
        fx.expected("snapshot_view_sha256")
    );
    assert_eq!(cow.to_vec()[4], 1);
}

#[test]
fn p16_merge_result_is_an_empty_valid_snapshot() {
    check_fixture("p16-merge");
}

#[test]
fn p16_badmagic_is_refused_naming_the_file_and_offset() {
    let fx = Fixture::load("p16-badmagic");
    let dir = cowsnap_core::testkit::scratch("fixtures-badmagic");
    let path = dir.join("cow.img");
    std::fs::write(&path, fx.cow_bytes()).unwrap();
    let cow = Arc::new(FileDevice::open(&path).unwrap());
    let err = PersistentStore::open(cow, Some(chunk(16)), false).unwrap_err();
    match &err {
        Error::Corrupt { device, offset, .. } => {
            assert_eq!(device, &path.display().to_string());
            assert_eq!(*offset, 0);
        }
        e => panic!("expected Corrupt, got {e:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("magic") && msg.contains("cow.img"), "{msg}");
    assert_eq!(err.errno(), cowsnap_core::error::EIO);
}

#[test]
fn the_header_chunk_size_overrides_the_table() {
    // The kernel's "snapoc" check: p16-basic activated with a table chunk size of 8.
    let fx = Fixture::load("p16-basic");
    let cow = Arc::new(MemDevice::from_bytes(&fx.cow_bytes()));
    let o = open(fx.image("final"), cow, Some(chunk(8)), false).unwrap();
    assert_eq!(o.store.chunk_size(), chunk(16));
    assert_eq!(o.store.overridden_chunk_size(), Some(chunk(8)));
    let fresh = &fx.manifest["verify_fresh_boot"]["results"];
    assert_eq!(
        o.snap.status().to_string(),
        kernel_fixtures::strip_status(fresh["status.snapoc"].as_str().unwrap())
    );
    assert_eq!(
        sha256_dev(&*o.snap).unwrap(),
        fresh["sha.snapoc"].as_str().unwrap()
    );
}

/// Replays a case's writes through cowsnap on a zeroed COW and checks every status line,
/// the origin, the snapshot view, and the COW image byte for byte against the kernel's;
/// then reopens the COW cowsnap wrote and checks it again.
fn replay(name: &str) {
    let fx = Fixture::load(name);
    let overflow = fx.manifest["store"] == "PO";
    let cow_size = fx.manifest["cow_bytes"].as_u64().unwrap();
    let origin_dev = fx.image("initial");
    let cow = Arc::new(MemDevice::new(cow_size));
    let o = open(
        origin_dev.clone(),
        cow.clone(),
        Some(chunk(fx.chunk_sectors())),
        overflow,
    )
    .unwrap();
    assert_eq!(o.snap.status().to_string(), fx.status("status.initial"));
    for (i, op) in fx.ops().iter().enumerate() {
        let data = op.data();
        let r = match op.target.as_str() {
            "origin" => o.origin.write_at(&data, op.start * 512, Fua::No),
            "snap" => o.snap.write_at(&data, op.start * 512, Fua::No),
            t => panic!("unknown target {t}"),
        };
        assert_eq!(r.is_ok(), op.expect_ok, "{name} op {i} ({op:?}): {r:?}");
        assert_eq!(
            Some(o.snap.status().to_string()),
            op.status_after,
            "{name}: status after op {i}"
        );
    }
    assert_eq!(o.snap.status().to_string(), fx.status("status.final"));
    assert_eq!(
        sha256_dev(&*origin_dev).unwrap(),
        fx.expected("origin_final_sha256"),
        "{name}: origin"
    );
    if o.snap.is_valid() {
        assert_eq!(
            sha256_dev(&*o.snap).unwrap(),
            fx.expected("snapshot_view_sha256"),
            "{name}: snapshot view"
        );
    }
    let ours = cow.to_vec();
    let kernel = fx.cow_bytes();
    let table = |img: &[u8]| {
        let mut v = Vec::new();
        let s = PersistentStore::open(Arc::new(MemDevice::from_bytes(img)), None, false).unwrap();
        let outcome = s
            .load(Default::default(), &mut |_, e| {
                v.push((e.old.0, e.new.0));
                Ok(())
            })
            .unwrap();
        (outcome, v, s.usage())
    };
    assert_eq!(table(&ours), table(&kernel), "{name}: exception tables");
    assert_eq!(
        sha256(&ours),
        fx.expected("cow_image_sha256"),
        "{name}: COW image differs from the kernel's"
    );
    drop(o);

    // Round trip: cowsnap's COW reopens with the kernel's status and view.
    let re = open(
        origin_dev,
        Arc::new(MemDevice::from_bytes(&ours)),
        Some(chunk(fx.chunk_sectors())),
        overflow,
    )
    .unwrap();
    let (want_status, want_sha) = kernel_reactivation(&fx);
    assert_eq!(
        re.snap.status().to_string(),
        want_status,
        "{name}: reopened"
    );
    if let Some(sha) = want_sha {
        assert_eq!(sha256_dev(&*re.snap).unwrap(), sha);
    }
}

#[test]
fn replay_p16_basic_is_byte_identical() {
    replay("p16-basic");
}

#[test]
fn replay_p8_basic_is_byte_identical() {
    replay("p8-basic");
}

#[test]
fn replay_p8_multiarea_is_byte_identical() {
    replay("p8-multiarea");
}

#[test]
fn replay_p16_overflow_origin_is_byte_identical() {
    replay("p16-overflow-origin");
}

#[test]
fn replay_p16_overflow_snapwrite_is_byte_identical() {
    replay("p16-overflow-snapwrite");
}

#[test]
fn replay_po16_overflow_snapwrite_is_byte_identical() {
    replay("po16-overflow-snapwrite");
}
