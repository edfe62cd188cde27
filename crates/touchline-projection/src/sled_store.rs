//! The sled implementation of [`EventStore`]: the append-only event log, the dedupe index, the
//! timeline and summary projections, dead letters and consumer positions, each a tree of one sled
//! database, written together in one atomic batch per consumed batch.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use touchline_core::{
    ApplyOutcome, ConsumedRecord, CustomerId, CustomerSummary, EventStore, LogPosition,
    RecordContent, StoreError, StoredPosition, StreamIdentity, TimelineEntry, TimelinePage,
    TimelineQuery, UnixNanos, apply_summary,
};

use crate::error::backend;
use crate::keys;
use crate::table::Table;

/// The most timeline entries one page request reads. A selective filter on a long timeline
/// returns a short (even empty) page with a cursor rather than scanning without bound.
pub const MAX_SCAN_PER_PAGE: usize = 10_000;

const NEXT_SEQUENCE: &[u8] = b"next_sequence";
const NEXT_DEAD_LETTER: &[u8] = b"next_dead_letter";

/// A Kafka record that could not be decoded, kept with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub stream: String,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub dead_lettered_at: UnixNanos,
}

/// Counters that only the single writer advances; kept in memory, persisted with each batch.
#[derive(Debug)]
struct WriterState {
    next_sequence: u64,
    next_dead_letter: u64,
}

/// The event log and projections in one sled database, one tree, one table (key prefix) each.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    log: Table,
    dedupe: Table,
    timeline: Table,
    summary: Table,
    positions: Table,
    dead_letters: Table,
    meta: Table,
    writer: Mutex<WriterState>,
    /// Events in the log and dead letters, readable without waiting for the writer.
    log_count: AtomicU64,
    dead_letter_count: AtomicU64,
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(backend)
}

fn decode<'a, T: Deserialize<'a>>(
    what: &'static str,
    key: &[u8],
    bytes: &'a [u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|error| StoreError::Corrupt {
        what,
        key: format!("{key:02x?}"),
        reason: error.to_string(),
    })
}

fn read_u64(what: &'static str, key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        what,
        key: format!("{key:02x?}"),
        reason: format!("expected 8 bytes, found {}", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(array))
}

/// The log's value layout: partition (4 bytes BE), offset (8 bytes BE), then the Kafka record's
/// value exactly as consumed. The log keeps the original bytes: it is the system of record.
fn log_value(partition: i32, offset: i64, raw: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(12 + raw.len());
    value.extend_from_slice(&partition.to_be_bytes());
    value.extend_from_slice(&offset.to_be_bytes());
    value.extend_from_slice(raw);
    value
}

impl SledStore {
    /// Opens (or creates) the store in `path`.
    ///
    /// # Errors
    /// When sled cannot open the folder or a stored counter is corrupt.
    pub fn open(path: &Path) -> crate::Result<Self> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(256 * 1024 * 1024)
            .open()
            .map_err(|source| crate::Error::OpenStore {
                path: path.display().to_string(),
                source,
            })?;
        Self::from_db(db)
    }

    /// Opens the store's trees. Private: two stores on one database would be two writers.
    ///
    /// # Errors
    /// When a tree cannot be opened or a stored counter is corrupt.
    fn from_db(db: sled::Db) -> crate::Result<Self> {
        let tree = db.open_tree("touchline").map_err(backend)?;
        let table = |prefix: u8| Table::new(tree.clone(), prefix);
        let meta = table(b'M');
        let counter = |key: &[u8]| -> Result<u64, StoreError> {
            match meta.get(key).map_err(backend)? {
                Some(bytes) => read_u64("counter", key, &bytes),
                None => Ok(1),
            }
        };
        let writer = WriterState {
            next_sequence: counter(NEXT_SEQUENCE)?,
            next_dead_letter: counter(NEXT_DEAD_LETTER)?,
        };
        Ok(Self {
            log: table(b'L'),
            dedupe: table(b'D'),
            timeline: table(b'T'),
            summary: table(b'S'),
            positions: table(b'P'),
            dead_letters: table(b'X'),
            meta,
            log_count: AtomicU64::new(writer.next_sequence - 1),
            dead_letter_count: AtomicU64::new(writer.next_dead_letter - 1),
            writer: Mutex::new(writer),
            tree,
            db,
        })
    }

    /// Events in the log.
    #[must_use]
    pub fn log_len(&self) -> usize {
        usize::try_from(self.log_count.load(Ordering::Acquire)).unwrap_or(usize::MAX)
    }

    /// Records in the dead-letter store.
    #[must_use]
    pub fn dead_letter_count(&self) -> usize {
        usize::try_from(self.dead_letter_count.load(Ordering::Acquire)).unwrap_or(usize::MAX)
    }

    /// The oldest `limit` dead letters.
    ///
    /// # Errors
    /// When the backend fails or a dead letter is corrupt.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead_letters
            .scan_prefix(&[])
            .take(limit)
            .map(|item| {
                let (key, value) = item.map_err(backend)?;
                decode("dead letter", &key, &value)
            })
            .collect()
    }

    /// Bytes the database takes on disk.
    ///
    /// # Errors
    /// When the backend cannot tell.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(backend)
    }

    /// Reads the event stored under `sequence` in the log: (partition, offset, raw record value).
    ///
    /// # Errors
    /// When the backend fails or the log value is shorter than its header.
    pub fn log_record(&self, sequence: u64) -> Result<Option<(i32, i64, Vec<u8>)>, StoreError> {
        let key = sequence.to_be_bytes();
        let Some(value) = self.log.get(key).map_err(backend)? else {
            return Ok(None);
        };
        let corrupt = || StoreError::Corrupt {
            what: "log record",
            key: sequence.to_string(),
            reason: "shorter than its 12-byte header".to_owned(),
        };
        let partition = i32::from_be_bytes(
            value
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(corrupt)?,
        );
        let offset = i64::from_be_bytes(
            value
                .get(4..12)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(corrupt)?,
        );
        Ok(Some((partition, offset, value[12..].to_vec())))
    }

    fn load_summary(&self, customer: &CustomerId) -> Result<Option<CustomerSummary>, StoreError> {
        self.summary
            .get(customer.as_str())
            .map_err(backend)?
            .map(|bytes| decode("summary", customer.as_str().as_bytes(), &bytes))
            .transpose()
    }
}

impl EventStore for SledStore {
    fn apply(
        &self,
        stream: &StreamIdentity,
        records: Vec<ConsumedRecord>,
    ) -> Result<ApplyOutcome, StoreError> {
        // One writer at a time: the dedupe reads below and the counters are only consistent with
        // the transaction because nobody else writes in between.
        let mut writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stream_key = stream.key();
        let now = UnixNanos::now();
        let mut pending = sled::Batch::default();
        let mut outcome = ApplyOutcome::default();
        let mut seen_in_batch: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut summaries: HashMap<CustomerId, Option<CustomerSummary>> = HashMap::new();
        let mut next_sequence = writer.next_sequence;
        let mut next_dead_letter = writer.next_dead_letter;
        let mut last_fingerprints: BTreeMap<i32, (i64, u64)> = BTreeMap::new();

        for record in records {
            let after = record.offset.saturating_add(1);
            let next_offset = outcome
                .next_offsets
                .entry(record.partition)
                .or_insert(after);
            *next_offset = (*next_offset).max(after);
            let fingerprint = record.content.fingerprint();
            let last = last_fingerprints
                .entry(record.partition)
                .or_insert((record.offset, fingerprint));
            if record.offset >= last.0 {
                *last = (record.offset, fingerprint);
            }
            match record.content {
                RecordContent::Event { envelope, raw } => {
                    let dedupe_key =
                        keys::dedupe(&envelope.partner_id, &envelope.touchpoint.event_id);
                    if seen_in_batch.contains_key(&dedupe_key)
                        || self.dedupe.contains_key(&dedupe_key).map_err(backend)?
                    {
                        outcome.duplicates += 1;
                        continue;
                    }
                    let sequence = next_sequence;
                    next_sequence += 1;
                    let position = LogPosition {
                        partition: record.partition,
                        offset: record.offset,
                        sequence,
                    };
                    let entry = TimelineEntry::new(*envelope, position);
                    let customer = entry.touchpoint.customer_id.clone();
                    self.log.insert(
                        &mut pending,
                        sequence.to_be_bytes(),
                        log_value(record.partition, record.offset, &raw),
                    );
                    self.dedupe.insert(
                        &mut pending,
                        dedupe_key.as_slice(),
                        &sequence.to_be_bytes(),
                    );
                    self.timeline.insert(
                        &mut pending,
                        keys::timeline(&customer, entry.touchpoint.occurred_at, sequence),
                        encode(&entry)?,
                    );
                    let summary = match summaries.remove(&customer) {
                        Some(cached) => cached,
                        None => self.load_summary(&customer)?,
                    };
                    summaries.insert(customer, Some(apply_summary(summary, &entry)));
                    seen_in_batch.insert(dedupe_key, sequence);
                    outcome.appended += 1;
                }
                RecordContent::Undecodable { reason, key, value } => {
                    let id = next_dead_letter;
                    next_dead_letter += 1;
                    let dead_letter = DeadLetter {
                        id,
                        stream: stream_key.clone(),
                        partition: record.partition,
                        offset: record.offset,
                        reason,
                        key,
                        value,
                        dead_lettered_at: now,
                    };
                    self.dead_letters
                        .insert(&mut pending, id.to_be_bytes(), encode(&dead_letter)?);
                    outcome.dead_lettered += 1;
                }
            }
        }
        for (customer, summary) in &summaries {
            if let Some(summary) = summary {
                self.summary
                    .insert(&mut pending, customer.as_str(), encode(summary)?);
            }
        }
        for (partition, next_offset) in &outcome.next_offsets {
            let last_fingerprint = last_fingerprints
                .get(partition)
                .map_or(0, |(_, fingerprint)| *fingerprint);
            let mut value = next_offset.to_be_bytes().to_vec();
            value.extend_from_slice(&last_fingerprint.to_be_bytes());
            self.positions
                .insert(&mut pending, keys::position(&stream_key, *partition), value);
        }
        self.meta
            .insert(&mut pending, NEXT_SEQUENCE, &next_sequence.to_be_bytes());
        self.meta.insert(
            &mut pending,
            NEXT_DEAD_LETTER,
            &next_dead_letter.to_be_bytes(),
        );

        // One tree, one batch: atomic (invariant 6).
        self.tree.apply_batch(pending).map_err(backend)?;
        writer.next_sequence = next_sequence;
        writer.next_dead_letter = next_dead_letter;
        self.log_count.store(next_sequence - 1, Ordering::Release);
        self.dead_letter_count
            .store(next_dead_letter - 1, Ordering::Release);
        Ok(outcome)
    }

    fn positions(
        &self,
        stream: &StreamIdentity,
    ) -> Result<BTreeMap<i32, StoredPosition>, StoreError> {
        let prefix = keys::position_prefix(&stream.key());
        self.positions
            .scan_prefix(&prefix)
            .map(|item| {
                let (key, value) = item.map_err(backend)?;
                let partition_bytes: [u8; 4] =
                    key[prefix.len()..]
                        .try_into()
                        .map_err(|_| StoreError::Corrupt {
                            what: "position key",
                            key: format!("{key:02x?}"),
                            reason: "partition is not 4 bytes".to_owned(),
                        })?;
                let mut ordered = [0x80, 0, 0, 0, 0, 0, 0, 0];
                ordered[4..].copy_from_slice(&partition_bytes);
                let partition = i32::try_from(keys::from_ordered_i64(ordered)).unwrap_or_default();
                let next_offset =
                    read_u64("position", &key, value.get(..8).unwrap_or_default())?.cast_signed();
                let last_fingerprint =
                    read_u64("position", &key, value.get(8..).unwrap_or_default())?;
                Ok((
                    partition,
                    StoredPosition {
                        next_offset,
                        last_fingerprint,
                    },
                ))
            })
            .collect()
    }

    fn timeline(&self, query: &TimelineQuery) -> Result<TimelinePage, StoreError> {
        use std::ops::Bound::{Excluded, Included};
        let customer = &query.customer_id;
        let start = match (query.after, query.filter.from) {
            (Some(after), from) if from.is_none_or(|from| after.occurred_at >= from) => {
                Excluded(keys::timeline(customer, after.occurred_at, after.sequence))
            }
            (_, Some(from)) => Included(keys::timeline(customer, from, 0)),
            (_, None) => Included(keys::customer_prefix(customer)),
        };
        let end = match query.filter.to {
            Some(to) => Excluded(keys::timeline(customer, to, 0)),
            None => Included(keys::timeline(customer, UnixNanos(i64::MAX), u64::MAX)),
        };
        let empty_range = match (&start, &end) {
            (Included(start) | Excluded(start), Excluded(end)) => start >= end,
            (Included(start) | Excluded(start), Included(end)) => start > end,
            _ => false,
        };
        if empty_range {
            return Ok(TimelinePage::default());
        }
        let mut page = TimelinePage::default();
        let mut last_scanned = None;
        for (scanned, item) in self.timeline.range(start, end).enumerate() {
            let (key, value) = item.map_err(backend)?;
            if scanned >= MAX_SCAN_PER_PAGE {
                page.next = last_scanned;
                return Ok(page);
            }
            last_scanned = keys::timeline_cursor(&key);
            let entry: TimelineEntry = decode("timeline entry", &key, &value)?;
            if !query.filter.matches(&entry) {
                continue;
            }
            if page.entries.len() == query.page_size {
                // One more match exists: the page is full and there is a next one.
                page.next = page
                    .entries
                    .last()
                    .map(|last| touchline_core::TimelineCursor {
                        occurred_at: last.touchpoint.occurred_at,
                        sequence: last.position.sequence,
                    });
                return Ok(page);
            }
            page.entries.push(entry);
        }
        Ok(page)
    }

    fn summary(&self, customer_id: &CustomerId) -> Result<Option<CustomerSummary>, StoreError> {
        self.load_summary(customer_id)
    }

    fn contains_event(
        &self,
        partner: &touchline_core::PartnerId,
        event_id: &touchline_core::EventId,
    ) -> Result<bool, StoreError> {
        self.dedupe
            .contains_key(keys::dedupe(partner, event_id))
            .map_err(backend)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(backend)
    }
}
