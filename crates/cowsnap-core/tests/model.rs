//! Model-based property test: random sequences of origin writes (unaligned, multi-chunk),
//! write-zeroes and discards, snapshot writes, snapshot creation and removal at random
//! points, and reads, checked against a reference in which each snapshot's expected
//! content forks from the origin's when it is created.
//!
//! The seed is printed; rerun a failure with `COWSNAP_SEED=<seed>`. The case count is
//! fixed (`COWSNAP_MODEL_CASES`, default 96) so CI time is predictable.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use cowsnap_core::dev::{BlockDevice, Fua, MemDevice};
use cowsnap_core::exception::TransientStore;
use cowsnap_core::targets::{Origin, Snapshot};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

const ORIGIN_SECTORS: u64 = 320; // 160 KiB: not a multiple of the larger chunk sizes.
const MAX_LEN_SECTORS: u64 = 80;

#[derive(Clone, Debug)]
enum Op {
    OriginWrite {
        sector: u64,
        len: u64,
        seed: u64,
    },
    OriginZeroes {
        sector: u64,
        len: u64,
    },
    OriginDiscard {
        sector: u64,
        len: u64,
    },
    SnapWrite {
        snap: Index,
        sector: u64,
        len: u64,
        seed: u64,
    },
    SnapZeroes {
        snap: Index,
        sector: u64,
        len: u64,
    },
    Read {
        dev: Index,
        sector: u64,
        len: u64,
    },
    Create {
        chunk_sectors: u64,
    },
    Remove {
        snap: Index,
    },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..ORIGIN_SECTORS, 1..=MAX_LEN_SECTORS).prop_map(|(s, l)| (s, l.min(ORIGIN_SECTORS - s)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u64>()).prop_map(|((sector, len), seed)| Op::OriginWrite { sector, len, seed }),
        1 => range().prop_map(|(sector, len)| Op::OriginZeroes { sector, len }),
        1 => range().prop_map(|(sector, len)| Op::OriginDiscard { sector, len }),
        4 => (any::<Index>(), range(), any::<u64>())
            .prop_map(|(snap, (sector, len), seed)| Op::SnapWrite { snap, sector, len, seed }),
        1 => (any::<Index>(), range()).prop_map(|(snap, (sector, len))| Op::SnapZeroes { snap, sector, len }),
        4 => (any::<Index>(), range()).prop_map(|(dev, (sector, len))| Op::Read { dev, sector, len }),
        2 => prop_oneof![Just(8u64), Just(16), Just(64), Just(128)]
            .prop_map(|chunk_sectors| Op::Create { chunk_sectors }),
        1 => any::<Index>().prop_map(|snap| Op::Remove { snap }),
    ]
}

struct World {
    origin: Arc<Origin>,
    model_origin: Vec<u8>,
    snaps: Vec<(Arc<Snapshot>, Vec<u8>)>,
}

impl World {
    fn new() -> Self {
        let size = ORIGIN_SECTORS * 512;
        let (origin, _) = mem_origin(size, 42);
        let model_origin = read(&*origin, 0, size);
        World {
            origin,
            model_origin,
            snaps: Vec::new(),
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let span = |s: u64, l: u64| (s * 512) as usize..((s + l) * 512) as usize;
        match *op {
            Op::OriginWrite { sector, len, seed } => {
                let data = pattern(seed, sector * 512, len * 512);
                self.origin.write_at(&data, sector * 512, Fua::No).unwrap();
                self.model_origin[span(sector, len)].copy_from_slice(&data);
            }
            Op::OriginZeroes { sector, len } => {
                self.origin
                    .write_zeroes(sector * 512, len * 512, Fua::No)
                    .unwrap();
                self.model_origin[span(sector, len)].fill(0);
            }
            Op::OriginDiscard { sector, len } => {
                // A memory origin reads zeros after a discard.
                self.origin.discard(sector * 512, len * 512).unwrap();
                self.model_origin[span(sector, len)].fill(0);
            }
            Op::SnapWrite {
                snap,
                sector,
                len,
                seed,
            } => {
                if self.snaps.is_empty() {
                    return Ok(());
                }
                let n = self.snaps.len();
                let (s, model) = &mut self.snaps[snap.index(n)];
                let data = pattern(seed ^ 0xABCD, sector * 512, len * 512);
                s.write_at(&data, sector * 512, Fua::No).unwrap();
                model[span(sector, len)].copy_from_slice(&data);
            }
            Op::SnapZeroes { snap, sector, len } => {
                if self.snaps.is_empty() {
                    return Ok(());
                }
                let n = self.snaps.len();
                let (s, model) = &mut self.snaps[snap.index(n)];
                s.write_zeroes(sector * 512, len * 512, Fua::No).unwrap();
                model[span(sector, len)].fill(0);
            }
            Op::Read { dev, sector, len } => {
                let i = dev.index(self.snaps.len() + 1);
                let (d, model): (&dyn BlockDevice, &Vec<u8>) = if i == 0 {
                    (&*self.origin, &self.model_origin)
                } else {
                    let (s, m) = &self.snaps[i - 1];
                    (&**s, m)
                };
                let got = read(d, sector * 512, len * 512);
                prop_assert!(
                    got == model[span(sector, len)],
                    "read of device {i} sectors {sector}+{len} differs from the model"
                );
            }
            Op::Create { chunk_sectors } => {
                // A COW large enough for every chunk: overflow is tested elsewhere.
                let cow = Arc::new(MemDevice::new(2 * ORIGIN_SECTORS * 512 + 128 * 512));
                let store = Arc::new(TransientStore::new(cow, cs(chunk_sectors)));
                let snap = Snapshot::load(&self.origin, store).unwrap();
                self.origin.activate(&snap).unwrap();
                self.snaps.push((snap, self.model_origin.clone()));
            }
            Op::Remove { snap } => {
                if self.snaps.is_empty() {
                    return Ok(());
                }
                let (s, _) = self.snaps.remove(snap.index(self.snaps.len()));
                self.origin.deactivate(&s).unwrap();
            }
        }
        Ok(())
    }

    fn check_all(&self) -> Result<(), TestCaseError> {
        let size = ORIGIN_SECTORS * 512;
        prop_assert!(
            read(&*self.origin, 0, size) == self.model_origin,
            "origin differs"
        );
        for (i, (s, m)) in self.snaps.iter().enumerate() {
            prop_assert!(read(&**s, 0, size) == *m, "snapshot {i} differs");
            prop_assert_eq!(s.exceptions().pending_count(), 0);
        }
        Ok(())
    }
}

#[test]
fn engine_matches_the_forking_reference_model() {
    let seed = cowsnap_core::testkit::seed();
    let cases: u32 = std::env::var("COWSNAP_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(96);
    eprintln!("{cases} cases (COWSNAP_MODEL_CASES)");
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let result = runner.run(&proptest::collection::vec(op(), 1..120), |ops| {
        let mut w = World::new();
        for op in &ops {
            w.apply(op)?;
        }
        w.check_all()
    });
    if let Err(e) = result {
        panic!("model test failed (seed {seed}): {e}");
    }
}
