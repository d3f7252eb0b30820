//! The metadata planner: pure, deterministic bookkeeping of where chunks and entries go,
//! and which writes a commit needs, with no I/O and no locks.
//!
//! It hands out data chunks from chunk 2 on, skipping area slots; keeps the current
//! (last, not full) area in memory, as the kernel does; and turns a commit of exceptions,
//! in allocation order, into [`MetaStep`]s: zero every area that the commit makes
//! necessary (an area that becomes full needs the next area to read as empty), flush (the
//! copied data and the zeroed areas become durable), then write each touched area with FUA,
//! in area order. The store executes the steps; tests and the crash analysis in
//! `docs/format.md` reason about them directly.

use super::format::{self, Geometry, FIRST_DATA_CHUNK};
use crate::error::{Error, Result};
use crate::exception::Exception;
use crate::units::{mem_usize, Chunk, ChunkSize, SECTOR_SIZE};

/// One metadata I/O step of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaStep {
    /// Make `len` bytes at `offset` read as zeros (not durable until a flush).
    Zero {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Flush the COW device.
    Flush,
    /// Write `data` at `offset`; with `fua`, durable when it returns.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
        /// Force unit access.
        fua: bool,
        /// True for a metadata area write (counted in statistics).
        area: bool,
    },
}

/// The planner's state: allocation and the committed current area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planner {
    geo: Geometry,
    /// Next chunk to hand out (always a data chunk).
    next_free: u64,
    /// The area that committed entries go to next.
    current_area: u64,
    /// Committed entries of the current area.
    area: Vec<Exception>,
    /// Chunks handed out and not yet committed (they land after `area`, in order).
    outstanding: u64,
    /// The current area has stray bytes after its terminator on disk: rewrite it to the
    /// end of the chunk at the next commit.
    rewrite_tail: bool,
}

impl Planner {
    /// A freshly formatted store: nothing allocated, area 0 empty.
    pub fn fresh(chunk_size: ChunkSize) -> Self {
        Planner {
            geo: Geometry::new(chunk_size),
            next_free: FIRST_DATA_CHUNK,
            current_area: 0,
            area: Vec::new(),
            outstanding: 0,
            rewrite_tail: false,
        }
    }

    /// A loaded store: `current_area` is the last area read (the first one not full),
    /// holding `entries`; `max_new` is the largest `new` chunk of all areas.
    pub fn loaded(
        chunk_size: ChunkSize,
        current_area: u64,
        entries: Vec<Exception>,
        max_new: Option<u64>,
        junk_after_terminator: bool,
    ) -> Self {
        let geo = Geometry::new(chunk_size);
        let next = max_new.map_or(FIRST_DATA_CHUNK, |m| {
            m.saturating_add(1).max(FIRST_DATA_CHUNK)
        });
        Planner {
            geo,
            next_free: geo.skip_metadata(Chunk(next)).0,
            current_area,
            area: entries,
            outstanding: 0,
            rewrite_tail: junk_after_terminator,
        }
    }

    /// The layout.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// The next chunk [`allocate`](Self::allocate) would hand out.
    pub fn next_free(&self) -> u64 {
        self.next_free
    }

    /// The area committed entries go to next.
    pub fn current_area(&self) -> u64 {
        self.current_area
    }

    /// Committed entries of the current area.
    pub fn current_entries(&self) -> &[Exception] {
        &self.area
    }

    /// Chunks handed out and not committed.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// Sectors in use (header and metadata included): `next_free * chunk_sectors`.
    pub fn allocated_sectors(&self) -> u64 {
        self.next_free
            .saturating_mul(self.geo.chunk_size().sectors())
    }

    /// Sectors of header and metadata: `(current_area + 2) * chunk_sectors`.
    pub fn metadata_sectors(&self) -> u64 {
        self.current_area
            .saturating_add(2)
            .saturating_mul(self.geo.chunk_size().sectors())
    }

    /// Hands out the next data chunk of a COW of `cow_chunks` whole chunks.
    ///
    /// Refuses ([`Error::CowFull`]) when the chunk is past the end, or when the entry that
    /// will record it (entries land in allocation order) would lie in an area past the
    /// end, or would fill an area whose successor is past the end: a full area needs the
    /// next (zeroed) area to exist. The kernel finds the last case only at commit time and
    /// then invalidates the snapshot; refusing the allocation is the same space
    /// accounting without the invalidation.
    pub fn allocate(&mut self, cow_chunks: u64) -> Result<Chunk> {
        let epa = self.geo.exceptions_per_area();
        let pos = (self.area.len() as u64).saturating_add(self.outstanding);
        let landing = self.current_area.saturating_add(pos / epa);
        let fills = pos % epa == epa - 1;
        let area_fits = |a: u64| self.geo.area_location(a).0 < cow_chunks;
        if self.next_free >= cow_chunks
            || !area_fits(landing)
            || (fills && !area_fits(landing.saturating_add(1)))
        {
            return Err(Error::CowFull {
                allocated: self.next_free.min(cow_chunks),
                total: cow_chunks,
            });
        }
        let c = Chunk(self.next_free);
        self.next_free = self
            .geo
            .skip_metadata(Chunk(self.next_free.saturating_add(1)))
            .0;
        self.outstanding += 1;
        Ok(c)
    }

    /// Gives up one allocated chunk without an entry (its write failed): it stays unused,
    /// and the next entries land where it would have.
    pub fn release(&mut self) {
        self.outstanding = self.outstanding.saturating_sub(1);
    }

    /// Commits `entries` (the next ones in allocation order) and returns the I/O that
    /// makes them durable: zero the areas that follow areas this commit fills, flush,
    /// then write every touched area with FUA, in order. The planner's state moves on at
    /// once; if the I/O fails the store is invalid and the planner is not used again.
    pub fn commit(&mut self, entries: &[Exception]) -> Vec<MetaStep> {
        // A chunk's bytes / 16: at most 2^26 entries.
        let epa = mem_usize(self.geo.exceptions_per_area());
        let cs = self.geo.chunk_size();
        let mut zeros = Vec::new();
        let mut writes = Vec::new();
        let mut rest = entries;
        self.outstanding = self.outstanding.saturating_sub(entries.len() as u64);
        while !rest.is_empty() {
            let room = epa - self.area.len();
            let take = room.min(rest.len());
            let first = self.area.len();
            self.area.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            // The sectors after the last new entry already read as zeros: the terminator is
            // there.
            writes.push(area_write(
                &self.geo,
                self.current_area,
                &self.area,
                first..self.area.len(),
                self.rewrite_tail,
            ));
            self.rewrite_tail = false;
            if self.area.len() == epa {
                self.current_area += 1;
                self.area.clear();
                zeros.push(MetaStep::Zero {
                    offset: self.geo.area_offset(self.current_area),
                    len: cs.bytes(),
                });
            }
        }
        if writes.is_empty() {
            return Vec::new();
        }
        let mut steps = zeros;
        steps.push(MetaStep::Flush);
        steps.extend(writes);
        steps
    }
}

impl Planner {
    /// Merge, step 1 (the kernel's `prepare_merge`): when the current area holds no entry
    /// the table goes on backwards in the area before it, which is full: the area to read
    /// and give to [`step_back`](Self::step_back) before the next batch. `None` when the
    /// current area has entries, or when it is area 0 (then an empty area means the merge
    /// is done).
    pub fn merge_needs_area(&self) -> Option<u64> {
        (self.area.is_empty() && self.current_area > 0).then(|| self.current_area - 1)
    }

    /// Moves the current area one back, to the full area `entries` were read from (see
    /// [`merge_needs_area`](Self::merge_needs_area)).
    pub fn step_back(&mut self, entries: Vec<Exception>) -> Result<()> {
        let epa = self.geo.exceptions_per_area();
        if !self.area.is_empty() || self.current_area == 0 || entries.len() as u64 != epa {
            return Err(Error::Invalid(format!(
                "merge: cannot step back from area {} ({} entries) to an area of {} entries",
                self.current_area,
                self.area.len(),
                entries.len()
            )));
        }
        self.current_area -= 1;
        self.area = entries;
        self.rewrite_tail = false;
        Ok(())
    }

    /// The next merge batch: the last `max` entries of the current area (at least one, at
    /// most what it holds), in table order. Empty when the table is empty or the area before
    /// must be read first.
    pub fn merge_batch(&self, max: usize) -> &[Exception] {
        let n = self.area.len().min(max.max(1));
        &self.area[self.area.len() - n..]
    }

    /// Entries left in the table, counted from the area layout: every area before the
    /// current one is full.
    pub fn merge_remaining(&self) -> u64 {
        self.current_area
            .saturating_mul(self.geo.exceptions_per_area())
            .saturating_add(self.area.len() as u64)
    }

    /// Merge, step 2 (the kernel's `commit_merge`): the last `n` entries of the current area
    /// are on the origin now. Returns the planner without them and the steps that remove
    /// them from the table: flush (the origin was flushed by the caller; this makes earlier
    /// COW writes durable too, as the kernel's `REQ_PREFLUSH`), then the area's sectors from
    /// the one holding the first removed entry to the one holding the last (or to the end of
    /// the chunk when the tail on disk is not clean) with both fields of each removed entry
    /// zero, FUA. A torn write leaves a shorter table whose every dropped entry is merged.
    /// `next_free` becomes what the kernel's would be had every entry been committed in
    /// order: right after the last entry left in the area. `self` is unchanged, so a failed
    /// write can be retried.
    pub fn commit_merge(&self, n: usize) -> Result<(Planner, Vec<MetaStep>)> {
        if n == 0 || n > self.area.len() {
            return Err(Error::Invalid(format!(
                "merge: cannot remove {n} entries from an area holding {}",
                self.area.len()
            )));
        }
        let mut next = self.clone();
        let keep = self.area.len() - n;
        next.area.truncate(keep);
        next.next_free = self
            .geo
            .area_location(self.current_area)
            .0
            .saturating_add(keep as u64)
            .saturating_add(1);
        next.rewrite_tail = false;
        let steps = vec![
            MetaStep::Flush,
            area_write(
                &self.geo,
                self.current_area,
                &next.area,
                keep..self.area.len(),
                self.rewrite_tail,
            ),
        ];
        Ok((next, steps))
    }
}

/// The FUA write of area `area`, holding `entries` as they are after a change to the entry
/// slots `slots`: whole sectors from the one holding the first changed slot to the one
/// holding the last (to the chunk's end when `whole_tail`: the tail on disk is not clean),
/// encoding the entries from that sector's first slot on and zeros after them. Within one
/// chunk (at most 1 GiB).
fn area_write(
    geo: &Geometry,
    area: u64,
    entries: &[Exception],
    slots: std::ops::Range<usize>,
    whole_tail: bool,
) -> MetaStep {
    let start = (slots.start * format::ENTRY_BYTES) as u64 / SECTOR_SIZE * SECTOR_SIZE;
    let end = if whole_tail {
        geo.chunk_size().bytes()
    } else {
        ((slots.end * format::ENTRY_BYTES) as u64).div_ceil(SECTOR_SIZE) * SECTOR_SIZE
    };
    let mut buf = vec![0u8; mem_usize(end - start)];
    let from = mem_usize(start) / format::ENTRY_BYTES;
    format::encode_entries(&mut buf, entries.get(from..).unwrap_or_default());
    MetaStep::Write {
        offset: geo.area_offset(area) + start,
        data: buf,
        fua: true,
        area: true,
    }
}

/// The steps that format a fresh store: zero area 0, flush, then the header with FUA. A
/// crash before the header is durable leaves magic 0: the store is still fresh.
pub fn format_steps(chunk_size: ChunkSize) -> Vec<MetaStep> {
    format_steps_as(chunk_size, format::TableKind::Snapshot)
}

/// [`format_steps`] for a table of `kind`.
pub fn format_steps_as(chunk_size: ChunkSize, kind: format::TableKind) -> Vec<MetaStep> {
    let geo = Geometry::new(chunk_size);
    vec![
        MetaStep::Zero {
            offset: geo.area_offset(0),
            len: chunk_size.bytes(),
        },
        MetaStep::Flush,
        MetaStep::Write {
            offset: 0,
            data: format::encode_header_as(true, chunk_size, kind),
            fua: true,
            area: false,
        },
    ]
}

/// The step that marks a store invalid: the header with `valid = 0`, FUA.
pub fn invalidate_steps(chunk_size: ChunkSize) -> Vec<MetaStep> {
    invalidate_steps_as(chunk_size, format::TableKind::Snapshot)
}

/// [`invalidate_steps`] for a table of `kind`.
pub fn invalidate_steps_as(chunk_size: ChunkSize, kind: format::TableKind) -> Vec<MetaStep> {
    vec![MetaStep::Write {
        offset: 0,
        data: format::encode_header_as(false, chunk_size, kind),
        fua: true,
        area: false,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs8() -> ChunkSize {
        ChunkSize::from_sectors(8).unwrap()
    }

    #[test]
    fn allocation_skips_area_slots_and_stops_at_the_end() {
        let mut p = Planner::fresh(cs8());
        let got: Vec<u64> = (0..257).map(|_| p.allocate(10_000).unwrap().0).collect();
        assert_eq!(got[0], 2);
        assert_eq!(got[255], 257);
        assert_eq!(got[256], 259, "chunk 258 is area 1");
        let mut small = Planner::fresh(cs8());
        assert_eq!(small.allocate(4).unwrap(), Chunk(2));
        assert_eq!(small.allocate(4).unwrap(), Chunk(3));
        assert!(matches!(small.allocate(4), Err(Error::CowFull { .. })));
        assert_eq!(small.allocated_sectors(), 32);
    }

    #[test]
    fn a_full_area_needs_room_for_the_next_one() {
        // Header, area 0 and 256 data chunks, but no room for area 1 at chunk 258.
        let mut p = Planner::fresh(cs8());
        for _ in 0..255 {
            p.allocate(258).unwrap();
        }
        assert!(
            matches!(p.allocate(258), Err(Error::CowFull { .. })),
            "the 256th entry would fill area 0 and area 1 does not fit"
        );
        let mut q = Planner::fresh(cs8());
        for _ in 0..256 {
            q.allocate(259).unwrap();
        }
    }

    #[test]
    fn commit_plans_zero_flush_then_fua_area_writes() {
        let mut p = Planner::fresh(cs8());
        let es: Vec<Exception> = (0..3)
            .map(|i| Exception {
                old: Chunk(10 + i),
                new: p.allocate(1000).unwrap(),
            })
            .collect();
        let steps = p.commit(&es[..2]);
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0], MetaStep::Flush);
        match &steps[1] {
            MetaStep::Write {
                offset, data, fua, ..
            } => {
                assert_eq!(*offset, 4096);
                assert_eq!(data.len(), 512);
                assert!(*fua);
                assert_eq!(
                    &data[..16],
                    &[10, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]
                );
                assert!(data[32..].iter().all(|&b| b == 0));
            }
            s => panic!("{s:?}"),
        }
        assert_eq!(p.outstanding(), 1);
        assert_eq!(p.commit(&es[2..]).len(), 2);
        assert_eq!(p.current_entries().len(), 3);
        assert_eq!(p.metadata_sectors(), 16);
        assert!(p.commit(&[]).is_empty());
    }

    #[test]
    fn filling_an_area_zeroes_the_next_first_and_moves_on() {
        let mut p = Planner::fresh(cs8());
        let es: Vec<Exception> = (0..300)
            .map(|i| Exception {
                old: Chunk(i),
                new: p.allocate(1000).unwrap(),
            })
            .collect();
        p.commit(&es[..250]);
        let steps = p.commit(&es[250..]);
        // zero area 1, flush, write area 0 (tail), write area 1.
        assert_eq!(
            steps[0],
            MetaStep::Zero {
                offset: 258 * 4096,
                len: 4096
            }
        );
        assert_eq!(steps[1], MetaStep::Flush);
        let offsets: Vec<u64> = steps[2..]
            .iter()
            .map(|s| match s {
                MetaStep::Write { offset, .. } => *offset,
                s => panic!("{s:?}"),
            })
            .collect();
        assert_eq!(offsets, vec![4096 + 3584, 258 * 4096]);
        assert_eq!(p.current_area(), 1);
        assert_eq!(p.current_entries().len(), 44);
        assert_eq!(p.current_entries()[0].new, Chunk(259));
        assert_eq!(p.metadata_sectors(), 24);
    }

    #[test]
    fn loaded_state_resumes_after_the_largest_chunk() {
        let p = Planner::loaded(cs8(), 1, vec![Exception::new(1, 259)], Some(259), false);
        assert_eq!(p.next_free(), 260);
        let q = Planner::loaded(cs8(), 0, vec![], Some(257), false);
        assert_eq!(q.next_free(), 259, "258 is an area slot");
        let r = Planner::loaded(cs8(), 0, vec![], None, false);
        assert_eq!(r.next_free(), 2);
        let mut t = Planner::loaded(cs8(), 0, vec![Exception::new(1, 2)], Some(2), true);
        let c = t.allocate(100).unwrap();
        match &t.commit(&[Exception {
            old: Chunk(5),
            new: c,
        }])[1]
        {
            MetaStep::Write { offset, data, .. } => {
                assert_eq!((*offset, data.len()), (4096, 4096), "tail rewritten once")
            }
            s => panic!("{s:?}"),
        }
    }

    /// A dense table of `n` entries at 4 KiB chunks, committed in order.
    fn dense(n: u64) -> Planner {
        let mut p = Planner::fresh(cs8());
        let es: Vec<Exception> = (0..n)
            .map(|i| Exception {
                old: Chunk(1000 + i),
                new: p.allocate(100_000).unwrap(),
            })
            .collect();
        p.commit(&es);
        p
    }

    #[test]
    fn merge_zeroes_the_tail_and_sets_next_free_as_the_kernel() {
        let p = dense(300);
        assert_eq!((p.current_area(), p.current_entries().len()), (1, 44));
        assert_eq!(p.merge_remaining(), 300);
        let batch = p.merge_batch(10).to_vec();
        assert_eq!(batch.len(), 10);
        assert_eq!(batch[9].old, Chunk(1299), "the newest entry is last");
        let (q, steps) = p.commit_merge(10).unwrap();
        assert_eq!(steps[0], MetaStep::Flush);
        match &steps[1] {
            MetaStep::Write {
                offset, data, fua, ..
            } => {
                // Entries 34..44 of area 1: bytes 544..704, sectors 512..1024.
                assert_eq!(*offset, 258 * 4096 + 512);
                assert_eq!(data.len(), 512);
                assert!(*fua);
                // Entries 32 and 33 stay, the rest of the sector is zero.
                assert_eq!(&data[..8], &1288u64.to_le_bytes());
                assert!(data[32..].iter().all(|&b| b == 0));
            }
            s => panic!("{s:?}"),
        }
        assert_eq!(q.current_entries().len(), 34);
        // area_location(1) = 258, plus 34 entries, plus 1.
        assert_eq!(q.next_free(), 258 + 34 + 1);
        assert_eq!(q.allocated_sectors(), (258 + 35) * 8);
        assert_eq!(q.metadata_sectors(), 24);
        assert_eq!(
            p.current_entries().len(),
            44,
            "the planner itself is unchanged"
        );
    }

    #[test]
    fn merge_steps_back_through_full_areas_to_done() {
        let p = dense(256 + 3);
        let (q, _) = p.commit_merge(3).unwrap();
        assert_eq!(q.merge_needs_area(), Some(0));
        assert!(q.merge_batch(8).is_empty());
        assert_eq!(
            q.next_free(),
            258 + 1,
            "the kernel's value before stepping back"
        );
        let mut r = q.clone();
        assert!(r.step_back(vec![Exception::new(1, 2)]).is_err(), "not full");
        let area0: Vec<Exception> = (0..256).map(|i| Exception::new(1000 + i, 2 + i)).collect();
        r.step_back(area0).unwrap();
        assert_eq!((r.current_area(), r.merge_remaining()), (0, 256));
        assert_eq!(r.metadata_sectors(), 16);
        let (s, steps) = r.commit_merge(256).unwrap();
        match &steps[1] {
            MetaStep::Write { offset, data, .. } => {
                assert_eq!((*offset, data.len()), (4096, 4096));
                assert!(data.iter().all(|&b| b == 0));
            }
            st => panic!("{st:?}"),
        }
        assert_eq!(s.merge_needs_area(), None);
        assert_eq!(s.merge_remaining(), 0);
        // Done: a == m, as the kernel's status shows it.
        assert_eq!(s.allocated_sectors(), s.metadata_sectors());
        assert!(s.commit_merge(1).is_err());
    }

    #[test]
    fn format_and_invalidate_steps() {
        let f = format_steps(cs8());
        assert_eq!(
            f[0],
            MetaStep::Zero {
                offset: 4096,
                len: 4096
            }
        );
        assert_eq!(f[1], MetaStep::Flush);
        assert!(
            matches!(&f[2], MetaStep::Write { offset: 0, fua: true, data, .. } if data[4] == 1)
        );
        assert!(
            matches!(&invalidate_steps(cs8())[0], MetaStep::Write { offset: 0, fua: true, data, .. } if data[4] == 0)
        );
    }
}
