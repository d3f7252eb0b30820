//! Buffers whose data starts on a 4 KiB boundary, as `O_DIRECT` I/O wants them.
//!
//! Safe code cannot ask the allocator for an alignment, so [`AlignedBuf`] allocates 4 KiB
//! more than it needs and uses the slice that starts on the boundary. A buffer can keep
//! room for a header just before its data (an NBD reply header in front of the data of a
//! READ), so the whole message goes to the socket in one write and the data still starts
//! aligned for the device.

use std::ops::{Deref, DerefMut};

/// The alignment of an [`AlignedBuf`]'s data.
pub const ALIGN: usize = 4096;

/// A byte buffer whose data part starts on an [`ALIGN`] boundary.
#[derive(Clone, Default)]
pub struct AlignedBuf {
    vec: Vec<u8>,
    /// Where the buffer (prefix included) starts in `vec`.
    start: usize,
    /// Prefix plus data length.
    len: usize,
    prefix: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AlignedBuf({} + {} bytes)",
            self.prefix,
            self.len - self.prefix
        )
    }
}

impl AlignedBuf {
    /// `len` zero bytes starting on an aligned address.
    pub fn zeroed(len: usize) -> Self {
        Self::with_prefix(0, len)
    }

    /// `prefix` bytes followed by `len` bytes of data that start on an aligned address;
    /// all zero.
    pub fn with_prefix(prefix: usize, len: usize) -> Self {
        let vec = vec![0u8; prefix + len + ALIGN];
        // The address of byte `prefix` of the vector, modulo ALIGN.
        let mis = (vec.as_ptr() as usize).wrapping_add(prefix) % ALIGN;
        let start = (ALIGN - mis) % ALIGN;
        AlignedBuf {
            vec,
            start,
            len: prefix + len,
            prefix,
        }
    }

    /// Wraps a vector as it is (no alignment promised): for small messages.
    pub fn from_vec(vec: Vec<u8>) -> Self {
        let len = vec.len();
        AlignedBuf {
            vec,
            start: 0,
            len,
            prefix: 0,
        }
    }

    /// The prefix (room for a header).
    pub fn prefix_mut(&mut self) -> &mut [u8] {
        let (s, p) = (self.start, self.prefix);
        &mut self.vec[s..s + p]
    }

    /// The data part, which starts aligned (unless made by [`from_vec`](Self::from_vec)).
    pub fn data_mut(&mut self) -> &mut [u8] {
        let (s, p, l) = (self.start, self.prefix, self.len);
        &mut self.vec[s + p..s + l]
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    /// Prefix and data together.
    fn deref(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let (s, l) = (self.start, self.len);
        &mut self.vec[s..s + l]
    }
}

/// True when `buf` starts on an address that is a multiple of `align`.
pub fn is_aligned(buf: &[u8], align: usize) -> bool {
    (buf.as_ptr() as usize) % align == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_starts_aligned_after_any_prefix() {
        for prefix in [0usize, 16, 28, 4095, 4096] {
            let mut b = AlignedBuf::with_prefix(prefix, 8192);
            assert_eq!(b.len(), prefix + 8192);
            assert!(is_aligned(b.data_mut(), ALIGN), "prefix {prefix}");
            b.prefix_mut().fill(1);
            b.data_mut().fill(2);
            assert!(b[..prefix].iter().all(|&x| x == 1));
            assert!(b[prefix..].iter().all(|&x| x == 2));
        }
        let v = AlignedBuf::from_vec(vec![7, 8, 9]);
        assert_eq!(&*v, &[7, 8, 9]);
    }
}
