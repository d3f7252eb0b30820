//! FUSE export: every volume as a regular file `DIR/NAME`, so that `losetup` can attach it.
//!
//! The mount holds one flat directory. Files appear and disappear as the
//! [`VolumeSource`] gains and loses volumes (snapshots created or removed live). Files are
//! opened in direct-I/O mode, so the page cache never holds a stale copy of a volume that
//! NBD clients also write. Reads and writes at any byte offset work (unaligned ends are
//! read-modify-written at sector granularity); `fsync` flushes the volume; the size cannot
//! change. A failed volume I/O answers the errno of [`cowsnap_core::Error::errno`].

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cowsnap_core::dev::{BlockDevice, Fua};
use cowsnap_core::units::{checked_usize, mem_usize, SECTOR_SIZE};
use fuser::consts::FOPEN_DIRECT_IO;
use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};

/// Where the files come from.
pub trait VolumeSource: Send + Sync + 'static {
    /// Names of the volumes now.
    fn names(&self) -> Vec<String>;
    /// A volume's device, and whether it is read-only.
    fn get(&self, name: &str) -> Option<(Arc<dyn BlockDevice>, bool)>;
}

/// How many times each volume's file is open now (a merge of an open origin is deferred,
/// as lvm2 defers the merge of an open volume).
#[derive(Debug, Default)]
pub struct OpenFiles(parking_lot::Mutex<std::collections::HashMap<String, u32>>);

impl OpenFiles {
    /// Opens of volume `name` not yet released.
    pub fn count(&self, name: &str) -> u32 {
        self.0.lock().get(name).copied().unwrap_or(0)
    }

    fn add(&self, name: &str, up: bool) {
        let mut m = self.0.lock();
        let n = m.entry(name.to_string()).or_insert(0);
        *n = if up { *n + 1 } else { n.saturating_sub(1) };
        if *n == 0 {
            m.remove(name);
        }
    }
}

const ROOT: u64 = 1;
const TTL: Duration = Duration::from_secs(0);
const MAX_IO: u64 = 32 << 20;

/// The FUSE filesystem over a [`VolumeSource`].
pub struct VolumeFs {
    source: Arc<dyn VolumeSource>,
    /// Stable inode numbers: a name keeps its inode for the life of the mount.
    inodes: BTreeMap<String, u64>,
    next_ino: u64,
    uid: u32,
    gid: u32,
    started: SystemTime,
    open_files: Arc<OpenFiles>,
}

impl VolumeFs {
    /// A filesystem serving `source`, its files owned by `uid`/`gid`.
    pub fn new(source: Arc<dyn VolumeSource>, uid: u32, gid: u32) -> Self {
        VolumeFs {
            source,
            inodes: BTreeMap::new(),
            next_ino: 2,
            uid,
            gid,
            started: SystemTime::now(),
            open_files: Arc::default(),
        }
    }

    /// Counts opens of each volume's file in `open_files`.
    pub fn with_open_files(mut self, open_files: Arc<OpenFiles>) -> Self {
        self.open_files = open_files;
        self
    }

    fn ino_of(&mut self, name: &str) -> u64 {
        if let Some(&i) = self.inodes.get(name) {
            return i;
        }
        let i = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(name.to_string(), i);
        i
    }

    fn name_of(&self, ino: u64) -> Option<String> {
        self.inodes
            .iter()
            .find(|(_, &i)| i == ino)
            .map(|(n, _)| n.clone())
    }

    fn volume(&self, ino: u64) -> Option<(Arc<dyn BlockDevice>, bool)> {
        self.source.get(&self.name_of(ino)?)
    }

    fn dir_attr(&self) -> FileAttr {
        self.attr(ROOT, FileType::Directory, 0, 0o755)
    }

    fn attr(&self, ino: u64, kind: FileType, size: u64, perm: u16) -> FileAttr {
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&mut self, name: &str) -> Option<FileAttr> {
        let (dev, ro) = self.source.get(name)?;
        let ino = self.ino_of(name);
        Some(self.attr(
            ino,
            FileType::RegularFile,
            dev.size(),
            if ro { 0o400 } else { 0o600 },
        ))
    }
}

/// Reads `len` bytes at any byte `offset` of `dev` (clipped at its end).
pub fn read_bytes(dev: &dyn BlockDevice, offset: u64, len: u64) -> cowsnap_core::Result<Vec<u8>> {
    let size = dev.size();
    if offset >= size {
        return Ok(Vec::new());
    }
    let end = (offset + len).min(size);
    let start_al = offset / SECTOR_SIZE * SECTOR_SIZE;
    let end_al = end.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    let mut buf = vec![0u8; checked_usize(end_al - start_al, "read")?];
    dev.read_at(&mut buf, start_al)?;
    // Both inside `buf`.
    let from = mem_usize(offset - start_al);
    Ok(buf[from..from + mem_usize(end - offset)].to_vec())
}

/// Writes `data` at any byte `offset` of `dev`, read-modify-writing partial sectors.
/// Writes past the end are refused.
pub fn write_bytes(
    dev: &dyn BlockDevice,
    offset: u64,
    data: &[u8],
    fua: Fua,
) -> cowsnap_core::Result<()> {
    let end = offset + data.len() as u64;
    if end > dev.size() {
        return Err(cowsnap_core::Error::OutOfRange {
            offset,
            len: data.len() as u64,
            size: dev.size(),
        });
    }
    let start_al = offset / SECTOR_SIZE * SECTOR_SIZE;
    let end_al = end.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    if start_al == offset && end_al == end {
        return dev.write_at(data, offset, fua);
    }
    // `data` widened to whole sectors: in memory, like `data`.
    let mut buf = vec![0u8; mem_usize(end_al - start_al)];
    dev.read_at(&mut buf, start_al)?;
    let from = mem_usize(offset - start_al);
    buf[from..from + data.len()].copy_from_slice(data);
    dev.write_at(&buf, start_al, fua)
}

impl Filesystem for VolumeFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent != ROOT {
            return reply.error(libc::ENOENT);
        }
        match name.to_str().and_then(|n| self.file_attr(n)) {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        if ino == ROOT {
            return reply.attr(&TTL, &self.dir_attr());
        }
        match self.name_of(ino).and_then(|n| self.file_attr(&n)) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.name_of(ino).and_then(|n| self.file_attr(&n)) else {
            return reply.error(libc::ENOENT);
        };
        // A volume's size is fixed; truncating to its own size (as `O_TRUNC`-less tools
        // sometimes do) is harmless.
        match size {
            Some(s) if s != attr.size => reply.error(libc::EPERM),
            _ => reply.attr(&TTL, &attr),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let Some((_, ro)) = self.volume(ino) else {
            return reply.error(libc::ENOENT);
        };
        if ro && (flags & libc::O_ACCMODE) != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        if let Some(name) = self.name_of(ino) {
            self.open_files.add(&name, true);
        }
        reply.opened(0, FOPEN_DIRECT_IO);
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(name) = self.name_of(ino) {
            self.open_files.add(&name, false);
        }
        reply.ok();
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some((dev, _)) = self.volume(ino) else {
            return reply.error(libc::ENOENT);
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        match read_bytes(&*dev, offset, u64::from(size).min(MAX_IO)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Some((dev, ro)) = self.volume(ino) else {
            return reply.error(libc::ENOENT);
        };
        if ro {
            return reply.error(libc::EROFS);
        }
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        let fua = if flags & (libc::O_SYNC | libc::O_DSYNC) != 0 {
            Fua::Yes
        } else {
            Fua::No
        };
        match write_bytes(&*dev, offset, data, fua) {
            Ok(()) => {
                #[allow(
                    clippy::cast_possible_truncation,
                    reason = "the kernel's write request carries its size as a u32"
                )]
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(e.errno()),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.volume(ino) {
            Some((dev, _)) => match dev.flush() {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e.errno()),
            },
            None => reply.error(libc::ENOENT),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let mut entries: Vec<(u64, FileType, String)> = vec![
            (ROOT, FileType::Directory, ".".into()),
            (ROOT, FileType::Directory, "..".into()),
        ];
        for n in self.source.names() {
            let i = self.ino_of(&n);
            entries.push((i, FileType::RegularFile, n));
        }
        // The offset is the kernel's: negative reads from the start, past the end reads none.
        let skip = usize::try_from(offset.max(0)).unwrap_or(usize::MAX);
        for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(i, i64::try_from(k + 1).unwrap_or(i64::MAX), kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted volume directory; unmounts when dropped.
pub struct Mount {
    _session: fuser::BackgroundSession,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mount")
    }
}

/// Mounts `source` on the directory `dir` (which must exist) and serves it on a background
/// thread until the returned [`Mount`] is dropped.
pub fn mount(source: Arc<dyn VolumeSource>, dir: &Path) -> std::io::Result<Mount> {
    mount_counting(source, dir, Arc::default())
}

/// [`mount`], counting the opens of each volume's file in `open_files`.
pub fn mount_counting(
    source: Arc<dyn VolumeSource>,
    dir: &Path,
    open_files: Arc<OpenFiles>,
) -> std::io::Result<Mount> {
    let meta = std::fs::metadata(dir)?;
    use std::os::unix::fs::MetadataExt;
    let fs = VolumeFs::new(source, meta.uid(), meta.gid()).with_open_files(open_files);
    let options = [
        MountOption::FSName("cowsnap".into()),
        MountOption::Subtype("cowsnap".into()),
        MountOption::NoExec,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::AllowRoot,
    ];
    let session = fuser::spawn_mount2(fs, dir, &options)?;
    Ok(Mount { _session: session })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cowsnap_core::dev::MemDevice;

    #[test]
    fn unaligned_byte_io_read_modify_writes() {
        let d = MemDevice::new(4096);
        write_bytes(&d, 100, &[7u8; 1000], Fua::No).unwrap();
        let back = read_bytes(&d, 0, 4096).unwrap();
        assert!(back[..100].iter().all(|&b| b == 0));
        assert!(back[100..1100].iter().all(|&b| b == 7));
        assert!(back[1100..].iter().all(|&b| b == 0));
        assert_eq!(
            read_bytes(&d, 4000, 500).unwrap().len(),
            96,
            "clipped at the end"
        );
        assert!(read_bytes(&d, 5000, 10).unwrap().is_empty());
        assert!(write_bytes(&d, 4000, &[1u8; 200], Fua::No).is_err());
    }
}
