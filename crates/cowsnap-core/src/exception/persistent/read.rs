//! Reading persistent metadata from a COW device: the header, then the chain of areas.
//!
//! Shared by the store's load and by the inspection tools, which differ only in what they
//! do with the [`Validator`]'s findings (the store refuses the COW at the first, `cow
//! check` lists them all).

use super::format::{self, AreaContents, Geometry, RawHeader};
use super::validate::{Bounds, Slot, Validator};
use crate::dev::BlockDevice;
use crate::error::Result;
use crate::exception::store::Resume;
use crate::exception::Exception;

/// Reads the raw header fields from sector 0 of `cow`.
pub fn read_raw_header(cow: &dyn BlockDevice) -> Result<RawHeader> {
    let device = cow.describe();
    if cow.size() < 512 {
        return Err(format::corrupt(
            &device,
            0,
            format!(
                "the device has {} bytes, too small to hold a header",
                cow.size()
            ),
        ));
    }
    let mut buf = [0u8; 512];
    cow.read_at(&mut buf, 0)?;
    format::decode_raw_header(&buf, &device)
}

/// Areas read one after another before [`walk_areas`] starts reading ahead: a short walk
/// (a small COW, the tail after an index) reads exactly the areas it needs.
const READ_AHEAD_AFTER: u64 = 16;
/// Areas a walk reads ahead of the one it decodes (the kernel prefetches 12).
const READ_AHEAD: usize = 12;

/// Reads area `start`, `start + 1`, ... until the first that is not full, calling `f` with
/// each (the areas before `start` are taken to be full). A full area whose successor lies
/// past the end of the COW is corrupt. Returns the index of the last area read (the
/// *current* area). After [`READ_AHEAD_AFTER`] areas a second thread reads up to
/// [`READ_AHEAD`] areas ahead, so that a long walk (a rebuild's full scan) overlaps its
/// reads with the work `f` does.
pub fn walk_areas(
    cow: &dyn BlockDevice,
    geo: &Geometry,
    start: u64,
    f: &mut dyn FnMut(u64, &AreaContents) -> Result<()>,
) -> Result<u64> {
    let device = cow.describe();
    let cs = geo.chunk_size();
    let cow_chunks = cs.whole_chunks(cow.size());
    let in_cow = |area: u64| -> Result<()> {
        let loc = geo.area_location(area);
        if loc.0 < cow_chunks {
            return Ok(());
        }
        let why = if area == 0 {
            format!(
                "metadata area 0 (chunk 1) is past the end of the COW ({cow_chunks} whole chunks)"
            )
        } else {
            format!(
                "metadata area {} is full, so area {area} must follow at chunk {loc}, past the end of the COW ({cow_chunks} whole chunks)",
                area - 1
            )
        };
        Err(format::corrupt(&device, geo.area_offset(area), why))
    };
    // Decodes area `area`'s bytes and hands it on; true when the walk goes on.
    let mut visit = |area: u64, bytes: &[u8]| -> Result<bool> {
        let contents = format::decode_area(bytes, geo, area, &device)?;
        f(area, &contents)?;
        Ok(contents.full)
    };
    let mut buf = vec![0u8; cs.bytes_usize()];
    let mut area = start;
    // One by one first.
    while area < start + READ_AHEAD_AFTER {
        in_cow(area)?;
        cow.read_at(&mut buf, geo.area_offset(area))?;
        if !visit(area, &buf)? {
            return Ok(area);
        }
        area += 1;
    }
    // Then with a reader thread ahead; it stops at the COW's end or when the walk ends
    // (the receiver is dropped).
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<u8>>>(READ_AHEAD);
        let first = area;
        scope.spawn(move || {
            let mut a = first;
            while geo.area_location(a).0 < cow_chunks {
                let mut b = vec![0u8; cs.bytes_usize()];
                let r = cow.read_at(&mut b, geo.area_offset(a)).map(|()| b);
                if tx.send(r).is_err() {
                    return;
                }
                a += 1;
            }
        });
        loop {
            in_cow(area)?;
            let bytes = rx.recv().map_err(|_| {
                format::corrupt(
                    &device,
                    geo.area_offset(area),
                    "the area reader stopped".into(),
                )
            })??;
            if !visit(area, &bytes)? {
                return Ok(area);
            }
            area += 1;
        }
    })
}

/// What [`load_exceptions`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// The current (last) area.
    pub current_area: u64,
    /// Its entries.
    pub current_entries: Vec<Exception>,
    /// Largest `new` chunk seen.
    pub max_new: Option<u64>,
    /// Stray bytes after the terminator of the current area.
    pub junk_after_terminator: bool,
    /// Number of exceptions.
    pub count: u64,
}

/// Reads and validates the entries of a valid store from position `from.entries` on,
/// passing each to `sink` with its position, in order. Refuses the COW at the first
/// [`Finding`](super::validate::Finding) of the [`Validator`] (entries past the COW, or
/// past `origin_chunks` when given, entries on metadata, duplicate `old` or `new` chunks
/// among the entries read), naming the byte offset of the bad field. `count` in the
/// result counts the entries read.
pub fn load_exceptions(
    cow: &dyn BlockDevice,
    geo: &Geometry,
    origin_chunks: Option<u64>,
    from: Resume,
    sink: &mut dyn FnMut(u64, Exception) -> Result<()>,
) -> Result<Loaded> {
    let device = cow.describe();
    let mut validator = Validator::new(
        *geo,
        Bounds {
            cow_chunks: geo.chunk_size().whole_chunks(cow.size()),
            origin_chunks,
        },
    );
    if from.olds_checked {
        validator = validator.without_old_duplicates();
    }
    let mut loaded = Loaded::default();
    let epa = geo.exceptions_per_area();
    let (start, skip) = (from.entries / epa, from.entries % epa);
    let current = walk_areas(cow, geo, start, &mut |area, contents| {
        let first = if area == start { skip } else { 0 };
        if (contents.entries.len() as u64) < first {
            return Err(format::corrupt(
                &device,
                geo.area_offset(area),
                format!(
                    "metadata area {area} holds {} entries, fewer than the {first} the index covers",
                    contents.entries.len()
                ),
            ));
        }
        for (index, e) in contents
            .entries
            .iter()
            .enumerate()
            .skip(crate::units::mem_usize(first))
        {
            let slot = Slot {
                area,
                index: index as u64,
            };
            if let Some(finding) = validator.check(slot, *e).next() {
                return Err(finding.into_error(&device));
            }
            loaded.max_new = Some(loaded.max_new.map_or(e.new.0, |m| m.max(e.new.0)));
            sink(from.entries + loaded.count, *e)?;
            loaded.count += 1;
        }
        loaded.current_entries = contents.entries.clone();
        loaded.junk_after_terminator = contents.junk_after_terminator;
        Ok(())
    })?;
    loaded.current_area = current;
    Ok(loaded)
}

/// A fingerprint of the first `n` entries of the table: CRC32 of the header sector in the
/// high half, CRC32 of the bytes of the area holding entry `n - 1` up to and including
/// that entry in the low half. Appending entries leaves it unchanged; rewriting the header
/// or any of the last covered area's entries (a merge, a reformat) changes it.
pub fn fingerprint(cow: &dyn BlockDevice, geo: &Geometry, n: u64) -> Result<u64> {
    let mut header = [0u8; 512];
    cow.read_at(&mut header, 0)?;
    let high = u64::from(crc32fast::hash(&header)) << 32;
    let Some(last) = n.checked_sub(1) else {
        return Ok(high);
    };
    let epa = geo.exceptions_per_area();
    let (area, j) = (last / epa, last % epa);
    let at = geo.area_offset(area);
    let chunk = geo.chunk_size().bytes();
    if at.saturating_add(chunk) > cow.size() {
        return Err(format::corrupt(
            &cow.describe(),
            at,
            format!("metadata area {area} is past the end of the COW"),
        ));
    }
    let mut buf = vec![0u8; crate::units::mem_usize(chunk)];
    cow.read_at(&mut buf, at)?;
    let covered = &buf[..crate::units::mem_usize((j + 1) * 16)];
    Ok(high | u64::from(crc32fast::hash(covered)))
}
