//! `test-zero`: reads zeros, writes go nowhere (dm-zero). Writes, discards, write-zeroes
//! and flushes succeed without touching the device below, which only gives the size.

use std::sync::Arc;

use serde_json::json;

use super::{no_messages, Layer, LayerSpec};
use crate::dev::{check_request, BlockDevice, Fua};
use crate::error::Result;

/// A device of zeros the size of the device below.
#[derive(Debug)]
pub(super) struct Zero {
    below: Arc<dyn BlockDevice>,
}

impl Zero {
    pub(super) fn new(below: Arc<dyn BlockDevice>) -> Self {
        Zero { below }
    }
}

impl BlockDevice for Zero {
    fn size(&self) -> u64 {
        self.below.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)?;
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: Fua) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self.size(), offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: Fua) -> Result<()> {
        check_request(self.size(), offset, len)
    }

    fn describe(&self) -> String {
        format!("test-zero over {}", self.below.describe())
    }
}

impl Layer for Zero {
    fn spec(&self) -> LayerSpec {
        LayerSpec::TestZero
    }

    fn status(&self) -> String {
        "reads zeros, drops writes".into()
    }

    fn status_json(&self) -> serde_json::Value {
        json!({"target": "test-zero"})
    }

    fn message(&self, words: &[&str]) -> Result<String> {
        Err(no_messages("test-zero", words))
    }

    fn as_device(self: Arc<Self>) -> Arc<dyn BlockDevice> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDevice;

    #[test]
    fn zero_reads_zeros_and_never_writes_below() {
        let base = Arc::new(MemDevice::from_bytes(&[5u8; 4096]));
        let z = LayerSpec::TestZero.build(base.clone()).unwrap();
        assert_eq!(z.size(), 4096);
        let mut b = [1u8; 1024];
        z.read_at(&mut b, 1024).unwrap();
        assert_eq!(b, [0u8; 1024]);
        z.write_at(&[9u8; 512], 0, Fua::Yes).unwrap();
        z.discard(0, 4096).unwrap();
        z.write_zeroes(0, 4096, Fua::No).unwrap();
        z.flush().unwrap();
        assert_eq!(base.to_vec(), vec![5u8; 4096]);
        assert_eq!(z.status_json(), json!({"target": "test-zero"}));
    }
}
