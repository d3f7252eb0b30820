//! A crash-simulating device: a durable image plus the writes a power cut may still lose.
//!
//! Every write lands in a *volatile* layer (per sector, every version written since the
//! last flush, in order); reads see the newest version. A successful flush makes the
//! volatile layer durable; a [`Fua::Yes`] write goes straight to the durable image. A
//! *crash* ([`CrashDevice::crash`]) keeps, for each volatile sector independently (seeded),
//! the durable content or any of the versions written since the last flush, which models
//! both dropped and torn writes at sector granularity; then the device is "rebooted" with
//! that image. Devices may share a [`PowerDomain`], which counts write and flush
//! *boundaries* across them and can cut the power after the Nth one: from then on every
//! operation of every device in the domain fails, as if the machine had died there.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{check_request, BlockDevice, Fua, MemDevice};
use crate::error::{Error, Result};

const SECTOR: usize = 512;

/// Boundaries and the power switch shared by the devices of one simulated machine.
#[derive(Debug, Default)]
pub struct PowerDomain {
    /// Write and flush operations that completed.
    boundaries: AtomicU64,
    /// Cut the power once this many boundaries have passed (`u64::MAX`: never).
    cut_at: AtomicU64,
    lock: Mutex<()>,
}

impl PowerDomain {
    /// A domain with the power on.
    pub fn new() -> Arc<PowerDomain> {
        Arc::new(PowerDomain {
            boundaries: AtomicU64::new(0),
            cut_at: AtomicU64::new(u64::MAX),
            lock: Mutex::new(()),
        })
    }

    /// Cut the power after `n` more write or flush boundaries (counting from the current
    /// total): the `n+1`-th write or flush and everything after it fails.
    pub fn cut_after(&self, n: u64) {
        let _g = self.lock.lock();
        let now = self.boundaries.load(Ordering::SeqCst);
        self.cut_at.store(now.saturating_add(n), Ordering::SeqCst);
    }

    /// Turns the power back on (after the devices were crashed).
    pub fn restore(&self) {
        self.cut_at.store(u64::MAX, Ordering::SeqCst);
    }

    /// Write and flush operations completed so far in this domain.
    pub fn boundaries(&self) -> u64 {
        self.boundaries.load(Ordering::SeqCst)
    }

    /// True once the power is cut.
    pub fn is_cut(&self) -> bool {
        self.boundaries.load(Ordering::SeqCst) >= self.cut_at.load(Ordering::SeqCst)
    }

    /// Runs a boundary operation `op` unless the power is cut; counts it when it ran.
    /// Operations are serialized by the domain, so "the Nth boundary" is well defined
    /// even with many threads.
    fn boundary<T>(&self, device: &str, op: impl FnOnce() -> Result<T>) -> Result<T> {
        let _g = self.lock.lock();
        if self.is_cut() {
            return Err(power_cut(device));
        }
        let r = op()?;
        self.boundaries.fetch_add(1, Ordering::SeqCst);
        Ok(r)
    }
}

fn power_cut(device: &str) -> Error {
    Error::io(
        "io",
        0,
        device.to_string(),
        std::io::Error::other("simulated power cut"),
    )
}

#[derive(Debug)]
struct Inner {
    durable: MemDevice,
    /// Sector -> versions written since the last flush, oldest first.
    volatile: BTreeMap<u64, Vec<Box<[u8]>>>,
}

/// A block device that simulates what survives a crash.
#[derive(Debug)]
pub struct CrashDevice {
    size: u64,
    name: String,
    power: Arc<PowerDomain>,
    inner: Mutex<Inner>,
}

impl CrashDevice {
    /// A zero-filled device of `size` bytes (rounded up to a sector) in its own domain.
    pub fn new(size: u64) -> Self {
        Self::in_domain(size, PowerDomain::new(), "crash")
    }

    /// A zero-filled device of `size` bytes in `power`'s domain, named `name`.
    pub fn in_domain(size: u64, power: Arc<PowerDomain>, name: &str) -> Self {
        let durable = MemDevice::new(size);
        CrashDevice {
            size: durable.size(),
            name: name.to_string(),
            power,
            inner: Mutex::new(Inner {
                durable,
                volatile: BTreeMap::new(),
            }),
        }
    }

    /// A device whose durable image is `data`, in `power`'s domain.
    pub fn from_bytes(data: &[u8], power: Arc<PowerDomain>, name: &str) -> Self {
        let d = Self::in_domain(data.len() as u64, power, name);
        let mut padded = data.to_vec();
        padded.resize(d.size as usize, 0);
        let _ = d.inner.lock().durable.write_at(&padded, 0, Fua::No);
        d
    }

    /// The power domain.
    pub fn power(&self) -> &Arc<PowerDomain> {
        &self.power
    }

    /// Sectors written and not yet flushed.
    pub fn unflushed_sectors(&self) -> usize {
        self.inner.lock().volatile.len()
    }

    /// The durable image only (what a crash that loses every unflushed write leaves).
    pub fn durable_image(&self) -> Vec<u8> {
        self.inner.lock().durable.to_vec()
    }

    /// What reads see now.
    pub fn current_image(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        let _ = self.read_inner(&mut v, 0);
        v
    }

    /// Simulates a power failure and reboot: each unflushed sector independently keeps
    /// its durable content or one of the versions written since the last flush, chosen
    /// by `seed` (seed 0 drops every unflushed write). The device then reads as that
    /// image, with nothing unflushed. Does not touch the domain's power switch.
    pub fn crash(&self, seed: u64) {
        let mut inner = self.inner.lock();
        let volatile = std::mem::take(&mut inner.volatile);
        let mut rng = crate::testkit::SplitMix(seed);
        for (sector, versions) in volatile {
            if seed == 0 {
                continue;
            }
            // 0 = lost, i = version i-1 survived.
            let pick = rng.below(versions.len() as u64 + 1) as usize;
            if pick > 0 {
                let _ =
                    inner
                        .durable
                        .write_at(&versions[pick - 1], sector * SECTOR as u64, Fua::No);
            }
        }
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inner = self.inner.lock();
        inner.durable.read_at(buf, offset)?;
        let first = offset / SECTOR as u64;
        let last = first + (buf.len() / SECTOR) as u64;
        for (s, versions) in inner.volatile.range(first..last) {
            if let Some(v) = versions.last() {
                let at = ((s - first) as usize) * SECTOR;
                buf[at..at + SECTOR].copy_from_slice(v);
            }
        }
        Ok(())
    }

    fn write_inner(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        let mut inner = self.inner.lock();
        let first = offset / SECTOR as u64;
        if fua == Fua::Yes {
            inner.durable.write_at(buf, offset, Fua::No)?;
            for s in first..first + (buf.len() / SECTOR) as u64 {
                inner.volatile.remove(&s);
            }
        } else {
            for (i, data) in buf.chunks_exact(SECTOR).enumerate() {
                inner
                    .volatile
                    .entry(first + i as u64)
                    .or_default()
                    .push(data.into());
            }
        }
        Ok(())
    }
}

impl BlockDevice for CrashDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(self.size, offset, buf.len() as u64)?;
        if self.power.is_cut() {
            return Err(power_cut(&self.name));
        }
        self.read_inner(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        check_request(self.size, offset, buf.len() as u64)?;
        self.power
            .boundary(&self.name, || self.write_inner(buf, offset, fua))
    }

    fn flush(&self) -> Result<()> {
        self.power.boundary(&self.name, || {
            let mut inner = self.inner.lock();
            let volatile = std::mem::take(&mut inner.volatile);
            for (s, versions) in volatile {
                if let Some(v) = versions.last() {
                    inner.durable.write_at(v, s * SECTOR as u64, Fua::No)?;
                }
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, Fua::No)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        check_request(self.size, offset, len)?;
        let zeros = vec![0u8; len as usize];
        self.write_at(&zeros, offset, fua)
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushed_and_fua_writes_survive_a_crash_unflushed_ones_may_not() {
        let d = CrashDevice::new(8192);
        d.write_at(&[1u8; 512], 0, Fua::No).unwrap();
        d.flush().unwrap();
        d.write_at(&[2u8; 512], 512, Fua::Yes).unwrap();
        d.write_at(&[3u8; 1024], 1024, Fua::No).unwrap();
        assert_eq!(d.unflushed_sectors(), 2);
        let mut b = [0u8; 512];
        d.read_at(&mut b, 1024).unwrap();
        assert_eq!(b, [3u8; 512], "reads see unflushed writes");
        d.crash(0);
        let img = d.current_image();
        assert_eq!(&img[..512], &[1u8; 512]);
        assert_eq!(&img[512..1024], &[2u8; 512]);
        assert!(img[1024..2048].iter().all(|&x| x == 0), "seed 0 drops all");
    }

    #[test]
    fn crashes_tear_at_sector_granularity_and_keep_only_written_versions() {
        let mut kept_some = false;
        let mut lost_some = false;
        for seed in 1..40 {
            let d = CrashDevice::new(8192);
            d.write_at(&[4u8; 4096], 0, Fua::No).unwrap();
            d.write_at(&[5u8; 512], 0, Fua::No).unwrap();
            d.crash(seed);
            let img = d.current_image();
            for (i, s) in img[..4096].chunks(512).enumerate() {
                let allowed: &[u8] = if i == 0 { &[0, 4, 5] } else { &[0, 4] };
                assert!(s.iter().all(|&x| x == s[0]) && allowed.contains(&s[0]));
                kept_some |= s[0] != 0;
                lost_some |= s[0] == 0;
            }
        }
        assert!(kept_some && lost_some);
    }

    #[test]
    fn power_cut_stops_a_domain_at_the_nth_boundary() {
        let p = PowerDomain::new();
        let a = CrashDevice::in_domain(4096, p.clone(), "a");
        let b = CrashDevice::in_domain(4096, p.clone(), "b");
        p.cut_after(2);
        a.write_at(&[1u8; 512], 0, Fua::No).unwrap();
        b.flush().unwrap();
        assert!(a.write_at(&[1u8; 512], 0, Fua::No).is_err());
        assert!(b.read_at(&mut [0u8; 512], 0).is_err());
        assert_eq!(p.boundaries(), 2);
        assert!(p.is_cut());
        a.crash(0);
        p.restore();
        assert!(a.current_image().iter().all(|&x| x == 0));
        a.write_at(&[1u8; 512], 0, Fua::Yes).unwrap();
    }
}
