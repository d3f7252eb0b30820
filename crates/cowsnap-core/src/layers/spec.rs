//! What a layer is: [`LayerSpec`] with its parameters, its dm-like table line, its parser
//! and the checks that a spec is sound and fits the device below.
//!
//! The same spec travels three ways: as JSON in the pool manifest (serde), as the words of a
//! CLI flag (`--layer "test-dust 8"`, [`LayerSpec::parse`]) and as a dm-like table line for
//! status output ([`LayerSpec::table_line`]). [`fmt::Display`] prints the words `parse`
//! reads back, so `parse(&spec.to_string()) == spec` for every valid spec.

use std::fmt;

use crate::error::{Error, Result};
use crate::units::SECTOR_SIZE;

/// The targets [`LayerSpec::parse`] knows, for error messages.
pub const TARGETS: &str = "linear, test-error, test-zero, test-flakey, test-dust, test-delay";

/// Largest dust block: 2^21 sectors (1 GiB), as dm-dust.
pub const MAX_DUST_BLOCK_SECTORS: u64 = 1 << 21;

/// What a layer is, with its parameters: stored in the pool manifest (serde, JSON), parsed
/// from the words of a dm-like table line.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "target", rename_all = "kebab-case")]
pub enum LayerSpec {
    /// Sectors `start..start+sectors` of the device below, as a device of `sectors`.
    Linear {
        /// First sector in the device below.
        start: u64,
        /// Length in sectors (not zero).
        sectors: u64,
    },
    /// EIO on reads, writes, discards and write-zeroes overlapping sectors
    /// `start..start+sectors`; everything else (and every flush) passes.
    TestError {
        /// First failing sector.
        start: u64,
        /// Number of failing sectors (not zero).
        sectors: u64,
    },
    /// Reads zeros; writes, discards, write-zeroes and flushes succeed and do nothing.
    TestZero,
    /// Up for `up`, then unreliable for `down`, repeating; `mode` says how it fails while down.
    TestFlakey {
        /// How long the device works.
        up: Period,
        /// How long it fails (in the same unit as `up`).
        down: Period,
        /// What goes wrong while down (default: every operation fails).
        #[serde(default)]
        mode: FlakeyMode,
    },
    /// Emulated bad blocks (dm-dust): reads of a bad block fail; a write to one "remaps" it.
    TestDust {
        /// Block size in sectors: a power of two from 1 (512 bytes) to 2^21 (1 GiB).
        #[serde(default = "one")]
        block_sectors: u64,
        /// Bad block numbers, sorted (write-fail counts are not recorded).
        #[serde(default)]
        bad: Vec<u64>,
        /// Whether bad blocks fail (dm-dust's `fail_read_on_bad_block`); disabled, the
        /// layer passes everything (dm-dust's `bypass`, its state when loaded).
        #[serde(default)]
        enabled: bool,
    },
    /// Sleeps before passing each operation down.
    TestDelay {
        /// Microseconds before each read.
        read_us: u64,
        /// Microseconds before each write, discard and write-zeroes (FUA included).
        write_us: u64,
        /// Microseconds before each flush.
        flush_us: u64,
    },
}

fn one() -> u64 {
    1
}

/// A length of time for [`LayerSpec::TestFlakey`]: operations (deterministic, the default
/// in table lines: a bare number) or wall-clock milliseconds (`Nms` or `Ns`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Period {
    /// A number of operations: reads, writes (discards and write-zeroes included) and
    /// flushes that reached the layer inside its size.
    #[serde(rename = "ops")]
    Ops(u64),
    /// Milliseconds of wall-clock time since the layer was built or reset.
    #[serde(rename = "ms")]
    Millis(u64),
}

impl Period {
    /// The count, whatever the unit.
    pub fn count(self) -> u64 {
        match self {
            Period::Ops(n) | Period::Millis(n) => n,
        }
    }

    /// The unit's name in status lines: `ops` or `ms`.
    pub fn unit(self) -> &'static str {
        match self {
            Period::Ops(_) => "ops",
            Period::Millis(_) => "ms",
        }
    }

    fn same_unit(self, other: Period) -> bool {
        matches!(
            (self, other),
            (Period::Ops(_), Period::Ops(_)) | (Period::Millis(_), Period::Millis(_))
        )
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Period::Ops(n) => write!(f, "{n}"),
            Period::Millis(n) => write!(f, "{n}ms"),
        }
    }
}

/// Which requests a flakey `corrupt_bio_byte` changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Reads (the data returned is changed; the device keeps the right data).
    Reads,
    /// Writes (the device receives changed data; the caller's buffer is untouched).
    Writes,
}

/// What a flakey layer does while down (dm-flakey's features).
///
/// Flushes count as writes, as in dm-flakey (a flush is a write request without data):
/// `error_writes` and `error_all` fail them, `drop_writes` completes them without passing
/// them down, the other modes pass them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlakeyMode {
    /// Reads fail with EIO; writes and flushes pass.
    ErrorReads,
    /// Writes, discards, write-zeroes and flushes fail with EIO; reads pass.
    ErrorWrites,
    /// Every operation fails with EIO (dm-flakey with no feature).
    #[default]
    ErrorAll,
    /// Writes, discards, write-zeroes and flushes succeed without reaching the device;
    /// reads pass.
    DropWrites,
    /// The `nth` byte (1-based) of every request of direction `on` with at least `nth`
    /// bytes becomes `value`; everything else passes.
    CorruptBioByte {
        /// Which byte of the request, counting from 1.
        nth: u64,
        /// Reads or writes.
        on: Direction,
        /// The byte written in its place.
        value: u8,
    },
}

impl LayerSpec {
    /// The dm-like table line of this layer over a device of `below_sectors`:
    /// `START LEN TARGET ARGS`, e.g. `0 2048 test-dust 1 0 enabled`. START is always 0, LEN
    /// the layer's size in sectors (a linear layer's own length, else `below_sectors`).
    pub fn table_line(&self, below_sectors: u64) -> String {
        let len = match self {
            LayerSpec::Linear { sectors, .. } => *sectors,
            _ => below_sectors,
        };
        format!("0 {len} {self}")
    }

    /// The target's name: `linear`, `test-error`, `test-zero`, `test-flakey`, `test-dust`
    /// or `test-delay`.
    pub fn target_name(&self) -> &'static str {
        match self {
            LayerSpec::Linear { .. } => "linear",
            LayerSpec::TestError { .. } => "test-error",
            LayerSpec::TestZero => "test-zero",
            LayerSpec::TestFlakey { .. } => "test-flakey",
            LayerSpec::TestDust { .. } => "test-dust",
            LayerSpec::TestDelay { .. } => "test-delay",
        }
    }

    /// Parses `TARGET ARGS...` (a table line without START and LEN), what a CLI flag
    /// `--layer "test-dust 8"` gives:
    ///
    /// * `linear START SECTORS`
    /// * `test-error START SECTORS`
    /// * `test-zero`
    /// * `test-flakey UP DOWN [[N] FEATURE...]`: UP and DOWN are operations (`100`) or time
    ///   (`250ms`, `2s`), in the same unit; FEATURE is one of `error_reads`, `error_writes`,
    ///   `drop_writes`, `corrupt_bio_byte NTH r|w VALUE`, or `error_all` (the same as both
    ///   `error_reads error_writes`, and as no feature: every operation fails); N, dm's count
    ///   of feature words, is optional but must match when given.
    /// * `test-dust [BLOCK_SECTORS [NBAD BAD...]] [enabled|disabled]` (defaults: 1, none,
    ///   disabled as dm-dust when loaded)
    /// * `test-delay US` or `READ_US WRITE_US` (flushes as writes) or
    ///   `READ_US WRITE_US FLUSH_US`
    ///
    /// Errors are [`Error::InvalidArgument`] naming the bad word (and, for an unknown
    /// target, listing the known ones). Only checks that need the device below are left to
    /// [`size_over`](Self::size_over).
    pub fn parse(line: &str) -> Result<LayerSpec> {
        let mut words = line.split_whitespace();
        let Some(target) = words.next() else {
            return Err(invalid(format!(
                "empty layer: expected TARGET ARGS...; known targets: {TARGETS}"
            )));
        };
        let args: Vec<&str> = words.collect();
        let spec = match target {
            "linear" | "test-error" => {
                let [start, sectors] = exact(target, &args, "START SECTORS")?;
                let start = number(target, "start sector", start)?;
                let sectors = number(target, "sector count", sectors)?;
                if target == "linear" {
                    LayerSpec::Linear { start, sectors }
                } else {
                    LayerSpec::TestError { start, sectors }
                }
            }
            "test-zero" => {
                let [] = exact(target, &args, "no arguments")?;
                LayerSpec::TestZero
            }
            "test-flakey" => parse_flakey(&args)?,
            "test-dust" => parse_dust(&args)?,
            "test-delay" => parse_delay(&args)?,
            other => {
                return Err(invalid(format!(
                    "unknown target {other:?}; known targets: {TARGETS}"
                )))
            }
        };
        spec.check()?;
        Ok(spec)
    }

    /// Checks what can be checked without the device below: non-empty ranges that do not
    /// overflow, a flakey cycle that is not empty and counts in one unit, a dust block size
    /// that is a power of two and no bad block listed twice.
    pub fn check(&self) -> Result<()> {
        let name = self.target_name();
        match self {
            LayerSpec::Linear { start, sectors } | LayerSpec::TestError { start, sectors } => {
                if *sectors == 0 {
                    return Err(invalid(format!("{name}: the sector count must not be 0")));
                }
                range_end_bytes(name, *start, *sectors).map(|_| ())
            }
            LayerSpec::TestZero | LayerSpec::TestDelay { .. } => Ok(()),
            LayerSpec::TestFlakey { up, down, mode } => {
                if !up.same_unit(*down) {
                    return Err(invalid(format!(
                        "{name}: up ({up}) and down ({down}) must count in the same unit \
                         (both operations or both times)"
                    )));
                }
                match up.count().checked_add(down.count()) {
                    Some(0) => Err(invalid(format!("{name}: up + down must not be 0"))),
                    None => Err(invalid(format!("{name}: up + down is too large"))),
                    Some(_) => match mode {
                        FlakeyMode::CorruptBioByte { nth: 0, .. } => Err(invalid(format!(
                            "{name}: corrupt_bio_byte counts bytes from 1, not 0"
                        ))),
                        _ => Ok(()),
                    },
                }
            }
            LayerSpec::TestDust {
                block_sectors, bad, ..
            } => {
                if !block_sectors.is_power_of_two() || *block_sectors > MAX_DUST_BLOCK_SECTORS {
                    return Err(invalid(format!(
                        "{name}: block size {block_sectors} sectors is not a power of two \
                         from 1 to {MAX_DUST_BLOCK_SECTORS}"
                    )));
                }
                let mut sorted = bad.clone();
                sorted.sort_unstable();
                match sorted.windows(2).find(|w| w[0] == w[1]) {
                    Some(w) => Err(invalid(format!("{name}: bad block {} listed twice", w[0]))),
                    None => Ok(()),
                }
            }
        }
    }

    /// Size in bytes of the layer over a device of `below_bytes`; an error when the spec is
    /// unsound ([`check`](Self::check)) or does not fit: a linear range or a test-error
    /// range past the end, a dust bad block past the last block.
    pub fn size_over(&self, below_bytes: u64) -> Result<u64> {
        self.check()?;
        let name = self.target_name();
        let below_sectors = below_bytes / SECTOR_SIZE;
        match self {
            LayerSpec::Linear { start, sectors } | LayerSpec::TestError { start, sectors } => {
                let end = range_end_bytes(name, *start, *sectors)?;
                if end > below_bytes {
                    return Err(invalid(format!(
                        "{name}: sectors {start}..{} are past the end of the device below \
                         ({below_sectors} sectors)",
                        start + sectors
                    )));
                }
                Ok(match self {
                    LayerSpec::Linear { .. } => end - start * SECTOR_SIZE,
                    _ => below_bytes,
                })
            }
            LayerSpec::TestDust {
                block_sectors, bad, ..
            } => {
                let blocks = below_bytes.div_ceil(block_sectors * SECTOR_SIZE);
                match bad.iter().find(|&&b| b >= blocks) {
                    Some(b) => Err(invalid(format!(
                        "{name}: bad block {b} is past the end of the device below \
                         ({blocks} blocks of {block_sectors} sectors)"
                    ))),
                    None => Ok(below_bytes),
                }
            }
            LayerSpec::TestZero | LayerSpec::TestFlakey { .. } | LayerSpec::TestDelay { .. } => {
                Ok(below_bytes)
            }
        }
    }
}

/// `TARGET ARGS`: the words [`LayerSpec::parse`] reads back.
impl fmt::Display for LayerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.target_name();
        match self {
            LayerSpec::Linear { start, sectors } | LayerSpec::TestError { start, sectors } => {
                write!(f, "{name} {start} {sectors}")
            }
            LayerSpec::TestZero => write!(f, "{name}"),
            LayerSpec::TestFlakey { up, down, mode } => {
                write!(f, "{name} {up} {down}")?;
                match mode {
                    FlakeyMode::ErrorAll => Ok(()),
                    FlakeyMode::ErrorReads => write!(f, " 1 error_reads"),
                    FlakeyMode::ErrorWrites => write!(f, " 1 error_writes"),
                    FlakeyMode::DropWrites => write!(f, " 1 drop_writes"),
                    FlakeyMode::CorruptBioByte { nth, on, value } => {
                        let dir = match on {
                            Direction::Reads => 'r',
                            Direction::Writes => 'w',
                        };
                        write!(f, " 4 corrupt_bio_byte {nth} {dir} {value}")
                    }
                }
            }
            LayerSpec::TestDust {
                block_sectors,
                bad,
                enabled,
            } => {
                write!(f, "{name} {block_sectors} {}", bad.len())?;
                for b in bad {
                    write!(f, " {b}")?;
                }
                let state = if *enabled { "enabled" } else { "disabled" };
                write!(f, " {state}")
            }
            LayerSpec::TestDelay {
                read_us,
                write_us,
                flush_us,
            } => write!(f, "{name} {read_us} {write_us} {flush_us}"),
        }
    }
}

/// One past the last byte of sectors `start..start+sectors`, or an error when that
/// overflows a byte offset.
fn range_end_bytes(name: &str, start: u64, sectors: u64) -> Result<u64> {
    start
        .checked_add(sectors)
        .and_then(|end| end.checked_mul(SECTOR_SIZE))
        .ok_or_else(|| invalid(format!("{name}: sectors {start} + {sectors} overflow")))
}

pub(crate) fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// Exactly `N` arguments, or an error showing the usage.
fn exact<'a, const N: usize>(target: &str, args: &[&'a str], usage: &str) -> Result<[&'a str; N]> {
    <[&str; N]>::try_from(args)
        .map_err(|_| invalid(format!("{target} takes {usage}, got {:?}", args.join(" "))))
}

/// A whole number, or an error naming the word and what it should have been.
pub(crate) fn number(target: &str, what: &str, word: &str) -> Result<u64> {
    word.parse()
        .map_err(|_| invalid(format!("{target}: {what} {word:?} is not a whole number")))
}

fn is_number(word: &str) -> bool {
    !word.is_empty() && word.bytes().all(|b| b.is_ascii_digit())
}

/// `N` or `Nops` (operations), `Nms` or `Ns` (time).
fn parse_period(what: &str, word: &str) -> Result<Period> {
    let bad = || {
        invalid(format!(
            "test-flakey: bad {what} period {word:?}: expected operations (100) or a time \
             (250ms, 2s)"
        ))
    };
    if let Some(n) = word.strip_suffix("ms") {
        return n.parse().map(Period::Millis).map_err(|_| bad());
    }
    if let Some(n) = word.strip_suffix('s').filter(|n| is_number(n)) {
        let secs: u64 = n.parse().map_err(|_| bad())?;
        return secs.checked_mul(1000).map(Period::Millis).ok_or_else(bad);
    }
    let n = word.strip_suffix("ops").unwrap_or(word);
    n.parse().map(Period::Ops).map_err(|_| bad())
}

fn parse_flakey(args: &[&str]) -> Result<LayerSpec> {
    let name = "test-flakey";
    let (Some(up), Some(down)) = (args.first(), args.get(1)) else {
        return Err(invalid(format!(
            "{name} takes UP DOWN [[N] FEATURE...], got {:?}",
            args.join(" ")
        )));
    };
    let up = parse_period("up", up)?;
    let down = parse_period("down", down)?;
    let mut features = &args[2..];
    if let Some(count) = features.first().filter(|w| is_number(w)) {
        let n = number(name, "feature count", count)?;
        features = &features[1..];
        if n != features.len() as u64 {
            return Err(invalid(format!(
                "{name}: the feature count says {n} words, but {} follow: {:?}",
                features.len(),
                features.join(" ")
            )));
        }
    }
    let mode = match features {
        [] => FlakeyMode::ErrorAll,
        ["error_reads"] => FlakeyMode::ErrorReads,
        ["error_writes"] => FlakeyMode::ErrorWrites,
        ["error_all"] | ["error_reads", "error_writes"] | ["error_writes", "error_reads"] => {
            FlakeyMode::ErrorAll
        }
        ["drop_writes"] => FlakeyMode::DropWrites,
        ["corrupt_bio_byte", nth, dir, value] => {
            let nth = number(name, "corrupt_bio_byte position", nth)?;
            let on = match *dir {
                "r" | "read" | "reads" => Direction::Reads,
                "w" | "write" | "writes" => Direction::Writes,
                other => {
                    return Err(invalid(format!(
                        "{name}: bad corrupt_bio_byte direction {other:?}: expected r or w"
                    )))
                }
            };
            let value = value.parse().map_err(|_| {
                invalid(format!(
                    "{name}: bad corrupt_bio_byte value {value:?}: expected 0 to 255"
                ))
            })?;
            FlakeyMode::CorruptBioByte { nth, on, value }
        }
        other => {
            return Err(invalid(format!(
                "{name}: unknown features {:?}; known: error_reads, error_writes, \
                 error_all, drop_writes, corrupt_bio_byte NTH r|w VALUE",
                other.join(" ")
            )))
        }
    };
    Ok(LayerSpec::TestFlakey { up, down, mode })
}

fn parse_dust(args: &[&str]) -> Result<LayerSpec> {
    let name = "test-dust";
    let mut rest = args;
    let mut block_sectors = 1;
    let mut bad = Vec::new();
    if let [first, tail @ ..] = rest {
        if is_number(first) {
            block_sectors = number(name, "block size", first)?;
            rest = tail;
        }
    }
    if let [count, tail @ ..] = rest {
        if is_number(count) {
            let n = number(name, "bad block count", count)?;
            rest = tail;
            for i in 0..n {
                let Some((word, tail)) = rest.split_first() else {
                    return Err(invalid(format!(
                        "{name}: {n} bad blocks announced, {i} given"
                    )));
                };
                bad.push(number(name, "bad block", word)?);
                rest = tail;
            }
        }
    }
    let enabled = match rest {
        [] | ["disabled"] => false,
        ["enabled"] => true,
        other => {
            return Err(invalid(format!(
                "{name}: unexpected {:?}; usage: test-dust [BLOCK_SECTORS [NBAD BAD...]] \
                 [enabled|disabled]",
                other.join(" ")
            )))
        }
    };
    Ok(LayerSpec::TestDust {
        block_sectors,
        bad,
        enabled,
    })
}

fn parse_delay(args: &[&str]) -> Result<LayerSpec> {
    let name = "test-delay";
    let us = |w: &str| number(name, "delay in microseconds", w);
    let (read_us, write_us, flush_us) = match args {
        [all] => (us(all)?, us(all)?, us(all)?),
        [r, w] => (us(r)?, us(w)?, us(w)?),
        [r, w, f] => (us(r)?, us(w)?, us(f)?),
        _ => {
            return Err(invalid(format!(
                "{name} takes US, READ_US WRITE_US or READ_US WRITE_US FLUSH_US, got {:?}",
                args.join(" ")
            )))
        }
    };
    Ok(LayerSpec::TestDelay {
        read_us,
        write_us,
        flush_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_target() -> Vec<LayerSpec> {
        vec![
            LayerSpec::Linear {
                start: 8,
                sectors: 16,
            },
            LayerSpec::TestError {
                start: 3,
                sectors: 2,
            },
            LayerSpec::TestZero,
            LayerSpec::TestFlakey {
                up: Period::Ops(10),
                down: Period::Ops(3),
                mode: FlakeyMode::ErrorAll,
            },
            LayerSpec::TestFlakey {
                up: Period::Millis(250),
                down: Period::Millis(0),
                mode: FlakeyMode::ErrorReads,
            },
            LayerSpec::TestFlakey {
                up: Period::Ops(0),
                down: Period::Ops(1),
                mode: FlakeyMode::ErrorWrites,
            },
            LayerSpec::TestFlakey {
                up: Period::Ops(1),
                down: Period::Ops(1),
                mode: FlakeyMode::DropWrites,
            },
            LayerSpec::TestFlakey {
                up: Period::Ops(5),
                down: Period::Ops(5),
                mode: FlakeyMode::CorruptBioByte {
                    nth: 7,
                    on: Direction::Writes,
                    value: 255,
                },
            },
            LayerSpec::TestDust {
                block_sectors: 8,
                bad: vec![1, 5, 9],
                enabled: true,
            },
            LayerSpec::TestDust {
                block_sectors: 1,
                bad: vec![],
                enabled: false,
            },
            LayerSpec::TestDelay {
                read_us: 1,
                write_us: 2,
                flush_us: 3,
            },
        ]
    }

    #[test]
    fn table_lines_and_json_round_trip_for_every_target() {
        for spec in every_target() {
            let line = spec.table_line(2048);
            let words: Vec<&str> = line.splitn(3, ' ').collect();
            assert_eq!(words[0], "0", "{line}");
            let len = match spec {
                LayerSpec::Linear { sectors, .. } => sectors,
                _ => 2048,
            };
            assert_eq!(words[1], len.to_string(), "{line}");
            assert!(words[2].starts_with(spec.target_name()), "{line}");
            assert_eq!(LayerSpec::parse(words[2]).unwrap(), spec, "{line}");
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(
                serde_json::from_str::<LayerSpec>(&json).unwrap(),
                spec,
                "{json}"
            );
        }
    }

    #[test]
    fn table_lines_look_like_dm_tables() {
        let dust = LayerSpec::TestDust {
            block_sectors: 1,
            bad: vec![],
            enabled: true,
        };
        assert_eq!(dust.table_line(2048), "0 2048 test-dust 1 0 enabled");
        let flakey = LayerSpec::parse("test-flakey 100 10ms").unwrap_err();
        assert!(flakey.to_string().contains("same unit"), "{flakey}");
        let flakey = LayerSpec::parse("test-flakey 2s 500ms 1 drop_writes").unwrap();
        assert_eq!(
            flakey.table_line(64),
            "0 64 test-flakey 2000ms 500ms 1 drop_writes"
        );
    }

    #[test]
    fn json_uses_the_documented_shape() {
        let spec = LayerSpec::TestFlakey {
            up: Period::Ops(3),
            down: Period::Millis(4),
            mode: FlakeyMode::CorruptBioByte {
                nth: 1,
                on: Direction::Reads,
                value: 9,
            },
        };
        let v = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "target": "test-flakey",
                "up": {"ops": 3},
                "down": {"ms": 4},
                "mode": {"corrupt_bio_byte": {"nth": 1, "on": "reads", "value": 9}},
            })
        );
        let dust: LayerSpec = serde_json::from_str(r#"{"target":"test-dust"}"#).unwrap();
        assert_eq!(
            dust,
            LayerSpec::TestDust {
                block_sectors: 1,
                bad: vec![],
                enabled: false
            }
        );
        let flakey: LayerSpec =
            serde_json::from_str(r#"{"target":"test-flakey","up":{"ops":1},"down":{"ops":2}}"#)
                .unwrap();
        assert!(matches!(
            flakey,
            LayerSpec::TestFlakey {
                mode: FlakeyMode::ErrorAll,
                ..
            }
        ));
        assert_eq!(
            serde_json::to_value(LayerSpec::TestZero).unwrap(),
            serde_json::json!({"target": "test-zero"})
        );
    }

    #[test]
    fn parse_accepts_short_forms() {
        let p = |s: &str| LayerSpec::parse(s).unwrap();
        assert_eq!(
            p("test-dust 8"),
            LayerSpec::TestDust {
                block_sectors: 8,
                bad: vec![],
                enabled: false
            }
        );
        assert_eq!(
            p("  test-dust   enabled "),
            LayerSpec::TestDust {
                block_sectors: 1,
                bad: vec![],
                enabled: true
            }
        );
        assert_eq!(
            p("test-dust 2 2 7 3"),
            LayerSpec::TestDust {
                block_sectors: 2,
                bad: vec![7, 3],
                enabled: false
            }
        );
        assert_eq!(
            p("test-delay 5"),
            LayerSpec::TestDelay {
                read_us: 5,
                write_us: 5,
                flush_us: 5
            }
        );
        assert_eq!(
            p("test-delay 1 2"),
            LayerSpec::TestDelay {
                read_us: 1,
                write_us: 2,
                flush_us: 2
            }
        );
        assert_eq!(
            p("test-flakey 4ops 2 error_reads error_writes"),
            p("test-flakey 4 2 1 error_all")
        );
        assert_eq!(
            p("test-flakey 4ops 2 error_reads error_writes"),
            LayerSpec::TestFlakey {
                up: Period::Ops(4),
                down: Period::Ops(2),
                mode: FlakeyMode::ErrorAll
            }
        );
        assert_eq!(
            p("test-flakey 1 1 corrupt_bio_byte 3 w 0"),
            LayerSpec::TestFlakey {
                up: Period::Ops(1),
                down: Period::Ops(1),
                mode: FlakeyMode::CorruptBioByte {
                    nth: 3,
                    on: Direction::Writes,
                    value: 0
                }
            }
        );
    }

    #[test]
    fn parse_errors_name_the_bad_word() {
        let cases = [
            ("", "known targets: linear"),
            ("   ", "empty layer"),
            (
                "frobnicate 1 2",
                "\"frobnicate\"; known targets: linear, test-error",
            ),
            ("linear 1", "linear takes START SECTORS"),
            ("linear x 2", "start sector \"x\" is not a whole number"),
            ("linear 0 0", "must not be 0"),
            ("linear 18446744073709551615 1", "overflow"),
            ("test-error 1 2 3", "test-error takes START SECTORS"),
            ("test-error 0 0", "must not be 0"),
            ("test-zero 1", "test-zero takes no arguments, got \"1\""),
            ("test-flakey 1", "UP DOWN"),
            ("test-flakey x 1", "bad up period \"x\""),
            ("test-flakey 1 1y", "bad down period \"1y\""),
            ("test-flakey 0 0", "up + down must not be 0"),
            ("test-flakey 18446744073709551615 1", "too large"),
            ("test-flakey 1 1 2 drop_writes", "says 2 words"),
            (
                "test-flakey 1 1 error_some",
                "unknown features \"error_some\"; known: error_reads",
            ),
            ("test-flakey 1 1 corrupt_bio_byte 0 r 1", "from 1, not 0"),
            ("test-flakey 1 1 corrupt_bio_byte 1 x 1", "direction \"x\""),
            ("test-flakey 1 1 corrupt_bio_byte 1 r 256", "value \"256\""),
            ("test-dust 3", "not a power of two"),
            ("test-dust 0", "not a power of two"),
            ("test-dust 4194304", "not a power of two"),
            ("test-dust 1 3 1 2", "3 bad blocks announced, 2 given"),
            ("test-dust 1 2 1 1", "bad block 1 listed twice"),
            ("test-dust 1 1 x", "test-dust: bad block \"x\" is not"),
            ("test-dust 1 0 on", "unexpected \"on\""),
            ("test-delay", "test-delay takes"),
            ("test-delay 1 2 3 4", "test-delay takes"),
            ("test-delay -1", "delay in microseconds \"-1\" is not"),
        ];
        for (line, want) in cases {
            let e = LayerSpec::parse(line).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{line}: {e:?}");
            assert!(e.to_string().contains(want), "{line:?}: {e}");
        }
    }

    #[test]
    fn sizes_over_a_device_and_their_errors() {
        let mib = 1 << 20;
        let linear = LayerSpec::Linear {
            start: 1024,
            sectors: 1024,
        };
        assert_eq!(linear.size_over(mib).unwrap(), 512 * 1024);
        let past = LayerSpec::Linear {
            start: 1024,
            sectors: 1025,
        };
        let e = past.size_over(mib).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        let err = LayerSpec::TestError {
            start: 2047,
            sectors: 1,
        };
        assert_eq!(err.size_over(mib).unwrap(), mib);
        let err = LayerSpec::TestError {
            start: 2047,
            sectors: 2,
        };
        assert!(err.size_over(mib).is_err());
        let dust = |block_sectors, bad: Vec<u64>| LayerSpec::TestDust {
            block_sectors,
            bad,
            enabled: true,
        };
        assert_eq!(dust(8, vec![255]).size_over(mib).unwrap(), mib);
        let e = dust(8, vec![256]).size_over(mib).unwrap_err();
        assert!(
            e.to_string().contains("bad block 256 is past the end"),
            "{e}"
        );
        assert!(dust(6, vec![]).size_over(mib).is_err());
        // A last, partial block still counts.
        assert_eq!(dust(8, vec![1]).size_over(5 * 1024).unwrap(), 5 * 1024);
        assert!(dust(8, vec![2]).size_over(5 * 1024).is_err());
        assert!(LayerSpec::TestZero.size_over(mib).is_ok());
        let flakey = LayerSpec::TestFlakey {
            up: Period::Ops(0),
            down: Period::Ops(0),
            mode: FlakeyMode::ErrorAll,
        };
        assert!(flakey.size_over(mib).is_err());
    }
}
