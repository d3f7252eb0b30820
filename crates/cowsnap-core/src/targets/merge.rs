//! The merge target: an origin rolled back to one of its snapshots (the kernel's
//! `snapshot-merge`).
//!
//! From the switch on ([`Origin::start_merge`](super::Origin::start_merge)) the origin
//! volume shows the merging snapshot's content: a chunk still in the snapshot's table is
//! read and written in the COW (the merging store allocates nothing), every other chunk
//! takes the normal origin path, copy-outs to the other snapshots included. A *merger*
//! thread moves the table back onto the origin, newest entries first, one batch at a
//! time:
//!
//! 1. the store's [`prepare_merge`](crate::exception::ExceptionStore::prepare_merge) gives
//!    the batch: the last entries of the table, from one metadata area;
//! 2. the batch's chunks become the *window*: view writes to them wait until the batch is
//!    committed; writes already going to those chunks in the COW are waited for (M5);
//! 3. each chunk is copied COW to origin through the origin's write path, so every other
//!    snapshot first gets its committed copy and no tracked read of it is in flight (M3);
//! 4. the origin is flushed (M1: an entry goes only once its data is durable on the origin);
//! 5. [`commit_merge`](crate::exception::ExceptionStore::commit_merge) removes the entries
//!    from the table's tail with a flushed, FUA area write (M2);
//! 6. the chunks leave the index (they now route to the origin) and the window opens.
//!
//! A crash anywhere leaves a shorter valid table whose every entry still holds its data
//! (or newer data written through the view), so the next start copies the last batch
//! again (M7). ARCHITECTURE.md, "Merge", gives the routing table and the invariants.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::origin::Origin;
use super::snapshot::{Snapshot, SnapshotStatus};
use crate::dev::{AlignedBuf, BlockDevice, Fua};
use crate::error::{Error, Result};
use crate::exception::{Exception, Usage};
use crate::mutation;
use crate::units::{mem_usize, Chunk, ChunkPiece, ChunkSize};

/// The most bytes read from the COW in one piece.
const SEGMENT_BYTES: u64 = 4 << 20;

/// How a merge runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeSettings {
    /// The most data one batch moves (at least one chunk; never more than one metadata
    /// area's entries).
    pub batch_bytes: u64,
    /// Bytes per second, `None` for as fast as the devices go.
    pub rate: Option<u64>,
    /// Start paused: the view is in place, nothing moves until [`Merge::resume`].
    pub paused: bool,
    /// The COW's allocation when the merge first began (sectors), for the percentage; a
    /// resumed merge gives the value recorded then, a new one `None` (the current one).
    pub initial_allocated_sectors: Option<u64>,
}

impl Default for MergeSettings {
    fn default() -> Self {
        MergeSettings {
            batch_bytes: 16 << 20,
            rate: None,
            paused: false,
            initial_allocated_sectors: None,
        }
    }
}

/// Where a merge is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum MergeState {
    /// Moving data.
    Running,
    /// Paused by the user; the view stays.
    Paused,
    /// Stopped (daemon shutdown); the next start resumes.
    Stopped,
    /// An I/O error stopped it; I/O through the view goes on; a resume retries.
    Failed(String),
    /// Every entry is on the origin.
    Done,
}

/// A merge's progress, for status.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MergeStatus {
    /// Where it is.
    #[serde(flatten)]
    pub state: MergeState,
    /// The store's space use now, in the kernel's numbers (`a/b m`).
    pub usage: Usage,
    /// The allocation when the merge began (sectors).
    pub initial_allocated_sectors: u64,
    /// Entries left in the table.
    pub remaining: u64,
    /// Chunks moved since this process started the merge.
    pub merged_chunks: u64,
    /// Bytes moved since this process started the merge.
    pub merged_bytes: u64,
    /// Origin flushes issued by the merger (one per batch).
    pub origin_flushes: u64,
    /// Percent done: `100 (i - a) / (i - m)` with `i` the initial allocation.
    pub percent: f64,
    /// The rate limit, bytes per second.
    pub rate: Option<u64>,
}

impl fmt::Display for MergeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            MergeState::Failed(_) => f.write_str("Merge failed"),
            _ => write!(
                f,
                "{}/{} {}",
                self.usage.allocated_sectors, self.usage.total_sectors, self.usage.metadata_sectors
            ),
        }
    }
}

/// Percent done of a merge: `100 (i - a) / (i - m)` (libsnapshot's formula), with `i` the
/// COW's allocation when the merge was asked for, `a` the allocation now and `m` the
/// metadata, all in sectors; done at `a == m`.
pub fn merge_percent(i: u64, a: u64, m: u64) -> f64 {
    if i <= m {
        return 100.0;
    }
    (100.0 * i.saturating_sub(a) as f64 / (i - m) as f64).clamp(0.0, 100.0)
}

/// Called each time the merge ends: done (once, the last call), or failed (a resume may
/// follow, and then another call).
type FinishHook = Arc<dyn Fn(&MergeState) + Send + Sync>;

struct Control {
    state: MergeState,
    paused: bool,
    stop: bool,
    rate: Option<u64>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The merger thread is in its loop: set when it is spawned, cleared (with the state
    /// change) when it leaves; a resume spawns a new one only when clear.
    alive: bool,
    /// Stopped for good in this process (daemon shutdown): no resume, no new thread.
    shut: bool,
    on_finish: Option<FinishHook>,
}

/// The merging chunks and the view writes going to the COW.
#[derive(Default)]
struct Window {
    /// Chunks of the batch being merged.
    chunks: HashSet<Chunk>,
    /// View writes in flight to the COW, per chunk.
    writes: HashMap<Chunk, u32>,
}

/// A merge in progress: the view's routing and the merger's state.
pub struct Merge {
    snap: Arc<Snapshot>,
    cs: ChunkSize,
    batch_chunks: usize,
    initial_allocated: u64,
    window: Mutex<Window>,
    window_changed: Condvar,
    control: Mutex<Control>,
    control_changed: Condvar,
    /// Held for one batch: batches never overlap, whoever runs them.
    stepping: Mutex<()>,
    merged_chunks: AtomicU64,
    merged_bytes: AtomicU64,
    origin_flushes: AtomicU64,
}

impl fmt::Debug for Merge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Merge")
            .field("snapshot", &self.snap)
            .field("state", &self.control.lock().state)
            .finish()
    }
}

/// An origin write's operation, applied to a piece of its range.
#[derive(Clone, Copy)]
pub(super) enum WriteOp<'a> {
    Write(&'a [u8], Fua),
    Zeroes(Fua),
}

impl WriteOp<'_> {
    /// Applies the part `range` (relative to the request) at `offset` of `dev`.
    pub(super) fn apply(
        &self,
        dev: &dyn BlockDevice,
        offset: u64,
        range: Range<usize>,
    ) -> Result<()> {
        match *self {
            WriteOp::Write(buf, fua) => dev.write_at(&buf[range], offset, fua),
            WriteOp::Zeroes(fua) => dev.write_zeroes(offset, (range.end - range.start) as u64, fua),
        }
    }
}

/// Registered view writes to COW chunks; their end wakes a merger waiting on them.
struct WritesInFlight<'a> {
    merge: &'a Merge,
    chunks: Vec<Chunk>,
}

impl Drop for WritesInFlight<'_> {
    fn drop(&mut self) {
        if self.chunks.is_empty() {
            return;
        }
        let mut w = self.merge.window.lock();
        for c in &self.chunks {
            if let Some(n) = w.writes.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    w.writes.remove(c);
                }
            }
        }
        drop(w);
        self.merge.window_changed.notify_all();
    }
}

/// One contiguous piece of a view request: on the COW at `dev_offset`, or on the origin.
struct Piece {
    on_cow: bool,
    dev_offset: u64,
    range: Range<usize>,
}

impl Merge {
    pub(super) fn new(snap: Arc<Snapshot>, settings: MergeSettings) -> Merge {
        let cs = snap.chunk_size();
        let batch_chunks = mem_usize((settings.batch_bytes / cs.bytes()).max(1));
        let initial_allocated = settings
            .initial_allocated_sectors
            .unwrap_or_else(|| snap.store().usage().allocated_sectors);
        Merge {
            snap,
            cs,
            batch_chunks,
            initial_allocated,
            window: Mutex::new(Window::default()),
            window_changed: Condvar::new(),
            control: Mutex::new(Control {
                state: if settings.paused {
                    MergeState::Paused
                } else {
                    MergeState::Running
                },
                paused: settings.paused,
                stop: false,
                rate: settings.rate,
                thread: None,
                alive: false,
                shut: false,
                on_finish: None,
            }),
            control_changed: Condvar::new(),
            stepping: Mutex::new(()),
            merged_chunks: AtomicU64::new(0),
            merged_bytes: AtomicU64::new(0),
            origin_flushes: AtomicU64::new(0),
        }
    }

    /// The merging snapshot.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    /// Starts the merger thread (unless paused).
    pub(super) fn spawn(self: &Arc<Self>, origin: &Arc<Origin>) -> Result<()> {
        let old = {
            let mut c = self.control.lock();
            if c.alive || c.shut {
                return Ok(());
            }
            c.alive = true;
            c.thread.take()
        };
        if let Some(old) = old {
            // It left its loop: it is only returning (or running the finish hook).
            let _ = old.join();
        }
        let (me, origin) = (self.clone(), Arc::downgrade(origin));
        let spawned = std::thread::Builder::new()
            .name("cowsnap-merge".into())
            .spawn(move || me.run(&origin));
        let mut c = self.control.lock();
        match spawned {
            Ok(t) => {
                c.thread = Some(t);
                Ok(())
            }
            Err(e) => {
                c.alive = false;
                Err(Error::io("spawn", 0, "the merge thread", e))
            }
        }
    }

    /// Calls `hook` (on the merger's thread) each time the merge ends: when it fails (a
    /// resume may follow) and when it is done (the last call). A merge that already ended
    /// calls it at once.
    pub fn on_finish(&self, hook: impl Fn(&MergeState) + Send + Sync + 'static) {
        let hook: FinishHook = Arc::new(hook);
        let mut c = self.control.lock();
        c.on_finish = Some(hook.clone());
        match &c.state {
            MergeState::Done | MergeState::Failed(_) => {
                let state = c.state.clone();
                drop(c);
                hook(&state);
            }
            _ => {}
        }
    }

    /// Pauses after the batch under way.
    pub fn pause(&self) {
        let mut c = self.control.lock();
        c.paused = true;
        if c.state == MergeState::Running {
            c.state = MergeState::Paused;
        }
        self.control_changed.notify_all();
    }

    /// Resumes a paused, stopped or failed merge (a failed one retries the batch that
    /// failed).
    pub fn resume(self: &Arc<Self>, origin: &Arc<Origin>) -> Result<()> {
        {
            let mut c = self.control.lock();
            if c.state == MergeState::Done {
                return Ok(());
            }
            if c.shut {
                return Err(Error::WrongState(
                    "the merge is stopped for shutdown; the next start resumes it".into(),
                ));
            }
            c.paused = false;
            c.stop = false;
            c.state = MergeState::Running;
            self.control_changed.notify_all();
        }
        self.spawn(origin)
    }

    /// Sets the rate limit (bytes per second; `None`: unlimited).
    pub fn set_rate(&self, rate: Option<u64>) {
        self.control.lock().rate = rate;
        self.control_changed.notify_all();
    }

    /// Stops the merger after the batch under way and waits for it (daemon shutdown); the
    /// view stays in place. For good in this process: a later [`resume`](Self::resume) is
    /// refused, the next start goes on.
    pub fn stop(&self) {
        let t = {
            let mut c = self.control.lock();
            c.stop = true;
            c.shut = true;
            if matches!(c.state, MergeState::Running | MergeState::Paused) {
                c.state = MergeState::Stopped;
            }
            self.control_changed.notify_all();
            c.thread.take()
        };
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    /// Runs one batch on the caller's thread, for a merge started paused (tools, and tests
    /// that cut the power between its steps). `Ok(false)` once the table is empty: the
    /// merge is done.
    pub fn merge_batch(&self, origin: &Origin) -> Result<bool> {
        {
            let c = self.control.lock();
            if !c.paused || c.alive {
                return Err(Error::WrongState(
                    "the merger thread is running: pause the merge and let it stop first".into(),
                ));
            }
        }
        match self.step(origin)? {
            Some(_) => Ok(true),
            None => {
                self.finish(MergeState::Done);
                Ok(false)
            }
        }
    }

    /// Blocks until the merge is done, fails, is paused or stopped; returns that state.
    pub fn wait(&self) -> MergeState {
        let mut c = self.control.lock();
        while c.state == MergeState::Running {
            self.control_changed.wait(&mut c);
        }
        c.state.clone()
    }

    /// True once every entry is on the origin.
    pub fn is_done(&self) -> bool {
        self.control.lock().state == MergeState::Done
    }

    /// Progress and state.
    pub fn status(&self) -> MergeStatus {
        let (state, rate) = {
            let c = self.control.lock();
            (c.state.clone(), c.rate)
        };
        let usage = self.snap.store().usage();
        let (i, a, m) = (
            self.initial_allocated,
            usage.allocated_sectors,
            usage.metadata_sectors,
        );
        let percent = if state == MergeState::Done {
            100.0
        } else {
            merge_percent(i, a, m)
        };
        MergeStatus {
            state,
            usage,
            initial_allocated_sectors: i,
            remaining: self.snap.store().merge_remaining(),
            merged_chunks: self.merged_chunks.load(Ordering::SeqCst),
            merged_bytes: self.merged_bytes.load(Ordering::SeqCst),
            origin_flushes: self.origin_flushes.load(Ordering::SeqCst),
            percent,
            rate,
        }
    }

    /// The kernel's status line of the `snapshot-merge` target: `Merge failed`, or
    /// `a/b m` (done when `a == m`).
    pub fn kernel_status(&self) -> SnapshotStatus {
        match &self.control.lock().state {
            MergeState::Failed(_) => SnapshotStatus::MergeFailed,
            _ => SnapshotStatus::Usage(self.snap.store().usage()),
        }
    }

    /// The merger thread: batches until done, paused, stopped or failed.
    fn run(self: Arc<Self>, origin: &Weak<Origin>) {
        let mut started = Instant::now();
        let mut moved = 0u64;
        loop {
            {
                let mut c = self.control.lock();
                loop {
                    if c.stop {
                        c.alive = false;
                        return;
                    }
                    if !c.paused {
                        break;
                    }
                    c.state = MergeState::Paused;
                    self.control_changed.notify_all();
                    self.control_changed.wait(&mut c);
                    started = Instant::now();
                    moved = 0;
                }
                c.state = MergeState::Running;
            }
            let Some(origin) = origin.upgrade() else {
                self.control.lock().alive = false;
                return;
            };
            let step = self.step(&origin);
            drop(origin);
            match step {
                Ok(Some(bytes)) => moved += bytes,
                Ok(None) => return self.finish(MergeState::Done),
                Err(e) => return self.finish(MergeState::Failed(e.to_string())),
            }
            self.throttle(started, moved);
        }
    }

    /// Sleeps as long as the rate limit asks, waking early for pause, stop or a new rate.
    fn throttle(&self, started: Instant, moved: u64) {
        let mut c = self.control.lock();
        while let Some(rate) = c.rate.filter(|r| *r > 0) {
            if c.stop || c.paused {
                return;
            }
            let due = Duration::from_secs_f64(moved as f64 / rate as f64);
            let Some(left) = due.checked_sub(started.elapsed()) else {
                return;
            };
            self.control_changed.wait_for(&mut c, left);
        }
    }

    /// Records the end state (the merger thread, if this is it, leaves its loop) and
    /// calls the finish hook.
    fn finish(&self, state: MergeState) {
        let hook = {
            let mut c = self.control.lock();
            c.state = state.clone();
            c.alive = false;
            self.control_changed.notify_all();
            if state == MergeState::Done {
                c.on_finish.take()
            } else {
                c.on_finish.clone()
            }
        };
        if let Some(hook) = hook {
            hook(&state);
        }
    }

    /// One batch; the bytes it moved, or `None` when the table is empty.
    fn step(&self, origin: &Origin) -> Result<Option<u64>> {
        let _one_at_a_time = self.stepping.lock();
        let store = self.snap.store();
        let batch = store.prepare_merge(self.batch_chunks)?;
        if batch.is_empty() {
            return Ok(None);
        }
        self.open_window(&batch);
        let moved = self.copy_batch(origin, &batch).and_then(|bytes| {
            self.origin_flushes.fetch_add(1, Ordering::SeqCst);
            if !mutation::active("merge-origin-not-flushed") {
                origin.device().flush()?;
            }
            store.commit_merge(batch.len())?;
            Ok(bytes)
        });
        self.close_window(&batch, moved.is_ok());
        let bytes = moved?;
        self.merged_chunks
            .fetch_add(batch.len() as u64, Ordering::SeqCst);
        self.merged_bytes.fetch_add(bytes, Ordering::SeqCst);
        Ok(Some(bytes))
    }

    /// Makes the batch's chunks the window and waits for view writes already going to them.
    fn open_window(&self, batch: &[Exception]) {
        let mut w = self.window.lock();
        w.chunks.extend(batch.iter().map(|e| e.old));
        while batch.iter().any(|e| w.writes.contains_key(&e.old)) {
            self.window_changed.wait(&mut w);
        }
    }

    /// Ends the window: merged chunks leave the index (they route to the origin from now
    /// on) and the writes waiting on them go on.
    fn close_window(&self, batch: &[Exception], merged: bool) {
        let mut w = self.window.lock();
        if merged {
            let index = self.snap.exceptions().index();
            for e in batch {
                index.remove(e.old);
            }
        }
        w.chunks.clear();
        drop(w);
        self.window_changed.notify_all();
    }

    /// Copies the batch's chunks from the COW to the origin, through the origin's write
    /// path (copy-outs to the other snapshots first). Reads runs of consecutive COW
    /// chunks at once and writes runs consecutive on both devices at once.
    fn copy_batch(&self, origin: &Origin, batch: &[Exception]) -> Result<u64> {
        let cb = self.cs.bytes();
        let cow = self.snap.cow();
        let size = origin.size();
        let mut moved = 0;
        let mut i = 0;
        while i < batch.len() {
            let mut j = i + 1;
            while j < batch.len()
                && batch[j].new.0 == batch[j - 1].new.0 + 1
                && (j + 1 - i) as u64 * cb <= SEGMENT_BYTES
            {
                j += 1;
            }
            let seg = &batch[i..j];
            i = j;
            if cb > SEGMENT_BYTES {
                // One chunk larger than a segment: in pieces.
                let e = seg[0];
                let start = self.cs.byte_offset(e.old);
                let len = cb.min(size.saturating_sub(start));
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(SEGMENT_BYTES);
                    let mut buf = AlignedBuf::zeroed(mem_usize(n));
                    cow.read_at(&mut buf, self.cs.byte_offset(e.new) + done)?;
                    origin.merge_write(&buf, start + done)?;
                    done += n;
                }
                moved += len;
                continue;
            }
            let mut buf = AlignedBuf::zeroed(mem_usize(seg.len() as u64 * cb));
            cow.read_at(&mut buf, self.cs.byte_offset(seg[0].new))?;
            let mut k = 0;
            while k < seg.len() {
                let mut l = k + 1;
                while l < seg.len() && seg[l].old.0 == seg[l - 1].old.0 + 1 {
                    l += 1;
                }
                let start = self.cs.byte_offset(seg[k].old);
                let len = ((l - k) as u64 * cb).min(size.saturating_sub(start));
                let from = mem_usize(k as u64 * cb);
                origin.merge_write(&buf[from..from + mem_usize(len)], start)?;
                moved += len;
                k = l;
            }
        }
        Ok(moved)
    }

    /// A read through the view: chunks still in the table from the COW, the rest from
    /// the origin.
    pub(super) fn read(
        &self,
        origin_dev: &dyn BlockDevice,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        let index = self.snap.exceptions().index();
        let pieces: Vec<_> = self.cs.split(offset, buf.len() as u64).collect();
        let on_cow: Vec<bool> = pieces.iter().map(|p| index.contains(p.chunk)).collect();
        let runs = self.runs(offset, &pieces, &on_cow)?;
        for r in runs {
            let dev: &dyn BlockDevice = if r.on_cow {
                &**self.snap.cow()
            } else {
                origin_dev
            };
            dev.read_at(&mut buf[r.range], r.dev_offset)?;
        }
        Ok(())
    }

    /// A write through the view: chunks still in the table are written in the COW (no
    /// new exception); a chunk in the batch being merged waits for its commit; the rest
    /// go to `to_origin(offset, range)`, the origin's normal write path.
    pub(super) fn write(
        &self,
        op: WriteOp<'_>,
        offset: u64,
        len: u64,
        to_origin: &mut dyn FnMut(u64, Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let index = self.snap.exceptions().index();
        let pieces: Vec<_> = self.cs.split(offset, len).collect();
        // Routed under one hold of the window lock, with nothing registered while waiting,
        // so a writer never holds a chunk the merger waits for while it waits for the merger.
        let mut w = self.window.lock();
        while pieces.iter().any(|p| w.chunks.contains(&p.chunk))
            && !mutation::active("merge-window-not-waited")
        {
            self.window_changed.wait(&mut w);
        }
        let on_cow: Vec<bool> = pieces.iter().map(|p| index.contains(p.chunk)).collect();
        let mut registered = WritesInFlight {
            merge: self,
            chunks: Vec::new(),
        };
        for (p, &c) in pieces.iter().zip(&on_cow) {
            if c {
                *w.writes.entry(p.chunk).or_insert(0) += 1;
                registered.chunks.push(p.chunk);
            }
        }
        drop(w);
        let runs = self.runs(offset, &pieces, &on_cow)?;
        for r in runs {
            if r.on_cow {
                op.apply(&**self.snap.cow(), r.dev_offset, r.range)?;
            } else {
                to_origin(r.dev_offset, r.range)?;
            }
        }
        drop(registered);
        Ok(())
    }

    /// The device runs of a view request at `offset` cut into `pieces`, each on the COW
    /// (where the chunk is still in the table: `on_cow`) or on the origin; pieces
    /// contiguous on the same device form one run.
    fn runs(&self, offset: u64, pieces: &[ChunkPiece], on_cow: &[bool]) -> Result<Vec<Piece>> {
        let index = self.snap.exceptions().index();
        let mut runs: Vec<Piece> = Vec::new();
        for (p, &cow) in pieces.iter().zip(on_cow) {
            let dev_offset = if cow {
                self.cs.byte_offset(index.lookup_member(p.chunk)?) + p.offset_in_chunk
            } else {
                offset + p.buf_offset
            };
            let range = p.buf_range();
            match runs.last_mut() {
                Some(last)
                    if last.on_cow == cow
                        && last.dev_offset + (last.range.end - last.range.start) as u64
                            == dev_offset =>
                {
                    last.range.end = range.end;
                }
                _ => runs.push(Piece {
                    on_cow: cow,
                    dev_offset,
                    range,
                }),
            }
        }
        Ok(runs)
    }

    /// Flushes the COW (the view's flush reaches both devices).
    pub(super) fn flush_cow(&self) -> Result<()> {
        self.snap.cow().flush()
    }
}
