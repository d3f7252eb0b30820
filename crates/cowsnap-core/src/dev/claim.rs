//! Exclusive use of image files and block devices: identities and claims.
//!
//! A snapshot is only as good as the guarantee that every write to its origin goes through
//! the process that copies chunks out first. So a volume file is *claimed* before cowsnap
//! writes it, and identified by what it is, not by the path that named it:
//!
//! * [`FileId`]: a regular file is its device and inode, a block device its `st_rdev`. Two
//!   paths (a hard link, a symlink, `/dev/loop0` and `/dev/block/7:0`) that name the same
//!   file have the same id, so the pool can refuse a COW that aliases an origin or another
//!   COW whatever the path says.
//! * [`claim`]: open file description (OFD) byte-range locks in the layout QEMU's
//!   `file-posix` driver uses, so QEMU (`qemu-img`, `qemu-nbd`, `qemu-system-*`) and
//!   cowsnap see each other. QEMU represents each permission it holds by a shared lock on
//!   byte `100 + bit` and each permission it refuses to share by a shared lock on byte
//!   `200 + bit` (bits: 0 consistent read, 1 write, 2 write unchanged, 3 resize). A writer
//!   claim holds consistent read, write and write-unchanged, and shares neither write nor
//!   resize: it locks bytes 100, 101, 102, 201 and 203, then checks that no other open file
//!   description holds a lock on 200, 201 or 202 (someone refuses to share a permission we
//!   hold) or on 101 or 103 (someone writes or resizes). Locking before checking means two claimants
//!   racing each see the other. The locks go away with the file description (on close or
//!   at process death), so a crashed daemon never leaves a stale claim.
//! * Block devices are also opened `O_EXCL` (by [`FileDevice`](super::FileDevice)), which
//!   the kernel refuses while the device is mounted or held by another exclusive opener
//!   (a file system, device-mapper, md, another cowsnap).
//!
//! OFD locks are advisory: a program that takes no locks (`dd`, `mount` of an image file,
//! `qemu-img -U`) is not stopped. The README says so: while snapshots exist, every write to
//! an origin must go through cowsnap.

use std::fs::{File, Metadata};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a volume file is, independent of the path that named it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FileId {
    /// A regular file: its file system's device number and its inode.
    File {
        /// `st_dev`.
        dev: u64,
        /// `st_ino`.
        ino: u64,
    },
    /// A block device: its device number.
    Block {
        /// `st_rdev`.
        rdev: u64,
    },
}

impl FileId {
    /// The id of a file from its metadata; `None` for what cannot be a volume (a
    /// directory, a socket, a character device).
    pub fn of(meta: &Metadata) -> Option<FileId> {
        let t = meta.file_type();
        if t.is_file() {
            Some(FileId::File {
                dev: meta.dev(),
                ino: meta.ino(),
            })
        } else if t.is_block_device() {
            Some(FileId::Block { rdev: meta.rdev() })
        } else {
            None
        }
    }

    /// The id of the file at `path` (symlinks followed).
    pub fn of_path(path: &Path) -> Result<FileId> {
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::io("stat", 0, path.display().to_string(), e))?;
        FileId::of(&meta).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            ))
        })
    }

    /// The files this one stands for: itself, and for a loop device the file behind it
    /// (from `/sys/dev/block/M:m/loop/backing_file`), so that `/dev/loop0` over an origin
    /// image is seen as that image.
    pub fn with_backing(self) -> Vec<FileId> {
        let mut out = vec![self];
        if let FileId::Block { rdev } = self {
            let (ma, mi) = major_minor(rdev);
            let sys = format!("/sys/dev/block/{ma}:{mi}/loop/backing_file");
            if let Ok(p) = std::fs::read_to_string(sys) {
                if let Ok(id) = FileId::of_path(Path::new(p.trim_end_matches('\n'))) {
                    out.push(id);
                }
            }
        }
        out
    }

    /// The id of an open file.
    pub fn of_file(file: &File, name: &str) -> Result<FileId> {
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat", 0, name.to_string(), e))?;
        FileId::of(&meta).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{name} is neither a regular file nor a block device"
            ))
        })
    }
}

fn major_minor(dev: u64) -> (u64, u64) {
    (
        ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff),
        ((dev >> 12) & 0xffff_ff00) | (dev & 0xff),
    )
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            FileId::File { dev, ino } => {
                let (ma, mi) = major_minor(dev);
                write!(f, "inode {ino} on device {ma}:{mi}")
            }
            FileId::Block { rdev } => {
                let (ma, mi) = major_minor(rdev);
                write!(f, "block device {ma}:{mi}")
            }
        }
    }
}

/// QEMU's permission bits, in its lock-byte layout.
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;
const WRITE_UNCHANGED: i64 = 2;
const RESIZE: i64 = 3;

fn perm_name(bit: i64) -> &'static str {
    match bit {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        WRITE_UNCHANGED => "write unchanged",
        _ => "resize",
    }
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "F_RDLCK, F_WRLCK and SEEK_SET are small constants that fit a c_short"
)]
fn flock(typ: i32, start: i64) -> libc::flock {
    libc::flock {
        l_type: typ as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    }
}

/// True when an open file description other than `file`'s holds a lock on byte `at`.
fn locked_by_other(file: &File, at: i64) -> std::io::Result<bool> {
    let mut l = flock(libc::F_WRLCK, at);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut l)).map_err(std::io::Error::from)?;
    Ok(i32::from(l.l_type) != libc::F_UNLCK)
}

/// Claims `file` (named `name`) for writing: takes QEMU-compatible OFD locks and checks
/// that no other user of the file conflicts. Fails with [`Error::InUse`] naming the
/// conflict, and the processes that have the file open where `/proc` tells.
pub fn claim(file: &File, name: &str) -> Result<()> {
    for byte in [
        PERM_BASE + CONSISTENT_READ,
        PERM_BASE + WRITE,
        PERM_BASE + WRITE_UNCHANGED,
        SHARED_BASE + WRITE,
        SHARED_BASE + RESIZE,
    ] {
        match fcntl(file, FcntlArg::F_OFD_SETLK(&flock(libc::F_RDLCK, byte))) {
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EACCES) => {
                return Err(busy(file, name, "it is locked for exclusive use"));
            }
            // A file system without byte-range locks: nothing to interoperate with.
            Err(nix::errno::Errno::ENOLCK) | Err(nix::errno::Errno::EOPNOTSUPP) => return Ok(()),
            Err(e) => {
                return Err(Error::io(
                    "lock",
                    0,
                    name.to_string(),
                    std::io::Error::from(e),
                ))
            }
        }
    }
    let checks = [
        (SHARED_BASE + CONSISTENT_READ, CONSISTENT_READ, false),
        (SHARED_BASE + WRITE, WRITE, false),
        (SHARED_BASE + WRITE_UNCHANGED, WRITE_UNCHANGED, false),
        (PERM_BASE + WRITE, WRITE, true),
        (PERM_BASE + RESIZE, RESIZE, true),
    ];
    for (byte, bit, held) in checks {
        let conflict = locked_by_other(file, byte)
            .map_err(|e| Error::io("test the lock of", 0, name.to_string(), e))?;
        if conflict {
            let what = if held {
                format!(
                    "another program holds it with {:?} permission",
                    perm_name(bit)
                )
            } else {
                format!(
                    "another program refuses to share {:?} permission on it",
                    perm_name(bit)
                )
            };
            let _ = fcntl(file, FcntlArg::F_OFD_SETLK(&unlock_all()));
            return Err(busy(file, name, &what));
        }
    }
    Ok(())
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "F_UNLCK and SEEK_SET are small constants that fit a c_short"
)]
fn unlock_all() -> libc::flock {
    libc::flock {
        l_type: libc::F_UNLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

fn busy(file: &File, name: &str, what: &str) -> Error {
    let holders = FileId::of_file(file, name)
        .map(|id| holders(&id))
        .unwrap_or_default();
    let by = if holders.is_empty() {
        String::new()
    } else {
        format!(" (open in {})", holders.join(", "))
    };
    Error::InUse(format!(
        "{name} is in use: {what}{by}; stop that program first (cowsnap must be the only writer of its volumes)"
    ))
}

/// Processes other than this one that have the file `id` open, as `pid N (comm)`, from
/// `/proc`. Best effort: processes of other users may be invisible.
pub fn holders(id: &FileId) -> Vec<String> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let open = fds.flatten().any(|fd| {
            std::fs::metadata(fd.path())
                .ok()
                .and_then(|m| FileId::of(&m))
                .is_some_and(|f| f == *id)
        });
        if open {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    out
}

/// Where a block device is mounted, from `/proc/self/mountinfo` (for error messages).
pub fn mount_points(rdev: u64) -> Vec<String> {
    let (ma, mi) = major_minor(rdev);
    let want = format!("{ma}:{mi}");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&want.as_str()))
                .then(|| f.get(4).map(|s| s.to_string()))
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4 KiB file `name` in `dir`.
    fn tmp(dir: &crate::testkit::Scratch, name: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        p
    }

    fn rw(p: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    }

    #[test]
    fn ids_follow_links_not_paths() {
        let dir = crate::testkit::scratch("claim");
        let p = tmp(&dir, "a.img");
        let link = p.with_file_name("hard.img");
        std::fs::hard_link(&p, &link).unwrap();
        let sym = p.with_file_name("sym.img");
        std::os::unix::fs::symlink(&p, &sym).unwrap();
        let id = FileId::of_path(&p).unwrap();
        assert_eq!(FileId::of_path(&link).unwrap(), id);
        assert_eq!(FileId::of_path(&sym).unwrap(), id);
        assert_ne!(FileId::of_path(&tmp(&dir, "b.img")).unwrap(), id);
        let text = serde_json::to_string(&id).unwrap();
        assert!(text.contains("\"type\":\"file\""), "{text}");
        assert_eq!(serde_json::from_str::<FileId>(&text).unwrap(), id);
    }

    #[test]
    fn a_second_claim_of_one_file_is_refused_and_released_on_close() {
        let dir = crate::testkit::scratch("claim");
        let p = tmp(&dir, "c.img");
        let first = rw(&p);
        claim(&first, "c.img").unwrap();
        // A second open file description, even in this process, conflicts.
        let second = rw(&p);
        let e = claim(&second, "c.img").unwrap_err();
        assert!(e.to_string().contains("c.img is in use"), "{e}");
        drop(first);
        claim(&second, "c.img").unwrap();
    }
}
