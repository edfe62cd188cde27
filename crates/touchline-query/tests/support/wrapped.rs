//! The real sled store behind a wrapper that counts some of its reads and its flushes, makes log
//! reads fail or flushes wait when told: for the query crate's tests of how the service copes.

#![allow(dead_code, reason = "each test binary uses some of it")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use touchline_core::{
    ApplyOutcome, ConsumedRecord, CustomerId, CustomerSummary, EventId, EventStore, PartnerId,
    StoreError, StoredPosition, StreamIdentity, TimelineCursor, TimelineEntry, TimelineEntryView,
    TimelinePage, TimelineQuery,
};
use touchline_projection::SledStore;

/// The real store, counting the watcher's two ways of reading what it missed, and its flushes.
#[derive(Debug)]
pub struct WrappedStore {
    pub inner: SledStore,
    pub log_reads: AtomicUsize,
    pub timeline_reads: AtomicUsize,
    /// Log reads fail (after being counted) while set.
    pub fail_log_reads: AtomicBool,
    /// Flushes started.
    pub flushes: AtomicUsize,
    /// While set, a flush waits (as a store whose sync does not return) until it is cleared.
    stall_flushes: Mutex<bool>,
    unstalled: Condvar,
}

impl WrappedStore {
    pub fn open(dir: &tempfile::TempDir) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            inner: SledStore::open(dir.path())?,
            log_reads: AtomicUsize::new(0),
            timeline_reads: AtomicUsize::new(0),
            fail_log_reads: AtomicBool::new(false),
            flushes: AtomicUsize::new(0),
            stall_flushes: Mutex::new(false),
            unstalled: Condvar::new(),
        }))
    }

    /// Makes flushes wait (`true`) until it is called with `false`.
    pub fn stall_flushes(&self, stall: bool) {
        *self
            .stall_flushes
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stall;
        self.unstalled.notify_all();
    }
}

impl EventStore for WrappedStore {
    fn apply(
        &self,
        stream: &StreamIdentity,
        records: Vec<ConsumedRecord>,
    ) -> Result<ApplyOutcome, StoreError> {
        self.inner.apply(stream, records)
    }

    fn skip_to(
        &self,
        stream: &StreamIdentity,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), StoreError> {
        self.inner.skip_to(stream, partition, next_offset)
    }

    fn positions(
        &self,
        stream: &StreamIdentity,
    ) -> Result<BTreeMap<i32, StoredPosition>, StoreError> {
        self.inner.positions(stream)
    }

    fn timeline(&self, query: &TimelineQuery) -> Result<TimelinePage, StoreError> {
        self.timeline_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.timeline(query)
    }

    // The store's own (what `GetTimeline` reads), not the trait's default through `timeline`.
    fn timeline_views(
        &self,
        query: &TimelineQuery,
        each: &mut dyn FnMut(&TimelineEntryView<'_>),
    ) -> Result<Option<TimelineCursor>, StoreError> {
        self.inner.timeline_views(query, each)
    }

    fn summary(&self, customer_id: &CustomerId) -> Result<Option<CustomerSummary>, StoreError> {
        self.inner.summary(customer_id)
    }

    fn timeline_entry(
        &self,
        customer_id: &CustomerId,
        at: TimelineCursor,
    ) -> Result<Option<TimelineEntry>, StoreError> {
        self.inner.timeline_entry(customer_id, at)
    }

    fn latest_held(
        &self,
        customer_id: &CustomerId,
        sequence: u64,
    ) -> Result<Option<touchline_core::TimelineCursor>, StoreError> {
        self.inner.latest_held(customer_id, sequence)
    }

    fn log_entries(
        &self,
        customer_id: &CustomerId,
        from: u64,
        end: u64,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        self.log_reads.fetch_add(1, Ordering::SeqCst);
        if self.fail_log_reads.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("injected log read failure".into()));
        }
        self.inner.log_entries(customer_id, from, end)
    }

    fn event_sequence(
        &self,
        partner: &PartnerId,
        event_id: &EventId,
    ) -> Result<Option<u64>, StoreError> {
        self.inner.event_sequence(partner, event_id)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        let stalled = self
            .stall_flushes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        drop(
            self.unstalled
                .wait_while(stalled, |stalled| *stalled)
                .unwrap_or_else(PoisonError::into_inner),
        );
        self.inner.flush()
    }

    fn durable_sequence(&self) -> u64 {
        self.inner.durable_sequence()
    }

    fn visible_sequence(&self) -> u64 {
        self.inner.visible_sequence()
    }

    fn log_id(&self) -> u64 {
        self.inner.log_id()
    }
}
