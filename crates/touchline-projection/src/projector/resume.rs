//! Where the projector resumes a partition: its stored position, once checked against what the
//! broker serves now.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
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
    /// Records after the stored position that retention deleted before they were read: the
    /// projector stores `next` as the position past them and counts them, once.
    pub(super) lost: u64,
}

/// Per partition, the records read again before a resume point: a [`Resume`] fetches from
/// `fetch_from` (the verified record just before `next`, or the start of its batch), and those
/// records, applied before, are dropped once, in order. A record outside that range, or one whose
/// offset goes back, ends the partition's skip, and it and every record after it are applied:
/// the broker's log was reset or cut while the node ran (librdkafka then fetches from the
/// earliest offset), and its new records must not be dropped unseen (re-reading is safe: events
/// are deduplicated, dead letters recognised).
#[derive(Debug, Default)]
pub(super) struct Rereads {
    partitions: BTreeMap<i32, Reread>,
}

#[derive(Debug)]
struct Reread {
    from: i64,
    next: i64,
    /// The last offset dropped.
    last: Option<i64>,
}

impl Rereads {
    /// Skips the records of `partition` read again before `resume.next`.
    pub(super) fn insert(&mut self, partition: i32, resume: Resume) {
        self.partitions.insert(
            partition,
            Reread {
                from: resume.fetch_from,
                next: resume.next,
                last: None,
            },
        );
    }

    /// Whether the record at `offset` of `partition` is one read again before its resume point
    /// (drop it); a record that is not ends its partition's skip.
    pub(super) fn drop_reread(&mut self, partition: i32, offset: i64) -> bool {
        let Some(reread) = self.partitions.get_mut(&partition) else {
            return false;
        };
        let in_order = reread.last.is_none_or(|last| offset > last);
        if in_order && offset >= reread.from && offset < reread.next {
            reread.last = Some(offset);
            return true;
        }
        self.partitions.remove(&partition);
        false
    }
}

/// Probes of a stored position that time out before its partition is read from the beginning.
const PROBE_ATTEMPTS: u32 = 3;

/// Stored positions checked at once (each with a probing consumer of its own).
const PARALLEL_CHECKS: usize = 8;

/// Checks the stored position of each of `partitions` that has one ([`check_position`]), up to
/// [`PARALLEL_CHECKS`] at a time: a start waits for the slowest probe of each group, not for the
/// sum of them.
///
/// # Errors
/// When the watermarks cannot be read or a probing consumer cannot be made.
pub(super) fn check_positions(
    consumer: &StreamConsumer,
    kafka: &KafkaOptions,
    topic: &str,
    positions: &[(i32, StoredPosition)],
) -> Result<BTreeMap<i32, Option<Resume>>> {
    let mut checked = BTreeMap::new();
    for group in positions.chunks(PARALLEL_CHECKS) {
        let results: Vec<(i32, Result<Option<Resume>>)> = std::thread::scope(|scope| {
            let running: Vec<_> = group
                .iter()
                .map(|(partition, position)| {
                    let check = scope.spawn(move || {
                        check_position(consumer, kafka, topic, *partition, *position)
                    });
                    (*partition, check)
                })
                .collect();
            running
                .into_iter()
                .map(|(partition, check)| {
                    let result = check.join().unwrap_or_else(|_| {
                        Err(crate::Error::Setup(format!(
                            "the check of partition {partition}'s stored position panicked"
                        )))
                    });
                    (partition, result)
                })
                .collect()
        });
        for (partition, result) in results {
            checked.insert(partition, result?);
        }
    }
    Ok(checked)
}

/// Checks that a stored position belongs to the stream the broker serves now: the record just
/// before it must be the one the position was taken after (same fingerprint). Cluster ids alone are
/// not enough (the embedded broker's id can repeat, a wiped broker keeps its id), and high
/// watermarks are not reliable on every broker (Tansu 0.6 reports the base offset of the last
/// batch, and cannot fetch from the middle of a batch: the record is looked for from earlier
/// starts there, see below). `None` means "a new incarnation, or no
/// proof it is the same: read from the beginning"; re-reading is safe, events are deduplicated.
fn check_position(
    consumer: &StreamConsumer,
    kafka: &KafkaOptions,
    topic: &str,
    partition: i32,
    position: StoredPosition,
) -> Result<Option<Resume>> {
    let next = position.next_offset;
    let (low, high) = consumer.fetch_watermarks(topic, partition, METADATA_TIMEOUT)?;
    if next <= 0 {
        return Ok(Some(Resume {
            fetch_from: 0,
            next: 0,
            lost: 0,
        }));
    }
    if next <= low {
        if next < low {
            // Acknowledged events may be among them: what a node restored from an old backup, or
            // stopped for longer than the retention, cannot get back. Counted for alerts, once:
            // the position past them is stored first (`Resume::lost`).
            warn!(
                partition,
                next,
                low,
                lost = low - next,
                "records after the stored position were deleted by retention before they were projected; reading from the oldest record left (counted in touchline_projector_records_lost_to_retention_total)"
            );
        }
        return Ok(Some(Resume {
            fetch_from: low,
            next: low,
            lost: (low - next).cast_unsigned(),
        }));
    }
    if position.last_fingerprint == touchline_core::NO_RECORD_FINGERPRINT {
        // Stored past records retention deleted (`Resume::lost`), at the oldest offset then: the
        // same log's oldest offset never falls below it again, so this is another log.
        warn!(
            partition,
            next,
            low,
            "the stored position was past deleted records, and the broker's oldest record is now before it: a new broker or topic, reading it from the beginning"
        );
        return Ok(None);
    }
    // A probe that timed out proves nothing (a slow broker, a leader moving): asked again before
    // the partition is read from the beginning, which costs a whole partition's re-read.
    let mut found = find(kafka, topic, partition, next - 1, (low, high))?;
    for attempt in 2..=PROBE_ATTEMPTS {
        if !matches!(found, Probe::TimedOut) {
            break;
        }
        warn!(
            partition,
            next, attempt, "the stored position could not be verified in time: asking again"
        );
        found = find(kafka, topic, partition, next - 1, (low, high))?;
    }
    match found {
        Probe::Read {
            fingerprint: read,
            first,
        } => {
            if read == position.last_fingerprint {
                // Fetch from where the probe could (the verified record, or the start of its
                // batch): the records before the position are skipped once read.
                return Ok(Some(Resume {
                    fetch_from: first,
                    next,
                    lost: 0,
                }));
            }
            warn!(
                partition,
                offset = next - 1,
                "the record before the stored position is not the one projected: a new broker or topic, reading it from the beginning"
            );
        }
        Probe::StartsAfter | Probe::Missing { .. } | Probe::Ends => warn!(
            partition,
            offset = next - 1,
            "the record before the stored position is gone: reading the partition from the beginning"
        ),
        Probe::Failed(error) => {
            warn!(partition, next, %error, "the record before the stored position cannot be read (a new broker or topic?): reading the partition from the beginning");
        }
        Probe::TimedOut => warn!(
            partition,
            next,
            "the stored position could not be verified in time: reading the partition from the beginning"
        ),
    }
    Ok(None)
}

/// Reads the record at `target` from the latest start at or before it that the broker can fetch
/// from. Kafka fetches from any offset; Tansu 0.6 only from the start of a record batch (asked for
/// the middle of one, it answers from the next batch): then earlier starts are tried, each twice
/// as far back, down to the low watermark, so that the record is found reading at most about two
/// batches. The search starts at most at `high - 1`: Tansu's high watermark is the base offset of
/// its last batch plus one, so a record in the last batch (a caught-up partition's last record)
/// is read from that batch's start; on Kafka every record is below the high watermark anyway.
///
/// # Errors
/// When a probing consumer cannot be made.
pub(crate) fn find(
    kafka: &KafkaOptions,
    topic: &str,
    partition: i32,
    target: i64,
    (low, high): (i64, i64),
) -> Result<Probe> {
    let low = low.max(0);
    let first_start = if high > low {
        target.min(high - 1)
    } else {
        target
    };
    let mut back = 0_i64;
    loop {
        let start = first_start.saturating_sub(back).max(low);
        match probe(kafka, topic, partition, start, target, high)? {
            Probe::StartsAfter if start > low => back = back.saturating_mul(2).max(1),
            found => return Ok(found),
        }
    }
}

/// What reading a partition from `start` told of the record at `target`.
pub(crate) enum Probe {
    /// Read: its fingerprint, and the first offset the fetch answered with.
    Read {
        fingerprint: u64,
        first: i64,
    },
    /// The fetch answered from after `target` (the start is inside a batch that holds it, on a
    /// broker that fetches only from batch starts).
    StartsAfter,
    /// Records before and after `target`, but not it: `first` is the first offset the fetch
    /// answered with (fetchable, before `target`).
    Missing {
        first: i64,
    },
    /// The partition ends before `target`: no such record (yet).
    Ends,
    Failed(KafkaError),
    TimedOut,
}

/// Reads the partition from `start` until the record at `target`, with a consumer of its own.
/// Past the high watermark `high`, a poll that brings nothing means the partition's end (Tansu
/// 0.6 serves records past its high watermark, the rest of its last batch, and then never says
/// that the partition ended).
fn probe(
    kafka: &KafkaOptions,
    topic: &str,
    partition: i32,
    start: i64,
    target: i64,
    high: i64,
) -> Result<Probe> {
    let probe: BaseConsumer = kafka
        .consumer_config()
        .set("auto.offset.reset", "error")
        .set("enable.auto.commit", "false")
        // The partition's end before `target`: the record is not there (yet), said at once
        // rather than at the deadline. (Tansu 0.6 may not say it: its high watermark is behind
        // the records it serves.)
        .set("enable.partition.eof", "true")
        .create()?;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, Offset::Offset(start))?;
    probe.assign(&list)?;
    let mut first = None;
    let mut last = None;
    let deadline = std::time::Instant::now() + METADATA_TIMEOUT;
    while std::time::Instant::now() < deadline {
        match probe.poll(Duration::from_millis(200)) {
            Some(Ok(message)) if message.partition() == partition => {
                let offset = message.offset();
                last = Some(offset);
                let first = *first.get_or_insert(offset);
                if offset == target {
                    return Ok(Probe::Read {
                        fingerprint: fingerprint(message.payload()),
                        first,
                    });
                }
                if offset > target {
                    return Ok(if first == offset {
                        Probe::StartsAfter
                    } else {
                        Probe::Missing { first }
                    });
                }
            }
            Some(Err(KafkaError::PartitionEOF(at))) if at == partition => {
                return Ok(Probe::Ends);
            }
            None if last.is_some_and(|last| last.saturating_add(1) >= high) => {
                return Ok(Probe::Ends);
            }
            Some(Ok(_) | Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(error)) => return Ok(Probe::Failed(error)),
        }
    }
    Ok(Probe::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skipping(fetch_from: i64, next: i64) -> Rereads {
        let mut rereads = Rereads::default();
        rereads.insert(
            0,
            Resume {
                fetch_from,
                next,
                lost: 0,
            },
        );
        rereads
    }

    #[test]
    fn the_records_before_the_resume_point_are_dropped_once_in_order() {
        let mut rereads = skipping(95, 100);
        for offset in 95..100 {
            assert!(
                rereads.drop_reread(0, offset),
                "{offset} was applied before"
            );
        }
        assert!(!rereads.drop_reread(0, 100), "the resume point is applied");
        // The skip is over: a record read again later (a rewind) is applied, not dropped.
        assert!(!rereads.drop_reread(0, 99));
        // Other partitions have no skip.
        assert!(!rereads.drop_reread(1, 5));
    }

    /// The broker's log was reset while the node ran (a wiped broker that kept its cluster id):
    /// librdkafka fetches from the earliest offset, and new records below the resume point are
    /// applied, not dropped unseen (before, every record below it was dropped until one at or
    /// past it came).
    #[test]
    fn a_rewind_ends_the_skip() {
        let mut rereads = skipping(95, 100);
        assert!(rereads.drop_reread(0, 95));
        assert!(rereads.drop_reread(0, 96));
        assert!(!rereads.drop_reread(0, 0), "went back: a new record");
        assert!(!rereads.drop_reread(0, 1));
        assert!(!rereads.drop_reread(0, 97), "the skip is over");

        // Reset before any record was read again: below where the fetch started.
        let mut rereads = skipping(95, 100);
        assert!(!rereads.drop_reread(0, 3));
        assert!(!rereads.drop_reread(0, 96));

        // The same offset twice is not in order either.
        let mut rereads = skipping(95, 100);
        assert!(rereads.drop_reread(0, 97));
        assert!(!rereads.drop_reread(0, 97));
    }
}
