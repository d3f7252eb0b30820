//! Block devices: the positional, thread-safe I/O interface every layer is built on.
//!
//! A [`BlockDevice`] has no cursor; every call names its byte offset, and calls may come from
//! many threads at once. Implementations: [`FileDevice`] (a file or a block device, with
//! positional I/O), [`MemDevice`] (sparse, in memory) and [`PrezeroDevice`] (writes zeros
//! ahead of a file that fills from the front, so data lands in written blocks). Targets are
//! devices too.
//!
//! For tests only (this crate's tests and the `test-util` feature, like the test kit,
//! `cowsnap_core::testkit`): `FaultyDevice` (fails chosen ranges or the Nth
//! operation, counts operations), `GatedDevice` (holds chosen operations until a test
//! releases them, so that races are reproduced in a chosen order) and `CrashDevice` with
//! its `PowerDomain` (durable vs. volatile writes, crash and tear).

pub mod aligned;
pub mod claim;
#[cfg(any(test, feature = "test-util"))]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test-only device: it holds the whole device in memory, so offsets fit a usize"
)]
mod crash;
#[cfg(any(test, feature = "test-util"))]
mod faulty;
mod file;
#[cfg(any(test, feature = "test-util"))]
mod gated;
mod mem;
mod prezero;

pub use aligned::AlignedBuf;
pub use claim::FileId;
#[cfg(any(test, feature = "test-util"))]
pub use crash::{CrashDevice, PowerDomain};
#[cfg(any(test, feature = "test-util"))]
pub use faulty::{FaultRule, FaultyDevice, OpKind};
pub use file::FileDevice;
#[cfg(any(test, feature = "test-util"))]
pub use gated::{Gate, GatedDevice};
pub use mem::MemDevice;
pub use prezero::PrezeroDevice;

use crate::error::{Error, Result};
use crate::units::{is_sector_aligned, mem_usize};

/// Force unit access: when set, a write is durable once it returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fua {
    /// Durable only after a later successful [`BlockDevice::flush`].
    #[default]
    No,
    /// Durable when the write returns `Ok`.
    Yes,
}

impl From<bool> for Fua {
    /// A protocol's FUA flag.
    fn from(fua: bool) -> Fua {
        if fua {
            Fua::Yes
        } else {
            Fua::No
        }
    }
}

/// A block device with positional, thread-safe I/O and no cursor.
///
/// **Durability contract.** Writes that return `Ok` between two flushes may reach stable
/// media in any order, and a crash may tear any of them at sector granularity. When
/// [`flush`](Self::flush) returns `Ok`, every write that returned `Ok` before the flush was
/// called is durable. A write with [`Fua::Yes`] is durable when it returns `Ok`. Reads see
/// every write that returned `Ok` before the read was issued; concurrent writes to the same
/// sectors have no defined order.
///
/// **Requests.** Offsets and lengths are in bytes, multiples of 512, and inside
/// `0..size()`; implementations check this with [`check_request`] and answer
/// [`Error::Misaligned`] or [`Error::OutOfRange`].
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Size in bytes (a multiple of 512).
    fn size(&self) -> u64;

    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset`; durable on return when `fua` is [`Fua::Yes`].
    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()>;

    /// Makes every write that returned before this call durable.
    fn flush(&self) -> Result<()>;

    /// Tells the device that `offset..offset+len` is no longer needed. What it reads
    /// afterwards is unspecified unless the device documents it (files read zeros).
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self.size(), offset, len)?;
        Err(Error::Unsupported("discard"))
    }

    /// Makes `offset..offset+len` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        check_request(self.size(), offset, len)?;
        write_zeroes_by_writing(self, offset, len, fua)
    }

    /// A short human-readable name for messages (a path, `mem`, ...).
    fn describe(&self) -> String {
        format!("{self:?}")
    }
}

const ZERO_BUF: u64 = 1 << 20;

/// Zeroes `offset..offset+len` of `dev` with ordinary writes of zeros (at most 1 MiB each,
/// from an aligned buffer, so O_DIRECT devices take them), then flushes when `fua` asks:
/// the fallback for devices that cannot zero a range by metadata.
pub fn write_zeroes_by_writing(
    dev: &(impl BlockDevice + ?Sized),
    offset: u64,
    len: u64,
    fua: Fua,
) -> Result<()> {
    let zeros = AlignedBuf::zeroed(mem_usize(ZERO_BUF.min(len)));
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        dev.write_at(&zeros[..mem_usize(n)], offset + done, Fua::No)?;
        done += n;
    }
    if fua == Fua::Yes {
        dev.flush()?;
    }
    Ok(())
}

/// Checks that `offset..offset+len` is sector-aligned and inside a device of `size` bytes.
pub fn check_request(size: u64, offset: u64, len: u64) -> Result<()> {
    if !is_sector_aligned(offset) || !is_sector_aligned(len) {
        return Err(Error::Misaligned { offset, len });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        (**self).write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        (**self).write_zeroes(offset, len, fua)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        assert!(check_request(4096, 0, 4096).is_ok());
        assert!(matches!(
            check_request(4096, 512, 4096),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            check_request(4096, 1, 512),
            Err(Error::Misaligned { .. })
        ));
        assert!(matches!(
            check_request(4096, u64::MAX - 511, 512),
            Err(Error::OutOfRange { .. })
        ));
    }
}
