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
pub use projector::{AppliedOffsets, Projector, ProjectorHandle, ProjectorOptions};
pub use sled_store::{
    Checksum, DeadLetter, MAX_PAGE_BYTES, OpsError, ProjectedEntries, Projection,
    ProjectionVersions, Requeued, SledStore, VersionChecksum, VersionRole, WATCH_BUFFER,
};
