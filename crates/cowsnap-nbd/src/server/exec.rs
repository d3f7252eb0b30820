//! Command execution: carrying out one valid request on an [`Export`] and encoding its
//! reply.
//!
//! This is the one place where core errors become NBD error codes ([`nbd_errno`], through
//! [`cowsnap_core::Error::errno`]), and where the command semantics the device interface
//! does not spell out are decided: TRIM is a hint (a device that cannot discard still
//! succeeds), `NO_HOLE` zeroing writes zero buffers, `FAST_ZERO` zeroes through
//! [`Export::zero_fast`] and fails at once with `ENOTSUP` when that would be slow (always
//! with `NO_HOLE`), and block status extents are cut to what the protocol allows
//! ([`normalize_extents`]). TRIM and WRITE_ZEROES may cover up to 4 GiB; they reach the
//! device in pieces of at most [`SPLIT`] bytes, so that no layer below (an origin routing
//! its copy-outs, a snapshot writing its exceptions) holds state for the whole range.

use cowsnap_core::dev::{AlignedBuf, Fua};
use cowsnap_core::Error;

use crate::codec::consts::*;
use crate::codec::reply::{self, ReadReply};
use crate::codec::request::Command;
use crate::export::{Export, Extent};

/// Most descriptors sent in one block status chunk (the protocol allows 2^20; clients ask
/// again from where a reply ends).
pub const MAX_EXTENTS: usize = 1 << 16;

/// The NBD error code for a core error: its errno, narrowed to the values the protocol
/// defines (anything else becomes `EIO`; `ENOTSUP` is reserved for fast-zero failures,
/// so an unsupported operation is `EINVAL`).
pub fn nbd_errno(e: &Error) -> u32 {
    let errno = e.errno();
    match u32::try_from(errno).unwrap_or(EIO) {
        n @ (EPERM | EIO | ENOMEM | EINVAL | ENOSPC) => n,
        ENOTSUP => EINVAL,
        // EDQUOT and EFBIG, should a device pass them through.
        122 | 27 => ENOSPC,
        _ => EIO,
    }
}

fn message(e: &Error) -> String {
    // The kind only: full messages may name server-side paths.
    e.summary().to_string()
}

/// The outcome of one request: its complete encoded reply.
#[derive(Debug)]
pub struct Executed {
    /// The encoded reply.
    pub bytes: AlignedBuf,
    /// NBD error sent (0 on success), for statistics.
    pub error: u32,
}

fn status(structured: bool, cookie: u64, r: Result<(), (u32, String)>) -> Executed {
    let mut bytes = Vec::with_capacity(32);
    match r {
        Ok(()) => {
            reply::simple_reply(&mut bytes, cookie, 0);
            Executed {
                bytes: AlignedBuf::from_vec(bytes),
                error: 0,
            }
        }
        Err((error, msg)) => {
            reply::error_reply(&mut bytes, structured, cookie, error, &msg);
            Executed {
                bytes: AlignedBuf::from_vec(bytes),
                error,
            }
        }
    }
}

fn core(r: cowsnap_core::Result<()>) -> Result<(), (u32, String)> {
    r.map_err(|e| (nbd_errno(&e), message(&e)))
}

/// The most a TRIM or WRITE_ZEROES passes to the device at once (the default maximum
/// block size, the size of the largest WRITE).
pub const SPLIT: u64 = 32 << 20;

/// Calls `f` on consecutive pieces of `offset..offset+len` of at most [`SPLIT`] bytes.
fn split(
    offset: u64,
    len: u64,
    mut f: impl FnMut(u64, u64) -> cowsnap_core::Result<()>,
) -> cowsnap_core::Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(SPLIT);
        f(offset + done, n)?;
        done += n;
    }
    Ok(())
}

/// Executes `cmd` (already validated) and encodes the reply. `payload` is a WRITE's data.
pub fn execute(
    export: &dyn Export,
    structured: bool,
    min_block: u32,
    cookie: u64,
    cmd: Command,
    payload: &[u8],
) -> Executed {
    let done = |r| status(structured, cookie, r);
    match cmd {
        Command::Read { offset, length } => {
            let mut r = ReadReply::new(structured, cookie, offset, length);
            match export.read_at(r.data_mut(), offset) {
                Ok(()) => Executed {
                    bytes: r.into_bytes(),
                    error: 0,
                },
                Err(e) => done(core(Err(e))),
            }
        }
        Command::Write { offset, fua, .. } => {
            done(core(export.write_at(payload, offset, Fua::from(fua))))
        }
        Command::Flush => done(core(export.flush())),
        Command::Trim {
            offset,
            length,
            fua,
        } => done(core(trim(export, offset, u64::from(length), fua))),
        Command::Cache { .. } => done(Ok(())),
        Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast,
        } => done(write_zeroes(
            export,
            offset,
            u64::from(length),
            fua,
            no_hole,
            fast,
        )),
        Command::BlockStatus {
            offset,
            length,
            req_one,
            context,
        } => {
            let ext = export.block_status(offset, u64::from(length));
            let desc = normalize_extents(&ext, length, min_block, req_one);
            let mut bytes = Vec::with_capacity(24 + 8 * desc.len());
            reply::block_status_chunk(&mut bytes, cookie, context, &desc, true);
            Executed {
                bytes: AlignedBuf::from_vec(bytes),
                error: 0,
            }
        }
        // Never executed: the reader stops at a disconnect.
        Command::Disconnect => done(Ok(())),
    }
}

/// Flushes after a TRIM or WRITE_ZEROES that asked for FUA.
fn flush_if(export: &dyn Export, fua: bool) -> cowsnap_core::Result<()> {
    if fua {
        export.flush()
    } else {
        Ok(())
    }
}

/// TRIM, in pieces; a hint, so a device that cannot discard ignores it.
fn trim(export: &dyn Export, offset: u64, len: u64, fua: bool) -> cowsnap_core::Result<()> {
    split(offset, len, |o, n| match export.discard(o, n) {
        Err(Error::Unsupported(_)) => Ok(()),
        r => r,
    })?;
    flush_if(export, fua)
}

/// WRITE_ZEROES, in pieces: a punched hole unless `no_hole`; with `fast`, only if every
/// piece can be zeroed by metadata alone, else `ENOTSUP` and the client zeroes the range
/// its own way (the pieces before may already be zeros).
fn write_zeroes(
    export: &dyn Export,
    offset: u64,
    len: u64,
    fua: bool,
    no_hole: bool,
    fast: bool,
) -> Result<(), (u32, String)> {
    let slow = || Err((ENOTSUP, "zeroing this range would not be fast".to_string()));
    if fast && (no_hole || !export.can_fast_zero()) {
        return slow();
    }
    let r = if fast {
        let mut all_fast = true;
        let r = split(offset, len, |o, n| {
            if all_fast {
                all_fast = export.zero_fast(o, n, Fua::No)?;
            }
            Ok(())
        });
        if r.is_ok() && !all_fast {
            return slow();
        }
        r
    } else if no_hole {
        split(offset, len, |o, n| {
            cowsnap_core::dev::write_zeroes_by_writing(export, o, n, Fua::No)
        })
    } else {
        split(offset, len, |o, n| export.write_zeroes(o, n, Fua::No))
    };
    core(r.and_then(|()| flush_if(export, fua)))
}

/// Turns an export's extents into protocol descriptors for a query of `len` bytes: drops
/// empty extents, merges equal neighbours, never goes past `len`, keeps every boundary a
/// multiple of `min` (stopping early at an unaligned boundary, which the protocol allows,
/// and reporting a lone unaligned first block as data), keeps only the first descriptor
/// for `REQ_ONE`, caps the count at [`MAX_EXTENTS`], and always returns at least one
/// descriptor.
#[allow(
    clippy::cast_possible_truncation,
    reason = "every descriptor length is at most `len`, which came from a u32"
)]
pub fn normalize_extents(ext: &[Extent], len: u32, min: u32, req_one: bool) -> Vec<(u32, u32)> {
    let len = u64::from(len);
    let min = u64::from(min.max(1));
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = 0u64;
    for e in ext {
        if pos >= len || out.len() >= MAX_EXTENTS {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let end = pos.saturating_add(e.length).min(len);
        let aligned = end / min * min;
        if aligned > pos {
            let n = (aligned - pos) as u32;
            match out.last_mut() {
                Some(last) if last.1 == e.flags => last.0 += n,
                _ => out.push((n, e.flags)),
            }
        }
        if aligned < end {
            break;
        }
        pos = end;
    }
    if out.is_empty() {
        // Nothing usable: one block (or the whole query if shorter) of plain data.
        out.push((min.min(len).max(1) as u32, 0));
    }
    if req_one {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
mod tests {
    use super::*;
    use cowsnap_core::dev::{BlockDevice, MemDevice};

    #[test]
    fn errors_map_to_protocol_values() {
        let out_of_range = Error::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(nbd_errno(&out_of_range), ENOSPC);
        assert_eq!(nbd_errno(&Error::Misaligned { offset: 1, len: 1 }), EINVAL);
        assert_eq!(nbd_errno(&Error::Unsupported("x")), EINVAL);
        assert_eq!(nbd_errno(&Error::Overflow), EIO);
        assert_eq!(nbd_errno(&Error::Exists("x".into())), EIO);
        assert_eq!(
            nbd_errno(&Error::CowFull {
                allocated: 1,
                total: 1
            }),
            ENOSPC
        );
    }

    #[test]
    fn extents_are_normalized() {
        let d = Extent::data;
        let z = Extent::zero;
        let h = Extent::hole;
        // Merge, drop empty, clip to the query.
        assert_eq!(
            normalize_extents(&[d(512), d(0), d(512), z(4096)], 2048, 512, false),
            vec![(1024, 0), (1024, 2)]
        );
        // An unaligned boundary ends the reply early.
        assert_eq!(
            normalize_extents(&[h(1024), d(100), d(3000)], 4096, 512, false),
            vec![(1024, 3)]
        );
        // ...and a lone unaligned first extent becomes one block of data.
        assert_eq!(
            normalize_extents(&[h(100), d(4000)], 4096, 512, false),
            vec![(512, 0)]
        );
        // Nothing at all: data.
        assert_eq!(normalize_extents(&[], 4096, 512, false), vec![(512, 0)]);
        assert_eq!(normalize_extents(&[], 100, 1, false), vec![(1, 0)]);
        // REQ_ONE keeps one descriptor no longer than the query.
        assert_eq!(
            normalize_extents(&[z(1 << 30)], 8192, 512, true),
            vec![(8192, 2)]
        );
        assert_eq!(
            normalize_extents(&[d(512), z(512)], 8192, 512, true),
            vec![(512, 0)]
        );
    }

    #[test]
    fn many_extents_are_capped() {
        let ext: Vec<Extent> = (0..(MAX_EXTENTS + 10))
            .map(|i| {
                if i % 2 == 0 {
                    Extent::data(512)
                } else {
                    Extent::zero(512)
                }
            })
            .collect();
        let out = normalize_extents(&ext, u32::MAX / 512 * 512, 512, false);
        assert_eq!(out.len(), MAX_EXTENTS);
    }

    fn exec(e: &dyn Export, cmd: Command, payload: &[u8]) -> Executed {
        execute(e, true, 512, 42, cmd, payload)
    }

    #[test]
    fn commands_execute_against_a_device() {
        let e = crate::export::DeviceExport::memory(MemDevice::new(1 << 20));
        let w = exec(
            &e,
            Command::Write {
                offset: 4096,
                length: 512,
                fua: true,
            },
            &[9u8; 512],
        );
        assert_eq!(w.error, 0);
        assert_eq!(w.bytes.len(), 16);
        let r = exec(
            &e,
            Command::Read {
                offset: 4096,
                length: 512,
            },
            &[],
        );
        assert_eq!(r.bytes.len(), 20 + 8 + 512);
        assert!(r.bytes[28..].iter().all(|&b| b == 9));
        let z = exec(
            &e,
            Command::WriteZeroes {
                offset: 4096,
                length: 512,
                fua: false,
                no_hole: true,
                fast: false,
            },
            &[],
        );
        assert_eq!(z.error, 0);
        let mut back = [1u8; 512];
        e.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, [0u8; 512]);
        // Fast zero with NO_HOLE is never fast.
        let f = exec(
            &e,
            Command::WriteZeroes {
                offset: 0,
                length: 512,
                fua: false,
                no_hole: true,
                fast: true,
            },
            &[],
        );
        assert_eq!(f.error, ENOTSUP);
        let bs = exec(
            &e,
            Command::BlockStatus {
                offset: 0,
                length: 1 << 20,
                req_one: false,
                context: 1,
            },
            &[],
        );
        let (id, desc) = reply::decode_block_status(&bs.bytes[20..]).unwrap();
        assert_eq!((id, desc), (1, vec![(1 << 20, STATE_ZERO)]));
        assert_eq!(
            exec(
                &e,
                Command::Trim {
                    offset: 0,
                    length: 4096,
                    fua: true
                },
                &[]
            )
            .error,
            0
        );
        assert_eq!(exec(&e, Command::Flush, &[]).error, 0);
        assert_eq!(
            exec(
                &e,
                Command::Cache {
                    offset: 0,
                    length: 4096
                },
                &[]
            )
            .error,
            0
        );
    }

    #[test]
    fn zeroing_and_trimming_longer_than_a_split() {
        let size = 3 * SPLIT + (1 << 20);
        let e = crate::export::DeviceExport::memory(MemDevice::new(size));
        let len = (2 * SPLIT + (1 << 20)) as u32;
        for no_hole in [false, true] {
            e.write_at(&[5u8; 4096], SPLIT, Fua::No).unwrap();
            e.write_at(&[5u8; 4096], 2 * SPLIT + 4096, Fua::No).unwrap();
            let z = exec(
                &e,
                Command::WriteZeroes {
                    offset: 4096,
                    length: len,
                    fua: true,
                    no_hole,
                    fast: false,
                },
                &[],
            );
            assert_eq!(z.error, 0);
            let mut b = [1u8; 4096];
            e.read_at(&mut b, SPLIT).unwrap();
            assert_eq!(b, [0u8; 4096]);
            e.read_at(&mut b, 2 * SPLIT + 4096).unwrap();
            assert_eq!(b, [0u8; 4096]);
        }
        // Fast zeroing of a memory device is fast at any length.
        e.write_at(&[5u8; 4096], 2 * SPLIT, Fua::No).unwrap();
        let f = exec(
            &e,
            Command::WriteZeroes {
                offset: 0,
                length: len,
                fua: false,
                no_hole: false,
                fast: true,
            },
            &[],
        );
        assert_eq!(f.error, 0);
        let mut b = [1u8; 4096];
        e.read_at(&mut b, 2 * SPLIT).unwrap();
        assert_eq!(b, [0u8; 4096]);
        let t = exec(
            &e,
            Command::Trim {
                offset: 0,
                length: len,
                fua: true,
            },
            &[],
        );
        assert_eq!(t.error, 0);
        // A plain device is never fast: ENOTSUP, nothing changed.
        let plain = crate::export::DeviceExport::new(std::sync::Arc::new(MemDevice::new(size)));
        plain.write_at(&[5u8; 4096], 0, Fua::No).unwrap();
        let f = exec(
            &plain,
            Command::WriteZeroes {
                offset: 0,
                length: len,
                fua: false,
                no_hole: false,
                fast: true,
            },
            &[],
        );
        assert_eq!(f.error, ENOTSUP);
        plain.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [5u8; 4096]);
    }

    #[test]
    fn device_errors_become_error_replies() {
        let e = crate::export::DeviceExport::new(std::sync::Arc::new(MemDevice::new(4096)))
            .read_only(true);
        let w = execute(
            &e,
            false,
            512,
            7,
            Command::Write {
                offset: 0,
                length: 512,
                fua: false,
            },
            &[0u8; 512],
        );
        assert_eq!(w.error, EINVAL);
        assert_eq!(w.bytes.len(), 16);
        // A read error under structured replies is an error chunk, never a simple reply.
        let r = exec(
            &e,
            Command::Read {
                offset: 8192,
                length: 512,
            },
            &[],
        );
        assert_eq!(r.error, ENOSPC);
        assert!(matches!(
            reply::ReplyHeader::decode(&r.bytes).unwrap().0,
            reply::ReplyHeader::Chunk {
                ty: REPLY_TYPE_ERROR,
                ..
            }
        ));
    }
}
