//! The persistent store (`P` and `PO`): exceptions in the kernel's on-disk format, with
//! group commit in allocation order.
//!
//! Every prepared exception gets a sequence number in allocation order. `commit` marks its
//! batch *ready* and then waits until the batch is durable. Whoever finds the oldest
//! not-yet-durable exception ready, while no one else is writing, becomes the *commit leader*:
//! it takes every ready exception forming a contiguous prefix in allocation order, asks
//! the [`Planner`] for the steps (zero the next area if one fills, flush, write the area
//! with FUA), runs them without holding the lock, publishes the result and wakes everyone.
//! Commits that arrive meanwhile are gathered into the next commit leader's single area write.
//! So the on-disk table is always a prefix of the allocation order: a crash leaks no
//! chunk. An aborted exception (its copy failed) or any metadata I/O error invalidates the
//! store, as the kernel does, and wakes every waiter with the error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::format::{self, Geometry, HeaderState, TableKind};
use super::plan::{self, MetaStep, Planner};
use super::read;
use crate::dev::{BlockDevice, Fua};
use crate::error::{Error, Result};
use crate::exception::index::{ExceptionIndex, Fingerprinter};
use crate::exception::store::Resume;
use crate::exception::{Exception, ExceptionStore, LoadOutcome, StoreKind, Usage};
use crate::units::{Chunk, ChunkSize};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Prepared,
    Ready,
}

#[derive(Debug)]
struct State {
    planner: Planner,
    loaded: bool,
    /// Sequence number of the next prepare.
    next_seq: u64,
    /// Every exception with a smaller sequence number is durable.
    durable_seq: u64,
    /// Prepared exceptions not yet durable, by sequence number.
    slots: BTreeMap<u64, (Exception, SlotState)>,
    /// Sequence number of each outstanding COW chunk.
    seq_of: HashMap<u64, u64>,
    /// A commit leader is writing metadata.
    commit_leader: bool,
    /// Why the store is invalid, once it is.
    failed: Option<String>,
    /// The header on disk says (or is being made to say) `valid = 0`.
    header_invalid: bool,
    /// Entries in the COW's table (the position of the next commit).
    entries: u64,
    /// Told of every commit, in order.
    index: Option<ExceptionIndex>,
    /// COW chunks of exceptions marked ready (`mark_ready`) whose owner has not called
    /// `commit` yet; an entry whose slot is gone was made durable by another request's
    /// group commit, and the owner's `commit` then returns at once.
    marked: HashSet<u64>,
    /// Merging: nothing is allocated, the table only shrinks from its tail.
    merging: bool,
}

impl State {
    /// The oldest outstanding exception is ready: a group commit can start with it.
    fn front_ready(&self) -> bool {
        self.slots
            .first_key_value()
            .is_some_and(|(_, (_, s))| *s == SlotState::Ready)
    }
}

/// Counters of the metadata I/O a store did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Group commits (one per commit leader).
    pub group_commits: u64,
    /// Metadata area writes (a group that crosses into a new area writes two).
    pub area_writes: u64,
    /// Exceptions made durable.
    pub exceptions_committed: u64,
    /// Flushes of the COW device issued by commits.
    pub flushes: u64,
    /// Times a commit blocked, waiting for an earlier exception or another leader (tests
    /// observe that a commit reached its wait through it).
    pub commit_waits: u64,
}

#[derive(Debug, Default)]
struct Counters {
    group_commits: AtomicU64,
    area_writes: AtomicU64,
    exceptions_committed: AtomicU64,
    flushes: AtomicU64,
    commit_waits: AtomicU64,
}

/// The persistent exception store.
pub struct PersistentStore {
    cow: Arc<dyn BlockDevice>,
    geo: Geometry,
    overflow: bool,
    table: TableKind,
    header: HeaderState,
    requested: Option<ChunkSize>,
    state: Mutex<State>,
    ready: Condvar,
    counters: Counters,
}

impl fmt::Debug for PersistentStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersistentStore")
            .field("cow", &self.cow.describe())
            .field("kind", &self.kind())
            .field("chunk_size", &self.geo.chunk_size())
            .finish()
    }
}

impl PersistentStore {
    /// Opens a persistent store on `cow`: reads the header. A formatted COW's chunk size
    /// wins over `requested` (see [`overridden_chunk_size`](Self::overridden_chunk_size));
    /// a fresh one (magic 0) uses `requested`, or [`ChunkSize::DEFAULT`].
    /// Unknown magic, version or chunk size give [`Error::Corrupt`] naming the device
    /// and the byte offset. `overflow` makes it a `PO` store.
    pub fn open(
        cow: Arc<dyn BlockDevice>,
        requested: Option<ChunkSize>,
        overflow: bool,
    ) -> Result<PersistentStore> {
        Self::open_as(cow, requested, overflow, TableKind::Snapshot)
    }

    /// [`open`](Self::open) for a table of `kind`: a header with the other kind's magic is
    /// refused, and a fresh store is formatted with this kind's magic.
    pub fn open_as(
        cow: Arc<dyn BlockDevice>,
        requested: Option<ChunkSize>,
        overflow: bool,
        table: TableKind,
    ) -> Result<PersistentStore> {
        let raw = read::read_raw_header(&*cow)?;
        let header = format::check_header_as(&raw, &cow.describe(), table)?;
        let chunk_size = match header {
            HeaderState::Fresh => requested.unwrap_or(ChunkSize::DEFAULT),
            HeaderState::Formatted { chunk_size, .. } => chunk_size,
        };
        Ok(PersistentStore {
            geo: Geometry::new(chunk_size),
            overflow,
            table,
            header,
            requested,
            state: Mutex::new(State {
                planner: Planner::fresh(chunk_size),
                loaded: false,
                next_seq: 0,
                durable_seq: 0,
                slots: BTreeMap::new(),
                seq_of: HashMap::new(),
                commit_leader: false,
                failed: None,
                header_invalid: false,
                entries: 0,
                index: None,
                marked: HashSet::new(),
                merging: false,
            }),
            ready: Condvar::new(),
            counters: Counters::default(),
            cow,
        })
    }

    /// The chunk size asked for, when the header holds a different one (which wins, as in
    /// the kernel; the CLI warns).
    pub fn overridden_chunk_size(&self) -> Option<ChunkSize> {
        self.requested
            .filter(|r| *r != self.geo.chunk_size() && self.header != HeaderState::Fresh)
    }

    /// True when the header read at open had magic 0 (the store gets formatted by load).
    pub fn is_fresh(&self) -> bool {
        self.header == HeaderState::Fresh
    }

    /// What the table is for (its magic).
    pub fn table_kind(&self) -> TableKind {
        self.table
    }

    /// The layout.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// Metadata I/O so far.
    pub fn stats(&self) -> StoreStats {
        let c = &self.counters;
        StoreStats {
            group_commits: c.group_commits.load(Ordering::SeqCst),
            area_writes: c.area_writes.load(Ordering::SeqCst),
            exceptions_committed: c.exceptions_committed.load(Ordering::SeqCst),
            flushes: c.flushes.load(Ordering::SeqCst),
            commit_waits: c.commit_waits.load(Ordering::SeqCst),
        }
    }

    /// Why the store is invalid, if it is.
    pub fn failure(&self) -> Option<String> {
        self.state.lock().failed.clone()
    }

    fn run(&self, steps: &[MetaStep]) -> Result<()> {
        for s in steps {
            match s {
                MetaStep::Zero { offset, len } => self.cow.write_zeroes(*offset, *len, Fua::No)?,
                MetaStep::Flush => {
                    self.counters.flushes.fetch_add(1, Ordering::SeqCst);
                    self.cow.flush()?
                }
                MetaStep::Write {
                    offset,
                    data,
                    fua,
                    area,
                } => {
                    if *area {
                        self.counters.area_writes.fetch_add(1, Ordering::SeqCst);
                    }
                    let fua = Fua::from(*fua);
                    self.cow.write_at(data, *offset, fua)?
                }
            }
        }
        Ok(())
    }

    /// Commits every ready exception forming a prefix in allocation order, as the commit leader;
    /// the caller checked that no commit is running and that the first one is ready.
    fn lead_commit<'a>(
        &'a self,
        mut st: parking_lot::MutexGuard<'a, State>,
    ) -> Result<parking_lot::MutexGuard<'a, State>> {
        st.commit_leader = true;
        let group: Vec<(u64, Exception)> = st
            .slots
            .iter()
            .take_while(|(_, (_, s))| *s == SlotState::Ready)
            .map(|(&seq, (e, _))| (seq, *e))
            .collect();
        let entries: Vec<Exception> = group.iter().map(|(_, e)| *e).collect();
        let steps = st.planner.commit(&entries);
        drop(st);
        let result = self.run(&steps);
        st = self.state.lock();
        st.commit_leader = false;
        match result {
            Ok(()) => {
                for (seq, e) in &group {
                    st.slots.remove(seq);
                    st.seq_of.remove(&e.new.0);
                }
                if let Some((seq, _)) = group.last() {
                    st.durable_seq = seq + 1;
                }
                if let Some(index) = &st.index {
                    index.durable(st.entries, &entries);
                }
                st.entries += entries.len() as u64;
                self.counters.group_commits.fetch_add(1, Ordering::SeqCst);
                self.counters
                    .exceptions_committed
                    .fetch_add(group.len() as u64, Ordering::SeqCst);
                self.ready.notify_all();
                Ok(st)
            }
            Err(e) => {
                let why = format!("metadata write failed: {e}");
                let write_header = self.fail(&mut st, why);
                drop(st);
                if write_header {
                    // Best effort, as in the kernel: the COW is failing already.
                    let _ = self.write_invalid_header();
                }
                Err(e)
            }
        }
    }

    /// Marks the store failed and wakes every waiter; returns true if the header still
    /// has to be written.
    fn fail(&self, st: &mut State, why: String) -> bool {
        st.failed.get_or_insert(why);
        self.ready.notify_all();
        !std::mem::replace(&mut st.header_invalid, true)
    }

    /// Reads area `area`, which the table says is full (a merge steps back into it), and
    /// checks that it is: every entry's `new` a data chunk inside the COW.
    fn read_full_area(&self, area: u64) -> Result<Vec<Exception>> {
        let device = self.cow.describe();
        let cs = self.geo.chunk_size();
        let mut buf = vec![0u8; cs.bytes_usize()];
        self.cow.read_at(&mut buf, self.geo.area_offset(area))?;
        let contents = format::decode_area(&buf, &self.geo, area, &device)?;
        let cow_chunks = cs.whole_chunks(self.cow.size());
        let bad = contents
            .entries
            .iter()
            .position(|e| !self.geo.is_data_chunk(e.new) || e.new.0 >= cow_chunks);
        if !contents.full || bad.is_some() {
            let why = match bad {
                Some(j) => format!("merge: entry {j} of metadata area {area} points outside the COW's data chunks"),
                None => format!(
                    "merge: metadata area {area} should be full (the table goes on after it) but holds {} entries",
                    contents.entries.len()
                ),
            };
            return Err(format::corrupt(&device, self.geo.area_offset(area), why));
        }
        Ok(contents.entries)
    }

    fn write_invalid_header(&self) -> Result<()> {
        self.run(&plan::invalidate_steps_as(
            self.geo.chunk_size(),
            self.table,
        ))
    }
}

impl ExceptionStore for PersistentStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Persistent {
            overflow: self.overflow,
        }
    }

    fn chunk_size(&self) -> ChunkSize {
        self.geo.chunk_size()
    }

    fn cow(&self) -> &Arc<dyn BlockDevice> {
        &self.cow
    }

    fn attach(&self, index: ExceptionIndex) {
        self.state.lock().index = Some(index);
    }

    fn fingerprinter(&self) -> Option<Fingerprinter> {
        let cow = self.cow.clone();
        let geo = self.geo;
        Some(Arc::new(move |n| read::fingerprint(&*cow, &geo, n)))
    }

    fn load(
        &self,
        from: Resume,
        sink: &mut dyn FnMut(u64, Exception) -> Result<()>,
    ) -> Result<LoadOutcome> {
        let mut st = self.state.lock();
        if st.loaded {
            return Err(Error::WrongState("the store is already loaded".into()));
        }
        let device = self.cow.describe();
        // The header again: it must not have changed since open.
        let now =
            format::check_header_as(&read::read_raw_header(&*self.cow)?, &device, self.table)?;
        if now != self.header {
            return Err(Error::Replaced(format!(
                "{device}: the COW header changed between open and load"
            )));
        }
        let cs = self.geo.chunk_size();
        let outcome = match self.header {
            HeaderState::Fresh => {
                let chunks = cs.whole_chunks(self.cow.size());
                if chunks < 2 {
                    return Err(Error::InvalidArgument(format!(
                        "{device}: a persistent COW needs at least 2 chunks of {cs} (header and metadata), it has {chunks}"
                    )));
                }
                self.run(&plan::format_steps_as(cs, self.table))?;
                st.planner = Planner::fresh(cs);
                LoadOutcome::Fresh
            }
            HeaderState::Formatted { valid: false, .. } if self.table == TableKind::Snapshot => {
                st.failed = Some("the COW header marks the snapshot invalid".into());
                st.header_invalid = true;
                LoadOutcome::Invalid
            }
            // A relocation table marked invalid (a metadata write failed) still holds every
            // relocation committed before: they are loaded, and the store takes no more.
            HeaderState::Formatted { valid, .. } => {
                let l = read::load_exceptions(&*self.cow, &self.geo, None, from, sink)?;
                st.planner = Planner::loaded(
                    cs,
                    l.current_area,
                    l.current_entries,
                    l.max_new.max(from.max_new),
                    l.junk_after_terminator,
                );
                st.entries = from.entries + l.count;
                if valid {
                    LoadOutcome::Valid
                } else {
                    st.failed = Some("the table's header is marked invalid".into());
                    st.header_invalid = true;
                    LoadOutcome::Invalid
                }
            }
        };
        st.loaded = true;
        Ok(outcome)
    }

    fn prepare(&self, old: Chunk) -> Result<Chunk> {
        let mut st = self.state.lock();
        if let Some(why) = &st.failed {
            return Err(Error::Invalid(why.clone()));
        }
        if !st.loaded {
            return Err(Error::WrongState("the store is not loaded".into()));
        }
        if st.merging {
            return Err(Error::WrongState(
                "the snapshot is merging into its origin: it takes no new exceptions".into(),
            ));
        }
        let cow_chunks = self.geo.chunk_size().whole_chunks(self.cow.size());
        let new = st.planner.allocate(cow_chunks)?;
        let seq = st.next_seq;
        st.next_seq += 1;
        st.slots
            .insert(seq, (Exception { old, new }, SlotState::Prepared));
        st.seq_of.insert(new.0, seq);
        Ok(new)
    }

    fn mark_ready(&self, batch: &[Exception]) {
        let mut st = self.state.lock();
        for e in batch {
            if let Some(seq) = st.seq_of.get(&e.new.0).copied() {
                if let Some(slot) = st.slots.get_mut(&seq) {
                    if slot.0 == *e {
                        slot.1 = SlotState::Ready;
                        st.marked.insert(e.new.0);
                    }
                }
            }
        }
        // A request waiting because the oldest exception was not ready may lead now.
        self.ready.notify_all();
    }

    fn commit(&self, batch: &[Exception]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut st = self.state.lock();
        if let Some(why) = &st.failed {
            return Err(Error::Invalid(why.clone()));
        }
        let mut last = 0u64;
        let mut waiting = false;
        for e in batch {
            let seq = st.seq_of.get(&e.new.0).copied();
            let was_marked = st.marked.remove(&e.new.0);
            match seq.and_then(|s| st.slots.get_mut(&s).map(|slot| (s, slot))) {
                Some((s, slot)) if slot.0 == *e => {
                    slot.1 = SlotState::Ready;
                    last = last.max(s);
                    waiting = true;
                }
                // Marked earlier and already made durable by another request's commit.
                None if was_marked => {}
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "commit of exception {} -> {} that was not prepared",
                        e.old, e.new
                    )))
                }
            }
        }
        if !waiting {
            return Ok(());
        }
        loop {
            if last < st.durable_seq {
                return Ok(());
            }
            if let Some(why) = &st.failed {
                return Err(Error::Invalid(why.clone()));
            }
            if st.commit_leader || !st.front_ready() {
                self.counters.commit_waits.fetch_add(1, Ordering::SeqCst);
                self.ready.wait(&mut st);
                continue;
            }
            st = self.lead_commit(st)?;
        }
    }

    fn commit_ready(&self) {
        let st = self.state.lock();
        if st.failed.is_none() && !st.commit_leader && st.front_ready() {
            // An error is the owners' to see: their commit finds the store failed.
            drop(self.lead_commit(st));
        }
    }

    fn abort(&self, e: &Exception) {
        let write_header = {
            let mut st = self.state.lock();
            self.fail(
                &mut st,
                format!("copy of chunk {} to COW chunk {} failed", e.old, e.new),
            )
        };
        if write_header {
            let _ = self.write_invalid_header();
        }
    }

    fn release(&self, e: &Exception) {
        let mut st = self.state.lock();
        let Some(seq) = st.seq_of.get(&e.new.0).copied() else {
            return;
        };
        if st.slots.get(&seq).is_some_and(|slot| slot.0 == *e) {
            st.slots.remove(&seq);
            st.seq_of.remove(&e.new.0);
            st.marked.remove(&e.new.0);
            st.planner.release();
            // A commit waiting for this slot to become ready may lead now.
            self.ready.notify_all();
        }
    }

    fn invalidate(&self) -> Result<()> {
        let write_header = {
            let mut st = self.state.lock();
            self.fail(&mut st, "the snapshot was invalidated".into())
        };
        if write_header {
            self.write_invalid_header()?;
        }
        Ok(())
    }

    fn begin_merge(&self) -> Result<()> {
        if self.table != TableKind::Snapshot {
            return Err(Error::InvalidArgument(format!(
                "{} is {}: only a snapshot's COW can merge",
                self.cow.describe(),
                self.table.describe()
            )));
        }
        let mut st = self.state.lock();
        if !st.loaded {
            return Err(Error::WrongState("the store is not loaded".into()));
        }
        st.merging = true;
        // Exceptions prepared before the merge began are committed (or the store fails).
        loop {
            if let Some(why) = &st.failed {
                return Err(Error::Invalid(why.clone()));
            }
            if st.slots.is_empty() {
                return Ok(());
            }
            self.ready.wait(&mut st);
        }
    }

    fn prepare_merge(&self, max: usize) -> Result<Vec<Exception>> {
        let mut st = self.state.lock();
        if !st.merging {
            return Err(Error::WrongState("the store is not merging".into()));
        }
        if let Some(why) = &st.failed {
            return Err(Error::Invalid(why.clone()));
        }
        if let Some(area) = st.planner.merge_needs_area() {
            drop(st);
            let entries = self.read_full_area(area)?;
            st = self.state.lock();
            st.planner.step_back(entries)?;
        }
        Ok(st.planner.merge_batch(max).to_vec())
    }

    fn commit_merge(&self, n: usize) -> Result<()> {
        let st = self.state.lock();
        if !st.merging {
            return Err(Error::WrongState("the store is not merging".into()));
        }
        let (next, steps) = st.planner.commit_merge(n)?;
        drop(st);
        // Only the merger changes the planner while merging: installing `next` after the
        // I/O cannot lose another change.
        self.run(&steps)?;
        let mut st = self.state.lock();
        st.planner = next;
        st.entries = st.entries.saturating_sub(n as u64);
        Ok(())
    }

    fn merge_remaining(&self) -> u64 {
        self.state.lock().planner.merge_remaining()
    }

    fn usage(&self) -> Usage {
        let st = self.state.lock();
        Usage {
            allocated_sectors: st.planner.allocated_sectors(),
            total_sectors: self.cow.size() >> 9,
            metadata_sectors: st.planner.metadata_sectors(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::{FaultRule, FaultyDevice, MemDevice, OpKind};
    use crate::testkit::wait_until;

    fn cs(s: u64) -> ChunkSize {
        ChunkSize::from_sectors(s).unwrap()
    }

    fn fresh(size: u64, chunk: u64) -> (Arc<MemDevice>, PersistentStore) {
        let dev = Arc::new(MemDevice::new(size));
        let s = PersistentStore::open(dev.clone(), Some(cs(chunk)), false).unwrap();
        assert_eq!(
            s.load(Default::default(), &mut |_, _| Ok(())).unwrap(),
            LoadOutcome::Fresh
        );
        (dev, s)
    }

    #[test]
    fn fresh_store_is_formatted_like_the_kernel() {
        let (dev, s) = fresh(16 << 20, 16);
        let img = dev.to_vec();
        assert_eq!(&img[..16], &format::encode_header(true, cs(16))[..16]);
        let u = s.usage();
        assert_eq!(
            (u.allocated_sectors, u.total_sectors, u.metadata_sectors),
            (32, 32768, 32)
        );
        assert_eq!(s.kind().to_string(), "P");
    }

    #[test]
    fn commits_persist_and_reload_in_order() {
        let (dev, s) = fresh(1 << 20, 8);
        let a = s.prepare(Chunk(5)).unwrap();
        let b = s.prepare(Chunk(9)).unwrap();
        assert_eq!((a, b), (Chunk(2), Chunk(3)));
        s.commit(&[
            Exception {
                old: Chunk(5),
                new: a,
            },
            Exception {
                old: Chunk(9),
                new: b,
            },
        ])
        .unwrap();
        let again = PersistentStore::open(dev.clone(), None, true).unwrap();
        let mut got = Vec::new();
        assert_eq!(
            again
                .load(Default::default(), &mut |_, e| {
                    got.push(e);
                    Ok(())
                })
                .unwrap(),
            LoadOutcome::Valid
        );
        assert_eq!(got, vec![Exception::new(5, 2), Exception::new(9, 3)]);
        assert_eq!(again.usage().allocated_sectors, 32);
        assert_eq!(again.prepare(Chunk(1)).unwrap(), Chunk(4));
        assert!(
            again.commit(&[Exception::new(7, 4)]).is_err(),
            "not prepared"
        );
    }

    #[test]
    fn a_later_commit_waits_for_an_earlier_prepare() {
        let (_dev, s) = fresh(1 << 20, 8);
        let s = Arc::new(s);
        let first = s.prepare(Chunk(1)).unwrap();
        let second = s.prepare(Chunk(2)).unwrap();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            s2.commit(&[Exception {
                old: Chunk(2),
                new: second,
            }])
        });
        // The second commit blocks until the first is durable.
        wait_until(|| s.stats().commit_waits > 0 || t.is_finished());
        assert!(!t.is_finished(), "commit of #2 must wait for #1");
        assert_eq!(s.stats().area_writes, 0);
        s.commit(&[Exception {
            old: Chunk(1),
            new: first,
        }])
        .unwrap();
        t.join().unwrap().unwrap();
        assert_eq!(s.stats().exceptions_committed, 2);
    }

    #[test]
    fn abort_wakes_waiters_and_invalidates_the_header() {
        let (dev, s) = fresh(1 << 20, 8);
        let s = Arc::new(s);
        let first = s.prepare(Chunk(1)).unwrap();
        let second = s.prepare(Chunk(2)).unwrap();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.commit(&[Exception::new(2, second.0)]));
        wait_until(|| s.stats().commit_waits > 0 || t.is_finished());
        s.abort(&Exception::new(1, first.0));
        assert!(matches!(t.join().unwrap(), Err(Error::Invalid(_))));
        assert_eq!(dev.to_vec()[4], 0, "header valid = 0");
        assert!(s.prepare(Chunk(3)).is_err());
        let again = PersistentStore::open(dev, None, false).unwrap();
        assert_eq!(
            again.load(Default::default(), &mut |_, _| Ok(())).unwrap(),
            LoadOutcome::Invalid
        );
    }

    #[test]
    fn a_metadata_write_error_invalidates() {
        let mem = Arc::new(MemDevice::new(1 << 20));
        let dev = Arc::new(FaultyDevice::new(mem.clone()));
        let s = PersistentStore::open(dev.clone(), Some(cs(8)), false).unwrap();
        s.load(Default::default(), &mut |_, _| Ok(())).unwrap();
        dev.add_rule(FaultRule::Range {
            kind: OpKind::Write,
            start: 4096,
            end: 8192,
        });
        let c = s.prepare(Chunk(1)).unwrap();
        assert!(s
            .commit(&[Exception {
                old: Chunk(1),
                new: c
            }])
            .is_err());
        assert!(s.failure().is_some());
        assert_eq!(mem.to_vec()[4], 0);
    }

    #[test]
    fn header_chunk_size_wins() {
        let (dev, _s) = fresh(1 << 20, 16);
        let s = PersistentStore::open(dev, Some(cs(8)), false).unwrap();
        assert_eq!(s.chunk_size(), cs(16));
        assert_eq!(s.overridden_chunk_size(), Some(cs(8)));
    }
}
