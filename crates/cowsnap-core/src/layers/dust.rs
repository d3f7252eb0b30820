//! `test-dust`: emulated bad blocks (dm-dust), changed at run time by messages.
//!
//! The device is cut into blocks of `block_sectors`. Disabled (dm-dust's `bypass`, its
//! state when loaded), every operation passes. Enabled (`fail_read_on_bad_block`):
//!
//! * a read that overlaps a bad block fails with EIO, whole;
//! * a write (write-zeroes and discards too) that overlaps a bad block is, for that block,
//!   what dm-dust does with the block-sized request the kernel splits it into: when the
//!   block has a write-fail count above 0, the count drops by one and that part fails;
//!   otherwise that part is written and the block leaves the bad list (the drive "remapped"
//!   the sector). A write that covers any sector of a bad block counts as a write to the
//!   block, so a partial write clears a block larger than it, as in dm-dust. The parts of
//!   a request outside failing blocks are written, and the request then fails with EIO at
//!   the first failing block: the outcome of the kernel's split requests, reported once.
//!
//! Flushes always pass. Write-fail counts are state, not parameters: [`Layer::spec`]
//! records the bad list and the enabled flag only. `quiet` toggles a flag shown in the
//! status (this layer logs nothing), for scripts written for dm-dust.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use serde_json::json;

use super::spec::{invalid, number};
use super::{eio, unknown_message, Layer, LayerSpec};
use crate::dev::{check_request, BlockDevice, Fua};
use crate::error::Result;
use crate::units::{mem_usize, SECTOR_SIZE};

const MESSAGES: &str = "addbadblock BLOCK [WRITE_FAIL_COUNT], removebadblock BLOCK, \
                        queryblock BLOCK, countbadblocks, clearbadblocks, listbadblocks, \
                        enable, disable, quiet";

/// A device with bad blocks.
#[derive(Debug)]
pub(super) struct Dust {
    below: Arc<dyn BlockDevice>,
    block_sectors: u64,
    block_bytes: u64,
    /// Blocks on the device (the last one may be partial).
    blocks: u64,
    enabled: AtomicBool,
    quiet: AtomicBool,
    /// Bad block -> write-fail count.
    bad: RwLock<BTreeMap<u64, u32>>,
    read_errors: AtomicU64,
    write_errors: AtomicU64,
    remapped: AtomicU64,
}

impl Dust {
    /// The caller checked the block size and the bad blocks with `LayerSpec::size_over`.
    pub(super) fn new(
        below: Arc<dyn BlockDevice>,
        block_sectors: u64,
        bad: &[u64],
        enabled: bool,
    ) -> Self {
        let block_bytes = block_sectors * SECTOR_SIZE;
        Dust {
            blocks: below.size().div_ceil(block_bytes),
            below,
            block_sectors,
            block_bytes,
            enabled: AtomicBool::new(enabled),
            quiet: AtomicBool::new(false),
            bad: RwLock::new(bad.iter().map(|&b| (b, 0)).collect()),
            read_errors: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            remapped: AtomicU64::new(0),
        }
    }

    /// The blocks `offset..offset+len` touches (`len` > 0).
    fn block_range(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        offset / self.block_bytes..=(offset + len - 1) / self.block_bytes
    }

    /// Byte where block `b`'s part of `offset..` starts.
    fn part_start(&self, b: u64, offset: u64) -> u64 {
        b.saturating_mul(self.block_bytes).max(offset)
    }

    /// A write of `offset..offset+len` (`op` names it in errors), with `pass` writing a
    /// piece of it to the device below. See the module's documentation.
    fn write_blocks(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        mut pass: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        if len == 0 || !self.enabled.load(Ordering::Relaxed) {
            return pass(offset, len);
        }
        let range = self.block_range(offset, len);
        if self.bad.read().range(range.clone()).next().is_none() {
            return pass(offset, len);
        }
        let failed: Vec<u64> = {
            let mut bad = self.bad.write();
            let hits: Vec<(u64, u32)> = bad.range(range).map(|(&b, &n)| (b, n)).collect();
            let mut failed = Vec::new();
            for (b, fails) in hits {
                if fails > 0 {
                    bad.insert(b, fails - 1);
                    failed.push(b);
                } else {
                    bad.remove(&b);
                    self.remapped.fetch_add(1, Ordering::Relaxed);
                }
            }
            failed
        };
        let Some(&first_failed) = failed.first() else {
            return pass(offset, len);
        };
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        // Write what lies between the failing blocks.
        let end = offset + len;
        let mut at = offset;
        for &b in &failed {
            let start = self.part_start(b, offset);
            if start > at {
                pass(at, start - at)?;
            }
            at = b
                .saturating_add(1)
                .saturating_mul(self.block_bytes)
                .min(end);
        }
        if at < end {
            pass(at, end - at)?;
        }
        Err(eio(
            op,
            self.part_start(first_failed, offset),
            self.describe(),
        ))
    }

    /// A block number of a message: a whole number inside the device.
    fn block_arg(&self, word: &str) -> Result<u64> {
        let b = number("test-dust", "block", word)?;
        if b >= self.blocks {
            return Err(invalid(format!(
                "test-dust: block {b} is out of range (the device has {} blocks of {} sectors)",
                self.blocks, self.block_sectors
            )));
        }
        Ok(b)
    }

    fn add_bad_block(&self, block: &str, fails: &str) -> Result<String> {
        let b = self.block_arg(block)?;
        let fails: u32 = fails.parse().map_err(|_| {
            invalid(format!(
                "test-dust: write fail count {fails:?} is not a whole number up to {}",
                u32::MAX
            ))
        })?;
        let mut bad = self.bad.write();
        if bad.contains_key(&b) {
            return Err(invalid(format!(
                "test-dust: block {b} is already in badblocklist"
            )));
        }
        bad.insert(b, fails);
        Ok(if fails > 0 {
            format!("dust: block {b} added to badblocklist with write fail count {fails}")
        } else {
            format!("dust: block {b} added to badblocklist")
        })
    }

    fn remove_bad_block(&self, block: &str) -> Result<String> {
        let b = self.block_arg(block)?;
        match self.bad.write().remove(&b) {
            Some(_) => Ok(format!("dust: block {b} removed from badblocklist")),
            None => Err(invalid(format!(
                "test-dust: block {b} is not in badblocklist"
            ))),
        }
    }

    fn query_block(&self, block: &str) -> Result<String> {
        let b = self.block_arg(block)?;
        Ok(match self.bad.read().get(&b) {
            Some(0) => format!("dust: block {b} found in badblocklist"),
            Some(n) => format!("dust: block {b} found in badblocklist, write fail count {n}"),
            None => format!("dust: block {b} not found in badblocklist"),
        })
    }
}

impl BlockDevice for Dust {
    fn size(&self) -> u64 {
        self.below.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        check_request(self.size(), offset, len)?;
        if len > 0 && self.enabled.load(Ordering::Relaxed) {
            let hit = self
                .bad
                .read()
                .range(self.block_range(offset, len))
                .next()
                .map(|(&b, _)| b);
            if let Some(b) = hit {
                self.read_errors.fetch_add(1, Ordering::Relaxed);
                return Err(eio("read", self.part_start(b, offset), self.describe()));
            }
        }
        self.below.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)?;
        self.write_blocks("write", offset, buf.len() as u64, |at, n| {
            // Pieces of the request: inside `buf` by construction.
            let from = mem_usize(at - offset);
            self.below
                .write_at(&buf[from..from + mem_usize(n)], at, fua)
        })
    }

    fn flush(&self) -> Result<()> {
        self.below.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self.size(), offset, len)?;
        self.write_blocks("discard", offset, len, |at, n| self.below.discard(at, n))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        check_request(self.size(), offset, len)?;
        self.write_blocks("write_zeroes", offset, len, |at, n| {
            self.below.write_zeroes(at, n, fua)
        })
    }

    fn describe(&self) -> String {
        format!("test-dust over {}", self.below.describe())
    }
}

impl Layer for Dust {
    fn spec(&self) -> LayerSpec {
        LayerSpec::TestDust {
            block_sectors: self.block_sectors,
            bad: self.bad.read().keys().copied().collect(),
            enabled: self.enabled.load(Ordering::Relaxed),
        }
    }

    /// `enabled 3 bad blocks, 2 read errors 1 write errors 0 remapped` (`, quiet` when
    /// quiet).
    fn status(&self) -> String {
        let state = if self.enabled.load(Ordering::Relaxed) {
            "enabled"
        } else {
            "disabled"
        };
        format!(
            "{state} {} bad blocks, {} read errors {} write errors {} remapped{}",
            self.bad.read().len(),
            self.read_errors.load(Ordering::Relaxed),
            self.write_errors.load(Ordering::Relaxed),
            self.remapped.load(Ordering::Relaxed),
            if self.quiet.load(Ordering::Relaxed) {
                ", quiet"
            } else {
                ""
            }
        )
    }

    fn status_json(&self) -> serde_json::Value {
        json!({
            "target": "test-dust",
            "enabled": self.enabled.load(Ordering::Relaxed),
            "quiet": self.quiet.load(Ordering::Relaxed),
            "block_sectors": self.block_sectors,
            "blocks": self.blocks,
            "bad_blocks": self.bad.read().len(),
            "read_errors": self.read_errors.load(Ordering::Relaxed),
            "write_errors": self.write_errors.load(Ordering::Relaxed),
            "remapped": self.remapped.load(Ordering::Relaxed),
        })
    }

    fn message(&self, words: &[&str]) -> Result<String> {
        match words {
            ["addbadblock", b] => self.add_bad_block(b, "0"),
            ["addbadblock", b, fails] => self.add_bad_block(b, fails),
            ["removebadblock", b] => self.remove_bad_block(b),
            ["queryblock", b] => self.query_block(b),
            ["countbadblocks"] => Ok(format!(
                "countbadblocks: {} badblock(s) found",
                self.bad.read().len()
            )),
            ["clearbadblocks"] => {
                let mut bad = self.bad.write();
                Ok(if bad.is_empty() {
                    "dust: no badblocks found".into()
                } else {
                    bad.clear();
                    "dust: badblocks cleared".into()
                })
            }
            ["listbadblocks"] => Ok(self
                .bad
                .read()
                .keys()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join("\n")),
            ["enable"] => {
                self.enabled.store(true, Ordering::Relaxed);
                Ok("dust: enabling read failures on bad sectors".into())
            }
            ["disable"] => {
                self.enabled.store(false, Ordering::Relaxed);
                Ok("dust: disabling read failures on bad sectors".into())
            }
            ["quiet"] => {
                let was = self.quiet.fetch_xor(true, Ordering::Relaxed);
                Ok(format!("dust: quiet {}", if was { "off" } else { "on" }))
            }
            _ => Err(unknown_message("test-dust", words, MESSAGES)),
        }
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

    fn dust(line: &str, sectors: u64) -> (Arc<MemDevice>, Arc<dyn Layer>) {
        let base = Arc::new(MemDevice::new(sectors * 512));
        let layer = LayerSpec::parse(line).unwrap().build(base.clone()).unwrap();
        (base, layer)
    }

    fn eio_at(r: Result<()>) -> u64 {
        match r {
            Err(e @ Error::Io { .. }) => {
                assert_eq!(e.errno(), 5);
                match e {
                    Error::Io { offset, .. } => offset,
                    _ => unreachable!(),
                }
            }
            other => panic!("expected EIO, got {other:?}"),
        }
    }

    #[test]
    fn reads_of_bad_blocks_fail_only_when_enabled() {
        let (base, l) = dust("test-dust 8 2 1 3", 64);
        base.write_at(&[6u8; 4096], 4096, Fua::No).unwrap();
        let mut b = [0u8; 512];
        // Disabled when loaded: everything passes.
        l.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [6u8; 512]);
        assert!(
            l.status().starts_with("disabled 2 bad blocks"),
            "{}",
            l.status()
        );
        l.message(&["enable"]).unwrap();
        assert_eq!(eio_at(l.read_at(&mut b, 4096 + 3584)), 4096 + 3584);
        let mut big = vec![0u8; 8 * 4096];
        assert_eq!(eio_at(l.read_at(&mut big, 0)), 4096);
        l.read_at(&mut b, 2 * 4096).unwrap();
        l.read_at(&mut [], 4096).unwrap();
        l.flush().unwrap();
        assert!(
            l.status()
                .starts_with("enabled 2 bad blocks, 2 read errors"),
            "{}",
            l.status()
        );
        l.message(&["disable"]).unwrap();
        l.read_at(&mut b, 4096).unwrap();
    }

    #[test]
    fn a_write_remaps_a_bad_block_unless_it_must_fail() {
        let (base, l) = dust("test-dust 2 0 enabled", 16);
        l.message(&["addbadblock", "1"]).unwrap();
        l.message(&["addbadblock", "2", "2"]).unwrap();
        let mut b = [0u8; 512];
        // A one-sector write to block 1 (sectors 2..4) clears the whole block.
        l.write_at(&[1u8; 512], 3 * 512, Fua::No).unwrap();
        l.read_at(&mut b, 2 * 512).unwrap();
        assert_eq!(
            l.message(&["queryblock", "1"]).unwrap(),
            "dust: block 1 not found in badblocklist"
        );
        // Block 2 fails twice, then is remapped by the third write.
        for _ in 0..2 {
            assert_eq!(eio_at(l.write_at(&[2u8; 1024], 4 * 512, Fua::No)), 4 * 512);
        }
        assert!(base.to_vec()[4 * 512..6 * 512].iter().all(|&b| b == 0));
        l.write_at(&[2u8; 1024], 4 * 512, Fua::No).unwrap();
        l.read_at(&mut b, 4 * 512).unwrap();
        assert_eq!(b, [2u8; 512]);
        assert!(
            l.status()
                .ends_with("0 bad blocks, 0 read errors 2 write errors 2 remapped"),
            "{}",
            l.status()
        );
    }

    #[test]
    fn a_write_over_several_blocks_writes_around_the_failing_ones() {
        let (base, l) = dust("test-dust 1 0 enabled", 8);
        l.message(&["addbadblock", "2", "1"]).unwrap();
        l.message(&["addbadblock", "3"]).unwrap();
        l.message(&["addbadblock", "5", "1"]).unwrap();
        let data: Vec<u8> = (0..8u8).flat_map(|s| [s + 1; 512]).collect();
        assert_eq!(eio_at(l.write_at(&data, 0, Fua::Yes)), 2 * 512);
        let stored = base.to_vec();
        for s in 0..8u8 {
            let want = if s == 2 || s == 5 { 0 } else { s + 1 };
            let at = usize::from(s) * 512;
            assert!(
                stored[at..at + 512].iter().all(|&b| b == want),
                "sector {s}"
            );
        }
        // Block 3 was remapped; 2 and 5 used their one failure and are still bad.
        assert_eq!(l.message(&["listbadblocks"]).unwrap(), "2\n5");
        // Write-zeroes and discards count as writes: they remap now.
        l.write_zeroes(2 * 512, 512, Fua::No).unwrap();
        l.discard(5 * 512, 512).unwrap();
        assert_eq!(l.message(&["listbadblocks"]).unwrap(), "");
        // Failing zeroes and discards.
        l.message(&["addbadblock", "7", "2"]).unwrap();
        l.message(&["addbadblock", "6", "1"]).unwrap();
        assert_eq!(eio_at(l.write_zeroes(0, 8 * 512, Fua::No)), 6 * 512);
        assert!(base.to_vec()[..6 * 512].iter().all(|&b| b == 0));
        assert_eq!(eio_at(l.discard(7 * 512, 512)), 7 * 512);
    }

    #[test]
    fn messages_and_their_errors() {
        let (_, l) = dust("test-dust 8", 64 + 1);
        // 65 sectors: 9 blocks, the last partial.
        let m = |w: &[&str]| l.message(w);
        assert_eq!(
            m(&["addbadblock", "8"]).unwrap(),
            "dust: block 8 added to badblocklist"
        );
        assert_eq!(
            m(&["addbadblock", "0", "3"]).unwrap(),
            "dust: block 0 added to badblocklist with write fail count 3"
        );
        assert_eq!(
            m(&["countbadblocks"]).unwrap(),
            "countbadblocks: 2 badblock(s) found"
        );
        assert_eq!(m(&["listbadblocks"]).unwrap(), "0\n8");
        assert_eq!(
            m(&["queryblock", "0"]).unwrap(),
            "dust: block 0 found in badblocklist, write fail count 3"
        );
        assert_eq!(
            m(&["queryblock", "8"]).unwrap(),
            "dust: block 8 found in badblocklist"
        );
        assert_eq!(
            m(&["removebadblock", "8"]).unwrap(),
            "dust: block 8 removed from badblocklist"
        );
        assert_eq!(m(&["quiet"]).unwrap(), "dust: quiet on");
        assert!(l.status().ends_with(", quiet"));
        assert_eq!(m(&["quiet"]).unwrap(), "dust: quiet off");
        assert_eq!(
            l.spec(),
            LayerSpec::TestDust {
                block_sectors: 8,
                bad: vec![0],
                enabled: false
            }
        );
        m(&["enable"]).unwrap();
        assert_eq!(
            l.spec(),
            LayerSpec::TestDust {
                block_sectors: 8,
                bad: vec![0],
                enabled: true
            }
        );
        assert_eq!(m(&["clearbadblocks"]).unwrap(), "dust: badblocks cleared");
        assert_eq!(m(&["clearbadblocks"]).unwrap(), "dust: no badblocks found");
        let errors: [(&[&str], &str); 10] = [
            (
                &["addbadblock", "9"],
                "block 9 is out of range (the device has 9 blocks of 8 sectors)",
            ),
            (&["addbadblock", "x"], "block \"x\" is not a whole number"),
            (&["addbadblock", "1", "-1"], "write fail count \"-1\""),
            (&["queryblock", "99"], "out of range"),
            (&["removebadblock", "1"], "block 1 is not in badblocklist"),
            (
                &["addbadblock"],
                "messages: addbadblock BLOCK [WRITE_FAIL_COUNT], removebadblock",
            ),
            (
                &["countbadblocks", "now"],
                "unknown message \"countbadblocks now\"",
            ),
            (&["frob"], "listbadblocks, enable, disable, quiet"),
            (&[], "unknown message \"\""),
            (&["addbadblock", "1", "1", "1"], "unknown message"),
        ];
        for (words, want) in errors {
            let e = m(words).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{words:?}: {e:?}");
            assert!(e.to_string().contains(want), "{words:?}: {e}");
        }
        m(&["addbadblock", "1"]).unwrap();
        let e = m(&["addbadblock", "1"]).unwrap_err();
        assert!(
            e.to_string().contains("block 1 is already in badblocklist"),
            "{e}"
        );
        let json = l.status_json();
        assert_eq!(
            (json["bad_blocks"].as_u64(), json["blocks"].as_u64()),
            (Some(1), Some(9))
        );
    }
}
