//! The copy-out batcher: the copy-out writes of concurrent origin writes go to the COW
//! devices together, coalesced, and their exceptions are committed together.
//!
//! Each origin write that copies chunks out reads them itself, then hands its COW writes to
//! the batcher and waits. The first waiting request that finds no batch under way becomes
//! the *batch leader* (flat combining: no extra thread): it takes every queued request's
//! writes, sorts them per COW device, merges writes that touch end to end into one, writes
//! them, marks the exceptions of the writes that succeeded ready in their stores, and asks
//! each store to commit what is ready ([`ExceptionStore::commit_ready`]), which never waits
//! for an exception that is not ready. Then it hands every request its results and wakes
//! them. A request's own commit afterwards usually finds its exceptions durable.
//!
//! With N snapshots a first write thus costs one wait in the request's thread, and the
//! device sees one write per COW per batch for the chunks allocated consecutively. The
//! ordering rule is the store's: data written, then (in the store's commit) flushed, then
//! the metadata; the origin is written only after the request's own commit returns.
//!
//! Each waiting request has a mailbox (a mutex and a condition variable of its own), so a
//! wake-up goes to the one thread it concerns: the leader wakes as many waiters as there
//! are other stores' parts to do, each request of its batch once with its results, and the
//! first queued request to lead the next batch.
//!
//! The leader never waits for anything but its own batch's I/O, so requests queued behind
//! it cannot deadlock with it. If a store's part panics, every write of that part fails
//! (their snapshots are invalidated by their owners) and the other parts go on.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::dev::{AlignedBuf, BlockDevice, Fua};
use crate::error::{Error, Result};
use crate::exception::{Exception, ExceptionStore};
use crate::mutation;
use crate::units::mem_usize;

/// Largest write the batcher makes by merging.
pub const MAX_MERGED: usize = 1 << 20;

/// One COW write handed to the batcher.
#[derive(Debug)]
pub struct CowWrite {
    /// The COW device.
    pub dev: Arc<dyn BlockDevice>,
    /// Byte offset on it.
    pub offset: u64,
    /// The data (shared by the writes of one origin read to several COWs).
    pub data: Arc<AlignedBuf>,
    /// The store the exceptions belong to.
    pub store: Arc<dyn ExceptionStore>,
    /// The exceptions whose COW chunks this write fills.
    pub exceptions: Vec<Exception>,
}

/// Batches the COW writes of concurrent requests (see the module docs).
#[derive(Debug, Default)]
pub struct CopyOutBatcher {
    state: Mutex<State>,
}

/// One request's writes and where its thread waits.
#[derive(Debug)]
struct Entry {
    writes: Vec<CowWrite>,
    slot: Arc<Slot>,
}

type Batch = Arc<Vec<Entry>>;

/// What one store's part of a batch left: failed writes (request, write, error) and the
/// device writes issued.
type GroupOutcome = (Vec<(usize, usize, Error)>, u64);

/// One store's part of a batch, for a waiting request (or the leader) to do.
#[derive(Debug)]
struct Task {
    batch: Batch,
    group: Vec<(u64, usize, usize)>,
    gather: Arc<Gather>,
}

/// Where the stores' parts of a batch report to its leader.
#[derive(Debug, Default)]
struct Gather {
    outcomes: Mutex<(Vec<GroupOutcome>, usize)>,
    all_in: Condvar,
}

/// A waiting request's mailbox: each request is woken only for what concerns it.
#[derive(Debug, Default)]
struct Slot {
    mail: Mutex<Option<Mail>>,
    arrived: Condvar,
}

#[derive(Debug)]
enum Mail {
    /// Lead the next batch (the queue holds this request's writes).
    Lead,
    /// Stores' parts of the batch under way are waiting to be done.
    Help,
    /// The request's results.
    Done(Vec<Result<()>>),
}

impl Slot {
    fn post(&self, m: Mail) {
        *self.mail.lock() = Some(m);
        self.arrived.notify_one();
    }

    /// Asks for help unless the slot already holds something (which the request will act
    /// on first; `Help` is only a hint).
    fn hint(&self) {
        let mut mail = self.mail.lock();
        if mail.is_none() {
            *mail = Some(Mail::Help);
            self.arrived.notify_one();
        }
    }

    fn take(&self) -> Mail {
        let mut mail = self.mail.lock();
        loop {
            if let Some(m) = mail.take() {
                return m;
            }
            self.arrived.wait(&mut mail);
        }
    }
}

#[derive(Debug, Default)]
struct State {
    queue: Vec<Entry>,
    tasks: Vec<Task>,
    /// A batch leader is at work.
    leading: bool,
    batches: u64,
    writes: u64,
    device_writes: u64,
}

/// What a batcher has done (tests and benchmarks read it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatcherStats {
    /// Batches led.
    pub batches: u64,
    /// COW writes handed in.
    pub writes: u64,
    /// Writes issued to devices after merging.
    pub device_writes: u64,
}

impl CopyOutBatcher {
    /// A batcher with nothing queued.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counters since creation.
    pub fn stats(&self) -> BatcherStats {
        let st = self.state.lock();
        BatcherStats {
            batches: st.batches,
            writes: st.writes,
            device_writes: st.device_writes,
        }
    }

    /// Writes `writes`, marks the exceptions of those that succeeded ready and lets their
    /// stores commit; returns, per write, `Ok` or the error that failed it. While it waits, the
    /// calling thread may be given another store's part of its batch to do.
    pub fn write(&self, writes: Vec<CowWrite>) -> Vec<Result<()>> {
        if writes.is_empty() {
            return Vec::new();
        }
        let slot = Arc::new(Slot::default());
        let lead = {
            let mut st = self.state.lock();
            st.queue.push(Entry {
                writes,
                slot: slot.clone(),
            });
            !std::mem::replace(&mut st.leading, true)
        };
        if lead {
            return self.lead(&slot);
        }
        self.help();
        loop {
            match slot.take() {
                Mail::Done(r) => return r,
                Mail::Help => self.help(),
                Mail::Lead => return self.lead(&slot),
            }
        }
    }

    /// Does posted stores' parts of the batch under way until none is left.
    fn help(&self) {
        loop {
            let Some(task) = self.state.lock().tasks.pop() else {
                return;
            };
            let outcome = run_task(&task.batch, task.group);
            let mut g = task.gather.outcomes.lock();
            g.0.push(outcome);
            g.1 -= 1;
            if g.1 == 0 {
                task.gather.all_in.notify_one();
            }
        }
    }

    /// Leads a batch of every queued request's writes (the caller's are among them): one
    /// store's part on this thread, the others posted for waiting requests. Hands every
    /// other request its results and the next queued request the lead; returns the
    /// caller's.
    fn lead(&self, me: &Arc<Slot>) -> Vec<Result<()>> {
        let batch: Batch = Arc::new(std::mem::take(&mut self.state.lock().queue));
        let mut groups = store_groups(&batch).into_iter();
        let mine = groups.next().unwrap_or_default();
        let gather = self.post_parts(&batch, groups, me);
        let mut outcomes = vec![run_task(&batch, mine)];
        self.help();
        {
            let mut g = gather.outcomes.lock();
            while g.1 > 0 {
                gather.all_in.wait(&mut g);
            }
            outcomes.append(&mut g.0);
        }
        self.hand_out(&batch, outcomes, me)
    }

    /// Posts the other stores' parts of `batch` and wakes as many waiting requests (of this
    /// batch or queued for the next) as there are parts, no more.
    fn post_parts(
        &self,
        batch: &Batch,
        parts: impl Iterator<Item = Vec<(u64, usize, usize)>>,
        me: &Arc<Slot>,
    ) -> Arc<Gather> {
        let gather = Arc::new(Gather::default());
        let tasks: Vec<Task> = parts
            .map(|group| Task {
                batch: batch.clone(),
                group,
                gather: gather.clone(),
            })
            .collect();
        let posted = tasks.len();
        gather.outcomes.lock().1 = posted;
        let mut st = self.state.lock();
        st.tasks.extend(tasks);
        let waiting = batch.iter().chain(st.queue.iter());
        for e in waiting.filter(|e| !Arc::ptr_eq(&e.slot, me)).take(posted) {
            e.slot.hint();
        }
        gather
    }

    /// Ends a batch: counts it, passes the lead on, posts every other request its results;
    /// returns the leader's own.
    fn hand_out(
        &self,
        batch: &Batch,
        outcomes: Vec<GroupOutcome>,
        me: &Arc<Slot>,
    ) -> Vec<Result<()>> {
        let mut results: Vec<Vec<Result<()>>> = batch
            .iter()
            .map(|e| e.writes.iter().map(|_| Ok(())).collect())
            .collect();
        let mut device_writes = 0;
        for (failed, n) in outcomes {
            device_writes += n;
            for (r, w, error) in failed {
                results[r][w] = Err(error);
            }
        }
        {
            let mut st = self.state.lock();
            st.batches += 1;
            st.writes += batch.iter().map(|e| e.writes.len() as u64).sum::<u64>();
            st.device_writes += device_writes;
            match st.queue.first() {
                Some(next) => next.slot.post(Mail::Lead),
                None => st.leading = false,
            }
        }
        let mut own = Vec::new();
        for (e, r) in batch.iter().zip(results) {
            if Arc::ptr_eq(&e.slot, me) {
                own = r;
            } else {
                e.slot.post(Mail::Done(r));
            }
        }
        own
    }
}

/// Runs one store's part of a batch; a panic fails its writes instead of unwinding
/// through another request's thread.
fn run_task(batch: &[Entry], group: Vec<(u64, usize, usize)>) -> GroupOutcome {
    let all: Vec<(usize, usize)> = group.iter().map(|&(_, r, w)| (r, w)).collect();
    let run = std::panic::AssertUnwindSafe(|| store_group(batch, group));
    std::panic::catch_unwind(run).unwrap_or_else(|_| {
        let error = Error::Invalid("a copy-out batch panicked while writing to the COW".into());
        (
            all.into_iter()
                .map(|(r, w)| (r, w, error.clone()))
                .collect(),
            0,
        )
    })
}

/// Identity of a device or store behind an `Arc`, for grouping.
fn key<T: ?Sized>(a: &Arc<T>) -> usize {
    Arc::as_ptr(a) as *const () as usize
}

/// A batch's writes per store, as (offset, request index, write index).
fn store_groups(batch: &[Entry]) -> Vec<Vec<(u64, usize, usize)>> {
    let mut by_store: BTreeMap<usize, Vec<(u64, usize, usize)>> = BTreeMap::new();
    for (r, e) in batch.iter().enumerate() {
        for (w, cw) in e.writes.iter().enumerate() {
            by_store
                .entry(key(&cw.store))
                .or_default()
                .push((cw.offset, r, w));
        }
    }
    by_store.into_values().collect()
}

/// One store's part of a batch: its writes, merged where they touch end to end, then its
/// ready marks and commit. Returns the failed writes and the device writes issued.
fn store_group(batch: &[Entry], mut list: Vec<(u64, usize, usize)>) -> GroupOutcome {
    let get = |&(_, r, w): &(u64, usize, usize)| &batch[r].writes[w];
    let Some(store) = list.first().map(|k| get(k).store.clone()) else {
        return (Vec::new(), 0);
    };
    let exceptions_of = |ks: &[(u64, usize, usize)]| -> Vec<Exception> {
        ks.iter()
            .flat_map(|k| get(k).exceptions.iter().copied())
            .collect()
    };
    // Sorted by device, then offset.
    list.sort_unstable_by_key(|k| (key(&get(k).dev), k.0));
    if mutation::active("batcher-commit-before-write") {
        store.mark_ready(&exceptions_of(&list));
        store.commit_ready();
    }
    let mut failed: Vec<(usize, usize, Error)> = Vec::new();
    let mut ready = Vec::new();
    let mut device_writes = 0u64;
    let mut rest = &list[..];
    while !rest.is_empty() {
        let n = mergeable(batch, rest);
        let (part, tail) = rest.split_at(n);
        device_writes += 1;
        match write_merged(batch, part) {
            Ok(()) => ready.extend(part.iter().flat_map(|k| get(k).exceptions.iter().copied())),
            Err(e) => failed.extend(part.iter().map(|&(_, r, w)| (r, w, e.clone()))),
        }
        rest = tail;
    }
    // Mark what was written ready, then let the store commit it.
    store.mark_ready(&ready);
    store.commit_ready();
    (failed, device_writes)
}

/// How many writes at the start of `list` (sorted by device and offset) touch end to end
/// on one device, up to [`MAX_MERGED`] bytes in all (at least one).
fn mergeable(batch: &[Entry], list: &[(u64, usize, usize)]) -> usize {
    let get = |&(_, r, w): &(u64, usize, usize)| &batch[r].writes[w];
    let Some(first) = list.first() else {
        return 0;
    };
    let dev = key(&get(first).dev);
    let mut end = first.0;
    list.iter()
        .take_while(|k| {
            let len = get(k).data.len() as u64;
            let fits =
                key(&get(k).dev) == dev && k.0 == end && end + len - first.0 <= MAX_MERGED as u64;
            end += len;
            fits
        })
        .count()
        .max(1)
}

/// Writes `part` (writes touching end to end on one device) with one device write.
fn write_merged(batch: &[Entry], part: &[(u64, usize, usize)]) -> crate::error::Result<()> {
    let get = |&(_, r, w): &(u64, usize, usize)| &batch[r].writes[w];
    let first = get(&part[0]);
    let start = part[0].0;
    if part.len() == 1 {
        return first.dev.write_at(&first.data, start, Fua::No);
    }
    let end = part
        .iter()
        .map(|k| k.0 + get(k).data.len() as u64)
        .max()
        .unwrap_or(start);
    // A merged part is at most MAX_MERGED bytes (see `mergeable`), so it fits memory.
    let mut buf = AlignedBuf::zeroed(mem_usize(end - start));
    for k in part {
        let d = &get(k).data;
        let at = mem_usize(k.0 - start);
        buf[at..at + d.len()].copy_from_slice(d);
    }
    first.dev.write_at(&buf, start, Fua::No)
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
mod tests {
    use super::*;
    use crate::dev::{FaultRule, FaultyDevice, MemDevice, OpKind};
    use crate::exception::persistent::PersistentStore;
    use crate::units::{Chunk, ChunkSize};

    const CHUNK: u64 = 4096;

    fn store(cow: Arc<dyn BlockDevice>) -> Arc<PersistentStore> {
        let s = PersistentStore::open(cow, Some(ChunkSize::MIN), false).unwrap();
        s.load(Default::default(), &mut |_, _| Ok(())).unwrap();
        Arc::new(s)
    }

    /// One chunk's copy-out for `store`: allocates it and returns the write.
    fn write_for(store: &Arc<PersistentStore>, old: u64, fill: u8) -> CowWrite {
        let new = store.prepare(Chunk(old)).unwrap();
        let mut data = AlignedBuf::zeroed(CHUNK as usize);
        data.fill(fill);
        CowWrite {
            dev: store.cow().clone(),
            offset: new.0 * CHUNK,
            data: Arc::new(data),
            store: store.clone(),
            exceptions: vec![Exception {
                old: Chunk(old),
                new,
            }],
        }
    }

    #[test]
    fn adjacent_writes_merge_and_their_exceptions_are_committed() {
        let cow = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(1 << 20))));
        let s = store(cow.clone());
        let c = CopyOutBatcher::new();
        let writes: Vec<_> = (0..4).map(|i| write_for(&s, i, i as u8 + 1)).collect();
        let batch: Vec<Exception> = writes.iter().flat_map(|w| w.exceptions.clone()).collect();
        let offsets: Vec<u64> = writes.iter().map(|w| w.offset).collect();
        let w0 = cow.count(OpKind::Write);
        let r = c.write(writes);
        assert!(r.iter().all(Result::is_ok));
        assert_eq!(
            c.stats(),
            BatcherStats {
                batches: 1,
                writes: 4,
                device_writes: 1
            }
        );
        // One data write, then the commit's metadata write.
        assert_eq!(cow.count(OpKind::Write) - w0, 2);
        assert_eq!(s.stats().exceptions_committed, 4);
        // The owners' commit finds them durable and does no I/O.
        s.commit(&batch).unwrap();
        assert_eq!(s.stats().group_commits, 1);
        for (i, off) in offsets.into_iter().enumerate() {
            let mut b = vec![0u8; CHUNK as usize];
            cow.read_at(&mut b, off).unwrap();
            assert!(b.iter().all(|&x| x == i as u8 + 1));
        }
    }

    #[test]
    fn a_failed_write_fails_only_its_own_writes_and_commits_nothing_of_them() {
        let bad_dev = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(1 << 20))));
        let good = store(Arc::new(MemDevice::new(1 << 20)));
        let bad = store(bad_dev.clone());
        bad_dev.add_rule(FaultRule::Nth {
            kind: OpKind::Write,
            n: 1,
        });
        let c = CopyOutBatcher::new();
        let r = c.write(vec![write_for(&good, 0, 1), write_for(&bad, 0, 1)]);
        assert!(r[0].is_ok());
        assert!(matches!(r[1], Err(Error::Io { op: "write", .. })), "{r:?}");
        assert_eq!(good.stats().exceptions_committed, 1);
        assert_eq!(bad.stats().exceptions_committed, 0);
    }

    #[test]
    fn concurrent_requests_share_batches_and_every_write_lands() {
        let stores: Vec<_> = (0..3)
            .map(|_| store(Arc::new(MemDevice::new(4 << 20))))
            .collect();
        let c = CopyOutBatcher::new();
        let results: Vec<(Vec<CowWrite>, Vec<Result<()>>)> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8u64)
                .map(|t| {
                    let (stores, c) = (&stores, &c);
                    sc.spawn(move || {
                        let mut out = Vec::new();
                        for k in 0..40 {
                            let old = t * 1000 + k;
                            let fill = (old % 251) as u8 + 1;
                            let ws: Vec<_> =
                                stores.iter().map(|s| write_for(s, old, fill)).collect();
                            let keep: Vec<_> = ws
                                .iter()
                                .map(|w| CowWrite {
                                    dev: w.dev.clone(),
                                    offset: w.offset,
                                    data: w.data.clone(),
                                    store: w.store.clone(),
                                    exceptions: w.exceptions.clone(),
                                })
                                .collect();
                            out.push((keep, c.write(ws)));
                        }
                        out
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let st = c.stats();
        assert_eq!(st.writes, 8 * 40 * 3);
        assert!(st.batches <= 8 * 40, "{st:?}");
        for (ws, r) in results {
            assert_eq!(r.len(), ws.len());
            assert!(r.iter().all(Result::is_ok));
            for w in ws {
                let mut b = vec![0u8; CHUNK as usize];
                w.dev.read_at(&mut b, w.offset).unwrap();
                assert_eq!(&b[..], &w.data[..]);
                w.store.commit(&w.exceptions).unwrap();
            }
        }
        for s in &stores {
            assert_eq!(s.stats().exceptions_committed, 8 * 40);
        }
    }
}
