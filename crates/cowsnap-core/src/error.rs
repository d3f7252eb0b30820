//! Errors of the core library, and the one place that maps them to errno values.
//!
//! Every fallible call in the core returns [`Error`]; callers that need to react match on
//! its variants. Front ends (NBD, FUSE, CLI) turn an error into a protocol code only
//! through [`Error::errno`], so an error means the same thing on every wire.
//!
//! `Error` is cheap to clone (the OS error is shared), so one failure can be handed to every
//! request that waited on the same pending exception, with its kind intact: a copy-out that
//! failed with `ENOSPC` on the COW's file system reaches each waiter as that I/O error.

use std::io;
use std::sync::Arc;

/// Shorthand for results of the core library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error of the core library.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A device I/O error.
    ///
    /// The OS error is part of the message and not a `source()`, so a report that prints
    /// the chain of causes shows it once.
    #[error("{}", io_message(op, *offset, device, cause))]
    Io {
        /// The operation (`read`, `write`, `flush`, ...).
        op: &'static str,
        /// Byte offset of the request.
        offset: u64,
        /// Which device.
        device: String,
        /// The underlying error, shared by the clones of this error.
        cause: Arc<io::Error>,
    },
    /// A request outside the device.
    #[error("request of {len} bytes at byte {offset} is outside the device of {size} bytes")]
    OutOfRange {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the device in bytes.
        size: u64,
    },
    /// A request not aligned to sectors.
    #[error("request of {len} bytes at byte {offset} is not aligned to 512-byte sectors")]
    Misaligned {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
    },
    /// Operation not supported by this device.
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    /// The snapshot is invalid (dropped): its reads and writes fail.
    #[error("snapshot is invalid: {0}")]
    Invalid(String),
    /// No free chunk on the COW device.
    #[error("COW device is full ({allocated} of {total} chunks in use)")]
    CowFull {
        /// Chunks in use.
        allocated: u64,
        /// Chunks on the device.
        total: u64,
    },
    /// The snapshot overflowed (store `PO`): writes fail, reads work.
    #[error("snapshot overflowed: COW device is full")]
    Overflow,
    /// Metadata on a device is corrupt or of an unknown format.
    #[error("{device}: corrupt metadata at byte {offset}: {reason}")]
    Corrupt {
        /// Which device or file.
        device: String,
        /// Byte offset of the bad data.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A bad argument (size, name, chunk size).
    #[error("{0}")]
    InvalidArgument(String),
    /// Another program or process holds the file, device or pool (a lock, a mount, an
    /// exclusive open).
    #[error("{0}")]
    InUse(String),
    /// A volume, file or pool of that name already exists.
    #[error("{0}")]
    Exists(String),
    /// One file would serve two volumes (a hard link, a symlink, a loop device over it).
    #[error("{0}")]
    SameFile(String),
    /// A file or header is no longer the one the pool or store checked (replaced or
    /// rewritten behind its back).
    #[error("{0}")]
    Replaced(String),
    /// The object is in the wrong state for the request (a snapshot not yet active, a
    /// store already loaded, a removal not finished).
    #[error("{0}")]
    WrongState(String),
}

impl Error {
    /// The errno a front end reports for this error (NBD and FUSE use the same values).
    ///
    /// An I/O error keeps the OS's errno (`ENOSPC` from a full file system stays
    /// `ENOSPC`); invalid and overflowed snapshots answer `EIO`, as the kernel's do.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { cause, .. } => cause.raw_os_error().filter(|&n| n > 0).unwrap_or(EIO),
            Error::Invalid(_) | Error::Overflow | Error::Corrupt { .. } => EIO,
            Error::OutOfRange { .. } | Error::CowFull { .. } => ENOSPC,
            Error::Misaligned { .. } | Error::InvalidArgument(_) => EINVAL,
            Error::Unsupported(_) => ENOTSUP,
            Error::InUse(_) | Error::SameFile(_) | Error::Replaced(_) | Error::WrongState(_) => {
                EBUSY
            }
            Error::Exists(_) => EEXIST,
        }
    }

    /// A short description that names no path or device, for peers that must not learn
    /// the server's file names (NBD error messages).
    pub fn summary(&self) -> &'static str {
        match self {
            Error::Io { .. } => "I/O error",
            Error::OutOfRange { .. } => "request outside the device",
            Error::Misaligned { .. } => "request not aligned to sectors",
            Error::Unsupported(_) => "operation not supported",
            Error::Invalid(_) => "snapshot is invalid",
            Error::CowFull { .. } => "COW device is full",
            Error::Overflow => "snapshot overflowed",
            Error::Corrupt { .. } => "corrupt metadata",
            Error::InvalidArgument(_) => "invalid argument",
            Error::InUse(_) => "in use",
            Error::Exists(_) => "already exists",
            Error::SameFile(_) => "file already serves another volume",
            Error::Replaced(_) => "file was replaced",
            Error::WrongState(_) => "not in a state to do that",
        }
    }

    /// An I/O error with its context.
    pub fn io(op: &'static str, offset: u64, device: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            op,
            offset,
            device: device.into(),
            cause: Arc::new(source),
        }
    }

    /// The OS error under an [`Error::Io`].
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Error::Io { cause, .. } => Some(cause),
            _ => None,
        }
    }
}

/// `read at byte 4096 on DEV: ...` for data I/O; `open DEV: ...` for operations on a whole
/// file, where a byte offset means nothing.
fn io_message(op: &str, offset: u64, device: &str, cause: &io::Error) -> String {
    match op {
        "read" | "write" | "flush" | "discard" | "write_zeroes" => {
            format!("{op} at byte {offset} on {device}: {cause}")
        }
        _ => format!("{op} {device}: {cause}"),
    }
}

/// errno: I/O error.
pub const EIO: i32 = 5;
/// errno: invalid argument.
pub const EINVAL: i32 = 22;
/// errno: no space left on device.
pub const ENOSPC: i32 = 28;
/// errno: operation not supported.
pub const ENOTSUP: i32 = 95;
/// errno: device or resource busy.
pub const EBUSY: i32 = 16;
/// errno: file exists.
pub const EEXIST: i32 = 17;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_matches_the_kernel_for_snapshot_states() {
        assert_eq!(Error::Invalid("x".into()).errno(), EIO);
        assert_eq!(Error::Overflow.errno(), EIO);
        assert_eq!(
            Error::Misaligned {
                offset: 1,
                len: 512
            }
            .errno(),
            EINVAL
        );
        assert_eq!(Error::Unsupported("discard").errno(), ENOTSUP);
    }

    #[test]
    fn an_io_error_keeps_its_errno_and_shows_the_os_error_once() {
        let e = Error::io(
            "write",
            4096,
            "cow.img",
            io::Error::from_raw_os_error(ENOSPC),
        );
        assert_eq!(e.clone().errno(), ENOSPC);
        let msg = e.to_string();
        assert!(msg.starts_with("write at byte 4096 on cow.img: "), "{msg}");
        assert_eq!(msg.matches("No space left").count(), 1, "{msg}");
        assert!(std::error::Error::source(&e).is_none());
        let other = Error::io("read", 0, "x", io::Error::other("no errno"));
        assert_eq!(other.errno(), EIO);
    }
}
