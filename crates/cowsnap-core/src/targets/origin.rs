//! The origin target: the live device; every write first copies what it overwrites into
//! every active snapshot.
//!
//! An origin write is planned ([`CopyOutPlan::route`]), then executed here in a fixed order:
//! route, copy (through the [`CopyOutBatcher`] or the copier), commit, wait (S3) and drain
//! (S1, S4), write. ARCHITECTURE.md, "Origin write of `offset..offset+len`", is the one
//! description of the flow and of why each step is where it is, the pre-read included; the
//! functions below name their step.
//!
//! The snapshot list sits behind a read-write lock that writes hold shared from routing to
//! the origin write; activating or removing a snapshot takes it exclusively, so a snapshot
//! joins between writes, never in the middle of one (S2; the kernel's origin suspend).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use super::copy_out::{self, CopyOutPlan, CopyRun, Group, Path, Routed};
use super::merge::{Merge, MergeSettings, WriteOp};
use super::snapshot::Snapshot;
use crate::copy::{BatcherStats, Copier, CopyDest, CopyOutBatcher, CowWrite, Reservation};
use crate::dev::{check_request, AlignedBuf, BlockDevice, Fua};
use crate::error::{Error, Result};
use crate::exception::{OwnedPending, WriteRoute};
use crate::mutation;
use crate::units::{checked_usize, mem_usize, Chunk};

/// The origin: a device with snapshots.
pub struct Origin {
    dev: Arc<dyn BlockDevice>,
    copier: Arc<Copier>,
    /// The active snapshots: writes hold it shared, activation exclusive (S2).
    snapshots: RwLock<Active>,
    activations_waiting: AtomicU64,
    /// Held while a multi-chunk write routes (allocates) its chunks, so its COW chunks are
    /// consecutive and its copies go in few runs. Only in-memory routing runs under it.
    allocation: Mutex<()>,
    /// Writes the copy-outs of concurrent writes together.
    batcher: CopyOutBatcher,
    /// The merge of `snapshots`, for reads, flushes and status: set and cleared together
    /// with it (under its exclusive hold), but its own lock, so that an origin read never
    /// waits behind an activation queued for the snapshot list.
    merging: RwLock<Option<Arc<Merge>>>,
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origin")
            .field("dev", &self.dev.describe())
            .field("snapshots", &self.snapshots.read().list.len())
            .finish()
    }
}

/// The active snapshots, sorted by chunk size (largest first, as the kernel keeps them),
/// and their chunk-size groups, computed when the list changes rather than per write.
#[derive(Clone, Default)]
struct Active {
    list: Vec<Arc<Snapshot>>,
    groups: Vec<Group>,
    /// The snapshot merging into this origin: origin I/O goes through its view.
    merge: Option<Arc<Merge>>,
}

impl Active {
    /// Sorts the list and groups it again after a change.
    fn regroup(&mut self) {
        self.list.sort_by_key(|s| std::cmp::Reverse(s.chunk_size()));
        self.groups = copy_out::groups(self.list.iter().map(|s| s.chunk_size()));
    }
}

/// One request's copies that landed, per snapshot (same order as the origin's list),
/// waiting for their commit.
type Landed = Vec<Vec<OwnedPending>>;

/// An origin chunk read before routing (see the module docs), with its share of the
/// copier's budget.
struct PreRead<'a> {
    chunk: Chunk,
    data: AlignedBuf,
    budget: Reservation<'a>,
}

impl PreRead<'_> {
    /// True when it holds exactly the run's data.
    fn serves(&self, run: &CopyRun<OwnedPending>) -> bool {
        self.chunk == run.first && run.len() == self.data.len() as u64
    }
}

impl Origin {
    /// An origin over `dev`, copying through `copier`.
    pub fn new(dev: Arc<dyn BlockDevice>, copier: Arc<Copier>) -> Arc<Origin> {
        Arc::new(Origin {
            dev,
            copier,
            snapshots: RwLock::new(Active::default()),
            activations_waiting: AtomicU64::new(0),
            allocation: Mutex::new(()),
            batcher: CopyOutBatcher::new(),
            merging: RwLock::new(None),
        })
    }

    /// The underlying device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// What the copy-out batcher has done.
    pub fn batcher_stats(&self) -> BatcherStats {
        self.batcher.stats()
    }

    /// The copier shared by this origin's snapshots.
    pub fn copier(&self) -> &Arc<Copier> {
        &self.copier
    }

    /// The active snapshots.
    pub fn snapshots(&self) -> Vec<Arc<Snapshot>> {
        self.snapshots.read().list.clone()
    }

    /// Activations and deactivations that found origin writes in flight and are waiting
    /// for them to finish (tests observe S2 by it).
    pub fn activations_waiting(&self) -> u64 {
        self.activations_waiting.load(Ordering::SeqCst)
    }

    /// Takes the snapshot list exclusively, counting the wait in
    /// [`activations_waiting`](Self::activations_waiting) while origin writes are in flight.
    fn snapshots_exclusively(&self) -> parking_lot::RwLockWriteGuard<'_, Active> {
        if let Some(active) = self.snapshots.try_write() {
            return active;
        }
        self.activations_waiting.fetch_add(1, Ordering::SeqCst);
        let active = self.snapshots.write();
        self.activations_waiting.fetch_sub(1, Ordering::SeqCst);
        active
    }

    /// Activates a loaded snapshot: from now on origin writes copy into it. Waits for
    /// origin writes in flight to finish first, so none of them is half in the snapshot.
    pub fn activate(&self, snap: &Arc<Snapshot>) -> Result<()> {
        if !Arc::ptr_eq(snap.origin_device(), &self.dev) {
            return Err(Error::InvalidArgument(
                "snapshot was loaded for another origin".into(),
            ));
        }
        let mut active = self.snapshots_exclusively();
        if active.list.iter().any(|s| Arc::ptr_eq(s, snap)) || snap.is_active() {
            return Err(Error::WrongState("snapshot is already active".into()));
        }
        active.list.push(snap.clone());
        active.regroup();
        snap.set_active(true);
        Ok(())
    }

    /// Deactivates a snapshot: origin writes stop copying into it and its I/O fails.
    /// Waits for origin writes in flight to finish first.
    pub fn deactivate(&self, snap: &Arc<Snapshot>) -> Result<()> {
        let mut active = self.snapshots_exclusively();
        let before = active.list.len();
        active.list.retain(|s| !Arc::ptr_eq(s, snap));
        if active.list.len() == before {
            return Err(Error::InvalidArgument("snapshot is not active".into()));
        }
        active.regroup();
        snap.set_active(false);
        Ok(())
    }

    /// Switches the origin to `snap`'s content and starts merging it back (the kernel's
    /// `snapshot-merge` replacing the origin's table): with the snapshot list held
    /// exclusively (origin writes in flight finish first), the snapshot leaves the list (it
    /// takes no more copy-outs and serves no I/O of its own), its store stops allocating
    /// and finishes the commits under way (its own writes under way are waited for), and
    /// origin I/O goes through the merge view.
    /// The caller records the merge durably *before* this call: the merger overwrites the
    /// origin from the first batch on. The index's sidecar is dropped first (the table
    /// will shrink). Refused for an invalid snapshot, another origin's, a store that
    /// cannot merge, or an origin already merging.
    pub fn start_merge(
        self: &Arc<Self>,
        snap: &Arc<Snapshot>,
        settings: MergeSettings,
    ) -> Result<Arc<Merge>> {
        if !Arc::ptr_eq(snap.origin_device(), &self.dev) {
            return Err(Error::InvalidArgument(
                "the snapshot was loaded for another origin".into(),
            ));
        }
        if !snap.is_valid() {
            return Err(Error::Invalid(format!(
                "unable to merge an invalid snapshot: {}",
                snap.invalid_reason().unwrap_or_else(|| "invalid".into())
            )));
        }
        if !snap.store().kind().can_merge() {
            return Err(Error::InvalidArgument(format!(
                "a {} (transient) snapshot cannot merge: its exceptions live only in memory",
                snap.store().kind()
            )));
        }
        if self.merge().is_some() {
            return Err(Error::WrongState(
                "the origin is already merging a snapshot".into(),
            ));
        }
        snap.exceptions().index().forget_sidecar()?;
        let mut active = self.snapshots.write();
        if active.merge.is_some() {
            return Err(Error::WrongState(
                "the origin is already merging a snapshot".into(),
            ));
        }
        let was_active = active.list.iter().any(|s| Arc::ptr_eq(s, snap));
        active.list.retain(|s| !Arc::ptr_eq(s, snap));
        active.regroup();
        snap.set_active(false);
        // Its own writes under way finish first (they could land in a chunk the merger has
        // already copied); then its store stops allocating.
        if !mutation::active("merge-snapshot-writes-not-drained") {
            snap.drain_writes();
        }
        if let Err(e) = snap.store().begin_merge() {
            if was_active {
                active.list.push(snap.clone());
                active.regroup();
                snap.set_active(true);
            }
            return Err(e);
        }
        let merge = Arc::new(Merge::new(snap.clone(), settings));
        active.merge = Some(merge.clone());
        *self.merging.write() = Some(merge.clone());
        drop(active);
        if !settings.paused {
            merge.spawn(self)?;
        }
        Ok(merge)
    }

    /// The merge in progress, if any.
    pub fn merge(&self) -> Option<Arc<Merge>> {
        self.merging.read().clone()
    }

    /// Ends a finished merge: origin I/O goes straight to the device again. Returns the
    /// merge (its snapshot's table is empty). Refused while entries remain.
    pub fn end_merge(&self) -> Result<Arc<Merge>> {
        let mut active = self.snapshots.write();
        match &active.merge {
            None => Err(Error::WrongState("the origin is not merging".into())),
            Some(m) if !m.is_done() => Err(Error::WrongState("the merge has not finished".into())),
            Some(_) => {
                *self.merging.write() = None;
                Ok(active.merge.take().expect("checked above"))
            }
        }
    }

    /// The merger's overwrite of an origin range with a merged chunk's data: the normal
    /// origin write path (copy-outs to every other snapshot, drains), never the view.
    pub(super) fn merge_write(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)?;
        let active = self.snapshots.read();
        if !mutation::active("merge-skips-copy-out") {
            self.copy_out(&active, offset, buf.len() as u64);
        }
        self.dev.write_at(buf, offset, Fua::No)
    }

    /// An origin write (`op` over `offset..offset+len`), through the merge view while a
    /// snapshot merges.
    fn write_op(&self, op: WriteOp<'_>, offset: u64, len: u64) -> Result<()> {
        check_request(self.size(), offset, len)?;
        let active = self.snapshots.read();
        if let Some(merge) = active.merge.clone() {
            // The list is not held while the write may wait for the merger's window: the
            // merger takes it (shared) for each chunk it overwrites, and a deactivation
            // queued meanwhile would block that, so holding it here could deadlock. Each
            // piece for the origin takes it again; a merge only ends once no chunk is left
            // in the table, so such a piece goes to the origin either way.
            drop(active);
            let _held = mutation::active("merge-view-holds-list").then(|| self.snapshots.read());
            return merge.write(op, offset, len, &mut |at, range| {
                let active = self.snapshots.read();
                self.copy_out(&active, at, (range.end - range.start) as u64);
                op.apply(&*self.dev, at, range)
            });
        }
        // The same hold of the list decided "no merge" and covers the write: a merge's
        // switch cannot come in between.
        self.write_locked(active, offset, len, || {
            op.apply(&*self.dev, offset, 0..mem_usize(len))
        })
    }

    /// Runs an origin write of `offset..offset+len`: steps 1 to 4 under the snapshot
    /// list's shared lock, then `write` (step 5) still under it.
    fn write_through(
        &self,
        offset: u64,
        len: u64,
        write: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        check_request(self.size(), offset, len)?;
        self.write_locked(self.snapshots.read(), offset, len, write)
    }

    /// [`write_through`](Self::write_through) with the list already held.
    fn write_locked(
        &self,
        active: RwLockReadGuard<'_, Active>,
        offset: u64,
        len: u64,
        write: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if mutation::active("s2-guard-dropped") {
            let early = active.clone();
            drop(active);
            self.copy_out(&early, offset, len);
            return write();
        }
        self.copy_out(&active, offset, len);
        write()
    }

    /// Steps 1 to 4: after it returns, every active valid snapshot holds its own copy of
    /// every chunk in the range, and no snapshot read of those chunks is still reading the
    /// origin.
    fn copy_out(&self, active: &Active, offset: u64, len: u64) {
        let snaps = &active.list[..];
        if len == 0 || snaps.is_empty() {
            return;
        }
        let Planned { mut plan, pre_read } = self.plan(active, offset, len);
        for (i, e) in plan.failed.drain(..) {
            snaps[i].invalidate(&format!("unable to allocate exception: {e}"));
        }
        let mut drains = std::mem::take(&mut plan.drains);
        let landed = self.copy_runs(snaps, plan.runs, pre_read, &mut drains);
        // A failed commit invalidates that snapshot; the origin write goes on.
        for (snap, batch) in snaps.iter().zip(landed) {
            let _ = snap.commit_owned(batch);
        }
        for (i, c, pending) in plan.waits {
            // A failed exception means its snapshot is invalid now; go on either way.
            if !mutation::active("s3-pending-not-waited") {
                let _ = pending.wait();
            }
            drains.push((i, c));
        }
        for (i, c) in drains {
            snaps[i].exceptions().wait_reads_drained(c);
        }
    }

    /// Step 1 (with the pre-read before it): routes every chunk in every snapshot.
    fn plan(&self, active: &Active, offset: u64, len: u64) -> Planned<'_> {
        let (snaps, groups) = (&active.list[..], &active.groups);
        let multi_chunk = groups
            .iter()
            .map(|g| g.chunk_size)
            .min()
            .is_some_and(|cs| cs.chunk_range(offset, len).count() > 1);
        let pre_read = if multi_chunk {
            None
        } else {
            self.pre_read(snaps, offset)
        };
        let _allocating = multi_chunk.then(|| self.allocation.lock());
        let plan = CopyOutPlan::route(
            groups,
            offset,
            len,
            self.dev.size(),
            self.copier.segment() as u64,
            |i, c| route(&snaps[i], c),
        );
        Planned { plan, pre_read }
    }

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
        // At most one chunk.
        let budget = self.copier.reserve(mem_usize(len));
        let mut data = AlignedBuf::zeroed(mem_usize(len));
        self.dev.read_at(&mut data, cs.byte_offset(chunk)).ok()?;
        Some(PreRead {
            chunk,
            data,
            budget,
        })
    }

    /// Step 2: copies every run (batched ones first); returns what landed, per snapshot.
    /// Chunks that landed join `drains`.
    fn copy_runs(
        &self,
        snaps: &[Arc<Snapshot>],
        runs: Vec<CopyRun<OwnedPending>>,
        pre: Option<PreRead<'_>>,
        drains: &mut Vec<(usize, Chunk)>,
    ) -> Landed {
        let (batched, direct): (Vec<_>, Vec<_>) =
            runs.into_iter().partition(|r| r.path == Path::Batched);
        let mut landed: Landed = snaps.iter().map(|_| Vec::new()).collect();
        for (run, results) in self.copy_batched(snaps, batched, pre) {
            // The batch leader marked the landed exceptions ready itself.
            settle(snaps, run, results, false, &mut landed, drains);
        }
        for run in direct {
            let results = self.copy_direct(snaps, &run);
            settle(snaps, run, results, true, &mut landed, drains);
        }
        landed
    }

    /// Reads the batched runs and hands their COW writes to the batcher, which writes them
    /// with other requests' copy-outs and lets the stores commit them. Returns each run
    /// with the outcome of each destination.
    fn copy_batched(
        &self,
        snaps: &[Arc<Snapshot>],
        runs: Vec<CopyRun<OwnedPending>>,
        pre: Option<PreRead<'_>>,
    ) -> Vec<(CopyRun<OwnedPending>, Vec<Result<()>>)> {
        if runs.is_empty() {
            return Vec::new();
        }
        // The pre-read serves the run that is exactly its chunk and keeps its reservation;
        // one that serves none is given back before more is taken, so no request holds
        // budget while waiting for it.
        let served = pre
            .as_ref()
            .and_then(|p| runs.iter().position(|r| p.serves(r)));
        let (mut pre_data, _pre_budget) = pre
            .filter(|_| served.is_some())
            .map(|p| (p.data, p.budget))
            .unzip();
        let total: u64 = runs.iter().map(CopyRun::len).sum();
        let pre_len = pre_data.as_ref().map_or(0, |d| d.len() as u64);
        // `reserve` clamps to the copier's budget, so saturating changes nothing.
        let _budget = self
            .copier
            .reserve(usize::try_from(total - pre_len).unwrap_or(usize::MAX));
        let mut writes = Vec::new();
        let reads: Vec<Result<()>> = runs
            .iter()
            .enumerate()
            .map(|(k, run)| {
                let data = match pre_data.take_if(|_| served == Some(k)) {
                    Some(d) => d,
                    None => self.read_run(run)?,
                };
                writes.extend(cow_writes(snaps, run, Arc::new(data)));
                Ok(())
            })
            .collect();
        let mut results = self.batcher.write(writes).into_iter();
        runs.into_iter()
            .zip(reads)
            .map(|(run, read)| {
                let outcomes = run
                    .dests
                    .iter()
                    .map(|_| match &read {
                        Err(e) => Err(e.clone()),
                        Ok(()) => results.next().unwrap_or_else(|| {
                            Err(Error::Invalid("copy-out result missing".into()))
                        }),
                    })
                    .collect();
                (run, outcomes)
            })
            .collect()
    }

    /// The origin data of a run.
    fn read_run(&self, run: &CopyRun<OwnedPending>) -> Result<AlignedBuf> {
        let mut buf = AlignedBuf::zeroed(checked_usize(run.len(), "copy run")?);
        self.dev.read_at(&mut buf, run.bytes.start)?;
        Ok(buf)
    }

    /// Copies a run through the copier: the origin range once, to every destination.
    fn copy_direct(&self, snaps: &[Arc<Snapshot>], run: &CopyRun<OwnedPending>) -> Vec<Result<()>> {
        let dests: Vec<CopyDest<'_>> = run
            .dests
            .iter()
            .map(|d| CopyDest {
                dev: &**snaps[d.snap].cow(),
                offset: run.chunk_size.byte_offset(d.new_first),
            })
            .collect();
        let report = self
            .copier
            .copy(&*self.dev, run.bytes.start, run.len(), &dests, None);
        (0..dests.len()).map(|k| report.dest_result(k)).collect()
    }
}

/// The plan of one origin write and the pre-read that may serve it.
struct Planned<'a> {
    plan: CopyOutPlan<OwnedPending>,
    pre_read: Option<PreRead<'a>>,
}

/// Routes chunk `c` of one snapshot for an origin write (the executor's side of step 1).
fn route(s: &Snapshot, c: Chunk) -> Routed<OwnedPending> {
    if !s.is_valid() {
        return Routed::Skip;
    }
    match s.exceptions().route_write(c, |old| s.store().prepare(old)) {
        Ok(WriteRoute::Remapped {
            reads_in_flight, ..
        }) => Routed::Remapped { reads_in_flight },
        Ok(WriteRoute::Wait(p)) => Routed::Wait(p),
        Ok(WriteRoute::Own(o)) => Routed::Own {
            new: o.exception.new,
            owned: if mutation::active("abandon-not-aborted") {
                o
            } else {
                s.own(o)
            },
        },
        Err(e) => Routed::Failed(e),
    }
}

/// The batcher's writes for one run: its data to each destination's COW.
fn cow_writes<'a>(
    snaps: &'a [Arc<Snapshot>],
    run: &'a CopyRun<OwnedPending>,
    data: Arc<AlignedBuf>,
) -> impl Iterator<Item = CowWrite> + 'a {
    run.dests.iter().map(move |d| {
        let s = &snaps[d.snap];
        CowWrite {
            dev: s.cow().clone(),
            offset: run.chunk_size.byte_offset(d.new_first),
            data: data.clone(),
            store: s.store().clone(),
            exceptions: d.owned.iter().map(|o| o.exception).collect(),
        }
    })
}

/// Settles a copied run: a destination whose copy failed fails its exceptions (and its
/// snapshot); the others' exceptions join `landed` (marked ready in their store when
/// `mark_ready`) and their chunks join `drains`.
fn settle(
    snaps: &[Arc<Snapshot>],
    run: CopyRun<OwnedPending>,
    results: Vec<Result<()>>,
    mark_ready: bool,
    landed: &mut Landed,
    drains: &mut Vec<(usize, Chunk)>,
) {
    let chunks = run.chunk_list();
    for (d, result) in run.dests.into_iter().zip(results) {
        let s = &snaps[d.snap];
        match result {
            Ok(()) => {
                if mark_ready {
                    let ready: Vec<_> = d.owned.iter().map(|o| o.exception).collect();
                    s.store().mark_ready(&ready);
                }
                drains.extend(chunks.clone().map(|c| (d.snap, c)));
                // Usually the snapshot's only run: its list is taken over, not copied.
                if landed[d.snap].is_empty() {
                    landed[d.snap] = d.owned;
                } else {
                    landed[d.snap].extend(d.owned);
                }
            }
            Err(e) => {
                for o in d.owned {
                    s.fail_owned(o, e.clone());
                }
            }
        }
    }
}

impl BlockDevice for Origin {
    fn size(&self) -> u64 {
        self.dev.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self.merge() {
            Some(m) => {
                check_request(self.size(), offset, buf.len() as u64)?;
                m.read(&*self.dev, buf, offset)
            }
            None => self.dev.read_at(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        self.write_op(WriteOp::Write(buf, fua), offset, buf.len() as u64)
    }

    /// Flushes the origin, and the merging snapshot's COW while one merges.
    fn flush(&self) -> Result<()> {
        self.dev.flush()?;
        match self.merge() {
            Some(m) => m.flush_cow(),
            None => Ok(()),
        }
    }

    /// While a snapshot merges, a discard does nothing (as the kernel's merge target).
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.merge().is_some() {
            return check_request(self.size(), offset, len);
        }
        self.write_through(offset, len, || self.dev.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        self.write_op(WriteOp::Zeroes(fua), offset, len)
    }

    fn describe(&self) -> String {
        format!("origin({})", self.dev.describe())
    }
}
