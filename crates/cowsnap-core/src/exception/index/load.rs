//! Activation: use the sidecar when it can be trusted, else rebuild it from a full scan.
//!
//! [`Loader::open`] reads the superblock and checks it against the store: the identity the
//! caller gives, and the store's fingerprint of the covered entries (the header and the
//! bytes of the covered entries in the area holding the last one). A superblock that
//! passes, with all its runs and members readable, makes activation O(1): the store then
//! replays only the entries after `covered` ([`Resume`]). Anything else (no sidecar, a
//! damaged file, a COW changed by the kernel or another tool) empties the directory and
//! the store's full scan feeds a rebuild, which sorts `rebuild_batch` entries at a time
//! into runs and merges them (an external sort, so a rebuild stays within its memory
//! too). Either way the reason is kept for status.
//!
//! A replayed entry whose `new` chunk is not above every covered one could duplicate a
//! covered entry's `new` without the index being able to tell (it is keyed by `old`); the
//! loader then refuses the resume ([`Loader::refused`]) and the caller rebuilds.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::run::{self, Run, RunWriter};
use super::superblock::{self, Superblock};
use super::{
    decode_members, members_name, write_members, ChunkSet, ExceptionIndex, Fingerprinter,
    IndexConfig, IndexDir, IndexState, RunSet, Tables,
};
use crate::error::{Error, Result};
use crate::exception::store::{ExceptionStore, LoadOutcome, Resume, StoreKind};
use crate::exception::Exception;

/// The reason [`IndexState::Rebuilt`] gives when there was no sidecar (a first activation).
pub const NO_INDEX_YET: &str = "there is no index yet";

/// Largest superblock read (it names at most a few thousand runs).
const SUPER_LIMIT: u64 = 1 << 20;
/// Largest members file read: a set of 2^40 chunks at one bit each.
const MEMBERS_LIMIT: u64 = 1 << 37;

enum Mode {
    /// Nothing to load (a transient store).
    Fresh,
    /// Replaying the entries after a valid sidecar.
    Replay { replayed: u64 },
    /// Building from a full scan.
    Rebuild {
        reason: String,
        batch: Vec<Exception>,
        runs: Vec<Run>,
        next_seq: u64,
        /// The previous batch, being sorted and written on a second thread while the scan
        /// goes on (so at most two batches are held).
        sorting: Option<std::thread::JoinHandle<Result<Run>>>,
    },
}

/// Feeds an index from a store's load; see the module documentation.
pub struct Loader {
    index: ExceptionIndex,
    resume: Resume,
    mode: Mode,
    count: u64,
    max_new: Option<u64>,
    refused: Option<String>,
    /// The COW, as errors about its entries name it.
    device: String,
}

impl Loader {
    /// Opens the index for a store whose COW is `device`. `durable` says whether the store
    /// keeps its exceptions (a transient store's index starts empty and is never reused).
    /// Returns the loader; pass [`resume`](Self::resume) to the store's load and every
    /// entry to [`push`](Self::push).
    pub fn open(
        config: IndexConfig,
        durable: bool,
        fingerprint: Option<Fingerprinter>,
        device: String,
    ) -> Result<Loader> {
        let mut dir = match &config.dir {
            Some(p) => IndexDir::open(p)?,
            None => IndexDir::temporary(config.temporary_in.as_deref())?,
        };
        if let Some(hook) = &config.fault {
            dir = dir.with_hook(hook.clone());
        }
        let index = ExceptionIndex::from_parts(config, Some(dir), true, fingerprint);
        if !durable {
            return Ok(Loader::new(index, Resume::default(), Mode::Fresh, device));
        }
        match open_sidecar(&index) {
            Ok((sb, runs, members)) => {
                {
                    let mut t = index.inner.tables.write();
                    t.covered = sb.covered;
                    t.max_new = sb.max_new;
                    t.runs = Arc::new(runs);
                }
                *index.inner.members.write() = members;
                index.inner.checkpoint.lock().next_seq = sb.next_seq;
                let resume = Resume {
                    entries: sb.covered,
                    max_new: sb.max_new,
                    ..Resume::default()
                };
                Ok(Loader::new(
                    index,
                    resume,
                    Mode::Replay { replayed: 0 },
                    device,
                ))
            }
            Err(reason) => Loader::rebuild(index, reason, device),
        }
    }

    fn new(index: ExceptionIndex, mut resume: Resume, mode: Mode, device: String) -> Loader {
        // Repeated `old` chunks are found here: by the members in a replay, by the sort
        // in a rebuild.
        resume.olds_checked = true;
        Loader {
            index,
            count: resume.entries,
            max_new: resume.max_new,
            resume,
            mode,
            refused: None,
            device,
        }
    }

    fn rebuild(index: ExceptionIndex, reason: String, device: String) -> Result<Loader> {
        let dir = index.inner.dir()?.clone();
        for name in dir.list()? {
            dir.remove(&name)?;
        }
        *index.inner.members.write() = ChunkSet::new();
        *index.inner.tables.write() = Tables::default();
        let batch = Vec::with_capacity(index.inner.config.tuning.rebuild_batch.min(1 << 16));
        Ok(Loader::new(
            index,
            Resume::default(),
            Mode::Rebuild {
                reason,
                batch,
                runs: Vec::new(),
                next_seq: 1,
                sorting: None,
            },
            device,
        ))
    }

    /// Gives up a refused resume: a loader that rebuilds from a full scan.
    pub fn restart(self) -> Result<Loader> {
        let reason = self
            .refused
            .unwrap_or_else(|| "the replay was abandoned".into());
        Loader::rebuild(self.index, reason, self.device)
    }

    /// Where the store's load starts.
    pub fn resume(&self) -> Resume {
        self.resume
    }

    /// Why a replayed entry could not be trusted (the caller then [`restart`](Self::restart)s).
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Takes the store's entry at position `pos`. A duplicate `old` is an error (the
    /// store's own checks cannot see the covered entries).
    pub fn push(&mut self, pos: u64, e: Exception) -> Result<()> {
        if pos != self.count {
            return Err(Error::Invalid(format!(
                "the store passed entry {pos} where {} was expected",
                self.count
            )));
        }
        if let Mode::Replay { .. } = self.mode {
            if self.resume.max_new.is_some_and(|m| e.new.0 <= m) {
                self.refused = Some(format!(
                    "entry {pos} after the index's checkpoint maps to COW chunk {}, not above the checkpoint's highest ({})",
                    e.new,
                    self.resume.max_new.unwrap_or(0)
                ));
                return Err(Error::Invalid("resume refused".into()));
            }
        }
        if matches!(self.mode, Mode::Replay { .. })
            && !self.index.inner.members.write().insert(e.old.0)
        {
            return Err(repeated(&self.device, e.old.0));
        }
        self.count += 1;
        self.max_new = self.max_new.max(Some(e.new.0));
        let flush_at = self.index.inner.config.tuning.rebuild_batch;
        match &mut self.mode {
            Mode::Fresh => Err(Error::Invalid("a fresh store passed an entry".into())),
            Mode::Replay { replayed } => {
                *replayed += 1;
                let mut t = self.index.inner.tables.write();
                t.recent.insert(e.old.0, e.new.0);
                t.log.push(e);
                let due = t.log.len() >= self.index.inner.config.tuning.flush_at;
                drop(t);
                if due {
                    // A long tail is checkpointed as it is read, so memory stays bounded;
                    // a failure leaves the entries in memory (and in status).
                    let _ = self.index.inner.checkpoint(false);
                }
                Ok(())
            }
            Mode::Rebuild {
                batch,
                runs,
                next_seq,
                sorting,
                ..
            } => {
                batch.push(e);
                if batch.len() >= flush_at {
                    let mut full = std::mem::replace(batch, Vec::with_capacity(flush_at));
                    if let Some(h) = sorting.take() {
                        runs.push(joined(h)?);
                    }
                    let dir = self.index.inner.dir()?.clone();
                    let device = self.device.clone();
                    let seq = *next_seq;
                    *next_seq += 1;
                    *sorting = Some(std::thread::spawn(move || {
                        write_sorted(&dir, seq, &mut full, None, &device)
                    }));
                }
                Ok(())
            }
        }
    }

    /// Ends the load: a rebuild writes its level-1 run, members and superblock. Returns
    /// the index.
    pub fn finish(self) -> Result<ExceptionIndex> {
        let index = self.index;
        let state = match self.mode {
            Mode::Fresh => IndexState::Fresh,
            Mode::Replay { replayed } => IndexState::Loaded { replayed },
            Mode::Rebuild {
                reason,
                mut batch,
                mut runs,
                next_seq,
                sorting,
            } => {
                if let Some(h) = sorting {
                    runs.push(joined(h)?);
                }
                let dir = index.inner.dir()?.clone();
                let mut seq = next_seq;
                let mut members = ChunkSet::new();
                let level1 = if runs.is_empty() && batch.is_empty() {
                    None
                } else if runs.is_empty() {
                    seq += 1;
                    Some(write_sorted(
                        &dir,
                        seq - 1,
                        &mut batch,
                        Some(&mut members),
                        &self.device,
                    )?)
                } else {
                    if !batch.is_empty() {
                        runs.push(write_sorted(&dir, seq, &mut batch, None, &self.device)?);
                        seq += 1;
                    }
                    drop(batch);
                    if runs.len() == 1 {
                        let only = runs.remove(0);
                        if let Some(old) = add_keys(&mut members, &only)? {
                            return Err(repeated(&self.device, old));
                        }
                        Some(only)
                    } else {
                        let mut w = RunWriter::create(&dir, seq, None)?;
                        seq += 1;
                        let mut keys = Vec::with_capacity(KEY_BATCH);
                        let all: Vec<&Run> = runs.iter().collect();
                        let device = &self.device;
                        let mut last = None;
                        run::merge(&all, &mut |e| {
                            // Two batches holding one chunk meet here, in a row.
                            if last.replace(e.old.0) == Some(e.old.0) {
                                return Err(repeated(device, e.old.0));
                            }
                            keys.push(e.old.0);
                            if keys.len() == KEY_BATCH {
                                members
                                    .insert_sorted(&keys)
                                    .map_err(|old| repeated(device, old))?;
                                keys.clear();
                            }
                            w.push(e)
                        })?;
                        members
                            .insert_sorted(&keys)
                            .map_err(|old| repeated(device, old))?;
                        let l1 = w.finish()?;
                        for r in &runs {
                            dir.remove(&run::file_name(r.seq()))?;
                        }
                        Some(l1)
                    }
                };
                if let Some(l1) = &level1 {
                    write_members(&dir, l1.seq(), &members)?;
                }
                *index.inner.members.write() = members;
                let set = RunSet {
                    level1: level1.map(Arc::new),
                    level0: Vec::new(),
                };
                // Best effort: without a superblock the next activation rebuilds again.
                if let Err(e) = index.inner.write_super(seq, self.count, self.max_new, &set) {
                    index.inner.checkpoint.lock().error = Some(e.to_string());
                }
                let mut t = index.inner.tables.write();
                t.covered = self.count;
                t.max_new = self.max_new;
                t.runs = Arc::new(set);
                drop(t);
                index.inner.checkpoint.lock().next_seq = seq;
                IndexState::Rebuilt { reason }
            }
        };
        *index.inner.state.lock() = state;
        index.inner.loaded.store(true, Ordering::SeqCst);
        Ok(index)
    }
}

/// Keys handed to [`ChunkSet::insert_sorted`] at a time while merging.
const KEY_BATCH: usize = 64 * 1024;

/// Sorts `batch` and writes it as run `seq`, adding its keys to `members` when given. Two
/// entries of one `old` chunk are the corruption of the COW `device`.
fn write_sorted(
    dir: &IndexDir,
    seq: u64,
    batch: &mut Vec<Exception>,
    members: Option<&mut ChunkSet>,
    device: &str,
) -> Result<Run> {
    batch.sort_unstable_by_key(|e| e.old.0);
    if let Some(w) = batch.windows(2).find(|w| w[0].old == w[1].old) {
        return Err(repeated(device, w[0].old.0));
    }
    if let Some(m) = members {
        let keys: Vec<u64> = batch.iter().map(|e| e.old.0).collect();
        m.insert_sorted(&keys)
            .map_err(|old| repeated(device, old))?;
    }
    let mut w = RunWriter::create(dir, seq, None)?;
    for e in batch.drain(..) {
        w.push(e)?;
    }
    w.finish()
}

/// The run a sorting thread wrote.
fn joined(h: std::thread::JoinHandle<Result<Run>>) -> Result<Run> {
    h.join()
        .map_err(|_| Error::Invalid("the rebuild's sorting thread panicked".into()))?
}

/// Adds every key of `run` to `members`; `Some(chunk)`: the first already there.
fn add_keys(members: &mut ChunkSet, run: &Run) -> Result<Option<u64>> {
    let mut scan = run.scan();
    let mut keys = Vec::with_capacity(KEY_BATCH);
    while let Some(e) = scan.next_exception()? {
        keys.push(e.old.0);
        if keys.len() == KEY_BATCH {
            if let Err(old) = members.insert_sorted(&keys) {
                return Ok(Some(old));
            }
            keys.clear();
        }
    }
    Ok(members.insert_sorted(&keys).err())
}

/// The COW `device`'s corruption: two entries remap origin chunk `old`.
fn repeated(device: &str, old: u64) -> Error {
    Error::Corrupt {
        device: device.to_string(),
        offset: 0,
        reason: format!("two entries remap origin chunk {old}"),
    }
}

/// The sidecar's superblock, runs and members, or why they cannot be used.
fn open_sidecar(
    index: &ExceptionIndex,
) -> std::result::Result<(Superblock, RunSet, ChunkSet), String> {
    let inner = &index.inner;
    let dir = inner.dir().map_err(|e| e.to_string())?;
    if dir.is_temporary() {
        return Err("the index is temporary".into());
    }
    let where_ = dir.path().join(superblock::NAME).display().to_string();
    let bytes = dir
        .read(superblock::NAME, SUPER_LIMIT)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| NO_INDEX_YET.to_string())?;
    let sb = Superblock::decode(&bytes, &where_).map_err(|e| e.to_string())?;
    if sb.identity != inner.config.identity {
        return Err("the index belongs to another COW (its identity differs)".into());
    }
    if let Some(f) = &inner.fingerprint {
        let now = f(sb.covered).map_err(|e| {
            format!(
                "the COW no longer holds the {} entries the index covers: {e}",
                sb.covered
            )
        })?;
        if now != sb.fingerprint {
            return Err(format!(
                "the COW changed since the index was written (its first {} entries differ)",
                sb.covered
            ));
        }
    }
    let open = |seq: u64| Run::open(dir, seq).map(Arc::new).map_err(|e| e.to_string());
    let level1 = sb.level1.map(open).transpose()?;
    let level0 = sb
        .level0
        .iter()
        .map(|&s| open(s))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut members = match &level1 {
        Some(l1) => {
            let name = members_name(l1.seq());
            let b = dir
                .read(&name, MEMBERS_LIMIT)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("the members file {name} is missing"))?;
            decode_members(&b).map_err(|e| format!("{name}: {e}"))?
        }
        None => ChunkSet::new(),
    };
    let in_runs: u64 = level1
        .iter()
        .chain(level0.iter())
        .map(|r| r.entries())
        .sum();
    if members.len() != level1.as_ref().map_or(0, |r| r.entries()) {
        return Err("the members file does not match the level-1 run".into());
    }
    for r in &level0 {
        if let Some(old) = add_keys(&mut members, r).map_err(|e| e.to_string())? {
            return Err(format!("chunk {old} is indexed twice"));
        }
    }
    if in_runs != sb.covered {
        return Err(format!(
            "the runs hold {in_runs} entries, the superblock says {}",
            sb.covered
        ));
    }
    let named: Vec<String> = sb
        .runs()
        .map(run::file_name)
        .chain(sb.level1.map(members_name))
        .chain([superblock::NAME.to_string()])
        .collect();
    for name in dir.list().map_err(|e| e.to_string())? {
        if !named.contains(&name) {
            // Left by a checkpoint a crash interrupted: never named by a superblock.
            dir.remove(&name).map_err(|e| e.to_string())?;
        }
    }
    Ok((sb, RunSet { level1, level0 }, members))
}

/// Loads `store` into an index opened as `config` says, checking each entry with `check`
/// (bounds a snapshot or a relocation target knows; the first error refuses the store):
/// from the sidecar's end when it is valid, else (or when the loader refuses the resume)
/// from the start into a rebuild. Then attaches the store to the index. What every user
/// of the exception layer does at activation.
pub fn load_store(
    config: IndexConfig,
    store: &dyn ExceptionStore,
    check: &dyn Fn(Exception) -> Result<()>,
) -> Result<(ExceptionIndex, LoadOutcome)> {
    let durable = store.kind() != StoreKind::Transient;
    let device = store.cow().describe();
    let mut loader = Loader::open(config, durable, store.fingerprinter(), device)?;
    let load = |loader: &mut Loader| {
        store.load(loader.resume(), &mut |pos, e| {
            check(e)?;
            loader.push(pos, e)
        })
    };
    let outcome = match load(&mut loader) {
        Err(_) if loader.refused().is_some() => {
            loader = loader.restart()?;
            load(&mut loader)?
        }
        other => other?,
    };
    let index = loader.finish()?;
    store.attach(index.clone());
    Ok((index, outcome))
}
