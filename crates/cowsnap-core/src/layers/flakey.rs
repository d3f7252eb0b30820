//! `test-flakey`: works for `up`, then misbehaves for `down`, repeating (dm-flakey).
//!
//! Periods count operations by default: every read, write (discards and write-zeroes
//! included) and flush that reaches the layer inside its size is one, so a schedule is
//! deterministic for a single thread (with many threads the counter is shared and each
//! operation takes the next number). Periods in milliseconds follow the wall clock from
//! when the layer was built or reset, as dm-flakey's seconds do.
//!
//! While down, [`FlakeyMode`] decides. A flush is a write without data, as in dm-flakey:
//! `error_writes` and `error_all` fail it, `drop_writes` completes it without passing it
//! down (the dropped writes before it were never written anyway), the other modes pass it.
//! `corrupt_bio_byte` changes a read's returned data after the device below answered, and a
//! write's data in a copy (the caller's buffer is never changed); requests shorter than
//! `nth` bytes, discards and write-zeroes pass unchanged.
//!
//! Messages: `up` and `down` force the state until `resume` returns to the schedule;
//! `reset` restarts the schedule from its first `up` operation (or millisecond).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use super::{eio, unknown_message, Direction, FlakeyMode, Layer, LayerSpec, Period};
use crate::dev::{check_request, BlockDevice, Fua};
use crate::error::Result;
use crate::units::mem_usize;

const MESSAGES: &str = "up, down, resume, reset";

/// `forced` values.
const SCHEDULE: u8 = 0;
const FORCED_UP: u8 = 1;
const FORCED_DOWN: u8 = 2;

/// The kind of an operation, as flakey's modes see it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    /// A write with data (may be corrupted).
    Write,
    /// A discard, write-zeroes or flush: a write without data.
    WriteNoData,
}

/// What to do with one operation.
enum Verdict {
    Pass,
    Fail,
    Drop,
    /// Pass, with byte `nth - 1` set to `value`.
    Corrupt {
        nth: u64,
        value: u8,
    },
}

/// A device that fails on a schedule.
#[derive(Debug)]
pub(super) struct Flakey {
    below: Arc<dyn BlockDevice>,
    up: Period,
    down: Period,
    mode: FlakeyMode,
    /// Operations since the last reset (the schedule's clock for `Period::Ops`).
    ops: AtomicU64,
    /// The clock's origin for `Period::Millis`: `epoch_ms` after `base`.
    base: Instant,
    epoch_ms: AtomicU64,
    /// `SCHEDULE`, `FORCED_UP` or `FORCED_DOWN`.
    forced: AtomicU8,
    errors: AtomicU64,
    dropped: AtomicU64,
    corrupted: AtomicU64,
}

impl Flakey {
    pub(super) fn new(
        below: Arc<dyn BlockDevice>,
        up: Period,
        down: Period,
        mode: FlakeyMode,
    ) -> Self {
        Flakey {
            below,
            up,
            down,
            mode,
            ops: AtomicU64::new(0),
            base: Instant::now(),
            epoch_ms: AtomicU64::new(0),
            forced: AtomicU8::new(SCHEDULE),
            errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            corrupted: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Where the schedule stands at clock value `t`: (down?, position in the phase,
    /// length of the phase).
    fn phase(&self, t: u64) -> (bool, u64, u64) {
        let (up, down) = (self.up.count(), self.down.count());
        // `check` refused an empty cycle and one that overflows.
        let pos = t % (up + down).max(1);
        if pos < up {
            (false, pos, up)
        } else {
            (true, pos - up, down)
        }
    }

    /// The schedule's clock now, without counting an operation.
    fn clock(&self) -> u64 {
        match self.up {
            Period::Ops(_) => self.ops.load(Ordering::Relaxed),
            Period::Millis(_) => self
                .now_ms()
                .saturating_sub(self.epoch_ms.load(Ordering::Relaxed)),
        }
    }

    /// Counts one operation and says whether the device is down for it.
    fn tick(&self) -> bool {
        let n = self.ops.fetch_add(1, Ordering::Relaxed);
        match self.forced.load(Ordering::Relaxed) {
            FORCED_UP => false,
            FORCED_DOWN => true,
            _ => match self.up {
                Period::Ops(_) => self.phase(n).0,
                Period::Millis(_) => self.phase(self.clock()).0,
            },
        }
    }

    /// What happens to an operation of `kind` (counting it).
    fn verdict(&self, kind: Kind) -> Verdict {
        if !self.tick() {
            return Verdict::Pass;
        }
        let verdict = match (self.mode, kind) {
            (FlakeyMode::ErrorAll, _)
            | (FlakeyMode::ErrorReads, Kind::Read)
            | (FlakeyMode::ErrorWrites, Kind::Write | Kind::WriteNoData) => Verdict::Fail,
            (FlakeyMode::DropWrites, Kind::Write | Kind::WriteNoData) => Verdict::Drop,
            (
                FlakeyMode::CorruptBioByte {
                    nth,
                    on: Direction::Reads,
                    value,
                },
                Kind::Read,
            )
            | (
                FlakeyMode::CorruptBioByte {
                    nth,
                    on: Direction::Writes,
                    value,
                },
                Kind::Write,
            ) => Verdict::Corrupt { nth, value },
            _ => Verdict::Pass,
        };
        match verdict {
            Verdict::Fail => self.errors.fetch_add(1, Ordering::Relaxed),
            Verdict::Drop => self.dropped.fetch_add(1, Ordering::Relaxed),
            Verdict::Pass | Verdict::Corrupt { .. } => 0,
        };
        verdict
    }

    /// A write without data (`op` is `discard`, `write_zeroes` or `flush`): fail, drop or
    /// pass it to `pass`.
    fn write_no_data(
        &self,
        op: &'static str,
        offset: u64,
        pass: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        match self.verdict(Kind::WriteNoData) {
            Verdict::Fail => Err(eio(op, offset, self.describe())),
            Verdict::Drop => Ok(()),
            Verdict::Pass | Verdict::Corrupt { .. } => pass(),
        }
    }

    fn state_words(&self) -> (&'static str, String) {
        let (down, pos, len) = self.phase(self.clock());
        let state = if down { "down" } else { "up" };
        let schedule = format!("{state} {pos}/{len} {}", self.up.unit());
        match self.forced.load(Ordering::Relaxed) {
            FORCED_UP => ("forced up", schedule),
            FORCED_DOWN => ("forced down", schedule),
            _ => (state, schedule),
        }
    }
}

/// Index of byte `nth` (1-based) in a request of `len` bytes, if it has one.
fn nth_index(nth: u64, len: usize) -> Option<usize> {
    (nth >= 1 && nth <= len as u64).then(|| mem_usize(nth - 1))
}

impl BlockDevice for Flakey {
    fn size(&self) -> u64 {
        self.below.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)?;
        match self.verdict(Kind::Read) {
            Verdict::Fail => Err(eio("read", offset, self.describe())),
            Verdict::Corrupt { nth, value } => {
                self.below.read_at(buf, offset)?;
                if let Some(i) = nth_index(nth, buf.len()) {
                    buf[i] = value;
                    self.corrupted.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Verdict::Pass | Verdict::Drop => self.below.read_at(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        check_request(self.size(), offset, buf.len() as u64)?;
        match self.verdict(Kind::Write) {
            Verdict::Fail => Err(eio("write", offset, self.describe())),
            Verdict::Drop => Ok(()),
            Verdict::Corrupt { nth, value } => match nth_index(nth, buf.len()) {
                Some(i) => {
                    let mut copy = buf.to_vec();
                    copy[i] = value;
                    self.corrupted.fetch_add(1, Ordering::Relaxed);
                    self.below.write_at(&copy, offset, fua)
                }
                None => self.below.write_at(buf, offset, fua),
            },
            Verdict::Pass => self.below.write_at(buf, offset, fua),
        }
    }

    fn flush(&self) -> Result<()> {
        self.write_no_data("flush", 0, || self.below.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self.size(), offset, len)?;
        self.write_no_data("discard", offset, || self.below.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        check_request(self.size(), offset, len)?;
        self.write_no_data("write_zeroes", offset, || {
            self.below.write_zeroes(offset, len, fua)
        })
    }

    fn describe(&self) -> String {
        format!("test-flakey over {}", self.below.describe())
    }
}

impl Layer for Flakey {
    fn spec(&self) -> LayerSpec {
        LayerSpec::TestFlakey {
            up: self.up,
            down: self.down,
            mode: self.mode,
        }
    }

    /// `up 12/100 ops, 0 errors 0 dropped 0 corrupted`; when forced, `forced down
    /// (schedule: up 12/100 ops), ...`.
    fn status(&self) -> String {
        let (state, schedule) = self.state_words();
        let head = if state.starts_with("forced") {
            format!("{state} (schedule: {schedule})")
        } else {
            schedule
        };
        format!(
            "{head}, {} errors {} dropped {} corrupted",
            self.errors.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.corrupted.load(Ordering::Relaxed)
        )
    }

    fn status_json(&self) -> serde_json::Value {
        let (state, _) = self.state_words();
        let (down, pos, len) = self.phase(self.clock());
        json!({
            "target": "test-flakey",
            "state": state,
            "schedule": {
                "state": if down { "down" } else { "up" },
                "position": pos,
                "length": len,
                "unit": self.up.unit(),
            },
            "ops": self.ops.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
            "corrupted": self.corrupted.load(Ordering::Relaxed),
        })
    }

    fn message(&self, words: &[&str]) -> Result<String> {
        let reply = match words {
            ["up"] => {
                self.forced.store(FORCED_UP, Ordering::Relaxed);
                "flakey: forced up until resume"
            }
            ["down"] => {
                self.forced.store(FORCED_DOWN, Ordering::Relaxed);
                "flakey: forced down until resume"
            }
            ["resume"] => {
                self.forced.store(SCHEDULE, Ordering::Relaxed);
                "flakey: following the schedule"
            }
            ["reset"] => {
                self.ops.store(0, Ordering::Relaxed);
                self.epoch_ms.store(self.now_ms(), Ordering::Relaxed);
                "flakey: schedule restarted"
            }
            _ => return Err(unknown_message("test-flakey", words, MESSAGES)),
        };
        Ok(reply.into())
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

    fn flakey(line: &str) -> (Arc<MemDevice>, Arc<dyn Layer>) {
        let base = Arc::new(MemDevice::new(16 * 512));
        let layer = LayerSpec::parse(line).unwrap().build(base.clone()).unwrap();
        (base, layer)
    }

    /// One operation per letter: r(ead), w(rite), f(lush), z(write-zeroes), d(iscard); the
    /// outcome of each: '.' passed, 'E' EIO.
    fn run(l: &dyn Layer, ops: &str) -> String {
        ops.chars()
            .map(|op| {
                let mut b = [0u8; 512];
                let r = match op {
                    'r' => l.read_at(&mut b, 0),
                    'w' => l.write_at(&[1u8; 512], 0, Fua::No),
                    'f' => l.flush(),
                    'z' => l.write_zeroes(0, 512, Fua::No),
                    'd' => l.discard(0, 512),
                    _ => unreachable!(),
                };
                match r {
                    Ok(()) => '.',
                    Err(e) => {
                        assert_eq!(e.errno(), 5, "{e}");
                        'E'
                    }
                }
            })
            .collect()
    }

    #[test]
    fn the_schedule_counts_operations_and_repeats() {
        let (_, l) = flakey("test-flakey 3 2");
        assert_eq!(run(&*l, "rwfrw"), "...EE");
        assert_eq!(run(&*l, "rrrzd"), "...EE");
        assert!(
            l.status().starts_with("up 0/3 ops, 4 errors"),
            "{}",
            l.status()
        );
        run(&*l, "rrr");
        assert!(l.status().starts_with("down 0/2 ops"), "{}", l.status());
        // Out-of-range requests are refused before they count.
        let mut b = [0u8; 512];
        assert!(matches!(
            l.read_at(&mut b, 16 * 512),
            Err(Error::OutOfRange { .. })
        ));
        assert!(l.status().starts_with("down 0/2 ops"), "{}", l.status());
        let (_, always) = flakey("test-flakey 0 1");
        assert_eq!(run(&*always, "rwfzd"), "EEEEE");
        let (_, never) = flakey("test-flakey 1 0");
        assert_eq!(run(&*never, "rwfzd"), ".....");
    }

    #[test]
    fn each_mode_fails_what_dm_flakey_fails() {
        // Down from the first operation: up 0.
        let cases = [
            ("error_reads", "E...."),
            ("error_writes", ".EEEE"),
            ("drop_writes", "....."),
        ];
        for (mode, want) in cases {
            let (base, l) = flakey(&format!("test-flakey 0 5 1 {mode}"));
            base.write_at(&[9u8; 512], 0, Fua::No).unwrap();
            assert_eq!(run(&*l, "rwfzd"), want, "{mode}");
            let kept = base.to_vec()[..512].iter().all(|&b| b == 9);
            // Dropped writes and zeroes never reach the device.
            assert_eq!(kept, mode != "error_reads", "{mode}");
        }
        let (_, l) = flakey("test-flakey 0 5 1 drop_writes");
        run(&*l, "wwfr");
        assert!(
            l.status().ends_with("0 errors 3 dropped 0 corrupted"),
            "{}",
            l.status()
        );
    }

    #[test]
    fn corrupt_bio_byte_changes_one_byte_of_matching_requests() {
        let (base, l) = flakey("test-flakey 0 1 corrupt_bio_byte 513 w 7");
        let data = [3u8; 1024];
        l.write_at(&data, 0, Fua::No).unwrap();
        assert_eq!(data, [3u8; 1024], "the caller's buffer is untouched");
        let stored = base.to_vec();
        assert_eq!(stored[512], 7);
        assert_eq!(stored.iter().filter(|&&b| b == 3).count(), 1023);
        // A write shorter than 513 bytes, and reads, pass unchanged.
        l.write_at(&[4u8; 512], 2048, Fua::No).unwrap();
        let mut b = [0u8; 1024];
        l.read_at(&mut b, 0).unwrap();
        assert_eq!(b[512], 7);
        assert_eq!(base.to_vec()[2048..2560], [4u8; 512]);

        let (base, l) = flakey("test-flakey 1 1 corrupt_bio_byte 1 r 255");
        base.write_at(&[5u8; 512], 0, Fua::No).unwrap();
        let mut b = [0u8; 512];
        l.read_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 5, "up: untouched");
        l.read_at(&mut b, 0).unwrap();
        assert_eq!((b[0], b[1]), (255, 5), "down: first byte changed");
        assert_eq!(base.to_vec()[0], 5, "the device keeps its data");
        assert_eq!(l.status_json()["corrupted"], 1);
    }

    #[test]
    fn messages_force_resume_and_reset() {
        let (_, l) = flakey("test-flakey 2 2 1 error_reads");
        assert_eq!(
            l.message(&["down"]).unwrap(),
            "flakey: forced down until resume"
        );
        assert_eq!(run(&*l, "rr"), "EE");
        assert!(
            l.status()
                .starts_with("forced down (schedule: down 0/2 ops)"),
            "{}",
            l.status()
        );
        l.message(&["up"]).unwrap();
        assert_eq!(run(&*l, "rr"), "..");
        l.message(&["resume"]).unwrap();
        // Four operations counted: the schedule is at up 0/2 again, then down.
        assert_eq!(run(&*l, "rrrr"), "..EE");
        l.message(&["reset"]).unwrap();
        assert_eq!(run(&*l, "rrr"), "..E");
        assert_eq!(l.status_json()["state"], "down");
        for bad in [&["sideways"][..], &["up", "now"], &[]] {
            let e = l.message(bad).unwrap_err();
            assert!(
                e.to_string().contains("messages: up, down, resume, reset"),
                "{e}"
            );
        }
        assert_eq!(
            l.spec(),
            LayerSpec::TestFlakey {
                up: Period::Ops(2),
                down: Period::Ops(2),
                mode: FlakeyMode::ErrorReads
            }
        );
    }

    #[test]
    fn millisecond_periods_follow_the_clock() {
        let (_, l) = flakey("test-flakey 100ms 1000ms 1 error_writes");
        assert_eq!(run(&*l, "w"), ".");
        std::thread::sleep(std::time::Duration::from_millis(150));
        assert_eq!(run(&*l, "wr"), "E.");
        assert!(l.status().starts_with("down "), "{}", l.status());
        assert!(l.status().contains("/1000 ms"), "{}", l.status());
        l.message(&["reset"]).unwrap();
        assert_eq!(run(&*l, "w"), ".");
    }
}
