//! The sidecar directory: the files of one snapshot's exception index.
//!
//! Every change the index makes to its directory goes through here as one of a few
//! operations ([`Op`]): write part of a file, sync a file, rename, sync the directory,
//! remove. Tests install a hook that sees each operation before it happens and can fail it;
//! that is how the crash tests cut power at every write and flush of a checkpoint.
//!
//! The directory is the index's own: it was created for it (by the pool, under
//! `POOL/index/`, or as a private temporary directory for a transient store) and holds
//! nothing else, so its file names are trusted within it.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// One change to the directory, as the fault hook sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Bytes written into `file` at `offset` (not yet durable).
    Write {
        /// The file.
        file: String,
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// `fsync` of a file.
    SyncFile(String),
    /// A rename inside the directory (not durable until [`Op::SyncDir`]).
    Rename {
        /// Old name.
        from: String,
        /// New name.
        to: String,
    },
    /// `fsync` of the directory.
    SyncDir,
    /// A file removed.
    Remove(String),
}

/// How the names of temporary index directories begin (a pool deletes those a killed
/// daemon left).
pub const TEMPORARY_PREFIX: &str = ".transient-";

/// Called before each operation; an error fails it (and stands for a crash in tests).
pub type FaultHook = Arc<dyn Fn(&Op) -> Result<()> + Send + Sync>;

/// A sidecar directory.
#[derive(Clone)]
pub struct IndexDir {
    path: PathBuf,
    hook: Option<FaultHook>,
    /// Removed with its contents when the last handle goes (transient stores).
    temporary: Option<Arc<TempDir>>,
    /// This process's claim on the directory, released when the last handle goes.
    _claim: Option<Arc<Claim>>,
}

/// Directories held by an index of this process: one index per directory at a time.
static CLAIMED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
static RELEASED: std::sync::Condvar = std::sync::Condvar::new();
/// How long opening a directory waits for the index that holds it to finish (its final
/// checkpoint runs when its snapshot is dropped, possibly on another thread).
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug)]
struct Claim(PathBuf);

impl Claim {
    fn take(path: &Path) -> Result<Claim> {
        let deadline = std::time::Instant::now() + CLAIM_WAIT;
        let mut held = CLAIMED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while held.iter().any(|p| p == path) {
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(Error::InUse(format!(
                    "the exception index {} is still held by another snapshot of this process",
                    path.display()
                )));
            }
            held = RELEASED
                .wait_timeout(held, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        held.push(path.to_path_buf());
        Ok(Claim(path.to_path_buf()))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut held = CLAIMED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.retain(|p| *p != self.0);
        RELEASED.notify_all();
    }
}

impl std::fmt::Debug for IndexDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexDir")
            .field("path", &self.path)
            .finish()
    }
}

#[derive(Debug)]
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(op, 0, path.display().to_string(), e)
}

impl IndexDir {
    /// The directory at `path`, created (with its parents) when missing. Waits while
    /// another index of this process holds it.
    pub fn open(path: &Path) -> Result<IndexDir> {
        fs::create_dir_all(path).map_err(io("mkdir", path))?;
        let path = fs::canonicalize(path).map_err(io("realpath", path))?;
        let claim = Claim::take(&path)?;
        Ok(IndexDir {
            path,
            hook: None,
            temporary: None,
            _claim: Some(Arc::new(claim)),
        })
    }

    /// The directory at `path` as it is, for reading it without taking it (`cow check`):
    /// another index of this process, or a daemon, may be using it.
    pub fn unclaimed(path: &Path) -> IndexDir {
        IndexDir {
            path: path.to_path_buf(),
            hook: None,
            temporary: None,
            _claim: None,
        }
    }

    /// A new private directory `TEMPORARY_PREFIX...` in `base` (the system's temporary
    /// directory when `None`), removed when the last handle on it goes.
    pub fn temporary(base: Option<&Path>) -> Result<IndexDir> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = base.map_or_else(std::env::temp_dir, Path::to_path_buf);
        fs::create_dir_all(&base).map_err(io("mkdir", &base))?;
        for _ in 0..100 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("{TEMPORARY_PREFIX}{}-{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => {
                    return Ok(IndexDir {
                        temporary: Some(Arc::new(TempDir(path.clone()))),
                        path,
                        hook: None,
                        _claim: None,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io("mkdir", &path)(e)),
            }
        }
        Err(Error::InvalidArgument(format!(
            "no free name for an index directory in {}",
            base.display()
        )))
    }

    /// The same directory with `hook` called before every change.
    pub fn with_hook(mut self, hook: FaultHook) -> IndexDir {
        self.hook = Some(hook);
        self
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True for a private temporary directory.
    pub fn is_temporary(&self) -> bool {
        self.temporary.is_some()
    }

    fn before(&self, op: Op) -> Result<()> {
        match &self.hook {
            Some(h) => h(&op),
            None => Ok(()),
        }
    }

    /// Creates (or truncates) `name` for writing.
    pub fn create(&self, name: &str) -> Result<WriteFile> {
        let path = self.path.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io("create", &path))?;
        Ok(WriteFile {
            dir: self.clone(),
            name: name.to_string(),
            file,
        })
    }

    /// Opens `name` for reading; `None` when it does not exist.
    pub fn open_file(&self, name: &str) -> Result<Option<File>> {
        let path = self.path.join(name);
        match File::open(&path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("open", &path)(e)),
        }
    }

    /// The whole of `name`, `None` when it does not exist (at most `limit` bytes read;
    /// a longer file is an error).
    pub fn read(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let Some(f) = self.open_file(name)? else {
            return Ok(None);
        };
        let path = self.path.join(name);
        let len = f.metadata().map_err(io("stat", &path))?.len();
        if len > limit {
            return Err(Error::Corrupt {
                device: path.display().to_string(),
                offset: limit,
                reason: format!("the file has {len} bytes, more than the {limit} it may have"),
            });
        }
        let mut buf = vec![0u8; crate::units::mem_usize(len)];
        f.read_exact_at(&mut buf, 0).map_err(io("read", &path))?;
        Ok(Some(buf))
    }

    /// Renames `from` to `to` (replacing it).
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.before(Op::Rename {
            from: from.into(),
            to: to.into(),
        })?;
        let path = self.path.join(to);
        fs::rename(self.path.join(from), &path).map_err(io("rename", &path))
    }

    /// Makes the directory's entries durable.
    pub fn sync(&self) -> Result<()> {
        self.before(Op::SyncDir)?;
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", &self.path))
    }

    /// Removes `name`; a missing file is not an error.
    pub fn remove(&self, name: &str) -> Result<()> {
        self.before(Op::Remove(name.into()))?;
        match fs::remove_file(self.path.join(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("unlink", &self.path.join(name))(e)),
        }
    }

    /// The names in the directory.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for e in fs::read_dir(&self.path).map_err(io("readdir", &self.path))? {
            let e = e.map_err(io("readdir", &self.path))?;
            if let Some(n) = e.file_name().to_str() {
                names.push(n.to_string());
            }
        }
        names.sort();
        Ok(names)
    }
}

/// A file being written in an [`IndexDir`].
pub struct WriteFile {
    dir: IndexDir,
    name: String,
    file: File,
}

impl WriteFile {
    /// Writes `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.dir.before(Op::Write {
            file: self.name.clone(),
            offset,
            len: data.len() as u64,
        })?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io("write", offset, self.describe(), e))
    }

    /// Makes the file's data durable.
    pub fn sync(&self) -> Result<()> {
        self.dir.before(Op::SyncFile(self.name.clone()))?;
        self.file
            .sync_all()
            .map_err(|e| Error::io("fsync", 0, self.describe(), e))
    }

    fn describe(&self) -> String {
        self.dir.path.join(&self.name).display().to_string()
    }

    /// The open file (for reading it back).
    pub fn into_file(self) -> File {
        self.file
    }
}
