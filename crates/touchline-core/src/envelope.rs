//! What travels through Kafka and what the log holds: the envelope (partner + touchpoint) and,
//! once projected, its position.

use serde::{Deserialize, Serialize};

use crate::touchpoint::TouchpointView;
use crate::{PartnerId, Touchpoint, UnixNanos};

/// A touchpoint with the partner that the credential authenticated, as produced to Kafka.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub partner_id: PartnerId,
    pub touchpoint: Touchpoint,
    pub received_at: UnixNanos,
}

/// Where an event sits: the Kafka partition and offset it was consumed from, and its sequence in
/// the local append-only log (dense, starting at 1, assigned in consumption order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LogPosition {
    pub partition: i32,
    pub offset: i64,
    pub sequence: u64,
}

/// One event of a customer's timeline: the envelope and where it sits in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub partner_id: PartnerId,
    pub touchpoint: Touchpoint,
    pub received_at: UnixNanos,
    pub position: LogPosition,
}

/// A stored [`TimelineEntry`] read without copying its strings (see
/// [`TouchpointView`]): what `GetTimeline` re-encodes for the wire, with no entry allocated on
/// the way.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TimelineEntryView<'a> {
    pub partner_id: &'a str,
    #[serde(borrow)]
    pub touchpoint: TouchpointView<'a>,
    pub received_at: UnixNanos,
    pub position: LogPosition,
}

impl TimelineEntry {
    /// This entry as a view of its fields.
    #[must_use]
    pub fn view(&self) -> TimelineEntryView<'_> {
        // Every field named, as in `Touchpoint::view`.
        let Self {
            partner_id,
            touchpoint,
            received_at,
            position,
        } = self;
        TimelineEntryView {
            partner_id: partner_id.as_str(),
            touchpoint: touchpoint.view(),
            received_at: *received_at,
            position: *position,
        }
    }

    #[must_use]
    pub fn new(envelope: Envelope, position: LogPosition) -> Self {
        Self {
            partner_id: envelope.partner_id,
            touchpoint: envelope.touchpoint,
            received_at: envelope.received_at,
            position,
        }
    }

    /// The timeline order (invariant 7): event time, then log position.
    #[must_use]
    pub fn timeline_order(&self) -> (UnixNanos, u64) {
        (self.touchpoint.occurred_at, self.position.sequence)
    }

    /// An order that does not depend on delivery: event time, then the event's identity. Used by
    /// the summary fold so that it is the same whatever order events arrive in.
    #[must_use]
    pub fn identity_order(&self) -> (UnixNanos, &str, &str) {
        (
            self.touchpoint.occurred_at,
            self.partner_id.as_str(),
            self.touchpoint.event_id.as_str(),
        )
    }
}
