//! Hostile COW images: random bytes, and kernel- and cowsnap-written COWs with random
//! corruption and truncation, fed to the store's loader, the snapshot loader and the
//! inspection tools. They must answer with errors, never panic, and give one verdict: the
//! loader refuses a COW with the first error `check` lists (same offset, same reason), and
//! accepts it exactly when `check` lists none.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

mod kernel_fixtures;

use std::sync::{Arc, OnceLock};

use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, MemDevice};
use cowsnap_core::exception::persistent::format::{encode_header, SNAP_MAGIC};
use cowsnap_core::exception::persistent::inspect;
use cowsnap_core::exception::{ExceptionStore, LoadOutcome, PersistentStore};
use cowsnap_core::targets::{Origin, Snapshot};
use cowsnap_core::units::ChunkSize;
use cowsnap_core::Error;
use proptest::prelude::*;

/// The first 340 chunks of the kernel's p8-multiarea COW: header, area 0 (full), area 1.
fn kernel_base() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut v = kernel_fixtures::Fixture::load("p8-multiarea").cow_bytes();
        v.truncate(340 * 4096);
        v
    })
}

/// Runs every reader over `img` and checks they agree; panics only on a real bug.
fn exercise(img: &[u8]) -> Result<(), TestCaseError> {
    let report = inspect::check(&MemDevice::from_bytes(img));
    let _ = inspect::dump(&MemDevice::from_bytes(img));
    let small_origin = MemDevice::new(1 << 20);
    let _ = inspect::export(
        &small_origin,
        &MemDevice::from_bytes(img),
        &MemDevice::new(1 << 20),
        &mut |_, _| {},
    );

    let cow = Arc::new(MemDevice::from_bytes(img));
    let store = match PersistentStore::open(cow.clone(), None, false) {
        Ok(s) => s,
        Err(e) => {
            prop_assert!(
                matches!(e, Error::Corrupt { .. }),
                "open: unexpected error kind {e:?}"
            );
            first_error_is(&report, &e)?;
            return Ok(());
        }
    };
    let fresh = store.is_fresh();
    let mut n = 0u64;
    match store.load(Default::default(), &mut |_, _| {
        n += 1;
        Ok(())
    }) {
        Ok(LoadOutcome::Valid) => {
            prop_assert!(
                !report.has_errors(),
                "load accepted what check refuses: {:?}",
                report.findings
            );
            prop_assert_eq!(n, report.exceptions);
            // Allocation continues past every loaded chunk, never onto metadata.
            if let Ok(c) = store.prepare(cowsnap_core::units::Chunk(0)) {
                prop_assert!(store.geometry().is_data_chunk(c));
            }
        }
        Ok(LoadOutcome::Invalid) => prop_assert_eq!(n, 0),
        Ok(LoadOutcome::Fresh) => prop_assert!(fresh),
        Err(e) => {
            prop_assert!(
                matches!(e, Error::Corrupt { .. } | Error::InvalidArgument(_)),
                "load: unexpected error kind {e:?}"
            );
            if matches!(e, Error::Corrupt { .. }) {
                first_error_is(&report, &e)?;
            }
        }
    }

    // The snapshot loader over a 64 MiB (sparse) origin.
    let origin = Origin::new(
        Arc::new(MemDevice::new(64 << 20)),
        Arc::new(Copier::default()),
    );
    if let Ok(store) = PersistentStore::open(Arc::new(MemDevice::from_bytes(img)), None, true) {
        if let Ok(snap) = Snapshot::load(&origin, Arc::new(store)) {
            origin.activate(&snap).unwrap();
            let mut buf = vec![0u8; 8192];
            for off in [0u64, 1 << 20, 32 << 20] {
                let _ = snap.read_at(&mut buf, off);
            }
            let _ = snap.status().to_string();
        }
    }
    Ok(())
}

/// `refusal` (a [`Error::Corrupt`]) is the first error of `report`.
fn first_error_is(report: &inspect::CheckReport, refusal: &Error) -> Result<(), TestCaseError> {
    let first = report
        .findings
        .iter()
        .find(|f| f.severity == inspect::Severity::Error);
    match (refusal, first) {
        (Error::Corrupt { offset, reason, .. }, Some(f)) => {
            prop_assert_eq!(
                f.offset,
                Some(*offset),
                "refused with {}, check: {:?}",
                refusal,
                f
            );
            prop_assert!(
                f.message.contains(reason.as_str()),
                "refused with {}, check: {:?}",
                refusal,
                f
            );
        }
        _ => prop_assert!(
            false,
            "refused with {refusal}, check's first error: {first:?}"
        ),
    }
    Ok(())
}

fn corrupt(base: &[u8], edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut v = base.to_vec();
    for &(at, b) in edits {
        let i = at % v.len();
        v[i] = b;
    }
    if let Some(c) = cut {
        v.truncate((c % (v.len() + 1)) / 512 * 512);
    }
    v
}

/// Offsets biased towards metadata: header, area 0 and area 1 of a 4 KiB-chunk COW.
fn meta_offset() -> impl Strategy<Value = usize> {
    prop_oneof![
        0usize..16,
        4096usize..8192,
        (258 * 4096usize)..(259 * 4096),
        0usize..(340 * 4096),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

    #[test]
    fn random_images_never_panic(
        size_sectors in 0usize..96,
        seed_bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        formatted in any::<bool>(),
        chunk_shift in 3u32..6,
        valid in 0u32..3,
    ) {
        let mut img = vec![0u8; size_sectors * 512];
        for (i, b) in img.iter_mut().enumerate() {
            *b = seed_bytes.get(i % seed_bytes.len().max(1)).copied().unwrap_or(0);
        }
        if formatted && img.len() >= 16 {
            let h = encode_header(valid != 0, ChunkSize::from_sectors(1 << chunk_shift).unwrap());
            img[..16].copy_from_slice(&h[..16]);
        }
        exercise(&img)?;
    }

    #[test]
    fn corrupted_kernel_cows_never_panic(
        edits in proptest::collection::vec((meta_offset(), any::<u8>()), 1..8),
        cut in proptest::option::of(0usize..(340 * 4096)),
    ) {
        exercise(&corrupt(kernel_base(), &edits, cut))?;
    }

    #[test]
    fn corrupted_entries_are_refused_with_their_offset(
        entry in 0usize..330,
        new in prop_oneof![Just(1u64), Just(258u64), 340u64..u64::MAX, 2u64..332],
    ) {
        // Point one entry of the kernel's table somewhere bad: metadata, past the end,
        // or another entry's chunk.
        let mut img = kernel_base().to_vec();
        let area = (entry / 256) as u64;
        let j = entry % 256;
        let at = ((1 + 257 * area) * 4096) as usize + j * 16 + 8;
        let orig = u64::from_le_bytes(img[at..at + 8].try_into().unwrap());
        prop_assume!(new != orig);
        img[at..at + 8].copy_from_slice(&new.to_le_bytes());
        let s = PersistentStore::open(Arc::new(MemDevice::from_bytes(&img)), None, false).unwrap();
        match s.load(Default::default(), &mut |_, _| Ok(())) {
            Err(e @ Error::Corrupt { offset, .. }) => {
                // The `new` field of the bad entry, or (for a duplicate) of the later entry
                // naming the same chunk.
                let named_at = offset as usize;
                prop_assert_eq!(named_at % 16, 8, "offset {} is not a `new` field", offset);
                let named = u64::from_le_bytes(img[named_at..named_at + 8].try_into().unwrap());
                prop_assert!(named_at == at || named == new, "offset {offset}, bad entry at {at}");
                first_error_is(&inspect::check(&MemDevice::from_bytes(&img)), &e)?;
            }
            r => prop_assert!(false, "entry {entry} -> {new} accepted: {r:?}"),
        }
    }
}

#[test]
fn the_kernel_base_itself_is_clean() {
    let base = kernel_base();
    assert_eq!(&base[..4], &SNAP_MAGIC.to_le_bytes());
    let r = inspect::check(&MemDevice::from_bytes(base));
    assert!(r.is_clean(), "{:?}", r.findings);
    assert_eq!(r.exceptions, 330);
}
