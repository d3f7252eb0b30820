//! The exception store interface: where completed exceptions are kept, and the commit rule.
//!
//! A store hands out free chunks on its COW device ([`prepare`](ExceptionStore::prepare)),
//! makes exceptions durable ([`commit`](ExceptionStore::commit)), and can be marked invalid.
//! The core never writes store metadata itself; it writes *data* chunks to the COW device
//! and then asks the store to commit. Stores are shared between request threads, so their
//! methods take `&self` and lock inside; a persistent store groups concurrent commits into
//! one metadata write.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use super::index::{ExceptionIndex, Fingerprinter};
use super::table::Exception;
use crate::dev::BlockDevice;
use crate::error::{Error, Result};
use crate::units::{Chunk, ChunkSize};

/// The store types of the kernel's snapshot table: `N`, `P` and `PO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreKind {
    /// `N`: exceptions only in memory; lost when the snapshot is deactivated.
    Transient,
    /// `P` (`overflow == false`) or `PO`: exceptions in the kernel's on-disk format.
    Persistent {
        /// `PO`: a snapshot write that finds the COW full fails with EIO and marks the
        /// snapshot *overflowed* (reads keep working) instead of invalidating it.
        overflow: bool,
    },
}

impl StoreKind {
    /// True for the persistent stores, which can merge (the kernel's transient store has
    /// no `prepare_merge`).
    pub fn can_merge(self) -> bool {
        matches!(self, StoreKind::Persistent { .. })
    }

    /// True for `PO`.
    pub fn overflow_allowed(self) -> bool {
        matches!(self, StoreKind::Persistent { overflow: true })
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreKind::Transient => "N",
            StoreKind::Persistent { overflow: false } => "P",
            StoreKind::Persistent { overflow: true } => "PO",
        })
    }
}

impl FromStr for StoreKind {
    type Err = Error;
    /// Parses `N`, `P` or `PO` (any case), as the kernel's table does.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "N" => Ok(StoreKind::Transient),
            "P" => Ok(StoreKind::Persistent { overflow: false }),
            "PO" => Ok(StoreKind::Persistent { overflow: true }),
            _ => Err(Error::InvalidArgument(format!(
                "store type {s:?} is not N, P or PO"
            ))),
        }
    }
}

/// Space use of a store, in sectors, with the kernel's meanings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Sectors in use on the COW device, header and metadata included.
    pub allocated_sectors: u64,
    /// Size of the COW device in sectors.
    pub total_sectors: u64,
    /// Sectors used by the header and metadata.
    pub metadata_sectors: u64,
}

/// What loading a store found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    /// No metadata: a new store was formatted (or a transient store started empty).
    Fresh,
    /// Valid metadata; its exceptions were passed to the sink.
    Valid,
    /// The header marks the snapshot invalid; no exceptions were loaded.
    Invalid,
}

/// Where a load starts: the first `entries` of the store's log are already indexed (a
/// valid sidecar covers them), so the store reads only what follows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resume {
    /// Entries to skip.
    pub entries: u64,
    /// The largest `new` chunk among them (the store allocates above it).
    pub max_new: Option<u64>,
    /// The caller finds entries that repeat an `old` chunk itself (the index does, across
    /// the covered entries too), so the store need not keep a set of them.
    pub olds_checked: bool,
}

/// Where exceptions are kept.
///
/// **Commit contract.** The caller writes an exception's data chunk to the COW device,
/// and only then calls [`commit`](Self::commit). When `commit` returns `Ok`, the data and
/// the metadata of every exception in the batch are durable, and so are those of every
/// exception prepared before them: commits happen in allocation order, so a crash never
/// leaves a committed exception after an uncommitted one (no leaked chunks). A prepared
/// exception that will never be committed (its copy failed) must be given to
/// [`abort`](Self::abort), or later commits could wait for it forever.
pub trait ExceptionStore: Send + Sync + fmt::Debug {
    /// The store type.
    fn kind(&self) -> StoreKind;

    /// The chunk size (for persistent stores, the one in the header).
    fn chunk_size(&self) -> ChunkSize;

    /// The COW device holding data and metadata.
    fn cow(&self) -> &Arc<dyn BlockDevice>;

    /// Reads the metadata and passes every committed exception from position
    /// `from.entries` on to `sink` with its position, in commit order. Formats a fresh
    /// store. Called before the snapshot is activated; a load that failed may be repeated
    /// (from position 0 when the index refused to resume).
    fn load(
        &self,
        from: Resume,
        sink: &mut dyn FnMut(u64, Exception) -> Result<()>,
    ) -> Result<LoadOutcome>;

    /// From now on, tell `index` of every exception made durable, with its position, in
    /// commit order ([`ExceptionIndex::durable`]), before [`commit`](Self::commit) returns.
    /// The index's checkpoints rely on that order.
    fn attach(&self, index: ExceptionIndex);

    /// A function giving a fingerprint of the store's first `n` entries, which changes if
    /// any of them is changed or removed behind the store's back (the index checks its
    /// sidecar with it). `None` for a store that keeps nothing across activations.
    fn fingerprinter(&self) -> Option<Fingerprinter> {
        None
    }

    /// Allocates a COW chunk for `old`. Persists nothing. [`Error::CowFull`] when none is
    /// free.
    fn prepare(&self, old: Chunk) -> Result<Chunk>;

    /// Says that the data of `batch` is written, without waiting: a commit already under
    /// way in another request may include it. A request with exceptions in several stores
    /// marks all of them first and then commits them one by one, so the stores' commits
    /// overlap without extra threads. Optional: [`commit`](Self::commit) marks too.
    fn mark_ready(&self, _batch: &[Exception]) {}

    /// Makes `batch` durable (see the commit contract). On error the store is invalid.
    fn commit(&self, batch: &[Exception]) -> Result<()>;

    /// Commits the exceptions marked ready that lead in allocation order, if no commit is
    /// under way, without waiting for anything: neither for a running commit nor for an
    /// older exception that is not ready. Whoever owns them still calls
    /// [`commit`](Self::commit), which then usually finds them durable. Lets one thread
    /// that marked many requests' exceptions ready commit them all at once. Optional.
    fn commit_ready(&self) {}

    /// Gives up a prepared exception whose copy failed.
    fn abort(&self, e: &Exception);

    /// Gives up a prepared exception *without* failing the store: its chunk is skipped,
    /// never used, and later commits go on. A relocation target calls it when the write
    /// to a spare chunk failed (that spare is bad; another is tried), where a snapshot,
    /// whose copy failed, calls [`abort`](Self::abort). Leaks the chunk until the next
    /// load; the transient store leaks it for good.
    fn release(&self, e: &Exception) {
        self.abort(e);
    }

    /// Marks the store invalid, on disk too where it has a header. Idempotent.
    fn invalidate(&self) -> Result<()>;

    /// Space use, in the kernel's numbers.
    fn usage(&self) -> Usage;

    /// Merge (the kernel's `snapshot-merge`): from now on the store allocates nothing.
    /// Waits until every exception prepared before is committed or aborted. Stores that
    /// keep nothing on disk cannot merge (the kernel's transient store has no
    /// `prepare_merge` either).
    fn begin_merge(&self) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "a {} store cannot merge: its exceptions live only in memory",
            self.kind()
        )))
    }

    /// The next merge batch: the last at most `max` entries of the table, in table order
    /// (the newest last), all from one metadata area. Empty when the table is empty: the
    /// merge is done. May read metadata.
    fn prepare_merge(&self, _max: usize) -> Result<Vec<Exception>> {
        self.begin_merge().map(|()| Vec::new())
    }

    /// Removes the last `n` entries of the table (the batch [`prepare_merge`](Self::prepare_merge)
    /// gave), durably, when their data is on the origin and the origin is flushed. On error
    /// the table is unchanged in memory and the call may be repeated.
    fn commit_merge(&self, _n: usize) -> Result<()> {
        self.begin_merge()
    }

    /// Entries left in the table while merging.
    fn merge_remaining(&self) -> u64 {
        0
    }
}
