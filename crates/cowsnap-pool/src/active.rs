//! An active pool: every origin of the manifest opened as an [`Origin`], every snapshot
//! loaded and activated, and snapshots created and removed live.
//!
//! Control operations (create, remove, status) serialise on one mutex; the data path never
//! takes it: front ends look a volume up once and then do I/O on its `Arc`. A snapshot
//! created live is activated before the manifest records it, so its point in time is the
//! activation: every origin write acknowledged before the request is in it, none is torn.
//! A snapshot removed live is marked `removing` in the manifest before it stops taking
//! copy-outs (see the crash rules in [`super`]).
//!
//! **Failed volumes.** A volume that cannot be opened (missing file, replaced file, a COW
//! that aliases another volume, a damaged COW header, a file in use by another program) is
//! *failed*: listed with its reason, not served, and the rest of the pool is served. An
//! origin with a failed snapshot is served **read-only**: a write to it could not be copied
//! out to that snapshot, which would then show data newer than its point in time if it
//! came back. Removing the failed snapshot (or repairing it and restarting) makes the
//! origin writable again. An origin that fails takes its snapshots with it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::manifest::{LayerEntry, MergeRecord, OriginEntry, SnapshotEntry, MANIFEST};
use super::stack::{self, LayerInfo};
use super::{crash_point, Pool, SnapshotRequest};
use cowsnap_core::copy::Copier;
use cowsnap_core::dev::{BlockDevice, FileDevice, FileId};
use cowsnap_core::error::{Error, Result};
use cowsnap_core::exception::index::{CacheStats, IndexState, IndexStatus, NO_INDEX_YET};
use cowsnap_core::exception::persistent::PersistentStore;
use cowsnap_core::exception::Usage;
use cowsnap_core::mutation;
use cowsnap_core::targets::{
    merge_percent, Merge, MergeSettings, MergeState, Origin, Snapshot, SnapshotStatus,
};

/// What a volume is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    /// An origin.
    Origin,
    /// A snapshot.
    Snapshot,
}

/// Status of one volume, as `cowsnap list` and `cowsnap status --json` print it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Volume name (and NBD export name).
    pub name: String,
    /// Origin or snapshot.
    pub kind: VolumeKind,
    /// Size in bytes.
    pub size: u64,
    /// The origin image, or the snapshot's COW file.
    pub path: String,
    /// A snapshot's origin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// A snapshot's store type: `N`, `P` or `PO`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// A snapshot's chunk size in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u64>,
    /// The kernel-style status line: empty for an origin; `<allocated>/<total> <metadata>`
    /// (sectors), `Invalid` or `Overflow` for a snapshot.
    pub status: String,
    /// A snapshot's space use, in sectors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
    /// A snapshot's use of its COW in percent, `allocated / total` as `lvs` shows a
    /// snapshot's `Data%` (header and metadata count as used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_percent: Option<f64>,
    /// A snapshot's completed exceptions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exceptions: Option<u64>,
    /// Why a snapshot is invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid_reason: Option<String>,
    /// Why the volume could not be opened (its status is then `Failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why an origin is served read-only (a snapshot of it failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<String>,
    /// A loaded snapshot's exception index: how it was loaded, what it covers, its memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexStatus>,
    /// The page cache of the pool's exception indexes (shared by its snapshots; the same
    /// numbers on each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStats>,
    /// A snapshot's merge into its origin, asked for or running; on an origin, the merge
    /// into it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeInfo>,
    /// The layers under the volume (an origin's, or a snapshot's COW's), bottom first,
    /// with their table lines and, in a running daemon, their status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerInfo>,
}

/// A merge as status shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MergeInfo {
    /// The snapshot merging.
    pub snapshot: String,
    /// The origin it merges into.
    pub origin: String,
    /// `running`, `paused`, `stopped`, `failed`, `done`, or `next_activation` (asked for
    /// while the origin was in use: it starts when the pool is next activated).
    pub state: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Percent done, from the allocation when it was asked for to `a == m`.
    pub percent: f64,
    /// Table entries left to merge.
    pub remaining: u64,
    /// The COW's allocation when the merge was asked for (sectors).
    pub initial_allocated_sectors: u64,
    /// Bytes moved by this process.
    pub merged_bytes: u64,
    /// Rate limit, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
}

/// Space use in sectors, with the kernel's meanings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageInfo {
    /// Sectors in use on the COW, header and metadata included.
    pub allocated_sectors: u64,
    /// COW size in sectors.
    pub total_sectors: u64,
    /// Header and metadata sectors.
    pub metadata_sectors: u64,
}

impl From<Usage> for UsageInfo {
    fn from(u: Usage) -> Self {
        UsageInfo {
            allocated_sectors: u.allocated_sectors,
            total_sectors: u.total_sectors,
            metadata_sectors: u.metadata_sectors,
        }
    }
}

impl VolumeInfo {
    /// The status of an origin.
    fn origin(name: &str, size: u64, path: &Path) -> VolumeInfo {
        VolumeInfo {
            name: name.into(),
            kind: VolumeKind::Origin,
            size,
            path: path.display().to_string(),
            origin: None,
            store: None,
            chunk_size: None,
            status: String::new(),
            usage: None,
            use_percent: None,
            exceptions: None,
            invalid_reason: None,
            error: None,
            read_only: None,
            index: None,
            cache: None,
            merge: None,
            layers: Vec::new(),
        }
    }

    /// The status of a volume that could not be opened.
    fn failed(name: &str, f: &Failed) -> VolumeInfo {
        VolumeInfo {
            name: name.into(),
            kind: f.kind,
            size: 0,
            path: f.path.display().to_string(),
            origin: f.origin.clone(),
            store: f.store.clone(),
            chunk_size: None,
            status: "Failed".into(),
            usage: None,
            use_percent: None,
            exceptions: None,
            invalid_reason: None,
            error: Some(f.reason.clone()),
            read_only: None,
            index: None,
            cache: None,
            merge: None,
            layers: Vec::new(),
        }
    }

    /// The status of a snapshot described by `entry`, whose COW is at `path`, with the
    /// numbers of a loaded snapshot (`None`: its store did not survive, it is invalid).
    fn snapshot(
        entry: &SnapshotEntry,
        size: u64,
        path: &Path,
        numbers: Option<(SnapshotStatus, Usage, u64, Option<String>)>,
    ) -> VolumeInfo {
        let chunk_size = entry.chunk_size().ok().map(|c| c.bytes());
        let (status, usage, exceptions, invalid_reason) = match numbers {
            Some((status, usage, exceptions, reason)) => (
                status.to_string(),
                matches!(status, SnapshotStatus::Usage(_)).then(|| usage.into()),
                Some(exceptions),
                reason,
            ),
            None => (
                "Invalid".to_string(),
                None,
                None,
                Some("transient store lost when its daemon stopped".to_string()),
            ),
        };
        let use_percent = usage
            .map(|u: UsageInfo| 100.0 * u.allocated_sectors as f64 / u.total_sectors.max(1) as f64);
        VolumeInfo {
            name: entry.name.clone(),
            kind: VolumeKind::Snapshot,
            size,
            path: path.display().to_string(),
            origin: Some(entry.origin.clone()),
            store: Some(entry.store.clone()),
            chunk_size,
            status,
            usage,
            use_percent,
            exceptions,
            invalid_reason,
            error: None,
            read_only: None,
            index: None,
            cache: None,
            merge: None,
            layers: Vec::new(),
        }
    }

    /// The status of a loaded snapshot.
    fn of_snapshot(entry: &SnapshotEntry, path: &Path, snap: &Snapshot) -> VolumeInfo {
        let numbers = (
            snap.status(),
            snap.store().usage(),
            snap.exceptions().completed_count(),
            // The first reason, recorded when the COW's header may not have taken it.
            entry.invalid.clone().or_else(|| snap.invalid_reason()),
        );
        let mut info = VolumeInfo::snapshot(entry, snap.size(), path, Some(numbers));
        let index = snap.exceptions().index();
        info.index = Some(index.status());
        info.cache = Some(index.cache().stats());
        info
    }
}

struct ActiveSnapshot {
    entry: SnapshotEntry,
    snap: Arc<Snapshot>,
}

/// A snapshot merging into its origin: not served; its origin shows its content.
struct ActiveMerge {
    entry: SnapshotEntry,
    snap: Arc<Snapshot>,
    origin: Arc<Origin>,
    merge: Arc<Merge>,
    /// Why the merger may not run beyond what [`Inner::merge_held`] finds: the manifest
    /// could not record that a deferred merge started.
    held: Option<String>,
}

/// What `merge pause|resume|rate` asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action", content = "rate")]
pub enum MergeAction {
    /// Stop moving data after the batch under way (the origin keeps showing the snapshot).
    Pause,
    /// Go on (also after a failure, once its cause is repaired).
    Resume,
    /// Limit the rate, bytes per second (`None`: no limit).
    Rate(Option<u64>),
}

impl MergeAction {
    /// What the action changes in the merge's record (a pause or a rate survives restarts).
    pub fn record(self, m: &mut MergeRecord) {
        match self {
            MergeAction::Pause => m.paused = true,
            MergeAction::Resume => m.paused = false,
            MergeAction::Rate(r) => m.rate = r,
        }
    }
}

/// The merge status of a snapshot whose merge was asked for but is not running here.
fn recorded_merge(entry: &SnapshotEntry, record: &MergeRecord, usage: Option<Usage>) -> MergeInfo {
    let state = if record.on_activation {
        "next_activation"
    } else {
        "stopped"
    };
    MergeInfo {
        snapshot: entry.name.clone(),
        origin: entry.origin.clone(),
        state: state.into(),
        reason: None,
        percent: usage.map_or(0.0, |u| {
            merge_percent(
                record.initial_allocated_sectors,
                u.allocated_sectors,
                u.metadata_sectors,
            )
        }),
        remaining: 0,
        initial_allocated_sectors: record.initial_allocated_sectors,
        merged_bytes: 0,
        rate: record.rate,
    }
}

impl ActiveMerge {
    /// Its status; `held`: why it may not run, if it may not.
    fn info(&self, held: Option<String>) -> MergeInfo {
        let st = self.merge.status();
        let (state, reason) = match st.state {
            MergeState::Running => ("running", None),
            MergeState::Paused => ("paused", held),
            MergeState::Stopped => ("stopped", None),
            MergeState::Failed(why) => ("failed", Some(why)),
            MergeState::Done => ("done", None),
        };
        MergeInfo {
            snapshot: self.entry.name.clone(),
            origin: self.entry.origin.clone(),
            state: state.into(),
            reason,
            percent: st.percent,
            remaining: st.remaining,
            initial_allocated_sectors: st.initial_allocated_sectors,
            merged_bytes: st.merged_bytes,
            rate: st.rate,
        }
    }
}

/// A volume of the manifest that could not be opened.
#[derive(Clone, Debug)]
struct Failed {
    kind: VolumeKind,
    path: PathBuf,
    /// A snapshot's origin.
    origin: Option<String>,
    /// A snapshot's store type.
    store: Option<String>,
    reason: String,
}

impl Failed {
    fn origin(pool: &Pool, o: &OriginEntry, reason: String) -> Failed {
        Failed {
            kind: VolumeKind::Origin,
            path: pool.resolve(&o.path),
            origin: None,
            store: None,
            reason,
        }
    }

    fn snapshot(pool: &Pool, s: &SnapshotEntry, reason: String) -> Failed {
        Failed {
            kind: VolumeKind::Snapshot,
            path: pool.resolve(&s.cow),
            origin: Some(s.origin.clone()),
            store: Some(s.store.clone()),
            reason,
        }
    }
}

struct Inner {
    pool: Pool,
    origins: BTreeMap<String, Arc<Origin>>,
    snapshots: BTreeMap<String, ActiveSnapshot>,
    merges: BTreeMap<String, ActiveMerge>,
    failed: BTreeMap<String, Failed>,
}

impl Inner {
    /// Why merge `m` may not run now: a snapshot of its origin failed (the merge's writes
    /// could not be copied out to it), or its start could not be recorded.
    fn merge_held(&self, m: &ActiveMerge) -> Option<String> {
        m.held
            .clone()
            .or_else(|| self.read_only_reason(&m.entry.origin))
    }

    /// Why the origin `name` must not take writes: a snapshot of it failed.
    fn read_only_reason(&self, name: &str) -> Option<String> {
        if self.failed.is_empty() {
            return None;
        }
        let failed: Vec<&String> = self
            .failed
            .iter()
            .filter(|(_, f)| f.origin.as_deref() == Some(name))
            .map(|(n, _)| n)
            .collect();
        (!failed.is_empty()).then(|| {
            format!(
                "snapshot {} of it failed to open: writes could not be copied out to it. Repair it and restart, or remove it, to make the origin writable",
                failed
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }
}

/// A pool brought to life.
pub struct ActivePool {
    inner: Mutex<Inner>,
    copier: Arc<Copier>,
}

impl std::fmt::Debug for ActivePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("ActivePool")
            .field("dir", &inner.pool.dir())
            .field("origins", &inner.origins.keys().collect::<Vec<_>>())
            .field("snapshots", &inner.snapshots.keys().collect::<Vec<_>>())
            .field("failed", &inner.failed.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The files already opened by an activation, by id, to refuse a second volume on one.
type Seen = HashMap<FileId, String>;

/// Checks that `path` is a file no other volume uses; returns its id.
fn unaliased(path: &Path, what: &str, seen: &Seen) -> Result<FileId> {
    let id = FileId::of_path(path)?;
    if let Some(other) = id.with_backing().iter().find_map(|i| seen.get(i)) {
        return Err(Error::SameFile(format!(
            "{} is the same file as {other} ({id}): one file cannot serve two volumes; fix {what} in {MANIFEST}",
            path.display()
        )));
    }
    Ok(id)
}

fn open_origin(
    pool: &Pool,
    o: &OriginEntry,
    seen: &mut Seen,
    copier: &Arc<Copier>,
) -> Result<(Arc<Origin>, FileId)> {
    let path = pool.resolve(&o.path);
    unaliased(&path, &format!("origin {:?}", o.name), seen)?;
    let under_bbr = o.layers.iter().any(|l| matches!(l, LayerEntry::Bbr(_)));
    let dev = pool.open_volume_file_with(&path, o.id, under_bbr)?;
    let id = dev.id()?;
    for i in id.with_backing() {
        seen.insert(i, format!("origin {:?}", o.name));
    }
    let (top, _) = pool.build_stack(&o.name, Arc::new(dev), &o.layers, seen)?;
    Ok((Origin::new(top, copier.clone()), id))
}

fn open_snapshot(
    pool: &Pool,
    origin: &Origin,
    s: &SnapshotEntry,
    seen: &mut Seen,
) -> Result<(Arc<Snapshot>, FileId)> {
    let path = pool.resolve(&s.cow);
    unaliased(&path, &format!("snapshot {:?}", s.name), seen)?;
    let dev = pool.open_volume_file(&path, s.id)?;
    let id = dev.id()?;
    for i in id.with_backing() {
        seen.insert(i, format!("the COW of snapshot {:?}", s.name));
    }
    let kind = s.store_kind()?;
    let (cow, _) = pool.build_stack(&s.name, super::cow_device(dev), &s.cow_layers, seen)?;
    let store = PersistentStore::open(cow, Some(s.chunk_size()?), kind.overflow_allowed())?;
    if store.is_fresh() {
        return Err(Error::Corrupt {
            device: path.display().to_string(),
            offset: 0,
            reason: "the COW header is zeroed (magic 0): the pool formatted this COW when it made the snapshot, so its metadata was overwritten. cowsnap will not reformat it (that would lose every exception); restore the COW from a backup or remove the snapshot".into(),
        });
    }
    let config = pool.index_config(s);
    Ok((Snapshot::load_with(origin, Arc::new(store), config)?, id))
}

/// Transient snapshots did not survive the process that made them: removes each from the
/// manifest, with a warning.
fn drop_transient(pool: &mut Pool, warnings: &mut Vec<String>) {
    let transient: Vec<String> = pool
        .manifest()
        .snapshots
        .iter()
        .filter(|s| s.store == "N")
        .map(|s| s.name.clone())
        .collect();
    for name in transient {
        match pool.remove_snapshot(&name, false) {
            Ok(w) => {
                warnings.extend(w);
                warnings.push(format!(
                    "transient snapshot {name:?} was lost when the process holding it stopped; removed"
                ));
            }
            // Marked `removing` or not, it is never activated: the next start retries.
            Err(e) => warnings.push(format!(
                "transient snapshot {name:?} was lost when the process holding it stopped; removing it failed ({e}), the next start retries"
            )),
        }
    }
}

/// A version 1 manifest recorded no file ids: records the ones just opened.
fn record_ids(pool: &mut Pool, ids: &HashMap<String, FileId>) -> Result<()> {
    let mut next = pool.manifest().clone();
    for o in next.origins.iter_mut().filter(|o| o.id.is_none()) {
        o.id = ids.get(&o.name).copied();
    }
    for s in next.snapshots.iter_mut().filter(|s| s.id.is_none()) {
        s.id = ids.get(&s.name).copied();
    }
    if next != *pool.manifest() {
        pool.commit(next)?;
    }
    Ok(())
}

/// A merging snapshot opened at activation (not activated: its origin will merge it).
type Merging = Vec<(SnapshotEntry, Arc<Snapshot>, Arc<Origin>)>;

/// Opens the merging snapshots, before any other: an origin whose merging snapshot cannot
/// be opened is half merged, so it fails too and is not served at all.
fn open_merging(
    pool: &Pool,
    origins: &mut BTreeMap<String, Arc<Origin>>,
    failed: &mut BTreeMap<String, Failed>,
    seen: &mut Seen,
    ids: &mut HashMap<String, FileId>,
) -> Merging {
    let mut merging = Vec::new();
    for s in pool
        .manifest()
        .snapshots
        .iter()
        .filter(|s| s.merging.is_some() && !s.removing)
    {
        let Some(origin) = origins.get(&s.origin).cloned() else {
            failed.insert(
                s.name.clone(),
                Failed::snapshot(
                    pool,
                    s,
                    format!("its origin {:?} is not available", s.origin),
                ),
            );
            continue;
        };
        match open_snapshot(pool, &origin, s, seen) {
            Ok((snap, id)) => {
                ids.insert(s.name.clone(), id);
                merging.push((s.clone(), snap, origin));
            }
            Err(e) if s.merging.is_some_and(|r| r.on_activation) => {
                // Deferred: nothing merged yet, the origin is intact (and read-only while
                // a snapshot of it has failed, as for any failed snapshot).
                failed.insert(s.name.clone(), Failed::snapshot(pool, s, e.to_string()));
            }
            Err(e) => {
                let why = format!(
                    "its merging snapshot {:?} failed to open ({e}): the origin is half merged and is not served until the snapshot is repaired",
                    s.name
                );
                failed.insert(s.name.clone(), Failed::snapshot(pool, s, e.to_string()));
                if let Some(o) = pool.manifest().origin(&s.origin) {
                    failed.insert(s.origin.clone(), Failed::origin(pool, o, why));
                }
                origins.remove(&s.origin);
            }
        }
    }
    merging
}

/// Switches the origin of every merging snapshot to its merge view, paused until
/// [`ActivePool::start_merges`]. A merge that cannot start fails its origin (it is half
/// merged) and its snapshot.
fn switch_merges(inner: &mut Inner, merging: Merging, warnings: &mut Vec<String>) {
    for (entry, snap, origin) in merging {
        let record = entry.merging.unwrap_or(MergeRecord {
            initial_allocated_sectors: 0,
            on_activation: false,
            paused: false,
            rate: None,
        });
        let settings = MergeSettings {
            paused: true,
            rate: record.rate,
            initial_allocated_sectors: Some(record.initial_allocated_sectors),
            ..MergeSettings::default()
        };
        match origin.start_merge(&snap, settings) {
            Ok(merge) => {
                // A deferred merge starts now: recorded as started before the merger may
                // move anything (until then a restart would find the origin untouched).
                let mut held = None;
                if record.on_activation {
                    let cleared = inner.pool.update_merge(&entry.name, |m| {
                        if let Some(m) = m {
                            m.on_activation = false;
                        }
                    });
                    if let Err(e) = cleared {
                        held = Some(format!(
                            "its start could not be recorded in {MANIFEST} ({e}); `merge resume` retries"
                        ));
                    }
                }
                let m = ActiveMerge {
                    entry,
                    snap,
                    origin,
                    merge,
                    held,
                };
                if let Some(why) = inner.merge_held(&m) {
                    warnings.push(format!(
                        "the merge of snapshot {:?} into {:?} is held: {why}",
                        m.entry.name, m.entry.origin
                    ));
                }
                inner.merges.insert(m.entry.name.clone(), m);
            }
            Err(e) if record.on_activation => {
                // Deferred, so nothing was merged: the origin is intact. The snapshot is
                // served as it is and the request dropped.
                warnings.push(format!(
                    "the merge of snapshot {:?} into {:?} asked for at this start cannot run ({e}); the request is dropped",
                    entry.name, entry.origin
                ));
                let _ = inner.pool.update_merge(&entry.name, |m| *m = None);
                match origin.activate(&snap) {
                    Ok(()) => {
                        let mut entry = entry;
                        entry.merging = None;
                        inner
                            .snapshots
                            .insert(entry.name.clone(), ActiveSnapshot { entry, snap });
                    }
                    Err(e) => {
                        let f = Failed::snapshot(&inner.pool, &entry, e.to_string());
                        inner.failed.insert(entry.name.clone(), f);
                    }
                }
            }
            Err(e) => {
                let why = format!(
                    "its merging snapshot {:?} cannot merge ({e}): the origin is half merged and is not served",
                    entry.name
                );
                if let Some(o) = inner.pool.manifest().origin(&entry.origin).cloned() {
                    let f = Failed::origin(&inner.pool, &o, why);
                    inner.failed.insert(entry.origin.clone(), f);
                }
                inner.origins.remove(&entry.origin);
                let f = Failed::snapshot(&inner.pool, &entry, e.to_string());
                inner.failed.insert(entry.name.clone(), f);
            }
        }
    }
}

impl ActivePool {
    /// Opens every origin and loads and activates every snapshot of `pool`. Transient
    /// snapshots did not survive the process that made them: they are removed from the
    /// manifest, each with a warning. A volume that cannot be opened is *failed* (see the
    /// module docs), with a warning; the rest is served. Returns the pool and the warnings.
    pub fn activate(mut pool: Pool, copier: Arc<Copier>) -> Result<(ActivePool, Vec<String>)> {
        let mut warnings: Vec<String> = pool.notes().to_vec();
        drop_transient(&mut pool, &mut warnings);
        let mut seen = Seen::new();
        let mut ids: HashMap<String, FileId> = HashMap::new();
        let mut failed = BTreeMap::new();
        let mut origins = BTreeMap::new();
        for o in &pool.manifest().origins {
            match open_origin(&pool, o, &mut seen, &copier) {
                Ok((origin, id)) => {
                    ids.insert(o.name.clone(), id);
                    origins.insert(o.name.clone(), origin);
                }
                Err(e) => {
                    failed.insert(o.name.clone(), Failed::origin(&pool, o, e.to_string()));
                }
            }
        }
        let merging = open_merging(&pool, &mut origins, &mut failed, &mut seen, &mut ids);
        let mut snapshots = BTreeMap::new();
        for s in &pool.manifest().snapshots {
            if s.merging.is_some() && !s.removing {
                continue;
            }
            let opened = match origins.get(&s.origin) {
                _ if s.removing || s.store == "N" => Err(Error::WrongState(
                    "its removal did not finish; remove it again, or restart, to finish it".into(),
                )),
                None => Err(Error::WrongState(format!(
                    "its origin {:?} is not available",
                    s.origin
                ))),
                Some(origin) => {
                    open_snapshot(&pool, origin, s, &mut seen).and_then(|(snap, id)| {
                        if let Some(why) = &s.invalid {
                            snap.invalidate(why);
                        }
                        origin.activate(&snap)?;
                        Ok((snap, id))
                    })
                }
            };
            match opened {
                Ok((snap, id)) => {
                    if let IndexState::Rebuilt { reason } = snap.exceptions().index().status().state
                    {
                        if reason != NO_INDEX_YET {
                            warnings.push(format!(
                                "snapshot {:?}: its exception index was rebuilt from the COW: {reason}",
                                s.name
                            ));
                        }
                    }
                    ids.insert(s.name.clone(), id);
                    snapshots.insert(
                        s.name.clone(),
                        ActiveSnapshot {
                            entry: s.clone(),
                            snap,
                        },
                    );
                }
                Err(e) => {
                    failed.insert(s.name.clone(), Failed::snapshot(&pool, s, e.to_string()));
                }
            }
        }
        record_ids(&mut pool, &ids)?;
        let mut inner = Inner {
            pool,
            origins,
            snapshots,
            merges: BTreeMap::new(),
            failed,
        };
        // Every other snapshot is active now: the merges switch their origins.
        switch_merges(&mut inner, merging, &mut warnings);
        for (name, f) in &inner.failed {
            warnings.push(format!(
                "{} {name:?} failed and is not served: {}",
                kind_word(f.kind),
                f.reason
            ));
        }
        for name in inner.origins.keys() {
            if let Some(why) = inner.read_only_reason(name) {
                warnings.push(format!("origin {name:?} is served read-only: {why}"));
            }
        }
        Ok((
            ActivePool {
                inner: Mutex::new(inner),
                copier,
            },
            warnings,
        ))
    }

    /// The copier shared by the pool's origins.
    pub fn copier(&self) -> &Arc<Copier> {
        &self.copier
    }

    /// The names of every served volume, origins first (failed volumes are not served).
    pub fn volume_names(&self) -> Vec<String> {
        let inner = self.inner.lock();
        inner
            .origins
            .keys()
            .chain(inner.snapshots.keys())
            .cloned()
            .collect()
    }

    /// A volume's device, for I/O.
    pub fn volume(&self, name: &str) -> Option<(VolumeKind, Arc<dyn BlockDevice>)> {
        let inner = self.inner.lock();
        if let Some(o) = inner.origins.get(name) {
            return Some((VolumeKind::Origin, o.clone() as Arc<dyn BlockDevice>));
        }
        inner
            .snapshots
            .get(name)
            .map(|s| (VolumeKind::Snapshot, s.snap.clone() as Arc<dyn BlockDevice>))
    }

    /// A served volume's device and whether it must be served read-only (an origin with a
    /// failed snapshot), under one lock: front ends call it per lookup.
    pub fn volume_for_io(&self, name: &str) -> Option<(Arc<dyn BlockDevice>, bool)> {
        let inner = self.inner.lock();
        if let Some(o) = inner.origins.get(name) {
            let forced = inner.read_only_reason(name).is_some();
            return Some((o.clone() as Arc<dyn BlockDevice>, forced));
        }
        inner
            .snapshots
            .get(name)
            .map(|s| (s.snap.clone() as Arc<dyn BlockDevice>, false))
    }

    /// Why the origin `name` must be served read-only, if it must (a snapshot of it
    /// failed to open).
    pub fn read_only_reason(&self, name: &str) -> Option<String> {
        self.inner.lock().read_only_reason(name)
    }

    /// The identity of a served volume's file (origin image or COW), as the pool recorded
    /// it when it opened the file.
    pub fn file_id(&self, name: &str) -> Option<FileId> {
        let inner = self.inner.lock();
        if !inner.origins.contains_key(name) && !inner.snapshots.contains_key(name) {
            return None;
        }
        let m = inner.pool.manifest();
        m.origin(name)
            .and_then(|o| o.id)
            .or_else(|| m.snapshot(name).and_then(|s| s.id))
    }

    /// The origin called `name`.
    pub fn origin(&self, name: &str) -> Option<Arc<Origin>> {
        self.inner.lock().origins.get(name).cloned()
    }

    /// The snapshot called `name`.
    pub fn snapshot(&self, name: &str) -> Option<Arc<Snapshot>> {
        self.inner
            .lock()
            .snapshots
            .get(name)
            .map(|s| s.snap.clone())
    }

    /// True when `name` is a snapshot of the pool, served or failed.
    pub fn has_snapshot(&self, name: &str) -> bool {
        let inner = self.inner.lock();
        inner.snapshots.contains_key(name)
            || inner.merges.contains_key(name)
            || inner
                .failed
                .get(name)
                .is_some_and(|f| f.kind == VolumeKind::Snapshot)
    }

    /// Creates a snapshot live. Returns its status and a warning when the COW header's
    /// chunk size overrode the one asked for.
    pub fn create_snapshot(&self, req: &SnapshotRequest) -> Result<(VolumeInfo, Option<String>)> {
        let mut inner = self.inner.lock();
        if inner.failed.contains_key(&req.name) {
            return Err(Error::Exists(format!(
                "a volume called {:?} already exists (failed; remove it first)",
                req.name
            )));
        }
        let origin = inner.origins.get(&req.origin).cloned().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "no served origin called {:?} in this pool",
                req.origin
            ))
        })?;
        if let Some(m) = inner.pool.manifest().merging_into(&req.origin) {
            return Err(Error::WrongState(format!(
                "origin {:?} has a merging snapshot ({:?}): new snapshots of it are refused until the merge finishes",
                req.origin, m.name
            )));
        }
        // On any error below, dropping `prepared` deletes a COW file the pool made.
        let prepared = inner.pool.prepare_snapshot(req)?;
        inner.pool.guard_format(&prepared)?;
        // On a failure below, every handle on the COW goes before `undo_format` opens it.
        let config = inner.pool.index_config(&prepared.entry);
        let snap = match Snapshot::load_with(&origin, prepared.store.clone(), config) {
            Ok(snap) => snap,
            Err(e) => {
                drop(prepared);
                return Err(inner.pool.undo_format(&req.name, e));
            }
        };
        crash_point("create-snapshot:loaded");
        if let Err(e) = origin.activate(&snap) {
            drop((snap, prepared));
            return Err(inner.pool.undo_format(&req.name, e));
        }
        crash_point("create-snapshot:activated");
        let (entry, warning) = match inner.pool.commit_snapshot(prepared) {
            Ok(done) => done,
            Err(e) => {
                let _ = origin.deactivate(&snap);
                drop(snap);
                return Err(inner.pool.undo_format(&req.name, e));
            }
        };
        inner.snapshots.insert(
            entry.name.clone(),
            ActiveSnapshot {
                entry: entry.clone(),
                snap,
            },
        );
        let info =
            info_of(&inner, &entry.name).ok_or_else(|| Error::WrongState("vanished".into()))?;
        Ok((info, warning))
    }

    /// Removes a snapshot live (see the crash rules in [`super`]): marks it `removing` in
    /// the manifest while it still takes copy-outs (if that fails, nothing changed and the
    /// snapshot keeps working), deactivates it (its I/O fails from now on), marks its COW
    /// invalid, drops it from the manifest and deletes its COW file if the pool made it.
    /// A failed snapshot is removed the same way. Returns warnings.
    pub fn remove_snapshot(&self, name: &str, force: bool) -> Result<Vec<String>> {
        let mut inner = self.inner.lock();
        if let Some(m) = inner.merges.get(name) {
            return Err(Error::WrongState(format!(
                "snapshot {name:?} is merging into origin {:?}: it is removed when the merge finishes",
                m.entry.origin
            )));
        }
        if inner
            .failed
            .get(name)
            .is_some_and(|f| f.kind == VolumeKind::Snapshot)
        {
            let mut warnings = inner.pool.half_merged_check(name, force)?;
            inner.pool.mark_removing(name)?;
            warnings.extend(inner.pool.finish_removal(name, None)?);
            inner.failed.remove(name);
            return Ok(warnings);
        }
        if !inner.snapshots.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "no snapshot called {name:?}"
            )));
        }
        // The mutation deactivates first and marks after a slow (200 ms) manifest write: a
        // crash in between brings the snapshot back without the copy-outs it missed.
        let mark_late = mutation::active("remove-deactivated-before-mark");
        if !mark_late {
            inner.pool.mark_removing(name)?;
        }
        let Some(active) = inner.snapshots.remove(name) else {
            return Err(Error::InvalidArgument(format!(
                "no snapshot called {name:?}"
            )));
        };
        if let Some(origin) = inner.origins.get(&active.entry.origin) {
            let _ = origin.deactivate(&active.snap);
        }
        if mark_late {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        crash_point("remove-snapshot:deactivated");
        if mark_late {
            inner.pool.mark_removing(name)?;
        }
        let finished = inner
            .pool
            .finish_removal(name, Some(active.snap.store().as_ref()));
        active.snap.invalidate("the snapshot was removed");
        match finished {
            Ok(w) => Ok(w),
            Err(e) => {
                let f = Failed::snapshot(
                    &inner.pool,
                    &active.entry,
                    format!("its removal did not finish: {e}"),
                );
                inner.failed.insert(name.to_string(), f);
                Err(Error::WrongState(format!(
                    "snapshot {name:?} is deactivated but its removal did not finish ({e}); run the remove again, or restart the daemon, to finish it"
                )))
            }
        }
    }

    /// `dmsetup message`: sends `words` to layer `layer` (its position, 0 at the bottom,
    /// or its target's name) of volume `volume`; returns the layer's reply.
    pub fn layer_message(&self, volume: &str, layer: &str, words: &[&str]) -> Result<String> {
        let inner = self.inner.lock();
        if !inner.origins.contains_key(volume)
            && !inner.snapshots.contains_key(volume)
            && !inner.merges.contains_key(volume)
        {
            return Err(Error::InvalidArgument(format!(
                "no volume called {volume:?} is served"
            )));
        }
        // The message runs outside the pool's lock: a slow layer must not stall the pool.
        let (_, entries, layers) = inner
            .pool
            .running_stack(volume)
            .ok_or_else(|| Error::InvalidArgument(format!("volume {volume:?} has no layers")))?;
        drop(inner);
        let i = stack::find_layer(volume, &entries, layer)?;
        layers[i].message(words)
    }

    /// Status of one volume.
    pub fn info(&self, name: &str) -> Option<VolumeInfo> {
        info_of(&self.inner.lock(), name)
    }

    /// Status of every volume, origins first, failed ones included.
    pub fn list(&self) -> Vec<VolumeInfo> {
        let inner = self.inner.lock();
        let mut names: Vec<&String> = inner.origins.keys().collect();
        names.extend(
            inner
                .failed
                .iter()
                .filter(|(_, f)| f.kind == VolumeKind::Origin)
                .map(|(n, _)| n),
        );
        names.extend(inner.snapshots.keys());
        names.extend(inner.merges.keys());
        names.extend(
            inner
                .failed
                .iter()
                .filter(|(_, f)| f.kind == VolumeKind::Snapshot)
                .map(|(n, _)| n),
        );
        names
            .into_iter()
            .filter_map(|n| info_of(&inner, n))
            .collect()
    }

    /// Flushes every origin and every valid snapshot's COW.
    pub fn flush_all(&self) -> Result<()> {
        let inner = self.inner.lock();
        for o in inner.origins.values() {
            o.flush()?;
        }
        for s in inner.snapshots.values() {
            if s.snap.is_valid() {
                s.snap.cow().flush()?;
            }
        }
        Ok(())
    }

    /// Records in the manifest why each invalid snapshot whose COW has layers is invalid
    /// (see [`SnapshotEntry::invalid`]): its header may not say so. Returns a warning when
    /// the manifest could not be written.
    pub fn record_invalid(&self) -> Vec<String> {
        let mut inner = self.inner.lock();
        let found: Vec<(String, String)> = inner
            .snapshots
            .iter()
            .filter(|(_, s)| {
                !s.snap.is_valid() && !s.entry.cow_layers.is_empty() && s.entry.invalid.is_none()
            })
            .map(|(name, s)| {
                let why = s.snap.invalid_reason().unwrap_or_else(|| "invalid".into());
                (name.clone(), why)
            })
            .collect();
        if found.is_empty() {
            return Vec::new();
        }
        let mut next = inner.pool.manifest().clone();
        for (name, why) in &found {
            if let Some(e) = next.snapshots.iter_mut().find(|e| &e.name == name) {
                e.invalid = Some(why.clone());
            }
        }
        if let Err(e) = inner.pool.commit(next) {
            return vec![format!(
                "could not record in the manifest that snapshots {:?} are invalid ({e}): the header of a COW under failing layers may still call it valid",
                found.iter().map(|(n, _)| n).collect::<Vec<_>>()
            )];
        }
        for (name, why) in found {
            if let Some(s) = inner.snapshots.get_mut(&name) {
                s.entry.invalid = Some(why);
            }
        }
        Vec::new()
    }

    /// Writes every snapshot's recent exceptions into its index (a stop does this, so the
    /// next activation replays nothing). Returns one warning per index that failed: it
    /// costs only a replay at the next activation.
    pub fn checkpoint_indexes(&self) -> Vec<String> {
        let inner = self.inner.lock();
        let mut warnings = Vec::new();
        for (name, s) in &inner.snapshots {
            if let Err(e) = s.snap.exceptions().index().checkpoint() {
                warnings.push(format!(
                    "snapshot {name:?}: could not write its exception index ({e}); the next start reads the rest from the COW"
                ));
            }
        }
        warnings
    }
}

impl ActivePool {
    /// Starts the merges the activation switched (they wait paused until the pool is
    /// shared, so that their end can remove the snapshot): each resumes unless the user
    /// paused it or it is held. Returns warnings.
    pub fn start_merges(self: &Arc<Self>) -> Vec<String> {
        let merges: Vec<(String, Arc<Merge>, Arc<Origin>, bool)> = {
            let inner = self.inner.lock();
            inner
                .merges
                .iter()
                .map(|(n, m)| {
                    let paused =
                        inner.merge_held(m).is_some() || m.entry.merging.is_some_and(|r| r.paused);
                    (n.clone(), m.merge.clone(), m.origin.clone(), paused)
                })
                .collect()
        };
        let mut warnings = Vec::new();
        for (name, merge, origin, paused) in merges {
            self.watch_merge(&name, &merge);
            if !paused {
                if let Err(e) = merge.resume(&origin) {
                    warnings.push(format!("the merge of snapshot {name:?} did not start: {e}"));
                }
            }
        }
        warnings
    }

    /// Makes the end of `merge` finish snapshot `name`'s merge (see [`Self::merge_ended`]).
    fn watch_merge(self: &Arc<Self>, name: &str, merge: &Merge) {
        let (pool, name) = (Arc::downgrade(self), name.to_string());
        merge.on_finish(move |state| {
            if let Some(pool) = Weak::upgrade(&pool) {
                pool.merge_ended(&name, state);
            }
        });
    }

    /// Called on the merger's thread when a merge ends. Done: the origin leaves the merge
    /// view and the snapshot is removed (marked, its COW invalidated and deleted if the
    /// pool made it), as `lvconvert --merge` removes the merged snapshot. Failed: I/O goes
    /// on through the view; a resume retries.
    fn merge_ended(&self, name: &str, state: &MergeState) {
        match state {
            MergeState::Failed(why) => {
                eprintln!("cowsnap: warning: the merge of snapshot {name} failed: {why}; I/O goes on, `cowsnap merge resume {name}` retries");
                return;
            }
            MergeState::Done => {}
            _ => return,
        }
        let mut inner = self.inner.lock();
        let Some(m) = inner.merges.remove(name) else {
            return;
        };
        if let Err(e) = m.origin.end_merge() {
            eprintln!(
                "cowsnap: warning: the merge of snapshot {name} finished but could not end: {e}"
            );
            inner.merges.insert(name.to_string(), m);
            return;
        }
        let origin = m.entry.origin.clone();
        let removed = inner.pool.mark_removing(name).and_then(|_| {
            inner
                .pool
                .finish_removal(name, Some(m.snap.store().as_ref()))
        });
        match removed {
            Ok(warnings) => {
                for w in warnings {
                    eprintln!("cowsnap: warning: {w}");
                }
                eprintln!("cowsnap: snapshot {name} is merged into origin {origin} and removed");
            }
            Err(e) => {
                eprintln!("cowsnap: warning: snapshot {name} is merged into origin {origin}, but its removal did not finish ({e}); the next start finishes it");
                let f = Failed::snapshot(
                    &inner.pool,
                    &m.entry,
                    format!("merged; its removal did not finish: {e}"),
                );
                inner.failed.insert(name.to_string(), f);
            }
        }
    }

    /// Merges snapshot `name` into its origin (`lvconvert --merge`). With `now`, the origin
    /// shows the snapshot's content from this call on and the data moves back in the
    /// background; the snapshot stops being served. Without it the merge is recorded to
    /// start at the next activation (the caller found the origin in use). Refused for a
    /// transient, invalid, removed or failed snapshot, an origin already merging, and an
    /// origin with a failed snapshot (the merge's writes could not be copied out to it).
    /// The merge is recorded in the manifest before the origin switches.
    pub fn merge_snapshot(
        self: &Arc<Self>,
        name: &str,
        now: bool,
        paused: bool,
        rate: Option<u64>,
    ) -> Result<MergeInfo> {
        let mut inner = self.inner.lock();
        if inner.merges.contains_key(name) {
            return Err(Error::WrongState(format!(
                "snapshot {name:?} is already merging"
            )));
        }
        // A merge deferred to the next activation starts now when asked with `now`.
        let deferred = inner
            .pool
            .manifest()
            .snapshot(name)
            .filter(|s| s.merging.is_some_and(|r| r.on_activation) && !s.removing)
            .cloned();
        let entry = match deferred {
            Some(entry) if now => entry,
            _ => inner.pool.check_mergeable(name)?,
        };
        if inner.failed.contains_key(name) {
            return Err(Error::WrongState(format!(
                "snapshot {name:?} failed to open: repair or remove it"
            )));
        }
        let Some(snap) = inner.snapshots.get(name).map(|s| s.snap.clone()) else {
            return Err(Error::InvalidArgument(format!(
                "no snapshot called {name:?}"
            )));
        };
        let Some(origin) = inner.origins.get(&entry.origin).cloned() else {
            return Err(Error::WrongState(format!(
                "its origin {:?} is not served",
                entry.origin
            )));
        };
        if let Some(why) = inner.read_only_reason(&entry.origin) {
            return Err(Error::WrongState(format!(
                "origin {:?} cannot take the merge's writes: {why}",
                entry.origin
            )));
        }
        if !snap.is_valid() {
            return Err(Error::Invalid(format!(
                "unable to merge invalidated snapshot {name:?}: {}",
                snap.invalid_reason().unwrap_or_default()
            )));
        }
        let record = MergeRecord {
            initial_allocated_sectors: snap.store().usage().allocated_sectors,
            on_activation: !now,
            paused,
            rate,
        };
        // The mutation switches the origin and lets the merger run before the manifest
        // records the merge: a crash then leaves a half-merged origin served as plain.
        let record_late = now && mutation::active("merge-switched-before-record");
        if !record_late {
            inner.pool.record_merge(name, record)?;
        }
        if !now {
            return Ok(recorded_merge(&entry, &record, Some(snap.store().usage())));
        }
        let settings = MergeSettings {
            paused: !record_late,
            rate,
            initial_allocated_sectors: Some(record.initial_allocated_sectors),
            ..MergeSettings::default()
        };
        let merge = match origin.start_merge(&snap, settings) {
            Ok(m) => m,
            Err(e) => {
                let _ = inner.pool.update_merge(name, |m| *m = None);
                return Err(e);
            }
        };
        crash_point("merge-snapshot:switched");
        if record_late {
            std::thread::sleep(std::time::Duration::from_millis(200));
            inner.pool.record_merge(name, record)?;
        }
        let mut entry = entry;
        entry.merging = Some(record);
        inner.snapshots.remove(name);
        let m = ActiveMerge {
            entry,
            snap,
            origin: origin.clone(),
            merge: merge.clone(),
            held: None,
        };
        let info = m.info(None);
        inner.merges.insert(name.to_string(), m);
        drop(inner);
        eprintln!(
            "cowsnap: merging snapshot {name} into origin {}",
            info.origin
        );
        self.watch_merge(name, &merge);
        if !paused {
            merge.resume(&origin)?;
        }
        Ok(info)
    }

    /// Pauses, resumes or rate-limits the merge of snapshot `name` (recorded in the
    /// manifest, so a restart keeps it). A merge waiting for the next activation takes the
    /// pause and the rate for when it starts.
    pub fn merge_control(self: &Arc<Self>, name: &str, action: MergeAction) -> Result<MergeInfo> {
        let (merge, origin) = {
            let mut guard = self.inner.lock();
            let inner = &mut *guard;
            let Some(recorded) = inner.pool.manifest().snapshot(name).and_then(|s| s.merging)
            else {
                return Err(Error::InvalidArgument(format!(
                    "snapshot {name:?} is not merging"
                )));
            };
            if let (MergeAction::Resume, Some(m)) = (action, inner.merges.get(name)) {
                if m.held.is_some() {
                    // Retry recording that the deferred merge started.
                    let cleared = inner.pool.update_merge(name, |r| {
                        if let Some(r) = r {
                            r.on_activation = false;
                        }
                    });
                    if let (Ok(()), Some(m)) = (cleared, inner.merges.get_mut(name)) {
                        m.held = None;
                    }
                }
                if let Some(why) = inner.merges.get(name).and_then(|m| inner.merge_held(m)) {
                    return Err(Error::WrongState(format!("the merge is held: {why}")));
                }
            }
            inner.pool.update_merge(name, |m| {
                if let Some(m) = m {
                    action.record(m);
                }
            })?;
            let now = inner.pool.manifest().snapshot(name).and_then(|s| s.merging);
            let Some(m) = inner.merges.get_mut(name) else {
                // Waiting for the next activation: the record is all there is.
                let entry = inner.pool.manifest().snapshot(name).cloned();
                let usage = inner.snapshots.get(name).map(|s| s.snap.store().usage());
                return match entry {
                    Some(e) => Ok(recorded_merge(&e, &now.unwrap_or(recorded), usage)),
                    None => Err(Error::InvalidArgument(format!(
                        "no snapshot called {name:?}"
                    ))),
                };
            };
            m.entry.merging = now;
            (m.merge.clone(), m.origin.clone())
        };
        // The merger's finish hook takes the pool's lock: never wait for the merger under it.
        match action {
            MergeAction::Pause => merge.pause(),
            MergeAction::Resume => merge.resume(&origin)?,
            MergeAction::Rate(r) => merge.set_rate(r),
        }
        self.info(name)
            .and_then(|i| i.merge)
            .ok_or_else(|| Error::WrongState(format!("snapshot {name:?} finished merging")))
    }

    /// Stops every merger after its batch under way (daemon shutdown): the next start
    /// resumes from the COW.
    pub fn stop_merges(&self) {
        let merges: Vec<Arc<Merge>> = self
            .inner
            .lock()
            .merges
            .values()
            .map(|m| m.merge.clone())
            .collect();
        for m in merges {
            m.stop();
        }
    }
}

fn kind_word(k: VolumeKind) -> &'static str {
    match k {
        VolumeKind::Origin => "origin",
        VolumeKind::Snapshot => "snapshot",
    }
}

fn info_of(inner: &Inner, name: &str) -> Option<VolumeInfo> {
    if let Some(f) = inner.failed.get(name) {
        return Some(VolumeInfo::failed(name, f));
    }
    if let Some(o) = inner.origins.get(name) {
        let entry = inner.pool.manifest().origin(name)?;
        let mut info = VolumeInfo::origin(name, o.size(), &inner.pool.resolve(&entry.path));
        info.layers = inner.pool.running_layer_infos(name);
        info.read_only = inner.read_only_reason(name);
        info.merge = inner.pool.manifest().merging_into(name).and_then(|s| {
            match inner.merges.get(&s.name) {
                Some(m) => Some(m.info(inner.merge_held(m))),
                None => s.merging.as_ref().map(|r| recorded_merge(s, r, None)),
            }
        });
        return Some(info);
    }
    if let Some(m) = inner.merges.get(name) {
        let mut info =
            VolumeInfo::of_snapshot(&m.entry, &inner.pool.resolve(&m.entry.cow), &m.snap);
        info.status = m.merge.kernel_status().to_string();
        info.merge = Some(m.info(inner.merge_held(m)));
        info.layers = inner.pool.running_layer_infos(name);
        return Some(info);
    }
    let s = inner.snapshots.get(name)?;
    let mut info = VolumeInfo::of_snapshot(&s.entry, &inner.pool.resolve(&s.entry.cow), &s.snap);
    info.merge = inner.pool.manifest().snapshot(name).and_then(|e| {
        e.merging
            .as_ref()
            .map(|r| recorded_merge(e, r, Some(s.snap.store().usage())))
    });
    info.layers = inner.pool.running_layer_infos(name);
    Some(info)
}

/// Status of every volume of a pool that no process holds: origins opened read-only,
/// snapshots loaded (not activated) to read their usage. A volume that cannot be read is
/// listed as failed with its reason.
pub(super) fn list_offline(
    pool: &Pool,
    copier: Arc<Copier>,
    only: Option<&str>,
) -> Result<Vec<VolumeInfo>> {
    let wanted = |name: &str| only.is_none_or(|n| n == name);
    let snapshots: Vec<_> = pool
        .manifest()
        .snapshots
        .iter()
        .filter(|s| wanted(&s.name))
        .collect();
    let mut out = Vec::new();
    let mut origins = BTreeMap::new();
    for o in &pool.manifest().origins {
        // Open only the origins shown and those the shown snapshots need.
        if !wanted(&o.name) && !snapshots.iter().any(|s| s.origin == o.name) {
            continue;
        }
        let path = pool.resolve(&o.path);
        match FileDevice::open_read_only(&path) {
            Ok(dev) => {
                let base = dev.size();
                let top = stack::offline_stack(Arc::new(dev), &o.layers, |_| true);
                if wanted(&o.name) {
                    let mut info = match &top {
                        Ok(t) => VolumeInfo::origin(&o.name, t.size(), &path),
                        Err(e) => {
                            VolumeInfo::failed(&o.name, &Failed::origin(pool, o, e.to_string()))
                        }
                    };
                    info.merge = pool
                        .manifest()
                        .merging_into(&o.name)
                        .and_then(|s| s.merging.as_ref().map(|r| recorded_merge(s, r, None)));
                    info.layers = stack::layer_infos(base, &o.layers, None);
                    out.push(info);
                }
                if let Ok(top) = top {
                    origins.insert(o.name.clone(), Origin::new(top, copier.clone()));
                }
            }
            Err(e) if wanted(&o.name) => {
                out.push(VolumeInfo::failed(
                    &o.name,
                    &Failed::origin(pool, o, e.to_string()),
                ));
            }
            Err(_) => {}
        }
    }
    for s in snapshots {
        let path = pool.resolve(&s.cow);
        if s.store == "N" {
            let size = origins.get(&s.origin).map(|o| o.size()).unwrap_or(0);
            out.push(VolumeInfo::snapshot(s, size, &path, None));
            continue;
        }
        let loaded = (|| {
            let origin = origins.get(&s.origin).ok_or_else(|| {
                Error::WrongState(format!("its origin {:?} is not available", s.origin))
            })?;
            let cow: Arc<dyn BlockDevice> = Arc::new(FileDevice::open_read_only(&path)?);
            let cow = stack::offline_stack(cow, &s.cow_layers, |_| true)?;
            let store = PersistentStore::open(
                cow,
                Some(s.chunk_size()?),
                s.store_kind()?.overflow_allowed(),
            )?;
            if store.is_fresh() {
                return Err(Error::Corrupt {
                    device: path.display().to_string(),
                    offset: 0,
                    reason: "the COW header is zeroed (magic 0)".into(),
                });
            }
            Snapshot::load_with(origin, Arc::new(store), pool.index_config(s))
        })();
        out.push(match loaded {
            Ok(snap) => {
                let mut info = VolumeInfo::of_snapshot(s, &path, &snap);
                info.merge = s
                    .merging
                    .as_ref()
                    .map(|r| recorded_merge(s, r, Some(snap.store().usage())));
                info
            }
            Err(e) => VolumeInfo::failed(&s.name, &Failed::snapshot(pool, s, e.to_string())),
        });
        if let (Some(info), false) = (out.last_mut(), s.cow_layers.is_empty()) {
            let base = FileDevice::open_read_only(&path).map_or(0, |d| d.size());
            info.layers = stack::layer_infos(base, &s.cow_layers, None);
        }
    }
    Ok(out)
}
