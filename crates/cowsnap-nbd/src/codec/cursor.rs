//! A bounds-checked big-endian reader over a byte slice.
//!
//! Every decoder reads wire data through [`Cursor`], whose getters return
//! [`Truncated`] instead of panicking when the data runs out, so no wire input can make
//! a decoder index out of bounds.

/// The data ended before a field did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncated;

/// Reads big-endian integers and byte strings from a slice, front to back.
#[derive(Clone, Debug)]
pub struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { rest: data }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if n > self.rest.len() {
            return Err(Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let b = self.bytes(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// A big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, Truncated> {
        self.array().map(u16::from_be_bytes)
    }

    /// A big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, Truncated> {
        self.array().map(u32::from_be_bytes)
    }

    /// A big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, Truncated> {
        self.array().map(u64::from_be_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_big_endian_and_stops_at_the_end() {
        let data = [0x12, 0x34, 0, 0, 0, 1, 9];
        let mut c = Cursor::new(&data);
        assert_eq!(c.u16(), Ok(0x1234));
        assert_eq!(c.u32(), Ok(1));
        assert_eq!(c.remaining(), 1);
        assert_eq!(c.u16(), Err(Truncated));
        // A failed read consumes nothing.
        assert_eq!(c.bytes(1), Ok(&[9u8][..]));
        assert_eq!(c.u64(), Err(Truncated));
        assert_eq!(c.bytes(0), Ok(&[][..]));
    }
}
