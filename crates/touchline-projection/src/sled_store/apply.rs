//! The store's write path: consumed records applied in atomic pieces of at most
//! [`RECORDS_PER_WRITE`] records (dedupe, log, active projections, dead letters and the positions
//! they cover), and the folds that a rebuild shares with it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;

use touchline_core::{
    ApplyOutcome, ConsumedRecord, CustomerId, CustomerSummary, LogPosition, RecordContent,
    StoreError, StreamIdentity, TimelineEntry, UnixNanos, apply_summary,
};

use super::{
    DEAD_LETTER_COUNT, DEFERRED_CLEARS, DeadLetter, LogRecord, NEXT_DEAD_LETTER, NEXT_SEQUENCE,
    RECORDS_PER_WRITE, SledStore, WriterState, decode, encode, lock, log, read_u64_pair, u64_pair,
};
use crate::error::backend;
use crate::keys;
use crate::table::Table;

/// Projects events into projection tables: the one piece of code the projector and a rebuild
/// share, so that a rebuilt projection is the incrementally built one (invariant 5).
pub(super) struct Folds<'a> {
    store: &'a SledStore,
    timeline: Option<Table>,
    summary: Option<Table>,
    summaries: HashMap<CustomerId, CustomerSummary>,
}

impl<'a> Folds<'a> {
    pub(super) fn new(
        store: &'a SledStore,
        timeline: Option<Table>,
        summary: Option<Table>,
    ) -> Self {
        Self {
            store,
            timeline,
            summary,
            summaries: HashMap::new(),
        }
    }

    pub(super) fn fold(
        &mut self,
        batch: &mut sled::Batch,
        entry: &TimelineEntry,
    ) -> Result<(), StoreError> {
        let customer = &entry.touchpoint.customer_id;
        if let Some(timeline) = &self.timeline {
            timeline.insert(
                batch,
                keys::timeline(
                    customer,
                    entry.touchpoint.occurred_at,
                    entry.position.sequence,
                ),
                encode(entry)?,
            );
        }
        if let Some(table) = &self.summary {
            let summary = match self.summaries.remove(customer) {
                Some(cached) => Some(cached),
                None => self.store.load_summary(table, customer)?,
            };
            self.summaries
                .insert(customer.clone(), apply_summary(summary, entry));
        }
        Ok(())
    }

    /// Adds the folded summaries to `batch`.
    pub(super) fn finish(self, batch: &mut sled::Batch) -> Result<(), StoreError> {
        if let Some(table) = &self.summary {
            for (customer, summary) in &self.summaries {
                table.insert(batch, customer.as_str(), encode(summary)?);
            }
        }
        Ok(())
    }
}

impl SledStore {
    /// The listed dead letter of the record at `offset` of `place` ([`keys::position`]) when that
    /// record is the one of fingerprint `fingerprint` (another record at the same place, from a
    /// wiped broker, is not its record).
    fn dead_letter_of(
        &self,
        place: &[u8],
        offset: i64,
        fingerprint: u64,
    ) -> Result<Option<u64>, StoreError> {
        let index_key = keys::record_at(place, offset);
        let Some((id, known)) = self
            .dead_letter_index
            .get(&index_key)
            .map_err(backend)?
            .and_then(|entry| read_u64_pair("dead-letter index", &index_key, &entry).ok())
        else {
            return Ok(None);
        };
        if known != fingerprint {
            return Ok(None);
        }
        Ok(self
            .dead_letters
            .contains_key(id.to_be_bytes())
            .map_err(backend)?
            .then_some(id))
    }

    pub(super) fn load_summary(
        &self,
        table: &Table,
        customer: &CustomerId,
    ) -> Result<Option<CustomerSummary>, StoreError> {
        table
            .get(customer.as_str())
            .map_err(backend)?
            .map(|bytes| decode("summary", customer.as_str().as_bytes(), &bytes))
            .transpose()
    }

    /// Applies consumed records while holding the writer: dedupe, log, active projections, dead
    /// letters and (when `stream_positions`) the positions, plus whatever `batch` already holds, in
    /// one atomic batch. An event whose record is listed as a dead letter (it decodes now: a
    /// newer Touchline, a replay) takes the dead letter off the list; `requeued`, a dead letter
    /// that `batch` removes already, is left to it.
    pub(super) fn apply_locked(
        &self,
        writer: &mut WriterState,
        stream_key: &str,
        records: Vec<ConsumedRecord>,
        store_positions: bool,
        mut batch: sled::Batch,
        requeued: Option<u64>,
    ) -> Result<ApplyOutcome, StoreError> {
        // Refused before anything is read or raised (see `failure`).
        self.writable()?;
        let now = UnixNanos::now();
        let active = self.active();
        let mut folds = Folds::new(
            self,
            Some(Table::clone(&active.timeline)),
            Some(Table::clone(&active.summary)),
        );
        let mut outcome = ApplyOutcome::default();
        let mut appended = Vec::new();
        // Dedupe keys of the events appended by this piece.
        let mut seen_in_batch: HashSet<Vec<u8>> = HashSet::new();
        // (stream, partition, offset) -> fingerprint of the record dead-lettered there.
        let mut dead_in_batch: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut next_sequence = writer.next_sequence;
        let mut next_dead_letter = writer.next_dead_letter;
        let mut dead_letters = writer.dead_letters;
        // Dead letters this piece takes off the list, because their record decodes now.
        let mut cleared: HashSet<u64> = requeued.into_iter().collect();
        // Not while a backup reads its cut's dead letters (they must stay as they were at the
        // cut, as for a requeue): those found meanwhile wait for the first write after it.
        let backup_reading = self.backup_readers.load(Ordering::Acquire) > 0;
        let mut deferred = Vec::new();
        if backup_reading {
            deferred.clone_from(&writer.deferred_clears);
        } else {
            for id in &writer.deferred_clears {
                // A requeue or a discard may have taken it off since.
                if self
                    .dead_letters
                    .contains_key(id.to_be_bytes())
                    .map_err(backend)?
                    && cleared.insert(*id)
                {
                    self.dead_letters.remove(&mut batch, id.to_be_bytes());
                    dead_letters = dead_letters.saturating_sub(1);
                    tracing::info!(
                        dead_letter = id,
                        "a dead letter whose record decoded when read again while a backup read the dead letters is taken off the list"
                    );
                }
            }
        }
        // Per partition, its last record: its fingerprint is stored with the position after it.
        // Fingerprints are computed only for those and for dead letters.
        let mut last_records: BTreeMap<i32, usize> = BTreeMap::new();
        for (index, record) in records.iter().enumerate() {
            last_records.insert(record.partition, index);
        }
        let mut last_fingerprints: BTreeMap<i32, u64> = BTreeMap::new();
        // Dedupe, timeline and summary: about three writes a record, and the log's chunk.
        let mut writes = records.len() * 3;
        let mut chunk = log::Chunk::default();

        for (index, record) in records.into_iter().enumerate() {
            // The partition's last record sets its position, as its fingerprint: after a
            // rewind (a broker that lost its records and kept its cluster id, where librdkafka
            // starts the partition again from its oldest offset) the consumer goes on after
            // that record, not after the highest offset the batch held.
            outcome
                .next_offsets
                .insert(record.partition, record.offset.saturating_add(1));
            if last_records.get(&record.partition) == Some(&index) {
                last_fingerprints.insert(record.partition, record.content.fingerprint());
            }
            match record.content {
                RecordContent::Event { envelope, raw } => {
                    if dead_letters > 0 {
                        let place = keys::position(stream_key, record.partition);
                        if writer.maybe_dead_lettered(&place, record.offset)
                            && let Some(id) = self.dead_letter_of(
                                &place,
                                record.offset,
                                touchline_core::fingerprint(Some(&raw)),
                            )?
                        {
                            if backup_reading {
                                if !deferred.contains(&id) {
                                    deferred.push(id);
                                }
                            } else if cleared.insert(id) {
                                self.dead_letters.remove(&mut batch, id.to_be_bytes());
                                dead_letters = dead_letters.saturating_sub(1);
                                tracing::info!(
                                    dead_letter = id,
                                    partition = record.partition,
                                    offset = record.offset,
                                    "a dead letter's record decodes now: it is taken off the list"
                                );
                            }
                        }
                    }
                    let dedupe_key =
                        keys::dedupe(&envelope.partner_id, &envelope.touchpoint.event_id);
                    if seen_in_batch.contains(&dedupe_key)
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
                    chunk.push(LogRecord {
                        sequence,
                        partition: record.partition,
                        offset: record.offset,
                        raw: &raw,
                    });
                    self.dedupe
                        .insert(&mut batch, dedupe_key.as_slice(), &sequence.to_be_bytes());
                    folds.fold(&mut batch, &entry)?;
                    seen_in_batch.insert(dedupe_key);
                    // Kept whether or not anyone watches now: a watcher that subscribes before the
                    // flush must get these entries from the feed.
                    appended.push(entry);
                    outcome.appended += 1;
                }
                RecordContent::Undecodable { reason, key, value } => {
                    let fingerprint = touchline_core::fingerprint(value.as_deref());
                    let index_key = keys::record(stream_key, record.partition, record.offset);
                    let known = match dead_in_batch.get(&index_key) {
                        Some(seen) => Some(*seen),
                        None => self
                            .dead_letter_index
                            .get(&index_key)
                            .map_err(backend)?
                            .and_then(|value| {
                                read_u64_pair("dead-letter index", &index_key, &value).ok()
                            })
                            .map(|(_, fingerprint)| fingerprint),
                    };
                    if known == Some(fingerprint) {
                        // The same record read again (replay, redelivery): already a dead letter.
                        // Another record at the same place (a wiped broker that kept its cluster
                        // id) is a new dead letter.
                        continue;
                    }
                    let id = next_dead_letter;
                    next_dead_letter += 1;
                    dead_letters += 1;
                    let dead_letter = DeadLetter {
                        id,
                        stream: stream_key.to_owned(),
                        partition: record.partition,
                        offset: record.offset,
                        reason,
                        key,
                        value,
                        dead_lettered_at: now,
                    };
                    self.dead_letters
                        .insert(&mut batch, id.to_be_bytes(), encode(&dead_letter)?);
                    self.dead_letter_index.insert(
                        &mut batch,
                        index_key.as_slice(),
                        u64_pair(id, fingerprint),
                    );
                    dead_in_batch.insert(index_key, fingerprint);
                    outcome.dead_lettered += 1;
                }
            }
        }
        writes += chunk.write(&self.log, &mut batch);
        folds.finish(&mut batch)?;
        if store_positions {
            for (partition, next_offset) in &outcome.next_offsets {
                let last_fingerprint = last_fingerprints.get(partition).copied().unwrap_or(0);
                self.positions.insert(
                    &mut batch,
                    keys::position(stream_key, *partition),
                    u64_pair(next_offset.cast_unsigned(), last_fingerprint),
                );
            }
        } else {
            outcome.next_offsets.clear();
        }
        if next_sequence != writer.next_sequence {
            self.meta
                .insert(&mut batch, NEXT_SEQUENCE, &next_sequence.to_be_bytes());
        }
        if deferred != writer.deferred_clears {
            store_deferred_clears(&self.meta, &mut batch, &deferred);
            writes += 1;
        }
        // The dead-letter counters change only with dead letters (a requeue or a discard writes
        // the count itself).
        if outcome.dead_lettered > 0 || dead_letters != writer.dead_letters {
            self.meta.insert(
                &mut batch,
                NEXT_DEAD_LETTER,
                &next_dead_letter.to_be_bytes(),
            );
            self.meta
                .insert(&mut batch, DEAD_LETTER_COUNT, &dead_letters.to_be_bytes());
        }

        if next_sequence != writer.next_sequence {
            // Before the write: a reader that sees it (sled publishes it with a release) sees
            // this too, and waits for the log to be durable this far before serving what it read.
            self.visible_count
                .fetch_max(next_sequence.saturating_sub(1), Ordering::Release);
        }
        // One tree, one batch: atomic (invariant 6).
        // A failure leaves `visible_count` raised: a read of what the failed batch may have left
        // in memory waits for a durability that never comes, and fails (the flush is refused).
        self.write(batch, writes)?;
        if !appended.is_empty() {
            // Under the writer: entries queue in log order.
            lock(&self.unflushed).append(&mut appended);
        }
        writer.next_sequence = next_sequence;
        writer.next_dead_letter = next_dead_letter;
        writer.dead_letters = dead_letters;
        writer.deferred_clears = deferred;
        for index_key in dead_in_batch.keys() {
            writer.note_dead_lettered(index_key);
        }
        self.log_count
            .store(next_sequence.saturating_sub(1), Ordering::Release);
        self.dead_letter_count
            .store(dead_letters, Ordering::Release);
        Ok(outcome)
    }

    /// Takes the dead letters whose clear a backup deferred off the list now, unless a backup
    /// still reads its cut's dead letters: at an open (they were stored, and a restart before
    /// the next write would keep them listed for good), and before a backup's cut (which would
    /// copy them, listed, beside their events). A write of no records, which settles them as
    /// every write does.
    ///
    /// # Errors
    /// When the backend fails.
    pub(super) fn settle_deferred_clears(
        &self,
        writer: &mut WriterState,
    ) -> Result<(), StoreError> {
        if writer.deferred_clears.is_empty() || self.backup_readers.load(Ordering::Acquire) > 0 {
            return Ok(());
        }
        self.apply_locked(writer, "", Vec::new(), false, sled::Batch::default(), None)
            .map(|_| ())
    }

    /// Applies records re-read from Kafka by a replay: new events are appended and projected,
    /// events already in the log are dropped, undecodable (or misplaced) records become dead
    /// letters (once).
    /// Stored positions are not touched: the projector's own reading goes on where it was.
    ///
    /// # Errors
    /// When the backend fails; then at most a prefix of the batch is stored.
    pub fn apply_replayed(
        &self,
        stream: &StreamIdentity,
        records: Vec<ConsumedRecord>,
    ) -> Result<ApplyOutcome, StoreError> {
        self.apply_records(&stream.key(), records, false)
    }

    /// Applies consumed records, storing their positions or not, as one writer.
    pub(super) fn apply_records(
        &self,
        stream_key: &str,
        records: Vec<ConsumedRecord>,
        store_positions: bool,
    ) -> Result<ApplyOutcome, StoreError> {
        // One writer at a time: the dedupe reads and the counters are only consistent with the
        // batch because nobody else writes in between.
        let mut writer = self.lock_writer();
        let mut outcome = ApplyOutcome::default();
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let part: Vec<ConsumedRecord> = records.by_ref().take(RECORDS_PER_WRITE).collect();
            outcome.absorb(self.apply_locked(
                &mut writer,
                stream_key,
                part,
                store_positions,
                sled::Batch::default(),
                None,
            )?);
            if records.peek().is_some() {
                // Readers parked on sled's lock during this piece get their turn before the
                // next piece takes it again (GetTimeline p99 during ingest 5.7 -> 3.6 ms).
                std::thread::yield_now();
            }
        }
        Ok(outcome)
    }
}

/// Stores the ids of the dead letters whose clear is deferred (none: the key is removed).
fn store_deferred_clears(meta: &Table, batch: &mut sled::Batch, ids: &[u64]) {
    if ids.is_empty() {
        meta.remove(batch, DEFERRED_CLEARS);
    } else {
        let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
        meta.insert(batch, DEFERRED_CLEARS, bytes.as_slice());
    }
}
