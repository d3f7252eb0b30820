//! Tools for persistent COW devices, as library functions: [`check`] (a findings list),
//! [`dump`] (header, areas, exceptions) and [`export`] (the snapshot's view written out as
//! a raw image). None of them writes to the COW device.
//!
//! `check` reads what the kernel would read and more: every entry of every area, even on
//! a COW marked invalid, and reports each problem as a [`Finding`] with its byte offset
//! instead of stopping at the first, so that one run tells the whole story.

use std::fmt;

use serde::Serialize;

use super::format::{self, Geometry, HeaderState, RawHeader, TableKind};
use super::read;
use super::validate::{Bounds, Slot, Validator};
use crate::dev::{BlockDevice, Fua};
use crate::error::{Error, Result};
use crate::exception::{Exception, ExceptionTable};
use crate::units::{mem_usize, Chunk, ChunkSize};

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The kernel (and cowsnap) would refuse the COW, or would read wrong data.
    Error,
    /// Usable as it is, but not as cowsnap or a current kernel writes it.
    Warning,
}

/// One problem found by [`check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// Byte offset on the COW device, when the problem has one.
    pub offset: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match self.offset {
            Some(o) => write!(f, "{sev}: byte {o}: {}", self.message),
            None => write!(f, "{sev}: {}", self.message),
        }
    }
}

/// The header as stored, and what it means.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeaderInfo {
    /// The magic number (`0x70416e53` for `SnAp`).
    pub magic: u32,
    /// The valid flag.
    pub valid: u32,
    /// The format version.
    pub version: u32,
    /// The chunk size in sectors.
    pub chunk_sectors: u32,
    /// `fresh` (magic 0), `valid`, `invalid`, or `unknown` (refused).
    pub state: &'static str,
    /// What the magic says the table is: `snapshot` (`SnAp`) or `relocation` (`BbRt`, a
    /// bad-block relocation table in the same layout).
    pub table: TableKind,
}

impl HeaderInfo {
    fn new(raw: &RawHeader, state: &'static str) -> Self {
        HeaderInfo {
            magic: raw.magic,
            valid: raw.valid,
            version: raw.version,
            chunk_sectors: raw.chunk_sectors,
            state,
            table: TableKind::from_magic(raw.magic).unwrap_or_default(),
        }
    }
}

/// The result of [`check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// The device checked.
    pub device: String,
    /// The header, when one could be read.
    pub header: Option<HeaderInfo>,
    /// Metadata areas read.
    pub areas: u64,
    /// Exceptions found.
    pub exceptions: u64,
    /// Problems, in the order found.
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// True when nothing was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// True when some finding is an error.
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }
}

/// Validates a COW device: header, the chain of areas, every entry (by the loader's own
/// [`Validator`]: inside the COW, not on metadata, no duplicate origin or COW chunk), stray bytes after the terminator, and the
/// allocation-order layout that cowsnap and kernels since dm-snapshot 1.12 write.
pub fn check(cow: &dyn BlockDevice) -> CheckReport {
    let mut report = CheckReport {
        device: cow.describe(),
        header: None,
        areas: 0,
        exceptions: 0,
        findings: Vec::new(),
    };
    if let Some(chunk_size) = check_header(cow, &mut report) {
        check_areas(cow, chunk_size, &mut report);
    }
    report
}

impl CheckReport {
    fn error(&mut self, offset: Option<u64>, message: String) {
        self.findings.push(Finding {
            severity: Severity::Error,
            offset,
            message,
        });
    }

    /// An error finding for `e`, at its byte offset when it is a corruption.
    fn error_of(&mut self, e: &Error) {
        let offset = match e {
            Error::Corrupt { offset, .. } => Some(*offset),
            _ => None,
        };
        self.error(offset, reason(e));
    }
}

/// Reads and judges the header; returns the chunk size when there are areas to walk.
fn check_header(cow: &dyn BlockDevice, report: &mut CheckReport) -> Option<ChunkSize> {
    let raw = match read::read_raw_header(cow) {
        Ok(r) => r,
        Err(e) => {
            report.error(Some(0), e.to_string());
            return None;
        }
    };
    let (valid, chunk_size) = match format::check_header_any(&raw, &report.device).map(|(_, h)| h) {
        Ok(HeaderState::Fresh) => {
            report.header = Some(HeaderInfo::new(&raw, "fresh"));
            return None;
        }
        Ok(HeaderState::Formatted { valid, chunk_size }) => (valid, chunk_size),
        Err(e) => {
            report.header = Some(HeaderInfo::new(&raw, "unknown"));
            report.error_of(&e);
            return None;
        }
    };
    report.header = Some(HeaderInfo::new(
        &raw,
        if valid { "valid" } else { "invalid" },
    ));
    if !valid {
        report.findings.push(Finding {
            severity: Severity::Warning,
            offset: Some(4),
            message:
                "the header marks the snapshot invalid (valid = 0): its exceptions are not used"
                    .into(),
        });
    }
    Some(chunk_size)
}

/// Walks the areas: every entry through the loader's [`Validator`], stray bytes after a
/// terminator, and the first entry out of allocation order.
fn check_areas(cow: &dyn BlockDevice, chunk_size: ChunkSize, report: &mut CheckReport) {
    let geo = Geometry::new(chunk_size);
    let mut validator = Validator::new(
        geo,
        Bounds {
            cow_chunks: chunk_size.whole_chunks(cow.size()),
            origin_chunks: None,
        },
    );
    let mut found = Vec::new();
    let mut first_sparse: Option<(u64, u64, Exception)> = None;
    let walked = read::walk_areas(cow, &geo, 0, &mut |area, contents| {
        report.areas += 1;
        for (j, e) in (0u64..).zip(&contents.entries) {
            report.exceptions += 1;
            for f in validator.check(Slot { area, index: j }, *e) {
                found.push((Severity::Error, f.offset, f.to_string()));
            }
            if first_sparse.is_none() && e.new != geo.dense_chunk(area, j) {
                first_sparse = Some((area, j, *e));
            }
        }
        if contents.junk_after_terminator {
            found.push((
                Severity::Warning,
                geo.entry_offset(area, contents.entries.len() as u64),
                format!(
                    "area {area}: non-zero bytes after the terminator (ignored; a torn metadata write can leave them)"
                ),
            ));
        }
        Ok(())
    });
    for (severity, offset, message) in found {
        report.findings.push(Finding {
            severity,
            offset: Some(offset),
            message,
        });
    }
    if let Err(e) = walked {
        report.error_of(&e);
    }
    if let Some((area, j, e)) = first_sparse {
        report.findings.push(Finding {
            severity: Severity::Warning,
            offset: Some(geo.entry_offset(area, j)),
            message: format!(
                "area {area} entry {j} ({} -> {}) is not the next chunk in allocation order ({}): chunks were leaked or committed out of order (kernels before dm-snapshot 1.12 did so)",
                e.old,
                e.new,
                geo.dense_chunk(area, j)
            ),
        });
    }
}

fn reason(e: &Error) -> String {
    match e {
        Error::Corrupt { reason, .. } => reason.clone(),
        e => e.to_string(),
    }
}

/// One area in a [`Dump`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AreaInfo {
    /// Area index.
    pub index: u64,
    /// Its chunk on the COW.
    pub chunk: u64,
    /// Its byte offset.
    pub offset: u64,
    /// Entries before the terminator.
    pub entries: u64,
    /// No terminator: the table continues in the next area.
    pub full: bool,
}

/// One exception in a [`Dump`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DumpEntry {
    /// Area index.
    pub area: u64,
    /// Entry index in the area.
    pub index: u64,
    /// Origin chunk.
    pub old: u64,
    /// COW chunk.
    pub new: u64,
}

/// Everything the metadata of a COW device says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Dump {
    /// The device.
    pub device: String,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// The header.
    pub header: HeaderInfo,
    /// Entries per area (0 for a fresh COW).
    pub exceptions_per_area: u64,
    /// The areas, in order.
    pub areas: Vec<AreaInfo>,
    /// The exceptions, in on-disk order.
    pub exceptions: Vec<DumpEntry>,
    /// The kernel's status numbers for this COW, were it activated now
    /// (`allocated/total metadata`, sectors), or `Invalid`.
    pub status: String,
}

/// Reads the header and every area. A header the kernel would refuse is an error; a COW
/// marked invalid is dumped all the same (the status says `Invalid`).
pub fn dump(cow: &dyn BlockDevice) -> Result<Dump> {
    let device = cow.describe();
    let raw = read::read_raw_header(cow)?;
    let (_, state) = format::check_header_any(&raw, &device)?;
    let total = cow.size() >> 9;
    let (valid, chunk_size) = match state {
        HeaderState::Fresh => {
            return Ok(Dump {
                device,
                size_bytes: cow.size(),
                header: HeaderInfo::new(&raw, "fresh"),
                exceptions_per_area: 0,
                areas: Vec::new(),
                exceptions: Vec::new(),
                status: "fresh (not formatted)".into(),
            })
        }
        HeaderState::Formatted { valid, chunk_size } => (valid, chunk_size),
    };
    let geo = Geometry::new(chunk_size);
    let mut areas = Vec::new();
    let mut exceptions = Vec::new();
    let mut max_new = None::<u64>;
    let last = read::walk_areas(cow, &geo, 0, &mut |area, contents| {
        areas.push(AreaInfo {
            index: area,
            chunk: geo.area_location(area).0,
            offset: geo.area_offset(area),
            entries: contents.entries.len() as u64,
            full: contents.full,
        });
        for (j, e) in contents.entries.iter().enumerate() {
            max_new = Some(max_new.map_or(e.new.0, |m| m.max(e.new.0)));
            exceptions.push(DumpEntry {
                area,
                index: j as u64,
                old: e.old.0,
                new: e.new.0,
            });
        }
        Ok(())
    })?;
    let status = if valid {
        let p = super::plan::Planner::loaded(chunk_size, last, Vec::new(), max_new, false);
        format!(
            "{}/{} {}",
            p.allocated_sectors(),
            total,
            p.metadata_sectors()
        )
    } else {
        "Invalid".into()
    };
    Ok(Dump {
        device,
        size_bytes: cow.size(),
        header: HeaderInfo::new(&raw, if valid { "valid" } else { "invalid" }),
        exceptions_per_area: geo.exceptions_per_area(),
        areas,
        exceptions,
        status,
    })
}

/// What [`export`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ExportSummary {
    /// Bytes written to the output.
    pub bytes: u64,
    /// Chunks read from the COW device.
    pub chunks_from_cow: u64,
    /// Chunks read from the origin.
    pub chunks_from_origin: u64,
}

/// Writes the snapshot's view of `origin` + `cow` to `out` (at least the origin's size),
/// calling `progress(done, total)` in bytes as it goes, then flushes `out`. Reads the
/// metadata with the store's own validation; a COW marked invalid has no view and is an
/// error; a fresh COW (magic 0) has no exceptions and its view is the origin.
pub fn export(
    origin: &dyn BlockDevice,
    cow: &dyn BlockDevice,
    out: &dyn BlockDevice,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportSummary> {
    let device = cow.describe();
    let raw = read::read_raw_header(cow)?;
    let mut table = ExceptionTable::new();
    let chunk_size = match format::check_header(&raw, &device)? {
        HeaderState::Fresh => None,
        HeaderState::Formatted { valid: false, .. } => {
            return Err(Error::Invalid(format!(
                "{device}: the header marks the snapshot invalid; it has no view to export"
            )))
        }
        HeaderState::Formatted {
            valid: true,
            chunk_size,
        } => {
            let geo = Geometry::new(chunk_size);
            let origin_chunks = chunk_size.chunks_covering(origin.size());
            let from = crate::exception::store::Resume::default();
            read::load_exceptions(cow, &geo, Some(origin_chunks), from, &mut |_, e| {
                table
                    .insert(e)
                    .map_err(|err| format::corrupt(&device, 0, err.to_string()))
            })?;
            Some(chunk_size)
        }
    };
    let total = origin.size();
    if out.size() < total {
        return Err(Error::InvalidArgument(format!(
            "output {} has {} bytes, the origin {total}",
            out.describe(),
            out.size()
        )));
    }
    const STEP: u64 = 1 << 20;
    let piece = chunk_size.map_or(STEP, |cs| cs.bytes().min(STEP));
    let mut buf = vec![0u8; mem_usize(piece)];
    let mut summary = ExportSummary {
        bytes: 0,
        chunks_from_cow: 0,
        chunks_from_origin: 0,
    };
    let mut done = 0u64;
    let mut last_chunk = None;
    progress(0, total);
    while done < total {
        let n = (total - done).min(piece);
        let b = &mut buf[..mem_usize(n)];
        let mapped = chunk_size.and_then(|cs| {
            let c = cs.chunk_of_byte(done);
            table
                .lookup(c)
                .map(|new: Chunk| (c, cs.byte_offset(new) + (done - cs.byte_offset(c))))
        });
        let chunk = chunk_size.map(|cs| cs.chunk_of_byte(done));
        let fresh_chunk = chunk != last_chunk;
        last_chunk = chunk;
        match mapped {
            Some((_, at)) => {
                cow.read_at(b, at)?;
                summary.chunks_from_cow += u64::from(fresh_chunk);
            }
            None => {
                origin.read_at(b, done)?;
                summary.chunks_from_origin += u64::from(fresh_chunk);
            }
        }
        out.write_at(b, done, Fua::No)?;
        done += n;
        summary.bytes = done;
        progress(done, total);
    }
    out.flush()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDevice;
    use crate::exception::{ExceptionStore, PersistentStore};
    use crate::units::ChunkSize;
    use std::sync::Arc;

    fn written_cow() -> Arc<MemDevice> {
        let cow = Arc::new(MemDevice::new(64 * 4096));
        let s = PersistentStore::open(
            cow.clone(),
            Some(ChunkSize::from_sectors(8).unwrap()),
            false,
        )
        .unwrap();
        s.load(Default::default(), &mut |_, _| Ok(())).unwrap();
        for old in [5u64, 9] {
            let new = s.prepare(Chunk(old)).unwrap();
            cow.write_at(&[old.to_le_bytes()[0]; 4096], new.0 * 4096, Fua::No)
                .unwrap();
            s.commit(&[Exception {
                old: Chunk(old),
                new,
            }])
            .unwrap();
        }
        cow
    }

    #[test]
    fn a_cowsnap_cow_is_clean_and_dumps_its_table() {
        let cow = written_cow();
        let r = check(&*cow);
        assert!(r.is_clean(), "{:?}", r.findings);
        assert_eq!((r.areas, r.exceptions), (1, 2));
        let d = dump(&*cow).unwrap();
        assert_eq!(d.status, "32/512 16");
        assert_eq!(d.exceptions.len(), 2);
        assert_eq!((d.exceptions[1].old, d.exceptions[1].new), (9, 3));
        assert_eq!(d.areas[0].chunk, 1);
    }

    #[test]
    fn check_lists_every_problem_with_offsets() {
        let cow = written_cow();
        // Entry 1 -> the same COW chunk as entry 0, and junk after the terminator.
        cow.write_at(
            &{
                let mut s = [0u8; 512];
                cow.read_at(&mut s, 4096).unwrap();
                s[24] = 2;
                s[100] = 7;
                s
            },
            4096,
            Fua::No,
        )
        .unwrap();
        let r = check(&*cow);
        assert!(r.has_errors());
        let offsets: Vec<_> = r.findings.iter().map(|f| f.offset).collect();
        assert!(offsets.contains(&Some(4096 + 16 + 8)), "{:?}", r.findings);
        assert!(r
            .findings
            .iter()
            .any(|f| f.message.contains("after the terminator")));
        assert!(r
            .findings
            .iter()
            .any(|f| f.message.contains("allocation order")));
    }

    #[test]
    fn export_writes_the_snapshot_view() {
        let cow = written_cow();
        let origin = MemDevice::from_bytes(&[0xEE; 16 * 4096]);
        let out = MemDevice::new(16 * 4096);
        let mut calls = 0;
        let s = export(&origin, &*cow, &out, &mut |d, t| {
            assert!(d <= t);
            calls += 1
        })
        .unwrap();
        assert_eq!((s.chunks_from_cow, s.chunks_from_origin), (2, 14));
        let v = out.to_vec();
        assert!(v[5 * 4096..6 * 4096].iter().all(|&b| b == 5));
        assert!(v[9 * 4096..10 * 4096].iter().all(|&b| b == 9));
        assert!(v[..5 * 4096].iter().all(|&b| b == 0xEE));
        assert!(calls > 2);
    }
}
