//! The ceilings, measured in the same run on the same records: what the broker does with raw
//! rdkafka clients, and what sled does with batched writes of the log and timeline keys.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use serde::Serialize;
use touchline_kafka::KafkaOptions;

use crate::stats::per_second as rate;

/// Raw broker rates, records per second.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BrokerCeiling {
    /// Records per second until every delivery was confirmed.
    pub produce_per_second: f64,
    /// Records per second until every record was consumed (consuming from the start, alongside).
    pub consume_per_second: f64,
    /// Records per second from the first produce until the last record was consumed, producing
    /// and consuming at once: what a pipeline through this broker cannot beat.
    pub per_second: f64,
}

/// Produces the records with every delivery in flight (idempotent, `acks=all`, the producer
/// settings Touchline uses) while a consumer reads them back from the beginning, as the pipeline
/// does; both clients warmed up first, by one more record. (Consuming concurrently also keeps the mock cluster, which keeps only about 5 MiB per
/// partition, from dropping records before they are read.)
///
/// # Errors
/// When the broker refuses.
pub async fn broker(
    kafka: &KafkaOptions,
    records: &[(String, Vec<u8>)],
) -> anyhow::Result<BrokerCeiling> {
    let consumer: StreamConsumer = kafka
        .consumer_config()
        .set("group.id", "touchline-bench-ceiling")
        .create()?;
    let partitions = touchline_kafka::fetch_partitions(
        consumer.client(),
        &kafka.topic,
        Duration::from_secs(10),
    )?;
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment.add_partition_offset(&kafka.topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    // Both clients are set up before the clock starts, as the pipeline's node is warmed up
    // before its figures: the producer's first delivery (the idempotent producer's id is asked
    // for then) and the consumer's first fetch, of one record produced for it (counted out).
    // Set-up counted in, the broker's rate came out lower than it is (0.5 to 1 s on Tansu, of a
    // run of a few seconds).
    let producer: FutureProducer = kafka.producer_config().create()?;
    let (warm_key, warm_value) = records
        .first()
        .map(|(key, value)| (key.as_str(), value.as_slice()))
        .unwrap_or_default();
    producer
        .send(
            FutureRecord::to(&kafka.topic)
                .key(warm_key)
                .payload(warm_value),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(error, _)| error)?;
    tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .map_err(|_| anyhow::anyhow!("the warm-up record was not consumed within 30 s"))??;
    let expected = records.len();
    let started = Instant::now();
    let consuming = tokio::spawn(async move {
        let mut consumed = 0;
        let mut stream = consumer.stream();
        while consumed < expected {
            match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
                Ok(Some(Ok(message))) => consumed += usize::from(message.payload().is_some()),
                Ok(Some(Err(error))) => return Err(anyhow::Error::from(error)),
                Ok(None) | Err(_) => anyhow::bail!("consumed {consumed} of {expected} records"),
            }
        }
        Ok(started.elapsed())
    });

    let mut deliveries = Vec::with_capacity(records.len());
    for (key, value) in records {
        loop {
            match producer.send_result(FutureRecord::to(&kafka.topic).key(key).payload(value)) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }
    for delivery in deliveries {
        delivery.await?.map_err(|(error, _)| error)?;
    }
    let produce = started.elapsed();
    let consume = consuming.await??;
    Ok(BrokerCeiling {
        produce_per_second: rate(records.len(), produce),
        consume_per_second: rate(records.len(), consume),
        per_second: rate(records.len(), produce.max(consume)),
    })
}

/// Raw sled: each record appended to a log tree and indexed in a timeline tree, in batches of
/// `batch` with one flush per batch, as the projector writes. With `collected`, each batch goes
/// through the store's own batch apply (`touchline_projection::garbage::apply_batch`: the store's
/// write gate and the epoch collector's steps, which keep sled's replaced pages from staying
/// resident); without, through sled's `apply_batch` alone. Neither is the faster every time
/// (BENCHMARKS.md, Method): the ceiling is the faster of the two.
///
/// # Errors
/// When sled fails.
pub fn sled_rate(
    dir: &std::path::Path,
    records: &[(String, Vec<u8>)],
    batch: usize,
    cache_bytes: u64,
    collected: bool,
) -> anyhow::Result<f64> {
    let db = touchline_projection::sled_store::sled_config(dir, cache_bytes).open()?;
    let log = db.open_tree("log")?;
    let timeline = db.open_tree("timeline")?;
    let started = Instant::now();
    for (chunk_index, chunk) in records.chunks(batch.max(1)).enumerate() {
        let mut log_batch = sled::Batch::default();
        let mut timeline_batch = sled::Batch::default();
        for (offset, (key, value)) in chunk.iter().enumerate() {
            let sequence = (chunk_index * batch + offset) as u64;
            log_batch.insert(&sequence.to_be_bytes(), value.as_slice());
            let mut timeline_key = key.as_bytes().to_vec();
            timeline_key.extend_from_slice(&sequence.to_be_bytes());
            timeline_batch.insert(timeline_key, value.as_slice());
        }
        if collected {
            // As the store writes: sled 0.34 alone leaves replaced pages resident.
            touchline_projection::garbage::apply_batch(&log, log_batch, chunk.len())?;
            touchline_projection::garbage::apply_batch(&timeline, timeline_batch, chunk.len())?;
        } else {
            log.apply_batch(log_batch)?;
            timeline.apply_batch(timeline_batch)?;
        }
        db.flush()?;
    }
    Ok(rate(records.len(), started.elapsed()))
}

/// The store's own rate: the same records decoded and applied with `SledStore::apply` (dedupe,
/// log, timeline, summary, positions) in batches of `batch`, with a flush per batch, as the
/// projector does without Kafka, gRPC or ingest around it. Not a ceiling the target is measured
/// against: it says how much of the pipeline's time the store's own work takes.
///
/// # Errors
/// When the store fails.
pub fn store_rate(
    dir: &std::path::Path,
    records: &[(String, Vec<u8>)],
    batch: usize,
    cache_bytes: u64,
) -> anyhow::Result<f64> {
    use touchline_core::{ConsumedRecord, EventStore as _, RecordContent, StreamIdentity};
    let store = touchline_projection::SledStore::open_with_cache(dir, cache_bytes)?;
    let stream = StreamIdentity {
        cluster_id: "bench".to_owned(),
        topic: "store".to_owned(),
    };
    let started = Instant::now();
    for (chunk_index, chunk) in records.chunks(batch.max(1)).enumerate() {
        let consumed = chunk
            .iter()
            .enumerate()
            .map(|(offset, (_, value))| {
                let index = chunk_index * batch + offset;
                let envelope = touchline_proto::decode_envelope(Some(value))?;
                Ok(ConsumedRecord {
                    partition: i32::try_from(index % 6).unwrap_or_default(),
                    offset: i64::try_from(index / 6).unwrap_or_default(),
                    content: RecordContent::Event {
                        envelope: Box::new(envelope),
                        raw: value.clone(),
                    },
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        store.apply(&stream, consumed)?;
        store.flush()?;
    }
    Ok(rate(records.len(), started.elapsed()))
}
