//! The projector: consumes the touchpoints topic, appends to the append-only event log in sled,
//! drops duplicates, maintains the timeline and summary projections, and stores the consumer
//! positions in the same atomic write (invariant 6).

pub mod error;
pub mod garbage;
mod gate;
pub mod keys;
pub mod metrics;
pub mod ops;
pub mod projector;
pub mod sled_store;
pub mod table;
pub mod worker;

pub use error::{Error, Result};
pub use projector::{
    AppliedOffsets, Projector, ProjectorHandle, ProjectorOptions, UNFLUSHED_BATCHES,
};
pub use sled_store::{
    Checksum, DeadLetter, MAX_PAGE_BYTES, OpsError, ProjectedEntries, Projection,
    ProjectionVersions, Requeued, SledStore, VersionChecksum, VersionRole, WATCH_BUFFER,
};

/// The message of a caught panic (`panic!` with a literal or a formatted message).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|message| (*message).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
