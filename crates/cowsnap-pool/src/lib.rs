//! cowsnap-pool: named origins and snapshots kept as image files in one directory, and
//! their table.
//!
//! **What a pool is.** The embedded default back end of the `cowsnap` command and daemon:
//! a private directory (mode 0700) holding `pool.json` (the table of volumes, see
//! [`manifest`]), the origin images it created, and the snapshots' COW files (mode 0600).
//! [`Pool`] changes the table offline (no daemon); [`ActivePool`] is the table brought to
//! life on the `cowsnap-core` engine, every origin an
//! [`Origin`](cowsnap_core::targets::Origin) and every snapshot an activated
//! [`Snapshot`](cowsnap_core::targets::Snapshot), changed live while clients do I/O. One
//! process at a time holds a pool, through [`PoolLock`].
//!
//! **What it is not.** Not the engine: copy-out, exception stores, the on-disk COW format
//! and file identity ([`FileId`], exclusive claims) are `cowsnap-core`'s, which works on
//! any block devices and knows nothing of names, JSON or directories. Not a front end
//! either: NBD, FUSE and the CLI look volumes up here and serve them elsewhere.
//!
//! **Control-plane crash rules.** Every change is ordered so that a crash at any step
//! leaves either the old pool or the new one (see ARCHITECTURE.md, "Control plane"):
//! * files the pool owns are created and deleted under staged names (the `staging` module), so a
//!   name is never blocked by a leftover;
//! * a snapshot's removal first commits the manifest with the snapshot marked `removing`
//!   while the snapshot still takes copy-outs; from then on no process activates it again,
//!   so no crash can bring back a snapshot that missed copy-outs. An adopted COW is then
//!   marked invalid on disk before the entry goes, so it cannot be re-adopted as a valid
//!   point in time either;
//! * files are identified by [`FileId`], never by path: a COW that is the origin (or
//!   another volume) under another name is refused at create and at every start;
//! * the pool formats only COW files it created itself, or a zeroed file the user asked to
//!   format; a pool COW with a damaged header fails its snapshot, never reformats it.
//!
//! Steps that change the manifest or a COW call [`crash_point`], which aborts the process
//! when `COWSNAP_CRASH_AT` names the step: the daemon crash tests use it to stop at every
//! step in turn.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod active;
pub mod manifest;
mod stack;
mod staging;

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use active::{ActivePool, MergeAction, MergeInfo, VolumeInfo, VolumeKind};
use manifest::{check_name, Manifest, MergeRecord, OriginEntry, SnapshotEntry, MANIFEST};
pub use stack::{BuiltLayer, LayerInfo, LayerRequest};
use stack::{RunningStack, StagedLayers};

use cowsnap_core::dev::{BlockDevice, FileDevice, FileId, PrezeroDevice};
use cowsnap_core::error::{Error, Result};
use cowsnap_core::exception::index::{PageCache, Tuning, DEFAULT_CACHE_BYTES};
use cowsnap_core::exception::persistent::validate::{self, Bounds};
use cowsnap_core::exception::persistent::PersistentStore;
use cowsnap_core::exception::{ExceptionStore, IndexConfig};
use cowsnap_core::mutation;
use cowsnap_core::units::{is_sector_aligned, ChunkSize};

/// Where a new snapshot's COW comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CowSpec {
    /// A new file of this many bytes inside the pool, its space reserved; capped at what
    /// the origin can ever need ([`max_cow_bytes`]).
    Size(u64),
    /// A new file of this percentage of the origin's size (`lvcreate -l 20%ORIGIN`), capped
    /// the same way.
    PercentOfOrigin(u64),
    /// An existing file or device: a COW written by the kernel (or by cowsnap) keeps its
    /// exceptions and its chunk size. One without a COW header is refused unless `format`
    /// is set and it is all zeros.
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
    /// Chunk size asked for. `None`: an adopted COW's header's, else
    /// [`ChunkSize::DEFAULT`]. A formatted COW's header wins over one asked for, with a
    /// warning when they differ.
    pub chunk_size: Option<ChunkSize>,
    /// Transient store (`N`): exceptions only in the daemon's memory.
    pub transient: bool,
    /// `PO`: a full COW on a snapshot write overflows instead of invalidating.
    pub overflow: bool,
    /// Format an adopted COW that has no header, if it is all zeros.
    pub format: bool,
    /// Layers between the COW file and the store, bottom first.
    pub cow_layers: Vec<LayerRequest>,
}

/// The environment variable naming a [`crash_point`] at which to abort (tests only).
pub const CRASH_AT_ENV: &str = "COWSNAP_CRASH_AT";

/// Every control-plane step [`crash_point`] knows, in the order each operation reaches
/// them. `create-snapshot:*` are the steps of a snapshot create with a COW file the pool
/// makes (a `--format` adoption goes through `adopt-format:guarded` and the same steps
/// from `loaded` on), `remove-snapshot:*` those of a removal of such a snapshot.
pub const CRASH_POINTS: &[&str] = &[
    "create-origin:staged",
    "create-origin:committed",
    "create-snapshot:staged",
    "adopt-format:guarded",
    "create-snapshot:loaded",
    "create-snapshot:activated",
    "create-snapshot:committed",
    "create-snapshot:published",
    "remove-snapshot:marked",
    "remove-snapshot:deactivated",
    "remove-snapshot:invalidated",
    "remove-snapshot:staged",
    "remove-snapshot:committed",
    "remove-snapshot:unlinked",
    "merge-snapshot:recorded",
    "merge-snapshot:switched",
    "add-layer:staged",
    "add-layer:committed",
    "remove-layer:staged",
    "remove-layer:committed",
];

/// A control-plane step: aborts the process here when `COWSNAP_CRASH_AT` names `step`
/// (the crash tests' hook; without the variable it does nothing).
pub fn crash_point(step: &'static str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var(CRASH_AT_ENV).ok());
    if at.as_deref() == Some(step) {
        eprintln!("cowsnap: {CRASH_AT_ENV}={step}: aborting here");
        std::process::abort();
    }
}

/// A pool directory and its manifest, changed offline.
#[derive(Debug)]
pub struct Pool {
    dir: PathBuf,
    manifest: Manifest,
    /// Open volumes with `O_DIRECT` (a runtime choice, not recorded in the manifest).
    direct: bool,
    /// What [`Pool::open`] settled and noticed, for the caller to report.
    notes: Vec<String>,
    /// The exception indexes' page cache, shared by every snapshot of the pool.
    cache: Arc<PageCache>,
    /// The layers of every stack built by this process, by volume (`dmsetup message`
    /// reaches them here).
    running: parking_lot::Mutex<std::collections::BTreeMap<String, RunningStack>>,
}

/// The directory under a pool holding each persistent snapshot's exception index.
pub const INDEX_DIR: &str = "index";

/// The identity an index records for its COW: the file's device and inode (or the block
/// device's number), so that an index is never used for another file.
fn index_identity(id: Option<FileId>) -> u64 {
    match id {
        Some(FileId::File { dev, ino }) => dev.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ino,
        Some(FileId::Block { rdev }) => rdev ^ (1 << 63),
        None => 0,
    }
}

impl Pool {
    /// Creates a pool in `dir` (made if missing, mode 0700). Refuses a directory that
    /// already has one.
    pub fn init(dir: &Path) -> Result<Pool> {
        fs::create_dir_all(dir).map_err(|e| Error::io("mkdir", 0, dir.display().to_string(), e))?;
        if dir.join(MANIFEST).exists() {
            return Err(Error::Exists(format!(
                "{} already holds a cowsnap pool",
                dir.display()
            )));
        }
        // The pool settles files by name in its directory: it must be its own.
        let empty = fs::read_dir(dir)
            .map_err(|e| Error::io("read", 0, dir.display().to_string(), e))?
            .next()
            .is_none();
        if !empty {
            return Err(Error::InvalidArgument(format!(
                "{} is not empty: a pool needs a directory of its own (give a new or empty one)",
                dir.display()
            )));
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("chmod 0700", 0, dir.display().to_string(), e))?;
        let manifest = Manifest::new();
        manifest.store(dir)?;
        Ok(Pool {
            dir: dir.to_path_buf(),
            manifest,
            direct: false,
            notes: Vec::new(),
            cache: default_cache(),
            running: parking_lot::Mutex::default(),
        })
    }

    /// Opens the pool in `dir`. The caller holds the [`PoolLock`]: this settles what an
    /// interrupted create or remove left (staged files, snapshots marked `removing`); the
    /// messages are in [`notes`](Self::notes).
    pub fn open(dir: &Path) -> Result<Pool> {
        let mut pool = Pool {
            manifest: Manifest::load(dir)?,
            dir: dir.to_path_buf(),
            direct: false,
            notes: Vec::new(),
            cache: default_cache(),
            running: parking_lot::Mutex::default(),
        };
        pool.notes = staging::recover(dir, &pool.manifest)?;
        pool.remove_stale_indexes();
        // A removal that cannot finish now stays marked: its snapshot is never activated,
        // and the next open (or a `snapshot remove`) tries again.
        let removing: Vec<String> = pool
            .manifest
            .snapshots
            .iter()
            .filter(|s| s.removing)
            .map(|s| s.name.clone())
            .collect();
        for name in removing {
            match pool.finish_removal(&name, None) {
                Ok(mut notes) => {
                    pool.notes
                        .push(format!("snapshot {name:?}: finished its interrupted removal"));
                    pool.notes.append(&mut notes);
                }
                Err(e) => pool.notes.push(format!(
                    "snapshot {name:?}: its interrupted removal could not finish ({e}); it stays out of service until it does"
                )),
            }
        }
        pool.notes.extend(permission_warnings(&pool));
        Ok(pool)
    }

    /// Messages from [`open`](Self::open) (leftovers settled, removals finished, files
    /// other users can read) and from later changes that committed but left a file to
    /// settle.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// From now on, open origin images and COW files with `O_DIRECT` (bypassing the page
    /// cache), as `qemu-nbd --cache=none` does.
    pub fn set_direct(&mut self, direct: bool) {
        self.direct = direct;
    }

    /// Opens a volume file for I/O, exclusively (see [`FileDevice::open_exclusive`]), direct
    /// or not as the pool is set, and checks that it is the file `expected` when given.
    pub(crate) fn open_volume_file(
        &self,
        path: &Path,
        expected: Option<FileId>,
    ) -> Result<FileDevice> {
        self.open_volume_file_with(path, expected, false)
    }

    /// [`open_volume_file`](Self::open_volume_file); with `sync`, for a file whose write
    /// errors must come from the write that failed (under a `bbr` layer, and its spare
    /// file): `O_DIRECT | O_DSYNC` ([`FileDevice::open_exclusive_sync`]).
    pub(crate) fn open_volume_file_with(
        &self,
        path: &Path,
        expected: Option<FileId>,
        sync: bool,
    ) -> Result<FileDevice> {
        let dev = if sync {
            FileDevice::open_exclusive_sync(path)?
        } else {
            FileDevice::open_exclusive(path, self.direct)?
        };
        let id = dev.id()?;
        if let Some(want) = expected {
            if want != id {
                return Err(Error::Replaced(format!(
                    "{} is not the file this pool took ({want}); it is {id}: the file was replaced behind the pool's back. Put the original back, or remove the volume",
                    path.display()
                )));
            }
        }
        Ok(dev)
    }

    /// Opens a COW file or device for a store. A regular file is wrapped in a
    /// [`PrezeroDevice`]: its space was reserved with `fallocate` (unwritten extents), and
    /// copy-outs land in written blocks when zeros go ahead of them.
    pub(crate) fn open_cow(
        &self,
        path: &Path,
        expected: Option<FileId>,
    ) -> Result<Arc<dyn BlockDevice>> {
        let dev = self.open_volume_file(path, expected)?;
        Ok(cow_device(dev))
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
            return Err(Error::Exists(format!(
                "a volume called {name:?} already exists"
            )));
        }
        Ok(())
    }

    pub(crate) fn commit(&mut self, next: Manifest) -> Result<()> {
        next.store(&self.dir)?;
        self.manifest = next;
        Ok(())
    }

    /// Every volume file of the pool with its id (from the manifest, or from the file
    /// where a version 1 manifest recorded none), for alias checks.
    fn volume_ids(&self) -> Vec<(String, FileId)> {
        let id = |path: &Path, recorded: Option<FileId>| {
            recorded.or_else(|| FileId::of_path(&self.resolve(path)).ok())
        };
        self.manifest
            .origins
            .iter()
            .filter_map(|o| id(&o.path, o.id).map(|i| (format!("origin {:?}", o.name), i)))
            .chain(self.manifest.snapshots.iter().filter_map(|s| {
                id(&s.cow, s.id).map(|i| (format!("the COW of snapshot {:?}", s.name), i))
            }))
            .chain(self.manifest.bbr_layers().filter_map(|(v, b)| {
                id(&b.spares, b.id).map(|i| (format!("the bbr spare file of {v:?}"), i))
            }))
            .collect()
    }

    /// Refuses a file that is already a volume of this pool under any name.
    fn check_not_in_pool(&self, path: &Path, id: FileId) -> Result<()> {
        let in_pool = fs::canonicalize(&self.dir).is_ok_and(|d| path.parent() == Some(&d));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if in_pool
            && name.is_some_and(|n| {
                n.starts_with('.')
                    || n == MANIFEST
                    || n == "daemon.lock"
                    || n.ends_with(".spares")
                    || n.ends_with(".unreadable")
            })
        {
            return Err(Error::InvalidArgument(format!(
                "{} is one of the pool's own files: keep adopted files outside the pool directory",
                path.display()
            )));
        }
        let mine = id.with_backing();
        let taken = self
            .volume_ids()
            .into_iter()
            .find(|(_, i)| i.with_backing().iter().any(|v| mine.contains(v)));
        if let Some((what, _)) = taken {
            return Err(Error::SameFile(format!(
                "{} is already used by this pool: it is {what} ({id}), under this or another name; a volume file can serve one volume only",
                path.display()
            )));
        }
        Ok(())
    }

    /// Creates a new sparse origin image `NAME.img` of `size` bytes inside the pool, with
    /// the stack of `layers` (bottom first) between the image and the origin.
    pub fn create_origin(
        &mut self,
        name: &str,
        size: u64,
        layers: &[LayerRequest],
    ) -> Result<OriginEntry> {
        self.check_new_name(name)?;
        if size == 0 || !is_sector_aligned(size) {
            return Err(Error::InvalidArgument(format!(
                "origin size {size} must be a positive multiple of 512 bytes"
            )));
        }
        let rel = PathBuf::from(format!("{name}.img"));
        let file = staging::NewFile::create(&self.dir.join(&rel), size, false)?;
        crash_point("create-origin:staged");
        let (layers, staged) = self.stage_layers(name, true, size, &[], layers)?;
        let entry = OriginEntry {
            name: name.into(),
            path: rel,
            owned: true,
            id: Some(file.id()),
            layers,
        };
        let mut next = self.manifest.clone();
        next.origins.push(entry.clone());
        self.commit(next)?;
        crash_point("create-origin:committed");
        // Committed: the origin exists. A failed rename is settled by the next open.
        if let Err(e) = file.publish() {
            self.notes
                .push(format!("{e}: the next start of the pool finishes it"));
        }
        self.notes.extend(staged.publish());
        Ok(entry)
    }

    /// Adds an existing image file or block device as an origin (not owned: removing it
    /// from the pool never deletes it). Refused when the file is already a volume of the
    /// pool under any name, or in use by another program.
    pub fn add_origin(
        &mut self,
        name: &str,
        path: &Path,
        layers: &[LayerRequest],
    ) -> Result<OriginEntry> {
        self.check_new_name(name)?;
        let abs = fs::canonicalize(path)
            .map_err(|e| Error::io("open", 0, path.display().to_string(), e))?;
        let id = FileId::of_path(&abs)?;
        self.check_not_in_pool(&abs, id)?;
        // Opening it checks that it is readable, writable, sector-sized and not in use.
        let dev = FileDevice::open_exclusive(&abs, false)?;
        if dev.id()? != id {
            return Err(Error::Replaced(format!(
                "{} changed while it was being added; try again",
                abs.display()
            )));
        }
        let (layers, staged) = self.stage_layers(name, true, dev.size(), &[], layers)?;
        drop(dev);
        let entry = OriginEntry {
            name: name.into(),
            path: abs,
            owned: false,
            id: Some(id),
            layers,
        };
        let mut next = self.manifest.clone();
        next.origins.push(entry.clone());
        self.commit(next)?;
        self.notes.extend(staged.publish());
        Ok(entry)
    }

    /// Makes or adopts the COW of a new snapshot and opens its store, without adding it to
    /// the manifest. A COW the pool makes is a [`staging::NewFile`] until committed.
    fn prepare_snapshot(&self, req: &SnapshotRequest) -> Result<Prepared> {
        self.check_new_name(&req.name)?;
        // An index left by an earlier snapshot of this name is never trusted.
        if let Some(why) = self.remove_index(&req.name) {
            return Err(Error::WrongState(why));
        }
        if self.manifest.origin(&req.origin).is_none() {
            return Err(Error::InvalidArgument(format!(
                "no origin called {:?} in this pool",
                req.origin
            )));
        }
        // A new COW's chunk size: what an adopted one has is known only once it is open.
        let chunk = req.chunk_size.unwrap_or(ChunkSize::DEFAULT);
        let min_chunks = if req.transient { 1 } else { 3 };
        let mut notes = Vec::new();
        let (rel, new_file, id, cow) = match &req.cow {
            CowSpec::Size(_) | CowSpec::PercentOfOrigin(_) => {
                let (rel, file, cow) = self.new_cow_file(req, chunk, min_chunks, &mut notes)?;
                (rel, Some(file), None, cow)
            }
            CowSpec::Path(p) => {
                let abs = fs::canonicalize(p)
                    .map_err(|e| Error::io("open", 0, p.display().to_string(), e))?;
                let id = FileId::of_path(&abs)?;
                self.check_not_in_pool(&abs, id)?;
                let dev = self.open_volume_file(&abs, Some(id))?;
                if req.transient && !req.format {
                    return Err(Error::InvalidArgument(format!(
                        "a transient store writes over {} from its first byte: add --format to allow it (the whole file must be zeros)",
                        abs.display()
                    )));
                }
                if req.format && !dev.is_zeroed()? {
                    return Err(Error::InvalidArgument(format!(
                        "{} is not all zeros: --format refuses to overwrite data. Zero it first, or give --cow-size to let the pool make a COW file",
                        abs.display()
                    )));
                }
                (abs, None, Some(id), cow_device(dev))
            }
        };
        let (cow_layers, staged_layers) =
            self.stage_layers(&req.name, false, cow.size(), &[], &req.cow_layers)?;
        let (cow, _) = self.build_stack(&req.name, cow, &cow_layers, &mut HashMap::new())?;
        let (store, warning, chunk): (Arc<dyn ExceptionStore>, Option<String>, _) = if req.transient
        {
            let store = cowsnap_core::exception::TransientStore::new(cow, chunk);
            (Arc::new(store), None, chunk)
        } else {
            let store = PersistentStore::open(cow, req.chunk_size, req.overflow)?;
            if new_file.is_none() && !req.format && store.is_fresh() {
                return Err(Error::InvalidArgument(format!(
                    "{} has no COW header (its first bytes are zero): cowsnap formats only files it creates. To make it a new, empty COW, add --format (the whole file must be zeros)",
                    self.resolve(&rel).display()
                )));
            }
            let warning = store.overridden_chunk_size().map(|asked| {
                format!(
                    "{}: the COW header's chunk size {} overrides the {} asked for",
                    self.resolve(&rel).display(),
                    store.chunk_size(),
                    asked
                )
            });
            let chunk = store.chunk_size();
            (Arc::new(store), warning, chunk)
        };
        notes.extend(warning);
        let warning = (!notes.is_empty()).then(|| notes.join("; "));
        let kind = store.kind();
        let owned = new_file.is_some();
        let formats_adopted = !owned && !req.transient && req.format;
        Ok(Prepared {
            formats_adopted,
            entry: SnapshotEntry {
                name: req.name.clone(),
                origin: req.origin.clone(),
                cow: rel,
                store: kind.to_string(),
                chunk_sectors: chunk.sectors(),
                owned,
                id: new_file.as_ref().map(|f| f.id()).or(id),
                removing: false,
                merging: None,
                cow_layers,
                invalid: None,
            },
            store,
            warning,
            new_file,
            layers: staged_layers,
        })
    }

    /// A new COW file for `req` (a size, or a percentage of the origin), capped at what the
    /// snapshot can ever use (a note says so), staged under its hidden name.
    fn new_cow_file(
        &self,
        req: &SnapshotRequest,
        chunk: ChunkSize,
        min_chunks: u64,
        notes: &mut Vec<String>,
    ) -> Result<(PathBuf, staging::NewFile, Arc<dyn BlockDevice>)> {
        let origin_bytes = self.origin_bytes(&req.origin)?;
        let asked = match &req.cow {
            CowSpec::PercentOfOrigin(p) => {
                (origin_bytes.saturating_mul(*p) / 100).div_ceil(512) * 512
            }
            CowSpec::Size(s) => *s,
            // Not this arm.
            CowSpec::Path(_) => 0,
        };
        let max = max_cow_bytes(origin_bytes, chunk);
        let size = asked.min(max);
        if asked > max {
            notes.push(format!(
                "a COW of {asked} bytes is more than snapshot {:?} can ever use (every chunk of the {origin_bytes}-byte origin {:?} copied, with its metadata, in chunks of {chunk}): made {size} bytes",
                req.name, req.origin
            ));
        }
        if size < min_chunks * chunk.bytes() || !is_sector_aligned(size) {
            return Err(Error::InvalidArgument(format!(
                "COW size {size} is too small: at least {min_chunks} chunks of {chunk} and a multiple of 512"
            )));
        }
        let rel = PathBuf::from(format!("{}.cow", req.name));
        let file = staging::NewFile::create(&self.dir.join(&rel), size, true)?;
        crash_point("create-snapshot:staged");
        let cow = self.open_cow(file.path(), Some(file.id()))?;
        Ok((rel, file, cow))
    }

    /// Adds a prepared snapshot to the manifest and gives its COW file its final name.
    fn commit_snapshot(&mut self, prepared: Prepared) -> Result<(SnapshotEntry, Option<String>)> {
        let Prepared {
            entry,
            warning,
            new_file,
            layers,
            ..
        } = prepared;
        let mut next = self.manifest.clone();
        // A formatted adoption is in the manifest already, marked `removing`.
        next.snapshots.retain(|s| s.name != entry.name);
        next.snapshots.push(entry.clone());
        self.commit(next)?;
        crash_point("create-snapshot:committed");
        // Committed: the snapshot exists. A failed rename is settled by the next open.
        let mut warning = warning;
        if let Some(f) = new_file {
            if let Err(e) = f.publish() {
                let w = format!("{e}: the next start of the pool finishes it");
                warning = Some(match warning {
                    Some(first) => format!("{first}; {w}"),
                    None => w,
                });
            }
        }
        let notes = layers.publish();
        if !notes.is_empty() {
            warning = Some(
                warning
                    .into_iter()
                    .chain(notes)
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        crash_point("create-snapshot:published");
        Ok((entry, warning))
    }

    /// Before an adopted file is formatted (`--format`), commits its entry marked
    /// `removing`: the format writes a valid COW header into a file the user owns, and a
    /// crash or a failure before the create commits must not leave it looking like a valid
    /// snapshot. A `removing` entry is never activated; its removal (at the next open, or
    /// by [`undo_format`](Self::undo_format)) marks the header invalid and drops it.
    fn guard_format(&mut self, prepared: &Prepared) -> Result<()> {
        if !prepared.formats_adopted {
            return Ok(());
        }
        let mut next = self.manifest.clone();
        let mut entry = prepared.entry.clone();
        entry.removing = true;
        next.snapshots.push(entry);
        // The mutation formats the file with no entry committed: a crash then leaves a
        // valid COW that no pool knows of.
        if !mutation::active("format-before-commit") {
            self.commit(next)?;
        }
        crash_point("adopt-format:guarded");
        Ok(())
    }

    /// Undoes [`guard_format`](Self::guard_format) after a failed create; returns `e`.
    fn undo_format(&mut self, prepared_name: &str, e: Error) -> Error {
        if self
            .manifest
            .snapshot(prepared_name)
            .is_some_and(|s| s.removing)
        {
            // Best effort: if it fails, the next open finishes it.
            let _ = self.finish_removal(prepared_name, None);
        }
        e
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
        let prepared = self.prepare_snapshot(req)?;
        // Load once: formats a fresh COW and validates an adopted one.
        // Claimed like the daemon claims it: nothing else may write it while the snapshot
        // is taken, and it must be the file the pool recorded.
        let (origin, origin_id, layers) = self
            .manifest
            .origin(&req.origin)
            .map(|o| (self.resolve(&o.path), o.id, o.layers.clone()))
            .unwrap_or_default();
        let origin_dev = self.open_volume_file(&origin, origin_id)?;
        let chunk_size = prepared.store.chunk_size();
        let bounds = Bounds {
            cow_chunks: chunk_size.whole_chunks(prepared.store.cow().size()),
            origin_chunks: Some(
                chunk_size.chunks_covering(manifest::stack_size(origin_dev.size(), &layers)?),
            ),
        };
        self.guard_format(&prepared)?;
        let store = prepared.store.clone();
        let from = cowsnap_core::exception::Resume::default();
        let loaded = store.load(from, &mut |_, e| match validate::check_bounds(e, bounds) {
            None => Ok(()),
            Some(finding) => Err(finding.into_error(&store.cow().describe())),
        });
        drop(store);
        if let Err(e) = loaded {
            // Every handle on the COW goes before `undo_format` opens it.
            drop(prepared);
            return Err(self.undo_format(&req.name, e));
        }
        crash_point("create-snapshot:loaded");
        let done = self.commit_snapshot(prepared);
        let done = done.map_err(|e| self.undo_format(&req.name, e));
        drop(origin_dev);
        done
    }

    /// Status of every volume, or only of the volume `only`, read from the files without
    /// activating anything (no daemon runs); only the metadata of the snapshots shown is
    /// loaded. Transient snapshots show as invalid: their store died with the process that
    /// held it. A volume that cannot be read shows as failed, with the reason.
    pub fn list_offline(
        &self,
        copier: Arc<cowsnap_core::copy::Copier>,
        only: Option<&str>,
    ) -> Result<Vec<VolumeInfo>> {
        active::list_offline(self, copier, only)
    }

    /// First step of a removal: marks the snapshot `removing` in the manifest. From the
    /// commit on, no process activates it again; until then nothing changed.
    fn mark_removing(&mut self, name: &str) -> Result<SnapshotEntry> {
        let entry = self
            .manifest
            .snapshot(name)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("no snapshot called {name:?}")))?;
        if !entry.removing {
            let mut next = self.manifest.clone();
            if let Some(s) = next.snapshots.iter_mut().find(|s| s.name == name) {
                s.removing = true;
            }
            self.commit(next)?;
        }
        crash_point("remove-snapshot:marked");
        Ok(entry)
    }

    /// The rest of a removal, once the snapshot is marked and no longer active: an adopted
    /// COW is marked invalid on disk (`live` does it through the loaded store, else the
    /// file is opened here), an owned one moved to its staged name; the entry leaves the
    /// manifest; the owned file is deleted. Returns warnings.
    fn finish_removal(
        &mut self,
        name: &str,
        live: Option<&dyn ExceptionStore>,
    ) -> Result<Vec<String>> {
        let Some(entry) = self.manifest.snapshot(name).cloned() else {
            return Ok(Vec::new());
        };
        let path = self.resolve(&entry.cow);
        let mut warnings = Vec::new();
        let invalidated = match live {
            Some(store) => store.invalidate(),
            None => invalidate_cow_file(&path, &entry),
        };
        if let Err(e) = invalidated {
            if entry.owned {
                // Deleted below: nothing can adopt it again.
            } else {
                warnings.push(format!(
                    "could not mark the COW {} invalid ({e}): do not adopt it again as a snapshot of {:?}, origin writes made from now on are not in it",
                    path.display(),
                    entry.origin
                ));
            }
        }
        crash_point("remove-snapshot:invalidated");
        let trash = if entry.owned {
            staging::stage_removal(&path, entry.id)?
        } else {
            None
        };
        crash_point("remove-snapshot:staged");
        let mut next = self.manifest.clone();
        next.snapshots.retain(|s| s.name != name);
        self.commit(next)?;
        crash_point("remove-snapshot:committed");
        // Committed: the snapshot is gone. A file left behind is deleted by the next open.
        if let Some(t) = trash {
            if let Err(e) = staging::unlink(&t) {
                warnings.push(format!("{e}: the next start of the pool deletes it"));
            }
        }
        crash_point("remove-snapshot:unlinked");
        warnings.extend(self.remove_index(name));
        Ok(warnings)
    }

    /// Sets the budget of the exception indexes' page cache (`serve --cache-size`), before
    /// activation.
    /// Under the tests' stress tuning (`COWSNAP_INDEX_STRESS`) the cache stays at most
    /// four pages, so that every test of a running daemon evicts.
    pub fn set_cache_bytes(&mut self, bytes: u64) {
        self.cache = if Tuning::from_env() == Tuning::STRESS {
            default_cache()
        } else {
            PageCache::new(bytes)
        };
    }

    /// The exception indexes' page cache.
    pub fn index_cache(&self) -> &Arc<PageCache> {
        &self.cache
    }

    /// Where snapshot `name`'s exception index lives.
    pub fn index_dir(&self, name: &str) -> PathBuf {
        self.dir.join(INDEX_DIR).join(name)
    }

    /// How snapshot `entry`'s exception index is kept: a sidecar under `index/` for a
    /// persistent store, a temporary one for a transient store.
    pub fn index_config(&self, entry: &SnapshotEntry) -> IndexConfig {
        IndexConfig {
            dir: (entry.store != "N").then(|| self.index_dir(&entry.name)),
            temporary_in: Some(self.dir.join(INDEX_DIR)),
            cache: self.cache.clone(),
            tuning: self.index_tuning(),
            identity: index_identity(entry.id),
            fault: None,
        }
    }

    /// Deletes what no snapshot of the manifest uses under `index/`: the temporary indexes
    /// of transient snapshots a killed daemon left, and indexes of snapshots whose removal
    /// finished but whose index could not be deleted. A failure is a note.
    fn remove_stale_indexes(&mut self) {
        let Ok(entries) = fs::read_dir(self.dir.join(INDEX_DIR)) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let used = self
                .manifest
                .snapshots
                .iter()
                .any(|s| s.name == name && s.store != "N")
                || self.manifest.bbr_layers().any(|(_, b)| {
                    self.bbr_index_dir(b).file_name() == Some(e.file_name().as_os_str())
                });
            if !used {
                if let Err(err) = fs::remove_dir_all(e.path()) {
                    self.notes.push(format!(
                        "could not delete the unused index {}: {err}",
                        e.path().display()
                    ));
                }
            }
        }
    }

    /// The indexes' thresholds: a rebuild sorts half the cache's budget at a time (16
    /// bytes an entry), between 64 Ki and 1 Mi entries, so that `--cache-size` bounds a
    /// rebuild's memory too.
    fn index_tuning(&self) -> Tuning {
        let mut t = Tuning::from_env();
        if t != Tuning::STRESS {
            let entries = usize::try_from(self.cache.budget_bytes() / 32).unwrap_or(usize::MAX);
            t.rebuild_batch = entries.clamp(64 * 1024, Tuning::DEFAULT.rebuild_batch);
        }
        t
    }

    /// Deletes snapshot `name`'s index (derived data: it is rebuilt from the COW when
    /// missing). A failure is a warning.
    fn remove_index(&self, name: &str) -> Option<String> {
        let dir = self.index_dir(name);
        match fs::remove_dir_all(&dir) {
            Ok(()) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(format!(
                "could not delete the exception index {}: {e}",
                dir.display()
            )),
        }
    }

    /// The size of origin `name`'s file or device (opened read-only, unclaimed).
    fn origin_bytes(&self, name: &str) -> Result<u64> {
        let o = self
            .manifest
            .origin(name)
            .ok_or_else(|| Error::InvalidArgument(format!("no origin called {name:?}")))?;
        let base = FileDevice::open_read_only(self.resolve(&o.path))?.size();
        manifest::stack_size(base, &o.layers)
    }

    /// Checks that snapshot `name` may merge into its origin now: it exists, is not being
    /// removed, is persistent, and its origin has no merge (asked for or running) and no
    /// other merge may be recorded. Returns its entry.
    fn check_mergeable(&self, name: &str) -> Result<SnapshotEntry> {
        let entry = self
            .manifest
            .snapshot(name)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("no snapshot called {name:?}")))?;
        if entry.removing {
            return Err(Error::WrongState(format!(
                "snapshot {name:?} is being removed"
            )));
        }
        if entry.store == "N" {
            return Err(Error::InvalidArgument(format!(
                "snapshot {name:?} is transient (N): its exceptions live only in the daemon's memory, so it cannot merge; only persistent (P, PO) snapshots merge"
            )));
        }
        if let Some(other) = self.manifest.merging_into(&entry.origin) {
            return Err(Error::WrongState(if other.name == name {
                format!(
                    "snapshot {name:?} is already merging into {:?}",
                    entry.origin
                )
            } else {
                format!(
                    "origin {:?} is already merging snapshot {:?}; one merge at a time",
                    entry.origin, other.name
                )
            }));
        }
        Ok(entry)
    }

    /// Records that snapshot `name` merges into its origin (`record`), durably: the first
    /// step of a merge, before any origin chunk is overwritten. Offline, this is all a merge
    /// request does: the next `serve` starts it.
    fn record_merge(&mut self, name: &str, record: MergeRecord) -> Result<()> {
        let mut next = self.manifest.clone();
        if let Some(s) = next.snapshots.iter_mut().find(|s| s.name == name) {
            s.merging = Some(record);
        }
        self.commit(next)?;
        crash_point("merge-snapshot:recorded");
        Ok(())
    }

    /// Changes the merge record of snapshot `name` (pause, rate, a deferred merge that
    /// started, or `None`: a merge that could not start).
    fn update_merge(&mut self, name: &str, f: impl FnOnce(&mut Option<MergeRecord>)) -> Result<()> {
        let mut next = self.manifest.clone();
        if let Some(s) = next.snapshots.iter_mut().find(|s| s.name == name) {
            f(&mut s.merging);
        }
        if next != self.manifest {
            self.commit(next)?;
        }
        Ok(())
    }

    /// Pauses, resumes or rate-limits a recorded merge offline (it takes effect when the
    /// merge runs). Returns the record.
    pub fn control_merge(&mut self, name: &str, action: MergeAction) -> Result<MergeRecord> {
        if self
            .manifest
            .snapshot(name)
            .and_then(|s| s.merging)
            .is_none()
        {
            return Err(Error::InvalidArgument(format!(
                "snapshot {name:?} is not merging"
            )));
        }
        self.update_merge(name, |m| {
            if let Some(m) = m {
                action.record(m);
            }
        })?;
        self.manifest
            .snapshot(name)
            .and_then(|s| s.merging)
            .ok_or_else(|| Error::InvalidArgument(format!("no snapshot called {name:?}")))
    }

    /// Asks for a merge offline: checks the snapshot (it must be valid: its COW is loaded
    /// to read its usage) and records it; the next `serve` starts it. Returns the record.
    pub fn request_merge(
        &mut self,
        name: &str,
        copier: Arc<cowsnap_core::copy::Copier>,
        paused: bool,
        rate: Option<u64>,
    ) -> Result<MergeRecord> {
        self.check_mergeable(name)?;
        let info = self
            .list_offline(copier, Some(name))?
            .into_iter()
            .next()
            .ok_or_else(|| Error::InvalidArgument(format!("no snapshot called {name:?}")))?;
        if let Some(e) = info.error {
            return Err(Error::WrongState(format!(
                "snapshot {name:?} cannot be opened: {e}"
            )));
        }
        let usage = match (&info.usage, info.status.as_str()) {
            (Some(u), _) => *u,
            (None, status) => {
                return Err(Error::Invalid(format!(
                    "unable to merge snapshot {name:?}: it is {status}{}",
                    info.invalid_reason
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                )))
            }
        };
        let record = MergeRecord {
            initial_allocated_sectors: usage.allocated_sectors,
            on_activation: true,
            paused,
            rate,
        };
        self.record_merge(name, record)?;
        Ok(record)
    }

    /// Removes a snapshot offline, deleting its COW file if the pool created it and
    /// marking an adopted COW invalid. Returns warnings. A snapshot whose merge started is
    /// refused unless `force`: its origin would stay half merged.
    pub fn remove_snapshot(&mut self, name: &str, force: bool) -> Result<Vec<String>> {
        let mut warnings = self.half_merged_check(name, force)?;
        self.mark_removing(name)?;
        crash_point("remove-snapshot:deactivated");
        warnings.extend(self.finish_removal(name, None)?);
        Ok(warnings)
    }

    /// A snapshot whose merge started (not one only deferred) leaves its origin half merged
    /// if removed: refused, or with `force` a warning saying so.
    fn half_merged_check(&self, name: &str, force: bool) -> Result<Vec<String>> {
        let Some(s) = self
            .manifest
            .snapshot(name)
            .filter(|s| s.merging.is_some_and(|r| !r.on_activation))
        else {
            return Ok(Vec::new());
        };
        let what = format!(
            "snapshot {name:?} was merging into {:?}: removed, it leaves {:?} half merged (some chunks rolled back, others not)",
            s.origin, s.origin
        );
        if force {
            Ok(vec![what])
        } else {
            Err(Error::WrongState(format!(
                "{what}. Let the merge finish (`cowsnap serve` resumes it), or pass --force"
            )))
        }
    }
}

/// The most a COW can ever use for an origin of `origin_bytes` in chunks of `chunk`: the
/// header, every origin chunk copied once, and the metadata areas listing them (one more
/// when the last one fills). lvcreate caps a snapshot's COW the same way.
pub fn max_cow_bytes(origin_bytes: u64, chunk: ChunkSize) -> u64 {
    let n = chunk.chunks_covering(origin_bytes);
    let epa = chunk.bytes() / 16;
    let areas = n / epa + 1;
    (1 + areas + n).saturating_mul(chunk.bytes())
}

/// The page cache a pool starts with: [`DEFAULT_CACHE_BYTES`], or four pages when the
/// tests ask for the stress tuning (`COWSNAP_INDEX_STRESS`), so every lookup evicts.
fn default_cache() -> Arc<PageCache> {
    if Tuning::from_env() == Tuning::STRESS {
        PageCache::new(4 * 4096)
    } else {
        PageCache::new(DEFAULT_CACHE_BYTES)
    }
}

/// A snapshot's COW made or adopted and its store opened, not yet in the manifest.
struct Prepared {
    entry: SnapshotEntry,
    store: Arc<dyn ExceptionStore>,
    warning: Option<String>,
    new_file: Option<staging::NewFile>,
    /// An adopted file the load will format (`--format`): see [`Pool::guard_format`].
    formats_adopted: bool,
    /// Files made for the COW's layers.
    layers: StagedLayers,
}

fn cow_device(dev: FileDevice) -> Arc<dyn BlockDevice> {
    if dev.is_regular() {
        let end = dev.data_end();
        Arc::new(PrezeroDevice::new(dev, end))
    } else {
        Arc::new(dev)
    }
}

/// Marks the persistent COW of `entry` at `path` invalid on disk, if it is the file the
/// entry recorded and has a valid header (a COW of another format, or no COW at all, is
/// left untouched). The COW's `linear` layers are applied (they decide where the header
/// is); its test layers are not (they are there to fail, not to place data).
fn invalidate_cow_file(path: &Path, entry: &SnapshotEntry) -> Result<()> {
    let (id, store) = (entry.id, entry.store.as_str());
    if store == "N" {
        return Ok(());
    }
    let file = FileDevice::open_exclusive(path, false)?;
    if id.is_some_and(|want| file.id().ok() != Some(want)) {
        return Err(Error::Replaced(format!(
            "{} is no longer the file the pool took",
            path.display()
        )));
    }
    let dev = stack::offline_stack(Arc::new(file), &entry.cow_layers, |spec| {
        matches!(spec, cowsnap_core::layers::LayerSpec::Linear { .. })
    })?;
    let store = PersistentStore::open(dev, None, false)?;
    if store.is_fresh() {
        return Ok(());
    }
    store.invalidate()
}

/// Warnings for a pool directory or pool files other users can read or write.
fn permission_warnings(pool: &Pool) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut check = |path: &Path, what: &str| {
        if let Ok(m) = fs::metadata(path) {
            let mode = m.mode() & 0o777;
            if mode & 0o077 != 0 {
                out.push(format!(
                    "{what} {} has mode {mode:04o}: other users can read it; run `chmod go-rwx {}`",
                    path.display(),
                    path.display()
                ));
            }
        }
    };
    check(&pool.dir, "the pool directory");
    check(&pool.dir.join(MANIFEST), "the manifest");
    for o in pool.manifest.origins.iter().filter(|o| o.owned) {
        check(&pool.resolve(&o.path), "origin image");
    }
    for s in pool.manifest.snapshots.iter().filter(|s| s.owned) {
        check(&pool.resolve(&s.cow), "COW file");
    }
    out
}

/// The exclusive hold of a pool by one process (a daemon, or a command acting on the files).
///
/// It is an advisory `flock` on `DIR/daemon.lock`, released when dropped or when the
/// process dies. Who holds it is found in `/proc` (the processes with the file open); the
/// file also holds the holder's pid, written in one write at its start (never truncated
/// first, so a reader never finds it empty), for processes `/proc` does not show.
#[derive(Debug)]
pub struct PoolLock {
    _file: fs::File,
}

impl PoolLock {
    /// Takes the lock, or fails at once naming the holder.
    pub fn acquire(dir: &Path) -> Result<PoolLock> {
        Self::acquire_waiting(dir, std::time::Duration::ZERO, &mut |_| {})
    }

    /// Takes the lock, waiting up to `timeout` while another process holds it (two
    /// commands at once take turns, as lvm's do); `waiting` is called once, with a message
    /// naming the holder, when the wait begins. Fails after `timeout` naming the holder.
    pub fn acquire_waiting(
        dir: &Path,
        timeout: std::time::Duration,
        waiting: &mut dyn FnMut(&str),
    ) -> Result<PoolLock> {
        if !dir.join(MANIFEST).exists() {
            // The manifest's own error says what to do.
            Manifest::load(dir)?;
        }
        let path = dir.join("daemon.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io("open", 0, path.display().to_string(), e))?;
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            let why = format!(
                "pool {} is in use by another cowsnap process ({})",
                dir.display(),
                lock_holder(&mut file)
            );
            if timeout.is_zero() {
                return Err(Error::InUse(why));
            }
            waiting(&format!(
                "{why}: waiting up to {} s for it",
                timeout.as_secs()
            ));
            // A blocking flock in a thread of its own, waited for with a timeout: the
            // kernel wakes a blocked waiter when the holder lets go, so a loop of short
            // holders (a monitoring `status`) cannot starve it as polling would be. A
            // waiter given up on takes the lock at worst after its caller went, and lets
            // go of it at once (its handle is the last on the file).
            let blocked = file
                .try_clone()
                .map_err(|e| Error::io("dup", 0, path.display().to_string(), e))?;
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let got = rustix::fs::flock(&blocked, rustix::fs::FlockOperation::LockExclusive);
                let _ = tx.send(got.is_ok());
                drop(blocked);
            });
            match rx.recv_timeout(timeout) {
                Ok(true) => {}
                Ok(false) | Err(_) => return Err(Error::InUse(why)),
            }
        }
        // One write at the start: padded, so an earlier, longer pid leaves no digits.
        let _ = std::os::unix::fs::FileExt::write_all_at(
            &file,
            format!("{:<20}\n", std::process::id()).as_bytes(),
            0,
        );
        Ok(PoolLock { _file: file })
    }
}

/// Who holds the pool lock `file`: the other processes that have it open (from `/proc`),
/// else the pid its holder wrote.
fn lock_holder(file: &mut fs::File) -> String {
    let others = FileId::of_file(file, "daemon.lock")
        .map(|id| cowsnap_core::dev::claim::holders(&id))
        .unwrap_or_default();
    if !others.is_empty() {
        return others.join(", ");
    }
    let mut pid = String::new();
    let _ = file.rewind();
    let _ = file.read_to_string(&mut pid);
    format!("pid {}", pid.trim())
}

#[cfg(test)]
mod tests;
