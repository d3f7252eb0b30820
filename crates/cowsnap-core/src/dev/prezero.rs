//! Zero-ahead: writes zeros just beyond the highest data of a file that fills from the front,
//! so data writes land in blocks the file system has already written.
//!
//! A COW file is reserved with `fallocate`, which gives *unwritten* extents on ext4 and XFS.
//! The first write into an unwritten extent makes the file system convert it, a metadata
//! change that the next `fdatasync` must commit through the journal, so a small `O_DIRECT`
//! write plus `fdatasync` costs more there than in a block already written (the fio
//! measurement is in `docs/performance.md`). A persistent store allocates COW chunks from
//! the front, so [`PrezeroDevice`] keeps a *frontier*: every byte below it has been written
//! once (with data or zeros); a write ending past it first moves the frontier [`STEP`] bytes
//! beyond the write, writing zeros over the gap with large sequential writes, one at a time.
//!
//! **Safety.** Zeros are written only above the frontier, and no data write ends above the
//! frontier before the frontier has moved past it (a write that would waits for the zeroing,
//! under one mutex). Bytes above the starting frontier must read as zeros (the end of the
//! file's data, see [`FileDevice::data_end`](super::FileDevice::data_end)), so zeroing them
//! changes nothing a reader can see, and a crash that loses the zeros loses nothing either.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use parking_lot::Mutex;

use super::{check_request, AlignedBuf, BlockDevice, Fua};
use crate::error::Result;
use crate::mutation;

/// How far beyond a write the frontier moves when the write crosses it.
pub const STEP: u64 = 8 << 20;

/// Largest zero write issued at once.
const ZERO_IO: u64 = 1 << 20;

/// A device that keeps the region in front of its writes written (see the module docs).
#[derive(Debug)]
pub struct PrezeroDevice<D> {
    inner: D,
    /// Every byte below this has been written at least once.
    frontier: AtomicU64,
    /// Held while the frontier moves.
    moving: Mutex<()>,
}

impl<D: BlockDevice> PrezeroDevice<D> {
    /// Wraps `inner`, whose bytes from `data_end` on read as zeros.
    pub fn new(inner: D, data_end: u64) -> Self {
        PrezeroDevice {
            frontier: AtomicU64::new(data_end.min(inner.size())),
            inner,
            moving: Mutex::new(()),
        }
    }

    /// Every byte below this offset has been written at least once.
    pub fn frontier(&self) -> u64 {
        self.frontier.load(Ordering::Acquire)
    }

    /// Moves the frontier past `offset..end`, zeroing the gap except that range, which
    /// the caller writes next.
    fn advance(&self, offset: u64, end: u64) -> Result<()> {
        let _moving = self.moving.lock();
        let from = self.frontier.load(Ordering::Acquire);
        if end <= from {
            return Ok(());
        }
        let size = self.inner.size();
        let to = end.saturating_add(STEP).min(size) & !511;
        if mutation::active("prezero-frontier-early") {
            self.frontier.store(to.max(end), Ordering::Release);
        }
        self.zero(from, offset.max(from).min(to))?;
        self.zero(end.max(from), to)?;
        self.frontier.store(to.max(end), Ordering::Release);
        Ok(())
    }

    fn zero(&self, from: u64, to: u64) -> Result<()> {
        if to <= from {
            return Ok(());
        }
        // One buffer of zeros for the process: allocating 1 MiB per call would leave
        // freed megabytes in every thread's malloc arena.
        static ZEROS: OnceLock<AlignedBuf> = OnceLock::new();
        let zeros = ZEROS.get_or_init(|| AlignedBuf::zeroed(crate::units::mem_usize(ZERO_IO)));
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZERO_IO) as usize;
            self.inner.write_at(&zeros[..n], at, Fua::No)?;
            at += n as u64;
        }
        Ok(())
    }
}

impl<D: BlockDevice> BlockDevice for PrezeroDevice<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        if end > self.frontier() {
            self.advance(offset, end)?;
        }
        self.inner.write_at(buf, offset, fua)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        self.inner.write_zeroes(offset, len, fua)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
mod tests {
    use super::*;
    use crate::dev::MemDevice;
    use std::sync::Arc;

    /// Records every write: (offset, len, all zeros).
    #[derive(Debug)]
    struct Recorder {
        dev: MemDevice,
        log: Mutex<Vec<(u64, u64, bool)>>,
    }

    impl BlockDevice for Recorder {
        fn size(&self) -> u64 {
            self.dev.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.dev.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
            // Log before writing: a zero write logged after a data write of the same bytes
            // is a zero write that may have landed on data.
            let zero = buf.iter().all(|&b| b == 0);
            self.log.lock().push((offset, buf.len() as u64, zero));
            self.dev.write_at(buf, offset, fua)
        }
        fn flush(&self) -> Result<()> {
            self.dev.flush()
        }
    }

    fn recorder(size: u64) -> Arc<Recorder> {
        Arc::new(Recorder {
            dev: MemDevice::new(size),
            log: Mutex::new(Vec::new()),
        })
    }

    #[test]
    fn zeros_go_ahead_of_writes_and_never_below_the_start() {
        let rec = recorder(64 << 20);
        rec.dev.write_at(&[7u8; 8192], 0, Fua::No).unwrap();
        let dev = PrezeroDevice::new(rec.clone(), 8192);
        dev.write_at(&[1u8; 4096], 8192, Fua::No).unwrap();
        assert_eq!(dev.frontier(), 8192 + 4096 + STEP);
        let log = rec.log.lock().clone();
        assert!(log.iter().filter(|w| w.2).all(|w| w.0 >= 8192 + 4096));
        assert_eq!(
            log.iter().filter(|w| w.2).map(|w| w.1).sum::<u64>(),
            STEP,
            "the whole step is zeroed: {log:?}"
        );
        // Writes below the frontier add no zero writes.
        let before = rec.log.lock().len();
        dev.write_at(&[2u8; 4096], 65536, Fua::No).unwrap();
        assert_eq!(rec.log.lock().len(), before + 1);
        let mut b = [0u8; 8192];
        dev.read_at(&mut b, 0).unwrap();
        assert!(
            b.iter().all(|&x| x == 7),
            "data below the start is untouched"
        );
    }

    #[test]
    fn a_write_far_ahead_zeroes_the_gap_around_itself() {
        let rec = recorder(64 << 20);
        let dev = PrezeroDevice::new(rec.clone(), 0);
        dev.write_at(&[3u8; 4096], 1 << 20, Fua::No).unwrap();
        let log = rec.log.lock().clone();
        let zeroed: u64 = log.iter().filter(|w| w.2).map(|w| w.1).sum();
        assert_eq!(zeroed, (1 << 20) + STEP);
        assert!(log
            .iter()
            .filter(|w| w.2)
            .all(|w| w.0 + w.1 <= 1 << 20 || w.0 >= (1 << 20) + 4096));
        let mut b = vec![0u8; 4096];
        dev.read_at(&mut b, 1 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 3));
    }

    #[test]
    fn the_frontier_stops_at_the_end_of_the_device() {
        let rec = recorder(1 << 20);
        let dev = PrezeroDevice::new(rec.clone(), 0);
        dev.write_at(&[1u8; 4096], (1 << 20) - 4096, Fua::No)
            .unwrap();
        assert_eq!(dev.frontier(), 1 << 20);
        assert!(dev.write_at(&[1u8; 4096], 1 << 20, Fua::No).is_err());
    }

    /// Threads allocate chunks from the front, as a store does, and write them in any
    /// order; no zero write may ever follow a data write to the same bytes.
    #[test]
    fn concurrent_front_filling_writes_are_never_zeroed() {
        let seed = crate::testkit::seed();
        let chunk = 4096u64;
        let rec = recorder(48 << 20);
        let dev = Arc::new(PrezeroDevice::new(rec.clone(), 0));
        let next = Arc::new(AtomicU64::new(0));
        let chunks = (48 << 20) / chunk;
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (dev, next) = (dev.clone(), next.clone());
                s.spawn(move || {
                    let mut rng = seed ^ (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    loop {
                        // Take 1 to 4 chunks, like a multi-chunk copy run.
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let n = 1 + rng % 4;
                        let c = next.fetch_add(n, Ordering::SeqCst);
                        if c >= chunks {
                            break;
                        }
                        let n = n.min(chunks - c);
                        let fill = (c % 250 + 1) as u8;
                        let buf = vec![fill; (n * chunk) as usize];
                        dev.write_at(&buf, c * chunk, Fua::No).unwrap();
                    }
                });
            }
        });
        for c in 0..chunks {
            let mut b = vec![0u8; chunk as usize];
            dev.read_at(&mut b, c * chunk).unwrap();
            let first = b[0];
            assert!(
                first != 0,
                "chunk {c} was zeroed after its data (seed {seed})"
            );
            assert!(
                b.iter().all(|&x| x == first),
                "chunk {c} torn (seed {seed})"
            );
        }
        let log = rec.log.lock().clone();
        for (i, z) in log.iter().enumerate().filter(|(_, w)| w.2) {
            for d in log[..i].iter().filter(|w| !w.2) {
                assert!(
                    z.0 + z.1 <= d.0 || d.0 + d.1 <= z.0,
                    "zero write {z:?} after data write {d:?} (seed {seed})"
                );
            }
        }
    }
}
