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

/// Produces events `first..first + count` (of 7 customers, keyed by customer) to `kafka`'s
/// topic, in record batches of at most `batch`, and waits for every delivery.
pub async fn produce(
    kafka: &touchline_kafka::KafkaOptions,
    first: usize,
    count: usize,
    batch: usize,
) -> anyhow::Result<()> {
    // Uncompressed, so that the broker's store fills as the events' size says; and not with
    // the replay's properties.
    let producing = touchline_kafka::KafkaOptions {
        properties: [
            ("compression.type".to_owned(), "none".to_owned()),
            ("batch.num.messages".to_owned(), batch.to_string()),
        ]
        .into(),
        ..kafka.clone()
    };
    let producer: rdkafka::producer::FutureProducer = producing.producer_config().create()?;
    let deliveries: Vec<_> = (first..first + count)
        .map(|index| {
            let envelope = envelope(
                "partner",
                &format!("e{index}"),
                &format!("customer-{}", index % 7),
                i64::try_from(index).unwrap_or_default(),
                JourneyStage::Fulfil,
            );
            let value = touchline_proto::encode_envelope(&envelope);
            let key = envelope.touchpoint.customer_id.as_str().to_owned();
            producer
                .send_result(
                    rdkafka::producer::FutureRecord::to(&kafka.topic)
                        .key(&key)
                        .payload(&value),
                )
                .map_err(|(error, _)| error)
        })
        .collect::<Result<_, _>>()?;
    for delivery in deliveries {
        delivery.await?.map_err(|(error, _)| error)?;
    }
    Ok(())
}
