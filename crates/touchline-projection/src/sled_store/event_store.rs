//! [`EventStore`] for the sled store: `apply` and `flush` hand over to the write path
//! ([`apply`](super::apply)) and the flusher's bookkeeping; the reads (positions, timeline pages,
//! summaries, log ranges, dedupe look-ups) read sled directly, without the writer.

use std::collections::BTreeMap;
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use touchline_core::{
    ApplyOutcome, ConsumedRecord, CustomerId, CustomerSummary, EventStore, StoreError,
    StoredPosition, StreamIdentity, TimelineCursor, TimelineEntry, TimelineEntryView, TimelinePage,
    TimelineQuery, UnixNanos,
};

use super::{MAX_PAGE_BYTES, MAX_SCAN_PER_PAGE, SledStore, decode, lock, log, read_u64};
use crate::error::backend;
use crate::keys;

/// Keys a timeline page scans under one hold of the read gate: a page of 50 entries and its
/// next-page probe, with room to spare.
const GATE_STEPS: usize = 128;

impl EventStore for SledStore {
    fn apply(
        &self,
        stream: &StreamIdentity,
        records: Vec<ConsumedRecord>,
    ) -> Result<ApplyOutcome, StoreError> {
        self.apply_records(&stream.key(), records, true)
    }

    fn skip_to(
        &self,
        stream: &StreamIdentity,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), StoreError> {
        let key = keys::position(&stream.key(), partition);
        // Under the writer: no apply stores the partition's position meanwhile.
        let _writer = self.lock_writer();
        if let Some(value) = self.positions.get(&key).map_err(backend)?
            && super::backup::read_position(&key, &value)?.next_offset >= next_offset
        {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        self.positions.insert(
            &mut batch,
            &key,
            super::u64_pair(
                next_offset.cast_unsigned(),
                touchline_core::NO_RECORD_FINGERPRINT,
            ),
        );
        self.write(batch, 1)
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
                let (_, partition) =
                    keys::parse_position(&key).ok_or_else(|| StoreError::Corrupt {
                        what: "position key",
                        key: format!("{key:02x?}"),
                        reason: "partition is not 4 bytes".to_owned(),
                    })?;
                Ok((partition, super::backup::read_position(&key, &value)?))
            })
            .collect()
    }

    fn timeline(&self, query: &TimelineQuery) -> Result<TimelinePage, StoreError> {
        let mut entries = Vec::new();
        let next = self.timeline_scan(query, |key, value| {
            entries.push(decode("timeline entry", key, value)?);
            Ok(())
        })?;
        Ok(TimelinePage { entries, next })
    }

    fn timeline_views(
        &self,
        query: &TimelineQuery,
        each: &mut dyn FnMut(&TimelineEntryView<'_>),
    ) -> Result<Option<TimelineCursor>, StoreError> {
        self.timeline_scan(query, |key, value| {
            each(&decode("timeline entry", key, value)?);
            Ok(())
        })
    }

    fn timeline_entry(
        &self,
        customer_id: &CustomerId,
        at: touchline_core::TimelineCursor,
    ) -> Result<Option<TimelineEntry>, StoreError> {
        let key = keys::timeline(customer_id, at.occurred_at, at.sequence);
        self.active()
            .timeline
            .get(&key)
            .map_err(backend)?
            .map(|bytes| decode("timeline entry", &key, &bytes))
            .transpose()
    }

    fn latest_held(
        &self,
        customer_id: &CustomerId,
        sequence: u64,
    ) -> Result<Option<touchline_core::TimelineCursor>, StoreError> {
        use std::ops::Bound::Included;
        let start = Included(keys::customer_prefix(customer_id));
        let end = Included(keys::timeline(customer_id, UnixNanos(i64::MAX), u64::MAX));
        for (scanned, item) in self.active().timeline.range(start, end).rev().enumerate() {
            let (key, _) = item.map_err(backend)?;
            let cursor = super::stored_timeline_cursor(&key)?;
            // A read of bounded length, as a page's (a cursor far back in a long timeline).
            if cursor.sequence <= sequence || scanned + 1 >= MAX_SCAN_PER_PAGE {
                return Ok(Some(cursor));
            }
        }
        Ok(None)
    }

    fn summary(&self, customer_id: &CustomerId) -> Result<Option<CustomerSummary>, StoreError> {
        self.load_summary(&self.active().summary, customer_id)
    }

    fn log_entries(
        &self,
        customer_id: &CustomerId,
        from: u64,
        end: u64,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        let mut entries = Vec::new();
        log::for_each(&self.log, from, end, |record| {
            let entry = record.entry()?;
            if entry.touchpoint.customer_id == *customer_id {
                entries.push(entry);
            }
            Ok(())
        })?;
        Ok(entries)
    }

    fn event_sequence(
        &self,
        partner: &touchline_core::PartnerId,
        event_id: &touchline_core::EventId,
    ) -> Result<Option<u64>, StoreError> {
        // The dedupe marker holds the event's log sequence.
        let key = keys::dedupe(partner, event_id);
        self.dedupe
            .get(&key)
            .map_err(backend)?
            .map(|value| read_u64("dedupe marker", &key, &value))
            .transpose()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.flush_locked(&lock(&self.flushing))
    }

    fn flush_through(&self, sequence: u64) -> Result<(), StoreError> {
        let one_at_a_time = lock(&self.flushing);
        // Made durable by the flush this one waited for, say.
        if self.durable_sequence() >= sequence {
            return Ok(());
        }
        self.flush_locked(&one_at_a_time)
    }

    fn log_id(&self) -> u64 {
        self.log_id
    }

    fn durable_sequence(&self) -> u64 {
        self.durable_count.load(Ordering::Acquire)
    }

    fn visible_sequence(&self) -> u64 {
        self.visible_count
            .load(Ordering::Acquire)
            .max(self.log_count.load(Ordering::Acquire))
    }
}

impl SledStore {
    /// Reads the stored entries of a timeline page ([`EventStore::timeline`]) and hands each
    /// (its key and stored value) to `each`, in timeline order, once sled's steps are done: the
    /// read gate is held for the steps, not for decoding what they read. Returns where the next
    /// page starts.
    fn timeline_scan(
        &self,
        query: &TimelineQuery,
        mut each: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
    ) -> Result<Option<TimelineCursor>, StoreError> {
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
            return Ok(None);
        }
        // The key range holds exactly the entries of the filter's time window, so a filter of
        // time alone reads no entry under the gate.
        let by_time_only = query.filter.by_time_only();
        let mut kept: Vec<(Vec<u8>, sled::IVec)> = Vec::new();
        let mut next = None;
        let mut page_bytes = 0;
        // The last durable key scanned: a page that ends at the scan limit resumes after it, not
        // after keys not yet durable (they are shown once flushed, in their place). Where the
        // page started when none was: the next page scans the same keys again.
        let mut last_scanned = Some(query.after.unwrap_or(TimelineCursor {
            occurred_at: query.filter.from.unwrap_or(UnixNanos(i64::MIN)),
            sequence: 0,
        }));
        let timeline = self.active().timeline;
        // The page's first step is taken before the gate: when its leaf is out of sled's cache,
        // sled reads it in during that one step (a writer waits for the step, as for any), not
        // while the page holds the gate, which a writer would wait for too, the leaf's read and
        // the page's other steps in a row. (Twelve interleaved pairs of quick benches, with a
        // separate look-up then: end-to-end 0.69-0.70 of the store's own apply against 0.58-0.59
        // without, and at the same offered rate ingest-to-queryable p99 80 against 96 ms;
        // BENCHMARKS.md.)
        let mut steps = timeline.range(start, end);
        let Some(first) = steps.next() else {
            return Ok(None);
        };
        // A page of up to `GATE_STEPS` keys runs whole between two writes (see `crate::gate`);
        // a longer scan (a filter that skips many entries) lets the writer in after each
        // `GATE_STEPS` keys, so as not to hold it back.
        let mut gate = Some(crate::gate::page());
        for (scanned, item) in std::iter::once(first).chain(steps).enumerate() {
            if scanned > 0 && scanned % GATE_STEPS == 0 {
                drop(gate.take());
                gate = Some(crate::gate::page());
            }
            let (key, value) = item.map_err(backend)?;
            if scanned >= MAX_SCAN_PER_PAGE {
                next = last_scanned;
                break;
            }
            let scanned = keys::timeline_cursor(&key);
            if let (Some(up_to), Some(scanned)) = (query.up_to_sequence, scanned)
                && scanned.sequence > up_to
            {
                // Applied, not yet durable: shown once flushed.
                continue;
            }
            last_scanned = scanned;
            if !by_time_only {
                let entry: TimelineEntryView<'_> = decode("timeline entry", &key, &value)?;
                if !query.filter.matches_view(&entry) {
                    continue;
                }
            }
            page_bytes += value.len();
            if kept.len() == query.page_size || (page_bytes > MAX_PAGE_BYTES && !kept.is_empty()) {
                // One more match exists: the page is full and there is a next one.
                next = kept
                    .last()
                    .map(|(key, _)| super::stored_timeline_cursor(key))
                    .transpose()?;
                break;
            }
            kept.push((key, value));
        }
        drop(gate);
        for (key, value) in &kept {
            each(key, value)?;
        }
        Ok(next)
    }

    /// The flush, once `_one_at_a_time` (the flush lock) is held: flushes go one at a time, so
    /// that the watchers' feed gets their entries in log order.
    fn flush_locked(&self, _one_at_a_time: &MutexGuard<'_, ()>) -> Result<(), StoreError> {
        self.writable()?;
        // Everything applied before the flush starts is durable after it: the log's length, or
        // the last entry queued (an apply queues its entries before it updates the length).
        let entries = std::mem::take(&mut *lock(&self.unflushed));
        let covered = entries
            .last()
            .map_or(0, |entry| entry.position.sequence)
            .max(self.log_count.load(Ordering::Acquire));
        if let Err(error) = self.guarded(|| self.db.flush()) {
            // Queued again, ahead of what was applied meanwhile: the next flush that succeeds
            // sends them to the watchers (else a watcher's cursor would pass them unsent).
            let mut unflushed = lock(&self.unflushed);
            let later = std::mem::replace(&mut *unflushed, entries);
            unflushed.extend(later);
            return Err(error);
        }
        self.durable_count.fetch_max(covered, Ordering::AcqRel);
        // Nobody watching now means every later watcher reads a durable sequence that covers
        // these entries: they are in its catch-up.
        if !entries.is_empty() && self.watchers.receiver_count() > 0 {
            let _ = self.watchers.send(entries.into());
        }
        Ok(())
    }
}
