//! The exception index: completed exceptions in bounded memory, the rest in a sidecar.
//!
//! The COW's metadata lists exceptions in commit order with no index, so finding chunk
//! `old` needs an index of our own. This one is *derived* data: the store's log (the COW's
//! areas) is the truth, and the index only has to record durably "I hold entries
//! `0..covered`"; what lies after is replayed from the store at activation. So the index
//! never needs an fsync on the I/O path. Its parts (ARCHITECTURE.md, "The exception
//! index", gives the reasons and the measurements):
//!
//! * **members** ([`ChunkSet`]): which origin chunks are remapped, always in memory (at
//!   most one bit per origin chunk, two bytes per exception when sparse). An origin write
//!   asks only "is it remapped?", so it never touches the rest of the index;
//! * **recent**: exceptions the store made durable since the last checkpoint, in a hash
//!   map, with their order in `log`; bounded by the checkpoint threshold;
//! * **runs** ([`run`]): sorted, immutable files of `(old, new)` pairs in 4 KiB pages,
//!   read through the pool-wide [`PageCache`]; level 0 holds one run per checkpoint (each
//!   with a Bloom filter), level 1 one large run, rewritten when level 0 fills up;
//! * the **superblock** ([`superblock`]): the live runs, `covered`, and the store's
//!   fingerprint of its first `covered` entries, checked at activation.
//!
//! A checkpoint (on the background checkpoint thread, when `recent` passes its threshold,
//! and when the index is dropped) writes the log as a level-0 run, syncs it, replaces the
//! superblock, and only then moves the entries from `recent` to the runs, in one step under
//! the tables' lock, so a lookup finds every entry in one place or the other.
//!
//! Locks: the tracker's shard lock, then `members`; `tables` is taken alone and never
//! across I/O (a run lookup clones the run list and reads after releasing it).

pub mod bloom;
pub mod cache;
pub mod check;
pub mod chunkset;
pub mod dir;
mod load;
pub mod run;
pub mod superblock;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

pub use cache::{CacheStats, PageCache};
pub use chunkset::ChunkSet;
pub use dir::IndexDir;
pub use load::{load_store, Loader, NO_INDEX_YET};

use self::run::{Run, RunWriter};
use self::superblock::Superblock;
use super::table::{AlreadyMapped, Exception, ExceptionTable};
use crate::error::{Error, Result};
use crate::units::Chunk;

/// The store's fingerprint of its first `n` entries (see
/// [`ExceptionStore::fingerprinter`](super::ExceptionStore::fingerprinter)).
pub type Fingerprinter = Arc<dyn Fn(u64) -> Result<u64> + Send + Sync>;

/// When the index checkpoints and compacts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Entries in `recent` that start a checkpoint.
    pub flush_at: usize,
    /// Level-0 runs that start a compaction into level 1.
    pub level0_runs: usize,
    /// Entries sorted in memory at a time while rebuilding from a full scan.
    pub rebuild_batch: usize,
}

impl Tuning {
    /// The defaults: checkpoints of 32 Ki entries (about 2 MiB of `recent`), 16 of them
    /// before a compaction, rebuilds sorting 1 Mi entries (16 MiB) at a time.
    pub const DEFAULT: Tuning = Tuning {
        flush_at: 32 * 1024,
        level0_runs: 16,
        rebuild_batch: 1024 * 1024,
    };

    /// A tuning that makes every test checkpoint, compact and rebuild in several batches.
    pub const STRESS: Tuning = Tuning {
        flush_at: 8,
        level0_runs: 3,
        rebuild_batch: 16,
    };

    /// [`STRESS`](Self::STRESS) when `COWSNAP_INDEX_STRESS` is set in the environment,
    /// else [`DEFAULT`](Self::DEFAULT).
    pub fn from_env() -> Tuning {
        if std::env::var_os("COWSNAP_INDEX_STRESS").is_some() {
            Tuning::STRESS
        } else {
            Tuning::DEFAULT
        }
    }
}

/// Where and how a snapshot's index lives.
#[derive(Clone)]
pub struct IndexConfig {
    /// The sidecar directory; `None`: a private temporary one (not reused at the next
    /// activation; what a transient store and a snapshot outside a pool get).
    pub dir: Option<std::path::PathBuf>,
    /// Where a temporary directory is made: the system's temporary directory when `None`
    /// (a pool gives its `index/`, so a transient snapshot's runs do not land in a tmpfs).
    pub temporary_in: Option<std::path::PathBuf>,
    /// The page cache, shared by the snapshots of a pool.
    pub cache: Arc<PageCache>,
    /// Thresholds.
    pub tuning: Tuning,
    /// Who owns the index (the pool gives the COW file's device and inode); a superblock
    /// with another identity is not used.
    pub identity: u64,
    /// Called before every change to the sidecar (crash tests fail it); `None` in use.
    pub fault: Option<dir::FaultHook>,
}

impl std::fmt::Debug for IndexConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexConfig")
            .field("dir", &self.dir)
            .field("cache", &self.cache)
            .field("tuning", &self.tuning)
            .field("identity", &self.identity)
            .finish()
    }
}

/// The default budget of the page cache: 64 MiB.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

impl IndexConfig {
    /// A temporary index with the process's default cache (or a 4-page cache and the
    /// stress tuning under `COWSNAP_INDEX_STRESS`, so that tests evict on every lookup).
    pub fn temporary() -> IndexConfig {
        static CACHE: OnceLock<Arc<PageCache>> = OnceLock::new();
        let tuning = Tuning::from_env();
        let cache = CACHE
            .get_or_init(|| {
                PageCache::new(if tuning == Tuning::STRESS {
                    4 * cache::PAGE_BYTES as u64
                } else {
                    DEFAULT_CACHE_BYTES
                })
            })
            .clone();
        IndexConfig {
            dir: None,
            temporary_in: None,
            cache,
            tuning,
            identity: 0,
            fault: None,
        }
    }
}

/// How the index came to be, for status.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum IndexState {
    /// A new store: nothing to load.
    Fresh,
    /// The sidecar was valid; `replayed` entries after it were read from the store.
    Loaded {
        /// Entries replayed.
        replayed: u64,
    },
    /// Built from a full scan of the store.
    Rebuilt {
        /// Why the sidecar was not used.
        reason: String,
    },
    /// In memory only (no sidecar: tests of the exception layer).
    Memory,
}

/// What status reports of an index.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexStatus {
    /// Completed exceptions.
    pub exceptions: u64,
    /// How it was loaded.
    #[serde(flatten)]
    pub state: IndexState,
    /// Entries in runs (durable in the sidecar).
    pub covered: u64,
    /// Entries held in memory since the last checkpoint.
    pub recent: u64,
    /// Runs in level 0 and level 1.
    pub runs: usize,
    /// Bytes of memory held by this index outside the page cache.
    pub heap_bytes: u64,
    /// Checkpoints written since activation.
    pub checkpoints: u64,
    /// The last checkpoint's error, if it failed.
    pub checkpoint_error: Option<String>,
}

#[derive(Debug, Default)]
struct RunSet {
    level1: Option<Arc<Run>>,
    level0: Vec<Arc<Run>>,
}

impl RunSet {
    /// Every run, level 1 first.
    fn all(&self) -> Vec<&Run> {
        self.level1
            .iter()
            .chain(self.level0.iter())
            .map(|r| &**r)
            .collect()
    }

    fn heap_bytes(&self) -> usize {
        self.all().iter().map(|r| r.heap_bytes()).sum()
    }
}

#[derive(Debug, Default)]
struct Tables {
    /// Durable entries not yet in a run, by chunk.
    recent: HashMap<u64, u64, cache::IntHash>,
    /// The same entries, in log order: position `covered + i`.
    log: Vec<Exception>,
    covered: u64,
    max_new: Option<u64>,
    runs: Arc<RunSet>,
    /// The position the store's next durable entry must have; a gap stops checkpoints.
    broken: Option<String>,
}

#[derive(Debug)]
struct Checkpoints {
    next_seq: u64,
    count: u64,
    error: Option<String>,
}

struct IndexInner {
    config: IndexConfig,
    dir: Option<IndexDir>,
    /// Fed by the store's commits (`durable`), checkpointed to runs; else (a bare tracker)
    /// fed by `complete` and never checkpointed.
    fed_by_store: bool,
    fingerprint: Option<Fingerprinter>,
    members: RwLock<ChunkSet>,
    tables: RwLock<Tables>,
    checkpoint: Mutex<Checkpoints>,
    requested: AtomicBool,
    /// Set when the load finished: only a loaded index checkpoints.
    loaded: AtomicBool,
    state: Mutex<IndexState>,
}

impl std::fmt::Debug for IndexInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExceptionIndex")
            .field("dir", &self.dir)
            .field("members", &self.members.read().len())
            .finish()
    }
}

/// The completed exceptions of one exception space; see the module documentation.
#[derive(Clone, Debug)]
pub struct ExceptionIndex {
    inner: Arc<IndexInner>,
}

impl ExceptionIndex {
    /// An index in memory only, filled by [`complete`](Self::complete) (the exception layer's
    /// own tests, and tools that build a table). Never checkpointed.
    pub fn in_memory() -> ExceptionIndex {
        ExceptionIndex::from_parts(IndexConfig::temporary(), None, false, None)
    }

    fn from_parts(
        config: IndexConfig,
        dir: Option<IndexDir>,
        fed_by_store: bool,
        fingerprint: Option<Fingerprinter>,
    ) -> ExceptionIndex {
        ExceptionIndex {
            inner: Arc::new(IndexInner {
                config,
                dir,
                fed_by_store,
                fingerprint,
                members: RwLock::new(ChunkSet::new()),
                tables: RwLock::new(Tables::default()),
                checkpoint: Mutex::new(Checkpoints {
                    next_seq: 1,
                    count: 0,
                    error: None,
                }),
                requested: AtomicBool::new(false),
                loaded: AtomicBool::new(false),
                state: Mutex::new(IndexState::Memory),
            }),
        }
    }

    /// True when `old` has a completed exception. Memory only.
    pub fn contains(&self, old: Chunk) -> bool {
        self.inner.members.read().contains(old.0)
    }

    /// Where `old` is remapped to: memory, or one page of a run (through the cache).
    pub fn lookup(&self, old: Chunk) -> Result<Option<Chunk>> {
        if !self.contains(old) {
            return Ok(None);
        }
        self.lookup_member(old).map(Some)
    }

    /// Where a chunk [`contains`](Self::contains) said is remapped lives: memory, or one
    /// page of a run (through the cache).
    pub fn lookup_member(&self, old: Chunk) -> Result<Chunk> {
        let runs = {
            let t = self.inner.tables.read();
            if let Some(&new) = t.recent.get(&old.0) {
                return Ok(Chunk(new));
            }
            t.runs.clone()
        };
        let cache = &self.inner.config.cache;
        for r in runs.level0.iter().rev().chain(runs.level1.iter()) {
            if let Some(new) = r.lookup(old, cache)? {
                return Ok(new);
            }
        }
        Err(Error::Invalid(format!(
            "chunk {old} is remapped but the exception index has no entry for it"
        )))
    }

    /// Makes a committed exception visible (the tracker calls it under its shard lock).
    /// An index fed by its store already holds the entry; a bare one stores it now.
    pub fn complete(&self, e: Exception) -> std::result::Result<(), AlreadyMapped> {
        let mut members = self.inner.members.write();
        if !members.insert(e.old.0) {
            drop(members);
            let existing = self.lookup_member(e.old).unwrap_or(Chunk(u64::MAX));
            return Err(AlreadyMapped {
                old: e.old,
                existing,
            });
        }
        if !self.inner.fed_by_store {
            self.inner.tables.write().recent.insert(e.old.0, e.new.0);
        }
        Ok(())
    }

    /// The store made `batch` durable at positions `first..`; see
    /// [`ExceptionStore::attach`](super::ExceptionStore::attach).
    pub fn durable(&self, first: u64, batch: &[Exception]) {
        let mut t = self.inner.tables.write();
        let expected = t.covered + t.log.len() as u64;
        if first != expected && t.broken.is_none() {
            t.broken = Some(format!(
                "the store reported entry {first} where {expected} was expected; checkpoints stop until the next activation"
            ));
        }
        for e in batch {
            t.recent.insert(e.old.0, e.new.0);
            t.log.push(*e);
        }
        let due = t.log.len() >= self.inner.config.tuning.flush_at && t.broken.is_none();
        drop(t);
        if due && self.inner.dir.is_some() && !self.inner.requested.swap(true, Ordering::SeqCst) {
            checkpointer::request(Arc::downgrade(&self.inner));
        }
    }

    /// A merge moved `old` back to the origin: it is no longer remapped. Its entry stays
    /// in the runs, unreachable (lookups ask the members first); the sidecar was given up
    /// when the merge began ([`forget_sidecar`](Self::forget_sidecar)).
    pub fn remove(&self, old: Chunk) -> bool {
        self.inner.members.write().remove(old.0)
    }

    /// The store's table is about to shrink (a merge removes entries from its tail), which
    /// no superblock can describe: stop checkpointing and delete the superblock, so the
    /// next activation rebuilds the index from the shorter table. Done before the first
    /// entry is removed.
    pub fn forget_sidecar(&self) -> Result<()> {
        self.inner.tables.write().broken =
            Some("merging: the table shrinks, the index is rebuilt at the next activation".into());
        let _ck = self.inner.checkpoint.lock();
        match &self.inner.dir {
            Some(dir) if !dir.is_temporary() => {
                dir.remove(superblock::NAME)?;
                dir.sync()
            }
            _ => Ok(()),
        }
    }

    /// Completed exceptions.
    pub fn len(&self) -> u64 {
        self.inner.members.read().len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every exception, in order of `old` (reads every run: tools and tests only).
    pub fn to_table(&self) -> Result<ExceptionTable> {
        let (runs, recent) = {
            let t = self.inner.tables.read();
            (t.runs.clone(), t.recent.clone())
        };
        let members = self.inner.members.read().clone();
        let mut table = ExceptionTable::new();
        let mut add = |e: Exception| -> Result<()> {
            // Entries durable but not yet completed are not exceptions yet.
            if members.contains(e.old.0) && !recent.contains_key(&e.old.0) {
                table
                    .insert(e)
                    .map_err(|err| Error::Invalid(format!("exception index: {err}")))?;
            }
            Ok(())
        };
        let all = runs.all();
        run::merge(&all, &mut add)?;
        for (&old, &new) in &recent {
            if members.contains(old) {
                table
                    .insert(Exception::new(old, new))
                    .map_err(|err| Error::Invalid(format!("exception index: {err}")))?;
            }
        }
        Ok(table)
    }

    /// Its state for status.
    pub fn status(&self) -> IndexStatus {
        let ck = self.inner.checkpoint.lock();
        let (checkpoints, checkpoint_error) = (ck.count, ck.error.clone());
        drop(ck);
        let t = self.inner.tables.read();
        let members = self.inner.members.read();
        let recent_bytes = t.recent.capacity() * 24 + t.log.capacity() * 16;
        IndexStatus {
            exceptions: members.len(),
            state: self.inner.state.lock().clone(),
            covered: t.covered,
            recent: t.log.len() as u64,
            runs: t.runs.level0.len() + usize::from(t.runs.level1.is_some()),
            heap_bytes: (members.heap_bytes() + recent_bytes + t.runs.heap_bytes()) as u64,
            checkpoints,
            checkpoint_error: checkpoint_error.or_else(|| t.broken.clone()),
        }
    }

    /// The page cache it reads through.
    pub fn cache(&self) -> &Arc<PageCache> {
        &self.inner.config.cache
    }

    /// Writes everything in `recent` to a run now and waits for it (deactivation, tests).
    pub fn checkpoint(&self) -> Result<()> {
        self.inner.checkpoint(true)
    }
}

impl IndexInner {
    fn dir(&self) -> Result<&IndexDir> {
        self.dir
            .as_ref()
            .ok_or_else(|| Error::Invalid("the exception index has no directory".into()))
    }

    /// Flushes `recent` to a level-0 run when due (always when `force`), then compacts
    /// level 0 into level 1 when it is full.
    fn checkpoint(&self, force: bool) -> Result<()> {
        if self.dir.is_none() || !self.fed_by_store {
            return Ok(());
        }
        let mut ck = self.checkpoint.lock();
        self.requested.store(false, Ordering::SeqCst);
        let result = self
            .flush(&mut ck, force)
            .and_then(|()| self.compact(&mut ck));
        match &result {
            Ok(()) => ck.error = None,
            Err(e) => ck.error = Some(e.to_string()),
        }
        result
    }

    fn flush(&self, ck: &mut Checkpoints, force: bool) -> Result<()> {
        let (mut batch, covered, max_new, runs) = {
            let t = self.tables.read();
            if let Some(why) = &t.broken {
                return Err(Error::Invalid(why.clone()));
            }
            let due = t.log.len() >= self.config.tuning.flush_at;
            if t.log.is_empty() || !(due || force) {
                return Ok(());
            }
            (t.log.clone(), t.covered, t.max_new, t.runs.clone())
        };
        let n = batch.len() as u64;
        let new_max = batch.iter().map(|e| e.new.0).chain(max_new).max();
        batch.sort_unstable_by_key(|e| e.old.0);
        let seq = ck.next_seq;
        ck.next_seq += 1;
        let mut w = RunWriter::create(self.dir()?, seq, Some(batch.len()))?;
        for e in &batch {
            w.push(*e)?;
        }
        let run = Arc::new(w.finish()?);
        let mut level0 = runs.level0.clone();
        level0.push(run);
        let set = RunSet {
            level1: runs.level1.clone(),
            level0,
        };
        self.write_super(ck.next_seq, covered + n, new_max, &set)?;
        let mut t = self.tables.write();
        let t = &mut *t;
        for e in t.log.drain(..batch.len()) {
            t.recent.remove(&e.old.0);
        }
        t.covered += n;
        t.max_new = new_max;
        t.runs = Arc::new(set);
        ck.count += 1;
        Ok(())
    }

    fn compact(&self, ck: &mut Checkpoints) -> Result<()> {
        let (runs, covered, max_new) = {
            let t = self.tables.read();
            (t.runs.clone(), t.covered, t.max_new)
        };
        if runs.level0.len() < self.config.tuning.level0_runs {
            return Ok(());
        }
        let dir = self.dir()?;
        let seq = ck.next_seq;
        ck.next_seq += 1;
        let mut w = RunWriter::create(dir, seq, None)?;
        let mut keys = ChunkSet::new();
        let all = runs.all();
        run::merge(&all, &mut |e| {
            keys.insert(e.old.0);
            w.push(e)
        })?;
        let level1 = Arc::new(w.finish()?);
        write_members(dir, seq, &keys)?;
        drop(keys);
        let set = RunSet {
            level1: Some(level1),
            level0: Vec::new(),
        };
        self.write_super(ck.next_seq, covered, max_new, &set)?;
        self.tables.write().runs = Arc::new(set);
        for r in runs.level1.iter().chain(runs.level0.iter()) {
            dir.remove(&run::file_name(r.seq()))?;
        }
        if let Some(l1) = &runs.level1 {
            dir.remove(&members_name(l1.seq()))?;
        }
        Ok(())
    }

    /// Writes and installs the superblock naming `set` as holding the first `covered`
    /// entries (nothing for a temporary directory, which is never reused).
    fn write_super(
        &self,
        next_seq: u64,
        covered: u64,
        max_new: Option<u64>,
        set: &RunSet,
    ) -> Result<()> {
        let dir = self.dir()?;
        if dir.is_temporary() {
            // Never reused: its runs only bound memory.
            return Ok(());
        }
        let fingerprint = self.fingerprint.as_ref().map_or(Ok(0), |f| f(covered))?;
        let sb = Superblock {
            identity: self.config.identity,
            covered,
            fingerprint,
            max_new,
            next_seq,
            level1: set.level1.as_ref().map(|r| r.seq()),
            level0: set.level0.iter().map(|r| r.seq()).collect(),
        };
        // Write, sync, rename, sync the directory: the old superblock or the new one.
        let f = dir.create(superblock::NEW_NAME)?;
        f.write_at(&sb.encode(), 0)?;
        f.sync()?;
        drop(f);
        dir.rename(superblock::NEW_NAME, superblock::NAME)?;
        dir.sync()
    }
}

fn members_name(seq: u64) -> String {
    format!("members-{seq:016x}")
}

/// Writes the members file of level-1 run `seq`: the encoded set and its CRC32.
fn write_members(dir: &IndexDir, seq: u64, keys: &ChunkSet) -> Result<()> {
    let mut b = keys.encode();
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    let f = dir.create(&members_name(seq))?;
    f.write_at(&b, 0)?;
    f.sync()
}

/// Decodes a members file written by [`write_members`].
fn decode_members(b: &[u8]) -> std::result::Result<ChunkSet, String> {
    let Some(body_len) = b.len().checked_sub(4) else {
        return Err("too short".into());
    };
    let (body, crc) = b.split_at(body_len);
    let mut c = [0u8; 4];
    c.copy_from_slice(crc);
    if crc32fast::hash(body) != u32::from_le_bytes(c) {
        return Err("the checksum does not match".into());
    }
    ChunkSet::decode(body)
}

impl Drop for IndexInner {
    fn drop(&mut self) {
        // A clean deactivation leaves nothing to replay. A failure only costs a replay. An
        // index whose load failed writes nothing.
        if self.loaded.load(Ordering::SeqCst)
            && !self.dir.as_ref().is_some_and(IndexDir::is_temporary)
        {
            let _ = self.checkpoint(true);
        }
    }
}

/// The background thread that runs checkpoints, one at a time, for every index of the
/// process: off the I/O path, and one thread whatever the number of snapshots.
mod checkpointer {
    use std::sync::mpsc::{channel, Sender};
    use std::sync::{Mutex, OnceLock, Weak};

    use super::IndexInner;

    static QUEUE: OnceLock<Mutex<Sender<Weak<IndexInner>>>> = OnceLock::new();

    pub(super) fn request(index: Weak<IndexInner>) {
        let queue = QUEUE.get_or_init(|| {
            let (tx, rx) = channel::<Weak<IndexInner>>();
            // Without the thread (it could not start), checkpoints happen only at stop.
            let _ = std::thread::Builder::new()
                .name("cowsnap-checkpoint".into())
                .spawn(move || {
                    for w in rx {
                        if let Some(inner) = w.upgrade() {
                            // The error is kept for status; the entries stay in memory.
                            let _ = inner.checkpoint(false);
                        }
                    }
                });
            Mutex::new(tx)
        });
        if let Ok(tx) = queue.lock() {
            let _ = tx.send(index);
        }
    }
}
