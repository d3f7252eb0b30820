//! The exception tracker: completed table, pending exceptions and tracked reads of one
//! exception space (one snapshot's COW, or one relocation target's spare area).
//!
//! It answers the two routing questions atomically per chunk:
//! * [`route_read`](ExceptionTracker::route_read): remapped (read the new chunk), or not
//!   remapped, in which case the read of the old chunk is *tracked* until its guard drops;
//! * [`route_write`](ExceptionTracker::route_write): remapped, pending (wait on it), or
//!   new: the caller now owns a fresh pending exception and must copy, commit and
//!   [`complete`](ExceptionTracker::complete) it.
//!
//! Invariant: a chunk's completed exception is inserted under the same shard lock that
//! routes reads, so once `complete` returns no new read of that chunk is sent to the old
//! location; [`wait_reads_drained`](ExceptionTracker::wait_reads_drained) then waits, woken
//! by the last tracked read's end (no polling), for the reads that were already there.
//! Locks are per shard of chunks; no lock is held while I/O runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::index::ExceptionIndex;
use super::table::{Exception, ExceptionTable};
use crate::error::{Error, Result};
use crate::mutation;
use crate::units::Chunk;

const SHARDS: usize = 64;

/// A pending exception: the chunk is being copied; requests that need it wait here.
#[derive(Debug, Default)]
pub struct PendingException {
    outcome: Mutex<Option<Result<Chunk>>>,
    done: Condvar,
    waiters: AtomicU64,
}

impl PendingException {
    /// Blocks until the exception completes; returns its new chunk, or the error that
    /// failed it (the copy's I/O error, the commit's, ...).
    pub fn wait(&self) -> Result<Chunk> {
        let mut o = self.outcome.lock();
        if o.is_none() {
            self.waiters.fetch_add(1, Ordering::SeqCst);
        }
        loop {
            if let Some(r) = o.as_ref() {
                return r.clone();
            }
            self.done.wait(&mut o);
        }
    }

    /// How many requests have waited on this exception (tests observe races by it).
    pub fn waiters(&self) -> u64 {
        self.waiters.load(Ordering::SeqCst)
    }

    fn finish(&self, r: Result<Chunk>) {
        *self.outcome.lock() = Some(r);
        self.done.notify_all();
    }
}

/// A pending exception created by [`ExceptionTracker::route_write`]; its owner must copy the
/// chunk, commit it to the store and hand it back to [`ExceptionTracker::complete`] or
/// [`ExceptionTracker::fail`]. Dropping it unfinished fails it, so waiters never hang.
pub struct OwnedPending {
    /// The exception being made.
    pub exception: Exception,
    pending: Arc<PendingException>,
    shard: usize,
    tracker: Option<Arc<TrackerInner>>,
    abandon: Option<AbandonHook>,
}

/// What to do when an owned pending exception is dropped unfinished (its store must hear
/// that the allocation will never be committed).
type AbandonHook = Box<dyn FnOnce(Exception) + Send + Sync>;

impl std::fmt::Debug for OwnedPending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedPending")
            .field("exception", &self.exception)
            .finish_non_exhaustive()
    }
}

impl OwnedPending {
    /// Runs `hook` if this exception is dropped without being completed or failed (a
    /// request unwinding from a panic): the owner uses it to abort the store's allocation,
    /// so later commits in allocation order do not wait for it forever.
    pub fn on_abandon(&mut self, hook: impl FnOnce(Exception) + Send + Sync + 'static) {
        self.abandon = Some(Box::new(hook));
    }
}

impl Drop for OwnedPending {
    fn drop(&mut self) {
        if let Some(t) = self.tracker.take() {
            if let Some(hook) = self.abandon.take() {
                hook(self.exception);
            }
            t.finish(
                self.shard,
                self.exception,
                Err(Error::Invalid(
                    "the request making this exception was abandoned".into(),
                )),
                &self.pending,
            );
        }
    }
}

/// Where a read of one chunk goes.
#[derive(Debug)]
pub enum ReadRoute {
    /// Read the new chunk.
    Remapped(Chunk),
    /// Read the old chunk; the read stays tracked until the guard drops.
    Unmapped(TrackedRead),
}

/// Where a write of one chunk goes.
#[derive(Debug)]
pub enum WriteRoute {
    /// The chunk has a completed exception. `reads_in_flight` tells whether reads routed to
    /// the old chunk before it completed may still be running.
    /// Where it lives is not looked up (an origin write does not need it, and the lookup
    /// may read an index page): [`ExceptionTracker::lookup`] gives it.
    Remapped {
        /// Reads of the old location may still be in flight.
        reads_in_flight: bool,
    },
    /// Another request is making the exception: wait on it.
    Wait(Arc<PendingException>),
    /// This request made a new pending exception and owns it.
    Own(OwnedPending),
}

/// Where an I/O of one chunk goes when a pending exception must hold it back (a
/// relocation target's writes: the chunk is being moved, and a write to its old place
/// would be left behind).
#[derive(Debug)]
pub enum IoRoute {
    /// The chunk has a completed exception: use the new chunk.
    Remapped(Chunk),
    /// The chunk is being moved: wait on it, then route again.
    Pending(Arc<PendingException>),
    /// Use the old chunk; the I/O stays tracked until the guard drops.
    Unmapped(TrackedRead),
}

/// A read routed to the old location; ends its tracking when dropped.
#[derive(Debug)]
pub struct TrackedRead {
    tracker: Arc<TrackerInner>,
    chunk: Chunk,
}

impl Drop for TrackedRead {
    fn drop(&mut self) {
        self.tracker.untrack(self.chunk);
    }
}

#[derive(Debug, Default)]
struct ShardState {
    pending: HashMap<Chunk, Arc<PendingException>>,
    tracked: HashMap<Chunk, u32>,
}

#[derive(Debug, Default)]
struct Shard {
    state: Mutex<ShardState>,
    drained: Condvar,
}

#[derive(Debug)]
struct TrackerInner {
    index: ExceptionIndex,
    shards: Box<[Shard]>,
    drain_waits: AtomicU64,
}

/// Completed table, pending exceptions and tracked reads of one exception space.
#[derive(Clone, Debug)]
pub struct ExceptionTracker {
    inner: Arc<TrackerInner>,
}

fn shard_of(c: Chunk) -> usize {
    // Fibonacci hashing spreads neighbouring chunks over shards.
    (c.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % SHARDS
}

impl TrackerInner {
    fn untrack(&self, c: Chunk) {
        let shard = &self.shards[shard_of(c)];
        let mut st = shard.state.lock();
        if let Some(n) = st.tracked.get_mut(&c) {
            *n -= 1;
            if *n == 0 {
                st.tracked.remove(&c);
                shard.drained.notify_all();
            }
        }
    }

    fn finish(&self, shard: usize, e: Exception, r: Result<()>, pending: &PendingException) {
        let mut st = self.shards[shard].state.lock();
        let outcome = r.and_then(|()| {
            self.index
                .complete(e)
                .map(|()| e.new)
                .map_err(|err| Error::Invalid(format!("completing a pending exception: {err}")))
        });
        st.pending.remove(&e.old);
        drop(st);
        pending.finish(outcome);
    }
}

impl ExceptionTracker {
    /// A tracker over the completed exceptions in `index` (loaded from a store).
    pub fn new(index: ExceptionIndex) -> Self {
        ExceptionTracker {
            inner: Arc::new(TrackerInner {
                index,
                shards: (0..SHARDS).map(|_| Shard::default()).collect(),
                drain_waits: AtomicU64::new(0),
            }),
        }
    }

    /// The completed exception of `old`, if any (may read an index page).
    pub fn lookup(&self, old: Chunk) -> Result<Option<Chunk>> {
        self.inner.index.lookup(old)
    }

    /// True when a write of `old` would copy it now: it has neither a completed nor a
    /// pending exception. Only a hint: another write may route it first.
    pub fn needs_copy(&self, old: Chunk) -> bool {
        let st = self.inner.shards[shard_of(old)].state.lock();
        !st.pending.contains_key(&old) && !self.inner.index.contains(old)
    }

    /// Routes a read of chunk `old`; see [`ReadRoute`]. The decision is taken under the
    /// shard lock from memory; where a remapped chunk lives is looked up after it (a
    /// completed exception never changes), so no lock is held across an index read.
    pub fn route_read(&self, old: Chunk) -> Result<ReadRoute> {
        let mut st = self.inner.shards[shard_of(old)].state.lock();
        if self.inner.index.contains(old) {
            drop(st);
            return self.inner.index.lookup_member(old).map(ReadRoute::Remapped);
        }
        if !mutation::active("s4-reads-untracked") {
            *st.tracked.entry(old).or_insert(0) += 1;
        }
        Ok(ReadRoute::Unmapped(TrackedRead {
            tracker: self.inner.clone(),
            chunk: old,
        }))
    }

    /// Routes an I/O of chunk `old` that must not reach the old location while an exception
    /// of it is pending; see [`IoRoute`]. While every I/O of the old location is routed
    /// this way, the pending exception's owner may
    /// [`wait_reads_drained`](Self::wait_reads_drained) before it completes: nothing new
    /// is tracked meanwhile.
    pub fn route_io(&self, old: Chunk) -> Result<IoRoute> {
        let mut st = self.inner.shards[shard_of(old)].state.lock();
        if self.inner.index.contains(old) {
            drop(st);
            return self.inner.index.lookup_member(old).map(IoRoute::Remapped);
        }
        if let Some(p) = st.pending.get(&old) {
            return Ok(IoRoute::Pending(p.clone()));
        }
        *st.tracked.entry(old).or_insert(0) += 1;
        Ok(IoRoute::Unmapped(TrackedRead {
            tracker: self.inner.clone(),
            chunk: old,
        }))
    }

    /// Routes a write of chunk `old`; when the chunk has neither a completed nor a pending
    /// exception, calls `allocate(old)` for a new chunk and returns [`WriteRoute::Own`].
    pub fn route_write(
        &self,
        old: Chunk,
        allocate: impl FnOnce(Chunk) -> Result<Chunk>,
    ) -> Result<WriteRoute> {
        let shard = shard_of(old);
        let mut st = self.inner.shards[shard].state.lock();
        if self.inner.index.contains(old) {
            return Ok(WriteRoute::Remapped {
                reads_in_flight: st.tracked.contains_key(&old)
                    && !mutation::active("s4-remapped-ignores-reads"),
            });
        }
        if let Some(p) = st.pending.get(&old) {
            return Ok(WriteRoute::Wait(p.clone()));
        }
        let new = allocate(old)?;
        let pending = Arc::new(PendingException::default());
        st.pending.insert(old, pending.clone());
        Ok(WriteRoute::Own(OwnedPending {
            exception: Exception { old, new },
            pending,
            shard,
            tracker: Some(self.inner.clone()),
            abandon: None,
        }))
    }

    /// The owner's copy is committed: insert the completed exception, wake the waiters.
    pub fn complete(&self, mut owned: OwnedPending) -> Result<()> {
        owned.tracker = None;
        owned.abandon = None;
        self.inner
            .finish(owned.shard, owned.exception, Ok(()), &owned.pending);
        owned.pending.wait().map(|_| ())
    }

    /// The owner's copy or commit failed: drop the pending exception, waking waiters with
    /// `error`.
    pub fn fail(&self, mut owned: OwnedPending, error: Error) {
        owned.tracker = None;
        owned.abandon = None;
        self.inner
            .finish(owned.shard, owned.exception, Err(error), &owned.pending);
    }

    /// Blocks until no read routed to the old chunk `old` is in flight.
    ///
    /// Call it only after `old` has a completed exception (or its owner gave up), so that
    /// no new read can be routed there meanwhile.
    pub fn wait_reads_drained(&self, old: Chunk) {
        let shard = &self.inner.shards[shard_of(old)];
        let mut st = shard.state.lock();
        if !st.tracked.contains_key(&old) || mutation::active("s1-drain-skipped") {
            return;
        }
        self.inner.drain_waits.fetch_add(1, Ordering::SeqCst);
        while st.tracked.contains_key(&old) {
            shard.drained.wait(&mut st);
        }
    }

    /// How many times a caller had to wait in [`wait_reads_drained`](Self::wait_reads_drained)
    /// (tests observe races through it).
    pub fn drain_waits(&self) -> u64 {
        self.inner.drain_waits.load(Ordering::SeqCst)
    }

    /// Reads of the old chunk `old` in flight now.
    pub fn reads_in_flight(&self, old: Chunk) -> u32 {
        let st = self.inner.shards[shard_of(old)].state.lock();
        st.tracked.get(&old).copied().unwrap_or(0)
    }

    /// The pending exception of chunk `old`, if one is in flight.
    pub fn pending(&self, old: Chunk) -> Option<Arc<PendingException>> {
        let st = self.inner.shards[shard_of(old)].state.lock();
        st.pending.get(&old).cloned()
    }

    /// Pending exceptions now.
    pub fn pending_count(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| s.state.lock().pending.len())
            .sum()
    }

    /// Completed exceptions.
    pub fn completed_count(&self) -> u64 {
        self.inner.index.len()
    }

    /// Every completed exception (reads the whole index: tools and tests).
    pub fn table(&self) -> Result<ExceptionTable> {
        self.inner.index.to_table()
    }

    /// The index of completed exceptions.
    pub fn index(&self) -> &ExceptionIndex {
        &self.inner.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_routes_own_then_wait_then_remapped() {
        let t = ExceptionTracker::new(ExceptionIndex::in_memory());
        let c = Chunk(7);
        let owned = match t.route_write(c, |_| Ok(Chunk(2))).unwrap() {
            WriteRoute::Own(o) => o,
            r => panic!("expected Own, got {r:?}"),
        };
        let waiter = match t
            .route_write(c, |_| panic!("no second allocation"))
            .unwrap()
        {
            WriteRoute::Wait(p) => p,
            r => panic!("expected Wait, got {r:?}"),
        };
        let th = std::thread::spawn(move || waiter.wait());
        t.complete(owned).unwrap();
        assert_eq!(th.join().unwrap().unwrap(), Chunk(2));
        assert!(matches!(
            t.route_write(c, |_| panic!()).unwrap(),
            WriteRoute::Remapped {
                reads_in_flight: false
            }
        ));
        assert_eq!(t.lookup(c).unwrap(), Some(Chunk(2)));
        assert_eq!(t.pending_count(), 0);
    }

    #[test]
    fn tracked_reads_hold_drain_until_dropped() {
        let t = ExceptionTracker::new(ExceptionIndex::in_memory());
        let c = Chunk(3);
        let r = match t.route_read(c).unwrap() {
            ReadRoute::Unmapped(g) => g,
            r => panic!("{r:?}"),
        };
        assert_eq!(t.reads_in_flight(c), 1);
        let o = match t.route_write(c, |_| Ok(Chunk(9))).unwrap() {
            WriteRoute::Own(o) => o,
            r => panic!("{r:?}"),
        };
        t.complete(o).unwrap();
        assert!(matches!(
            t.route_read(c).unwrap(),
            ReadRoute::Remapped(Chunk(9))
        ));
        let t2 = t.clone();
        let th = std::thread::spawn(move || t2.wait_reads_drained(c));
        while t.drain_waits() == 0 {
            std::thread::yield_now();
        }
        drop(r);
        th.join().unwrap();
        assert_eq!(t.reads_in_flight(c), 0);
    }

    #[test]
    fn abandon_hook_runs_only_for_unfinished_exceptions() {
        use std::sync::atomic::AtomicBool;
        let t = ExceptionTracker::new(ExceptionIndex::in_memory());
        let own = |c| match t.route_write(Chunk(c), |_| Ok(Chunk(c + 100))).unwrap() {
            WriteRoute::Own(o) => o,
            r => panic!("{r:?}"),
        };
        let flags: Vec<Arc<AtomicBool>> =
            (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
        let mut os: Vec<OwnedPending> = (0..3).map(own).collect();
        for (o, f) in os.iter_mut().zip(&flags) {
            let f = f.clone();
            o.on_abandon(move |_| f.store(true, Ordering::SeqCst));
        }
        let dropped = os.pop().unwrap();
        let failed = os.pop().unwrap();
        let completed = os.pop().unwrap();
        t.complete(completed).unwrap();
        t.fail(failed, Error::Invalid("copy failed".into()));
        drop(dropped);
        let ran: Vec<bool> = flags.iter().map(|f| f.load(Ordering::SeqCst)).collect();
        assert_eq!(ran, [false, false, true]);
    }

    #[test]
    fn dropped_owner_fails_waiters() {
        let t = ExceptionTracker::new(ExceptionIndex::in_memory());
        let o = t.route_write(Chunk(1), |_| Ok(Chunk(5))).unwrap();
        let w = match t.route_write(Chunk(1), |_| Ok(Chunk(6))).unwrap() {
            WriteRoute::Wait(p) => p,
            r => panic!("{r:?}"),
        };
        drop(o);
        assert!(w.wait().is_err());
        assert_eq!(t.lookup(Chunk(1)).unwrap(), None);
    }

    #[test]
    fn a_waiter_gets_the_owners_own_error_even_after_the_owner_finished() {
        let t = ExceptionTracker::new(ExceptionIndex::in_memory());
        let owned = match t.route_write(Chunk(4), |_| Ok(Chunk(40))).unwrap() {
            WriteRoute::Own(o) => o,
            r => panic!("{r:?}"),
        };
        let pending = match t.route_write(Chunk(4), |_| panic!("no second allocation")) {
            Ok(WriteRoute::Wait(p)) => p,
            r => panic!("{r:?}"),
        };
        let eio = Error::io("write", 0, "cow", std::io::Error::from_raw_os_error(5));
        t.fail(owned, eio);
        // The owner is gone and the chunk has no exception: the outcome stays with the
        // pending exception the waiter holds.
        assert_eq!(t.pending(Chunk(4)).map(|_| ()), None);
        let err = pending.wait().unwrap_err();
        assert!(matches!(err, Error::Io { op: "write", .. }), "{err}");
        assert_eq!(err.errno(), 5);
    }
}
