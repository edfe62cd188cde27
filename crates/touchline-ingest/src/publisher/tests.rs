use super::*;

fn generation(publisher: &Publisher) -> u64 {
    publisher
        .slot
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .generation
}

fn started_ago(publisher: &Publisher, ago: Duration) {
    let mut slot = publisher
        .slot
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    slot.started = std::time::Instant::now()
        .checked_sub(ago)
        .unwrap_or_else(std::time::Instant::now);
}

/// A publisher whose producer started just now, on an address where nothing listens
/// (creating a producer does not connect).
fn fresh_publisher(ack_timeout: Duration) -> Publisher {
    let kafka = KafkaOptions {
        bootstrap_servers: "127.0.0.1:9".to_owned(),
        ..KafkaOptions::default()
    };
    let publisher = Publisher::new(&kafka, Durability::Broker, ack_timeout).expect("creates");
    started_ago(&publisher, Duration::ZERO);
    publisher
}

#[test]
fn a_warm_up_reaches_a_broker_by_id_and_the_producer_then_produces() {
    let broker = touchline_kafka::EmbeddedBroker::start(1, "warm", 2).expect("broker starts");
    let kafka = KafkaOptions {
        bootstrap_servers: broker.bootstrap_servers().to_owned(),
        topic: "warm".to_owned(),
        ..KafkaOptions::default()
    };
    let producer: FutureProducer = kafka.producer_config().create().expect("creates");
    let answered = warm_up(&producer, "warm");
    assert!(
        answered.is_some_and(|id| id >= 0),
        "a broker known by its id answered: {answered:?}"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let delivered = runtime.block_on(producer.send(
        FutureRecord::<str, str>::to("warm").key("c1").payload("v"),
        Duration::from_secs(10),
    ));
    assert!(delivered.is_ok(), "{delivered:?}");
}

/// Ingest computes each record's partition itself (so that partitions added to the topic
/// later do not move customers); it is the partition librdkafka's `murmur2_random`
/// partitioner (Java's default) picks for the same key and count.
#[tokio::test]
async fn the_computed_partition_is_the_one_the_partitioner_picks() {
    let broker = touchline_kafka::EmbeddedBroker::start(1, "keys", 6).expect("broker starts");
    let kafka = KafkaOptions {
        bootstrap_servers: broker.bootstrap_servers().to_owned(),
        topic: "keys".to_owned(),
        partitions: 6,
        ..KafkaOptions::default()
    };
    let producer: FutureProducer = kafka.producer_config().create().expect("creates");
    let keys: Vec<String> = (0..200).map(|i| format!("cust-{i:04}")).collect();
    let mut deliveries = Vec::new();
    for key in &keys {
        let record = FutureRecord::<str, str>::to("keys").key(key).payload("v");
        deliveries.push(
            producer
                .send_result(record)
                .map_err(|(error, _)| error)
                .expect("queued"),
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (key, delivery) in keys.iter().zip(deliveries) {
        let produced = delivered(delivery).await.expect("delivered");
        assert_eq!(
            produced.partition,
            touchline_kafka::partition_for(key.as_bytes(), 6),
            "{key}"
        );
        seen.insert(produced.partition);
    }
    assert_eq!(seen.len(), 6, "the keys spread over every partition");
}

#[tokio::test]
async fn a_lost_broker_replaces_the_producer_at_most_once_a_second_a_fatal_error_at_once() {
    let publisher = fresh_publisher(Duration::from_secs(1));
    publisher.replace(0, Replacement::Lost);
    assert_eq!(generation(&publisher), 0, "kept: it started moments ago");
    publisher.replace(0, Replacement::Fatal);
    assert_eq!(
        generation(&publisher),
        1,
        "a fatal error replaces it at once"
    );
    publisher.replace(0, Replacement::Fatal);
    assert_eq!(
        generation(&publisher),
        1,
        "another call replaced generation 0 already"
    );
    started_ago(&publisher, MIN_REPLACE_INTERVAL);
    publisher.replace(1, Replacement::Lost);
    assert_eq!(
        generation(&publisher),
        2,
        "replaced once the interval passed"
    );
}

fn envelope() -> touchline_core::Envelope {
    touchline_core::Envelope {
        partner_id: touchline_core::PartnerId::parse("partner").expect("valid"),
        touchpoint: touchline_core::Touchpoint {
            event_id: touchline_core::EventId::parse("e1").expect("valid"),
            customer_id: touchline_core::CustomerId::parse("c1").expect("valid"),
            event_type: touchline_core::EventType::parse("parcel.scanned").expect("valid"),
            occurred_at: touchline_core::UnixNanos(0),
            channel: touchline_core::Channel::Doorstep,
            stage: touchline_core::JourneyStage::Fulfil,
            outcome: None,
            attributes: std::collections::BTreeMap::new(),
            payload: Vec::new(),
        },
        received_at: touchline_core::UnixNanos(0),
    }
}

#[tokio::test]
async fn a_call_whose_deadline_has_passed_produces_nothing() {
    let broker = touchline_kafka::EmbeddedBroker::start(1, "late", 1).expect("broker starts");
    let kafka = KafkaOptions {
        bootstrap_servers: broker.bootstrap_servers().to_owned(),
        topic: "late".to_owned(),
        partitions: 1,
        ..KafkaOptions::default()
    };
    let publisher =
        Publisher::new(&kafka, Durability::Broker, Duration::from_secs(30)).expect("creates");
    let envelope = envelope();
    let value = touchline_proto::encode_envelope(&envelope);
    let batch = [(envelope, value)];
    let error = publisher
        .publish(&batch, Some(std::time::Instant::now()))
        .await
        .expect_err("no time left");
    assert!(
        matches!(&error, Error::Unavailable { reason, .. } if reason.contains("left no time")),
        "{error:?}"
    );
    // The next call's record is the partition's first: the late one was never produced.
    let produced = publisher
        .publish(
            &batch,
            Some(std::time::Instant::now() + Duration::from_secs(30)),
        )
        .await
        .expect("publishes");
    assert_eq!(produced.iter().map(|p| p.offset).collect::<Vec<_>>(), [0]);
}

#[tokio::test]
async fn a_call_on_a_producer_kept_after_losing_every_broker_fails_at_once() {
    let publisher = fresh_publisher(Duration::from_secs(60));
    // librdkafka's error callback reports that the producer lost every broker.
    publisher
        .slot
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .producer
        .context()
        .error(
            KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
    let envelope = envelope();
    let value = touchline_proto::encode_envelope(&envelope);
    let error = publisher
        .publish(
            &[(envelope, value)],
            Some(std::time::Instant::now() + Duration::from_secs(30)),
        )
        .await
        .expect_err("no broker");
    assert!(
        matches!(&error, Error::Unavailable { reason, .. } if reason == "no Kafka broker is reachable"),
        "answered at once, not at the call's deadline: {error:?}"
    );
    assert_eq!(generation(&publisher), 0, "kept: it started moments ago");
}
