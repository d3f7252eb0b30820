//! Pools: named origins and snapshots kept as image files in one directory.
//!
//! A pool is the embedded default back end: a directory holding `pool.json` (the table of
//! volumes, see [`manifest`]), the origin images it created, and the snapshots' COW files.
//! [`Pool`] changes the table offline (no daemon); [`ActivePool`] is the table brought to
//! life, every origin an [`Origin`](crate::target::Origin) and every snapshot an activated
//! [`Snapshot`](crate::target::Snapshot), changed live while clients do I/O. One process
//! at a time holds a pool, through [`PoolLock`].

mod active;
pub mod manifest;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use active::{ActivePool, VolumeInfo, VolumeKind};
use manifest::{check_name, Manifest, OriginEntry, SnapshotEntry, MANIFEST};

use crate::dev::{BlockDevice, FileDevice, PrezeroDevice};
use crate::error::{Error, Result};
use crate::exception::persistent::PersistentStore;
use crate::exception::ExceptionStore;
use crate::units::{is_sector_aligned, ChunkSize};

/// Where a new snapshot's COW comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CowSpec {
    /// A new sparse file of this many bytes inside the pool.
    Size(u64),
    /// An existing file or device: a COW written by the kernel (or by cowsnap) keeps its
    /// exceptions and its chunk size; a zeroed one is formatted.
    Path(PathBuf),
}

/// A request to create a snapshot.
#[derive(Clone, Debug)]
pub struct SnapshotRequest {
    /// Snapshot name.
    pub name: String,
    /// Origin name.
    pub origin: String,
    /// The COW.
    pub cow: CowSpec,
    /// Chunk size; a formatted COW's header wins. Default 4 KiB.
    pub chunk_size: Option<ChunkSize>,
    /// Transient store (`N`): exceptions only in the daemon's memory.
    pub transient: bool,
    /// `PO`: a full COW on a snapshot write overflows instead of invalidating.
    pub overflow: bool,
}

/// The default chunk size of new snapshots: 4 KiB, as lvm2's.
pub const DEFAULT_CHUNK: ChunkSize = ChunkSize::MIN;

/// A pool directory and its manifest, changed offline.
#[derive(Debug)]
pub struct Pool {
    dir: PathBuf,
    manifest: Manifest,
    /// Open volumes with `O_DIRECT` (a runtime choice, not recorded in the manifest).
    direct: bool,
}

impl Pool {
    /// Creates a pool in `dir` (made if missing). Refuses a directory that already has one.
    pub fn init(dir: &Path) -> Result<Pool> {
        fs::create_dir_all(dir).map_err(|e| Error::io("mkdir", 0, dir.display().to_string(), e))?;
        if dir.join(MANIFEST).exists() {
            return Err(Error::Busy(format!(
                "{} already holds a cowsnap pool",
                dir.display()
            )));
        }
        let manifest = Manifest::new();
        manifest.store(dir)?;
        Ok(Pool {
            dir: dir.to_path_buf(),
            manifest,
            direct: false,
        })
    }

    /// Opens the pool in `dir`.
    pub fn open(dir: &Path) -> Result<Pool> {
        Ok(Pool {
            manifest: Manifest::load(dir)?,
            dir: dir.to_path_buf(),
            direct: false,
        })
    }

    /// From now on, open origin images and COW files with `O_DIRECT` (bypassing the page
    /// cache), as `qemu-nbd --cache=none` does.
    pub fn set_direct(&mut self, direct: bool) {
        self.direct = direct;
    }

    /// Opens a volume file for I/O, direct or not as the pool is set.
    pub(crate) fn open_volume_file(&self, path: &Path) -> Result<FileDevice> {
        if self.direct {
            FileDevice::open_direct(path)
        } else {
            FileDevice::open(path)
        }
    }

    /// Opens a COW file or device for a store. A regular file is wrapped in a
    /// [`PrezeroDevice`]: its space was reserved with `fallocate` (unwritten extents), and
    /// copy-outs land in written blocks when zeros go ahead of them.
    pub(crate) fn open_cow(&self, path: &Path) -> Result<Arc<dyn BlockDevice>> {
        let dev = self.open_volume_file(path)?;
        Ok(if dev.is_regular() {
            let end = dev.data_end();
            Arc::new(PrezeroDevice::new(dev, end))
        } else {
            Arc::new(dev)
        })
    }

    /// The pool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The table of volumes.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// A manifest path made absolute (relative paths are inside the pool).
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        check_name(name)?;
        if self.manifest.has_volume(name) {
            return Err(Error::Busy(format!(
                "a volume called {name:?} already exists"
            )));
        }
        Ok(())
    }

    fn commit(&mut self, next: Manifest) -> Result<()> {
        next.store(&self.dir)?;
        self.manifest = next;
        Ok(())
    }

    /// Creates a new sparse origin image `NAME.img` of `size` bytes inside the pool.
    pub fn create_origin(&mut self, name: &str, size: u64) -> Result<OriginEntry> {
        self.check_new_name(name)?;
        if size == 0 || !is_sector_aligned(size) {
            return Err(Error::InvalidArgument(format!(
                "origin size {size} must be a positive multiple of 512 bytes"
            )));
        }
        let rel = PathBuf::from(format!("{name}.img"));
        let path = self.dir.join(&rel);
        create_new_sparse(&path, size)?;
        let entry = OriginEntry {
            name: name.into(),
            path: rel,
            owned: true,
        };
        let mut next = self.manifest.clone();
        next.origins.push(entry.clone());
        if let Err(e) = self.commit(next) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(entry)
    }

    /// Adds an existing image file or block device as an origin (not owned: removing it
    /// from the pool never deletes it).
    pub fn add_origin(&mut self, name: &str, path: &Path) -> Result<OriginEntry> {
        self.check_new_name(name)?;
        let abs = fs::canonicalize(path)
            .map_err(|e| Error::io("open", 0, path.display().to_string(), e))?;
        // Opening it checks that it is readable, writable and sector-sized.
        FileDevice::open(&abs)?;
        if self
            .manifest
            .origins
            .iter()
            .any(|o| self.resolve(&o.path) == abs)
        {
            return Err(Error::Busy(format!(
                "{} is already an origin of this pool",
                abs.display()
            )));
        }
        let entry = OriginEntry {
            name: name.into(),
            path: abs,
            owned: false,
        };
        let mut next = self.manifest.clone();
        next.origins.push(entry.clone());
        self.commit(next)?;
        Ok(entry)
    }

    /// Creates or adopts the COW of a new snapshot and opens its store, without adding it to
    /// the manifest. Returns the entry, the store, and a warning when a formatted COW's
    /// chunk size overrode the one asked for.
    pub(crate) fn prepare_snapshot(
        &self,
        req: &SnapshotRequest,
    ) -> Result<(SnapshotEntry, Arc<dyn ExceptionStore>, Option<String>)> {
        self.check_new_name(&req.name)?;
        let origin = self.manifest.origin(&req.origin).ok_or_else(|| {
            Error::InvalidArgument(format!("no origin called {:?} in this pool", req.origin))
        })?;
        let origin_path = self.resolve(&origin.path);
        let chunk = req.chunk_size.unwrap_or(DEFAULT_CHUNK);
        let min_chunks = if req.transient { 1 } else { 3 };
        let (rel, owned) = match &req.cow {
            CowSpec::Size(size) => {
                if *size < min_chunks * chunk.bytes() || !is_sector_aligned(*size) {
                    return Err(Error::InvalidArgument(format!(
                        "COW size {size} is too small: at least {min_chunks} chunks of {chunk} and a multiple of 512"
                    )));
                }
                let rel = PathBuf::from(format!("{}.cow", req.name));
                create_new_reserved(&self.dir.join(&rel), *size)?;
                (rel, true)
            }
            CowSpec::Path(p) => {
                let abs = fs::canonicalize(p)
                    .map_err(|e| Error::io("open", 0, p.display().to_string(), e))?;
                let taken =
                    abs == fs::canonicalize(&origin_path).unwrap_or_default()
                        || self.manifest.snapshots.iter().any(|s| {
                            fs::canonicalize(self.resolve(&s.cow)).ok() == Some(abs.clone())
                        })
                        || self.manifest.origins.iter().any(|o| {
                            fs::canonicalize(self.resolve(&o.path)).ok() == Some(abs.clone())
                        });
                if taken {
                    return Err(Error::Busy(format!(
                        "{} is already used by this pool (an origin or another snapshot's COW)",
                        abs.display()
                    )));
                }
                (abs, false)
            }
        };
        let cow_path = self.resolve(&rel);
        let cleanup = |e: Error| {
            if owned {
                let _ = fs::remove_file(&cow_path);
            }
            e
        };
        let cow = self.open_cow(&cow_path).map_err(cleanup)?;
        let (store, warning, chunk): (Arc<dyn ExceptionStore>, _, _) = if req.transient {
            let store = crate::exception::TransientStore::new(cow, chunk);
            (Arc::new(store), None, chunk)
        } else {
            let store = PersistentStore::open(cow, Some(chunk), req.overflow).map_err(cleanup)?;
            let warning = store.overridden_chunk_size().map(|asked| {
                format!(
                    "{}: the COW header's chunk size {} overrides the {} asked for",
                    cow_path.display(),
                    store.chunk_size(),
                    asked
                )
            });
            let chunk = store.chunk_size();
            (Arc::new(store), warning, chunk)
        };
        let kind = store.kind();
        Ok((
            SnapshotEntry {
                name: req.name.clone(),
                origin: req.origin.clone(),
                cow: rel,
                store: kind.to_string(),
                chunk_sectors: chunk.sectors(),
                owned,
            },
            store,
            warning,
        ))
    }

    /// Creates a snapshot offline: its point in time is the origin image as it is now.
    /// Transient snapshots need a running daemon and are refused here.
    pub fn create_snapshot(
        &mut self,
        req: &SnapshotRequest,
    ) -> Result<(SnapshotEntry, Option<String>)> {
        if req.transient {
            return Err(Error::InvalidArgument(
                "a transient snapshot lives only in a running daemon: start `cowsnap serve` first"
                    .into(),
            ));
        }
        let (entry, store, warning) = self.prepare_snapshot(req)?;
        // Load once: formats a fresh COW and validates an adopted one.
        let origin_size = FileDevice::open(
            self.resolve(
                &self
                    .manifest
                    .origin(&req.origin)
                    .map(|o| o.path.clone())
                    .unwrap_or_default(),
            ),
        )?
        .size();
        let origin_chunks = store.chunk_size().chunks_covering(origin_size);
        let loaded = store.load(&mut |e| {
            if e.old.0 >= origin_chunks {
                return Err(Error::Corrupt {
                    device: store.cow().describe(),
                    offset: 0,
                    reason: format!("exception for origin chunk {} beyond the origin", e.old),
                });
            }
            Ok(())
        });
        if let Err(e) = loaded {
            if entry.owned {
                let _ = fs::remove_file(self.resolve(&entry.cow));
            }
            return Err(e);
        }
        let mut next = self.manifest.clone();
        next.snapshots.push(entry.clone());
        self.commit(next)?;
        Ok((entry, warning))
    }

    /// Status of every volume, or only of the volume `only`, read from the files without
    /// activating anything (no daemon runs); only the metadata of the snapshots shown is
    /// loaded. Transient snapshots show as invalid: their store died with the process that
    /// held it.
    pub fn list_offline(
        &self,
        copier: Arc<crate::copy::Copier>,
        only: Option<&str>,
    ) -> Result<Vec<VolumeInfo>> {
        active::list_offline(self, copier, only)
    }

    /// Removes a snapshot from the pool, deleting its COW file if the pool created it.
    pub fn remove_snapshot(&mut self, name: &str) -> Result<SnapshotEntry> {
        let entry = self
            .manifest
            .snapshot(name)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("no snapshot called {name:?}")))?;
        let mut next = self.manifest.clone();
        next.snapshots.retain(|s| s.name != name);
        self.commit(next)?;
        if entry.owned {
            let _ = fs::remove_file(self.resolve(&entry.cow));
        }
        Ok(entry)
    }
}

fn create_new_sparse(path: &Path, size: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io("create", 0, path.display().to_string(), e))?;
    f.set_len(size)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io("truncate", size, path.display().to_string(), e))
}

/// Creates a COW file of `size` bytes with its space reserved (`fallocate`), as an LVM COW
/// volume is: the snapshot never fails later because the host file system filled up, and
/// copy-outs write into allocated blocks. Where the file system cannot reserve space the
/// file stays sparse.
fn create_new_reserved(path: &Path, size: u64) -> Result<()> {
    create_new_sparse(path, size)?;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", 0, path.display().to_string(), e))?;
    match rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        Err(e) => {
            let _ = fs::remove_file(path);
            Err(Error::io(
                "reserve space for",
                0,
                path.display().to_string(),
                e.into(),
            ))
        }
    }
}

/// The exclusive hold of a pool by one process (a daemon, or a command acting on the files).
///
/// It is an advisory `flock` on `DIR/daemon.lock`, released when dropped or when the
/// process dies; the file holds the holder's pid for error messages.
#[derive(Debug)]
pub struct PoolLock {
    _file: fs::File,
}

impl PoolLock {
    /// Takes the lock, or fails at once naming the holder.
    pub fn acquire(dir: &Path) -> Result<PoolLock> {
        let path = dir.join("daemon.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("open", 0, path.display().to_string(), e))?;
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(Error::Busy(format!(
                "pool {} is in use by another cowsnap process (pid {})",
                dir.display(),
                pid.trim()
            )));
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        Ok(PoolLock { _file: file })
    }
}

#[cfg(test)]
mod tests;
