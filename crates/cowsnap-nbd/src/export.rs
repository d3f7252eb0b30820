//! What the server exports: a [`BlockDevice`] plus the few facts NBD needs about it.
//!
//! [`Export`] extends [`BlockDevice`] with block status (`base:allocation`), a read-only
//! flag, whether a flush on one connection covers writes acknowledged on every connection
//! (`NBD_FLAG_CAN_MULTI_CONN`), fast zeroing (`NBD_CMD_FLAG_FAST_ZERO`, see
//! [`Export::zero_fast`]) and a description. Block status must be conservative: a range
//! may be reported as zero or as a hole only when it truly reads as zeros, because copy
//! tools skip such ranges. The default reports everything as data, which is always safe.
//!
//! [`DeviceExport`] wraps any device with those settings and offers two exact ways to find
//! zeros: asking the file system for holes (`SEEK_DATA`/`SEEK_HOLE` on a regular file) or
//! reading the range and looking (cheap for in-memory devices).
//!
//! **The fast-zero rule.** Zeroing is *fast* when it changes metadata only: no data of the
//! range is written and nothing is copied out first. An in-memory device drops its pages
//! ([`DeviceExport::fast_zero`]); a regular file has a hole punched
//! ([`DeviceExport::fast_zero_by_punching`]), which reads as zeros and which `SEEK_HOLE`
//! (so block status) then reports as a hole. An origin with snapshots is fast only where
//! every valid snapshot already holds its own copy of the range (the caller's condition
//! says so); a snapshot is never fast, since each zeroed chunk becomes an exception whose
//! zeros are written into the COW. A request that would be slow is refused at once with
//! `ENOTSUP` having changed nothing, as the protocol asks.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use cowsnap_core::dev::{BlockDevice, FileDevice, Fua, MemDevice};
use cowsnap_core::units::mem_usize;
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

    /// Zeroing `len` bytes without `NO_HOLE` may be faster than writing them (for example
    /// by punching a hole). When false, fast-zero requests fail at once with `ENOTSUP`.
    fn can_fast_zero(&self) -> bool {
        false
    }

    /// Zeroes `offset..offset+len` for a `WRITE_ZEROES` with `NBD_CMD_FLAG_FAST_ZERO`, but
    /// only if that is fast: metadata only, without writing the range's data and without
    /// copying anything out first. Returns `Ok(false)`, having changed nothing, when it
    /// would be slow; the client then gets `ENOTSUP` and zeroes its own way. The default
    /// zeroes with [`BlockDevice::write_zeroes`] when [`Export::can_fast_zero`] says that
    /// is fast.
    fn zero_fast(&self, offset: u64, len: u64, fua: Fua) -> Result<bool> {
        if !self.can_fast_zero() {
            return Ok(false);
        }
        self.write_zeroes(offset, len, fua)?;
        Ok(true)
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

/// Whether zeroing a range is fast right now (see [`DeviceExport::fast_zero_by_punching`]).
pub type FastZeroCondition = Arc<dyn Fn(u64, u64) -> bool + Send + Sync>;

/// Whether the file's holes are the device's right now (see
/// [`DeviceExport::holes_valid_while`]).
pub type HolesCondition = Arc<dyn Fn() -> bool + Send + Sync>;

/// How a [`DeviceExport`] zeroes fast.
enum FastZero {
    /// Never: fast-zero requests get `ENOTSUP`.
    Never,
    /// The device's `write_zeroes` is always fast.
    WriteZeroes,
    /// The device's discard punches a hole that reads as zeros; fast when the condition
    /// holds for the range.
    Punch(FastZeroCondition),
}

impl std::fmt::Debug for FastZero {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FastZero::Never => "Never",
            FastZero::WriteZeroes => "WriteZeroes",
            FastZero::Punch(_) => "Punch",
        })
    }
}

/// True when a discard failed because the device or file system cannot discard at all
/// (so nothing changed).
fn cannot_discard(e: &Error) -> bool {
    match e {
        Error::Io { cause, .. } => cause.raw_os_error() == Some(95),
        e => matches!(e, Error::Unsupported(_)),
    }
}

/// A [`BlockDevice`] exported with chosen settings.
#[derive(Debug)]
pub struct DeviceExport {
    dev: Arc<dyn BlockDevice>,
    read_only: bool,
    multi_conn: bool,
    fast_zero: FastZero,
    description: String,
    allocation: Allocation,
    holes_valid: Option<HolesValid>,
}

/// A [`HolesCondition`], printable.
struct HolesValid(HolesCondition);

impl std::fmt::Debug for HolesValid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HolesValid")
    }
}

impl DeviceExport {
    /// Exports `dev` writable, single-connection, with everything reported as data.
    pub fn new(dev: Arc<dyn BlockDevice>) -> Self {
        DeviceExport {
            dev,
            read_only: false,
            multi_conn: false,
            fast_zero: FastZero::Never,
            description: String::new(),
            allocation: Allocation::AllData,
            holes_valid: None,
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
    /// `fdatasync`); for a regular file, fast zeroing punches holes and holes are found
    /// with `SEEK_HOLE`.
    pub fn file(dev: FileDevice) -> Result<Self> {
        let path = dev.path().to_path_buf();
        let regular = std::fs::metadata(&path)
            .map_err(|e| Error::io("stat", 0, path.display().to_string(), e))?
            .is_file();
        let export = DeviceExport::new(Arc::new(dev)).multi_conn(true);
        if regular {
            Ok(export
                .fast_zero_by_punching(Arc::new(|_, _| true))
                .seek_holes(&path)?)
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

    /// Declares that the device's `write_zeroes` is always fast (metadata only, as for an
    /// in-memory device), or that zeroing is never fast.
    pub fn fast_zero(mut self, yes: bool) -> Self {
        self.fast_zero = if yes {
            FastZero::WriteZeroes
        } else {
            FastZero::Never
        };
        self
    }

    /// Zeroes fast by discarding: declares that the device's discard punches a hole that
    /// reads as zeros (a regular file, or an origin whose image is one), and that doing so
    /// is fast for a range when `when(offset, len)` holds (for an origin: no snapshot would
    /// copy the range out first). A device that cannot discard makes fast zeroing fail
    /// with `ENOTSUP`, having changed nothing.
    pub fn fast_zero_by_punching(mut self, when: FastZeroCondition) -> Self {
        self.fast_zero = FastZero::Punch(when);
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

    /// With [`seek_holes`](Self::seek_holes): the file's holes are the device's only while
    /// `cond` holds (an origin stops reading its file alone while a snapshot merges into
    /// it); otherwise zeros are found by reading the device.
    pub fn holes_valid_while(mut self, cond: HolesCondition) -> Self {
        self.holes_valid = Some(HolesValid(cond));
        self
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
            Allocation::SeekHoles(f) if self.holes_valid.as_ref().is_none_or(|c| (c.0)()) => {
                seek_extents(f, offset, len)
            }
            Allocation::SeekHoles(_) | Allocation::ScanZeroes => {
                scan_extents(&*self.dev, offset, len)
            }
        }
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn can_multi_conn(&self) -> bool {
        self.multi_conn
    }
    fn can_fast_zero(&self) -> bool {
        !matches!(self.fast_zero, FastZero::Never) && !self.read_only
    }
    fn zero_fast(&self, offset: u64, len: u64, fua: Fua) -> Result<bool> {
        if self.read_only {
            return Ok(false);
        }
        match &self.fast_zero {
            FastZero::Never => Ok(false),
            FastZero::WriteZeroes => {
                self.dev.write_zeroes(offset, len, fua)?;
                Ok(true)
            }
            FastZero::Punch(when) => {
                if !when(offset, len) {
                    return Ok(false);
                }
                match self.dev.discard(offset, len) {
                    Ok(()) => {}
                    Err(e) if cannot_discard(&e) => return Ok(false),
                    Err(e) => return Err(e),
                }
                if fua == Fua::Yes {
                    self.dev.flush()?;
                }
                Ok(true)
            }
        }
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
    let mut buf = vec![0u8; mem_usize(SCAN_BLOCK)];
    let mut pos = offset;
    while pos < end {
        let next = ((pos / SCAN_BLOCK + 1) * SCAN_BLOCK).min(end);
        // At most SCAN_BLOCK.
        let n = mem_usize(next - pos);
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

    #[test]
    fn fast_zero_punches_a_hole_only_when_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.img");
        let size = 8u64 << 20;
        let dev = FileDevice::create(&path, size).unwrap();
        dev.write_at(&vec![7u8; 4 << 20], 0, Fua::No).unwrap();
        let allow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let a = allow.clone();
        let e = DeviceExport::new(Arc::new(dev))
            .fast_zero_by_punching(Arc::new(move |_, _| {
                a.load(std::sync::atomic::Ordering::SeqCst)
            }))
            .seek_holes(&path)
            .unwrap();
        // Refused: nothing changes.
        assert!(!e.zero_fast(1 << 20, 1 << 20, Fua::No).unwrap());
        let mut b = vec![0u8; 1 << 20];
        e.read_at(&mut b, 1 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        // Allowed: zeros, and block status reports a hole there.
        allow.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(e.zero_fast(1 << 20, 1 << 20, Fua::Yes).unwrap());
        e.read_at(&mut b, 1 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let ext = e.block_status(1 << 20, 1 << 20);
        assert_eq!(ext, vec![Extent::hole(1 << 20)]);
        // Never fast: plain devices and read-only exports.
        let plain = DeviceExport::new(Arc::new(MemDevice::new(1 << 20)));
        assert!(!plain.can_fast_zero());
        assert!(!plain.zero_fast(0, 4096, Fua::No).unwrap());
        let ro = e.read_only(true);
        assert!(!ro.zero_fast(0, 4096, Fua::No).unwrap());
    }
}
