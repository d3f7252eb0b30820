//! The rules a COW's entries must follow, in one place: each entry's `new` chunk is a
//! data chunk inside the COW, its `old` chunk is inside the origin (when the origin is
//! known), and no two entries share an `old` or a `new` chunk.
//!
//! The [`Validator`] is pure: it is fed the entries in on-disk order with their place
//! ([`Slot`]) and returns typed [`Finding`]s, each naming the byte offset of the offending
//! field. What to do with them is the caller's: the store's load refuses the COW at the
//! first ([`Finding::into_error`]), `cow check` lists them all. Framing rules (the header,
//! the chain of areas) are checked where the bytes are decoded, in [`super::format`] and
//! [`super::read`].

use std::fmt;

use super::format::{self, Geometry};
use crate::error::Error;
use crate::exception::index::ChunkSet;
use crate::exception::Exception;

/// Where an entry is on the COW device: entry `index` of metadata area `area`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// The metadata area.
    pub area: u64,
    /// The entry's index in the area.
    pub index: u64,
}

/// The sizes entries are checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Whole chunks of the COW device: every `new` chunk is below.
    pub cow_chunks: u64,
    /// Chunks covering the origin, when it is known: every `old` chunk is below.
    pub origin_chunks: Option<u64>,
}

/// What is wrong with an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Its `new` chunk is not below the COW's `cow_chunks` whole chunks.
    PastCowEnd {
        /// Whole chunks of the COW.
        cow_chunks: u64,
    },
    /// Its `new` chunk is the header or an area slot.
    OnMetadata,
    /// Its `old` chunk is not below the origin's `origin_chunks` chunks.
    PastOriginEnd {
        /// Chunks covering the origin.
        origin_chunks: u64,
    },
    /// An earlier entry has the same `old` chunk.
    DuplicateOrigin,
    /// An earlier entry has the same `new` chunk.
    DuplicateCow,
}

impl Problem {
    /// True when the offending field is `new` (bytes 8..16 of the entry), false for `old`.
    fn in_new_field(self) -> bool {
        matches!(
            self,
            Problem::PastCowEnd { .. } | Problem::OnMetadata | Problem::DuplicateCow
        )
    }
}

/// One rule broken by one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Which rule.
    pub problem: Problem,
    /// The entry.
    pub entry: Exception,
    /// Where the entry is, when the caller knows it.
    pub slot: Option<Slot>,
    /// Byte offset on the COW of the offending field (the entry's `old` or `new`); 0 when
    /// the slot is not known.
    pub offset: u64,
}

impl Finding {
    fn new(problem: Problem, entry: Exception, geo: Option<&Geometry>, slot: Option<Slot>) -> Self {
        let offset = match (geo, slot) {
            (Some(g), Some(s)) => g
                .entry_offset(s.area, s.index)
                .saturating_add(if problem.in_new_field() { 8 } else { 0 }),
            _ => 0,
        };
        Finding {
            problem,
            entry,
            slot: geo.and(slot),
            offset,
        }
    }

    /// The [`Error::Corrupt`] that refuses the COW `device` for this finding.
    pub fn into_error(self, device: &str) -> Error {
        format::corrupt(device, self.offset, self.to_string())
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Exception { old, new } = self.entry;
        match self.slot {
            Some(s) => write!(f, "area {} entry {} ({old} -> {new})", s.area, s.index)?,
            None => write!(f, "exception {old} -> {new}")?,
        }
        match self.problem {
            Problem::PastCowEnd { cow_chunks } => {
                write!(f, " points past the end of the COW ({cow_chunks} chunks)")
            }
            Problem::OnMetadata => write!(f, " points at a metadata chunk"),
            Problem::PastOriginEnd { origin_chunks } => write!(
                f,
                " is for origin chunk {old} but the origin has {origin_chunks} chunks"
            ),
            Problem::DuplicateOrigin => write!(f, ": origin chunk {old} appears twice"),
            Problem::DuplicateCow => write!(f, ": COW chunk {new} appears twice"),
        }
    }
}

/// The findings of one entry, in the order the rules are checked: where `new` points
/// (past the end, else onto metadata), `old` past the origin, a repeated `old`, a
/// repeated `new`.
pub type EntryFindings = std::iter::Flatten<std::array::IntoIter<Option<Finding>, 4>>;

/// Checks entries in on-disk order against the [`Bounds`], the layout and every entry
/// before them. Remembers each `old` and `new` chunk seen, in two [`ChunkSet`]s (at most
/// one bit per chunk of each device).
#[derive(Clone, Debug)]
pub struct Validator {
    geo: Geometry,
    bounds: Bounds,
    /// `None` when the caller checks repeated `old` chunks itself.
    olds: Option<ChunkSet>,
    news: ChunkSet,
}

impl Validator {
    /// A validator for a COW laid out as `geo`, within `bounds`.
    pub fn new(geo: Geometry, bounds: Bounds) -> Self {
        Validator {
            geo,
            bounds,
            olds: Some(ChunkSet::new()),
            news: ChunkSet::new(),
        }
    }

    /// The same validator without the check for repeated `old` chunks, for a caller that
    /// makes it (the exception index); saves a set the size of the origin's.
    pub fn without_old_duplicates(mut self) -> Self {
        self.olds = None;
        self
    }

    /// Checks `entry`, found at `slot`, the next entry in on-disk order. Every rule is
    /// checked, so one entry can break several; an empty iterator means it is valid.
    pub fn check(&mut self, slot: Slot, entry: Exception) -> EntryFindings {
        let at = |p| Some(Finding::new(p, entry, Some(&self.geo), Some(slot)));
        let new = if entry.new.0 >= self.bounds.cow_chunks {
            at(Problem::PastCowEnd {
                cow_chunks: self.bounds.cow_chunks,
            })
        } else if !self.geo.is_data_chunk(entry.new) {
            at(Problem::OnMetadata)
        } else {
            None
        };
        let origin = origin_problem(entry, self.bounds).and_then(at);
        let dup_old = (!self.olds.as_mut().is_none_or(|o| o.insert(entry.old.0)))
            .then_some(Problem::DuplicateOrigin)
            .and_then(at);
        let dup_new = (!self.news.insert(entry.new.0))
            .then_some(Problem::DuplicateCow)
            .and_then(at);
        [new, origin, dup_old, dup_new].into_iter().flatten()
    }
}

/// For a caller that sees entries without their place on disk or the layout (the
/// snapshot loader, over any store): `new` inside the COW, then `old` inside the origin.
pub fn check_bounds(entry: Exception, bounds: Bounds) -> Option<Finding> {
    let problem = if entry.new.0 >= bounds.cow_chunks {
        Some(Problem::PastCowEnd {
            cow_chunks: bounds.cow_chunks,
        })
    } else {
        origin_problem(entry, bounds)
    };
    problem.map(|p| Finding::new(p, entry, None, None))
}

/// [`check_bounds`], then `record(entry)`, which keeps an entry within bounds and says
/// whether its `old` chunk was new (the caller's exception table, which sees repeated
/// origin chunks). The first problem found.
pub fn check_unplaced(
    entry: Exception,
    bounds: Bounds,
    record: impl FnOnce(Exception) -> bool,
) -> Option<Finding> {
    check_bounds(entry, bounds).or_else(|| {
        (!record(entry)).then(|| Finding::new(Problem::DuplicateOrigin, entry, None, None))
    })
}

fn origin_problem(entry: Exception, bounds: Bounds) -> Option<Problem> {
    bounds
        .origin_chunks
        .filter(|&n| entry.old.0 >= n)
        .map(|origin_chunks| Problem::PastOriginEnd { origin_chunks })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::ChunkSize;
    use std::collections::HashSet;

    /// 4 KiB chunks: 256 entries an area, area 0 at chunk 1, area 1 at chunk 258.
    fn geo() -> Geometry {
        Geometry::new(ChunkSize::from_sectors(8).unwrap())
    }

    fn validator(cow_chunks: u64, origin_chunks: Option<u64>) -> Validator {
        Validator::new(
            geo(),
            Bounds {
                cow_chunks,
                origin_chunks,
            },
        )
    }

    fn slot(area: u64, index: u64) -> Slot {
        Slot { area, index }
    }

    fn problems(v: &mut Validator, s: Slot, old: u64, new: u64) -> Vec<(Problem, u64)> {
        v.check(s, Exception::new(old, new))
            .map(|f| (f.problem, f.offset))
            .collect()
    }

    #[test]
    fn a_valid_table_has_no_findings() {
        let mut v = validator(600, Some(1000));
        for j in 0..256 {
            assert_eq!(problems(&mut v, slot(0, j), 999 - j, 2 + j), vec![]);
        }
        assert_eq!(problems(&mut v, slot(1, 0), 5, 259), vec![]);
    }

    #[test]
    fn a_new_chunk_past_the_end_names_the_new_field() {
        let mut v = validator(300, None);
        for (j, bad) in [300u64, 301, u64::MAX].into_iter().enumerate() {
            let j = j as u64;
            assert_eq!(
                problems(&mut v, slot(0, j), j, bad),
                vec![(Problem::PastCowEnd { cow_chunks: 300 }, 4096 + 16 * j + 8)]
            );
        }
    }

    #[test]
    fn a_new_chunk_on_the_header_or_an_area_slot_is_refused() {
        let mut v = validator(600, None);
        for (j, bad) in [0u64, 1, 258, 515].into_iter().enumerate() {
            let j = j as u64;
            assert_eq!(
                problems(&mut v, slot(0, j), j, bad),
                vec![(Problem::OnMetadata, 4096 + 16 * j + 8)],
                "chunk {bad}"
            );
        }
    }

    #[test]
    fn an_old_chunk_past_the_origin_names_the_old_field() {
        let mut v = validator(600, Some(10));
        assert_eq!(problems(&mut v, slot(0, 0), 9, 2), vec![]);
        assert_eq!(
            problems(&mut v, slot(0, 1), 10, 3),
            vec![(Problem::PastOriginEnd { origin_chunks: 10 }, 4096 + 16)]
        );
        // Without a known origin, any `old` is in range.
        let mut v = validator(600, None);
        assert_eq!(problems(&mut v, slot(0, 0), u64::MAX, 2), vec![]);
    }

    #[test]
    fn a_repeated_chunk_is_reported_at_the_later_entry_across_areas() {
        let mut v = validator(600, None);
        assert_eq!(problems(&mut v, slot(0, 0), 7, 2), vec![]);
        assert_eq!(
            problems(&mut v, slot(0, 1), 7, 3),
            vec![(Problem::DuplicateOrigin, 4096 + 16)]
        );
        // Area 1 starts at chunk 258: byte 258 * 4096.
        assert_eq!(
            problems(&mut v, slot(1, 2), 8, 2),
            vec![(Problem::DuplicateCow, 258 * 4096 + 32 + 8)]
        );
    }

    #[test]
    fn one_entry_can_break_every_rule_and_all_are_listed_in_order() {
        let mut v = validator(600, Some(10));
        assert_eq!(
            problems(&mut v, slot(0, 0), 50, 1),
            vec![
                (Problem::OnMetadata, 4096 + 8),
                (Problem::PastOriginEnd { origin_chunks: 10 }, 4096)
            ]
        );
        assert_eq!(
            problems(&mut v, slot(0, 1), 50, 1),
            vec![
                (Problem::OnMetadata, 4096 + 16 + 8),
                (Problem::PastOriginEnd { origin_chunks: 10 }, 4096 + 16),
                (Problem::DuplicateOrigin, 4096 + 16),
                (Problem::DuplicateCow, 4096 + 16 + 8)
            ]
        );
    }

    #[test]
    fn findings_read_as_the_loader_reports_them() {
        let mut v = validator(300, None);
        let f = v.check(slot(1, 3), Exception::new(5, 400)).next().unwrap();
        assert_eq!(
            f.to_string(),
            "area 1 entry 3 (5 -> 400) points past the end of the COW (300 chunks)"
        );
        match f.into_error("cow.img") {
            Error::Corrupt {
                device,
                offset,
                reason,
            } => {
                assert_eq!((device.as_str(), offset), ("cow.img", 258 * 4096 + 48 + 8));
                assert_eq!(reason, f.to_string());
            }
            e => panic!("{e:?}"),
        }
        let dup = v.check(slot(1, 4), Exception::new(5, 2)).next().unwrap();
        assert_eq!(
            dup.to_string(),
            "area 1 entry 4 (5 -> 2): origin chunk 5 appears twice"
        );
    }

    #[test]
    fn unplaced_entries_are_checked_against_both_devices_and_the_callers_table() {
        let bounds = Bounds {
            cow_chunks: 16,
            origin_chunks: Some(8),
        };
        let mut seen = HashSet::new();
        let mut record = |e: Exception| seen.insert(e.old.0);
        assert_eq!(
            check_unplaced(Exception::new(1, 2), bounds, &mut record),
            None
        );
        let past_cow = check_unplaced(Exception::new(2, 16), bounds, &mut record).unwrap();
        assert_eq!(past_cow.problem, Problem::PastCowEnd { cow_chunks: 16 });
        assert_eq!((past_cow.slot, past_cow.offset), (None, 0));
        assert_eq!(
            past_cow.to_string(),
            "exception 2 -> 16 points past the end of the COW (16 chunks)"
        );
        let past_origin = check_unplaced(Exception::new(8, 3), bounds, &mut record).unwrap();
        assert_eq!(
            past_origin.to_string(),
            "exception 8 -> 3 is for origin chunk 8 but the origin has 8 chunks"
        );
        let dup = check_unplaced(Exception::new(1, 4), bounds, &mut record).unwrap();
        assert_eq!(dup.problem, Problem::DuplicateOrigin);
        // An entry refused by a bound is not recorded.
        assert!(!seen.contains(&2) && !seen.contains(&8));
    }
}
