//! Units: sectors, chunks and the chunk size.
//!
//! Every conversion between bytes, 512-byte sectors and chunks, and every split of a byte
//! range at chunk boundaries, lives here and nowhere else. A [`Chunk`] is an index on one
//! particular device (origin or COW) and means nothing without it; a [`ChunkSize`] is a
//! validated power of two between [`ChunkSize::MIN_SECTORS`] and [`ChunkSize::MAX_SECTORS`]
//! sectors, the range the kernel's dm-snapshot accepts.

use std::fmt;

/// Bytes in one sector, the unit of device-mapper tables and of the COW format.
pub const SECTOR_SIZE: u64 = 512;
const SECTOR_SHIFT: u32 = 9;

/// A count or an address in 512-byte sectors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sector(pub u64);

impl Sector {
    /// The byte offset of this sector.
    pub fn bytes(self) -> u64 {
        self.0 << SECTOR_SHIFT
    }

    /// The sector at a byte offset, if the offset is sector-aligned.
    pub fn from_bytes(bytes: u64) -> Option<Sector> {
        is_sector_aligned(bytes).then_some(Sector(bytes >> SECTOR_SHIFT))
    }

    /// Whole sectors in `bytes` (rounded down).
    pub fn floor_bytes(bytes: u64) -> Sector {
        Sector(bytes >> SECTOR_SHIFT)
    }
}

impl fmt::Display for Sector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// True when `bytes` is a multiple of [`SECTOR_SIZE`].
pub fn is_sector_aligned(bytes: u64) -> bool {
    bytes & (SECTOR_SIZE - 1) == 0
}

/// The index of a chunk on one device (origin or COW).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Chunk(pub u64);

impl fmt::Display for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A chunk size that is a power of two from 8 sectors (4 KiB) to 2^21 sectors (1 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkSize {
    /// log2 of the chunk size in sectors.
    shift: u8,
}

/// A chunk size that is not a power of two in the accepted range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid chunk size {sectors} sectors: must be a power of two from {min} to {max} sectors (4 KiB to 1 GiB)",
    min = ChunkSize::MIN_SECTORS,
    max = ChunkSize::MAX_SECTORS
)]
pub struct InvalidChunkSize {
    /// The rejected size, in sectors (rounded down when given in bytes).
    pub sectors: u64,
}

impl ChunkSize {
    /// Smallest chunk size: 8 sectors, 4 KiB.
    pub const MIN_SECTORS: u64 = 8;
    /// Largest chunk size: 2^21 sectors, 1 GiB (the kernel refuses 2^22).
    pub const MAX_SECTORS: u64 = 1 << 21;
    /// The smallest chunk size, 4 KiB.
    pub const MIN: ChunkSize = ChunkSize { shift: 3 };
    /// The chunk size of a new COW when none is asked for, wherever one is made (the
    /// pool, the CLI, a fresh persistent store): 8 sectors, 4 KiB, lvm2's default. A COW
    /// that has a header keeps the header's.
    pub const DEFAULT: ChunkSize = ChunkSize::MIN;

    /// A chunk size of `sectors` sectors.
    pub fn from_sectors(sectors: u64) -> Result<Self, InvalidChunkSize> {
        if sectors.is_power_of_two() && (Self::MIN_SECTORS..=Self::MAX_SECTORS).contains(&sectors) {
            // trailing_zeros of a u64 is at most 63, so it fits a u8.
            Ok(ChunkSize {
                shift: sectors.trailing_zeros() as u8,
            })
        } else {
            Err(InvalidChunkSize { sectors })
        }
    }

    /// A chunk size of `bytes` bytes.
    pub fn from_bytes(bytes: u64) -> Result<Self, InvalidChunkSize> {
        if !is_sector_aligned(bytes) {
            return Err(InvalidChunkSize {
                sectors: bytes >> SECTOR_SHIFT,
            });
        }
        Self::from_sectors(bytes >> SECTOR_SHIFT)
    }

    /// Size in sectors.
    pub fn sectors(self) -> u64 {
        1 << self.shift
    }

    /// Size in bytes.
    pub fn bytes(self) -> u64 {
        1 << (self.shift as u32 + SECTOR_SHIFT)
    }

    /// Size in bytes as a `usize`, for buffers. A chunk is at most 1 GiB.
    pub fn bytes_usize(self) -> usize {
        1usize << (self.shift as u32 + SECTOR_SHIFT)
    }

    fn byte_shift(self) -> u32 {
        self.shift as u32 + SECTOR_SHIFT
    }

    /// The chunk holding byte `offset`.
    pub fn chunk_of_byte(self, offset: u64) -> Chunk {
        Chunk(offset >> self.byte_shift())
    }

    /// The chunk holding sector `s`.
    pub fn chunk_of(self, s: Sector) -> Chunk {
        Chunk(s.0 >> self.shift)
    }

    /// The first sector of chunk `c`.
    pub fn first_sector(self, c: Chunk) -> Sector {
        Sector(c.0 << self.shift)
    }

    /// The byte offset of chunk `c`.
    pub fn byte_offset(self, c: Chunk) -> u64 {
        c.0 << self.byte_shift()
    }

    /// Chunks wholly inside `bytes` bytes (rounded down).
    pub fn whole_chunks(self, bytes: u64) -> u64 {
        bytes >> self.byte_shift()
    }

    /// Chunks needed to cover `bytes` bytes (rounded up).
    pub fn chunks_covering(self, bytes: u64) -> u64 {
        bytes.div_ceil(self.bytes())
    }

    /// The chunks touched by the byte range `offset..offset+len` (empty when `len` is 0).
    pub fn chunk_range(self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset >> self.byte_shift();
        let last = (offset + len - 1) >> self.byte_shift();
        first..last + 1
    }

    /// Cuts the byte range `offset..offset+len` at chunk boundaries.
    pub fn split(self, offset: u64, len: u64) -> ChunkSplit {
        ChunkSplit {
            chunk_size: self,
            next: offset,
            end: offset + len,
            start: offset,
        }
    }
}

impl fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bytes();
        if b >= 1 << 30 {
            write!(f, "{}G", b >> 30)
        } else if b >= 1 << 20 {
            write!(f, "{}M", b >> 20)
        } else {
            write!(f, "{}K", b >> 10)
        }
    }
}

/// One piece of a byte range that lies inside a single chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkPiece {
    /// The chunk.
    pub chunk: Chunk,
    /// Byte offset of the piece inside the chunk.
    pub offset_in_chunk: u64,
    /// Length of the piece in bytes.
    pub len: u64,
    /// Byte offset of the piece inside the caller's buffer (from the range start).
    pub buf_offset: u64,
}

impl ChunkPiece {
    /// True when the piece covers its whole chunk.
    pub fn is_whole(&self, cs: ChunkSize) -> bool {
        self.offset_in_chunk == 0 && self.len == cs.bytes()
    }

    /// The piece's range inside the caller's buffer, as `usize` indices.
    pub fn buf_range(&self) -> std::ops::Range<usize> {
        // Buffers are in memory, so their offsets fit a usize.
        self.buf_offset as usize..(self.buf_offset + self.len) as usize
    }
}

/// Iterator returned by [`ChunkSize::split`].
#[derive(Clone, Debug)]
pub struct ChunkSplit {
    chunk_size: ChunkSize,
    next: u64,
    end: u64,
    start: u64,
}

impl Iterator for ChunkSplit {
    type Item = ChunkPiece;

    fn next(&mut self) -> Option<ChunkPiece> {
        if self.next >= self.end {
            return None;
        }
        let cs = self.chunk_size;
        let chunk = cs.chunk_of_byte(self.next);
        let offset_in_chunk = self.next - cs.byte_offset(chunk);
        let len = (cs.bytes() - offset_in_chunk).min(self.end - self.next);
        let piece = ChunkPiece {
            chunk,
            offset_in_chunk,
            len,
            buf_offset: self.next - self.start,
        };
        self.next += len;
        Some(piece)
    }
}

/// Parses a size such as `4096`, `4K`, `16k`, `1M`, `2G` or `1T` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("not a size: {s:?} (examples: 4096, 64K, 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_accepts_kernel_range_only() {
        assert!(ChunkSize::from_sectors(4).is_err());
        assert!(ChunkSize::from_sectors(12).is_err());
        assert!(ChunkSize::from_sectors(1 << 22).is_err());
        assert_eq!(ChunkSize::from_sectors(8).unwrap().bytes(), 4096);
        assert_eq!(ChunkSize::from_sectors(1 << 21).unwrap().bytes(), 1 << 30);
        assert_eq!(ChunkSize::from_bytes(16384).unwrap().sectors(), 32);
        assert!(ChunkSize::from_bytes(4097).is_err());
    }

    #[test]
    fn split_cuts_at_chunk_boundaries() {
        let cs = ChunkSize::from_sectors(8).unwrap();
        let pieces: Vec<_> = cs.split(4096 - 512, 4096 + 1024).collect();
        assert_eq!(pieces.len(), 3);
        assert_eq!(
            pieces[0],
            ChunkPiece {
                chunk: Chunk(0),
                offset_in_chunk: 3584,
                len: 512,
                buf_offset: 0
            }
        );
        assert!(pieces[1].is_whole(cs));
        assert_eq!(pieces[2].len, 512);
        assert_eq!(pieces[2].buf_offset, 4608);
        assert_eq!(cs.chunk_range(4096 - 512, 4096 + 1024), 0..3);
        assert_eq!(cs.chunk_range(0, 0), 0..0);
    }

    #[test]
    fn conversions_round_trip() {
        let cs = ChunkSize::from_sectors(32).unwrap();
        assert_eq!(cs.chunk_of(Sector(95)), Chunk(2));
        assert_eq!(cs.first_sector(Chunk(3)), Sector(96));
        assert_eq!(cs.byte_offset(Chunk(3)), 96 * 512);
        assert_eq!(cs.chunks_covering(16385), 2);
        assert_eq!(cs.whole_chunks(16385), 1);
        assert_eq!(Sector::from_bytes(1024), Some(Sector(2)));
        assert_eq!(Sector::from_bytes(1000), None);
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
