//! Shared by the store tests.

#![allow(dead_code, reason = "each test file uses its share")]

use std::collections::BTreeMap;

use touchline_core::{
    Channel, ConsumedRecord, CustomerId, Envelope, EventId, EventType, JourneyStage, Outcome,
    PartnerId, RecordContent, Sentiment, StreamIdentity, Touchpoint, UnixNanos,
};
use touchline_projection::sled_store::Switched;
use touchline_projection::{Projection, SledStore};

/// Opens the store in `path`, waiting for an instance dropped just before to let go of it: sled
/// releases its file lock from a background thread, which can lag on a loaded machine.
///
/// # Panics
/// When the store does not open within 30 s.
#[must_use]
pub fn open_when_released(path: &std::path::Path) -> SledStore {
    when_released(|| SledStore::open(path))
}

/// Calls `open` until it succeeds: sled releases its file lock from a background thread, which
/// can lag on a loaded machine.
///
/// # Panics
/// When `open` still fails after 30 s.
pub fn when_released<T, E: std::fmt::Display>(open: impl Fn() -> Result<T, E>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match open() {
            Ok(opened) => return opened,
            Err(error) if std::time::Instant::now() < deadline => {
                eprintln!("not yet released: {error}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(error) => panic!("does not open: {error}"),
        }
    }
}

pub fn stream(cluster: &str) -> StreamIdentity {
    StreamIdentity {
        cluster_id: cluster.to_owned(),
        topic: "touchpoints".to_owned(),
    }
}

pub fn envelope(
    partner: &str,
    event: &str,
    customer: &str,
    occurred_at: i64,
    stage: JourneyStage,
) -> Envelope {
    Envelope {
        partner_id: PartnerId::parse(partner).expect("valid partner"),
        touchpoint: Touchpoint {
            event_id: EventId::parse(event).expect("valid event id"),
            customer_id: CustomerId::parse(customer).expect("valid customer"),
            event_type: EventType::parse(format!("{}.seen", stage.name())).expect("valid type"),
            occurred_at: UnixNanos(occurred_at),
            channel: Channel::Web,
            stage,
            outcome: Some(Outcome {
                sentiment: Sentiment::Neutral,
                score: None,
            }),
            attributes: BTreeMap::new(),
            payload: Vec::new(),
        },
        received_at: UnixNanos(occurred_at),
    }
}

pub fn record(partition: i32, offset: i64, envelope: Envelope) -> ConsumedRecord {
    let raw = touchline_proto::encode_envelope(&envelope);
    ConsumedRecord {
        partition,
        offset,
        content: RecordContent::Event {
            envelope: Box::new(envelope),
            raw,
        },
    }
}

/// Rebuilds the whole timeline in one step and switches to it; the replaced version is left to
/// the caller to retire.
pub fn rebuild_timeline(store: &SledStore) -> Switched {
    let (version, _) = store.begin_rebuild(Projection::Timeline).expect("begins");
    let next = store
        .rebuild_step(Projection::Timeline, version, 1, usize::MAX)
        .expect("steps");
    store
        .finish_rebuild(Projection::Timeline, version, next, usize::MAX)
        .expect("finishes")
}
