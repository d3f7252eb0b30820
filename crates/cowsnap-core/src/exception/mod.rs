//! The generic exception layer: it knows chunks, exceptions and stores, nothing of snapshots.
//!
//! An *exception* says that chunk `old` of one device now lives at chunk `new` of another.
//! The layer has four parts, each reusable by any target that remaps chunks:
//! * [`ExceptionTable`]: completed exceptions, coalesced into runs, ordered lookups;
//! * [`ExceptionTracker`]: the table plus pending exceptions (chunks being copied, with
//!   the requests waiting on them) and tracked reads of not-yet-remapped chunks;
//! * [`ExceptionStore`]: where exceptions are kept (in memory: [`TransientStore`]; in the
//!   kernel's on-disk format: the persistent store), with the commit contract;
//! * the copier (`crate::copy`), which moves chunk data with bounded memory.
//!
//! The snapshot target adds the policy "copy the origin chunk before it changes". A
//! bad-block relocation target would add "on a failed write, allocate a spare chunk, write
//! the data there and commit `bad -> spare`": it reuses the table, the tracker (a write that
//! finds the chunk pending waits; reads are routed by the same call), a store (the
//! persistent format holds `{old, new}` pairs unchanged) and the copier, and supplies only
//! that policy. See ARCHITECTURE.md, "Reusing the exception layer".

pub mod index;
pub mod persistent;
pub(crate) mod store;
mod table;
mod tracker;
mod transient;

pub use index::{ExceptionIndex, IndexConfig};
pub use persistent::PersistentStore;
pub use store::{ExceptionStore, LoadOutcome, Resume, StoreKind, Usage};
pub use table::{AlreadyMapped, Exception, ExceptionTable};
pub use tracker::{
    ExceptionTracker, IoRoute, OwnedPending, PendingException, ReadRoute, TrackedRead, WriteRoute,
};
pub use transient::TransientStore;
