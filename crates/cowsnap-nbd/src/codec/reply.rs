//! Transmission replies: simple replies and structured reply chunks, encoded into byte
//! buffers, plus the matching decoders (used by tests and by clients of this crate).
//!
//! Encoders append to a caller's `Vec<u8>`. A READ reply is built with [`ReadReply`], which
//! lays out the header and leaves room for the data so the device can read straight into
//! the buffer that goes on the wire. Error messages in error chunks are cut to
//! [`MAX_ERROR_MESSAGE`] bytes (qemu refuses long non-data chunks).

use cowsnap_core::dev::AlignedBuf;

use super::consts::*;
use super::cursor::Cursor;

/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Longest error message put in an error chunk.
pub const MAX_ERROR_MESSAGE: usize = 200;

/// Appends a simple reply header.
pub fn simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured chunk header announcing `len` payload bytes.
pub fn chunk_header(out: &mut Vec<u8>, flags: u16, ty: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Appends the final `NBD_REPLY_TYPE_NONE` chunk.
pub fn none_chunk(out: &mut Vec<u8>, cookie: u64) {
    chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

fn short_message(msg: &str) -> &str {
    if msg.len() <= MAX_ERROR_MESSAGE {
        return msg;
    }
    let mut end = MAX_ERROR_MESSAGE;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    msg.get(..end).unwrap_or("")
}

/// The length of a message cut by [`short_message`], as the wire's u16.
#[allow(
    clippy::cast_possible_truncation,
    reason = "short_message cuts at MAX_ERROR_MESSAGE (200) bytes, which fits a u16"
)]
fn message_len(msg: &str) -> u16 {
    debug_assert!(msg.len() <= MAX_ERROR_MESSAGE);
    msg.len() as u16
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk; `error` must be nonzero.
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str, done: bool) {
    let msg = short_message(message);
    let msg_len = message_len(msg);
    chunk_header(
        out,
        done_flag(done),
        REPLY_TYPE_ERROR,
        cookie,
        6 + u32::from(msg_len),
    );
    out.extend_from_slice(&error.max(1).to_be_bytes());
    out.extend_from_slice(&msg_len.to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// Appends an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk.
pub fn error_offset_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    error: u32,
    message: &str,
    offset: u64,
    done: bool,
) {
    let msg = short_message(message);
    let msg_len = message_len(msg);
    chunk_header(
        out,
        done_flag(done),
        REPLY_TYPE_ERROR_OFFSET,
        cookie,
        14 + u32::from(msg_len),
    );
    out.extend_from_slice(&error.max(1).to_be_bytes());
    out.extend_from_slice(&msg_len.to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk (`len` must be nonzero).
pub fn offset_hole_chunk(out: &mut Vec<u8>, cookie: u64, offset: u64, len: u32, done: bool) {
    chunk_header(out, done_flag(done), REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk of `(length, flags)` descriptors.
pub fn block_status_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    context: u32,
    extents: &[(u32, u32)],
    done: bool,
) {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "callers pass at most MAX_EXTENTS (2^16) descriptors: 4 + 8 * 2^16 fits a u32"
    )]
    let len = 4 + 8 * extents.len() as u32;
    chunk_header(out, done_flag(done), REPLY_TYPE_BLOCK_STATUS, cookie, len);
    out.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

/// Appends a complete error reply: a simple reply, or with structured replies a final
/// error chunk (mandatory for READ, preferred for the rest).
pub fn error_reply(out: &mut Vec<u8>, structured: bool, cookie: u64, error: u32, message: &str) {
    if structured {
        error_chunk(out, cookie, error, message, true);
    } else {
        simple_reply(out, cookie, error);
    }
}

/// A READ reply under construction: header in front, room for the data after it. The
/// data starts on a 4 KiB boundary, so a device opened with `O_DIRECT` reads straight into
/// it and the whole reply still goes out in one write.
#[derive(Debug)]
pub struct ReadReply {
    buf: AlignedBuf,
}

impl ReadReply {
    /// A successful reply carrying `len` bytes read at `offset`: a simple reply, or one
    /// final `OFFSET_DATA` chunk (which also satisfies `NBD_CMD_FLAG_DF`). A zero-length
    /// structured read is answered with a `NONE` chunk.
    pub fn new(structured: bool, cookie: u64, offset: u64, len: u32) -> Self {
        let mut header = Vec::with_capacity(CHUNK_HEADER_LEN + 8);
        if !structured {
            simple_reply(&mut header, cookie, 0);
        } else if len == 0 {
            none_chunk(&mut header, cookie);
        } else {
            chunk_header(
                &mut header,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                cookie,
                8 + len,
            );
            header.extend_from_slice(&offset.to_be_bytes());
        }
        let data_len = if structured && len == 0 { 0 } else { len };
        let mut buf = AlignedBuf::with_prefix(header.len(), data_len as usize);
        buf.prefix_mut().copy_from_slice(&header);
        ReadReply { buf }
    }

    /// The data part, to be filled by the device.
    pub fn data_mut(&mut self) -> &mut [u8] {
        self.buf.data_mut()
    }

    /// The encoded reply.
    pub fn into_bytes(self) -> AlignedBuf {
        self.buf
    }
}

/// A decoded reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (a READ's data follows if `error` is zero).
    Simple {
        /// NBD error code.
        error: u32,
        /// Cookie of the request.
        cookie: u64,
    },
    /// A structured reply chunk; `length` payload bytes follow.
    Chunk {
        /// Chunk flags (`REPLY_FLAG_DONE`).
        flags: u16,
        /// Chunk type.
        ty: u16,
        /// Cookie of the request.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

/// A reply header that cannot be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Not enough bytes yet.
    #[error("reply header is truncated")]
    Truncated,
    /// Neither reply magic.
    #[error("bad reply magic {0:#010x}")]
    BadMagic(u32),
}

impl ReplyHeader {
    /// Decodes a reply header; returns it and its length on the wire (16 or 20).
    pub fn decode(buf: &[u8]) -> Result<(ReplyHeader, usize), ReplyError> {
        let mut c = Cursor::new(buf);
        let t = |_| ReplyError::Truncated;
        match c.u32().map_err(t)? {
            SIMPLE_REPLY_MAGIC => {
                let error = c.u32().map_err(t)?;
                let cookie = c.u64().map_err(t)?;
                Ok((ReplyHeader::Simple { error, cookie }, SIMPLE_REPLY_LEN))
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = c.u16().map_err(t)?;
                let ty = c.u16().map_err(t)?;
                let cookie = c.u64().map_err(t)?;
                let length = c.u32().map_err(t)?;
                Ok((
                    ReplyHeader::Chunk {
                        flags,
                        ty,
                        cookie,
                        length,
                    },
                    CHUNK_HEADER_LEN,
                ))
            }
            m => Err(ReplyError::BadMagic(m)),
        }
    }
}

/// A decoded error chunk payload (`ERROR` or `ERROR_OFFSET`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorPayload {
    /// NBD error code.
    pub error: u32,
    /// Message for humans.
    pub message: String,
    /// Offset, for `ERROR_OFFSET`.
    pub offset: Option<u64>,
}

/// Decodes the payload of an error chunk of type `ty`; `None` if malformed.
pub fn decode_error_payload(ty: u16, payload: &[u8]) -> Option<ErrorPayload> {
    let mut c = Cursor::new(payload);
    let error = c.u32().ok()?;
    let n = c.u16().ok()?;
    let message = String::from_utf8_lossy(c.bytes(usize::from(n)).ok()?).into_owned();
    let offset = match ty {
        REPLY_TYPE_ERROR => None,
        REPLY_TYPE_ERROR_OFFSET => Some(c.u64().ok()?),
        _ => return None,
    };
    (c.remaining() == 0 && error != 0).then_some(ErrorPayload {
        error,
        message,
        offset,
    })
}

/// Decodes a block status payload into its context id and `(length, flags)` descriptors.
pub fn decode_block_status(payload: &[u8]) -> Option<(u32, Vec<(u32, u32)>)> {
    if payload.len() < 12 || (payload.len() - 4) % 8 != 0 {
        return None;
    }
    let mut c = Cursor::new(payload);
    let id = c.u32().ok()?;
    let mut v = Vec::with_capacity((payload.len() - 4) / 8);
    while c.remaining() > 0 {
        v.push((c.u32().ok()?, c.u32().ok()?));
    }
    Some((id, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_reply_layout() {
        let mut v = Vec::new();
        simple_reply(&mut v, 0x0102_0304_0506_0708, EIO);
        assert_eq!(
            v,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(
            ReplyHeader::decode(&v),
            Ok((
                ReplyHeader::Simple {
                    error: EIO,
                    cookie: 0x0102_0304_0506_0708
                },
                16
            ))
        );
    }

    #[test]
    fn chunk_layouts() {
        let mut v = Vec::new();
        none_chunk(&mut v, 7);
        assert_eq!(v.len(), 20);
        assert_eq!(
            ReplyHeader::decode(&v),
            Ok((
                ReplyHeader::Chunk {
                    flags: REPLY_FLAG_DONE,
                    ty: REPLY_TYPE_NONE,
                    cookie: 7,
                    length: 0
                },
                20
            ))
        );

        let mut v = Vec::new();
        error_chunk(&mut v, 9, EINVAL, "bad", true);
        assert_eq!(v.len(), 20 + 6 + 3);
        let (h, n) = ReplyHeader::decode(&v).unwrap();
        assert_eq!(
            h,
            ReplyHeader::Chunk {
                flags: REPLY_FLAG_DONE,
                ty: REPLY_TYPE_ERROR,
                cookie: 9,
                length: 9
            }
        );
        assert_eq!(
            decode_error_payload(REPLY_TYPE_ERROR, &v[n..]),
            Some(ErrorPayload {
                error: EINVAL,
                message: "bad".into(),
                offset: None
            })
        );

        let mut v = Vec::new();
        error_offset_chunk(&mut v, 9, EIO, "", 4096, false);
        assert_eq!(v.len(), 20 + 14);
        assert_eq!(
            decode_error_payload(REPLY_TYPE_ERROR_OFFSET, &v[20..]),
            Some(ErrorPayload {
                error: EIO,
                message: String::new(),
                offset: Some(4096)
            })
        );

        let mut v = Vec::new();
        offset_hole_chunk(&mut v, 3, 512, 1024, true);
        assert_eq!(v.len(), 32);
        assert_eq!(&v[20..], &[0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 4, 0]);

        let mut v = Vec::new();
        block_status_chunk(
            &mut v,
            3,
            1,
            &[(4096, 0), (512, STATE_HOLE | STATE_ZERO)],
            true,
        );
        assert_eq!(v.len(), 20 + 4 + 16);
        assert_eq!(
            decode_block_status(&v[20..]),
            Some((1, vec![(4096, 0), (512, 3)]))
        );
    }

    #[test]
    fn error_messages_are_cut_at_a_char_boundary() {
        let long = "é".repeat(300);
        let mut v = Vec::new();
        error_chunk(&mut v, 1, EIO, &long, true);
        let p = decode_error_payload(REPLY_TYPE_ERROR, &v[20..]).unwrap();
        assert!(p.message.len() <= MAX_ERROR_MESSAGE);
        assert!(p.message.chars().all(|c| c == 'é'));
        // An error code of zero is never sent.
        let mut v = Vec::new();
        error_chunk(&mut v, 1, 0, "", true);
        assert_eq!(
            decode_error_payload(REPLY_TYPE_ERROR, &v[20..])
                .unwrap()
                .error,
            1
        );
    }

    #[test]
    fn read_replies() {
        let mut r = ReadReply::new(false, 5, 0, 4);
        r.data_mut().copy_from_slice(&[1, 2, 3, 4]);
        let b = r.into_bytes();
        assert_eq!(b.len(), 20);
        assert_eq!(&b[16..], &[1, 2, 3, 4]);

        let mut r = ReadReply::new(true, 5, 1024, 4);
        r.data_mut().copy_from_slice(&[1, 2, 3, 4]);
        let b = r.into_bytes();
        assert_eq!(
            ReplyHeader::decode(&b).unwrap().0,
            ReplyHeader::Chunk {
                flags: REPLY_FLAG_DONE,
                ty: REPLY_TYPE_OFFSET_DATA,
                cookie: 5,
                length: 12
            }
        );
        assert_eq!(&b[20..28], &1024u64.to_be_bytes());
        assert_eq!(&b[28..], &[1, 2, 3, 4]);

        let mut r = ReadReply::new(true, 5, 0, 0);
        assert!(r.data_mut().is_empty());
        let b = r.into_bytes();
        assert_eq!(
            ReplyHeader::decode(&b).unwrap().0,
            ReplyHeader::Chunk {
                flags: REPLY_FLAG_DONE,
                ty: REPLY_TYPE_NONE,
                cookie: 5,
                length: 0
            }
        );
    }

    #[test]
    fn error_reply_follows_negotiation() {
        let mut v = Vec::new();
        error_reply(&mut v, false, 1, ENOSPC, "full");
        assert_eq!(v.len(), 16);
        let mut v = Vec::new();
        error_reply(&mut v, true, 1, ENOSPC, "full");
        assert!(matches!(
            ReplyHeader::decode(&v).unwrap().0,
            ReplyHeader::Chunk {
                ty: REPLY_TYPE_ERROR,
                flags: REPLY_FLAG_DONE,
                ..
            }
        ));
    }

    #[test]
    fn decoders_reject_malformed_input() {
        assert_eq!(ReplyHeader::decode(&[]), Err(ReplyError::Truncated));
        assert_eq!(
            ReplyHeader::decode(&[0x67, 0x44, 0x66, 0x98, 0]),
            Err(ReplyError::Truncated)
        );
        assert_eq!(
            ReplyHeader::decode(&[0x66, 0x8e, 0x33, 0xef, 0, 1]),
            Err(ReplyError::Truncated)
        );
        assert_eq!(
            ReplyHeader::decode(&[1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(ReplyError::BadMagic(0x0102_0304))
        );
        assert_eq!(
            decode_error_payload(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'x']),
            None
        );
        assert_eq!(
            decode_error_payload(REPLY_TYPE_ERROR, &[0, 0, 0, 0, 0, 0]),
            None
        );
        assert_eq!(
            decode_error_payload(REPLY_TYPE_NONE, &[0, 0, 0, 5, 0, 0]),
            None
        );
        assert_eq!(
            decode_error_payload(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 0, 1]),
            None
        );
        assert_eq!(decode_block_status(&[0, 0, 0, 1]), None);
        assert_eq!(decode_block_status(&[0; 13]), None);
    }
}
