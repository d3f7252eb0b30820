//! A sparse in-memory device: pages allocated on first write, each behind its own lock.
//!
//! Unwritten pages read as zeros. Flush is a no-op (memory is as durable as it gets); the
//! crash-simulating device builds on top of it to model what a flush means.

use parking_lot::RwLock;

use super::{check_request, BlockDevice, Fua};
use crate::error::Result;
use crate::units::{mem_usize, Sector, SECTOR_SIZE};

const PAGE_SHIFT: u32 = 16;
const PAGE: u64 = 1 << PAGE_SHIFT;

/// One page: absent until first written.
type Page = RwLock<Option<Box<[u8]>>>;

/// A sparse in-memory block device.
pub struct MemDevice {
    size: u64,
    pages: Box<[Page]>,
}

impl std::fmt::Debug for MemDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemDevice({} bytes)", self.size)
    }
}

impl MemDevice {
    /// A zero-filled device of `size` bytes (rounded up to a sector).
    pub fn new(size: u64) -> Self {
        let size = Sector(size.div_ceil(SECTOR_SIZE)).bytes();
        // A size this target cannot index fails the allocation instead of wrapping.
        let n = usize::try_from(size.div_ceil(PAGE)).unwrap_or(usize::MAX);
        MemDevice {
            size,
            pages: (0..n).map(|_| RwLock::new(None)).collect(),
        }
    }

    /// A device holding a copy of `data` (its length rounded up to a sector with zeros).
    pub fn from_bytes(data: &[u8]) -> Self {
        let dev = MemDevice::new(data.len() as u64);
        let mut padded = data.to_vec();
        padded.resize(mem_usize(dev.size), 0);
        // In range and aligned by construction.
        let _ = dev.write_at(&padded, 0, Fua::No);
        dev
    }

    /// The whole contents.
    pub fn to_vec(&self) -> Vec<u8> {
        // A device larger than this target can address fails the allocation.
        let mut v = vec![0u8; usize::try_from(self.size).unwrap_or(usize::MAX)];
        let _ = self.read_at(&mut v, 0);
        v
    }

    fn for_each_page(&self, offset: u64, len: u64, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let page = (pos >> PAGE_SHIFT) as usize;
            let in_page = (pos & (PAGE - 1)) as usize;
            // At most a page, and an offset inside the caller's buffer.
            let n = mem_usize((PAGE - (pos & (PAGE - 1))).min(len - done));
            f(page, in_page, mem_usize(done), n);
            done += n as u64;
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(self.size, offset, buf.len() as u64)?;
        self.for_each_page(offset, buf.len() as u64, |page, at, b, n| {
            let dst = &mut buf[b..b + n];
            match &*self.pages[page].read() {
                Some(p) => dst.copy_from_slice(&p[at..at + n]),
                None => dst.fill(0),
            }
        });
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: Fua) -> Result<()> {
        check_request(self.size, offset, buf.len() as u64)?;
        self.for_each_page(offset, buf.len() as u64, |page, at, b, n| {
            let mut slot = self.pages[page].write();
            let p = slot.get_or_insert_with(|| vec![0u8; mem_usize(PAGE)].into_boxed_slice());
            p[at..at + n].copy_from_slice(&buf[b..b + n]);
        });
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, Fua::No)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: Fua) -> Result<()> {
        check_request(self.size, offset, len)?;
        self.for_each_page(offset, len, |page, at, _, n| {
            let mut slot = self.pages[page].write();
            if at == 0 && n as u64 == PAGE {
                *slot = None;
            } else if let Some(p) = slot.as_mut() {
                p[at..at + n].fill(0);
            }
        });
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
mod tests {
    use super::*;

    #[test]
    fn mem_device_is_sparse_and_crosses_pages() {
        let d = MemDevice::new(3 * PAGE);
        let data: Vec<u8> = (0..PAGE as usize + 1024).map(|i| (i % 251) as u8).collect();
        d.write_at(&data, PAGE - 512, Fua::No).unwrap();
        let mut back = vec![0u8; data.len()];
        d.read_at(&mut back, PAGE - 512).unwrap();
        assert_eq!(back, data);
        let mut z = vec![1u8; 512];
        d.read_at(&mut z, 0).unwrap();
        assert!(z.iter().all(|&b| b == 0));
        d.write_zeroes(0, 3 * PAGE, Fua::No).unwrap();
        assert!(d.to_vec().iter().all(|&b| b == 0));
    }
}
