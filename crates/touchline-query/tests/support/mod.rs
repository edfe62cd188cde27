//! Shared by the query crate's tests: events, and applying them to a store as consumed records.

use std::collections::BTreeMap;

use touchline_core::{
    Channel, ConsumedRecord, CustomerId, Envelope, EventId, EventStore, EventType, JourneyStage,
    PartnerId, RecordContent, StreamIdentity, Touchpoint, UnixNanos,
};

pub fn customer(id: &str) -> CustomerId {
    CustomerId::parse(id).expect("valid customer")
}

/// Event `id` of customer `customer_id` at event time `at` (seconds).
pub fn event(id: &str, customer_id: &str, at: i64) -> Envelope {
    Envelope {
        partner_id: PartnerId::parse("courier").expect("valid partner"),
        touchpoint: Touchpoint {
            event_id: EventId::parse(id).expect("valid event id"),
            customer_id: customer(customer_id),
            event_type: EventType::parse("delivery.completed").expect("valid type"),
            occurred_at: UnixNanos(at * 1_000_000_000),
            channel: Channel::Doorstep,
            stage: JourneyStage::Fulfil,
            outcome: None,
            attributes: BTreeMap::new(),
            payload: Vec::new(),
        },
        received_at: UnixNanos(0),
    }
}

/// Applies `events` as the next records of partition 0; flushed (durable) when `flush`.
pub fn apply(store: &dyn EventStore, offset: &mut i64, events: Vec<Envelope>, flush: bool) {
    let stream = StreamIdentity {
        cluster_id: "test".to_owned(),
        topic: "touchpoints".to_owned(),
    };
    let records = events
        .into_iter()
        .map(|envelope| {
            *offset += 1;
            ConsumedRecord {
                partition: 0,
                offset: *offset,
                content: RecordContent::Event {
                    raw: touchline_proto::encode_envelope(&envelope),
                    envelope: Box::new(envelope),
                },
            }
        })
        .collect();
    store.apply(&stream, records).expect("applies");
    if flush {
        store.flush().expect("flushes");
    }
}
