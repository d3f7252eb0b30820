//! `test-error`: EIO for every read, write, discard and write-zeroes that overlaps sectors
//! `start..start+sectors` (dm-error, restricted to a range); everything else, flushes
//! included, passes to the device below unchanged. A request that overlaps the range fails
//! whole: nothing of it reaches the device below.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::json;

use super::{eio, no_messages, Layer, LayerSpec};
use crate::dev::{check_request, BlockDevice, Fua};
use crate::error::Result;
use crate::units::SECTOR_SIZE;

/// Fails a range of sectors.
#[derive(Debug)]
pub(super) struct ErrorLayer {
    below: Arc<dyn BlockDevice>,
    start: u64,
    sectors: u64,
    /// Requests failed so far.
    errors: AtomicU64,
}

impl ErrorLayer {
    /// The caller checked the range with `LayerSpec::size_over`.
    pub(super) fn new(below: Arc<dyn BlockDevice>, start: u64, sectors: u64) -> Self {
        ErrorLayer {
            below,
            start,
            sectors,
            errors: AtomicU64::new(0),
        }
    }

    /// Checks the request, then fails it when it overlaps the range.
    fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        check_request(self.size(), offset, len)?;
        let first = self.start * SECTOR_SIZE;
        let end = (self.start + self.sectors) * SECTOR_SIZE;
        if len > 0 && offset < end && offset + len > first {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return Err(eio(op, offset.max(first), self.describe()));
        }
        Ok(())
    }
}

impl BlockDevice for ErrorLayer {
    fn size(&self) -> u64 {
        self.below.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check("read", offset, buf.len() as u64)?;
        self.below.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        self.check("write", offset, buf.len() as u64)?;
        self.below.write_at(buf, offset, fua)
    }

    fn flush(&self) -> Result<()> {
        self.below.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check("discard", offset, len)?;
        self.below.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        self.check("write_zeroes", offset, len)?;
        self.below.write_zeroes(offset, len, fua)
    }

    fn describe(&self) -> String {
        format!("test-error over {}", self.below.describe())
    }
}

impl Layer for ErrorLayer {
    fn spec(&self) -> LayerSpec {
        LayerSpec::TestError {
            start: self.start,
            sectors: self.sectors,
        }
    }

    fn status(&self) -> String {
        format!(
            "sectors {}..{} fail, {} errors",
            self.start,
            self.start + self.sectors,
            self.errors.load(Ordering::Relaxed)
        )
    }

    fn status_json(&self) -> serde_json::Value {
        json!({
            "target": "test-error",
            "start": self.start,
            "sectors": self.sectors,
            "errors": self.errors.load(Ordering::Relaxed),
        })
    }

    fn message(&self, words: &[&str]) -> Result<String> {
        Err(no_messages("test-error", words))
    }

    fn as_device(self: Arc<Self>) -> Arc<dyn BlockDevice> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDevice;
    use crate::error::Error;

    #[test]
    fn test_error_fails_exactly_the_overlapping_requests() {
        let base = Arc::new(MemDevice::new(16 * 512));
        let l = LayerSpec::parse("test-error 4 2")
            .unwrap()
            .build(base.clone())
            .unwrap();
        let mut b = [0u8; 1024];
        // Sectors 2..4 and 6..8 pass; 3..5 and 5..7 overlap.
        l.read_at(&mut b, 2 * 512).unwrap();
        l.read_at(&mut b, 6 * 512).unwrap();
        l.write_at(&[1u8; 1024], 2 * 512, Fua::No).unwrap();
        l.write_at(&[1u8; 1024], 6 * 512, Fua::No).unwrap();
        for sector in [3u64, 5] {
            let e = l.read_at(&mut b, sector * 512).unwrap_err();
            assert_eq!(e.errno(), 5);
            let e = l.write_at(&[2u8; 1024], sector * 512, Fua::No).unwrap_err();
            assert_eq!(e.errno(), 5);
            assert!(l.write_zeroes(sector * 512, 1024, Fua::No).is_err());
            assert!(l.discard(sector * 512, 1024).is_err());
        }
        // A failed write reaches nothing below.
        let all = base.to_vec();
        assert!(all[4 * 512..6 * 512].iter().all(|&b| b == 0));
        assert!(all[3 * 512..4 * 512].iter().all(|&b| b == 1));
        // A request over the whole range, an empty request, and flushes.
        let mut whole = vec![0u8; 16 * 512];
        let e = l.read_at(&mut whole, 0).unwrap_err();
        match &e {
            Error::Io {
                op, offset, device, ..
            } => {
                assert_eq!((*op, *offset), ("read", 4 * 512));
                assert_eq!(device, "test-error over memory");
            }
            other => panic!("{other:?}"),
        }
        l.read_at(&mut [], 4 * 512).unwrap();
        l.flush().unwrap();
        l.write_zeroes(8 * 512, 8 * 512, Fua::Yes).unwrap();
        assert_eq!(l.status(), "sectors 4..6 fail, 9 errors");
        assert_eq!(l.status_json()["errors"], 9);
        let e = l.message(&["anything"]).unwrap_err();
        assert!(
            e.to_string().contains("test-error accepts no messages"),
            "{e}"
        );
    }
}
