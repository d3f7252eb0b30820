//! cowsnap-core: copy-on-write snapshots of block devices, the device-mapper snapshot
//! design rebuilt in userspace.
//!
//! Vocabulary (defined in full in ARCHITECTURE.md): an *origin* is the live device; a
//! *snapshot* is its content frozen at activation, made of the origin plus a *COW device*;
//! both are cut into *chunks*. Before an origin chunk first changes, its old data is copied
//! to the COW device and an *exception* (`origin chunk -> COW chunk`) is *committed* to the
//! snapshot's *store*. While the copy runs the exception is *pending*. A snapshot whose COW
//! fills up or fails becomes *invalid*.
//!
//! Layers, bottom up: [`units`] and [`dev`] (block devices), the generic [`exception`]
//! layer and the [`copy`] engine (which know nothing of snapshots), and the [`targets`]
//! (origin and snapshot policy). [`layers`] stacks device-mapper-like targets (linear,
//! error, zero, flakey, dust, delay) over any device, for pools that simulate failing or
//! slow disks. The library knows nothing of NBD, FUSE or the CLI, nor of
//! pools: naming volumes and keeping their table is `cowsnap-pool`'s.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod copy;
pub mod dev;
pub mod error;
pub mod exception;
pub mod layers;
#[doc(hidden)]
pub mod mutation;
pub mod targets;
#[cfg(any(test, feature = "test-util"))]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test-only code: sizes and offsets of in-memory test devices and corpora are small"
)]
pub mod testkit;
pub mod units;

pub use error::{Error, Result};
