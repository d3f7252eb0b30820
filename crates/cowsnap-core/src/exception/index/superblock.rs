//! The index's superblock: which runs are live and how much of the store's log they cover.
//!
//! It is the one file of the sidecar that is ever replaced, and it is replaced atomically:
//! written whole to `super.new`, synced, renamed over `super`, and the directory synced.
//! A crash at any step leaves either the old or the new superblock, each naming runs that
//! were synced before it was written. Layout (little-endian): magic `CXSUPER1`, then the
//! fields of [`Superblock`] in order (an absent `u64` is `u64::MAX`), the level-0 run count
//! (u32) and sequence numbers, and a CRC32 of everything before it.

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"CXSUPER1";
/// The file's name.
pub const NAME: &str = "super";
/// The name it is written under before the rename.
pub const NEW_NAME: &str = "super.new";
/// Most level-0 runs a superblock may name (bounds what a corrupt count can allocate).
const MAX_RUNS: usize = 4096;
const NONE: u64 = u64::MAX;

/// What the index covers and where it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Superblock {
    /// Who the index belongs to (the pool sets the COW file's device and inode here).
    pub identity: u64,
    /// Entries of the store's log the runs hold: positions `0..covered`.
    pub covered: u64,
    /// The store's fingerprint of its first `covered` entries (see
    /// [`ExceptionStore::fingerprint`](crate::exception::ExceptionStore::fingerprint)).
    pub fingerprint: u64,
    /// The largest `new` chunk among the covered entries.
    pub max_new: Option<u64>,
    /// The next free run sequence number.
    pub next_seq: u64,
    /// The one large run (level 1), and the members file of the same sequence number.
    pub level1: Option<u64>,
    /// Level-0 runs, oldest first.
    pub level0: Vec<u64>,
}

fn opt(v: Option<u64>) -> u64 {
    v.unwrap_or(NONE)
}

impl Superblock {
    /// The bytes of the file.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(72 + 8 * self.level0.len());
        b.extend_from_slice(MAGIC);
        for v in [
            self.identity,
            self.covered,
            self.fingerprint,
            opt(self.max_new),
            self.next_seq,
            opt(self.level1),
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let n = u32::try_from(self.level0.len()).unwrap_or(u32::MAX);
        b.extend_from_slice(&n.to_le_bytes());
        for s in &self.level0 {
            b.extend_from_slice(&s.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a superblock; `device` names the file in errors.
    pub fn decode(b: &[u8], device: &str) -> Result<Superblock> {
        let corrupt = |offset: usize, reason: &str| Error::Corrupt {
            device: device.to_string(),
            offset: offset as u64,
            reason: reason.to_string(),
        };
        if b.len() < 8 + 6 * 8 + 4 + 4 || &b[..8] != MAGIC {
            return Err(corrupt(
                0,
                "not an index superblock (bad magic or too short)",
            ));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        let mut c = [0u8; 4];
        c.copy_from_slice(crc);
        if crc32fast::hash(body) != u32::from_le_bytes(c) {
            return Err(corrupt(body.len(), "the checksum does not match"));
        }
        let mut at = 8;
        let u64_at = |at: &mut usize| -> Result<u64> {
            let s = body
                .get(*at..*at + 8)
                .ok_or_else(|| corrupt(*at, "truncated"))?;
            *at += 8;
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            Ok(u64::from_le_bytes(a))
        };
        let mut f = [0u64; 6];
        for v in &mut f {
            *v = u64_at(&mut at)?;
        }
        let n = body
            .get(at..at + 4)
            .map(|s| {
                let mut a = [0u8; 4];
                a.copy_from_slice(s);
                u32::from_le_bytes(a) as usize
            })
            .ok_or_else(|| corrupt(at, "truncated"))?;
        at += 4;
        if n > MAX_RUNS || body.len() != at + 8 * n {
            return Err(corrupt(
                at,
                "the run count does not match the file's length",
            ));
        }
        let mut level0 = Vec::with_capacity(n);
        for _ in 0..n {
            level0.push(u64_at(&mut at)?);
        }
        let some = |v: u64| (v != NONE).then_some(v);
        Ok(Superblock {
            identity: f[0],
            covered: f[1],
            fingerprint: f[2],
            max_new: some(f[3]),
            next_seq: f[4],
            level1: some(f[5]),
            level0,
        })
    }

    /// Every run sequence number it names.
    pub fn runs(&self) -> impl Iterator<Item = u64> + '_ {
        self.level1.iter().chain(self.level0.iter()).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let s = Superblock {
            identity: 7,
            covered: 1000,
            fingerprint: 0xdead_beef,
            max_new: Some(1003),
            next_seq: 5,
            level1: Some(2),
            level0: vec![3, 4],
        };
        assert_eq!(Superblock::decode(&s.encode(), "t").unwrap(), s);
        let empty = Superblock::default();
        assert_eq!(Superblock::decode(&empty.encode(), "t").unwrap(), empty);
    }

    proptest! {
        #[test]
        fn any_damage_is_refused(at in 0usize..100, bit in 0u8..8, cut in 0usize..100) {
            let s = Superblock { covered: 9, level0: vec![1, 2, 3], ..Superblock::default() };
            let mut b = s.encode();
            let at = at % b.len();
            b[at] ^= 1 << bit;
            prop_assert!(Superblock::decode(&b, "t").is_err());
            let good = s.encode();
            let cut = cut % good.len();
            prop_assert!(Superblock::decode(&good[..cut], "t").is_err());
        }

        #[test]
        fn decoding_any_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Superblock::decode(&b, "t");
        }
    }
}
