//! The event log's layout (store format 4): chunks of consecutive events, one sled key per atomic
//! write, keyed by the chunk's first log sequence.
//!
//! sled 0.34 copies a leaf (up to 16 entries) on every insert and splits leaves every few inserts:
//! its cost is per key, and a log key per event made the log the most expensive of the four keys
//! an event writes (its values are the largest). One chunk per write of up to
//! [`RECORDS_PER_WRITE`](super::RECORDS_PER_WRITE) events costs one insert instead (BENCHMARKS.md).
//!
//! A chunk's value is its events one after the other, each as partition (4 bytes BE), offset
//! (8 bytes BE), length of the record (4 bytes BE), then the Kafka record's value exactly as
//! consumed: the log keeps the original bytes, it is the system of record. The events of a chunk
//! have consecutive sequences from the chunk's key.

use std::ops::Bound::{Excluded, Included, Unbounded};

use sha2::{Digest as _, Sha256};
use touchline_core::{LogPosition, StoreError, TimelineEntry};

use super::{Checksum, read_u64};
use crate::error::backend;
use crate::table::Table;

/// The log's table prefix since format 4.
pub(super) const PREFIX: &[u8] = b"C";
/// The table of format 3: one key per event (sequence), value partition, offset, record.
pub(super) const FORMAT_3_PREFIX: &[u8] = b"L";

/// Events moved per atomic batch when a format 3 log is rewritten into chunks.
const MIGRATE_BATCH: usize = 256;

const HEADER: usize = 16;

/// One event of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LogRecord<'a> {
    pub(super) sequence: u64,
    pub(super) partition: i32,
    pub(super) offset: i64,
    /// The Kafka record's value as consumed.
    pub(super) raw: &'a [u8],
}

impl LogRecord<'_> {
    /// The timeline entry of this event, as the projector made it: what rebuilds fold and a
    /// resumed watch reads.
    ///
    /// # Errors
    /// When the stored record is not an envelope (the log holds only decoded events: corrupt).
    pub(super) fn entry(&self) -> Result<TimelineEntry, StoreError> {
        let envelope = touchline_proto::decode_envelope(Some(self.raw)).map_err(|error| {
            StoreError::Corrupt {
                what: "log record",
                key: self.sequence.to_string(),
                reason: error.to_string(),
            }
        })?;
        Ok(TimelineEntry::new(
            envelope,
            LogPosition {
                partition: self.partition,
                offset: self.offset,
                sequence: self.sequence,
            },
        ))
    }
}

/// The events of one write, as they are appended.
#[derive(Debug, Default)]
pub(super) struct Chunk {
    first: u64,
    count: u64,
    value: Vec<u8>,
}

impl Chunk {
    /// Adds the event with the next sequence of the chunk (the first one sets it).
    pub(super) fn push(&mut self, record: LogRecord<'_>) {
        debug_assert!(self.count == 0 || record.sequence == self.first + self.count);
        if self.count == 0 {
            self.first = record.sequence;
        }
        self.count += 1;
        self.value
            .extend_from_slice(&record.partition.to_be_bytes());
        self.value.extend_from_slice(&record.offset.to_be_bytes());
        let length = u32::try_from(record.raw.len()).unwrap_or(u32::MAX);
        self.value.extend_from_slice(&length.to_be_bytes());
        self.value.extend_from_slice(record.raw);
    }

    /// The sequence the next event must have to join this chunk.
    fn next_sequence(&self) -> Option<u64> {
        (self.count > 0).then(|| self.first + self.count)
    }

    /// Adds the chunk's insert to `batch`; one write (none for an empty chunk).
    pub(super) fn write(self, log: &Table, batch: &mut sled::Batch) -> usize {
        if self.count == 0 {
            return 0;
        }
        log.insert(batch, self.first.to_be_bytes(), self.value);
        1
    }
}

/// The events of a stored chunk.
fn records(first: u64, value: &[u8]) -> impl Iterator<Item = Result<LogRecord<'_>, StoreError>> {
    let mut rest = value;
    let mut sequence = first;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let corrupt = |reason: &str| StoreError::Corrupt {
            what: "log chunk",
            key: first.to_string(),
            reason: format!("event {sequence}: {reason}"),
        };
        let Some((header, tail)) = rest.split_at_checked(HEADER) else {
            rest = &[];
            return Some(Err(corrupt("shorter than its 16-byte header")));
        };
        let partition = i32::from_be_bytes(header[..4].try_into().unwrap_or_default());
        let offset = i64::from_be_bytes(header[4..12].try_into().unwrap_or_default());
        let length = u32::from_be_bytes(header[12..].try_into().unwrap_or_default());
        let Some((raw, after)) = usize::try_from(length)
            .ok()
            .and_then(|length| tail.split_at_checked(length))
        else {
            rest = &[];
            return Some(Err(corrupt("shorter than its stated length")));
        };
        rest = after;
        let record = LogRecord {
            sequence,
            partition,
            offset,
            raw,
        };
        sequence += 1;
        Some(Ok(record))
    })
}

/// The key of the chunk that holds `sequence`, if any chunk starts at or before it.
fn chunk_at(log: &Table, sequence: u64) -> Result<Option<Vec<u8>>, StoreError> {
    log.range(Unbounded, Included(sequence.to_be_bytes().to_vec()))
        .next_back()
        .transpose()
        .map_err(backend)
        .map(|found| found.map(|(key, _)| key))
}

/// Calls `each` with every event whose sequence is in `from..end`, in log order.
///
/// # Errors
/// When the backend fails, a chunk is corrupt, or `each` fails.
pub(super) fn for_each(
    log: &Table,
    from: u64,
    end: u64,
    mut each: impl FnMut(LogRecord<'_>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for_each_while(log, from, end, |record| each(record).map(|()| true))
}

/// [`for_each`] until `each` returns `false`.
///
/// # Errors
/// When the backend fails, a chunk is corrupt, or `each` fails.
pub(super) fn for_each_while(
    log: &Table,
    from: u64,
    end: u64,
    mut each: impl FnMut(LogRecord<'_>) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    if from >= end {
        return Ok(());
    }
    let start = chunk_at(log, from)?.unwrap_or_else(|| from.to_be_bytes().to_vec());
    for item in log.range(Included(start), Excluded(end.to_be_bytes().to_vec())) {
        let (key, value) = item.map_err(backend)?;
        let first = read_u64("log chunk key", &key, &key)?;
        for record in records(first, &value) {
            let record = record?;
            if record.sequence >= end {
                return Ok(());
            }
            if record.sequence >= from && !each(record)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The event stored under `sequence`: (partition, offset, raw record value).
///
/// # Errors
/// When the backend fails or its chunk is corrupt.
pub(super) fn get(log: &Table, sequence: u64) -> Result<Option<(i32, i64, Vec<u8>)>, StoreError> {
    let mut found = None;
    for_each(log, sequence, sequence.saturating_add(1), |record| {
        found = Some((record.partition, record.offset, record.raw.to_vec()));
        Ok(())
    })?;
    Ok(found)
}

/// The checksum of the log's events through sequence `through`, independent of how they are
/// chunked: each event hashed as format 3 stored it (sequence; partition, offset and record), so
/// that stores written in different batches, or before and after the format changed, compare
/// equal.
///
/// # Errors
/// When the backend fails or a chunk is corrupt.
pub(super) fn checksum(log: &Table, through: u64) -> Result<Checksum, StoreError> {
    let mut hasher = LogHasher::default();
    for_each(log, 0, through.saturating_add(1), |record| {
        hasher.add(&record);
        Ok(())
    })?;
    Ok(hasher.finish())
}

/// The log's checksum (what `verify` reports for the log) of events given in log order from the
/// first: of a store's log, or of a backup's events without a store.
#[derive(Debug, Default)]
pub struct LogHasher {
    hasher: Sha256,
    entries: u64,
}

impl LogHasher {
    pub(super) fn add(&mut self, record: &LogRecord<'_>) {
        self.add_event(record.sequence, record.partition, record.offset, record.raw);
    }

    /// Adds the event of log sequence `sequence` (the next one), stored from `partition` at
    /// `offset` with the record `raw`.
    pub fn add_event(&mut self, sequence: u64, partition: i32, offset: i64, raw: &[u8]) {
        self.hasher.update(8_u64.to_be_bytes());
        self.hasher.update(sequence.to_be_bytes());
        self.hasher.update(((12 + raw.len()) as u64).to_be_bytes());
        self.hasher.update(partition.to_be_bytes());
        self.hasher.update(offset.to_be_bytes());
        self.hasher.update(raw);
        self.entries += 1;
    }

    /// The checksum of the events added.
    #[must_use]
    pub fn finish(self) -> Checksum {
        Checksum {
            entries: self.entries,
            sha256: hex::encode(self.hasher.finalize()),
        }
    }
}

/// Rewrites a format 3 log (one key per event) into chunks, in atomic batches that each move
/// events from the old table to the new one, so that an interrupted migration goes on where it
/// stopped. Returns the events moved.
///
/// # Errors
/// When the backend fails or an old log value is corrupt.
pub(super) fn migrate_format_3(tree: &sled::Tree) -> Result<u64, StoreError> {
    let old = Table::new(tree.clone(), FORMAT_3_PREFIX);
    let new = Table::new(tree.clone(), PREFIX);
    let mut moved = 0;
    loop {
        let mut batch = sled::Batch::default();
        let mut writes = 0;
        let mut chunk = Chunk::default();
        let mut in_batch = 0;
        for item in old.range(Unbounded, Unbounded).take(MIGRATE_BATCH) {
            let (key, value) = item.map_err(backend)?;
            let sequence = read_u64("log key", &key, &key)?;
            let (partition, offset, raw) = split_format_3(sequence, &value)?;
            if chunk
                .next_sequence()
                .is_some_and(|next| next != sequence || chunk.count >= CHUNK_EVENTS)
            {
                writes += std::mem::take(&mut chunk).write(&new, &mut batch);
            }
            chunk.push(LogRecord {
                sequence,
                partition,
                offset,
                raw,
            });
            old.remove(&mut batch, &key);
            writes += 1;
            in_batch += 1;
        }
        if in_batch == 0 {
            return Ok(moved);
        }
        writes += chunk.write(&new, &mut batch);
        crate::garbage::apply_batch(tree, batch, writes).map_err(backend)?;
        moved += in_batch;
    }
}

/// Events per chunk when a format 3 log is migrated: as the projector writes them.
const CHUNK_EVENTS: u64 = super::RECORDS_PER_WRITE as u64;

/// Splits a format 3 log value into partition, offset and the raw record value.
fn split_format_3(sequence: u64, value: &[u8]) -> Result<(i32, i64, &[u8]), StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: "log record",
        key: sequence.to_string(),
        reason: "shorter than its 12-byte header".to_owned(),
    };
    let (header, raw) = value.split_at_checked(12).ok_or_else(corrupt)?;
    let partition = i32::from_be_bytes(header[..4].try_into().map_err(|_| corrupt())?);
    let offset = i64::from_be_bytes(header[4..].try_into().map_err(|_| corrupt())?);
    Ok((partition, offset, raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sequence: u64, raw: &[u8]) -> LogRecord<'_> {
        LogRecord {
            sequence,
            partition: i32::try_from(sequence % 3).unwrap_or_default(),
            offset: i64::try_from(sequence * 10).unwrap_or_default(),
            raw,
        }
    }

    fn log() -> (tempfile::TempDir, sled::Tree, Table) {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        let tree = db.open_tree("t").expect("tree");
        let table = Table::new(tree.clone(), PREFIX);
        (dir, tree, table)
    }

    #[test]
    fn events_are_read_back_by_sequence_and_range_across_chunks() {
        let (_dir, tree, table) = log();
        let raws: Vec<Vec<u8>> = (0..10_u8).map(|i| vec![i; usize::from(i)]).collect();
        // Chunks of 1..=4 events: sequences 1..=10.
        let mut sequence = 1;
        for size in [1, 2, 3, 4] {
            let mut batch = sled::Batch::default();
            let mut chunk = Chunk::default();
            for _ in 0..size {
                chunk.push(record(
                    sequence,
                    &raws[usize::try_from(sequence - 1).expect("small")],
                ));
                sequence += 1;
            }
            chunk.write(&table, &mut batch);
            tree.apply_batch(batch).expect("apply");
        }
        for sequence in 1..=10 {
            let (partition, offset, raw) = get(&table, sequence).expect("read").expect("stored");
            let expected = record(
                sequence,
                &raws[usize::try_from(sequence - 1).expect("small")],
            );
            assert_eq!((partition, offset), (expected.partition, expected.offset));
            assert_eq!(raw, expected.raw, "event {sequence}");
        }
        assert_eq!(get(&table, 0).expect("read"), None);
        assert_eq!(get(&table, 11).expect("read"), None);
        let mut seen = Vec::new();
        for_each(&table, 3, 9, |record| {
            seen.push(record.sequence);
            Ok(())
        })
        .expect("range");
        assert_eq!(seen, (3..9).collect::<Vec<_>>());
    }

    #[test]
    fn a_truncated_chunk_is_reported_corrupt_not_misread() {
        let (_dir, tree, table) = log();
        let mut chunk = Chunk::default();
        chunk.push(record(1, b"abc"));
        let mut value = chunk.value.clone();
        value.truncate(value.len() - 1);
        tree.insert([PREFIX, &1_u64.to_be_bytes()].concat(), value)
            .expect("insert");
        assert!(matches!(
            get(&table, 1),
            Err(StoreError::Corrupt {
                what: "log chunk",
                ..
            })
        ));
    }

    #[test]
    fn a_format_3_log_is_moved_into_chunks_with_the_same_checksum() {
        let (_dir, tree, table) = log();
        let old = Table::new(tree.clone(), FORMAT_3_PREFIX);
        let mut old_hasher = Sha256::new();
        let count = 600_u64;
        for sequence in 1..=count {
            let raw = sequence.to_le_bytes();
            let expected = record(sequence, &raw);
            let mut value = expected.partition.to_be_bytes().to_vec();
            value.extend_from_slice(&expected.offset.to_be_bytes());
            value.extend_from_slice(&raw);
            old_hasher.update(8_u64.to_be_bytes());
            old_hasher.update(sequence.to_be_bytes());
            old_hasher.update((value.len() as u64).to_be_bytes());
            old_hasher.update(&value);
            old.insert_now(sequence.to_be_bytes(), value)
                .expect("insert");
        }
        assert_eq!(migrate_format_3(&tree).expect("migrate"), count);
        assert_eq!(old.range(Unbounded, Unbounded).count(), 0, "old keys gone");
        let checksum = checksum(&table, u64::MAX).expect("checksum");
        assert_eq!(checksum.entries, count);
        assert_eq!(checksum.sha256, hex::encode(old_hasher.finalize()));
        let (_, _, raw) = get(&table, 457).expect("read").expect("stored");
        assert_eq!(raw, 457_u64.to_le_bytes());
        assert_eq!(migrate_format_3(&tree).expect("again"), 0, "nothing left");
    }
}
