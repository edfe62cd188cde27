//! Touchline's domain, free of I/O: the identifiers, the touchpoint and its validation, the
//! envelope that travels through Kafka, the projection folds, and the store trait that the
//! storage adapters implement.
//!
//! Everything here is plain data and pure functions so that the folds can be property-tested and
//! replayed anywhere; tonic, prost, rdkafka and sled live in the adapter crates.

pub mod envelope;
pub mod fold;
pub mod ids;
pub mod store;
pub mod time;
pub mod touchpoint;
pub mod validate;

pub use envelope::{Envelope, LogPosition, TimelineEntry, TimelineEntryView};
pub use fold::{CustomerSummary, TouchRef, apply_summary};
pub use ids::{CustomerId, EventId, EventType, IdError, PartnerId};
pub use store::{
    ApplyOutcome, ConsumedRecord, EventStore, NO_RECORD_FINGERPRINT, RecordContent, StoreError,
    StoredPosition, StreamIdentity, TimelineCursor, TimelineFilter, TimelinePage, TimelineQuery,
    fingerprint,
};
pub use time::UnixNanos;
pub use touchpoint::{Channel, JourneyStage, Outcome, Sentiment, Touchpoint, TouchpointView};
pub use validate::{
    Limits, RawTouchpoint, RejectReason, Rejection, reject_duplicates_in_batch,
    reject_duplicates_in_batch_by, validate, validate_batch,
};
