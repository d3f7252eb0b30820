//! Files the pool creates and deletes, made atomic with the manifest.
//!
//! A volume file the pool owns is never visible under its final name unless the manifest
//! lists it. It is born as a *staged* file, `.NAME.new`, and dies as one, `.NAME.del`:
//! names no volume can have (volume names never start with a dot), inside the pool's
//! private directory, so every staged file is cowsnap's own.
//!
//! * Create: make `.NAME.new` (`O_EXCL`, mode 0600), fill it (reserve, format), commit the
//!   manifest with the entry's final path and the file's [`FileId`], then rename the staged
//!   file to its final name (`RENAME_NOREPLACE`) and sync the directory.
//! * Remove: rename the file to `.NAME.del`, commit the manifest without the entry, unlink.
//!
//! [`recover`] runs whenever a process takes the pool's lock and settles what a crash left,
//! with one rule for both operations: a staged file whose id an owned manifest entry
//! records, and whose final path is missing, takes its final name (the create committed;
//! the remove did not); any other staged file is deleted (the create did not commit; the
//! remove did). The manifest's own temporary file is deleted too.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::manifest::Manifest;
use cowsnap_core::dev::FileId;
use cowsnap_core::error::{Error, Result};

/// Suffix of a file being created.
const NEW: &str = "new";
/// Suffix of a file being removed.
const DEL: &str = "del";

/// `DIR/.NAME.SUFFIX` for the final path `DIR/NAME`.
fn staged(final_path: &Path, suffix: &str) -> PathBuf {
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    final_path.with_file_name(format!(".{name}.{suffix}"))
}

fn is_staged_name(name: &str) -> bool {
    name.starts_with('.')
        && (name.ends_with(&format!(".{NEW}")) || name.ends_with(&format!(".{DEL}")))
}

/// Syncs the directory `dir`, so renames and unlinks in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync", 0, dir.display().to_string(), e))
}

/// A file being created under a staged name; deleted when dropped unless
/// [`publish`](Self::publish)ed.
#[derive(Debug)]
pub(crate) struct NewFile {
    staged: PathBuf,
    final_path: PathBuf,
    id: FileId,
    published: bool,
}

impl NewFile {
    /// Creates `.NAME.new` for the final path `final_path`, mode 0600, `size` bytes,
    /// sparse or with its space reserved. Refuses when `final_path` exists.
    pub(crate) fn create(final_path: &Path, size: u64, reserve: bool) -> Result<NewFile> {
        if fs::symlink_metadata(final_path).is_ok() {
            return Err(Error::Exists(format!(
                "{} already exists and is not a volume of this pool: move it away or choose another name",
                final_path.display()
            )));
        }
        let staged = staged(final_path, NEW);
        let name = staged.display().to_string();
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staged)
            .map_err(|e| Error::io("create", 0, name.clone(), e))?;
        let id = FileId::of_file(&f, &name)?;
        let file = NewFile {
            staged,
            final_path: final_path.to_path_buf(),
            id,
            published: false,
        };
        f.set_len(size)
            .map_err(|e| Error::io("set the size of", 0, final_path.display().to_string(), e))?;
        if reserve {
            match rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, size) {
                Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => {}
                Err(e) => {
                    return Err(Error::io(
                        "reserve space for",
                        0,
                        final_path.display().to_string(),
                        e.into(),
                    ))
                }
            }
        }
        f.sync_all()
            .map_err(|e| Error::io("fsync", 0, name.clone(), e))?;
        Ok(file)
    }

    /// Where the file is now.
    pub(crate) fn path(&self) -> &Path {
        &self.staged
    }

    /// Its identity, for the manifest.
    pub(crate) fn id(&self) -> FileId {
        self.id
    }

    /// Gives the file its final name; called once the manifest lists it. A failure here is
    /// settled by [`recover`] at the next start.
    pub(crate) fn publish(mut self) -> Result<()> {
        self.published = true;
        rename_noreplace(&self.staged, &self.final_path)?;
        if let Some(dir) = self.final_path.parent() {
            sync_dir(dir)?;
        }
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_file(&self.staged);
        }
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(|e| {
        Error::io(
            "rename",
            0,
            format!("{} to {}", from.display(), to.display()),
            e.into(),
        )
    })
}

/// Moves the owned file at `final_path` to its removal name, if it is the file `id` (a
/// file that is not the one the manifest recorded is left alone). Returns the staged
/// path to [`unlink`] once the manifest no longer lists it.
pub(crate) fn stage_removal(final_path: &Path, id: Option<FileId>) -> Result<Option<PathBuf>> {
    let Ok(meta) = fs::symlink_metadata(final_path) else {
        return Ok(None);
    };
    if id.is_some() && FileId::of(&meta) != id {
        return Ok(None);
    }
    let to = staged(final_path, DEL);
    // A removal name left by an earlier attempt at this same removal: only this entry's
    // file can have it, and the entry is going.
    if fs::symlink_metadata(&to).is_ok_and(|m| m.file_type().is_file()) {
        unlink(&to)?;
    }
    rename_noreplace(final_path, &to)?;
    Ok(Some(to))
}

/// Deletes a staged file after the manifest stopped listing it.
pub(crate) fn unlink(staged: &Path) -> Result<()> {
    match fs::remove_file(staged) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("delete", 0, staged.display().to_string(), e)),
    }
    if let Some(dir) = staged.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Settles the staged files a crash left in the pool directory `dir` (see the module
/// docs). Returns one message per file acted on.
pub(crate) fn recover(dir: &Path, manifest: &Manifest) -> Result<Vec<String>> {
    let mut msgs = Vec::new();
    let entries =
        fs::read_dir(dir).map_err(|e| Error::io("read", 0, dir.display().to_string(), e))?;
    let owned: Vec<(PathBuf, Option<FileId>, String)> = manifest
        .origins
        .iter()
        .filter(|o| o.owned)
        .map(|o| (dir.join(&o.path), o.id, o.name.clone()))
        .chain(
            manifest
                .snapshots
                .iter()
                .filter(|s| s.owned)
                .map(|s| (dir.join(&s.cow), s.id, s.name.clone())),
        )
        .chain(
            manifest
                .bbr_layers()
                .map(|(v, b)| (dir.join(&b.spares), b.id, format!("the bbr spares of {v}"))),
        )
        .collect();
    let mut changed = false;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name == format!(".{}.tmp", super::manifest::MANIFEST) {
            let _ = fs::remove_file(&path);
            changed = true;
            continue;
        }
        if !is_staged_name(&name) {
            continue;
        }
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.file_type().is_file() {
            msgs.push(format!(
                "{} is not a regular file: left alone (cowsnap never made it)",
                path.display()
            ));
            continue;
        }
        let id = FileId::of(&meta);
        // The entry whose file this is: same id, and the staged name of its final path (an
        // inode number alone may have been reused since).
        let owner = owned.iter().find(|(final_path, eid, _)| {
            eid.is_some()
                && *eid == id
                && (path == staged(final_path, NEW) || path == staged(final_path, DEL))
        });
        match owner {
            Some((final_path, _, vol)) if fs::symlink_metadata(final_path).is_err() => {
                match rename_noreplace(&path, final_path) {
                    Ok(()) => {
                        changed = true;
                        msgs.push(format!(
                            "volume {vol:?}: {} renamed to {} (an interrupted create or remove)",
                            path.display(),
                            final_path.display()
                        ));
                    }
                    Err(e) => msgs.push(format!("volume {vol:?}: {e}; left as it is")),
                }
            }
            Some((final_path, _, vol)) => msgs.push(format!(
                "volume {vol:?}: {} left alone: {} exists already",
                path.display(),
                final_path.display()
            )),
            None => match fs::remove_file(&path) {
                Ok(()) => {
                    changed = true;
                    msgs.push(format!(
                        "deleted {}, left by an interrupted create or remove",
                        path.display()
                    ));
                }
                Err(e) => msgs.push(format!(
                    "{} (left by an interrupted create or remove) could not be deleted: {e}",
                    path.display()
                )),
            },
        }
    }
    if changed {
        if let Err(e) = sync_dir(dir) {
            msgs.push(e.to_string());
        }
    }
    Ok(msgs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_names_cannot_be_volume_files() {
        let p = staged(Path::new("/pool/snap.cow"), NEW);
        assert_eq!(p, Path::new("/pool/.snap.cow.new"));
        assert!(is_staged_name(".snap.cow.new"));
        assert!(is_staged_name(".snap.cow.del"));
        assert!(!is_staged_name("snap.cow"));
        assert!(!is_staged_name(".pool.json.tmp"));
        assert!(super::super::manifest::check_name(".snap.cow.new").is_err());
    }
}
