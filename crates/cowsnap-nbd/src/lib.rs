//! cowsnap-nbd: the NBD protocol for cowsnap, as a sans-IO codec and a threaded server.
//!
//! [`codec`] implements the fixed-newstyle handshake, request decoding and reply encoding
//! without any I/O. [`server`] serves [`Export`]s (block devices with a read-only flag,
//! multi-connection semantics and block status) over Unix and TCP sockets with std threads:
//! per connection a reader decoding requests, a bounded pool of workers doing the I/O, and
//! one writer serialising replies, so many requests are in flight and replies go out in
//! completion order. [`activation`] takes listening sockets from systemd socket activation.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod activation;
pub mod codec;
pub mod export;
pub mod server;

pub use export::{DeviceExport, Export, Extent};
pub use server::{Listener, Server, ServerConfig, ShutdownHandle};
