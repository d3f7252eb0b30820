//! The origin target: the live device; every write first copies what it overwrites into
//! every active snapshot.
//!
//! An origin write runs in this order, and only this order:
//! 1. *route*: for each chunk it touches and each active, valid snapshot, find a completed
//!    exception, join a pending one, or create one (allocating its COW chunk);
//! 2. *copy*: for each chunk this request owns in some snapshots, read the origin chunk once
//!    and write it to all of their COW devices (snapshots grouped by chunk size); runs of
//!    consecutive chunks owned by the same snapshots at consecutive COW chunks are copied
//!    with one read and one write per COW. Runs up to a copier segment are read by the
//!    request and written through the origin's [`WriteCombiner`], with the copy-outs of
//!    concurrent requests: per COW, writes touching end to end become one, and the combiner
//!    marks what it wrote ready and lets each store commit it; longer runs are copied here;
//! 3. *commit*: mark every batch ready in its store, then per snapshot one store commit
//!    (data durable before metadata), which the combiner or a commit already running in
//!    another request may have done; complete the pending exceptions, waking requests
//!    queued on them;
//! 4. *wait*: for the pending exceptions other requests own (S3: the write waits on the
//!    exceptions themselves, nothing is moved between them), then for snapshot reads still
//!    reading these chunks from the origin (S1, S4);
//! 5. *write* the origin.
//!
//! A write inside one chunk that some snapshot still needs copied reads that chunk
//! *before* step 1 (the *pre-read*), so that it allocates its COW chunks only once it has
//! the data and goes straight to the combiner: the exceptions it allocates are then ready
//! soon after everything allocated before them, and the combiner's commit of the ready
//! prefix in allocation order covers them, instead of their owners waiting for a later
//! commit behind a request still reading. The bytes read are the ones the snapshot must
//! keep whenever the write ends up owning the exception: owning it means no other write
//! has routed the chunk since the snapshot was activated (that would have left a pending
//! or completed exception), every origin write routes before it writes, and activation
//! never overlaps a write (S2), so the origin chunk did not change between the
//! snapshot's activation and step 1. When the write does not end up owning (another
//! write got there first), the pre-read is dropped.
//!
//! The snapshot list sits behind a read-write lock that writes hold in shared mode from
//! step 1 to 5; activating or removing a snapshot takes it exclusively, so a snapshot
//! joins between writes, never in the middle of one (S2; the kernel's origin suspend).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::snapshot::{OwnedBatch, Snapshot};
use crate::copy::{Copier, CopyDest, CowWrite, WriteCombiner};
use crate::dev::{check_request, AlignedBuf, BlockDevice, Fua};
use crate::error::{Error, Result};
use crate::exception::{PendingException, WriteRoute};
use crate::units::Chunk;

/// The origin: a device with snapshots.
pub struct Origin {
    dev: Arc<dyn BlockDevice>,
    copier: Arc<Copier>,
    /// Active snapshots, sorted by chunk size (largest first, as the kernel keeps them).
    snapshots: RwLock<Vec<Arc<Snapshot>>>,
    activations_waiting: AtomicU64,
    /// Held while a multi-chunk write routes (allocates) its chunks.
    allocation: Mutex<()>,
    /// Writes the copy-outs of concurrent writes together.
    combiner: WriteCombiner,
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origin")
            .field("dev", &self.dev.describe())
            .field("snapshots", &self.snapshots.read().len())
            .finish()
    }
}

impl Origin {
    /// An origin over `dev`, copying through `copier`.
    pub fn new(dev: Arc<dyn BlockDevice>, copier: Arc<Copier>) -> Arc<Origin> {
        Arc::new(Origin {
            dev,
            copier,
            snapshots: RwLock::new(Vec::new()),
            activations_waiting: AtomicU64::new(0),
            allocation: Mutex::new(()),
            combiner: WriteCombiner::new(),
        })
    }

    /// The underlying device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// What the copy-out combiner has done.
    pub fn combiner_stats(&self) -> crate::copy::CombinerStats {
        self.combiner.stats()
    }

    /// The copier shared by this origin's snapshots.
    pub fn copier(&self) -> &Arc<Copier> {
        &self.copier
    }

    /// The active snapshots.
    pub fn snapshots(&self) -> Vec<Arc<Snapshot>> {
        self.snapshots.read().clone()
    }

    /// Activations that found origin writes in flight and are waiting for them to finish
    /// (tests observe S2 by it).
    pub fn activations_waiting(&self) -> u64 {
        self.activations_waiting.load(Ordering::SeqCst)
    }

    /// Activates a loaded snapshot: from now on origin writes copy into it. Waits for
    /// origin writes in flight to finish first, so none of them is half in the snapshot.
    pub fn activate(&self, snap: &Arc<Snapshot>) -> Result<()> {
        if !Arc::ptr_eq(snap.origin_device(), &self.dev) {
            return Err(Error::InvalidArgument(
                "snapshot was loaded for another origin".into(),
            ));
        }
        let mut list = match self.snapshots.try_write() {
            Some(list) => list,
            None => {
                // Origin writes are in flight: wait for them to drain.
                self.activations_waiting.fetch_add(1, Ordering::SeqCst);
                let list = self.snapshots.write();
                self.activations_waiting.fetch_sub(1, Ordering::SeqCst);
                list
            }
        };
        if list.iter().any(|s| Arc::ptr_eq(s, snap)) || snap.is_active() {
            return Err(Error::Busy("snapshot is already active".into()));
        }
        list.push(snap.clone());
        list.sort_by_key(|s| std::cmp::Reverse(s.chunk_size()));
        snap.active.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Deactivates a snapshot: origin writes stop copying into it and its I/O fails.
    /// Waits for origin writes in flight to finish first.
    pub fn deactivate(&self, snap: &Arc<Snapshot>) -> Result<()> {
        let mut list = self.snapshots.write();
        let before = list.len();
        list.retain(|s| !Arc::ptr_eq(s, snap));
        if list.len() == before {
            return Err(Error::InvalidArgument("snapshot is not active".into()));
        }
        snap.active.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Steps 1 to 4 of an origin write of `offset..offset+len`: after it returns, every
    /// active valid snapshot holds its own copy of every chunk in the range, and no snapshot
    /// read of those chunks is still reading the origin.
    fn copy_out(&self, snaps: &[Arc<Snapshot>], offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        // (snapshot index, chunk) pairs whose tracked reads must drain before the write.
        let mut drains: Vec<(usize, Chunk)> = Vec::new();
        let mut waits: Vec<(usize, Chunk, Arc<PendingException>)> = Vec::new();
        let mut batches: Vec<OwnedBatch> = (0..snaps.len()).map(|_| Vec::new()).collect();
        let mut runs: Vec<(usize, CopyRun)> = Vec::new();
        // A write over several chunks routes under the origin's allocation lock, so the COW
        // chunks it allocates are consecutive and its copies go in few runs even when other
        // writes allocate at the same time. Only in-memory routing runs under it, no I/O.
        let multi_chunk = snaps
            .iter()
            .map(|s| s.chunk_size())
            .min()
            .is_some_and(|cs| cs.chunk_range(offset, len).count() > 1);
        let pre = if multi_chunk {
            None
        } else {
            self.pre_read(snaps, offset)
        };
        let alloc_guard = multi_chunk.then(|| self.allocation.lock());
        let mut group_start = 0;
        while group_start < snaps.len() {
            let cs = snaps[group_start].chunk_size();
            let group_end = snaps[group_start..]
                .iter()
                .position(|s| s.chunk_size() != cs)
                .map_or(snaps.len(), |p| group_start + p);
            // Consecutive chunks owned by the same snapshots, each landing on consecutive
            // COW chunks, are copied as one run: one origin read, one write per COW.
            let mut run: Option<CopyRun> = None;
            for c in cs.chunk_range(offset, len).map(Chunk) {
                let mut owners: Vec<(usize, Chunk)> = Vec::new();
                for (i, s) in snaps.iter().enumerate().take(group_end).skip(group_start) {
                    if !s.is_valid() {
                        continue;
                    }
                    match s.exceptions().route_write(c, |old| s.store().prepare(old)) {
                        Ok(WriteRoute::Remapped {
                            reads_in_flight, ..
                        }) => {
                            if reads_in_flight {
                                drains.push((i, c));
                            }
                        }
                        Ok(WriteRoute::Wait(p)) => waits.push((i, c, p)),
                        Ok(WriteRoute::Own(o)) => {
                            owners.push((i, o.exception.new));
                            batches[i].push(s.own(o));
                        }
                        Err(e) => s.invalidate(&format!("unable to allocate exception: {e}")),
                    }
                }
                if let Some(r) = run.as_mut() {
                    if r.extends(c, &owners) {
                        r.chunks += 1;
                        continue;
                    }
                }
                if let Some(r) = run.take() {
                    runs.push((group_start, r));
                }
                if !owners.is_empty() {
                    // This chunk's exceptions are the last entry of each owner's batch.
                    let batch_starts = owners.iter().map(|&(i, _)| batches[i].len() - 1).collect();
                    run = Some(CopyRun {
                        first: c,
                        chunks: 1,
                        owners,
                        batch_starts,
                    });
                }
            }
            if let Some(r) = run.take() {
                runs.push((group_start, r));
            }
            group_start = group_end;
        }
        drop(alloc_guard);
        // Runs up to a copier segment are read here and written through the combiner,
        // together with other requests' copy-outs; longer ones are copied directly.
        let outcomes = if runs.is_empty() {
            Vec::new()
        } else {
            self.copy_combined(snaps, &runs, &batches, pre)
        };
        // The combiner marked its runs' exceptions ready itself.
        let copied_here = outcomes.iter().any(Option::is_none);
        // Last run first: a failed run removes its exceptions from its owners' batches,
        // which must not move the batch positions of runs not handled yet.
        for ((group, r), outcome) in runs.into_iter().zip(outcomes).rev() {
            match outcome {
                None => self.copy_run(snaps, group, r, &mut batches, &mut drains),
                Some(errors) => self.finish_run(snaps, r, errors, &mut batches, &mut drains),
            }
        }
        // Mark every batch ready first, then commit them one by one: a commit already
        // running in another request takes these exceptions along, so the stores' commits
        // overlap. A failed commit invalidates that snapshot; the origin write goes on.
        if copied_here {
            for (i, batch) in batches.iter().enumerate() {
                if !batch.is_empty() {
                    let ready: Vec<_> = batch.iter().map(|o| o.exception).collect();
                    snaps[i].store().mark_ready(&ready);
                }
            }
        }
        for (i, batch) in batches.into_iter().enumerate() {
            let _ = snaps[i].commit_owned(batch);
        }
        for (i, c, p) in waits {
            // A failed exception means its snapshot is invalid now; go on either way.
            let _ = p.wait();
            drains.push((i, c));
        }
        for (i, c) in drains {
            snaps[i].exceptions().wait_reads_drained(c);
        }
    }
}

/// An origin chunk read before routing (see the module docs), with its share of the
/// copier's budget.
struct PreRead<'a> {
    chunk: Chunk,
    data: AlignedBuf,
    budget: crate::copy::Reservation<'a>,
}

impl PreRead<'_> {
    /// True when it holds exactly the run starting at `first` of `len` bytes.
    fn serves(&self, first: Chunk, len: Option<u64>) -> bool {
        self.chunk == first && len == Some(self.data.len() as u64)
    }
}

impl Origin {
    /// Reads the chunk holding `offset` when every snapshot has the same chunk size and
    /// some valid one still needs that chunk copied. `None` when there is nothing to read
    /// or the read failed (step 2 then reads again and reports the failure).
    fn pre_read(&self, snaps: &[Arc<Snapshot>], offset: u64) -> Option<PreRead<'_>> {
        let cs = snaps.first()?.chunk_size();
        if snaps.iter().any(|s| s.chunk_size() != cs) {
            return None;
        }
        let chunk = cs.chunk_of_byte(offset);
        let needed = snaps
            .iter()
            .any(|s| s.is_valid() && s.exceptions().needs_copy(chunk));
        if !needed {
            return None;
        }
        let len = snaps[0].origin_chunk_len(chunk);
        let budget = self.copier.reserve(len as usize);
        let mut data = AlignedBuf::zeroed(len as usize);
        self.dev.read_at(&mut data, cs.byte_offset(chunk)).ok()?;
        Some(PreRead {
            chunk,
            data,
            budget,
        })
    }
}

/// Chunks `first..first+chunks` of the origin, to be copied to the same snapshots, each
/// of which allocated consecutive COW chunks for them starting at the chunk given.
struct CopyRun {
    first: Chunk,
    chunks: u64,
    owners: Vec<(usize, Chunk)>,
    /// Where the run's exceptions start in each owner's batch (same order as `owners`).
    batch_starts: Vec<usize>,
}

impl CopyRun {
    /// True when chunk `c`, owned by `owners` at those COW chunks, continues this run.
    fn extends(&self, c: Chunk, owners: &[(usize, Chunk)]) -> bool {
        c.0 == self.first.0 + self.chunks
            && owners.len() == self.owners.len()
            && owners
                .iter()
                .zip(&self.owners)
                .all(|(&(i, new), &(j, start))| i == j && new.0 == start.0 + self.chunks)
    }
}

impl Origin {
    /// Copies a run: reads the origin range once (clipped at the origin's end) and writes
    /// it to each owner's COW. A failed destination fails that snapshot's exceptions of the
    /// run; the others are ready to commit.
    fn copy_run(
        &self,
        snaps: &[Arc<Snapshot>],
        group: usize,
        run: CopyRun,
        batches: &mut [OwnedBatch],
        drains: &mut Vec<(usize, Chunk)>,
    ) {
        let cs = snaps[group].chunk_size();
        let start = cs.byte_offset(run.first);
        let len = run_len(snaps, group, &run);
        let dests: Vec<CopyDest<'_>> = run
            .owners
            .iter()
            .map(|&(i, new)| CopyDest {
                dev: &**snaps[i].cow(),
                offset: cs.byte_offset(new),
            })
            .collect();
        let report = self.copier.copy(&*self.dev, start, len, &dests, None);
        let errors = (0..run.owners.len())
            .map(|k| report.dest_error(k))
            .collect();
        self.finish_run(snaps, run, errors, batches, drains);
    }
}

impl Origin {
    /// Reads the runs that fit in one copier segment together and writes them to their
    /// owners' COWs through the combiner. Returns, per run, `None` (not handled: copy it directly) or each
    /// owner's error.
    fn copy_combined(
        &self,
        snaps: &[Arc<Snapshot>],
        runs: &[(usize, CopyRun)],
        batches: &[OwnedBatch],
        pre: Option<PreRead<'_>>,
    ) -> Vec<Option<Vec<Option<String>>>> {
        let mut outcomes: Vec<Option<Vec<Option<String>>>> = vec![None; runs.len()];
        let segment = self.copier.segment() as u64;
        // The runs handed over, in order, until they hold one segment of data in all: a
        // request holds at most that much at once, as in a direct copy; the rest of a long
        // request's runs (a large discard over scattered remapped chunks) is copied directly.
        let mut total = 0u64;
        let handed_len: Vec<Option<u64>> = runs
            .iter()
            .map(|(g, r)| {
                let len = run_len(snaps, *g, r);
                (total + len <= segment).then(|| {
                    total += len;
                    len
                })
            })
            .collect();
        if total == 0 {
            return outcomes;
        }
        // The pre-read serves the handed run that is exactly its chunk and keeps its own
        // reservation until the copy is done; one that serves none is given back before more
        // is taken, so no request holds budget while waiting for it.
        let served = pre.as_ref().and_then(|p| {
            runs.iter()
                .zip(&handed_len)
                .position(|((_, r), len)| p.serves(r.first, *len))
        });
        let pre = pre.filter(|_| served.is_some());
        let pre_len = pre.as_ref().map_or(0, |p| p.data.len() as u64);
        let _budget = self.copier.reserve((total - pre_len) as usize);
        let (mut pre_data, _pre_budget) = pre.map(|p| (p.data, p.budget)).unzip();
        let mut writes = Vec::new();
        // (run, first write, owners) of the runs handed to the combiner.
        let mut handed: Vec<(usize, usize, usize)> = Vec::new();
        for (k, ((group, r), len)) in runs.iter().zip(handed_len).enumerate() {
            let Some(len) = len else { continue };
            let cs = snaps[*group].chunk_size();
            let data = match pre_data.take_if(|_| served == Some(k)) {
                Some(d) => d,
                None => {
                    let mut buf = AlignedBuf::zeroed(len as usize);
                    if let Err(e) = self.dev.read_at(&mut buf, cs.byte_offset(r.first)) {
                        let why = Some(format!("copy read failed: {e}"));
                        outcomes[k] = Some(vec![why; r.owners.len()]);
                        continue;
                    }
                    buf
                }
            };
            let data = Arc::new(data);
            handed.push((k, writes.len(), r.owners.len()));
            for (&(i, new), &from) in r.owners.iter().zip(&r.batch_starts) {
                let to = (from + r.chunks as usize).min(batches[i].len());
                writes.push(CowWrite {
                    dev: snaps[i].cow().clone(),
                    offset: cs.byte_offset(new),
                    data: data.clone(),
                    store: snaps[i].store().clone(),
                    exceptions: batches[i][from..to].iter().map(|o| o.exception).collect(),
                });
            }
        }
        let results = self.combiner.write(writes);
        for (k, first, n) in handed {
            outcomes[k] = Some(results.get(first..first + n).map_or_else(
                || vec![Some("copy-out result missing".to_string()); n],
                <[Option<String>]>::to_vec,
            ));
        }
        outcomes
    }

    /// Settles a run whose copy is done: an owner whose copy failed fails the run's
    /// exceptions; the others' chunks join the drains.
    fn finish_run(
        &self,
        snaps: &[Arc<Snapshot>],
        run: CopyRun,
        errors: Vec<Option<String>>,
        batches: &mut [OwnedBatch],
        drains: &mut Vec<(usize, Chunk)>,
    ) {
        for (k, &(i, _)) in run.owners.iter().enumerate() {
            if let Some(Some(why)) = errors.get(k) {
                let from = run.batch_starts[k];
                let to = (from + run.chunks as usize).min(batches[i].len());
                for o in batches[i].drain(from..to).collect::<Vec<_>>() {
                    snaps[i].fail_owned(o, why);
                }
            } else {
                drains.extend((0..run.chunks).map(|n| (i, Chunk(run.first.0 + n))));
            }
        }
    }
}

/// Bytes of the origin a run covers (clipped at the origin's end).
fn run_len(snaps: &[Arc<Snapshot>], group: usize, run: &CopyRun) -> u64 {
    let cs = snaps[group].chunk_size();
    let last = Chunk(run.first.0 + run.chunks - 1);
    cs.byte_offset(last) - cs.byte_offset(run.first) + snaps[group].origin_chunk_len(last)
}

impl BlockDevice for Origin {
    fn size(&self) -> u64 {
        self.dev.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.dev.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)?;
        let snaps = self.snapshots.read();
        self.copy_out(&snaps, offset, buf.len() as u64);
        self.dev.write_at(buf, offset, fua)
    }

    fn flush(&self) -> Result<()> {
        self.dev.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self.size(), offset, len)?;
        let snaps = self.snapshots.read();
        self.copy_out(&snaps, offset, len);
        self.dev.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        check_request(self.size(), offset, len)?;
        let snaps = self.snapshots.read();
        self.copy_out(&snaps, offset, len);
        self.dev.write_zeroes(offset, len, fua)
    }

    fn describe(&self) -> String {
        format!("origin({})", self.dev.describe())
    }
}
