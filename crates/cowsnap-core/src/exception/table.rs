//! The completed-exception table: an ordered map of runs `old..old+len -> new..new+len`.
//!
//! Consecutive exceptions (old and new both increasing by one) are coalesced into one run,
//! as the kernel does in memory, so a COW written sequentially costs one entry per run, not
//! one per chunk. Lookups are `O(log runs)`. The table holds committed exceptions only; what
//! is still being copied lives in the tracker's pending table.

use std::collections::BTreeMap;

use crate::units::Chunk;

/// One exception: chunk `old` (on the origin, or a bad chunk for a relocation target) is
/// found at chunk `new` (on the COW, or in the spare area).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Exception {
    /// The remapped chunk.
    pub old: Chunk,
    /// Where its data lives.
    pub new: Chunk,
}

impl Exception {
    /// An exception `old -> new`.
    pub fn new(old: u64, new: u64) -> Self {
        Exception {
            old: Chunk(old),
            new: Chunk(new),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    new: u64,
    len: u64,
}

/// Inserting an exception for a chunk that is already remapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("chunk {old} already has an exception (to chunk {existing})")]
pub struct AlreadyMapped {
    /// The chunk.
    pub old: Chunk,
    /// Its current mapping.
    pub existing: Chunk,
}

/// The completed-exception table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExceptionTable {
    runs: BTreeMap<u64, Run>,
    count: u64,
}

impl ExceptionTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where chunk `old` is remapped to, if it is.
    pub fn lookup(&self, old: Chunk) -> Option<Chunk> {
        let (&start, run) = self.runs.range(..=old.0).next_back()?;
        (old.0 - start < run.len).then(|| Chunk(run.new + (old.0 - start)))
    }

    /// Adds an exception, coalescing it with neighbouring runs.
    pub fn insert(&mut self, e: Exception) -> Result<(), AlreadyMapped> {
        if let Some(existing) = self.lookup(e.old) {
            return Err(AlreadyMapped {
                old: e.old,
                existing,
            });
        }
        let (old, new) = (e.old.0, e.new.0);
        // Extend the run that ends just before `old`, if `new` continues it too.
        let prev = self
            .runs
            .range(..old)
            .next_back()
            .map(|(&s, r)| (s, *r))
            .filter(|(s, r)| s + r.len == old && r.new + r.len == new);
        let next = old
            .checked_add(1)
            .and_then(|k| self.runs.get(&k).map(|r| (k, *r)))
            .filter(|(_, r)| Some(r.new) == new.checked_add(1));
        match (prev, next) {
            (Some((ps, pr)), Some((ns, nr))) => {
                self.runs.remove(&ns);
                self.runs.insert(
                    ps,
                    Run {
                        new: pr.new,
                        len: pr.len + 1 + nr.len,
                    },
                );
            }
            (Some((ps, pr)), None) => {
                self.runs.insert(
                    ps,
                    Run {
                        new: pr.new,
                        len: pr.len + 1,
                    },
                );
            }
            (None, Some((ns, nr))) => {
                self.runs.remove(&ns);
                self.runs.insert(
                    old,
                    Run {
                        new,
                        len: nr.len + 1,
                    },
                );
            }
            (None, None) => {
                self.runs.insert(old, Run { new, len: 1 });
            }
        }
        self.count += 1;
        Ok(())
    }

    /// Removes the exception of chunk `old` (merge gives chunks back), returning its target.
    pub fn remove(&mut self, old: Chunk) -> Option<Chunk> {
        let (&start, &run) = self.runs.range(..=old.0).next_back()?;
        let off = old.0 - start;
        if off >= run.len {
            return None;
        }
        self.runs.remove(&start);
        if off > 0 {
            self.runs.insert(
                start,
                Run {
                    new: run.new,
                    len: off,
                },
            );
        }
        if off + 1 < run.len {
            self.runs.insert(
                old.0 + 1,
                Run {
                    new: run.new + off + 1,
                    len: run.len - off - 1,
                },
            );
        }
        self.count -= 1;
        Some(Chunk(run.new + off))
    }

    /// Number of exceptions.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// True when there are no exceptions.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Number of coalesced runs (what the table costs in memory).
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// Every exception, in order of `old`.
    pub fn iter(&self) -> impl Iterator<Item = Exception> + '_ {
        self.runs.iter().flat_map(|(&s, r)| {
            (0..r.len).map(move |i| Exception {
                old: Chunk(s + i),
                new: Chunk(r.new + i),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn consecutive_exceptions_coalesce() {
        let mut t = ExceptionTable::new();
        t.insert(Exception::new(10, 2)).unwrap();
        t.insert(Exception::new(12, 4)).unwrap();
        assert_eq!(t.runs(), 2);
        t.insert(Exception::new(11, 3)).unwrap();
        assert_eq!(t.runs(), 1);
        assert_eq!(t.lookup(Chunk(12)), Some(Chunk(4)));
        assert_eq!(t.lookup(Chunk(13)), None);
        assert!(t.insert(Exception::new(11, 9)).is_err());
        assert_eq!(t.remove(Chunk(11)), Some(Chunk(3)));
        assert_eq!(t.runs(), 2);
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(Chunk(11)), None);
        assert_eq!(t.lookup(Chunk(12)), Some(Chunk(4)));
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut t = ExceptionTable::new();
        t.insert(Exception::new(u64::MAX, u64::MAX)).unwrap();
        t.insert(Exception::new(u64::MAX - 1, u64::MAX - 1))
            .unwrap();
        assert_eq!(t.runs(), 1);
        assert_eq!(t.lookup(Chunk(u64::MAX)), Some(Chunk(u64::MAX)));
    }

    proptest! {
        #[test]
        fn table_matches_a_hash_map(ops in proptest::collection::vec((0u64..64, 0u64..64, any::<bool>()), 0..200)) {
            let mut t = ExceptionTable::new();
            let mut m: HashMap<u64, u64> = HashMap::new();
            for (old, new, ins) in ops {
                if ins {
                    let r = t.insert(Exception::new(old, new));
                    prop_assert_eq!(r.is_ok(), !m.contains_key(&old));
                    m.entry(old).or_insert(new);
                } else {
                    prop_assert_eq!(t.remove(Chunk(old)).map(|c| c.0), m.remove(&old));
                }
                prop_assert_eq!(t.len(), m.len() as u64);
            }
            for c in 0..70 {
                prop_assert_eq!(t.lookup(Chunk(c)).map(|c| c.0), m.get(&c).copied());
            }
            let mut all: Vec<_> = m.into_iter().collect();
            all.sort();
            let listed: Vec<_> = t.iter().map(|e| (e.old.0, e.new.0)).collect();
            prop_assert_eq!(listed, all);
        }
    }
}
