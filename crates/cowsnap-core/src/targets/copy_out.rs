//! The copy-out plan of an origin write: which chunks this request copies to which
//! snapshots, which pending exceptions of other requests it waits on, and which chunks'
//! snapshot reads it lets drain before it writes the origin.
//!
//! Planning is pure: [`CopyOutPlan::route`] asks a routing function about each (snapshot,
//! chunk) pair and arranges the answers; it does no I/O. The origin's executor
//! ([`Origin`](super::Origin)) routes through the exception tracker, then carries the plan
//! out in the fixed order of ARCHITECTURE.md, "The origin write". Tests drive the planner
//! with made-up routes, without devices.
//!
//! Every run owns its pending exceptions, per snapshot, so a run whose copy fails gives up
//! exactly its own exceptions: no positions in shared batches to keep in step.

use std::ops::Range;
use std::sync::Arc;

use crate::error::Error;
use crate::exception::PendingException;
use crate::units::{Chunk, ChunkSize};

/// What routing one chunk in one snapshot found. `O` is the owned pending exception
/// (the tracker's [`OwnedPending`](crate::exception::OwnedPending) in the engine).
#[derive(Debug)]
pub(crate) enum Routed<O> {
    /// The snapshot takes no copy-outs (it is invalid).
    Skip,
    /// The chunk has a completed exception; snapshot reads routed to the origin before it
    /// completed may still be running.
    Remapped {
        /// Reads of the origin chunk may still be in flight.
        reads_in_flight: bool,
    },
    /// Another request is copying the chunk: wait for it.
    Wait(Arc<PendingException>),
    /// This request made the exception `chunk -> new` and must copy and commit it.
    Own {
        /// The COW chunk allocated.
        new: Chunk,
        /// The pending exception now owned.
        owned: O,
    },
    /// No exception could be made (the COW is full): the snapshot must be invalidated
    /// before the origin is written.
    Failed(Error),
}

/// How a run's data reaches the COWs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// Read by the request, written through the origin's copy-out batcher together with
    /// other requests' copy-outs.
    Batched,
    /// Copied by the copier in segments (a run past the request's share of one segment).
    Direct,
}

/// One snapshot's part of a run: consecutive COW chunks from `new_first`, one per chunk.
#[derive(Debug)]
pub(crate) struct RunDest<O> {
    /// Index of the snapshot in the origin's list.
    pub snap: usize,
    /// The COW chunk of the run's first chunk.
    pub new_first: Chunk,
    /// The run's pending exceptions in this snapshot, in chunk order.
    pub owned: Vec<O>,
}

/// Origin chunks `first..first+chunks` (one chunk size), copied with one read to every
/// destination.
#[derive(Debug)]
pub(crate) struct CopyRun<O> {
    /// The chunk size of every destination.
    pub chunk_size: ChunkSize,
    /// The first origin chunk.
    pub first: Chunk,
    /// How many chunks.
    pub chunks: u64,
    /// The origin bytes the run covers (the last chunk clipped at the origin's end).
    pub bytes: Range<u64>,
    /// The snapshots it is copied to.
    pub dests: Vec<RunDest<O>>,
    /// How it is copied.
    pub path: Path,
}

impl<O> CopyRun<O> {
    /// The run's length in bytes.
    pub fn len(&self) -> u64 {
        self.bytes.end - self.bytes.start
    }

    /// The run's origin chunks.
    pub fn chunk_list(&self) -> impl Iterator<Item = Chunk> + Clone + use<O> {
        (self.first.0..self.first.0 + self.chunks).map(Chunk)
    }

    /// True when `c`, owned by exactly `owners` (snapshot, new chunk) in that order, goes
    /// on this run.
    fn continued_by(&self, c: Chunk, owners: &[(usize, Chunk, O)]) -> bool {
        c.0 == self.first.0 + self.chunks
            && owners.len() == self.dests.len()
            && owners
                .iter()
                .zip(&self.dests)
                .all(|((i, new, _), d)| *i == d.snap && new.0 == d.new_first.0 + self.chunks)
    }
}

/// A snapshot group: consecutive entries of the origin's list with one chunk size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Group {
    /// Their chunk size.
    pub chunk_size: ChunkSize,
    /// Their indices in the origin's list.
    pub snaps: Range<usize>,
}

/// Splits the chunk sizes of the origin's snapshots (sorted) into groups.
pub(crate) fn groups(chunk_sizes: impl IntoIterator<Item = ChunkSize>) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for (i, cs) in chunk_sizes.into_iter().enumerate() {
        match out.last_mut() {
            Some(g) if g.chunk_size == cs => g.snaps.end = i + 1,
            _ => out.push(Group {
                chunk_size: cs,
                snaps: i..i + 1,
            }),
        }
    }
    out
}

/// The plan of one origin write's copy-out.
#[derive(Debug)]
pub(crate) struct CopyOutPlan<O> {
    /// The runs this request copies, in routing order.
    pub runs: Vec<CopyRun<O>>,
    /// Pending exceptions of other requests to wait on: (snapshot, chunk, exception).
    pub waits: Vec<(usize, Chunk, Arc<PendingException>)>,
    /// Remapped chunks whose snapshot reads of the origin must drain: (snapshot, chunk).
    pub drains: Vec<(usize, Chunk)>,
    /// Snapshots that could not make an exception, with the error.
    pub failed: Vec<(usize, Error)>,
}

impl<O> CopyOutPlan<O> {
    /// Routes every chunk of `offset..offset+len` in every snapshot of every group, asking
    /// `route(snapshot, chunk)`. Consecutive chunks owned by the same snapshots at
    /// consecutive COW chunks form one run. After a snapshot fails, it is not asked again.
    /// Runs are then given a [`Path`]: in order, as long as their total fits in `segment`
    /// bytes they are batched, the rest is direct.
    pub fn route(
        groups: &[Group],
        offset: u64,
        len: u64,
        origin_size: u64,
        segment: u64,
        mut route: impl FnMut(usize, Chunk) -> Routed<O>,
    ) -> Self {
        let mut plan = CopyOutPlan {
            runs: Vec::new(),
            waits: Vec::new(),
            drains: Vec::new(),
            failed: Vec::new(),
        };
        for g in groups {
            for c in g.chunk_size.chunk_range(offset, len).map(Chunk) {
                let owners = plan.route_chunk(g, c, &mut route);
                plan.place(g.chunk_size, c, owners, origin_size);
            }
        }
        plan.assign_paths(segment);
        plan
    }

    /// Routes chunk `c` in every snapshot of `g`; returns those where this request owns it.
    fn route_chunk(
        &mut self,
        g: &Group,
        c: Chunk,
        route: &mut impl FnMut(usize, Chunk) -> Routed<O>,
    ) -> Vec<(usize, Chunk, O)> {
        let mut owners = Vec::new();
        for i in g.snaps.clone() {
            if self.failed.iter().any(|(f, _)| *f == i) {
                continue;
            }
            match route(i, c) {
                Routed::Skip => {}
                Routed::Remapped { reads_in_flight } => {
                    if reads_in_flight {
                        self.drains.push((i, c));
                    }
                }
                Routed::Wait(p) => self.waits.push((i, c, p)),
                Routed::Own { new, owned } => owners.push((i, new, owned)),
                Routed::Failed(e) => self.failed.push((i, e)),
            }
        }
        owners
    }

    /// Puts chunk `c`'s owners on the last run when they continue it, else on a new run.
    fn place(&mut self, cs: ChunkSize, c: Chunk, owners: Vec<(usize, Chunk, O)>, size: u64) {
        if owners.is_empty() {
            return;
        }
        let chunk_end = (cs.byte_offset(c) + cs.bytes()).min(size);
        match self.runs.last_mut() {
            Some(run) if run.chunk_size == cs && run.continued_by(c, &owners) => {
                run.chunks += 1;
                run.bytes.end = chunk_end;
                for (d, (_, _, owned)) in run.dests.iter_mut().zip(owners) {
                    d.owned.push(owned);
                }
            }
            _ => self.runs.push(CopyRun {
                chunk_size: cs,
                first: c,
                chunks: 1,
                bytes: cs.byte_offset(c)..chunk_end,
                dests: owners
                    .into_iter()
                    .map(|(snap, new_first, owned)| RunDest {
                        snap,
                        new_first,
                        owned: vec![owned],
                    })
                    .collect(),
                path: Path::Direct,
            }),
        }
    }

    /// Batches the runs, in order, while their total fits in `segment` bytes: a request
    /// holds at most that much data at once, as in a direct copy.
    fn assign_paths(&mut self, segment: u64) {
        let mut total = 0u64;
        for run in &mut self.runs {
            if total + run.len() <= segment {
                total += run.len();
                run.path = Path::Batched;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 4096;

    fn cs(sectors: u64) -> ChunkSize {
        ChunkSize::from_sectors(sectors).unwrap()
    }

    /// A route table: (snapshot, chunk) -> what routing finds; unlisted pairs are owned at
    /// `100 * (snapshot + 1) + chunk` (consecutive chunks at consecutive COW chunks).
    fn plan(
        sizes: &[ChunkSize],
        offset: u64,
        len: u64,
        segment: u64,
        special: impl Fn(usize, Chunk) -> Option<Routed<Chunk>>,
    ) -> CopyOutPlan<Chunk> {
        CopyOutPlan::route(
            &groups(sizes.iter().copied()),
            offset,
            len,
            1 << 30,
            segment,
            |i, c| {
                special(i, c).unwrap_or_else(|| {
                    let new = Chunk(100 * (i as u64 + 1) + c.0);
                    Routed::Own { new, owned: c }
                })
            },
        )
    }

    /// A run as (first chunk, chunks, (snapshot, first COW chunk) per destination, path).
    type Shape = (u64, u64, Vec<(usize, u64)>, Path);

    fn shape(p: &CopyOutPlan<Chunk>) -> Vec<Shape> {
        p.runs
            .iter()
            .map(|r| {
                let dests = r.dests.iter().map(|d| (d.snap, d.new_first.0)).collect();
                (r.first.0, r.chunks, dests, r.path)
            })
            .collect()
    }

    #[test]
    fn snapshots_of_one_chunk_size_share_one_run() {
        let p = plan(&[cs(8), cs(8)], 0, 4 * CS, 1 << 20, |_, _| None);
        assert_eq!(shape(&p), [(0, 4, vec![(0, 100), (1, 200)], Path::Batched)]);
        assert_eq!(p.runs[0].bytes, 0..4 * CS);
        assert_eq!(
            p.runs[0].dests[1].owned,
            [Chunk(0), Chunk(1), Chunk(2), Chunk(3)]
        );
        assert!(p.waits.is_empty() && p.drains.is_empty() && p.failed.is_empty());
    }

    #[test]
    fn a_chunk_owned_by_fewer_snapshots_or_elsewhere_on_the_cow_starts_a_new_run() {
        let p = plan(&[cs(8), cs(8)], 0, 4 * CS, 1 << 20, |i, c| match (i, c.0) {
            (1, 1) => Some(Routed::Remapped {
                reads_in_flight: true,
            }),
            (0, 3) => Some(Routed::Own {
                new: Chunk(7),
                owned: c,
            }),
            _ => None,
        });
        assert_eq!(
            shape(&p),
            [
                (0, 1, vec![(0, 100), (1, 200)], Path::Batched),
                (1, 1, vec![(0, 101)], Path::Batched),
                (2, 1, vec![(0, 102), (1, 202)], Path::Batched),
                (3, 1, vec![(0, 7), (1, 203)], Path::Batched),
            ]
        );
        assert_eq!(p.drains, [(1, Chunk(1))]);
    }

    #[test]
    fn groups_of_other_chunk_sizes_get_their_own_runs() {
        // Sorted largest first, as the origin keeps them.
        let sizes = [cs(16), cs(8), cs(8)];
        assert_eq!(
            groups(sizes),
            [
                Group {
                    chunk_size: cs(16),
                    snaps: 0..1
                },
                Group {
                    chunk_size: cs(8),
                    snaps: 1..3
                }
            ]
        );
        let p = plan(&sizes, CS, 2 * CS, 1 << 20, |_, _| None);
        assert_eq!(
            shape(&p),
            [
                (0, 2, vec![(0, 100)], Path::Batched),
                (1, 2, vec![(1, 201), (2, 301)], Path::Batched),
            ]
        );
        assert_eq!(p.runs[0].bytes, 0..4 * CS);
        assert_eq!(p.runs[1].bytes, CS..3 * CS);
    }

    #[test]
    fn waits_are_kept_and_a_failed_snapshot_is_not_asked_again() {
        let pending = Arc::new(PendingException::default());
        let asked = std::cell::RefCell::new(Vec::new());
        let p = plan(&[cs(8), cs(8)], 0, 3 * CS, 1 << 20, |i, c| {
            asked.borrow_mut().push((i, c.0));
            match (i, c.0) {
                (0, 0) => Some(Routed::Wait(pending.clone())),
                (1, 1) => Some(Routed::Failed(Error::CowFull {
                    allocated: 1,
                    total: 1,
                })),
                _ => None,
            }
        });
        assert_eq!(asked.into_inner(), [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]);
        assert_eq!(p.waits.len(), 1);
        assert_eq!((p.waits[0].0, p.waits[0].1), (0, Chunk(0)));
        assert_eq!(p.failed.len(), 1);
        assert_eq!(
            shape(&p),
            [
                (0, 1, vec![(1, 200)], Path::Batched),
                (1, 2, vec![(0, 101)], Path::Batched),
            ]
        );
    }

    #[test]
    fn runs_past_one_segment_are_copied_directly_and_the_last_chunk_is_clipped() {
        let p = CopyOutPlan::route(&groups([cs(8)]), 0, 6 * CS, 5 * CS + 512, 4 * CS, |_, c| {
            // Three runs: chunks 0-1, 2-3, 4-5 (a gap in the COW between them).
            Routed::Own {
                new: Chunk(c.0 * 2 - c.0 % 2),
                owned: c,
            }
        });
        let paths: Vec<_> = p
            .runs
            .iter()
            .map(|r| (r.first.0, r.len(), r.path))
            .collect();
        assert_eq!(
            paths,
            [
                (0, 2 * CS, Path::Batched),
                (2, 2 * CS, Path::Batched),
                (4, CS + 512, Path::Direct),
            ]
        );
    }

    #[test]
    fn an_invalid_snapshot_is_skipped() {
        let p = plan(&[cs(8), cs(8)], 0, CS, 1 << 20, |i, _| {
            (i == 0).then_some(Routed::Skip)
        });
        assert_eq!(shape(&p), [(0, 1, vec![(1, 200)], Path::Batched)]);
    }
}
