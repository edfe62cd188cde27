//! Backups of the system of record and their restore: the log, the consumer positions stored
//! with it, and the dead letters (with the index of every record ever dead-lettered). Projections
//! are not backed up: a restore folds them from the log as the projector did (invariant 5).
//!
//! A backup is taken at one point of the log: the positions and the index of dead-lettered
//! records are read under the writer (they change with every write); the dead letters after it,
//! page by page, while requeues and discards wait (new ones get later ids); the log's events up
//! to that point after it (the log only grows).

use std::sync::atomic::Ordering;

use touchline_core::{
    ConsumedRecord, EventStore as _, RecordContent, StoreError, StoredPosition, UnixNanos,
    fingerprint,
};

use super::log::LogHasher;
use super::{
    Checksum, DEAD_LETTER_COUNT, DeadLetter, NEXT_DEAD_LETTER, SledStore, encode, lock, log,
    read_u64_pair, u64_pair,
};
use crate::error::backend;
use crate::keys;
use crate::projector::parts_by_decoded_size;

/// The most events of a backup decoded and applied at once by [`SledStore::restore_events`] (so
/// that a duplicate is reported within a piece of them), besides the decoded size.
const RESTORE_PIECE: usize = 1000;

/// A consumer position as the store holds it: of a partition of a Kafka stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPosition {
    /// The stream's key (cluster id and topic).
    pub stream: String,
    pub partition: i32,
    pub position: StoredPosition,
}

/// A record once dead-lettered, by where it is: kept after its dead letter is requeued or
/// discarded, so that reading the record again does not make it a dead letter again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetteredRecord {
    pub stream: String,
    pub partition: i32,
    pub offset: i64,
    pub dead_letter_id: u64,
    /// [`touchline_core::fingerprint`] of the record's value.
    pub fingerprint: u64,
}

/// What a backup holds besides the log's events, read at one point of the log.
#[derive(Debug)]
pub struct BackupCut<'a> {
    /// Events in the log at that point: sequences 1 to this.
    pub events: u64,
    pub positions: Vec<StreamPosition>,
    pub dead_lettered_records: Vec<DeadLetteredRecord>,
    /// The dead letters at that point, read page by page ([`DeadLettersAtCut::next_page`]).
    pub dead_letters: DeadLettersAtCut<'a>,
    pub taken_at: UnixNanos,
}

/// A cut's dead letters, read after the cut without holding the writer: requeues and discards
/// are refused ([`crate::sled_store::OpsError::BackupReading`]) until this is dropped, and dead
/// letters made after the cut have ids from `next_dead_letter` on, so the pages are the dead
/// letters as they were at the cut.
#[derive(Debug)]
pub struct DeadLettersAtCut<'a> {
    store: &'a SledStore,
    /// How many there were at the cut.
    pub count: u64,
    /// The id the next dead letter gets: every later one is left out.
    pub next_dead_letter: u64,
    /// The last id read.
    after: u64,
}

impl DeadLettersAtCut<'_> {
    /// The next dead letters of the cut, up to about `max_bytes` of them (at least one), or an
    /// empty page once all are read.
    ///
    /// # Errors
    /// When the backend fails or a dead letter is corrupt.
    pub fn next_page(&mut self, max_bytes: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let page = self.store.dead_letters_between(
            self.after,
            self.next_dead_letter,
            usize::MAX,
            max_bytes,
            super::dead_letters::Damaged::Refused,
        )?;
        if let Some(last) = page.last() {
            self.after = last.id;
        }
        Ok(page)
    }
}

impl Drop for DeadLettersAtCut<'_> {
    fn drop(&mut self) {
        self.store
            .backup_readers
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One event of the log, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub partition: i32,
    pub offset: i64,
    /// The Kafka record's value as consumed.
    pub record: Vec<u8>,
}

/// Reads the log's events in order from the first, keeping the log's checksum of what it read.
#[derive(Debug)]
pub struct LogReader<'a> {
    store: &'a SledStore,
    next: u64,
    end: u64,
    hasher: LogHasher,
}

impl LogReader<'_> {
    /// The next events, in log order, until they hold about `max_bytes` of records (at least
    /// one), with the sequence of the first; `None` once every event up to the end was read.
    ///
    /// # Errors
    /// When the backend fails or a chunk is corrupt.
    pub fn next_events(
        &mut self,
        max_bytes: usize,
    ) -> Result<Option<(u64, Vec<LoggedEvent>)>, StoreError> {
        let first = self.next;
        let mut events = Vec::new();
        let mut bytes = 0;
        log::for_each_while(&self.store.log, self.next, self.end, |record| {
            if record.sequence != self.next {
                return Err(StoreError::Corrupt {
                    what: "log",
                    key: self.next.to_string(),
                    reason: format!("event {} is missing", self.next),
                });
            }
            self.hasher.add(&record);
            self.next += 1;
            bytes += record.raw.len();
            events.push(LoggedEvent {
                partition: record.partition,
                offset: record.offset,
                record: record.raw.to_vec(),
            });
            Ok(bytes < max_bytes)
        })?;
        if events.is_empty() && self.next < self.end {
            return Err(StoreError::Corrupt {
                what: "log",
                key: self.next.to_string(),
                reason: format!("event {} is missing", self.next),
            });
        }
        Ok((!events.is_empty()).then_some((first, events)))
    }

    /// The log's checksum through the last event read.
    #[must_use]
    pub fn checksum(self) -> Checksum {
        self.hasher.finish()
    }
}

/// The highest dead-letter id a restore takes (ids count up from 1; far below it, so that the
/// next id never overflows).
pub const MAX_DEAD_LETTER_ID: u64 = 1 << 62;

/// Why a backup cannot be restored into this store.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "the store is not empty ({events} events, {dead_letters} dead letters, records once dead-lettered: {dead_lettered}, positions: {positions}): a backup is restored only into an empty store"
    )]
    NotEmpty {
        events: u64,
        dead_letters: u64,
        /// Records once dead-lettered (their dead letters perhaps discarded since).
        dead_lettered: bool,
        positions: bool,
    },
    #[error(
        "the backup's events frame starts at sequence {found}, where {expected} comes next: the backup is damaged"
    )]
    Gap { expected: u64, found: u64 },
    #[error("the backup's event {sequence} is not an event ({reason}): the backup is damaged")]
    NotAnEvent { sequence: u64, reason: String },
    #[error(
        "the backup holds an event twice (by partner and event id) between sequences {first} and {last}: the backup is damaged"
    )]
    Duplicate { first: u64, last: u64 },
    #[error("the backup has dead letter {id} twice")]
    DeadLetterTwice { id: u64 },
    #[error("the backup is damaged: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SledStore {
    /// Positions and the record index, read under the writer, and the dead letters, read after it
    /// page by page while requeues and discards wait: they are what the log held when it had
    /// `events` events.
    ///
    /// # Errors
    /// When the backend fails or a stored value is corrupt.
    pub fn backup_cut(&self) -> Result<BackupCut<'_>, StoreError> {
        let mut writer = self.lock_writer();
        // Dead letters a backup before deferred taking off the list, whose events are in the log:
        // not copied as listed.
        self.settle_deferred_clears(&mut writer)?;
        let mut positions = Vec::new();
        for item in self.positions.scan_prefix(&[]) {
            let (key, value) = item.map_err(backend)?;
            let (stream, partition) =
                keys::parse_position(&key).ok_or_else(|| StoreError::Corrupt {
                    what: "position key",
                    key: format!("{key:02x?}"),
                    reason: "not a stream, a zero byte and a partition".to_owned(),
                })?;
            positions.push(StreamPosition {
                stream,
                partition,
                position: read_position(&key, &value)?,
            });
        }
        let mut dead_lettered_records = Vec::new();
        for item in self.dead_letter_index.scan_prefix(&[]) {
            let (key, value) = item.map_err(backend)?;
            let corrupt = |reason: &str| StoreError::Corrupt {
                what: "dead-letter index",
                key: format!("{key:02x?}"),
                reason: reason.to_owned(),
            };
            let (stream, partition, offset) =
                keys::parse_record(&key).ok_or_else(|| corrupt("not a record key"))?;
            let (dead_letter_id, fingerprint) = read_u64_pair("dead-letter index", &key, &value)?;
            dead_lettered_records.push(DeadLetteredRecord {
                stream,
                partition,
                offset,
                dead_letter_id,
                fingerprint,
            });
        }
        // Under the writer: no requeue or discard from here until the dead letters are read.
        self.backup_readers
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let dead_letters = DeadLettersAtCut {
            store: self,
            count: writer.dead_letters,
            next_dead_letter: writer.next_dead_letter,
            after: 0,
        };
        let events = writer.next_sequence.saturating_sub(1);
        drop(writer);
        // Durable before it leaves: what the backup holds is what this store keeps after a crash.
        self.flush()?;
        Ok(BackupCut {
            events,
            positions,
            dead_lettered_records,
            dead_letters,
            taken_at: UnixNanos::now(),
        })
    }

    /// A reader of the log's events from the first through `events`.
    #[must_use]
    pub fn read_log(&self, events: u64) -> LogReader<'_> {
        LogReader {
            store: self,
            next: 1,
            end: events.saturating_add(1),
            hasher: LogHasher::default(),
        }
    }

    /// Refuses a restore into a store that holds anything: events, dead letters or positions.
    ///
    /// # Errors
    /// [`RestoreError::NotEmpty`], or when the backend fails.
    pub fn check_empty(&self) -> Result<(), RestoreError> {
        let writer = self.lock_writer();
        let events = writer.next_sequence.saturating_sub(1);
        // Those on the list, and the index of every record once dead-lettered (a restore starts
        // its ids in a range of its own, so the next id says nothing of whether any were given).
        let dead_letters = writer.dead_letters;
        let holds = |table: &crate::table::Table| -> Result<bool, StoreError> {
            Ok(table
                .scan_prefix(&[])
                .next()
                .transpose()
                .map_err(backend)?
                .is_some())
        };
        let dead_lettered = holds(&self.dead_letter_index)?;
        let positions = holds(&self.positions)?;
        if events > 0 || dead_letters > 0 || dead_lettered || positions {
            return Err(RestoreError::NotEmpty {
                events,
                dead_letters,
                dead_lettered,
                positions,
            });
        }
        Ok(())
    }

    /// Appends a backup's events with the sequences they had (the first is `first_sequence`, the
    /// next the log expects) and projects them, as the projector did. They are decoded and
    /// applied in pieces of at most 1,000 events and [`crate::projector::MAX_DECODED_PART_BYTES`]
    /// once decoded, as the projector estimates it (an event above it in a piece of its own): a
    /// frame of many events (up to 128 MiB of them, each of many small fields taking tens of
    /// times its size once decoded) is never decoded whole.
    ///
    /// # Errors
    /// When the events do not follow the log, one is not an event or is there twice, or the
    /// backend fails.
    pub fn restore_events(
        &self,
        first_sequence: u64,
        events: Vec<LoggedEvent>,
    ) -> Result<(), RestoreError> {
        let expected = self.lock_writer().next_sequence;
        if first_sequence != expected {
            return Err(RestoreError::Gap {
                expected,
                found: first_sequence,
            });
        }
        let mut sequence = first_sequence;
        // Every event is decoded, however large (the projector's dead letters requeued anyway
        // are in the log too): each counts by its estimate.
        let pieces = parts_by_decoded_size(
            events,
            |event| Some(&event.record[..]),
            usize::MAX,
            RESTORE_PIECE,
        );
        for piece in pieces {
            let piece_first = sequence;
            let records =
                piece
                    .into_iter()
                    .map(|(event, _)| {
                        let at = sequence;
                        sequence += 1;
                        let envelope = touchline_proto::decode_envelope(Some(&event.record))
                            .map_err(|error| RestoreError::NotAnEvent {
                                sequence: at,
                                reason: error.to_string(),
                            })?;
                        Ok(ConsumedRecord {
                            partition: event.partition,
                            offset: event.offset,
                            content: RecordContent::Event {
                                envelope: Box::new(envelope),
                                raw: event.record,
                            },
                        })
                    })
                    .collect::<Result<Vec<_>, RestoreError>>()?;
            let count = records.len() as u64;
            // Only events: the stream key names dead letters, of which there are none here.
            let outcome = self.apply_records("", records, false)?;
            // A restore's store is open to nothing else (`open_for_restore`): no watcher waits
            // for the entries an apply queues for the next flush, which would otherwise keep a
            // frame's every entry decoded (up to 128 MiB of records, tens of times that once
            // decoded) until the restore's next flush.
            lock(&self.unflushed).clear();
            if outcome.appended != count {
                return Err(RestoreError::Duplicate {
                    first: piece_first,
                    last: piece_first + count.saturating_sub(1),
                });
            }
        }
        Ok(())
    }

    /// Stores a consumer position of a backup.
    ///
    /// # Errors
    /// When the backend fails.
    pub fn restore_position(&self, position: &StreamPosition) -> Result<(), StoreError> {
        let value = u64_pair(
            position.position.next_offset.cast_unsigned(),
            position.position.last_fingerprint,
        );
        self.write_now(
            &self.positions,
            keys::position(&position.stream, position.partition),
            value,
        )
    }

    /// Stores a backup's record once dead-lettered.
    ///
    /// # Errors
    /// When the backend fails.
    pub fn restore_dead_lettered_record(
        &self,
        record: &DeadLetteredRecord,
    ) -> Result<(), StoreError> {
        let value = u64_pair(record.dead_letter_id, record.fingerprint);
        let key = keys::record(&record.stream, record.partition, record.offset);
        let mut writer = self.lock_writer();
        self.write_now(&self.dead_letter_index, key.as_slice(), value)?;
        writer.note_dead_lettered(&key);
        Ok(())
    }

    /// Stores a backup's dead letter, and the record index entry it needs (a backup has it
    /// already; a dead letter is never without one).
    ///
    /// # Errors
    /// When the backup has it twice, or the backend fails.
    pub fn restore_dead_letter(&self, dead_letter: &DeadLetter) -> Result<(), RestoreError> {
        if !(1..=MAX_DEAD_LETTER_ID).contains(&dead_letter.id) {
            return Err(RestoreError::Invalid(format!(
                "dead letter id {} is not between 1 and {MAX_DEAD_LETTER_ID}",
                dead_letter.id
            )));
        }
        let mut writer = self.lock_writer();
        let key = dead_letter.id.to_be_bytes();
        if self.dead_letters.get(key).map_err(backend)?.is_some() {
            return Err(RestoreError::DeadLetterTwice { id: dead_letter.id });
        }
        let mut batch = sled::Batch::default();
        self.dead_letters
            .insert(&mut batch, key, encode(dead_letter)?);
        // The backup's index names the latest dead letter of each record (a later one at the same
        // place, since discarded, may have replaced this one's entry): kept as it is.
        let index_key = keys::record(
            &dead_letter.stream,
            dead_letter.partition,
            dead_letter.offset,
        );
        if !self
            .dead_letter_index
            .contains_key(&index_key)
            .map_err(backend)?
        {
            let index = u64_pair(dead_letter.id, fingerprint(dead_letter.value.as_deref()));
            self.dead_letter_index
                .insert(&mut batch, index_key.as_slice(), index);
        }
        let count = writer.dead_letters + 1;
        let next = writer
            .next_dead_letter
            .max(dead_letter.id.saturating_add(1));
        self.meta
            .insert(&mut batch, DEAD_LETTER_COUNT, &count.to_be_bytes());
        self.meta
            .insert(&mut batch, NEXT_DEAD_LETTER, &next.to_be_bytes());
        self.write(batch, 4)?;
        writer.note_dead_lettered(&index_key);
        writer.dead_letters = count;
        writer.next_dead_letter = next;
        self.dead_letter_count.store(count, Ordering::Release);
        Ok(())
    }

    /// Sets the id the next dead letter gets, from the backup's `next_dead_letter`: the start of
    /// a range of its own, so that no id the backed-up node gave after its cut names another
    /// record here.
    ///
    /// # Errors
    /// When the backend fails.
    pub fn restore_next_dead_letter(&self, next_dead_letter: u64) -> Result<(), StoreError> {
        let mut writer = self.lock_writer();
        let minute = u64::try_from(
            (UnixNanos::now().0 / 1_000_000_000 - DEAD_LETTER_RANGE_EPOCH_SECONDS) / 60,
        )
        .unwrap_or(0);
        let next = writer
            .next_dead_letter
            .max(fresh_dead_letter_ids(next_dead_letter, minute));
        // Both counters: a store without the count takes it as every id ever given.
        let mut batch = sled::Batch::default();
        self.meta
            .insert(&mut batch, NEXT_DEAD_LETTER, &next.to_be_bytes());
        self.meta.insert(
            &mut batch,
            DEAD_LETTER_COUNT,
            &writer.dead_letters.to_be_bytes(),
        );
        self.write(batch, 2)?;
        writer.next_dead_letter = next;
        Ok(())
    }
}

/// How far apart the ranges of dead-letter ids given after restores are (2^24 ids each).
const DEAD_LETTER_RANGE_BITS: u32 = 24;

/// Fresh ranges stay below this id: 2^53, the largest integer a JSON number keeps exactly in
/// most readers (JavaScript's log viewers among them: an id above it shown rounded would name
/// another dead letter).
const FRESH_DEAD_LETTER_IDS_BELOW: u64 = 1 << 53;

/// The minute the ranges of restores count from: 2025-01-01T00:00:00Z.
const DEAD_LETTER_RANGE_EPOCH_SECONDS: i64 = 1_735_689_600;

/// The first dead-letter id of a store restored from a backup whose next id was `next`, at
/// `minute` (minutes since [`DEAD_LETTER_RANGE_EPOCH_SECONDS`]). The node the backup was taken
/// from may have given ids from `next` on after its cut, to records that a restored node,
/// reading Kafka again in another order (partitions interleave as fetches come), would give other
/// ids: an operator's "discard 42" from before the restore would discard another record. So a
/// restored store starts a range of its own: the next multiple of 2^24 above the backup's ids,
/// and not below the minute's multiple either, so that two restores of one backup (the first
/// restored node lost too) a minute or more apart start apart. Ids stay below 2^53 (until the
/// year 3045); a backup whose ids are past it already (a store restored by an older Touchline,
/// whose ranges were larger) gets the next range above its ids, without the minute's; past
/// [`MAX_DEAD_LETTER_ID`] the backup's `next` is kept.
fn fresh_dead_letter_ids(next: u64, minute: u64) -> u64 {
    let above = (next.saturating_sub(1) >> DEAD_LETTER_RANGE_BITS).saturating_add(1);
    let start = |range: u64| {
        range
            .checked_mul(1 << DEAD_LETTER_RANGE_BITS)
            .map(|fresh| fresh.max(next))
    };
    start(above.max(minute))
        .filter(|fresh| *fresh < FRESH_DEAD_LETTER_IDS_BELOW)
        .or_else(|| start(above).filter(|fresh| *fresh <= MAX_DEAD_LETTER_ID))
        .unwrap_or(next)
}

/// A position value: the next offset and the fingerprint of the record before it.
pub(super) fn read_position(key: &[u8], value: &[u8]) -> Result<StoredPosition, StoreError> {
    let (next_offset, last_fingerprint) = read_u64_pair("position", key, value)?;
    Ok(StoredPosition {
        next_offset: next_offset.cast_signed(),
        last_fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use touchline_core::RecordContent;

    use touchline_core::ConsumedRecord;

    use super::super::failure::tests::{record, stream};
    use super::super::lock;
    use super::{LoggedEvent, MAX_DEAD_LETTER_ID, RestoreError, SledStore, fresh_dead_letter_ids};

    /// A store that once dead-lettered a record still knows it after the dead letter is
    /// discarded (so that reading it again does not make it a dead letter again): a restore into
    /// it would keep that knowledge beside the backup's, so it is not empty.
    #[test]
    fn a_store_whose_dead_letters_were_all_discarded_is_not_empty() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path())?;
        store.check_empty()?;
        // A replay's dead letter: no position stored, no event.
        store.apply_replayed(
            &stream(),
            vec![ConsumedRecord {
                partition: 0,
                offset: 3,
                content: RecordContent::Undecodable {
                    reason: "not an envelope".to_owned(),
                    key: None,
                    value: Some(vec![0xff]),
                },
            }],
        )?;
        let listed = store.dead_letters(10)?;
        store.discard_dead_letter(listed[0].id)?;
        assert!(
            matches!(
                store.check_empty(),
                Err(RestoreError::NotEmpty {
                    events: 0,
                    dead_letters: 0,
                    dead_lettered: true,
                    positions: false,
                })
            ),
            "{:?}",
            store.check_empty()
        );
        Ok(())
    }

    #[test]
    fn a_restore_keeps_no_decoded_entries_for_watchers() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open_for_restore(dir.path(), 1 << 20)?;
        // Three pieces of a frame, applied with no flush between them.
        let events = (0..2500)
            .map(|offset| {
                let RecordContent::Event { raw, .. } = record(offset).content else {
                    unreachable!("an event")
                };
                LoggedEvent {
                    partition: 0,
                    offset,
                    record: raw,
                }
            })
            .collect();
        store.restore_events(1, events)?;
        assert_eq!(
            store.log_count.load(std::sync::atomic::Ordering::Acquire),
            2500
        );
        // Nothing queued for a flush to send: a restore has no watchers, and a frame's entries
        // kept decoded until its flush could take many times the frame's size.
        assert!(lock(&store.unflushed).is_empty());
        Ok(())
    }

    #[test]
    fn a_restore_starts_dead_letter_ids_in_a_range_of_their_own() {
        const RANGE: u64 = 1 << 24;
        // Above every id of the backup, at the next multiple of 2^24, even with none given.
        assert_eq!(fresh_dead_letter_ids(1, 0), RANGE);
        assert_eq!(fresh_dead_letter_ids(5, 0), RANGE);
        assert_eq!(fresh_dead_letter_ids(RANGE, 0), RANGE);
        assert_eq!(fresh_dead_letter_ids(RANGE + 1, 0), 2 * RANGE);
        // Not below the current minute's range: a second restore of the same backup later on
        // starts apart from the first.
        let minute = 1_000_000;
        assert_eq!(fresh_dead_letter_ids(5, minute), minute * RANGE);
        assert!(fresh_dead_letter_ids(5, minute + 1) > fresh_dead_letter_ids(5, minute));
        // Below 2^53, which JSON readers keep exactly: past it the backup's next id is kept.
        let last_range = (1 << 53) / RANGE - 1;
        assert_eq!(fresh_dead_letter_ids(5, last_range), last_range * RANGE);
        // Past 2^53 by the minute (the year 3045): the range above the backup's ids.
        assert_eq!(fresh_dead_letter_ids(5, last_range + 1), RANGE);
        assert_eq!(fresh_dead_letter_ids(5, u64::MAX), RANGE);
        // A backup whose ids are past 2^53 already (restored by an older Touchline): the range
        // above them all the same, never the ids it may have given.
        let old_scheme = (29_500_000 << 32) + 7;
        let fresh = fresh_dead_letter_ids(old_scheme, minute);
        assert!(fresh > old_scheme && fresh.is_multiple_of(RANGE), "{fresh}");
        // Up to the highest id a restore takes; past it, the backup's next id.
        assert_eq!(
            fresh_dead_letter_ids(MAX_DEAD_LETTER_ID, 0),
            MAX_DEAD_LETTER_ID
        );
        assert_eq!(
            fresh_dead_letter_ids(MAX_DEAD_LETTER_ID + 1, 0),
            MAX_DEAD_LETTER_ID + 1
        );
    }
}
