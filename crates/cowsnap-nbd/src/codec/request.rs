//! Transmission requests: decoding the 28-byte header and checking it against what the
//! connection negotiated.
//!
//! [`RequestHeader::decode`] only fails on a short buffer or a bad magic (after which the
//! stream cannot be resynchronised, so the session ends). [`validate`] turns a header into
//! a [`Command`] or a [`Rejection`] carrying the NBD error the specification asks for:
//! `EINVAL` for unknown commands or flags, misaligned requests, READs and WRITEs larger
//! than the maximum block size (which limits payloads only: TRIM, WRITE_ZEROES and CACHE
//! may cover up to 4 GiB - 1 and the server splits them), and reads,
//! trims, caches or block-status queries past the end; `ENOSPC` for writes and zero
//! writes past the end; `EPERM` for writes to a read-only export. A rejected `WRITE` still
//! has its payload on the wire: see [`RequestHeader::payload_len`].

use super::consts::*;
use super::cursor::Cursor;
use super::handshake::{BlockSizes, Negotiated};

/// Length of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;

/// A decoded request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

/// A request header that cannot be decoded: the session must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than 28 bytes.
    #[error("request header is truncated")]
    Truncated,
    /// The magic is not `NBD_REQUEST_MAGIC`.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

impl RequestHeader {
    /// Decodes a header from the first 28 bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self, HeaderError> {
        let mut c = Cursor::new(buf);
        let magic = c.u32().map_err(|_| HeaderError::Truncated)?;
        if magic != REQUEST_MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        let mut field = || -> Result<RequestHeader, super::cursor::Truncated> {
            Ok(RequestHeader {
                flags: c.u16()?,
                kind: c.u16()?,
                cookie: c.u64()?,
                offset: c.u64()?,
                length: c.u32()?,
            })
        };
        field().map_err(|_| HeaderError::Truncated)
    }

    /// Encodes the header (clients and tests use this).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        let mut v = Vec::with_capacity(REQUEST_HEADER_LEN);
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&self.flags.to_be_bytes());
        v.extend_from_slice(&self.kind.to_be_bytes());
        v.extend_from_slice(&self.cookie.to_be_bytes());
        v.extend_from_slice(&self.offset.to_be_bytes());
        v.extend_from_slice(&self.length.to_be_bytes());
        b.copy_from_slice(&v);
        b
    }

    /// Bytes of payload that follow this header on the wire (a `WRITE`'s data), whether
    /// or not the request is valid.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// A valid request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        length: u32,
    },
    /// Write the `length` payload bytes at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        length: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// End the session after the outstanding requests.
    Disconnect,
    /// Make acknowledged writes durable.
    Flush,
    /// Discard a range (a hint).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        length: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Prefetch a range (a hint).
    Cache {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        length: u32,
    },
    /// Make a range read as zeros.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        length: u32,
        /// Durable before the reply.
        fua: bool,
        /// Must stay allocated (no hole punched).
        no_hole: bool,
        /// Fail with `ENOTSUP` unless zeroing is fast.
        fast: bool,
    },
    /// Report allocation status of a range.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        length: u32,
        /// Exactly one extent wanted.
        req_one: bool,
        /// Context id of `base:allocation`.
        context: u32,
    },
}

/// What a connection negotiated that requests are checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Export size.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Context id of `base:allocation`, if selected.
    pub base_allocation: Option<u32>,
    /// Block size constraints.
    pub block_sizes: BlockSizes,
}

impl From<&Negotiated> for Limits {
    fn from(n: &Negotiated) -> Self {
        Limits {
            size: n.size,
            flags: n.flags,
            structured: n.structured,
            base_allocation: n.base_allocation,
            block_sizes: n.block_sizes,
        }
    }
}

/// A request refused with an NBD error; the session goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// NBD error code.
    pub errno: u32,
    /// Short reason, for structured error replies and logs.
    pub message: &'static str,
}

fn reject(errno: u32, message: &'static str) -> Rejection {
    Rejection { errno, message }
}

/// Checks a request against the negotiated limits.
pub fn validate(h: &RequestHeader, lim: &Limits) -> Result<Command, Rejection> {
    check_flags(h, lim)?;
    let (offset, length) = (h.offset, h.length);
    match h.kind {
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_FLUSH if offset == 0 && length == 0 => return Ok(Command::Flush),
        CMD_FLUSH => return Err(reject(EINVAL, "flush offset and length must be zero")),
        _ => {}
    }
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && lim.flags & FLAG_READ_ONLY != 0 {
        return Err(reject(EPERM, "export is read-only"));
    }
    let context = match (h.kind, lim.base_allocation) {
        (CMD_BLOCK_STATUS, None) => {
            return Err(reject(EINVAL, "no metadata context was negotiated"));
        }
        (_, id) => id.unwrap_or(0),
    };
    check_range(h, lim)?;
    command(h, context)
}

/// The command is known and carries only flags it may carry with what was negotiated.
fn check_flags(h: &RequestHeader, lim: &Limits) -> Result<(), Rejection> {
    let allowed = match h.kind {
        CMD_READ if lim.flags & FLAG_SEND_DF != 0 => CMD_FLAG_DF,
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
        CMD_WRITE_ZEROES if lim.flags & FLAG_SEND_FAST_ZERO != 0 => {
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
        }
        CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return Err(reject(EINVAL, "unknown command")),
    };
    // FUA is valid on every command (clients are known to set it on reads).
    if h.flags & !(allowed | CMD_FLAG_FUA) != 0 {
        return Err(reject(EINVAL, "unsupported command flags"));
    }
    Ok(())
}

/// The range is aligned to the minimum block size, a payload within the maximum, and the
/// whole range inside the export.
fn check_range(h: &RequestHeader, lim: &Limits) -> Result<(), Rejection> {
    let (offset, length) = (h.offset, h.length);
    let min = u64::from(lim.block_sizes.min.max(1));
    if offset % min != 0 || u64::from(length) % min != 0 {
        return Err(reject(
            EINVAL,
            "request is not aligned to the minimum block size",
        ));
    }
    // The maximum block size limits payloads (a WRITE's data, a READ's reply); TRIM,
    // WRITE_ZEROES and CACHE carry none and may cover up to the 32-bit length.
    let limited = matches!(h.kind, CMD_READ | CMD_WRITE);
    if limited && length > lim.block_sizes.max {
        return Err(reject(
            EINVAL,
            "request is larger than the maximum block size",
        ));
    }
    let end_ok = offset
        .checked_add(u64::from(length))
        .is_some_and(|end| end <= lim.size);
    if !end_ok {
        return Err(match h.kind {
            CMD_WRITE | CMD_WRITE_ZEROES => reject(ENOSPC, "write beyond the end of the export"),
            _ => reject(EINVAL, "request beyond the end of the export"),
        });
    }
    Ok(())
}

/// The command of a request that passed every check (`context`: the block status one).
fn command(h: &RequestHeader, context: u32) -> Result<Command, Rejection> {
    let (offset, length) = (h.offset, h.length);
    let fua = h.flags & CMD_FLAG_FUA != 0;
    Ok(match h.kind {
        CMD_READ => Command::Read { offset, length },
        CMD_WRITE => Command::Write {
            offset,
            length,
            fua,
        },
        CMD_TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        CMD_CACHE => Command::Cache { offset, length },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
            fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        _ if length == 0 => return Err(reject(EINVAL, "block status of an empty range")),
        _ => Command::BlockStatus {
            offset,
            length,
            req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            context,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits {
            size: 1 << 20,
            flags: FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_SEND_FAST_ZERO
                | FLAG_SEND_DF
                | FLAG_SEND_CACHE,
            structured: true,
            base_allocation: Some(1),
            block_sizes: BlockSizes {
                min: 512,
                preferred: 4096,
                max: 64 * 1024,
            },
        }
    }

    fn hdr(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 0xdead_beef_0000_0001,
            offset,
            length,
        }
    }

    fn errno(h: RequestHeader, l: &Limits) -> u32 {
        validate(&h, l).expect_err("should be rejected").errno
    }

    #[test]
    fn header_round_trips() {
        let h = hdr(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let b = h.encode();
        assert_eq!(&b[..4], &REQUEST_MAGIC.to_be_bytes());
        assert_eq!(RequestHeader::decode(&b), Ok(h));
        assert_eq!(h.payload_len(), 512);
        assert_eq!(hdr(CMD_READ, 0, 0, 512).payload_len(), 0);
    }

    #[test]
    fn header_rejects_bad_magic_and_truncation() {
        let mut b = hdr(CMD_READ, 0, 0, 512).encode();
        assert_eq!(RequestHeader::decode(&b[..27]), Err(HeaderError::Truncated));
        assert_eq!(RequestHeader::decode(&b[..2]), Err(HeaderError::Truncated));
        assert_eq!(RequestHeader::decode(&[]), Err(HeaderError::Truncated));
        b[0] = 0x99;
        assert!(matches!(
            RequestHeader::decode(&b),
            Err(HeaderError::BadMagic(0x9960_9513))
        ));
    }

    #[test]
    fn valid_commands_decode() {
        let l = lim();
        assert_eq!(
            validate(&hdr(CMD_READ, CMD_FLAG_DF, 512, 1024), &l),
            Ok(Command::Read {
                offset: 512,
                length: 1024
            })
        );
        assert_eq!(
            validate(&hdr(CMD_WRITE, CMD_FLAG_FUA, 0, 512), &l),
            Ok(Command::Write {
                offset: 0,
                length: 512,
                fua: true
            })
        );
        assert_eq!(
            validate(&hdr(CMD_DISC, 0, 0, 0), &l),
            Ok(Command::Disconnect)
        );
        assert_eq!(validate(&hdr(CMD_FLUSH, 0, 0, 0), &l), Ok(Command::Flush));
        assert_eq!(
            validate(&hdr(CMD_TRIM, 0, 0, 4096), &l),
            Ok(Command::Trim {
                offset: 0,
                length: 4096,
                fua: false
            })
        );
        assert_eq!(
            validate(&hdr(CMD_CACHE, 0, 0, 4096), &l),
            Ok(Command::Cache {
                offset: 0,
                length: 4096
            })
        );
        assert_eq!(
            validate(
                &hdr(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                    0,
                    1 << 20
                ),
                &l
            ),
            Ok(Command::WriteZeroes {
                offset: 0,
                length: 1 << 20,
                fua: false,
                no_hole: true,
                fast: true
            })
        );
        assert_eq!(
            validate(&hdr(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20), &l),
            Ok(Command::BlockStatus {
                offset: 0,
                length: 1 << 20,
                req_one: true,
                context: 1
            })
        );
        // Zero-length requests are served, except block status.
        assert!(validate(&hdr(CMD_READ, 0, 1 << 20, 0), &l).is_ok());
        assert_eq!(errno(hdr(CMD_BLOCK_STATUS, 0, 0, 0), &l), EINVAL);
    }

    #[test]
    fn unknown_commands_and_flags_are_einval() {
        let l = lim();
        assert_eq!(errno(hdr(8, 0, 0, 512), &l), EINVAL);
        assert_eq!(errno(hdr(0xffff, 0, 0, 512), &l), EINVAL);
        assert_eq!(errno(hdr(CMD_READ, 1 << 7, 0, 512), &l), EINVAL);
        assert_eq!(errno(hdr(CMD_READ, CMD_FLAG_REQ_ONE, 0, 512), &l), EINVAL);
        assert_eq!(errno(hdr(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512), &l), EINVAL);
        assert_eq!(
            errno(hdr(CMD_BLOCK_STATUS, CMD_FLAG_DF, 0, 512), &l),
            EINVAL
        );
        // DF needs structured replies (SEND_DF); FAST_ZERO needs SEND_FAST_ZERO.
        let mut simple = lim();
        simple.flags &= !(FLAG_SEND_DF | FLAG_SEND_FAST_ZERO);
        assert_eq!(errno(hdr(CMD_READ, CMD_FLAG_DF, 0, 512), &simple), EINVAL);
        assert_eq!(
            errno(hdr(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512), &simple),
            EINVAL
        );
        // FUA is accepted anywhere.
        assert!(validate(&hdr(CMD_READ, CMD_FLAG_FUA, 0, 512), &l).is_ok());
        assert_eq!(errno(hdr(CMD_FLUSH, 0, 512, 0), &l), EINVAL);
    }

    #[test]
    fn ranges_alignment_and_size_limits() {
        let l = lim();
        let end = 1u64 << 20;
        assert_eq!(errno(hdr(CMD_READ, 0, end, 512), &l), EINVAL);
        assert_eq!(errno(hdr(CMD_WRITE, 0, end - 512, 1024), &l), ENOSPC);
        assert_eq!(errno(hdr(CMD_WRITE_ZEROES, 0, end, 512), &l), ENOSPC);
        assert_eq!(errno(hdr(CMD_TRIM, 0, end, 512), &l), EINVAL);
        assert_eq!(errno(hdr(CMD_CACHE, 0, end, 512), &l), EINVAL);
        assert_eq!(errno(hdr(CMD_BLOCK_STATUS, 0, end, 512), &l), EINVAL);
        assert_eq!(errno(hdr(CMD_READ, 0, u64::MAX - 511, 512), &l), EINVAL);
        assert_eq!(errno(hdr(CMD_WRITE, 0, u64::MAX - 511, 512), &l), ENOSPC);
        assert_eq!(errno(hdr(CMD_READ, 0, 1, 512), &l), EINVAL);
        assert_eq!(errno(hdr(CMD_WRITE, 0, 0, 100), &l), EINVAL);
        // Beyond the maximum block size: only payloads are limited.
        assert_eq!(errno(hdr(CMD_READ, 0, 0, 128 * 1024), &l), EINVAL);
        assert_eq!(errno(hdr(CMD_WRITE, 0, 0, 128 * 1024), &l), EINVAL);
        // Not limited: trim, cache, zeroing (fast or not), block status.
        assert!(validate(&hdr(CMD_TRIM, 0, 0, 128 * 1024), &l).is_ok());
        assert!(validate(&hdr(CMD_CACHE, 0, 0, 128 * 1024), &l).is_ok());
        assert!(validate(&hdr(CMD_WRITE_ZEROES, 0, 0, 128 * 1024), &l).is_ok());
        assert!(validate(&hdr(CMD_BLOCK_STATUS, 0, 0, 128 * 1024), &l).is_ok());
        assert!(validate(
            &hdr(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 128 * 1024),
            &l
        )
        .is_ok());
        // Up to the 32-bit length limit, inside the export.
        let mut big = lim();
        big.size = 8 << 30;
        let max_len = u32::MAX / 512 * 512;
        for kind in [CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES] {
            assert!(validate(&hdr(kind, 0, 0, max_len), &big).is_ok(), "{kind}");
        }
        assert_eq!(errno(hdr(CMD_WRITE_ZEROES, 0, 0, max_len), &l), ENOSPC);
    }

    #[test]
    fn read_only_and_missing_context() {
        let mut l = lim();
        l.flags |= FLAG_READ_ONLY;
        assert_eq!(errno(hdr(CMD_WRITE, 0, 0, 512), &l), EPERM);
        assert_eq!(errno(hdr(CMD_TRIM, 0, 0, 512), &l), EPERM);
        assert_eq!(errno(hdr(CMD_WRITE_ZEROES, 0, 0, 512), &l), EPERM);
        assert!(validate(&hdr(CMD_READ, 0, 0, 512), &l).is_ok());
        assert!(validate(&hdr(CMD_FLUSH, 0, 0, 0), &l).is_ok());
        l.base_allocation = None;
        assert_eq!(errno(hdr(CMD_BLOCK_STATUS, 0, 0, 512), &l), EINVAL);
    }
}
