//! Replays: re-reading partitions of the topic into the log, from the oldest record, an offset or
//! a timestamp. Dedupe makes a replay safe at any time, beside the projector.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use touchline_core::{EventStore as _, StoredPosition, StreamIdentity, UnixNanos};
use touchline_kafka::{KafkaOptions, OffRuntime};
use tracing::{debug, info, warn};

use crate::metrics::PROJECTOR;
use crate::projector::resume::Probe;
use crate::projector::{Served, consumed_record, decoded_parts, kafka_setup};
use crate::{Error, SledStore};

/// A replay whose unfinished partitions receive nothing for this long (the broker is gone, or
/// answers only errors) ends with an error.
pub const REPLAY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a replay starts reading each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// The oldest record the broker still has.
    Earliest,
    /// This offset (or the oldest record, when retention deleted it).
    Offset(i64),
    /// The first record with a timestamp at or after this instant.
    Timestamp(UnixNanos),
}

/// Progress of a replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayProgress {
    /// Records read from Kafka.
    pub read: u64,
    /// Events the log did not have, now appended and projected.
    pub appended: u64,
    /// Events already in the log.
    pub duplicates: u64,
    /// Records that cannot be decoded, or events of customers the node does not serve
    /// (kept once in the dead-letter store).
    pub dead_lettered: u64,
    /// Per partition: (start offset, end offset), the end being the high watermark when the
    /// replay started, or this node's stored position in the partition when that is further and
    /// verified (on a broker that reports the base offset of its last record batch + 1 as the
    /// high watermark, Tansu 0.6, the stored position is the partition's end once the node
    /// caught up).
    pub ranges: BTreeMap<i32, (i64, i64)>,
    /// Partitions read to their end.
    pub partitions_done: usize,
    pub finished: bool,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("partition {partition} does not exist (the topic has {partitions})")]
    UnknownPartition { partition: i32, partitions: usize },
    /// The broker no longer has records the replay had still to read (its retention deleted
    /// them after the replay planned its ranges): what was read stays.
    #[error(
        "the broker no longer has records of the replay's ranges that were still to be read (retention deleted them while it ran); what was replayed stays: replay again from the oldest record"
    )]
    RangeGone,
    #[error(transparent)]
    Projection(#[from] Error),
}

impl From<KafkaError> for ReplayError {
    fn from(error: KafkaError) -> Self {
        Self::Projection(Error::Kafka(error))
    }
}

impl From<touchline_core::StoreError> for ReplayError {
    fn from(error: touchline_core::StoreError) -> Self {
        Self::Projection(Error::Store(error))
    }
}

/// Re-reads `partitions` (every partition when empty) of the topic from `from` up to the high
/// watermark at the start (or the node's stored position, when further), into the log: events it lacks are appended and projected, the rest
/// are duplicates (invariant 3 makes a replay safe at any time, beside the projector). Stored
/// positions do not move. Progress is published on `progress`; `cancel` stops it between
/// batches (what was applied stays). Unfinished partitions that receive nothing for `idle`
/// ([`REPLAY_IDLE_TIMEOUT`]) end it with an error. An event of a customer the node does not
/// serve (`served`) becomes a dead letter, as in the projector.
///
/// # Errors
/// When a partition does not exist, Kafka cannot be reached, the broker no longer has records
/// still to be read ([`ReplayError::RangeGone`]) or the store fails.
#[allow(
    clippy::too_many_arguments,
    reason = "what to read, where from, for whom, and how to report and stop"
)]
pub async fn replay(
    kafka: &KafkaOptions,
    store: Arc<SledStore>,
    from: ReplayFrom,
    partitions: &[i32],
    served: &Served,
    progress: &watch::Sender<ReplayProgress>,
    cancel: &CancellationToken,
    idle: Duration,
) -> std::result::Result<ReplayProgress, ReplayError> {
    let consumer: StreamConsumer = kafka
        .consumer_config()
        .set("enable.partition.eof", "true")
        // An offset the broker no longer has is an error, not a silent jump to its oldest
        // record: the records in between would be skipped and the replay still say finished.
        .set("auto.offset.reset", "error")
        .create()
        .map_err(Error::from)?;
    // Destroyed off the runtime, however the replay ends (a group member's close polls, then
    // joins librdkafka's threads).
    let consumer = Arc::new(OffRuntime::new(consumer));
    let (stream, ranges, assignment) = tokio::task::spawn_blocking({
        let consumer = Arc::clone(&consumer);
        let topic = kafka.topic.clone();
        let wanted = partitions.to_vec();
        let kafka = kafka.clone();
        let store = Arc::clone(&store);
        move || plan_replay(&consumer, &kafka, &store, &topic, from, wanted)
    })
    .await
    .map_err(Error::from)??;
    consumer.assign(&assignment)?;
    // Where each partition is fetched from (an offset the broker can fetch from): where it is
    // fetched from again after a refused fetch.
    let fetch_from: BTreeMap<i32, i64> = assignment
        .elements()
        .iter()
        .filter_map(|element| match element.offset() {
            Offset::Offset(offset) => Some((element.partition(), offset)),
            _ => None,
        })
        .collect();
    let mut state = ReplayProgress {
        ranges: ranges.clone(),
        ..ReplayProgress::default()
    };
    let mut open: BTreeMap<i32, i64> = ranges
        .iter()
        .filter(|(_, (start, end))| start < end)
        .map(|(partition, (_, end))| (*partition, *end))
        .collect();
    state.partitions_done = ranges.len() - open.len();
    progress.send_replace(state.clone());
    info!(?from, ?ranges, "replay started");
    let mut batches = consumer.stream().ready_chunks(1000);
    let mut failure = None;
    // Moved only by records of unfinished partitions (those before a start too): errors and
    // records of finished partitions do not move it.
    let mut idle_until = tokio::time::Instant::now() + idle;
    // Where each unfinished partition is to be read from next: records before it are skipped
    // (fetched from before the start, see plan_replay, or again after a refused fetch).
    let mut next: BTreeMap<i32, i64> = ranges
        .iter()
        .filter(|(partition, _)| open.contains_key(partition))
        .map(|(partition, (start, _))| (*partition, *start))
        .collect();
    while !open.is_empty() {
        let batch = tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep_until(idle_until) => {
                failure = Some(ReplayError::Projection(Error::Setup(format!(
                    "nothing received from Kafka for {}s with partitions {:?} unfinished",
                    idle.as_secs(),
                    open.keys().collect::<Vec<_>>()
                ))));
                break;
            }
            batch = batches.next() => batch,
        };
        let Some(batch) = batch else { break };
        let mut records = Vec::with_capacity(batch.len());
        let mut closed = Vec::new();
        let mut reset = false;
        let mut progressed = false;
        for message in batch {
            match message {
                Ok(message) => {
                    let partition = message.partition();
                    let Some(end) = open.get(&partition).copied() else {
                        continue;
                    };
                    progressed = true;
                    if next
                        .get(&partition)
                        .is_some_and(|next| message.offset() < *next)
                    {
                        continue;
                    }
                    // The partition closes at its end: the record before it, or the first one
                    // past it when that one is missing (compacted, a transaction marker).
                    // Records after that in the same fetch are not applied (the projector reads
                    // them).
                    records.push(message.detach());
                    next.insert(partition, message.offset().saturating_add(1));
                    if message.offset().saturating_add(1) >= end {
                        open.remove(&partition);
                        closed.push(partition);
                    }
                }
                Err(KafkaError::PartitionEOF(partition)) => {
                    if open.remove(&partition).is_some() {
                        closed.push(partition);
                    }
                }
                // A fetch answered "offset out of range" (the error names no partition).
                Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset)) => {
                    reset = true;
                }
                Err(error) => warn!(%error, "kafka consumer error during replay"),
            }
        }
        // A finished partition is no longer fetched (under live ingest it would be, for
        // nothing).
        if !closed.is_empty() {
            let mut finished = TopicPartitionList::new();
            for partition in &closed {
                finished.add_partition(&kafka.topic, *partition);
            }
            if let Err(error) = consumer.pause(&finished) {
                debug!(%error, "cannot pause the replay's finished partitions");
            }
        }
        state.read += records.len() as u64;
        PROJECTOR.replayed.inc_by(records.len() as u64);
        if !records.is_empty() {
            let applying = Arc::clone(&store);
            let stream = stream.clone();
            let served = served.clone();
            // Applied and flushed per batch: what a replay restored is durable (and reaches
            // watchers) even if it stops early.
            // Decoded with the write, off the async runtime.
            let applied = tokio::task::spawn_blocking(move || {
                let mut outcome = touchline_core::ApplyOutcome::default();
                // Decoded a part at a time (see `decoded_parts`): the whole batch, but for
                // records of unusual size.
                for part in decoded_parts(records) {
                    let part = part
                        .iter()
                        .map(|(record, estimate)| consumed_record(record, *estimate, &served))
                        .collect();
                    outcome.absorb(applying.apply_replayed(&stream, part)?);
                }
                applying.flush()?;
                Ok::<_, touchline_core::StoreError>(outcome)
            })
            .await
            .map_err(Error::from)?;
            let outcome = match applied {
                Ok(outcome) => outcome,
                Err(error) => {
                    failure = Some(error.into());
                    break;
                }
            };
            state.appended += outcome.appended;
            state.duplicates += outcome.duplicates;
            state.dead_lettered += outcome.dead_lettered;
        }
        if progressed || !closed.is_empty() {
            idle_until = tokio::time::Instant::now() + idle;
        }
        if reset && !open.is_empty() {
            let unfinished: Vec<(i32, i64, i64)> = open
                .keys()
                .map(|partition| {
                    let next = next.get(partition).copied().unwrap_or(0);
                    (
                        *partition,
                        next,
                        fetch_from.get(partition).copied().unwrap_or(next),
                    )
                })
                .collect();
            if range_gone(&consumer, kafka, unfinished).await? {
                progress.send_replace(state.clone());
                failure = Some(ReplayError::RangeGone);
                break;
            }
            debug!(
                "a fetch answered out of range, but no record still to be read is gone: read again"
            );
        }
        state.partitions_done = ranges.len() - open.len();
        progress.send_replace(state.clone());
    }
    drop(batches);
    if let Some(failure) = failure {
        return Err(failure);
    }
    state.finished = open.is_empty();
    progress.send_replace(state.clone());
    info!(
        read = state.read,
        appended = state.appended,
        duplicates = state.duplicates,
        dead_lettered = state.dead_lettered,
        finished = state.finished,
        "replay ended"
    );
    Ok(state)
}

/// After a fetch answered "offset out of range": whether the broker no longer has the offset an
/// unfinished partition is to be read from next (`unfinished`: partition, next offset, the offset
/// it was first fetched from), its oldest record being past it. When it still has them all (the
/// error was of a finished partition, or the broker's own), the unfinished partitions are
/// assigned again (a seek does not restart a partition whose reset failed), each from an offset
/// the broker can fetch from at or before its next one (found as the plan found the first; Tansu
/// answers a fetch from inside a record batch from the next batch): the records before the next
/// offset are skipped again.
async fn range_gone(
    consumer: &Arc<OffRuntime<StreamConsumer>>,
    kafka: &KafkaOptions,
    unfinished: Vec<(i32, i64, i64)>,
) -> std::result::Result<bool, ReplayError> {
    let consumer = Arc::clone(consumer);
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let topic = &kafka.topic;
        let mut again = TopicPartitionList::new();
        for (partition, next, fetch_from) in unfinished {
            let (low, high) = consumer.fetch_watermarks(topic, partition, METADATA_TIMEOUT)?;
            if low > next {
                return Ok(true);
            }
            let from = fetchable(&kafka, partition, next, (low, high), fetch_from.max(low))?;
            again.add_partition_offset(topic, partition, Offset::Offset(from))?;
        }
        consumer.assign(&again)?;
        Ok(false)
    })
    .await
    .map_err(Error::from)?
}

/// An offset the broker can fetch from at or before `target` in `partition` of `kafka`'s topic,
/// found by reading the record at `target` from earlier offsets (`resume::find`; a target that
/// is not a record, compacted away or a transaction marker, also gives the fetchable offset
/// before it); `floor` when `target` is not past it, or when none is found.
fn fetchable(
    kafka: &KafkaOptions,
    partition: i32,
    target: i64,
    watermarks: (i64, i64),
    floor: i64,
) -> std::result::Result<i64, ReplayError> {
    if target <= floor {
        return Ok(floor);
    }
    Ok(
        match crate::projector::resume::find(kafka, &kafka.topic, partition, target, watermarks)? {
            Probe::Read { first, .. } | Probe::Missing { first } => first,
            _ => floor,
        },
    )
}

/// Where a replay of `partition` ends: its high watermark, or this node's stored position when
/// that is further and verified. Tansu 0.6 reports the base offset of the last record batch + 1
/// as the high watermark, so a replay from inside that batch would read nothing; the record
/// before the stored position must be the one projected there (as when the projector resumes),
/// so that a position left by another incarnation of the broker (a wiped broker that kept its
/// cluster id), possibly past the partition's end, is not waited for.
fn replay_end(
    kafka: &KafkaOptions,
    topic: &str,
    partition: i32,
    (low, high): (i64, i64),
    stored: Option<&StoredPosition>,
) -> std::result::Result<i64, ReplayError> {
    let Some(stored) = stored.filter(|stored| stored.next_offset > high.max(low)) else {
        return Ok(high.max(low));
    };
    let target = stored.next_offset - 1;
    Ok(
        match crate::projector::resume::find(kafka, topic, partition, target, (low, high))? {
            Probe::Read { fingerprint, .. } if fingerprint == stored.last_fingerprint => {
                stored.next_offset
            }
            _ => {
                warn!(
                    partition,
                    stored = stored.next_offset,
                    high,
                    "the stored position is past the high watermark and not verified: replaying up to the high watermark"
                );
                high.max(low)
            }
        },
    )
}

type Plan = (
    StreamIdentity,
    BTreeMap<i32, (i64, i64)>,
    TopicPartitionList,
);

/// Where a replay from an instant starts reading `partition`, from the partition's answer to
/// `offsets_for_times` (its error and offset; `None` when the answer left it out): the first
/// offset at or after the instant, within `low..=end`, or `end` when no record is at or after it
/// (the broker's -1). A partition the broker could not answer for (an error on it alone, say a
/// leader moving, while the call as a whole succeeded; or left out of the answer, when
/// librdkafka leaves the instant asked, in milliseconds, as its offset: above the high
/// watermark) fails the plan, rather than being read as if it had nothing after the instant and
/// the replay reporting it finished.
fn start_at_instant(
    partition: i32,
    answer: Option<(KafkaResult<()>, Offset)>,
    (low, high): (i64, i64),
    end: i64,
) -> std::result::Result<i64, ReplayError> {
    let unanswered = |why: String| {
        ReplayError::Projection(Error::Setup(format!(
            "the offset of partition {partition} at the replay's instant: {why}"
        )))
    };
    match answer {
        Some((Ok(()), Offset::Offset(offset))) if offset <= high => Ok(offset.max(low).min(end)),
        Some((Ok(()), Offset::End)) => Ok(end),
        Some((Ok(()), other)) => Err(unanswered(format!("the broker answered {other:?}"))),
        Some((Err(error), _)) => Err(unanswered(error.to_string())),
        None => Err(unanswered("the broker's answer left it out".to_owned())),
    }
}

/// Resolves the stream, each partition's range and the assignment to read it.
fn plan_replay(
    consumer: &StreamConsumer,
    kafka: &KafkaOptions,
    store: &SledStore,
    topic: &str,
    from: ReplayFrom,
    wanted: Vec<i32>,
) -> std::result::Result<Plan, ReplayError> {
    let cluster_id = touchline_kafka::fetch_cluster_id(consumer.client(), METADATA_TIMEOUT)
        .map_err(|error| kafka_setup(&error))?;
    let all = touchline_kafka::fetch_partitions(consumer.client(), topic, METADATA_TIMEOUT)
        .map_err(|error| kafka_setup(&error))?;
    let partitions = if wanted.is_empty() {
        all.clone()
    } else {
        wanted
    };
    if let Some(partition) = partitions.iter().find(|p| !all.contains(p)) {
        return Err(ReplayError::UnknownPartition {
            partition: *partition,
            partitions: all.len(),
        });
    }
    let by_time = match from {
        ReplayFrom::Timestamp(at) => {
            let mut query = TopicPartitionList::new();
            for partition in &partitions {
                query.add_partition_offset(
                    topic,
                    *partition,
                    Offset::Offset(at.0.div_euclid(1_000_000)),
                )?;
            }
            Some(consumer.offsets_for_times(query, METADATA_TIMEOUT)?)
        }
        _ => None,
    };
    let stream = StreamIdentity {
        cluster_id,
        topic: topic.to_owned(),
    };
    let stored = store.positions(&stream)?;
    let mut ranges = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, METADATA_TIMEOUT)?;
        let end = replay_end(kafka, topic, partition, (low, high), stored.get(&partition))?;
        let start = match from {
            ReplayFrom::Earliest => low,
            ReplayFrom::Offset(offset) => offset.max(low).min(end),
            ReplayFrom::Timestamp(_) => start_at_instant(
                partition,
                by_time
                    .as_ref()
                    .and_then(|list| list.find_partition(topic, partition))
                    .map(|element| (element.error(), element.offset())),
                (low, high),
                end,
            )?,
        };
        ranges.insert(partition, (start, end));
        if start >= end {
            // Nothing to read: not fetched at all.
            continue;
        }
        // Fetch from a start the broker can fetch from, at or before the replay's start, and
        // skip to it: some brokers (Tansu 0.6) cannot fetch from the middle of a record batch and
        // would silently skip the rest of it. When none is found, from the oldest record.
        let fetch_from = fetchable(kafka, partition, start, (low, high), low)?;
        assignment.add_partition_offset(topic, partition, Offset::Offset(fetch_from))?;
    }
    Ok((stream, ranges, assignment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_the_broker_could_not_answer_for_at_the_instant_fails_the_plan() {
        let start = |answer| start_at_instant(3, answer, (10, 120), 100).ok();
        // The first offset at or after the instant, within what the replay reads.
        assert_eq!(start(Some((Ok(()), Offset::Offset(40)))), Some(40));
        assert_eq!(start(Some((Ok(()), Offset::Offset(5)))), Some(10));
        assert_eq!(start(Some((Ok(()), Offset::Offset(110)))), Some(100));
        // Left out of the answer, the instant asked left as its offset: not an offset there.
        assert_eq!(
            start(Some((Ok(()), Offset::Offset(1_760_000_000_000)))),
            None
        );
        // No record at or after the instant: nothing to read there.
        assert_eq!(start(Some((Ok(()), Offset::End))), Some(100));
        // An error on the partition alone, its offset left as asked (the instant, in ms): not
        // read as a partition with nothing after the instant.
        let failed = start_at_instant(
            3,
            Some((
                Err(KafkaError::OffsetFetch(
                    RDKafkaErrorCode::NotLeaderForPartition,
                )),
                Offset::Offset(1_760_000_000_000),
            )),
            (10, 120),
            100,
        );
        assert!(
            matches!(&failed, Err(ReplayError::Projection(Error::Setup(why))) if why.contains("partition 3")),
            "{failed:?}"
        );
        assert_eq!(start(Some((Ok(()), Offset::Invalid))), None);
        assert_eq!(start(None), None);
    }
}
