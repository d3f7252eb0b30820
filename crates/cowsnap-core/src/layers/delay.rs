//! `test-delay`: sleeps before passing each operation to the device below (dm-delay, with
//! microseconds and one device). Reads wait `read_us`; writes, discards and write-zeroes
//! (FUA or not) `write_us`; flushes `flush_us`. A delay of 0 costs no sleep call, so
//! `test-delay 0 0 0` is a plain pass-through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{no_messages, Layer, LayerSpec};
use crate::dev::{check_request, BlockDevice, Fua};
use crate::error::Result;

/// Delays operations.
#[derive(Debug)]
pub(super) struct Delay {
    below: Arc<dyn BlockDevice>,
    read_us: u64,
    write_us: u64,
    flush_us: u64,
    /// Operations that slept (counted only when their delay is not 0).
    delayed: AtomicU64,
}

impl Delay {
    pub(super) fn new(
        below: Arc<dyn BlockDevice>,
        read_us: u64,
        write_us: u64,
        flush_us: u64,
    ) -> Self {
        Delay {
            below,
            read_us,
            write_us,
            flush_us,
            delayed: AtomicU64::new(0),
        }
    }

    fn wait(&self, us: u64) {
        if us > 0 {
            self.delayed.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_micros(us));
        }
    }
}

impl BlockDevice for Delay {
    fn size(&self) -> u64 {
        self.below.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)?;
        self.wait(self.read_us);
        self.below.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)?;
        self.wait(self.write_us);
        self.below.write_at(buf, offset, fua)
    }

    fn flush(&self) -> Result<()> {
        self.wait(self.flush_us);
        self.below.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self.size(), offset, len)?;
        self.wait(self.write_us);
        self.below.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        check_request(self.size(), offset, len)?;
        self.wait(self.write_us);
        self.below.write_zeroes(offset, len, fua)
    }

    fn describe(&self) -> String {
        format!("test-delay over {}", self.below.describe())
    }
}

impl Layer for Delay {
    fn spec(&self) -> LayerSpec {
        LayerSpec::TestDelay {
            read_us: self.read_us,
            write_us: self.write_us,
            flush_us: self.flush_us,
        }
    }

    fn status(&self) -> String {
        format!(
            "read {}us write {}us flush {}us, {} delayed",
            self.read_us,
            self.write_us,
            self.flush_us,
            self.delayed.load(Ordering::Relaxed)
        )
    }

    fn status_json(&self) -> serde_json::Value {
        json!({
            "target": "test-delay",
            "read_us": self.read_us,
            "write_us": self.write_us,
            "flush_us": self.flush_us,
            "delayed": self.delayed.load(Ordering::Relaxed),
        })
    }

    fn message(&self, words: &[&str]) -> Result<String> {
        Err(no_messages("test-delay", words))
    }

    fn as_device(self: Arc<Self>) -> Arc<dyn BlockDevice> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDevice;
    use std::time::Instant;

    #[test]
    fn delay_sleeps_per_kind_and_passes_data() {
        let base = Arc::new(MemDevice::new(8192));
        let l = LayerSpec::parse("test-delay 0 3000 1000")
            .unwrap()
            .build(base.clone())
            .unwrap();
        let t = Instant::now();
        l.write_at(&[4u8; 512], 512, Fua::No).unwrap();
        assert!(t.elapsed() >= Duration::from_micros(3000));
        let t = Instant::now();
        l.flush().unwrap();
        assert!(t.elapsed() >= Duration::from_micros(1000));
        let mut b = [0u8; 512];
        l.read_at(&mut b, 512).unwrap();
        assert_eq!(b, [4u8; 512]);
        l.write_zeroes(512, 512, Fua::No).unwrap();
        l.discard(0, 512).unwrap();
        assert!(base.to_vec().iter().all(|&b| b == 0));
        // The read did not sleep: 4 operations did.
        assert_eq!(l.status(), "read 0us write 3000us flush 1000us, 4 delayed");
    }
}
