//! A fault-injecting wrapper: fails chosen byte ranges, or the Nth operation of a kind.
//!
//! It also counts operations per kind, which tests use to check how much I/O a path does
//! (for example that an origin chunk is read once however many snapshots need it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{BlockDevice, Fua};
use crate::error::{Error, Result};

/// The kind of a device operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// `read_at`.
    Read,
    /// `write_at` (and writes issued by `write_zeroes` and `discard`).
    Write,
    /// `flush`.
    Flush,
}

impl OpKind {
    fn index(self) -> usize {
        match self {
            OpKind::Read => 0,
            OpKind::Write => 1,
            OpKind::Flush => 2,
        }
    }
}

/// When to fail an operation.
#[derive(Clone, Debug)]
pub enum FaultRule {
    /// Fail every operation of `kind` that overlaps `start..end` (bytes).
    Range {
        /// Operation kind.
        kind: OpKind,
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// Fail the `n`th operation (counting from 1) of `kind` from when the rule was added.
    Nth {
        /// Operation kind.
        kind: OpKind,
        /// Which one.
        n: u64,
    },
}

#[derive(Debug)]
struct ActiveRule {
    rule: FaultRule,
    seen: u64,
}

/// A device that fails operations by rule and counts what it sees.
#[derive(Debug)]
pub struct FaultyDevice {
    inner: Arc<dyn BlockDevice>,
    rules: Mutex<Vec<ActiveRule>>,
    counts: [AtomicU64; 3],
}

impl FaultyDevice {
    /// Wraps `inner`, with no faults.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        FaultyDevice {
            inner,
            rules: Mutex::new(Vec::new()),
            counts: Default::default(),
        }
    }

    /// Adds a rule.
    pub fn add_rule(&self, rule: FaultRule) {
        self.rules.lock().push(ActiveRule { rule, seen: 0 });
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.rules.lock().clear();
    }

    /// Operations of `kind` seen so far (failed ones included).
    pub fn count(&self, kind: OpKind) -> u64 {
        self.counts[kind.index()].load(Ordering::SeqCst)
    }

    fn check(&self, kind: OpKind, offset: u64, len: u64) -> Result<()> {
        self.counts[kind.index()].fetch_add(1, Ordering::SeqCst);
        let mut rules = self.rules.lock();
        for r in rules.iter_mut() {
            let hit = match r.rule {
                FaultRule::Range {
                    kind: k,
                    start,
                    end,
                } => k == kind && offset < end && offset + len.max(1) > start,
                FaultRule::Nth { kind: k, n } => {
                    if k == kind {
                        r.seen += 1;
                        r.seen == n
                    } else {
                        false
                    }
                }
            };
            if hit {
                return Err(Error::io(
                    kind_name(kind),
                    offset,
                    self.inner.describe(),
                    std::io::Error::other("injected fault"),
                ));
            }
        }
        Ok(())
    }
}

fn kind_name(k: OpKind) -> &'static str {
    match k {
        OpKind::Read => "read",
        OpKind::Write => "write",
        OpKind::Flush => "flush",
    }
}

impl BlockDevice for FaultyDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(OpKind::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        self.check(OpKind::Write, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<()> {
        self.check(OpKind::Flush, 0, 0)?;
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(OpKind::Write, offset, len)?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        self.check(OpKind::Write, offset, len)?;
        self.inner.write_zeroes(offset, len, fua)
    }
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDevice;

    #[test]
    fn faults_hit_ranges_and_nth_ops() {
        let d = FaultyDevice::new(Arc::new(MemDevice::new(1 << 16)));
        d.add_rule(FaultRule::Range {
            kind: OpKind::Read,
            start: 4096,
            end: 8192,
        });
        d.add_rule(FaultRule::Nth {
            kind: OpKind::Write,
            n: 2,
        });
        let mut b = [0u8; 512];
        assert!(d.read_at(&mut b, 0).is_ok());
        assert!(d.read_at(&mut b, 4096 + 512).is_err());
        assert!(d.write_at(&b, 0, Fua::No).is_ok());
        assert!(d.write_at(&b, 0, Fua::No).is_err());
        assert!(d.write_at(&b, 0, Fua::No).is_ok());
        assert_eq!(d.count(OpKind::Read), 2);
        assert_eq!(d.count(OpKind::Write), 3);
    }
}
