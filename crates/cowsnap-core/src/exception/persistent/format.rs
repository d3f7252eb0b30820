//! The kernel's persistent COW format, version 1: the only place where bytes are read or
//! written as metadata.
//!
//! Chunk 0 holds the header (`magic`, `valid`, `version`, `chunk_size`, four little-endian
//! `u32`s, the rest of the chunk zero). Metadata *areas* are whole chunks at
//! [`Geometry::area_location`] `= 1 + (epa + 1) * a`, where `epa = chunk_bytes / 16` is the
//! number of 16-byte entries `{old: u64 LE, new: u64 LE}` an area holds. The first entry
//! whose `new` is 0 ends the table; an area with no such entry is *full* and the table goes
//! on in the next area, which must therefore exist. Data chunks are every other chunk from
//! 2 on. Decoders never panic: bad input gives [`Error::Corrupt`] naming the device and the
//! byte offset of the offending field. `docs/format.md` is the normative description.

use crate::error::{Error, Result};
use crate::exception::Exception;
use crate::units::{Chunk, ChunkSize};

/// `SnAp` read as a little-endian `u32`.
pub const SNAP_MAGIC: u32 = 0x7041_6e53;
/// `BbRt` read as a little-endian `u32`: the magic of a bad-block relocation table (same
/// layout, `{bad, spare}` entries), so that it is never taken for a snapshot's COW.
pub const BBR_MAGIC: u32 = 0x7452_6242;
/// The only on-disk version there is.
pub const DISK_VERSION: u32 = 1;
/// Bytes of one `{old, new}` entry.
pub const ENTRY_BYTES: usize = 16;
/// Bytes of the header fields (the rest of chunk 0 is zero).
pub const HEADER_BYTES: usize = 16;
/// Chunks taken by the header.
pub const HEADER_CHUNKS: u64 = 1;
/// The first chunk that can hold data (chunk 1 is area 0).
pub const FIRST_DATA_CHUNK: u64 = 2;

/// The raw header fields, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawHeader {
    /// Offset 0: [`SNAP_MAGIC`], or 0 for a store never formatted.
    pub magic: u32,
    /// Offset 4: non-zero while the snapshot is valid.
    pub valid: u32,
    /// Offset 8: [`DISK_VERSION`].
    pub version: u32,
    /// Offset 12: the chunk size in sectors.
    pub chunk_sectors: u32,
}

/// What a header says, once checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderState {
    /// Magic 0: a store to be formatted.
    Fresh,
    /// A formatted store.
    Formatted {
        /// `valid != 0`.
        valid: bool,
        /// The chunk size recorded in the header.
        chunk_size: ChunkSize,
    },
}

/// Decodes the four header fields from the start of chunk 0 (at least 16 bytes).
pub fn decode_raw_header(buf: &[u8], device: &str) -> Result<RawHeader> {
    if buf.len() < HEADER_BYTES {
        return Err(corrupt(
            device,
            0,
            format!(
                "the header needs {HEADER_BYTES} bytes, the device has {}",
                buf.len()
            ),
        ));
    }
    Ok(RawHeader {
        magic: le32(buf, 0),
        valid: le32(buf, 4),
        version: le32(buf, 8),
        chunk_sectors: le32(buf, 12),
    })
}

/// What a table in the kernel's layout is for: its magic says it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum TableKind {
    /// A snapshot's COW (`SnAp`): what the kernel reads.
    #[default]
    Snapshot,
    /// A bad-block relocation table (`BbRt`): `{bad chunk, spare chunk}` entries.
    Relocation,
}

impl TableKind {
    /// The magic of this kind.
    pub fn magic(self) -> u32 {
        match self {
            TableKind::Snapshot => SNAP_MAGIC,
            TableKind::Relocation => BBR_MAGIC,
        }
    }

    /// The kind a (non-zero) magic names, if any.
    pub fn from_magic(magic: u32) -> Option<TableKind> {
        match magic {
            SNAP_MAGIC => Some(TableKind::Snapshot),
            BBR_MAGIC => Some(TableKind::Relocation),
            _ => None,
        }
    }

    /// What a user calls it.
    pub fn describe(self) -> &'static str {
        match self {
            TableKind::Snapshot => "a dm-snapshot COW device (\"SnAp\")",
            TableKind::Relocation => "a cowsnap bad-block relocation table (\"BbRt\")",
        }
    }
}

/// Checks a snapshot COW's header as the kernel does, in its order: magic 0 is a fresh
/// store; another magic than `SnAp` is refused; the chunk size must be valid; the version
/// must be 1.
pub fn check_header(raw: &RawHeader, device: &str) -> Result<HeaderState> {
    check_header_as(raw, device, TableKind::Snapshot)
}

/// [`check_header`] for a table of `kind`: a header of the other kind is refused with a
/// message that names what it is (a relocation table is never used as a snapshot, nor
/// the reverse).
pub fn check_header_as(raw: &RawHeader, device: &str, kind: TableKind) -> Result<HeaderState> {
    if raw.magic == 0 {
        return Ok(HeaderState::Fresh);
    }
    if raw.magic != kind.magic() {
        let found = match TableKind::from_magic(raw.magic) {
            Some(other) => format!("it is {}", other.describe()),
            None => format!(
                "bad magic {:#010x} (\"{}\")",
                raw.magic,
                raw.magic.to_le_bytes().escape_ascii()
            ),
        };
        return Err(corrupt(
            device,
            0,
            format!(
                "{found}: not {} (want {:#010x})",
                kind.describe(),
                kind.magic()
            ),
        ));
    }
    let chunk_size = ChunkSize::from_sectors(u64::from(raw.chunk_sectors))
        .map_err(|e| corrupt(device, 12, format!("bad chunk size in header: {e}")))?;
    if raw.version != DISK_VERSION {
        return Err(corrupt(
            device,
            8,
            format!(
                "unsupported COW format version {} (only version {DISK_VERSION} exists)",
                raw.version
            ),
        ));
    }
    Ok(HeaderState::Formatted {
        valid: raw.valid != 0,
        chunk_size,
    })
}

/// Checks a header of either kind (the tools read both): the kind its magic names, and
/// what it says. Magic 0 is a fresh snapshot store.
pub fn check_header_any(raw: &RawHeader, device: &str) -> Result<(TableKind, HeaderState)> {
    let kind = TableKind::from_magic(raw.magic).unwrap_or(TableKind::Snapshot);
    check_header_as(raw, device, kind).map(|h| (kind, h))
}

/// Decodes and checks a header in one step.
pub fn decode_header(buf: &[u8], device: &str) -> Result<HeaderState> {
    check_header(&decode_raw_header(buf, device)?, device)
}

/// The header chunk of a snapshot COW: magic, `valid`, version 1, the chunk size, zeros to
/// the chunk's end.
pub fn encode_header(valid: bool, chunk_size: ChunkSize) -> Vec<u8> {
    encode_header_as(valid, chunk_size, TableKind::Snapshot)
}

/// [`encode_header`] with the magic of `kind`.
pub fn encode_header_as(valid: bool, chunk_size: ChunkSize, kind: TableKind) -> Vec<u8> {
    let mut buf = vec![0u8; chunk_size.bytes_usize()];
    buf[0..4].copy_from_slice(&kind.magic().to_le_bytes());
    buf[4..8].copy_from_slice(&u32::from(valid).to_le_bytes());
    buf[8..12].copy_from_slice(&DISK_VERSION.to_le_bytes());
    // At most 2^21 sectors: fits a u32.
    let cs = u32::try_from(chunk_size.sectors()).unwrap_or(u32::MAX);
    buf[12..16].copy_from_slice(&cs.to_le_bytes());
    buf
}

/// The layout of one chunk size: where areas are, which chunks hold data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    chunk_size: ChunkSize,
    epa: u64,
}

impl Geometry {
    /// The layout for `chunk_size`.
    pub fn new(chunk_size: ChunkSize) -> Self {
        Geometry {
            chunk_size,
            epa: chunk_size.bytes() / ENTRY_BYTES as u64,
        }
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }

    /// Entries per area (`chunk_bytes / 16`).
    pub fn exceptions_per_area(&self) -> u64 {
        self.epa
    }

    /// The chunk of area `a`: `1 + (epa + 1) * a` (saturating, for hostile input).
    pub fn area_location(&self, a: u64) -> Chunk {
        Chunk(
            (self.epa + 1)
                .saturating_mul(a)
                .saturating_add(HEADER_CHUNKS),
        )
    }

    /// Byte offset of area `a`.
    pub fn area_offset(&self, a: u64) -> u64 {
        self.area_location(a)
            .0
            .saturating_mul(self.chunk_size.bytes())
    }

    /// True when chunk `c` is an area slot.
    pub fn is_area_slot(&self, c: Chunk) -> bool {
        c.0 % (self.epa + 1) == 1
    }

    /// True when `c` can hold data: not the header, not an area slot.
    pub fn is_data_chunk(&self, c: Chunk) -> bool {
        c.0 >= FIRST_DATA_CHUNK && !self.is_area_slot(c)
    }

    /// `c` if it can hold data, else the next chunk that can.
    pub fn skip_metadata(&self, c: Chunk) -> Chunk {
        if c.0 < FIRST_DATA_CHUNK {
            Chunk(FIRST_DATA_CHUNK)
        } else if self.is_area_slot(c) {
            Chunk(c.0.saturating_add(1))
        } else {
            c
        }
    }

    /// Where entry `j` of area `a` lands when chunks are committed in allocation order
    /// with nothing leaked: the `j`-th data chunk after the area.
    pub fn dense_chunk(&self, a: u64, j: u64) -> Chunk {
        Chunk(self.area_location(a).0.saturating_add(1).saturating_add(j))
    }

    /// Byte offset of entry `j` of area `a`.
    pub fn entry_offset(&self, a: u64, j: u64) -> u64 {
        self.area_offset(a)
            .saturating_add(j.saturating_mul(ENTRY_BYTES as u64))
    }
}

/// The decoded contents of one area.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AreaContents {
    /// The entries before the terminator, in order.
    pub entries: Vec<Exception>,
    /// No terminator: the table goes on in the next area.
    pub full: bool,
    /// Non-zero bytes after the terminator (the kernel ignores them; a torn metadata
    /// write can leave them; `cow check` reports them).
    pub junk_after_terminator: bool,
}

/// Decodes area `area` from `buf` (one whole chunk). Only the framing is checked here;
/// the entries' values are [`validate`](super::validate)'s.
pub fn decode_area(buf: &[u8], geo: &Geometry, area: u64, device: &str) -> Result<AreaContents> {
    if buf.len() as u64 != geo.chunk_size.bytes() {
        return Err(corrupt(
            device,
            geo.area_offset(area),
            format!(
                "area {area} is {} bytes, a chunk is {}",
                buf.len(),
                geo.chunk_size.bytes()
            ),
        ));
    }
    let mut out = AreaContents {
        full: true,
        ..Default::default()
    };
    for (j, e) in buf.chunks_exact(ENTRY_BYTES).enumerate() {
        let old = le64(e, 0);
        let new = le64(e, 8);
        if new == 0 {
            out.full = false;
            let rest = &buf[(j + 1) * ENTRY_BYTES..];
            // The terminator's own `old` is ignored; so is what follows it.
            out.junk_after_terminator = old != 0 || rest.iter().any(|&b| b != 0);
            break;
        }
        out.entries.push(Exception::new(old, new));
    }
    Ok(out)
}

/// The bytes of an area holding `entries` (then a zero terminator, then zeros).
/// Entries past the area's capacity are ignored.
pub fn encode_area(entries: &[Exception], geo: &Geometry) -> Vec<u8> {
    let mut buf = vec![0u8; geo.chunk_size.bytes_usize()];
    encode_entries(&mut buf, entries);
    buf
}

/// Writes `entries` at the start of `buf`, 16 bytes each (as many as fit).
pub fn encode_entries(buf: &mut [u8], entries: &[Exception]) {
    for (slot, e) in buf.chunks_exact_mut(ENTRY_BYTES).zip(entries) {
        slot[0..8].copy_from_slice(&e.old.0.to_le_bytes());
        slot[8..16].copy_from_slice(&e.new.0.to_le_bytes());
    }
}

/// A [`Error::Corrupt`] for `device` at byte `offset`.
pub fn corrupt(device: &str, offset: u64, reason: String) -> Error {
    Error::Corrupt {
        device: device.to_string(),
        offset,
        reason,
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(s: u64) -> ChunkSize {
        ChunkSize::from_sectors(s).unwrap()
    }

    #[test]
    fn header_round_trips_and_matches_the_kernel_bytes() {
        let h = encode_header(true, cs(16));
        assert_eq!(h.len(), 8192);
        assert_eq!(
            &h[..16],
            &[0x53, 0x6e, 0x41, 0x70, 1, 0, 0, 0, 1, 0, 0, 0, 0x10, 0, 0, 0]
        );
        assert!(h[16..].iter().all(|&b| b == 0));
        assert_eq!(
            decode_header(&h, "t").unwrap(),
            HeaderState::Formatted {
                valid: true,
                chunk_size: cs(16)
            }
        );
        let inv = encode_header(false, cs(8));
        assert_eq!(
            decode_header(&inv, "t").unwrap(),
            HeaderState::Formatted {
                valid: false,
                chunk_size: cs(8)
            }
        );
        assert_eq!(decode_header(&[0u8; 512], "t").unwrap(), HeaderState::Fresh);
    }

    #[test]
    fn bad_headers_name_the_offset() {
        let mut h = encode_header(true, cs(16));
        h[..8].copy_from_slice(b"NOTSNAP!");
        match decode_header(&h, "cow.img") {
            Err(Error::Corrupt { device, offset, .. }) => {
                assert_eq!((device.as_str(), offset), ("cow.img", 0))
            }
            r => panic!("{r:?}"),
        }
        let mut h = encode_header(true, cs(16));
        h[8] = 2;
        assert!(matches!(
            decode_header(&h, "c"),
            Err(Error::Corrupt { offset: 8, .. })
        ));
        let mut h = encode_header(true, cs(16));
        h[12] = 12;
        assert!(matches!(
            decode_header(&h, "c"),
            Err(Error::Corrupt { offset: 12, .. })
        ));
        assert!(matches!(
            decode_header(&[1u8; 7], "c"),
            Err(Error::Corrupt { offset: 0, .. })
        ));
    }

    #[test]
    fn geometry_matches_the_reference_fixture() {
        let g = Geometry::new(cs(8));
        assert_eq!(g.exceptions_per_area(), 256);
        assert_eq!(g.area_location(0), Chunk(1));
        assert_eq!(g.area_location(1), Chunk(258));
        assert_eq!(g.area_offset(1), 258 * 4096);
        assert!(g.is_area_slot(Chunk(258)) && !g.is_area_slot(Chunk(257)));
        assert_eq!(g.skip_metadata(Chunk(258)), Chunk(259));
        assert_eq!(g.skip_metadata(Chunk(0)), Chunk(2));
        assert_eq!(g.dense_chunk(1, 0), Chunk(259));
        assert_eq!(Geometry::new(cs(16)).exceptions_per_area(), 512);
    }

    #[test]
    fn areas_round_trip_with_terminator_and_full_flag() {
        let g = Geometry::new(cs(8));
        let es = vec![Exception::new(5, 2), Exception::new(9, 3)];
        let buf = encode_area(&es, &g);
        assert_eq!(
            &buf[..16],
            &[5, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]
        );
        let a = decode_area(&buf, &g, 0, "t").unwrap();
        assert_eq!(a.entries, es);
        assert!(!a.full && !a.junk_after_terminator);
        let all: Vec<_> = (0..256).map(|i| Exception::new(i, i + 2)).collect();
        let a = decode_area(&encode_area(&all, &g), &g, 0, "t").unwrap();
        assert!(a.full);
        assert_eq!(a.entries.len(), 256);
        let mut junk = encode_area(&es, &g);
        junk[100] = 1;
        assert!(
            decode_area(&junk, &g, 0, "t")
                .unwrap()
                .junk_after_terminator
        );
        assert!(decode_area(&junk[..100], &g, 0, "t").is_err());
    }
}
