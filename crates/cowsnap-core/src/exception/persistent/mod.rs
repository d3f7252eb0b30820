//! The persistent exception store (`P` and `PO`): the Linux kernel's dm-snapshot COW
//! format, version 1, byte for byte.
//!
//! [`format`](mod@format) is the only code that interprets bytes; [`plan`] is a pure planner of
//! allocation and metadata writes; [`read`] walks the areas of a COW device;
//! [`validate`] holds the rules every entry must follow, for the loader and `cow check`;
//! [`PersistentStore`] is the [`ExceptionStore`](crate::exception::ExceptionStore) with
//! group commit in allocation order; [`inspect`] holds the `cow check`, `cow dump` and
//! `cow export` tools. `docs/format.md` is the normative description of the format and of
//! the crash safety of each commit step.

pub mod format;
pub mod inspect;
pub mod plan;
pub mod read;
mod store;
pub mod validate;

pub use store::{PersistentStore, StoreStats};
