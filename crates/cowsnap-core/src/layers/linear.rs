//! `linear`: sectors `start..start+sectors` of the device below, as a device of its own
//! (dm-linear). Every operation is moved by `start` sectors; flushes pass unchanged.

use std::sync::Arc;

use serde_json::json;

use super::{no_messages, Layer, LayerSpec};
use crate::dev::{check_request, BlockDevice, Fua};
use crate::error::Result;
use crate::units::SECTOR_SIZE;

/// A range of the device below.
#[derive(Debug)]
pub(super) struct Linear {
    below: Arc<dyn BlockDevice>,
    /// First sector in the device below.
    start: u64,
    /// Length in sectors.
    sectors: u64,
}

impl Linear {
    /// The caller checked the range with `LayerSpec::size_over`.
    pub(super) fn new(below: Arc<dyn BlockDevice>, start: u64, sectors: u64) -> Self {
        Linear {
            below,
            start,
            sectors,
        }
    }

    /// `offset..offset+len` checked against this layer and moved into the device below.
    fn map(&self, offset: u64, len: u64) -> Result<u64> {
        check_request(self.size(), offset, len)?;
        // Cannot overflow: `size_over` checked that the range ends inside the device below.
        Ok(self.start * SECTOR_SIZE + offset)
    }
}

impl BlockDevice for Linear {
    fn size(&self) -> u64 {
        self.sectors * SECTOR_SIZE
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let at = self.map(offset, buf.len() as u64)?;
        self.below.read_at(buf, at)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        let at = self.map(offset, buf.len() as u64)?;
        self.below.write_at(buf, at, fua)
    }

    fn flush(&self) -> Result<()> {
        self.below.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let at = self.map(offset, len)?;
        self.below.discard(at, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        let at = self.map(offset, len)?;
        self.below.write_zeroes(at, len, fua)
    }

    fn describe(&self) -> String {
        format!("linear over {}", self.below.describe())
    }
}

impl Layer for Linear {
    fn spec(&self) -> LayerSpec {
        LayerSpec::Linear {
            start: self.start,
            sectors: self.sectors,
        }
    }

    fn status(&self) -> String {
        format!(
            "sectors {}..{} of {}",
            self.start,
            self.start + self.sectors,
            self.below.describe()
        )
    }

    fn status_json(&self) -> serde_json::Value {
        json!({"target": "linear", "start": self.start, "sectors": self.sectors})
    }

    fn message(&self, words: &[&str]) -> Result<String> {
        Err(no_messages("linear", words))
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
    fn linear_moves_every_operation_by_start() {
        let base = Arc::new(MemDevice::new(64 * 512));
        let spec = LayerSpec::parse("linear 8 16").unwrap();
        let l = spec.build(base.clone()).unwrap();
        assert_eq!(l.size(), 16 * 512);
        l.write_at(&[1u8; 1024], 0, Fua::Yes).unwrap();
        l.write_at(&[2u8; 512], 15 * 512, Fua::No).unwrap();
        let all = base.to_vec();
        assert!(all[..8 * 512].iter().all(|&b| b == 0));
        assert!(all[8 * 512..10 * 512].iter().all(|&b| b == 1));
        assert!(all[23 * 512..24 * 512].iter().all(|&b| b == 2));
        assert!(all[24 * 512..].iter().all(|&b| b == 0));
        let mut b = [0u8; 512];
        base.write_at(&[9u8; 512], 12 * 512, Fua::No).unwrap();
        l.read_at(&mut b, 4 * 512).unwrap();
        assert_eq!(b, [9u8; 512]);
        l.write_zeroes(4 * 512, 512, Fua::No).unwrap();
        l.read_at(&mut b, 4 * 512).unwrap();
        assert_eq!(b, [0u8; 512]);
        l.write_at(&[3u8; 512], 0, Fua::No).unwrap();
        l.discard(0, 512).unwrap();
        assert!(base.to_vec()[8 * 512..9 * 512].iter().all(|&b| b == 0));
        l.flush().unwrap();
        // The end of the range is the end of the layer.
        assert!(matches!(
            l.read_at(&mut b, 16 * 512),
            Err(Error::OutOfRange { .. })
        ));
        assert_eq!(l.status(), "sectors 8..24 of memory");
        assert!(l
            .message(&["x"])
            .unwrap_err()
            .to_string()
            .contains("no messages"));
    }
}
