//! Targets: the devices the engine exposes, in device-mapper's terms.
//!
//! [`Origin`] is the live device whose writes copy data out to its snapshots;
//! [`Snapshot`] is a frozen view of it made of the origin plus a COW device. Both are
//! [`BlockDevice`](crate::dev::BlockDevice)s, so front ends serve them like any device.
//! `copy_out` is the origin write's plan, kept apart from its execution. [`Bbr`] (bad-block
//! relocation) is the exception layer's second user: a device that relocates chunks whose
//! writes fail to spares.

pub mod bbr;
mod copy_out;
mod merge;
mod origin;
mod snapshot;

pub use bbr::{Bbr, BbrStatus};
pub use merge::{merge_percent, Merge, MergeSettings, MergeState, MergeStatus};
pub use origin::Origin;
pub use snapshot::{Snapshot, SnapshotStatus};
