//! The benchmark's records: N touchpoints spread over C customers, about 300 bytes each once in
//! a Kafka record, the same for the ceilings and the pipeline.

use std::collections::BTreeMap;

use touchline_core::{
    Channel, CustomerId, Envelope, EventId, EventType, JourneyStage, Outcome, PartnerId, Sentiment,
    Touchpoint, UnixNanos,
};
use touchline_proto::v1;

/// The wire touchpoint of event `index`.
#[must_use]
pub fn touchpoint(index: usize, customers: usize, base_seconds: i64) -> v1::Touchpoint {
    let stage = JourneyStage::ALL[index % JourneyStage::ALL.len()];
    v1::Touchpoint {
        event_id: format!("bench-{index:09}"),
        customer_id: format!("bench-customer-{:07}", index % customers.max(1)),
        r#type: "delivery.completed".to_owned(),
        occurred_at: Some(prost_types::Timestamp {
            seconds: base_seconds + i64::try_from(index).unwrap_or_default() % 86_400,
            nanos: 0,
        }),
        channel: Channel::Doorstep.number(),
        stage: stage.number(),
        outcome: Some(v1::Outcome {
            sentiment: Sentiment::Positive.number(),
            score: Some(87.0),
        }),
        attributes: [
            ("order".to_owned(), format!("ord-{index:09}")),
            ("carrier".to_owned(), "swift-courier-same-day".to_owned()),
            ("depot".to_owned(), format!("depot-{:03}", index % 97)),
            (
                "note".to_owned(),
                "left with the neighbour at number 12, signed by J. Doe".to_owned(),
            ),
        ]
        .into(),
        payload: Vec::new(),
    }
}

/// The same event as a domain envelope and its Kafka record value, for the ceilings.
#[must_use]
pub fn record(index: usize, customers: usize, base_seconds: i64) -> (String, Vec<u8>, Envelope) {
    let wire = touchpoint(index, customers, base_seconds);
    let envelope = Envelope {
        partner_id: PartnerId::parse("bench-partner").expect("valid by construction"),
        touchpoint: Touchpoint {
            event_id: EventId::parse(wire.event_id.clone()).expect("valid by construction"),
            customer_id: CustomerId::parse(wire.customer_id.clone())
                .expect("valid by construction"),
            event_type: EventType::parse(wire.r#type.clone()).expect("valid by construction"),
            occurred_at: UnixNanos(base_seconds * 1_000_000_000),
            channel: Channel::Doorstep,
            stage: JourneyStage::ALL[index % JourneyStage::ALL.len()],
            outcome: Some(Outcome {
                sentiment: Sentiment::Positive,
                score: Some(87.0),
            }),
            attributes: wire
                .attributes
                .clone()
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            payload: Vec::new(),
        },
        received_at: UnixNanos::now(),
    };
    let value = touchline_proto::encode_envelope(&envelope);
    (wire.customer_id, value, envelope)
}
