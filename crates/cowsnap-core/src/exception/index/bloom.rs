//! [`Bloom`]: a Bloom filter over `u64` keys.
//!
//! A lookup that would otherwise search the exception index, or read metadata from disk,
//! can first ask the filter: "no" is certain, "maybe" costs the real lookup. At 10 bits per
//! key the filter says "maybe" for about 1 % of absent keys.
//!
//! # Hashing
//!
//! A key is mixed by the splitmix64 finalizer twice, from two different starting points,
//! into `h1` and `h2` (`h2` forced odd); probe `i` of the `k` probes sets or tests bit
//! `(h1 + i * h2) mod nbits` (Kirsch and Mitzenmacher: two hashes make `k` as good as `k`
//! independent ones). The bit count is a multiple of 64, at least 64.
//!
//! # Encoding, version 1
//!
//! All integers are little-endian.
//!
//! | size        | field                                                       |
//! |-------------|-------------------------------------------------------------|
//! | 4           | magic `b"CXBF"`                                             |
//! | 4           | `u32` version, 1                                            |
//! | 4           | `u32` k, the number of probes, 1 to 16                      |
//! | 8           | `u64` nbits, a multiple of 64, at least 64                  |
//! | nbits / 8   | `nbits / 64` `u64` words; bit `b` is bit `b % 64` of word `b / 64` |
//!
//! Nothing follows the words. [`Bloom::decode`] checks all of that and never panics: the
//! encoding may come from a damaged disk. The format has no checksum: a flipped bit in the
//! words decodes to another valid filter (which may then miss keys).

use std::fmt;

/// First bytes of an encoded filter.
const MAGIC: &[u8; 4] = b"CXBF";
/// The one version of the encoding this module writes and reads.
const VERSION: u32 = 1;
/// Fewest probes per key.
const MIN_PROBES: u32 = 1;
/// Most probes per key: past this each probe costs more than it saves.
const MAX_PROBES: u32 = 16;
/// splitmix64's increment, 2^64 divided by the golden ratio.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 finalizer: a bijection of `u64` that spreads every input bit over every
/// output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The two hashes of `key`: the first two outputs of splitmix64 seeded with `key`; the
/// second is odd so that the probes do not repeat early when `nbits` is a power of two.
fn hashes(key: u64) -> (u64, u64) {
    (
        mix(key.wrapping_add(GOLDEN)),
        mix(key.wrapping_add(GOLDEN.wrapping_mul(2))) | 1,
    )
}

/// The number of probes that minimises false positives at `bits_per_key` bits per key,
/// `round(bits_per_key × ln 2)`, clamped to 1..=16.
fn probes_for(bits_per_key: u32) -> u32 {
    let k = (f64::from(bits_per_key) * std::f64::consts::LN_2)
        .round()
        .clamp(f64::from(MIN_PROBES), f64::from(MAX_PROBES));
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a whole number clamped to 1..=16 converts exactly"
    )]
    let k = k as u32;
    k
}

/// A Bloom filter over `u64` keys: no false negatives, a false-positive rate set by the
/// bits given per key.
#[derive(Clone, PartialEq, Eq)]
pub struct Bloom {
    /// The bits; `nbits / 64` words.
    words: Vec<u64>,
    /// Bits of the filter: a multiple of 64, at least 64, never zero.
    nbits: u64,
    /// Probes per key, 1 to 16.
    k: u32,
}

impl Bloom {
    /// An empty filter sized for `expected_keys` keys at `bits_per_key` bits each: the bit
    /// count is rounded up to a multiple of 64, at least 64, and the number of probes is
    /// `round(bits_per_key × ln 2)` clamped to 1..=16 (7 at 10 bits per key, about 1 %
    /// false positives once the expected keys are in).
    ///
    /// # Panics
    ///
    /// When the bits would not fit in memory, as any allocation that large.
    pub fn new(expected_keys: usize, bits_per_key: u32) -> Self {
        let want = u64::try_from(expected_keys)
            .unwrap_or(u64::MAX)
            .saturating_mul(u64::from(bits_per_key));
        let nwords = want.div_ceil(64).max(1);
        let nbits = nwords
            .checked_mul(64)
            .expect("a Bloom filter of 2^64 bits or more");
        let len = usize::try_from(nwords).expect("a Bloom filter larger than the address space");
        Bloom {
            words: vec![0; len],
            nbits,
            k: probes_for(bits_per_key),
        }
    }

    /// Bits of the filter.
    pub fn num_bits(&self) -> u64 {
        self.nbits
    }

    /// Probes per key.
    pub fn num_probes(&self) -> u32 {
        self.k
    }

    /// The word index and mask of each of the `k` bits of `key`.
    fn probes(&self, key: u64) -> impl Iterator<Item = (usize, u64)> {
        let (h1, h2) = hashes(key);
        let nbits = self.nbits;
        (0..u64::from(self.k)).map(move |i| {
            // `nbits` is never zero (checked by `new` and `decode`).
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) % nbits;
            // `bit / 64` indexes `words`, whose length fits a usize.
            let word = usize::try_from(bit / 64).unwrap_or(usize::MAX);
            (word, 1u64 << (bit % 64))
        })
    }

    /// Adds `key`.
    pub fn insert(&mut self, key: u64) {
        for (word, mask) in self.probes(key) {
            if let Some(w) = self.words.get_mut(word) {
                *w |= mask;
            }
        }
    }

    /// False when `key` was surely never inserted; true when it may have been.
    pub fn may_contain(&self, key: u64) -> bool {
        self.probes(key)
            .all(|(word, mask)| self.words.get(word).is_some_and(|w| w & mask != 0))
    }

    /// Bytes of heap the filter holds (the capacity of its words).
    pub fn heap_bytes(&self) -> usize {
        self.words.capacity() * std::mem::size_of::<u64>()
    }

    /// The filter in the version 1 encoding described in the module documentation.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.words.len() * 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.k.to_le_bytes());
        out.extend_from_slice(&self.nbits.to_le_bytes());
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// The filter encoded in `buf` by [`Bloom::encode`].
    ///
    /// Checks every rule of the module documentation's format and never panics, whatever
    /// `buf` holds; it allocates no more than `buf` holds. The error names the first rule
    /// broken and the byte offset of the offending field.
    pub fn decode(buf: &[u8]) -> Result<Bloom, String> {
        let magic = field::<4>(buf, 0, "magic")?;
        if &magic != MAGIC {
            return Err(fail(
                0,
                format!("bad magic {magic:02x?}, expected \"CXBF\""),
            ));
        }
        let version = u32::from_le_bytes(field(buf, 4, "version")?);
        if version != VERSION {
            return Err(fail(
                4,
                format!("unknown version {version}, expected {VERSION}"),
            ));
        }
        let k = u32::from_le_bytes(field(buf, 8, "probe count")?);
        if !(MIN_PROBES..=MAX_PROBES).contains(&k) {
            return Err(fail(
                8,
                format!("{k} probes, expected {MIN_PROBES} to {MAX_PROBES}"),
            ));
        }
        let nbits = u64::from_le_bytes(field(buf, 12, "bit count")?);
        if nbits < 64 || nbits % 64 != 0 {
            return Err(fail(
                12,
                format!("{nbits} bits, expected a multiple of 64, at least 64"),
            ));
        }
        const WORDS_AT: usize = 20;
        let left = buf.len().saturating_sub(WORDS_AT);
        // Compared with what the buffer holds before anything is allocated.
        let need = usize::try_from(nbits / 8).ok().filter(|&n| n <= left);
        let Some(need) = need else {
            return Err(fail(
                WORDS_AT,
                format!(
                    "truncated: {nbits} bits need {} bytes, {left} left",
                    nbits / 8
                ),
            ));
        };
        if left > need {
            return Err(fail(
                WORDS_AT + need,
                format!("{} trailing bytes after the words", left - need),
            ));
        }
        let bytes = buf.get(WORDS_AT..).unwrap_or_default();
        let words = bytes
            .chunks_exact(8)
            .map(|b| {
                let mut word = [0u8; 8];
                word.copy_from_slice(b);
                u64::from_le_bytes(word)
            })
            .collect();
        Ok(Bloom { words, nbits, k })
    }
}

/// The `N` bytes of `buf` at `at`, for field `what`.
fn field<const N: usize>(buf: &[u8], at: usize, what: &str) -> Result<[u8; N], String> {
    at.checked_add(N)
        .and_then(|end| buf.get(at..end))
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            fail(
                at,
                format!(
                    "truncated: {what} needs {N} bytes, {} left",
                    buf.len().saturating_sub(at)
                ),
            )
        })
}

/// A decoding error at byte `at`.
fn fail(at: usize, what: String) -> String {
    format!("Bloom filter encoding: at byte {at}: {what}")
}

impl fmt::Debug for Bloom {
    /// The shape and the number of bits set, not the bits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ones: u64 = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
        f.debug_struct("Bloom")
            .field("nbits", &self.nbits)
            .field("k", &self.k)
            .field("ones", &ones)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // A deterministic generator, so the measurements repeat.
    use crate::testkit::SplitMix;

    /// False positives among `probes` keys never inserted, after inserting `keys`.
    fn fp_rate(keys: &[u64], absent: impl Iterator<Item = u64>) -> f64 {
        let mut b = Bloom::new(keys.len(), 10);
        for &k in keys {
            b.insert(k);
        }
        assert!(keys.iter().all(|&k| b.may_contain(k)));
        let set: std::collections::HashSet<u64> = keys.iter().copied().collect();
        let (mut tried, mut hits) = (0u32, 0u32);
        for k in absent.filter(|k| !set.contains(k)) {
            tried += 1;
            if b.may_contain(k) {
                hits += 1;
            }
        }
        f64::from(hits) / f64::from(tried)
    }

    #[test]
    fn sizes_and_probes() {
        let cases = [
            // (expected keys, bits per key, bits, probes)
            (1000, 10, 10_048, 7),
            (0, 10, 64, 7),
            (10, 0, 64, 1),
            (1, 1, 64, 1),
            (100, 3, 320, 2),
            (64, 8, 512, 6),
            (1, 30, 64, 16),
            (1, u32::MAX, 4_294_967_296, 16),
        ];
        for (keys, bpk, bits, k) in cases {
            let b = Bloom::new(keys, bpk);
            assert_eq!(
                (b.num_bits(), b.num_probes()),
                (bits, k),
                "{keys} keys, {bpk} b/k"
            );
            assert_eq!(b.heap_bytes(), usize::try_from(bits / 8).unwrap());
        }
    }

    #[test]
    fn false_positive_rate_at_10_bits_per_key() {
        let mut rng = SplitMix(7);
        let keys: Vec<u64> = (0..100_000).map(|_| rng.next_u64()).collect();
        let random = fp_rate(&keys, (0..1_000_000).map(|_| rng.next_u64()));
        let seq: Vec<u64> = (0..100_000).collect();
        let sequential = fp_rate(&seq, 100_000..1_100_000);
        // Strided keys, like chunk numbers of one device region every 4 KiB out of 1 MiB.
        let strided: Vec<u64> = (0..100_000).map(|i| i << 8).collect();
        let between = fp_rate(&strided, (0..1_000_000).map(|i| (i << 8) + 1));
        eprintln!(
            "false positives at 10 bits/key, 100000 keys: random {random:.5}, \
             sequential {sequential:.5}, strided {between:.5}"
        );
        for rate in [random, sequential, between] {
            assert!(rate < 0.02, "{rate}");
        }
    }

    #[test]
    fn debug_shows_the_shape() {
        let mut b = Bloom::new(10, 10);
        b.insert(1);
        assert_eq!(format!("{b:?}"), "Bloom { nbits: 128, k: 7, ones: 7 }");
    }

    #[test]
    fn encoding_layout() {
        let mut b = Bloom::new(1, 1);
        b.insert(42);
        let bytes = b.encode();
        assert_eq!(&bytes[..4], b"CXBF");
        assert_eq!(bytes[4..8], 1u32.to_le_bytes());
        assert_eq!(bytes[8..12], 1u32.to_le_bytes());
        assert_eq!(bytes[12..20], 64u64.to_le_bytes());
        let (h1, _) = hashes(42);
        assert_eq!(bytes[20..28], (1u64 << (h1 % 64)).to_le_bytes());
        assert_eq!(bytes.len(), 28);
    }

    #[test]
    fn decode_names_each_broken_rule_and_its_offset() {
        let good = {
            let mut b = Bloom::new(10, 10);
            b.insert(5);
            b.encode()
        };
        let edit = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut buf = good.clone();
            f(&mut buf);
            Bloom::decode(&buf)
        };
        let cases: Vec<(&str, Result<Bloom, String>)> = vec![
            ("at byte 0: truncated", Bloom::decode(b"CX")),
            ("at byte 0: bad magic", edit(&|b| b[3] = b'S')),
            ("at byte 4: unknown version 0", edit(&|b| b[4] = 0)),
            ("at byte 8: 0 probes", edit(&|b| b[8] = 0)),
            ("at byte 8: 17 probes", edit(&|b| b[8] = 17)),
            ("at byte 12: 0 bits", edit(&|b| b[12..20].fill(0))),
            ("at byte 12: 129 bits", edit(&|b| b[12] = 129)),
            ("at byte 20: truncated: 192 bits", edit(&|b| b[12] = 192)),
            ("at byte 20: truncated", edit(&|b| b[12..20].fill(0xC0))),
            ("at byte 36: 1 trailing bytes", edit(&|b| b.push(0))),
            ("at byte 28: 8 trailing bytes", edit(&|b| b[12] = 64)),
        ];
        for (want, got) in cases {
            let err = got.expect_err(want);
            assert!(err.contains(want), "want {want:?}, got {err:?}");
        }
    }

    #[test]
    fn decode_rejects_every_truncation() {
        let mut b = Bloom::new(100, 10);
        for k in 0..100 {
            b.insert(k);
        }
        let bytes = b.encode();
        for n in 0..bytes.len() {
            assert!(Bloom::decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        assert_eq!(Bloom::decode(&bytes).unwrap(), b);
    }

    proptest! {
        #[test]
        fn no_false_negatives(
            keys in proptest::collection::vec(any::<u64>(), 0..2000),
            expected in 0usize..3000,
            bits_per_key in 0u32..24,
        ) {
            let mut b = Bloom::new(expected, bits_per_key);
            for &k in &keys {
                b.insert(k);
            }
            for &k in &keys {
                prop_assert!(b.may_contain(k));
            }
            let back = Bloom::decode(&b.encode()).map_err(TestCaseError::fail)?;
            for &k in &keys {
                prop_assert!(back.may_contain(k));
            }
            prop_assert_eq!(back, b);
        }

        #[test]
        fn random_bytes_are_rejected(buf in proptest::collection::vec(any::<u8>(), 0..2048)) {
            prop_assert!(Bloom::decode(&buf).is_err());
        }

        #[test]
        fn random_bodies_never_panic(
            k in prop_oneof![1u32..=16, any::<u32>()],
            nbits in prop_oneof![(1u64..64).prop_map(|w| w * 64), any::<u64>()],
            body in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            let mut buf = b"CXBF".to_vec();
            buf.extend_from_slice(&1u32.to_le_bytes());
            buf.extend_from_slice(&k.to_le_bytes());
            buf.extend_from_slice(&nbits.to_le_bytes());
            buf.extend_from_slice(&body);
            if let Ok(b) = Bloom::decode(&buf) {
                prop_assert_eq!(b.encode(), buf);
            }
        }

        #[test]
        fn corrupting_one_byte_never_panics(
            keys in proptest::collection::vec(any::<u64>(), 1..300),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let mut b = Bloom::new(keys.len(), 10);
            for &k in &keys {
                b.insert(k);
            }
            let mut bytes = b.encode();
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
            // A flipped bit in the words is another valid filter, which re-encodes to the
            // same bytes; so may be a flipped probe count (another count in 1..=16). Only
            // a header field can make it an error.
            match Bloom::decode(&bytes) {
                Ok(back) => prop_assert_eq!(back.encode(), bytes),
                Err(_) => prop_assert!(i < 20),
            }
        }
    }
}
