//! Bad-block relocation (`bbr`): a device that keeps working when chunks of the device
//! below start failing writes, by relocating each failing chunk to a spare.
//!
//! It is the generic exception layer's second user, after snapshots, and holds only the
//! policy. What it reuses unchanged:
//! * [`ExceptionTracker`] (over an [`ExceptionIndex`]): *key → spare chunk* as completed
//!   exceptions; a relocation is a pending exception, so writes to a chunk being
//!   relocated wait on it (`route_io` answers `Pending`, `route_write` `Wait`); every write
//!   to a chunk's current place is *tracked* (`route_io`), so a relocation drains the
//!   writes already going to the failing place before it reads the rest of the chunk;
//!   reads follow the chain with `lookup`, untracked;
//! * [`ExceptionStore`]: spares are allocated by `prepare` and `{key, spare}` committed by
//!   `commit` with the store's crash-tested order (data durable before the entry); the
//!   persistent store keeps them in the kernel's COW layout with the magic `BbRt`
//!   ([`TableKind::Relocation`]), so `cow check`/`dump` and the index sidecar serve it and
//!   no snapshot code ever takes it for a COW;
//! * [`Copier`]: moves the readable rest of a failing chunk to its spare with the request's
//!   bytes laid over it (no read at all when the write covers the chunk).
//!
//! What it added to the layer: `ExceptionTracker::route_io` (a write must not reach the
//! old place while a relocation is pending, where a snapshot's read may),
//! [`ExceptionStore::release`] (give up an allocation whose
//! spare write failed *without* failing the store, so another spare can be tried), a
//! relocation table's magic, and loading a relocation table whose header was marked invalid
//! (its relocations stay true; only new ones are refused).
//!
//! # Keys: chains instead of duplicate entries
//!
//! A table key is either a chunk of the protected device (`c`) or a spare that failed in
//! turn (`SPARE_KEY | s`). Chunk `c` resolves by following the chain `c → s1`,
//! `SPARE_KEY|s1 → s2`, ... to the last spare. So every key appears once (the index and the
//! store's validation need no "last entry wins"), and each link is committed like any
//! exception.
//!
//! # Policy
//! * A write that fails with a media error (EIO, ENODATA) is relocated: a spare is
//!   allocated; the chunk is read from its failing place (sector by sector when the whole
//!   read fails: the unreadable sectors become zeros on the spare *and* go on the
//!   [`UnreadableList`] first); the request's bytes are laid over it and written to the
//!   spare; the relocation is committed; then the write succeeds.
//! * A read error is **not** relocated (EVMS's `dm-bbr` did, and returned the spare's
//!   garbage): the unreadable sectors go on the list and the read fails with EIO. Reads of
//!   listed sectors fail at once; a write covering them tries the device again and
//!   relocates only if that fails.
//! * A spare whose write fails is released and another is tried (at most
//!   [`SPARE_ATTEMPTS`] per request); a spare that fails later is relocated like any chunk.
//! * No spare left: writes to chunks that fail return EIO, everything else goes on, and
//!   the status says `exhausted`. A failed table write: status `failed`, the relocations
//!   made so far are served, no new one is made.

mod unreadable;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

pub use unreadable::UnreadableList;

use crate::copy::{Copier, CopyDest, Overlay};
use crate::dev::{check_request, AlignedBuf, BlockDevice, Fua};
use crate::error::{Error, Result};
use crate::exception::index::{load_store, IndexConfig};
use crate::exception::{
    Exception, ExceptionIndex, ExceptionStore, ExceptionTracker, IoRoute, LoadOutcome,
    PendingException, ReadRoute, TrackedRead, Usage, WriteRoute,
};
use crate::mutation;
use crate::units::{mem_usize, Chunk, ChunkPiece, ChunkSize, SECTOR_SIZE};

/// The tag of a key that names a failed spare chunk rather than a chunk of the device.
pub const SPARE_KEY: u64 = 1 << 62;
/// The largest chunk a relocation target takes: a relocation that cannot read its chunk
/// whole holds it in memory, outside the copier's budget.
pub const MAX_CHUNK_BYTES: u64 = 1 << 20;
/// Spares one request tries before its write fails.
pub const SPARE_ATTEMPTS: usize = 4;

/// Where a chunk's data lives now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// On the protected device, at its own place.
    Device(Chunk),
    /// On the spare device, at this chunk.
    Spare(Chunk),
}

impl Place {
    /// The table key of the data at this place.
    fn key(self) -> Chunk {
        match self {
            Place::Device(c) => c,
            Place::Spare(s) => Chunk(SPARE_KEY | s.0),
        }
    }
}

/// What a relocation target's status reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BbrStatus {
    /// `ok`, `exhausted` (no spare left) or `failed` (the table could not be written).
    pub state: String,
    /// Why the table failed, when it did.
    pub failure: Option<String>,
    /// Relocations in the table (a failed spare relocated again counts once more).
    pub relocations: u64,
    /// Relocations made by this process.
    pub relocated_now: u64,
    /// Spare writes that failed (each released and another spare tried).
    pub spare_failures: u64,
    /// Sectors on the unreadable list.
    pub unreadable_sectors: u64,
    /// Media errors seen on reads and on writes.
    pub read_errors: u64,
    /// Media errors on writes (each led to a relocation attempt).
    pub write_errors: u64,
    /// Spare chunks still free (each table area takes a chunk too, counted out).
    pub spares_left: u64,
    /// The spare device's use in the kernel's numbers.
    pub spares: Usage,
    /// The chunk size.
    pub chunk_sectors: u64,
}

impl BbrStatus {
    /// The dm-style status line: `RELOCATIONS SPARES_LEFT ALLOCATED/TOTAL UNREADABLE STATE`
    /// (chunks, chunks, sectors of the spare file, sectors, `ok|exhausted|failed`).
    pub fn line(&self) -> String {
        format!(
            "{} {} {}/{} {} {}",
            self.relocations,
            self.spares_left,
            self.spares.allocated_sectors,
            self.spares.total_sectors,
            self.unreadable_sectors,
            self.state
        )
    }
}

#[derive(Debug, Default)]
struct Counters {
    relocated: AtomicU64,
    spare_failures: AtomicU64,
    read_errors: AtomicU64,
    write_errors: AtomicU64,
}

/// A bad-block relocation target over `data`, with spares and table in `store`.
#[derive(Debug)]
pub struct Bbr {
    data: Arc<dyn BlockDevice>,
    spares: Arc<dyn BlockDevice>,
    store: Arc<dyn ExceptionStore>,
    cs: ChunkSize,
    tracker: ExceptionTracker,
    unreadable: UnreadableList,
    copier: Copier,
    exhausted: AtomicBool,
    failure: Mutex<Option<String>>,
    counters: Counters,
}

/// True for the errors a relocation answers: the OS (or a layer below) said EIO or ENODATA,
/// the device could not store or return the data at that place. Anything else (a full
/// file system, a request out of range, a lost connection) is passed on unchanged.
fn is_media_error(e: &Error) -> bool {
    e.io_error()
        .and_then(std::io::Error::raw_os_error)
        .is_some_and(|n| n == libc::EIO || n == libc::ENODATA)
}

/// An I/O error with a message of ours; front ends report it as EIO (an I/O error with no
/// OS errno is EIO, see [`Error::errno`]).
fn eio(op: &'static str, device: String, offset: u64, why: String) -> Error {
    Error::Io {
        op,
        offset,
        device,
        cause: Arc::new(std::io::Error::other(why)),
    }
}

impl Bbr {
    /// Opens a relocation target: loads the table of `store` (formats a fresh one) into an
    /// index configured by `index`, and the unreadable list. `data` is the protected
    /// device; the store's device holds the spares and the table, by default another,
    /// healthy device.
    pub fn open(
        data: Arc<dyn BlockDevice>,
        store: Arc<dyn ExceptionStore>,
        index: IndexConfig,
        unreadable: UnreadableList,
    ) -> Result<Arc<Bbr>> {
        let cs = store.chunk_size();
        if cs.bytes() > MAX_CHUNK_BYTES {
            return Err(Error::InvalidArgument(format!(
                "a relocation chunk of {cs} is too large: at most {}K",
                MAX_CHUNK_BYTES >> 10
            )));
        }
        let spares = store.cow().clone();
        let device = spares.describe();
        let data_chunks = cs.chunks_covering(data.size());
        let spare_chunks = cs.whole_chunks(spares.size());
        let check = |e: Exception| -> Result<()> {
            let key_ok = if e.old.0 & SPARE_KEY != 0 {
                (e.old.0 & !SPARE_KEY) < spare_chunks
            } else {
                e.old.0 < data_chunks
            };
            if key_ok && e.new.0 < spare_chunks && e.new.0 > 0 {
                Ok(())
            } else {
                Err(Error::Corrupt {
                    device: device.clone(),
                    offset: 0,
                    reason: format!(
                        "relocation {} -> {} is outside the device ({data_chunks} chunks) or the spares ({spare_chunks} chunks)",
                        e.old.0, e.new.0
                    ),
                })
            }
        };
        let (ix, outcome) = load_store(index, &*store, &check)?;
        let failure = (outcome == LoadOutcome::Invalid)
            .then(|| "the table's header is marked invalid: no new relocation is made".into());
        Ok(Arc::new(Bbr {
            data,
            spares,
            store,
            cs,
            tracker: ExceptionTracker::new(ix),
            unreadable,
            copier: Copier::default(),
            exhausted: AtomicBool::new(false),
            failure: Mutex::new(failure),
            counters: Counters::default(),
        }))
    }

    /// A relocation target with a transient table and an in-memory index (tests).
    pub fn in_memory(
        data: Arc<dyn BlockDevice>,
        store: Arc<dyn ExceptionStore>,
    ) -> Result<Arc<Bbr>> {
        Self::open(
            data,
            store,
            IndexConfig::temporary(),
            UnreadableList::in_memory(),
        )
    }

    /// The chunk size (the unit of relocation).
    pub fn chunk_size(&self) -> ChunkSize {
        self.cs
    }

    /// The store holding spares and table.
    pub fn store(&self) -> &Arc<dyn ExceptionStore> {
        &self.store
    }

    /// The unreadable list.
    pub fn unreadable(&self) -> &UnreadableList {
        &self.unreadable
    }

    /// The exception index (tools and tests).
    pub fn index(&self) -> &ExceptionIndex {
        self.tracker.index()
    }

    /// The exception tracker (tests observe races through it).
    pub fn exceptions(&self) -> &ExceptionTracker {
        &self.tracker
    }

    /// Where chunk `c`'s data lives now, following the chain of relocations (reads: not
    /// tracked; a read of a place being moved returns what it held, all writes to it
    /// being held back by the relocation).
    fn locate(&self, c: Chunk) -> Result<Place> {
        let mut place = Place::Device(c);
        // Each link names a spare allocated once, so a chain is at most as long as the
        // table; the bound only protects against a damaged table.
        for _ in 0..=self.tracker.completed_count() {
            match self.tracker.lookup(place.key())? {
                Some(s) => place = Place::Spare(s),
                None => return Ok(place),
            }
        }
        Err(self.loop_error(c))
    }

    /// Where a write (or discard) of chunk `c` goes: the chunk's current place, tracked
    /// until the guard drops, or the relocation under way to wait for (then route again).
    fn route(
        &self,
        c: Chunk,
    ) -> Result<std::result::Result<(Place, TrackedRead), Arc<PendingException>>> {
        let mut place = Place::Device(c);
        for _ in 0..=self.tracker.completed_count() {
            let route = if mutation::active("bbr-writes-ignore-pending") {
                match self.tracker.route_read(place.key())? {
                    ReadRoute::Remapped(s) => IoRoute::Remapped(s),
                    ReadRoute::Unmapped(t) => IoRoute::Unmapped(t),
                }
            } else {
                self.tracker.route_io(place.key())?
            };
            match route {
                IoRoute::Remapped(s) => place = Place::Spare(s),
                IoRoute::Pending(p) => return Ok(Err(p)),
                IoRoute::Unmapped(guard) => return Ok(Ok((place, guard))),
            }
        }
        Err(self.loop_error(c))
    }

    fn loop_error(&self, c: Chunk) -> Error {
        Error::Corrupt {
            device: self.spares.describe(),
            offset: 0,
            reason: format!("the relocations of chunk {c} form a loop"),
        }
    }

    /// EIO when a sector of `first..end` is on the unreadable list.
    fn check_listed(&self, first: u64, end: u64) -> Result<()> {
        if self.unreadable.intersects(first, end) {
            return Err(eio(
                "read",
                self.describe(),
                first * SECTOR_SIZE,
                "the sectors read are on the unreadable list: their data was lost".into(),
            ));
        }
        Ok(())
    }

    fn place_offset(&self, p: Place) -> (&dyn BlockDevice, u64) {
        match p {
            Place::Device(c) => (&*self.data, self.cs.byte_offset(c)),
            Place::Spare(s) => (&*self.spares, self.cs.byte_offset(s)),
        }
    }

    /// Bytes of `place` in chunk `c` that exist: the last chunk of the device may be short.
    fn chunk_len(&self, c: Chunk) -> u64 {
        let start = self.cs.byte_offset(c);
        self.cs.bytes().min(self.data.size() - start)
    }

    fn read_piece(&self, buf: &mut [u8], p: &ChunkPiece, offset: u64) -> Result<()> {
        let first = offset / SECTOR_SIZE;
        let end = first + p.len / SECTOR_SIZE;
        self.check_listed(first, end)?;
        let mut place = self.locate(p.chunk)?;
        // A read of a place that was moved meanwhile is read again where the data is now;
        // each round follows a committed relocation, so this ends.
        for _ in 0..=SPARE_ATTEMPTS {
            let (dev, base) = self.place_offset(place);
            let e = match dev.read_at(buf, base + p.offset_in_chunk) {
                // Listed meanwhile: a relocation that could not read these sectors
                // committed (it lists them first), and the spare holds zeros there.
                Ok(()) => return self.check_listed(first, end),
                Err(e) if is_media_error(&e) => e,
                Err(e) => return Err(e),
            };
            let bad: Vec<(u64, u64)> = probe(dev, base + p.offset_in_chunk, p.len)
                .into_iter()
                .map(|(s, e)| (first + s, first + e))
                .collect();
            let now = self.locate(p.chunk)?;
            if now != place {
                place = now;
                continue;
            }
            self.counters.read_errors.fetch_add(1, Ordering::SeqCst);
            // Listed even if nothing failed on the probe (an intermittent error): the read
            // failed, so its data may be lost.
            let bad = if bad.is_empty() {
                vec![(first, end)]
            } else {
                bad
            };
            if let Err(le) = self.unreadable.add(&bad) {
                return Err(Error::Invalid(format!(
                    "{e}; and the unreadable list could not be written: {le}"
                )));
            }
            return Err(e);
        }
        Err(eio(
            "read",
            self.describe(),
            offset,
            format!("chunk {} kept moving while it was read", p.chunk),
        ))
    }

    /// Writes piece `p` where its chunk lives, relocating it if that fails with a media
    /// error. `failed`: the device already failed this piece's write (a whole request's
    /// write reported its offset), so the first round relocates without writing again.
    fn write_piece(
        &self,
        data: &[u8],
        p: &ChunkPiece,
        offset: u64,
        fua: Fua,
        mut failed: Option<Error>,
    ) -> Result<()> {
        let first = offset / SECTOR_SIZE;
        let end = first + p.len / SECTOR_SIZE;
        let mut spare_tries = 0;
        let mut rounds = 0;
        loop {
            rounds += 1;
            if rounds > 64 {
                return Err(Error::Invalid(format!(
                    "chunk {} of {}: its relocation did not settle",
                    p.chunk,
                    self.describe()
                )));
            }
            let (place, guard) = match self.route(p.chunk)? {
                Ok(routed) => routed,
                Err(pending) => {
                    // Its outcome does not matter: the next round routes again.
                    let _ = pending.wait();
                    continue;
                }
            };
            let (dev, base) = self.place_offset(place);
            let r = match failed.take() {
                Some(e) if place == Place::Device(p.chunk) => Err(e),
                _ => dev.write_at(data, base + p.offset_in_chunk, fua),
            };
            match r {
                Ok(()) => {
                    if mutation::active("bbr-cleared-untracked") {
                        drop(guard);
                    }
                    if self.unreadable.intersects(first, end) {
                        // Off the list only once the new data is durable, and while the
                        // write is still tracked: a relocation of this chunk that lists
                        // these sectors must not start until the list is cleared.
                        dev.flush()?;
                        self.unreadable.clear(first, end)?;
                    }
                    return Ok(());
                }
                Err(e) if is_media_error(&e) => {
                    drop(guard);
                    self.counters.write_errors.fetch_add(1, Ordering::SeqCst);
                    match self.relocate(place, data, p, &mut spare_tries, &e)? {
                        Relocated::Done => return Ok(()),
                        Relocated::Again => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Relocates the data at `place` (which just failed a write of `data` over piece `p`)
    /// to a spare, with `data` laid over it. `Again`: someone else relocated it, or this
    /// spare failed; the caller resolves and writes again.
    fn relocate(
        &self,
        place: Place,
        data: &[u8],
        p: &ChunkPiece,
        spare_tries: &mut usize,
        cause: &Error,
    ) -> Result<Relocated> {
        let refuse = |why: &str| {
            eio(
                "write",
                self.describe(),
                self.cs.byte_offset(p.chunk) + p.offset_in_chunk,
                format!("{cause}; {why}"),
            )
        };
        if let Some(why) = self.failure.lock().clone() {
            return Err(refuse(&why));
        }
        let route = self
            .tracker
            .route_write(place.key(), |k| self.store.prepare(k));
        let mut owned = match route {
            Ok(WriteRoute::Own(owned)) => owned,
            Ok(WriteRoute::Remapped { .. }) => return Ok(Relocated::Again),
            Ok(WriteRoute::Wait(pending)) => {
                // Its outcome does not matter: the next round resolves again.
                let _ = pending.wait();
                return Ok(Relocated::Again);
            }
            Err(Error::CowFull { .. }) => {
                self.exhausted.store(true, Ordering::SeqCst);
                return Err(refuse("no spare chunk is left"));
            }
            Err(e) => return Err(e),
        };
        let store = self.store.clone();
        owned.on_abandon(move |e| store.release(&e));
        let e = owned.exception;
        // Writes that were already going to the failing place end first, so the chunk
        // read below includes them.
        if !mutation::active("bbr-relocation-not-drained") {
            self.tracker.wait_reads_drained(place.key());
        }
        let (src, src_base) = self.place_offset(place);
        let len = self.chunk_len(p.chunk);
        let spare_at = self.cs.byte_offset(e.new);
        let overlay = Overlay {
            offset: p.offset_in_chunk,
            data,
        };
        let dest = [CopyDest {
            dev: &*self.spares,
            offset: spare_at,
        }];
        let report = self.copier.copy(src, src_base, len, &dest, Some(overlay));
        let copied = match (&report.read_error, report.dest_result(0)) {
            // The failing place cannot be read whole: salvage what it can give.
            (Some(re), _) if is_media_error(re) => {
                self.salvage(src, src_base, len, p, data, spare_at)
            }
            (Some(re), _) => Err(re.clone()),
            (None, r) => r,
        };
        if let Err(we) = copied {
            if is_media_error(&we) && *spare_tries + 1 < SPARE_ATTEMPTS {
                // This spare is bad: skip it and try another.
                *spare_tries += 1;
                self.counters.spare_failures.fetch_add(1, Ordering::SeqCst);
                self.store.release(&e);
                self.tracker.fail(owned, we);
                return Ok(Relocated::Again);
            }
            self.store.release(&e);
            self.tracker.fail(owned, we.clone());
            return Err(we);
        }
        if let Err(ce) = self.store.commit(&[e]) {
            let why = format!("writing the relocation table failed: {ce}");
            *self.failure.lock() = Some(why.clone());
            self.tracker.fail(owned, ce);
            return Err(refuse(&why));
        }
        // The commit made the written sectors durable on the spare: off the list, before
        // the chunk is released to others (a relocation of the spare in turn lists what
        // it cannot read only after this).
        let (first, end) = (
            self.cs.first_sector(p.chunk).0 + p.offset_in_chunk / SECTOR_SIZE,
            self.cs.first_sector(p.chunk).0 + (p.offset_in_chunk + p.len) / SECTOR_SIZE,
        );
        let cleared = if self.unreadable.intersects(first, end) {
            self.unreadable.clear(first, end)
        } else {
            Ok(())
        };
        self.tracker.complete(owned)?;
        self.counters.relocated.fetch_add(1, Ordering::SeqCst);
        cleared.map(|()| Relocated::Done)
    }

    /// The failing place could not be read whole: reads it sector by sector, lists the
    /// sectors it could not read (durably, before anything points at the spare), and
    /// writes the chunk to the spare with zeros there and `data` over it.
    fn salvage(
        &self,
        src: &dyn BlockDevice,
        src_base: u64,
        len: u64,
        p: &ChunkPiece,
        data: &[u8],
        spare_at: u64,
    ) -> Result<()> {
        let mut buf = AlignedBuf::zeroed(mem_usize(len));
        // Not the medium (the device went away): nothing is known lost, no relocation.
        let bad = read_salvaging(src, src_base, &mut buf)?;
        let first_sector = self.cs.first_sector(p.chunk).0;
        let (w0, w1) = (p.offset_in_chunk, p.offset_in_chunk + p.len);
        let lost: Vec<(u64, u64)> = bad
            .into_iter()
            .filter(|&i| i * SECTOR_SIZE < w0 || i * SECTOR_SIZE >= w1)
            .map(|i| (first_sector + i, first_sector + i + 1))
            .collect();
        if !mutation::active("bbr-salvage-not-listed") {
            self.unreadable.add(&lost)?;
        }
        buf[mem_usize(w0)..mem_usize(w1)].copy_from_slice(data);
        self.spares.write_at(&buf, spare_at, Fua::No)
    }

    /// The common case as one device request: when no chunk of `offset..offset+len` is
    /// relocated (or, for a `write`, being relocated) and no sector of it is listed, the
    /// whole range lives on the device; a write's chunks are tracked (as one piece's write
    /// would be) until the guards drop. `None` otherwise: the caller goes piece by piece.
    fn all_on_device(
        &self,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<Option<Vec<TrackedRead>>> {
        let first = offset / SECTOR_SIZE;
        if self.unreadable.intersects(first, first + len / SECTOR_SIZE) {
            return Ok(None);
        }
        let mut tracked = Vec::new();
        for p in self.cs.split(offset, len) {
            if !write {
                if self.tracker.index().contains(p.chunk) {
                    return Ok(None);
                }
                continue;
            }
            match self.route(p.chunk)? {
                Ok((Place::Device(_), t)) => tracked.push(t),
                Ok((Place::Spare(_), _)) | Err(_) => return Ok(None),
            }
        }
        Ok(Some(tracked))
    }

    /// Status now.
    pub fn status(&self) -> BbrStatus {
        let failure = self.failure.lock().clone();
        let spares = self.store.usage();
        // No spare left: a relocation found none, or none fits (a restart forgets the
        // first; the table still has no room).
        let spares_left = if self.exhausted.load(Ordering::SeqCst) {
            0
        } else {
            free_data_chunks(&spares, self.cs)
        };
        let state = if failure.is_some() {
            "failed"
        } else if spares_left == 0 {
            "exhausted"
        } else {
            "ok"
        };
        let c = &self.counters;
        BbrStatus {
            state: state.into(),
            failure,
            relocations: self.tracker.completed_count(),
            relocated_now: c.relocated.load(Ordering::SeqCst),
            spare_failures: c.spare_failures.load(Ordering::SeqCst),
            unreadable_sectors: self.unreadable.sectors(),
            read_errors: c.read_errors.load(Ordering::SeqCst),
            write_errors: c.write_errors.load(Ordering::SeqCst),
            spares_left,
            spares,
            chunk_sectors: self.cs.sectors(),
        }
    }

    /// Where chunk `c` of the device lives now: `None` on the device, `Some(spare)`.
    pub fn relocation_of(&self, c: Chunk) -> Result<Option<Chunk>> {
        Ok(match self.locate(c)? {
            Place::Device(_) => None,
            Place::Spare(s) => Some(s),
        })
    }
}

enum Relocated {
    Done,
    Again,
}

/// Chunks of a store not allocated yet that can hold data: the free chunks minus the
/// metadata area slots among them (area `a` is chunk `1 + (epa + 1) * a`).
fn free_data_chunks(u: &Usage, cs: ChunkSize) -> u64 {
    let (lo, hi) = (
        u.allocated_sectors / cs.sectors(),
        u.total_sectors / cs.sectors(),
    );
    let stride = cs.bytes() / 16 + 1;
    let slots_below = |x: u64| if x <= 1 { 0 } else { (x - 2) / stride + 1 };
    hi.saturating_sub(lo)
        .saturating_sub(slots_below(hi).saturating_sub(slots_below(lo)))
}

/// Reads `buf.len()` bytes at `off` of `dev` piece by piece, 512 bytes at a time (4 KiB
/// at a time on a device that refuses 512-byte requests, a 4Kn disk under `O_DIRECT`);
/// a piece that fails with a media error is left as zeros. Returns the indices of the
/// 512-byte sectors left as zeros; any other error is returned as it is.
fn read_salvaging(dev: &dyn BlockDevice, off: u64, buf: &mut [u8]) -> Result<Vec<u64>> {
    'unit: for unit in [SECTOR_SIZE, 8 * SECTOR_SIZE] {
        let mut bad = Vec::new();
        for (i, piece) in buf.chunks_mut(mem_usize(unit)).enumerate() {
            let at = i as u64 * unit;
            match dev.read_at(piece, off + at) {
                Ok(()) => {}
                Err(e) if is_media_error(&e) => {
                    piece.fill(0);
                    let first = at / SECTOR_SIZE;
                    bad.extend(first..first + piece.len() as u64 / SECTOR_SIZE);
                }
                Err(e) if unit == SECTOR_SIZE && e.errno() == libc::EINVAL => continue 'unit,
                Err(e) => return Err(e),
            }
        }
        return Ok(bad);
    }
    Err(Error::InvalidArgument(format!(
        "{}: no read size works to find the unreadable sectors",
        dev.describe()
    )))
}

/// The sectors of `off..off+len` on `dev` that fail to read with a media error, as ranges
/// of sector indices relative to `off` (empty when they cannot be told apart).
fn probe(dev: &dyn BlockDevice, off: u64, len: u64) -> Vec<(u64, u64)> {
    let mut scratch = AlignedBuf::zeroed(mem_usize(len));
    let mut bad: Vec<(u64, u64)> = Vec::new();
    for i in read_salvaging(dev, off, &mut scratch).unwrap_or_default() {
        match bad.last_mut() {
            Some((_, e)) if *e == i => *e = i + 1,
            _ => bad.push((i, i + 1)),
        }
    }
    bad
}

impl BlockDevice for Bbr {
    fn size(&self) -> u64 {
        self.data.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)?;
        if self
            .all_on_device(offset, buf.len() as u64, false)?
            .is_some()
        {
            let first = offset / SECTOR_SIZE;
            match self.data.read_at(buf, offset) {
                Ok(()) => return self.check_listed(first, first + buf.len() as u64 / SECTOR_SIZE),
                Err(e) if is_media_error(&e) => {} // piece by piece, to list what failed
                Err(e) => return Err(e),
            }
        }
        for p in self.cs.split(offset, buf.len() as u64) {
            let at = offset + p.buf_offset;
            self.read_piece(&mut buf[p.buf_range()], &p, at)?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)?;
        let mut failed = None;
        if let Some(tracked) = self.all_on_device(offset, buf.len() as u64, true)? {
            match self.data.write_at(buf, offset, fua) {
                // Piece by piece: a one-chunk request's chunk is relocated without
                // another try; the pieces of a longer one are written again (the same
                // bytes at the same place) and relocated if they fail.
                Err(e) if is_media_error(&e) => {
                    drop(tracked);
                    failed = Some(e);
                }
                other => return other,
            }
        }
        // A request inside one chunk failed there; a longer one may have failed anywhere
        // (a file reports the request's offset, not the sector's): every piece is tried.
        let single = self.cs.chunk_range(offset, buf.len() as u64).count() == 1;
        let failing = failed
            .is_some()
            .then(|| self.cs.chunk_of_byte(offset))
            .filter(|_| single);
        for p in self.cs.split(offset, buf.len() as u64) {
            let at = offset + p.buf_offset;
            let known = failed.take_if(|_| failing == Some(p.chunk));
            self.write_piece(&buf[p.buf_range()], &p, at, fua, known)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.data.flush()?;
        self.spares.flush()
    }

    /// Passes the discard on to the device for the chunks that live there; a relocated
    /// chunk's spare is left as it is (a discard only says the data is no longer needed).
    /// Listed sectors stay listed: a discard writes nothing.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self.size(), offset, len)?;
        if let Some(_tracked) = self.all_on_device(offset, len, true)? {
            return self.data.discard(offset, len);
        }
        for p in self.cs.split(offset, len) {
            loop {
                match self.route(p.chunk)? {
                    Ok((Place::Device(c), _tracked)) => {
                        self.data
                            .discard(self.cs.byte_offset(c) + p.offset_in_chunk, p.len)?;
                    }
                    Ok((Place::Spare(_), _)) => {}
                    Err(pending) => {
                        let _ = pending.wait();
                        continue;
                    }
                }
                break;
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("bbr over {}", self.data.describe())
    }
}
