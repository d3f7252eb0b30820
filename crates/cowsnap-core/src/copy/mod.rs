//! The copier: moves chunk data between devices with bounded memory (the kcopyd role).
//!
//! One copy reads a source range once and writes it to any number of destinations, which
//! is how an origin write copies a chunk into N snapshots for the price of one read. An
//! optional *overlay* replaces part of the data on its way (a partial snapshot write merged
//! into the copy of its chunk, so the COW chunk is written once); where the overlay covers a
//! whole segment the source is not read at all. Memory in use is capped by a byte budget:
//! a copy waits for budget before it reads, and gives it back before it returns, never
//! while it holds a lock or waits on anything else, so copies cannot deadlock. Errors are
//! reported per destination and never stop the other destinations.

mod batcher;

pub use batcher::{BatcherStats, CopyOutBatcher, CowWrite, MAX_MERGED};

use parking_lot::{Condvar, Mutex};

use crate::dev::{AlignedBuf, BlockDevice, Fua};
use crate::error::{Error, Result};

/// Default memory budget of a copier.
pub const DEFAULT_BUDGET: usize = 64 << 20;
/// Default largest piece copied through one buffer.
pub const DEFAULT_SEGMENT: usize = 1 << 20;

/// One destination of a copy.
#[derive(Clone, Copy, Debug)]
pub struct CopyDest<'a> {
    /// The device.
    pub dev: &'a dyn BlockDevice,
    /// Byte offset of the copy on it.
    pub offset: u64,
}

/// Data replacing part of the copied range.
#[derive(Clone, Copy, Debug)]
pub struct Overlay<'a> {
    /// Byte offset inside the copied range.
    pub offset: u64,
    /// The data.
    pub data: &'a [u8],
}

/// What happened to one copy.
#[derive(Debug, Default)]
pub struct CopyReport {
    /// Reading the source failed (then every destination failed too).
    pub read_error: Option<Error>,
    /// Destinations whose writes failed, by index, with the first error of each.
    pub write_errors: Vec<(usize, Error)>,
}

impl CopyReport {
    /// True when destination `i` received the whole range.
    pub fn dest_ok(&self, i: usize) -> bool {
        self.read_error.is_none() && !self.write_errors.iter().any(|(j, _)| *j == i)
    }

    /// What destination `i` received: `Ok`, or the error that stopped it (the source's
    /// read error, or its own first write error).
    pub fn dest_result(&self, i: usize) -> Result<()> {
        if let Some(e) = &self.read_error {
            return Err(e.clone());
        }
        match self.write_errors.iter().find(|(j, _)| *j == i) {
            Some((_, e)) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

/// Budget taken with [`Copier::reserve`], returned on drop.
#[derive(Debug)]
pub struct Reservation<'a> {
    copier: &'a Copier,
    bytes: usize,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.copier.release(self.bytes);
    }
}

/// A chunk copier with a memory budget.
#[derive(Debug)]
pub struct Copier {
    budget: usize,
    segment: usize,
    in_use: Mutex<usize>,
    freed: Condvar,
}

impl Default for Copier {
    fn default() -> Self {
        Copier::new(DEFAULT_BUDGET, DEFAULT_SEGMENT)
    }
}

impl Copier {
    /// A copier that holds at most `budget` bytes of buffers, in pieces of at most
    /// `segment` bytes (both at least one sector).
    pub fn new(budget: usize, segment: usize) -> Self {
        let budget = budget.max(512);
        Copier {
            budget,
            segment: segment.clamp(512, budget) & !511,
            in_use: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Bytes of buffers in use now.
    pub fn in_use(&self) -> usize {
        *self.in_use.lock()
    }

    /// Largest piece copied through one buffer.
    pub fn segment(&self) -> usize {
        self.segment
    }

    /// Takes `n` bytes of the budget (at most the whole budget) for buffers the caller
    /// fills itself, waiting until they are free; they are given back when the reservation
    /// is dropped. Take it before any lock or wait, as [`copy`](Self::copy) does.
    pub fn reserve(&self, n: usize) -> Reservation<'_> {
        let n = n.min(self.budget);
        self.acquire(n);
        Reservation {
            copier: self,
            bytes: n,
        }
    }

    fn acquire(&self, n: usize) {
        let mut used = self.in_use.lock();
        while *used + n > self.budget {
            self.freed.wait(&mut used);
        }
        *used += n;
    }

    fn release(&self, n: usize) {
        *self.in_use.lock() -= n;
        self.freed.notify_all();
    }

    /// Copies `len` bytes at `src_offset` of `src` to every destination, with `overlay`
    /// applied. Writes are not flushed: the caller flushes before it commits.
    pub fn copy(
        &self,
        src: &dyn BlockDevice,
        src_offset: u64,
        len: u64,
        dests: &[CopyDest<'_>],
        overlay: Option<Overlay<'_>>,
    ) -> CopyReport {
        let mut report = CopyReport::default();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(self.segment as u64) as usize;
            self.acquire(n);
            // Aligned, so devices opened with O_DIRECT need no bounce copy.
            let mut buf = AlignedBuf::zeroed(n);
            let seg = done..done + n as u64;
            // The overlay's part of this segment, as (offset in segment, data).
            let ov = overlay.and_then(|o| {
                let start = o.offset.max(seg.start);
                let end = (o.offset + o.data.len() as u64).min(seg.end);
                (start < end).then(|| {
                    let from = (start - o.offset) as usize;
                    let to = (end - o.offset) as usize;
                    ((start - seg.start) as usize, &o.data[from..to])
                })
            });
            let covered = matches!(ov, Some((0, d)) if d.len() == n);
            if !covered {
                if let Err(e) = src.read_at(&mut buf, src_offset + done) {
                    report.read_error = Some(e);
                    self.release(n);
                    return report;
                }
            }
            if let Some((at, d)) = ov {
                buf[at..at + d.len()].copy_from_slice(d);
            }
            for (i, d) in dests.iter().enumerate() {
                if report.write_errors.iter().any(|(j, _)| *j == i) {
                    continue;
                }
                if let Err(e) = d.dev.write_at(&buf, d.offset + done, Fua::No) {
                    report.write_errors.push((i, e));
                }
            }
            self.release(n);
            done += n as u64;
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::{FaultRule, FaultyDevice, MemDevice, OpKind};
    use std::sync::Arc;

    #[test]
    fn copy_reads_once_writes_all_and_reports_per_destination() {
        let src = FaultyDevice::new(Arc::new(MemDevice::from_bytes(&[5u8; 8192])));
        let a = MemDevice::new(16384);
        let b = FaultyDevice::new(Arc::new(MemDevice::new(16384)));
        b.add_rule(FaultRule::Range {
            kind: OpKind::Write,
            start: 0,
            end: 1 << 20,
        });
        let c = MemDevice::new(16384);
        let copier = Copier::new(1 << 20, 4096);
        let r = copier.copy(
            &src,
            0,
            8192,
            &[
                CopyDest {
                    dev: &a,
                    offset: 4096,
                },
                CopyDest { dev: &b, offset: 0 },
                CopyDest { dev: &c, offset: 0 },
            ],
            Some(Overlay {
                offset: 512,
                data: &[9u8; 512],
            }),
        );
        assert!(r.dest_ok(0) && !r.dest_ok(1) && r.dest_ok(2));
        assert_eq!(src.count(OpKind::Read), 2, "one read per 4 KiB segment");
        let mut got = vec![0u8; 8192];
        a.read_at(&mut got, 4096).unwrap();
        assert_eq!(&got[..512], &[5u8; 512]);
        assert_eq!(&got[512..1024], &[9u8; 512]);
        assert_eq!(&got[1024..], &[5u8; 7168]);
        assert_eq!(copier.in_use(), 0);
    }

    #[test]
    fn a_covering_overlay_skips_the_read() {
        let src = FaultyDevice::new(Arc::new(MemDevice::new(4096)));
        let dst = MemDevice::new(4096);
        let r = Copier::default().copy(
            &src,
            0,
            4096,
            &[CopyDest {
                dev: &dst,
                offset: 0,
            }],
            Some(Overlay {
                offset: 0,
                data: &[1u8; 4096],
            }),
        );
        assert!(r.dest_ok(0));
        assert_eq!(src.count(OpKind::Read), 0);
        assert_eq!(dst.to_vec(), vec![1u8; 4096]);
    }

    #[test]
    fn read_errors_fail_every_destination() {
        let src = FaultyDevice::new(Arc::new(MemDevice::new(4096)));
        src.add_rule(FaultRule::Nth {
            kind: OpKind::Read,
            n: 1,
        });
        let dst = MemDevice::new(4096);
        let r = Copier::default().copy(
            &src,
            0,
            4096,
            &[CopyDest {
                dev: &dst,
                offset: 0,
            }],
            None,
        );
        assert!(!r.dest_ok(0));
        let err = r.dest_result(0).unwrap_err();
        assert!(err.to_string().starts_with("read at byte 0"), "{err}");
    }
}
