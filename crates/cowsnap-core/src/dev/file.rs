//! A file or a block device, accessed with positional I/O (`pread`/`pwrite`).
//!
//! Flush is `fdatasync`; FUA is a write followed by `fdatasync`. Discard punches a hole in a
//! regular file (it then reads zeros); on a block device it is unsupported for now.
//! Write-zeroes uses `FALLOC_FL_ZERO_RANGE` (blocks stay allocated) where it can.
//!
//! With [`FileDevice::open_direct`] the file is opened `O_DIRECT`: I/O bypasses the page
//! cache, as `qemu-nbd --cache=none` does. Buffers that do not start on a 512-byte address
//! go through an aligned bounce buffer ([`AlignedBuf`]); callers on the hot path pass
//! aligned buffers and pay no copy.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::FallocateFlags;

use super::aligned::{is_aligned, AlignedBuf};
use super::{check_request, BlockDevice, Fua};
use crate::error::{Error, Result};
use crate::units::{is_sector_aligned, mem_usize};

/// A file or block device used as a [`BlockDevice`].
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
    regular: bool,
    read_only: bool,
    direct: bool,
}

/// Memory alignment `O_DIRECT` needs here (the logical block size of the devices we run on).
const DIRECT_ALIGN: usize = 512;

impl FileDevice {
    /// Opens an existing file or block device for reading and writing.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path.as_ref(), false, false, false)
    }

    /// Opens an existing file or block device read-only; writes fail.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path.as_ref(), true, false, false)
    }

    /// Opens an existing file or block device for reading and writing with `O_DIRECT`
    /// (no page cache). Fails if the file system refuses `O_DIRECT` or needs more than
    /// 512-byte alignment.
    pub fn open_direct(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_direct_with(path.as_ref(), false)
    }

    fn open_direct_with(path: &Path, exclusive: bool) -> Result<Self> {
        Self::open_direct_flags(path, exclusive, false)
    }

    fn open_direct_flags(path: &Path, exclusive: bool, sync: bool) -> Result<Self> {
        let dev = Self::open_flags(path, false, true, exclusive, sync)?;
        // Probe: a 512-byte read at 0 into an aligned buffer.
        if dev.size >= 512 {
            let mut probe = AlignedBuf::zeroed(512);
            dev.file.read_exact_at(&mut probe, 0).map_err(|e| {
                Error::InvalidArgument(format!(
                    "{}: O_DIRECT with 512-byte alignment does not work here ({e}); run without direct I/O",
                    dev.path.display()
                ))
            })?;
        }
        Ok(dev)
    }

    /// Opens a volume for exclusive use by this process: a block device `O_EXCL` (refused
    /// while it is mounted or held by another exclusive user), and either kind claimed with
    /// QEMU-compatible locks (see [`claim`](super::claim)). `direct` as
    /// [`open_direct`](Self::open_direct).
    pub fn open_exclusive(path: impl AsRef<Path>, direct: bool) -> Result<Self> {
        let path = path.as_ref();
        let dev = if direct {
            Self::open_direct_with(path, true)?
        } else {
            Self::open_with(path, false, false, true)?
        };
        super::claim::claim(&dev.file, &dev.path.display().to_string())?;
        Ok(dev)
    }

    /// [`open_exclusive`](Self::open_exclusive) for a device whose write errors must come
    /// back to the write that failed (the device under a bad-block relocation layer):
    /// `O_DIRECT | O_DSYNC`, so a write goes to the device and is durable when it returns.
    /// Through the page cache a failing write succeeds, and its error surfaces later, to
    /// whichever write or flush of the file checks first. Where the file system refuses
    /// `O_DIRECT` (tmpfs: memory has no bad blocks) it falls back to `O_DSYNC`; see
    /// [`is_direct`](Self::is_direct).
    pub fn open_exclusive_sync(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let dev = match Self::open_direct_flags(path, true, true) {
            Ok(dev) => dev,
            Err(Error::InvalidArgument(_)) => Self::open_flags(path, false, false, true, true)?,
            Err(Error::Io { cause, .. }) if cause.raw_os_error() == Some(libc::EINVAL) => {
                Self::open_flags(path, false, false, true, true)?
            }
            Err(e) => return Err(e),
        };
        super::claim::claim(&dev.file, &dev.path.display().to_string())?;
        Ok(dev)
    }

    fn open_with(path: &Path, read_only: bool, direct: bool, exclusive: bool) -> Result<Self> {
        Self::open_flags(path, read_only, direct, exclusive, false)
    }

    fn open_flags(
        path: &Path,
        read_only: bool,
        direct: bool,
        exclusive: bool,
        sync: bool,
    ) -> Result<Self> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let name = path.display().to_string();
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        let mut flags = rustix::fs::OFlags::empty();
        if direct {
            flags |= rustix::fs::OFlags::DIRECT;
        }
        if sync {
            flags |= rustix::fs::OFlags::DSYNC;
        }
        let block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        if exclusive && block {
            flags |= rustix::fs::OFlags::EXCL;
        }
        #[allow(
            clippy::cast_possible_wrap,
            reason = "open(2) flags are a bit set: the same bits as a C int, as the kernel reads them"
        )]
        opts.custom_flags(flags.bits() as i32);
        let file = opts.open(path).map_err(|e| {
            if exclusive && block && e.raw_os_error() == Some(libc::EBUSY) {
                busy_device(path)
            } else {
                Error::io("open", 0, name.clone(), e)
            }
        })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat", 0, name.clone(), e))?;
        let regular = meta.file_type().is_file();
        let size = if regular {
            meta.len()
        } else {
            // A block device: its size is where a seek to the end lands.
            use std::io::{Seek, SeekFrom};
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|e| Error::io("seek", 0, name.clone(), e))?
        };
        if !is_sector_aligned(size) {
            return Err(Error::InvalidArgument(format!(
                "{name}: size {size} bytes is not a multiple of 512"
            )));
        }
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            size,
            regular,
            read_only,
            direct,
        })
    }

    /// True for a regular file (not a block device).
    pub fn is_regular(&self) -> bool {
        self.regular
    }

    /// True when opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Creates (or truncates) a sparse regular file of `size` bytes.
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        if !is_sector_aligned(size) {
            return Err(Error::InvalidArgument(format!(
                "{name}: size {size} bytes is not a multiple of 512"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io("create", 0, name.clone(), e))?;
        file.set_len(size)
            .map_err(|e| Error::io("truncate", size, name, e))?;
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            size,
            regular: true,
            read_only: false,
            direct: false,
        })
    }

    /// Where the file's data ends: every byte from here on reads as zeros (holes and
    /// unwritten extents, found with `SEEK_DATA`/`SEEK_HOLE`). A block device, or a file
    /// system that cannot tell, answers its size.
    pub fn data_end(&self) -> u64 {
        use rustix::fs::{seek, SeekFrom};
        if !self.regular {
            return self.size;
        }
        let mut pos = 0;
        let mut end = 0;
        while pos < self.size {
            match seek(&self.file, SeekFrom::Data(pos)) {
                Ok(data) => match seek(&self.file, SeekFrom::Hole(data)) {
                    Ok(hole) if hole > data => {
                        end = hole.min(self.size);
                        pos = hole;
                    }
                    _ => return self.size,
                },
                Err(rustix::io::Errno::NXIO) => break,
                Err(_) => return self.size,
            }
        }
        end
    }

    /// What the open file is (device and inode, or the block device number).
    pub fn id(&self) -> Result<super::FileId> {
        super::FileId::of_file(&self.file, &self.path.display().to_string())
    }

    /// True when every byte reads as zero. A regular file's holes are skipped; its data
    /// and a block device are read through, 1 MiB at a time.
    pub fn is_zeroed(&self) -> Result<bool> {
        use rustix::fs::{seek, SeekFrom};
        let mut buf = AlignedBuf::zeroed(1 << 20);
        let mut pos = 0;
        while pos < self.size {
            let (start, end) = if self.regular {
                match seek(&self.file, SeekFrom::Data(pos)) {
                    Ok(data) => {
                        let hole = seek(&self.file, SeekFrom::Hole(data)).unwrap_or(self.size);
                        (data, hole.min(self.size))
                    }
                    Err(rustix::io::Errno::NXIO) => return Ok(true),
                    Err(_) => (pos, self.size),
                }
            } else {
                (pos, self.size)
            };
            let mut at = start;
            while at < end {
                let n = mem_usize((end - at).min(buf.len() as u64));
                self.read_at(&mut buf[..n], at)?;
                if buf[..n].iter().any(|&b| b != 0) {
                    return Ok(false);
                }
                at += n as u64;
            }
            pos = end.max(pos + 1);
        }
        Ok(true)
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, op: &'static str, offset: u64, e: std::io::Error) -> Error {
        Error::io(op, offset, self.path.display().to_string(), e)
    }
}

/// The error for a block device the kernel refuses to open `O_EXCL`.
fn busy_device(path: &Path) -> Error {
    use std::os::unix::fs::MetadataExt;
    let mounts = std::fs::metadata(path)
        .map(|m| super::claim::mount_points(m.rdev()))
        .unwrap_or_default();
    let why = if mounts.is_empty() {
        "another program holds it exclusively (a file system, device-mapper, md, or another cowsnap)".to_string()
    } else {
        format!("it is mounted on {}", mounts.join(", "))
    };
    Error::InUse(format!(
        "{} is in use: {why}; unmount or release it first (cowsnap must be the only writer of its volumes)",
        path.display()
    ))
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(self.size, offset, buf.len() as u64)?;
        if self.direct && !is_aligned(buf, DIRECT_ALIGN) {
            let mut bounce = AlignedBuf::zeroed(buf.len());
            self.file
                .read_exact_at(&mut bounce, offset)
                .map_err(|e| self.err("read", offset, e))?;
            buf.copy_from_slice(&bounce);
            return Ok(());
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.err("read", offset, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        check_request(self.size, offset, buf.len() as u64)?;
        if self.read_only {
            return Err(Error::Unsupported("write to a read-only device"));
        }
        let result = if self.direct && !is_aligned(buf, DIRECT_ALIGN) {
            let mut bounce = AlignedBuf::zeroed(buf.len());
            bounce.copy_from_slice(buf);
            self.file.write_all_at(&bounce, offset)
        } else {
            self.file.write_all_at(buf, offset)
        };
        result.map_err(|e| self.err("write", offset, e))?;
        if fua == Fua::Yes {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| self.err("flush", 0, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self.size, offset, len)?;
        if !self.regular || self.read_only {
            return Err(Error::Unsupported("discard"));
        }
        if len == 0 {
            return Ok(());
        }
        rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(|e| self.err("discard", offset, e.into()))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        check_request(self.size, offset, len)?;
        if self.regular && !self.read_only && len > 0 {
            // Zeroes the range in the file's metadata and keeps its blocks allocated (a
            // discard, not this, gives space back). Falls back to writing zeros where the
            // file system cannot.
            match rustix::fs::fallocate(
                &self.file,
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => {
                    if fua == Fua::Yes {
                        self.flush()?;
                    }
                    return Ok(());
                }
                Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::INVAL) => {}
                Err(e) => return Err(self.err("write_zeroes", offset, e.into())),
            }
        }
        super::write_zeroes_by_writing(self, offset, len, fua)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_device_is_opened_dsync_and_direct_where_it_can_be() {
        let dir = crate::testkit::scratch("filedev-sync");
        let path = dir.join("f");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let dev = FileDevice::open_exclusive_sync(&path).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&dev.file);
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        let dsync = rustix::fs::OFlags::DSYNC.bits();
        assert_ne!(flags & dsync, 0, "O_DSYNC: {flags:o}");
        let direct = rustix::fs::OFlags::DIRECT.bits();
        assert_eq!(flags & direct != 0, dev.is_direct(), "{flags:o}");
        let data = AlignedBuf::zeroed(4096);
        dev.write_at(&data, 4096, Fua::No).unwrap();
        // A second exclusive open is refused: the claim holds.
        assert!(FileDevice::open_exclusive_sync(&path).is_err());
    }

    #[test]
    fn file_device_round_trips_and_punches_holes() {
        let dir = crate::testkit::scratch("filedev");
        let path = dir.join("a.img");
        let dev = FileDevice::create(&path, 1 << 20).unwrap();
        dev.write_at(&[7u8; 4096], 8192, Fua::Yes).unwrap();
        let mut buf = [0u8; 4096];
        dev.read_at(&mut buf, 8192).unwrap();
        assert_eq!(buf, [7u8; 4096]);
        dev.write_zeroes(8192, 4096, Fua::No).unwrap();
        dev.read_at(&mut buf, 8192).unwrap();
        assert_eq!(buf, [0u8; 4096]);
        assert!(dev.read_at(&mut buf, (1 << 20) - 512).is_err());
        drop(dev);
        let ro = FileDevice::open_read_only(&path).unwrap();
        assert_eq!(ro.size(), 1 << 20);
        assert!(ro.write_at(&buf, 0, Fua::No).is_err());
    }

    #[test]
    fn direct_io_works_with_aligned_and_misaligned_buffers() {
        let dir = crate::testkit::scratch("direct");
        let path = dir.join("d.img");
        drop(FileDevice::create(&path, 1 << 20).unwrap());
        let dev = FileDevice::open_direct(&path).unwrap();
        assert!(dev.is_direct());
        let mut aligned = AlignedBuf::zeroed(8192);
        aligned.fill(3);
        dev.write_at(&aligned, 4096, Fua::No).unwrap();
        // A buffer one byte off any alignment goes through the bounce buffer.
        let mut raw = vec![0u8; 1025];
        let odd = &mut raw[1..];
        odd.fill(5);
        dev.write_at(odd, 65536, Fua::Yes).unwrap();
        let mut back = vec![0u8; 1025];
        dev.read_at(&mut back[1..], 4096).unwrap();
        assert!(back[1..].iter().all(|&b| b == 3));
        let mut a = AlignedBuf::zeroed(1024);
        dev.read_at(&mut a, 65536).unwrap();
        assert!(a.iter().all(|&b| b == 5));
    }
}
