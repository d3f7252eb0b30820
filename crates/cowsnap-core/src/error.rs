//! Errors of the core library, and the one place that maps them to errno values.
//!
//! Every fallible call in the core returns [`Error`]. Callers that need to react match on
//! [`Error::kind`]; front ends (NBD, FUSE, CLI) turn an error into a protocol code only
//! through [`Error::errno`], so an error means the same thing on every wire.

use std::io;

/// Shorthand for results of the core library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarsely: the part of an error callers match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An I/O error from a device (or injected by a test device).
    Io,
    /// A request outside the device.
    OutOfRange,
    /// A request not aligned to 512-byte sectors.
    Misaligned,
    /// The device or target does not support the operation.
    Unsupported,
    /// The snapshot is invalid (dropped): its reads and writes fail.
    Invalid,
    /// The COW device has no free chunk left.
    CowFull,
    /// The snapshot overflowed (store `PO`): writes fail, reads work.
    Overflow,
    /// Metadata on a device is corrupt or of an unknown format.
    Corrupt,
    /// A caller passed a bad argument (size, name, chunk size).
    InvalidArgument,
    /// The object is busy or in the wrong state for the request.
    Busy,
}

/// An error of the core library.
#[derive(Debug, thiserror::Error)]
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
        /// The underlying error.
        cause: io::Error,
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
    /// The snapshot is invalid.
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
    /// The snapshot overflowed.
    #[error("snapshot overflowed: COW device is full")]
    Overflow,
    /// Corrupt or unknown metadata.
    #[error("{device}: corrupt metadata at byte {offset}: {reason}")]
    Corrupt {
        /// Which device or file.
        device: String,
        /// Byte offset of the bad data.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A bad argument.
    #[error("{0}")]
    InvalidArgument(String),
    /// Busy or wrong state.
    #[error("{0}")]
    Busy(String),
}

impl Error {
    /// The coarse kind of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::Misaligned { .. } => ErrorKind::Misaligned,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::CowFull { .. } => ErrorKind::CowFull,
            Error::Overflow => ErrorKind::Overflow,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Busy(_) => ErrorKind::Busy,
        }
    }

    /// The errno a front end reports for this error (NBD and FUSE use the same values).
    ///
    /// Invalid and overflowed snapshots answer `EIO`, as the kernel's do.
    pub fn errno(&self) -> i32 {
        match self.kind() {
            ErrorKind::Io | ErrorKind::Invalid | ErrorKind::Overflow | ErrorKind::Corrupt => EIO,
            ErrorKind::OutOfRange => ENOSPC,
            ErrorKind::Misaligned | ErrorKind::InvalidArgument => EINVAL,
            ErrorKind::Unsupported => ENOTSUP,
            ErrorKind::CowFull => ENOSPC,
            ErrorKind::Busy => EBUSY,
        }
    }

    /// An I/O error with its context.
    pub fn io(op: &'static str, offset: u64, device: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            op,
            offset,
            device: device.into(),
            cause: source,
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
        assert_eq!(Error::Unsupported("discard").kind(), ErrorKind::Unsupported);
    }
}
