//! The snapshot target: the origin as it was when the snapshot was activated.
//!
//! Reads of a chunk with a completed exception go to the COW device; other reads go to the
//! origin and are *tracked* until they end, so that an origin write of that chunk waits for
//! them (races S1 and S4). A write first makes sure the chunk has an exception: it waits on
//! a pending one, or makes one by copying the origin chunk into a fresh COW chunk with the
//! written bytes merged in (a write covering the whole chunk skips the origin read), commits
//! it, and only then is acknowledged. A snapshot takes part in origin writes only once it is
//! loaded and activated (S2): [`Snapshot::load`] builds it from its store, then
//! [`Origin::activate`](super::Origin::activate) registers it.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::origin::Origin;
use crate::copy::{Copier, CopyDest, Overlay};
use crate::dev::{check_request, BlockDevice, Fua};
use crate::error::{Error, Result};
use crate::exception::index::load_store;
use crate::exception::persistent::validate::{self, Bounds};
use crate::exception::{
    ExceptionStore, ExceptionTracker, IndexConfig, LoadOutcome, OwnedPending, PendingException,
    ReadRoute, Usage, WriteRoute,
};
use crate::units::{mem_usize, Chunk, ChunkPiece, ChunkSize};

/// Where a snapshot is in its life, as the kernel's status line tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum State {
    /// Takes copy-outs and serves I/O.
    Valid = 0,
    /// `PO` store full on a snapshot write: writes fail, reads and copy-outs go on.
    Overflow = 1,
    /// Dropped: I/O fails, origin writes skip it. Final.
    Invalid = 2,
}

/// A [`State`] that request threads read without a lock.
#[derive(Debug)]
struct AtomicState(AtomicU8);

impl AtomicState {
    fn new(s: State) -> Self {
        AtomicState(AtomicU8::new(s as u8))
    }

    fn load(&self) -> State {
        match self.0.load(Ordering::SeqCst) {
            0 => State::Valid,
            1 => State::Overflow,
            _ => State::Invalid,
        }
    }

    /// Sets `to`; returns the state before.
    fn swap(&self, to: State) -> State {
        match self.0.swap(to as u8, Ordering::SeqCst) {
            0 => State::Valid,
            1 => State::Overflow,
            _ => State::Invalid,
        }
    }

    /// Moves `from` to `to`; does nothing in any other state.
    fn transition(&self, from: State, to: State) {
        let _ = self
            .0
            .compare_exchange(from as u8, to as u8, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// The snapshot's status, as the kernel's status line reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotStatus {
    /// Dropped: reads and writes fail.
    Invalid,
    /// `PO` store full on a snapshot write: writes fail, reads work.
    Overflow,
    /// Valid, with its space use.
    Usage(Usage),
    /// A merge into the origin stopped on an error; I/O goes on.
    MergeFailed,
}

impl fmt::Display for SnapshotStatus {
    /// `Invalid`, `Overflow`, or `<allocated>/<total> <metadata>` (sectors).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotStatus::Invalid => f.write_str("Invalid"),
            SnapshotStatus::Overflow => f.write_str("Overflow"),
            SnapshotStatus::MergeFailed => f.write_str("Merge failed"),
            SnapshotStatus::Usage(u) => write!(
                f,
                "{}/{} {}",
                u.allocated_sectors, u.total_sectors, u.metadata_sectors
            ),
        }
    }
}

/// A snapshot of an origin.
pub struct Snapshot {
    origin_dev: Arc<dyn BlockDevice>,
    store: Arc<dyn ExceptionStore>,
    cow: Arc<dyn BlockDevice>,
    chunk_size: ChunkSize,
    exceptions: ExceptionTracker,
    copier: Arc<Copier>,
    state: AtomicState,
    invalid_reason: Mutex<Option<String>>,
    active: AtomicBool,
    /// Writes that passed (or are about to pass) the active check and have not returned:
    /// a merge's switch waits for them after deactivating the snapshot.
    writes_in_flight: AtomicU64,
}

/// Counts a snapshot write from before its active check to its return.
struct WriteInFlight<'a>(&'a AtomicU64);

impl Drop for WriteInFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("cow", &self.cow.describe())
            .field("store", &self.store.kind())
            .field("chunk_size", &self.chunk_size)
            .field("status", &self.status())
            .finish()
    }
}

impl Snapshot {
    /// Builds a snapshot of `origin` from `store` with a temporary exception index (see
    /// [`load_with`](Self::load_with)).
    pub fn load(origin: &Origin, store: Arc<dyn ExceptionStore>) -> Result<Arc<Snapshot>> {
        Self::load_with(origin, store, IndexConfig::temporary())
    }

    /// Builds a snapshot of `origin` from `store`: opens its exception index as `index`
    /// says (using the sidecar when it is valid, else rebuilding it from the store's full
    /// scan) and loads what the index does not cover. The snapshot is not active: it sees
    /// no origin writes and serves no I/O until [`Origin::activate`](super::Origin::activate).
    pub fn load_with(
        origin: &Origin,
        store: Arc<dyn ExceptionStore>,
        index: IndexConfig,
    ) -> Result<Arc<Snapshot>> {
        let device = store.cow().describe();
        let bounds = Bounds {
            cow_chunks: store.chunk_size().whole_chunks(store.cow().size()),
            origin_chunks: Some(store.chunk_size().chunks_covering(origin.size())),
        };
        let check = |e| match validate::check_bounds(e, bounds) {
            Some(finding) => Err(finding.into_error(&device)),
            None => Ok(()),
        };
        let (index, outcome) = load_store(index, &*store, &check)?;
        let state = if outcome == LoadOutcome::Invalid {
            State::Invalid
        } else {
            State::Valid
        };
        Ok(Arc::new(Snapshot {
            origin_dev: origin.device().clone(),
            cow: store.cow().clone(),
            chunk_size: store.chunk_size(),
            store,
            exceptions: ExceptionTracker::new(index),
            copier: origin.copier().clone(),
            state: AtomicState::new(state),
            invalid_reason: Mutex::new(
                (state == State::Invalid)
                    .then(|| "the COW header marks the snapshot invalid".into()),
            ),
            active: AtomicBool::new(false),
            writes_in_flight: AtomicU64::new(0),
        }))
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }

    /// The origin device this snapshot was loaded for.
    pub fn origin_device(&self) -> &Arc<dyn BlockDevice> {
        &self.origin_dev
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ExceptionStore> {
        &self.store
    }

    /// The COW device.
    pub fn cow(&self) -> &Arc<dyn BlockDevice> {
        &self.cow
    }

    /// The exception tracker (tests and tools inspect it).
    pub fn exceptions(&self) -> &ExceptionTracker {
        &self.exceptions
    }

    /// True once activated and until deactivated.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// Set by the origin's list when it takes the snapshot in or out.
    pub(super) fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::SeqCst);
    }

    /// Waits until no write of this (deactivated) snapshot is in flight: every write that
    /// found it active has returned, its exceptions committed and completed. Rare (a
    /// merge's switch) and short (writes already under way), so it polls.
    pub(super) fn drain_writes(&self) {
        while self.writes_in_flight.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// True unless invalid (an overflowed snapshot is still valid).
    pub fn is_valid(&self) -> bool {
        self.state.load() != State::Invalid
    }

    /// Why the snapshot is invalid, if it is.
    pub fn invalid_reason(&self) -> Option<String> {
        self.invalid_reason.lock().clone()
    }

    /// The kernel-style status.
    pub fn status(&self) -> SnapshotStatus {
        match self.state.load() {
            State::Invalid => SnapshotStatus::Invalid,
            State::Overflow => SnapshotStatus::Overflow,
            State::Valid => SnapshotStatus::Usage(self.store.usage()),
        }
    }

    /// Drops the snapshot: later I/O fails, the store records it (header `valid = 0`).
    pub fn invalidate(&self, reason: &str) {
        if self.state.swap(State::Invalid) == State::Invalid {
            return;
        }
        *self.invalid_reason.lock() = Some(reason.to_string());
        // Best effort, as in the kernel: the snapshot is invalid in memory either way.
        let _ = self.store.invalidate();
    }

    fn check_io(&self) -> Result<()> {
        if !self.is_active() {
            return Err(Error::WrongState("snapshot is not active".into()));
        }
        if !self.is_valid() {
            return Err(Error::Invalid(
                self.invalid_reason().unwrap_or_else(|| "invalid".into()),
            ));
        }
        Ok(())
    }

    /// Allocation failed for a snapshot write. A full COW: `PO` overflows, `P` and `N`
    /// invalidate. Other errors pass through.
    fn on_allocation_failure(&self, e: Error) -> Error {
        if !matches!(e, Error::CowFull { .. }) {
            return e;
        }
        if self.store.kind().overflow_allowed() {
            self.state.transition(State::Valid, State::Overflow);
            Error::Overflow
        } else {
            self.invalidate(&format!("unable to allocate exception: {e}"));
            e
        }
    }

    /// Commits a batch of exceptions this request copied, then completes them (waking the
    /// requests queued on them). On failure the snapshot is invalidated and the pending
    /// exceptions fail.
    pub(super) fn commit_owned(&self, batch: Vec<OwnedPending>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let exceptions: Vec<_> = batch.iter().map(|o| o.exception).collect();
        match self.store.commit(&exceptions) {
            Ok(()) => {
                let mut first_err = None;
                for o in batch {
                    if let Err(e) = self.exceptions.complete(o) {
                        first_err.get_or_insert(e);
                    }
                }
                first_err.map_or(Ok(()), Err)
            }
            Err(e) => {
                self.invalidate(&format!("exception commit failed: {e}"));
                for o in batch {
                    self.exceptions.fail(o, e.clone());
                }
                Err(e)
            }
        }
    }

    /// Takes ownership of a new pending exception: if the request unwinds before finishing
    /// it, the store's allocation is aborted (see [`OwnedPending::on_abandon`]).
    pub(super) fn own(&self, mut o: OwnedPending) -> OwnedPending {
        let store = self.store.clone();
        o.on_abandon(move |e| store.abort(&e));
        o
    }

    /// Gives up an owned exception whose copy failed with `error`: the store's allocation
    /// is aborted, the snapshot invalidated, and the requests waiting on it get `error`.
    pub(super) fn fail_owned(&self, o: OwnedPending, error: Error) {
        self.store.abort(&o.exception);
        self.invalidate(&format!("copy-out failed: {error}"));
        self.exceptions.fail(o, error);
    }

    /// Byte range of the origin chunk `c`, clipped to the origin (the last chunk may be
    /// partial).
    pub(super) fn origin_chunk_len(&self, c: Chunk) -> u64 {
        let start = self.chunk_size.byte_offset(c);
        self.chunk_size
            .bytes()
            .min(self.origin_dev.size().saturating_sub(start))
    }

    /// Routes every piece of a snapshot write (see [`WritePlan`]).
    fn plan_write(&self, offset: u64, len: u64) -> WritePlan {
        let mut plan = WritePlan::default();
        for piece in self.chunk_size.split(offset, len) {
            let route = self
                .exceptions
                .route_write(piece.chunk, |old| self.store.prepare(old));
            match route {
                Ok(WriteRoute::Own(o)) => plan.own(piece, self.own(o)),
                Ok(WriteRoute::Remapped { .. }) => {
                    // Completed: its place never changes, so it is looked up unlocked.
                    match self.exceptions.index().lookup_member(piece.chunk) {
                        Ok(new) => plan.later.push((piece, Later::At(new))),
                        Err(e) => {
                            plan.stopped = Some(e);
                            break;
                        }
                    }
                }
                Ok(WriteRoute::Wait(p)) => plan.later.push((piece, Later::Pending(p))),
                Err(e) => {
                    plan.stopped = Some(e);
                    break;
                }
            }
        }
        plan
    }

    /// A snapshot write: copies and commits the chunks it owns (the written bytes merged
    /// into each copy), then writes the pieces whose exception existed or was being made.
    fn write_pieces(&self, buf: &[u8], offset: u64) -> Result<()> {
        let plan = self.plan_write(offset, buf.len() as u64);
        // A failed allocation decides the snapshot's state first; what the request already
        // owns is still copied and committed, so nothing leaks and nobody waits forever.
        let stopped = plan.stopped.map(|e| self.on_allocation_failure(e));
        // The store's commit makes the copies durable before their metadata.
        let committed = self
            .copy_runs(plan.runs, buf)
            .and_then(|owned| self.commit_owned(owned));
        // A failed copy says more than the allocation failure after it.
        committed?;
        if let Some(e) = stopped {
            return Err(e);
        }
        for (piece, later) in plan.later {
            let new = match later {
                Later::At(new) => new,
                // The pending exception itself: its outcome stays after its owner finishes,
                // so a failure reaches this write as the owner's own error.
                Later::Pending(p) => p.wait()?,
            };
            let at = self.chunk_size.byte_offset(new) + piece.offset_in_chunk;
            self.cow.write_at(&buf[piece.buf_range()], at, Fua::No)?;
        }
        Ok(())
    }

    /// Copies every run; returns their exceptions to commit. After a failed copy, every
    /// exception of the write fails with its error.
    fn copy_runs(&self, runs: Vec<SnapWriteRun>, buf: &[u8]) -> Result<Vec<OwnedPending>> {
        let mut copied = Vec::new();
        let mut failure = None;
        for run in runs {
            if failure.is_none() {
                match self.copy_run(&run, buf) {
                    Ok(()) => {
                        copied.extend(run.owned);
                        continue;
                    }
                    Err(e) => failure = Some(e),
                }
            }
            copied.extend(run.owned);
        }
        let Some(e) = failure else {
            return Ok(copied);
        };
        for o in copied {
            self.fail_owned(o, e.clone());
        }
        Err(e)
    }

    /// Copies one run into the COW: the origin range once (only where the written data
    /// does not cover a whole segment), the request's bytes laid over it, one write.
    fn copy_run(&self, run: &SnapWriteRun, buf: &[u8]) -> Result<()> {
        let cs = self.chunk_size;
        let last = Chunk(run.first.0 + run.chunks - 1);
        let start = cs.byte_offset(run.first);
        let len = cs.byte_offset(last) - start + self.origin_chunk_len(last);
        let report = self.copier.copy(
            &*self.origin_dev,
            start,
            len,
            &[CopyDest {
                dev: &*self.cow,
                offset: cs.byte_offset(run.new_first),
            }],
            Some(Overlay {
                offset: run.offset_in_first,
                data: &buf[run.buf.clone()],
            }),
        );
        report.dest_result(0)
    }
}

/// What a snapshot write does, decided by routing each of its pieces: the runs of chunks
/// it owns, the pieces whose exception exists or is being made by another request, and the
/// error that stopped routing (an allocation's, or an index lookup's), if any.
#[derive(Default)]
struct WritePlan {
    runs: Vec<SnapWriteRun>,
    later: Vec<(ChunkPiece, Later)>,
    stopped: Option<Error>,
}

/// Where a piece the write does not own goes: a completed exception's chunk, or the chunk
/// of another request's pending exception, once it completes.
enum Later {
    At(Chunk),
    Pending(Arc<PendingException>),
}

impl WritePlan {
    /// Adds an owned piece: to the last run when it continues it on the origin and the COW,
    /// else as a new run.
    fn own(&mut self, piece: ChunkPiece, owned: OwnedPending) {
        let new = owned.exception.new;
        if let Some(r) = self.runs.last_mut() {
            if r.extends(piece.chunk, new) {
                r.chunks += 1;
                r.buf.end = piece.buf_range().end;
                r.owned.push(owned);
                return;
            }
        }
        self.runs.push(SnapWriteRun {
            first: piece.chunk,
            chunks: 1,
            new_first: new,
            offset_in_first: piece.offset_in_chunk,
            buf: piece.buf_range(),
            owned: vec![owned],
        });
    }
}

/// A run of chunks one snapshot write owns: origin chunks `first..first+chunks` going to
/// COW chunks `new_first..`, with the request's bytes `buf` starting `offset_in_first` bytes
/// into the first chunk.
struct SnapWriteRun {
    first: Chunk,
    chunks: u64,
    new_first: Chunk,
    offset_in_first: u64,
    buf: Range<usize>,
    owned: Vec<OwnedPending>,
}

impl SnapWriteRun {
    /// True when chunk `c`, at COW chunk `new`, continues the run (pieces after the first
    /// start on a chunk boundary, since the request is contiguous).
    fn extends(&self, c: Chunk, new: Chunk) -> bool {
        c.0 == self.first.0 + self.chunks && new.0 == self.new_first.0 + self.chunks
    }
}

impl BlockDevice for Snapshot {
    fn size(&self) -> u64 {
        self.origin_dev.size()
    }

    /// Routes every chunk of the request, then reads each run of pieces that are
    /// contiguous on the same device with one call (a 1 MiB read of untouched 4 KiB chunks
    /// is one origin read, not 256). Tracked reads stay registered until all reads end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)?;
        self.check_io()?;
        let cs = self.chunk_size;
        // (on the COW?, device offset, buffer range) of each run.
        let mut runs: Vec<(bool, u64, std::ops::Range<usize>)> = Vec::new();
        let mut tracked = Vec::new();
        for piece in cs.split(offset, buf.len() as u64) {
            let (on_cow, dev_off) = match self.exceptions.route_read(piece.chunk)? {
                ReadRoute::Remapped(new) => (true, cs.byte_offset(new) + piece.offset_in_chunk),
                ReadRoute::Unmapped(t) => {
                    tracked.push(t);
                    (false, offset + piece.buf_offset)
                }
            };
            let range = piece.buf_range();
            match runs.last_mut() {
                Some((cow, off, r))
                    if *cow == on_cow && *off + (r.end - r.start) as u64 == dev_off =>
                {
                    r.end = range.end;
                }
                _ => runs.push((on_cow, dev_off, range)),
            }
        }
        for (on_cow, dev_off, range) in runs {
            let dev = if on_cow { &self.cow } else { &self.origin_dev };
            dev.read_at(&mut buf[range], dev_off)?;
        }
        drop(tracked);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)?;
        // Counted before the active check, so a switch that deactivates and then drains
        // sees every write that could pass it.
        self.writes_in_flight.fetch_add(1, Ordering::SeqCst);
        let _in_flight = WriteInFlight(&self.writes_in_flight);
        self.check_io()?;
        if self.state.load() == State::Overflow {
            return Err(Error::Overflow);
        }
        self.write_pieces(buf, offset)?;
        if fua == Fua::Yes {
            self.cow.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.check_io()?;
        self.cow.flush()
    }

    /// Discard is advisory and the snapshot keeps its data: a no-op, as in the kernel
    /// without `discard_zeroes_cow`.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self.size(), offset, len)?;
        self.check_io()
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        check_request(self.size(), offset, len)?;
        let step = self.chunk_size.bytes().max(1 << 20);
        // A chunk or 1 MiB, whichever is larger: at most 1 GiB.
        let zeros = vec![0u8; mem_usize(step.min(len))];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            self.write_at(&zeros[..mem_usize(n)], offset + done, Fua::No)?;
            done += n;
        }
        if fua == Fua::Yes {
            self.cow.flush()?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("snapshot({})", self.cow.describe())
    }
}
