//! An active pool: every origin of the manifest opened as an [`Origin`], every snapshot
//! loaded and activated, and snapshots created and removed live.
//!
//! Control operations (create, remove, status) serialise on one mutex; the data path never
//! takes it: front ends look a volume up once and then do I/O on its `Arc`. A snapshot
//! created live is activated before the manifest records it, so its point in time is the
//! activation: every origin write acknowledged before the request is in it, none is torn.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::manifest::SnapshotEntry;
use super::{Pool, SnapshotRequest};
use crate::copy::Copier;
use crate::dev::{BlockDevice, FileDevice};
use crate::error::{Error, Result};
use crate::exception::persistent::PersistentStore;
use crate::exception::{ExceptionStore, Usage};
use crate::target::{Origin, Snapshot, SnapshotStatus};

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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// A snapshot's completed exceptions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exceptions: Option<u64>,
    /// Why a snapshot is invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid_reason: Option<String>,
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
            exceptions: None,
            invalid_reason: None,
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
            exceptions,
            invalid_reason,
        }
    }

    /// The status of a loaded snapshot.
    fn of_snapshot(entry: &SnapshotEntry, path: &Path, snap: &Snapshot) -> VolumeInfo {
        let numbers = (
            snap.status(),
            snap.store().usage(),
            snap.exceptions().completed_count(),
            snap.invalid_reason(),
        );
        VolumeInfo::snapshot(entry, snap.size(), path, Some(numbers))
    }
}

struct ActiveSnapshot {
    entry: SnapshotEntry,
    snap: Arc<Snapshot>,
}

struct Inner {
    pool: Pool,
    origins: BTreeMap<String, Arc<Origin>>,
    snapshots: BTreeMap<String, ActiveSnapshot>,
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
            .finish()
    }
}

fn open_snapshot(pool: &Pool, origin: &Origin, entry: &SnapshotEntry) -> Result<Arc<Snapshot>> {
    let cow = pool.open_cow(&pool.resolve(&entry.cow))?;
    let kind = entry.store_kind()?;
    let store = PersistentStore::open(cow, Some(entry.chunk_size()?), kind.overflow_allowed())?;
    Snapshot::load(origin, Arc::new(store))
}

impl ActivePool {
    /// Opens every origin and loads and activates every snapshot of `pool`. Transient
    /// snapshots did not survive the process that made them: they are removed from the
    /// manifest, each with a warning. Returns the pool and the warnings.
    pub fn activate(mut pool: Pool, copier: Arc<Copier>) -> Result<(ActivePool, Vec<String>)> {
        let mut warnings = Vec::new();
        let transient: Vec<String> = pool
            .manifest()
            .snapshots
            .iter()
            .filter(|s| s.store == "N")
            .map(|s| s.name.clone())
            .collect();
        for name in transient {
            pool.remove_snapshot(&name)?;
            warnings.push(format!(
                "transient snapshot {name:?} was lost when the process holding it stopped; removed"
            ));
        }
        let mut origins = BTreeMap::new();
        for o in &pool.manifest().origins {
            let dev: Arc<dyn BlockDevice> =
                Arc::new(pool.open_volume_file(&pool.resolve(&o.path))?);
            origins.insert(o.name.clone(), Origin::new(dev, copier.clone()));
        }
        let mut snapshots = BTreeMap::new();
        for s in &pool.manifest().snapshots {
            let origin = origins.get(&s.origin).ok_or_else(|| {
                Error::InvalidArgument(format!("snapshot {:?}: unknown origin", s.name))
            })?;
            let snap = open_snapshot(&pool, origin, s).map_err(|e| {
                Error::InvalidArgument(format!("cannot load snapshot {:?}: {e}", s.name))
            })?;
            origin.activate(&snap)?;
            snapshots.insert(
                s.name.clone(),
                ActiveSnapshot {
                    entry: s.clone(),
                    snap,
                },
            );
        }
        Ok((
            ActivePool {
                inner: Mutex::new(Inner {
                    pool,
                    origins,
                    snapshots,
                }),
                copier,
            },
            warnings,
        ))
    }

    /// The copier shared by the pool's origins.
    pub fn copier(&self) -> &Arc<Copier> {
        &self.copier
    }

    /// The names of every volume, origins first.
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

    /// Creates a snapshot live. Returns its status and a warning when the COW header's
    /// chunk size overrode the one asked for.
    pub fn create_snapshot(&self, req: &SnapshotRequest) -> Result<(VolumeInfo, Option<String>)> {
        let mut inner = self.inner.lock();
        let origin = inner.origins.get(&req.origin).cloned().ok_or_else(|| {
            Error::InvalidArgument(format!("no origin called {:?} in this pool", req.origin))
        })?;
        let (entry, store, warning) = inner.pool.prepare_snapshot(req)?;
        let discard = |inner: &Inner, e: Error| {
            if entry.owned {
                let _ = std::fs::remove_file(inner.pool.resolve(&entry.cow));
            }
            e
        };
        let snap = match Snapshot::load(&origin, store as Arc<dyn ExceptionStore>) {
            Ok(s) => s,
            Err(e) => return Err(discard(&inner, e)),
        };
        if let Err(e) = origin.activate(&snap) {
            return Err(discard(&inner, e));
        }
        let mut next = inner.pool.manifest().clone();
        next.snapshots.push(entry.clone());
        if let Err(e) = inner.pool.commit(next) {
            let _ = origin.deactivate(&snap);
            return Err(discard(&inner, e));
        }
        inner.snapshots.insert(
            entry.name.clone(),
            ActiveSnapshot {
                entry: entry.clone(),
                snap,
            },
        );
        let info = info_of(&inner, &entry.name).ok_or_else(|| Error::Busy("vanished".into()))?;
        Ok((info, warning))
    }

    /// Removes a snapshot live: deactivates it (its I/O fails from now on), drops it from
    /// the manifest and deletes its COW file if the pool created it.
    pub fn remove_snapshot(&self, name: &str) -> Result<()> {
        let mut inner = self.inner.lock();
        let active = inner
            .snapshots
            .remove(name)
            .ok_or_else(|| Error::InvalidArgument(format!("no snapshot called {name:?}")))?;
        if let Some(origin) = inner.origins.get(&active.entry.origin) {
            let _ = origin.deactivate(&active.snap);
        }
        inner.pool.remove_snapshot(name)?;
        Ok(())
    }

    /// Status of one volume.
    pub fn info(&self, name: &str) -> Option<VolumeInfo> {
        info_of(&self.inner.lock(), name)
    }

    /// Status of every volume, origins first.
    pub fn list(&self) -> Vec<VolumeInfo> {
        let inner = self.inner.lock();
        inner
            .origins
            .keys()
            .chain(inner.snapshots.keys())
            .filter_map(|n| info_of(&inner, n))
            .collect()
    }

    /// Flushes every origin and snapshot COW.
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
}

fn info_of(inner: &Inner, name: &str) -> Option<VolumeInfo> {
    if let Some(o) = inner.origins.get(name) {
        let entry = inner.pool.manifest().origin(name)?;
        return Some(VolumeInfo::origin(
            name,
            o.size(),
            &inner.pool.resolve(&entry.path),
        ));
    }
    let s = inner.snapshots.get(name)?;
    Some(VolumeInfo::of_snapshot(
        &s.entry,
        &inner.pool.resolve(&s.entry.cow),
        &s.snap,
    ))
}

/// Status of every volume of a pool that no process holds: origins opened read-only,
/// snapshots loaded (not activated) to read their usage.
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
        let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open_read_only(&path)?);
        if wanted(&o.name) {
            out.push(VolumeInfo::origin(&o.name, dev.size(), &path));
        }
        origins.insert(o.name.clone(), Origin::new(dev, copier.clone()));
    }
    for s in snapshots {
        let origin = origins.get(&s.origin).ok_or_else(|| {
            Error::InvalidArgument(format!("snapshot {:?}: unknown origin", s.name))
        })?;
        let path = pool.resolve(&s.cow);
        if s.store == "N" {
            out.push(VolumeInfo::snapshot(s, origin.size(), &path, None));
            continue;
        }
        let cow: Arc<dyn BlockDevice> = Arc::new(FileDevice::open_read_only(&path)?);
        let store = PersistentStore::open(
            cow,
            Some(s.chunk_size()?),
            s.store_kind()?.overflow_allowed(),
        )?;
        if store.is_fresh() {
            // A zeroed COW: the daemon will format it; a fresh store holds the header and
            // one metadata area, as the kernel counts them.
            let two = 2 * store.chunk_size().sectors();
            let usage = Usage {
                allocated_sectors: two,
                total_sectors: store.usage().total_sectors,
                metadata_sectors: two,
            };
            let numbers = (SnapshotStatus::Usage(usage), usage, 0, None);
            out.push(VolumeInfo::snapshot(s, origin.size(), &path, Some(numbers)));
            continue;
        }
        let snap = Snapshot::load(origin, Arc::new(store))?;
        out.push(VolumeInfo::of_snapshot(s, &path, &snap));
    }
    Ok(out)
}
