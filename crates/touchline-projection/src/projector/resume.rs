//! Where the projector resumes a partition: its stored position, once checked against what the
//! broker serves now.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use touchline_core::{StoredPosition, fingerprint};
use touchline_kafka::KafkaOptions;
use tracing::warn;

use super::METADATA_TIMEOUT;
use crate::Result;

/// Where to resume a partition: fetch from `fetch_from`, apply from `next`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Resume {
    pub(super) fetch_from: i64,
    pub(super) next: i64,
}

/// Checks that a stored position belongs to the stream the broker serves now: the record just
/// before it must be the one the position was taken after (same fingerprint). Cluster ids alone are
/// not enough (the embedded broker's id can repeat, a wiped broker keeps its id), and high
/// watermarks are not reliable on every broker (Tansu 0.6 reports the base offset of the last
/// batch, and cannot fetch from the middle of a batch). `None` means "a new incarnation, or no
/// proof it is the same: read from the beginning"; re-reading is safe, events are deduplicated.
pub(super) fn check_position(
    consumer: &StreamConsumer,
    kafka: &KafkaOptions,
    topic: &str,
    partition: i32,
    position: StoredPosition,
) -> Result<Option<Resume>> {
    let next = position.next_offset;
    let (low, _high) = consumer.fetch_watermarks(topic, partition, METADATA_TIMEOUT)?;
    if next <= 0 {
        return Ok(Some(Resume {
            fetch_from: 0,
            next: 0,
        }));
    }
    if next <= low {
        if next < low {
            warn!(
                partition,
                next,
                low,
                "records after the stored position were deleted by retention before they were projected; reading from the oldest record left"
            );
        }
        return Ok(Some(Resume {
            fetch_from: low,
            next: low,
        }));
    }
    let probe: BaseConsumer = kafka
        .consumer_config()
        .set("auto.offset.reset", "error")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, Offset::Offset(next - 1))?;
    probe.assign(&list)?;
    let deadline = std::time::Instant::now() + METADATA_TIMEOUT;
    while std::time::Instant::now() < deadline {
        match probe.poll(Duration::from_millis(200)) {
            Some(Ok(message))
                if message.partition() == partition && message.offset() == next - 1 =>
            {
                if fingerprint(message.payload()) == position.last_fingerprint {
                    // Fetch from the verified record rather than from `next`: some brokers cannot
                    // fetch from the middle of a batch, and this offset is known to be fetchable.
                    return Ok(Some(Resume {
                        fetch_from: next - 1,
                        next,
                    }));
                }
                warn!(
                    partition,
                    offset = next - 1,
                    "the record before the stored position is not the one projected: a new broker or topic, reading it from the beginning"
                );
                return Ok(None);
            }
            Some(Ok(message)) if message.partition() == partition && message.offset() >= next => {
                warn!(
                    partition,
                    offset = next - 1,
                    "the record before the stored position is gone: reading the partition from the beginning"
                );
                return Ok(None);
            }
            Some(Ok(_)) | None => {}
            Some(Err(error)) => {
                warn!(partition, next, %error, "the record before the stored position cannot be read (a new broker or topic?): reading the partition from the beginning");
                return Ok(None);
            }
        }
    }
    warn!(
        partition,
        next,
        "the stored position could not be verified in time: reading the partition from the beginning"
    );
    Ok(None)
}
