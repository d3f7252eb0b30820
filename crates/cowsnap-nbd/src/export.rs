//! What the server exports: a [`BlockDevice`] plus the few facts NBD needs about it.
//!
//! [`Export`] extends [`BlockDevice`] with block status (`base:allocation`), a read-only
//! flag, whether a flush on one connection covers writes acknowledged on every connection
//! (`NBD_FLAG_CAN_MULTI_CONN`), whether zeroing is fast (`NBD_CMD_FLAG_FAST_ZERO`) and a
//! description. Block status must be conservative: a range may be reported as zero or as a
//! hole only when it truly reads as zeros, because copy tools skip such ranges. The default
//! reports everything as data, which is always safe.
//!
//! [`DeviceExport`] wraps any device with those settings and offers two exact ways to find
//! zeros: asking the file system for holes (`SEEK_DATA`/`SEEK_HOLE` on a regular file) or
//! reading the range and looking (cheap for in-memory devices).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use cowsnap_core::dev::{BlockDevice, FileDevice, Fua, MemDevice};
use cowsnap_core::{Error, Result};

use crate::codec::consts::{STATE_HOLE, STATE_ZERO};

/// One block status extent: `length` bytes with `base:allocation` flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// `NBD_STATE_HOLE` / `NBD_STATE_ZERO` bits.
    pub flags: u32,
}

impl Extent {
    /// Allocated data (or unknown): flags 0, always a safe answer.
    pub fn data(length: u64) -> Self {
        Extent { length, flags: 0 }
    }

    /// Allocated, but known to read as zeros.
    pub fn zero(length: u64) -> Self {
        Extent {
            length,
            flags: STATE_ZERO,
        }
    }

    /// Not allocated, reads as zeros.
    pub fn hole(length: u64) -> Self {
        Extent {
            length,
            flags: STATE_HOLE | STATE_ZERO,
        }
    }
}

/// A block device the NBD server can export.
pub trait Export: BlockDevice {
    /// Allocation status of `offset..offset+len`, as consecutive extents from `offset`.
    ///
    /// May cover less than `len` (the client asks again from where the answer ends) but
    /// should cover at least one sector. Report `STATE_ZERO` or `STATE_HOLE` only for
    /// ranges that read as zeros; when unsure, report data.
    fn block_status(&self, offset: u64, len: u64) -> Vec<Extent> {
        let _ = offset;
        vec![Extent::data(len)]
    }

    /// Writes, trims and zeroing are refused with `EPERM`.
    fn is_read_only(&self) -> bool {
        false
    }

    /// A flush on any connection covers writes acknowledged on every connection, so
    /// clients may spread requests over several connections.
    fn can_multi_conn(&self) -> bool {
        false
    }

    /// Zeroing `len` bytes without `NO_HOLE` is faster than writing them (for example
    /// by punching a hole). When false, fast-zero requests fail at once with `ENOTSUP`.
    fn can_fast_zero(&self) -> bool {
        false
    }

    /// Human-readable description for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> String {
        String::new()
    }
}

/// How a [`DeviceExport`] finds ranges that read as zeros.
#[derive(Debug)]
enum Allocation {
    /// Report everything as data.
    AllData,
    /// Ask the file system (the file is a read-only handle on the device's file).
    SeekHoles(File),
    /// Read the range and report all-zero blocks as zero.
    ScanZeroes,
}

/// Granularity of zero scanning (and the most a scan reads per query).
const SCAN_BLOCK: u64 = 64 * 1024;
const SCAN_LIMIT: u64 = 64 << 20;

/// A [`BlockDevice`] exported with chosen settings.
#[derive(Debug)]
pub struct DeviceExport {
    dev: Arc<dyn BlockDevice>,
    read_only: bool,
    multi_conn: bool,
    fast_zero: bool,
    description: String,
    allocation: Allocation,
}

impl DeviceExport {
    /// Exports `dev` writable, single-connection, with everything reported as data.
    pub fn new(dev: Arc<dyn BlockDevice>) -> Self {
        DeviceExport {
            dev,
            read_only: false,
            multi_conn: false,
            fast_zero: false,
            description: String::new(),
            allocation: Allocation::AllData,
        }
    }

    /// Exports an in-memory device: multi-connection (it has no cache), fast zeroing,
    /// zeros found by scanning.
    pub fn memory(dev: MemDevice) -> Self {
        DeviceExport::new(Arc::new(dev))
            .multi_conn(true)
            .fast_zero(true)
            .scan_zeroes()
    }

    /// Exports a file or block device: multi-connection (its flush is a device-wide
    /// `fdatasync`); for a regular file, zeroing punches holes (fast) and holes are found
    /// with `SEEK_HOLE`.
    pub fn file(dev: FileDevice) -> Result<Self> {
        let path = dev.path().to_path_buf();
        let regular = std::fs::metadata(&path)
            .map_err(|e| Error::io("stat", 0, path.display().to_string(), e))?
            .is_file();
        let export = DeviceExport::new(Arc::new(dev)).multi_conn(true);
        if regular {
            Ok(export.fast_zero(true).seek_holes(&path)?)
        } else {
            Ok(export)
        }
    }

    /// Refuses writes.
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    /// Declares that a flush covers writes from every connection.
    pub fn multi_conn(mut self, yes: bool) -> Self {
        self.multi_conn = yes;
        self
    }

    /// Declares that zeroing without `NO_HOLE` is fast.
    pub fn fast_zero(mut self, yes: bool) -> Self {
        self.fast_zero = yes;
        self
    }

    /// Sets the description.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = text.into();
        self
    }

    /// Finds zeros by reading the queried range (at most 64 MiB per query).
    pub fn scan_zeroes(mut self) -> Self {
        self.allocation = Allocation::ScanZeroes;
        self
    }

    /// Finds holes with `SEEK_DATA`/`SEEK_HOLE` on the regular file at `path`, which must
    /// be the file the device reads.
    pub fn seek_holes(mut self, path: &Path) -> Result<Self> {
        let f =
            File::open(path).map_err(|e| Error::io("open", 0, path.display().to_string(), e))?;
        self.allocation = Allocation::SeekHoles(f);
        Ok(self)
    }

    /// The wrapped device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::Unsupported("write to a read-only export"))
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for DeviceExport {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        self.check_writable()?;
        self.dev.write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<()> {
        self.dev.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.dev.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        self.check_writable()?;
        self.dev.write_zeroes(offset, len, fua)
    }
    fn describe(&self) -> String {
        self.dev.describe()
    }
}

impl Export for DeviceExport {
    fn block_status(&self, offset: u64, len: u64) -> Vec<Extent> {
        let len = len.min(self.size().saturating_sub(offset));
        match &self.allocation {
            Allocation::AllData => vec![Extent::data(len)],
            Allocation::SeekHoles(f) => seek_extents(f, offset, len),
            Allocation::ScanZeroes => scan_extents(&*self.dev, offset, len),
        }
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn can_multi_conn(&self) -> bool {
        self.multi_conn
    }
    fn can_fast_zero(&self) -> bool {
        self.fast_zero && !self.read_only
    }
    fn description(&self) -> String {
        self.description.clone()
    }
}

/// Appends an extent, merging it with the previous one when the flags match.
fn push(v: &mut Vec<Extent>, e: Extent) {
    if e.length == 0 {
        return;
    }
    match v.last_mut() {
        Some(last) if last.flags == e.flags => last.length += e.length,
        _ => v.push(e),
    }
}

/// Extents from the file system's idea of holes; any error means "data".
fn seek_extents(f: &File, offset: u64, len: u64) -> Vec<Extent> {
    use rustix::fs::{seek, SeekFrom};
    let end = offset.saturating_add(len);
    let mut v = Vec::new();
    let mut pos = offset;
    while pos < end {
        match seek(f, SeekFrom::Data(pos)) {
            Ok(data) if data > pos => {
                let h = data.min(end);
                push(&mut v, Extent::hole(h - pos));
                pos = h;
            }
            Ok(_) => match seek(f, SeekFrom::Hole(pos)) {
                Ok(hole) if hole > pos => {
                    let d = hole.min(end);
                    push(&mut v, Extent::data(d - pos));
                    pos = d;
                }
                _ => {
                    push(&mut v, Extent::data(end - pos));
                    pos = end;
                }
            },
            // No data at or after `pos`: the rest of the file is a hole.
            Err(rustix::io::Errno::NXIO) => {
                push(&mut v, Extent::hole(end - pos));
                pos = end;
            }
            Err(_) => {
                push(&mut v, Extent::data(end - pos));
                pos = end;
            }
        }
    }
    v
}

fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Extents found by reading: all-zero blocks are `STATE_ZERO`, the rest data.
fn scan_extents(dev: &dyn BlockDevice, offset: u64, len: u64) -> Vec<Extent> {
    let end = offset.saturating_add(len.min(SCAN_LIMIT));
    let mut v = Vec::new();
    let mut buf = vec![0u8; SCAN_BLOCK as usize];
    let mut pos = offset;
    while pos < end {
        let next = ((pos / SCAN_BLOCK + 1) * SCAN_BLOCK).min(end);
        let n = (next - pos) as usize;
        let Some(chunk) = buf.get_mut(..n) else {
            break;
        };
        let e = match dev.read_at(chunk, pos) {
            Ok(()) if is_zero(chunk) => Extent::zero(next - pos),
            _ => Extent::data(next - pos),
        };
        push(&mut v, e);
        pos = next;
    }
    if v.is_empty() {
        v.push(Extent::data(len));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_block_status_is_all_data() {
        #[derive(Debug)]
        struct Plain(MemDevice);
        impl BlockDevice for Plain {
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
                self.0.read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
                self.0.write_at(buf, offset, fua)
            }
            fn flush(&self) -> Result<()> {
                Ok(())
            }
        }
        impl Export for Plain {}
        let p = Plain(MemDevice::new(1 << 20));
        assert_eq!(p.block_status(0, 4096), vec![Extent::data(4096)]);
        assert!(!p.is_read_only() && !p.can_multi_conn() && !p.can_fast_zero());
    }

    #[test]
    fn scanning_reports_only_true_zeros() {
        let dev = MemDevice::new(1 << 20);
        dev.write_at(&[1u8; 512], 3 * SCAN_BLOCK + 512, Fua::No)
            .unwrap();
        let e = DeviceExport::memory(dev);
        assert_eq!(
            e.block_status(0, 1 << 20),
            vec![
                Extent::zero(3 * SCAN_BLOCK),
                Extent::data(SCAN_BLOCK),
                Extent::zero((1 << 20) - 4 * SCAN_BLOCK)
            ]
        );
        // Unaligned start and a range past the end are clipped.
        assert_eq!(
            e.block_status(SCAN_BLOCK + 512, 1 << 30),
            vec![
                Extent::zero(2 * SCAN_BLOCK - 512),
                Extent::data(SCAN_BLOCK),
                Extent::zero((1 << 20) - 4 * SCAN_BLOCK)
            ]
        );
    }

    #[test]
    fn seek_holes_on_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let size = 4u64 << 20;
        let dev = FileDevice::create(&path, size).unwrap();
        dev.write_at(&vec![7u8; 1 << 20], 1 << 20, Fua::No).unwrap();
        let e = DeviceExport::file(dev).unwrap();
        assert!(e.can_multi_conn() && e.can_fast_zero());
        let ext = e.block_status(0, size);
        assert_eq!(ext.iter().map(|x| x.length).sum::<u64>(), size);
        // Whatever the file system's granularity, the written MiB is data and the
        // first byte is a hole.
        let mut pos = 0;
        for x in &ext {
            if x.flags & STATE_ZERO != 0 {
                assert!(pos + x.length <= 1 << 20 || pos >= 2 << 20, "{ext:?}");
            }
            pos += x.length;
        }
        assert_eq!(ext[0].flags, STATE_HOLE | STATE_ZERO);
        let ro = e.read_only(true);
        assert!(ro.write_at(&[0; 512], 0, Fua::No).is_err());
        assert!(!ro.can_fast_zero());
    }
}
