//! cowsnap-nbd: the NBD protocol for cowsnap, as a sans-IO codec and a threaded server.
//!
//! [`codec`] implements the fixed-newstyle handshake, request decoding and reply encoding
//! without any I/O. [`server`] serves [`Export`]s (block devices with a read-only flag,
//! multi-connection semantics and block status) over Unix and TCP sockets with std threads:
//! per connection up to [`ServerConfig::workers`] threads (started as requests arrive)
//! taking turns as the connection's request reader, which reads one request, passes the
//! socket's read side on, executes the request and writes its reply, so many requests are
//! in flight and replies go out in completion order. [`activation`]
//! takes listening sockets from systemd socket activation.
//!
//! ```no_run
//! use std::sync::Arc;
//! use cowsnap_core::dev::MemDevice;
//! use cowsnap_nbd::{DeviceExport, Server, ServerConfig};
//!
//! let server = Server::new(ServerConfig::default());
//! let disk = DeviceExport::memory(MemDevice::new(64 << 20)).description("scratch disk");
//! server.add_export("disk", Arc::new(disk))?;
//! server.listen_unix("/tmp/nbd.sock")?; // nbd+unix:///disk?socket=/tmp/nbd.sock
//! // ... until asked to stop (a signal thread can hold `server.shutdown_handle()`):
//! server.shutdown()?; // stop accepting, drain in-flight requests, flush exports
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod activation;
pub mod codec;
pub mod export;
#[cfg(any(test, feature = "test-util"))]
pub mod fuzzing;
pub mod server;

pub use export::{DeviceExport, Export, Extent};
pub use server::tls::TlsConfig;
pub use server::{Listener, Server, ServerConfig, ShutdownHandle};
