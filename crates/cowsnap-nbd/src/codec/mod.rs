//! The NBD protocol as a sans-IO codec: bytes in, typed messages and encoded replies out.
//!
//! Nothing here touches a socket, a thread or a device. [`handshake`] is the option-haggling
//! state machine, [`request`] decodes and checks transmission requests, [`reply`] encodes
//! (and decodes) simple and structured replies, and [`consts`] holds the protocol's numbers.
//! Decoders read through [`cursor::Cursor`] and return errors on malformed input; none of
//! them panics on wire data.

pub mod consts;
pub mod cursor;
pub mod handshake;
pub mod reply;
pub mod request;

pub use handshake::{
    transmission_flags, BlockSizes, Catalog, ExportInfo, Handshake, HandshakeError, Negotiated,
    Status,
};
pub use reply::{ReadReply, ReplyHeader};
pub use request::{
    validate, Command, HeaderError, Limits, Rejection, RequestHeader, REQUEST_HEADER_LEN,
};
