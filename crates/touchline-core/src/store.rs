//! The store that holds the log and its projections, as a trait so that storage engines can be
//! swapped and measured against each other. The sled implementation lives in
//! `touchline-projection`.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    CustomerId, CustomerSummary, Envelope, JourneyStage, PartnerId, TimelineEntry,
    TimelineEntryView, UnixNanos,
};

/// The Kafka stream a set of stored positions belongs to: the cluster id and the topic. When it
/// changes (a new broker, a recreated topic, the embedded broker's every start) stored offsets
/// mean nothing and the projector reads the new stream from its beginning.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamIdentity {
    pub cluster_id: String,
    pub topic: String,
}

impl StreamIdentity {
    /// A stable textual key for storage.
    #[must_use]
    pub fn key(&self) -> String {
        format!("{}/{}", self.cluster_id, self.topic)
    }
}

/// One record as consumed from Kafka.
#[derive(Debug, Clone)]
pub struct ConsumedRecord {
    pub partition: i32,
    pub offset: i64,
    pub content: RecordContent,
}

/// A consumed record is either a decoded event (kept with its raw bytes, which the log stores
/// as the system of record) or something that could not be decoded.
#[derive(Debug, Clone)]
pub enum RecordContent {
    Event {
        envelope: Box<Envelope>,
        raw: Vec<u8>,
    },
    Undecodable {
        reason: String,
        key: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
    },
}

/// The fingerprint a position stored by [`EventStore::skip_to`] has: no record before it was read
/// (retention deleted them). Not the fingerprint of a record's value in practice (that of a
/// missing value is 0).
pub const NO_RECORD_FINGERPRINT: u64 = u64::MAX;

/// A stable 64-bit fingerprint (FNV-1a) of a record value, stored with each position so that a
/// restart can check that the broker still holds the record the position was taken after.
#[must_use]
pub fn fingerprint(value: Option<&[u8]>) -> u64 {
    let Some(value) = value else { return 0 };
    value.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl RecordContent {
    /// The fingerprint of the record's value.
    #[must_use]
    pub fn fingerprint(&self) -> u64 {
        match self {
            Self::Event { raw, .. } => fingerprint(Some(raw)),
            Self::Undecodable { value, .. } => fingerprint(value.as_deref()),
        }
    }
}

/// A stored consumer position: the next offset to read, and the fingerprint of the record just
/// before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPosition {
    pub next_offset: i64,
    pub last_fingerprint: u64,
}

/// What applying one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Events appended to the log and projected.
    pub appended: u64,
    /// Events dropped because their (partner, event id) was already in the log.
    pub duplicates: u64,
    /// Records that went to the dead-letter store.
    pub dead_lettered: u64,
    /// The next offset to read per partition, as stored with the batch.
    pub next_offsets: BTreeMap<i32, i64>,
}

impl ApplyOutcome {
    /// Adds what applying a later part of the same batch did: its positions replace the earlier
    /// part's, as they did in the store (after a rewind the later one is the lower).
    pub fn absorb(&mut self, later: Self) {
        self.appended += later.appended;
        self.duplicates += later.duplicates;
        self.dead_lettered += later.dead_lettered;
        self.next_offsets.extend(later.next_offsets);
    }
}

/// A position in a timeline: the order key of the last entry returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimelineCursor {
    pub occurred_at: UnixNanos,
    pub sequence: u64,
}

/// Which entries of a timeline to return. Empty sets mean "all".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimelineFilter {
    /// Inclusive lower bound on `occurred_at`.
    pub from: Option<UnixNanos>,
    /// Exclusive upper bound on `occurred_at`.
    pub to: Option<UnixNanos>,
    pub partners: BTreeSet<PartnerId>,
    pub event_types: BTreeSet<String>,
    pub stages: BTreeSet<JourneyStage>,
}

impl TimelineFilter {
    #[must_use]
    pub fn matches(&self, entry: &TimelineEntry) -> bool {
        self.matches_fields(
            entry.touchpoint.occurred_at,
            entry.partner_id.as_str(),
            entry.touchpoint.event_type.as_str(),
            entry.touchpoint.stage,
        )
    }

    /// [`Self::matches`] of a stored entry read as a view.
    #[must_use]
    pub fn matches_view(&self, entry: &TimelineEntryView<'_>) -> bool {
        self.matches_fields(
            entry.touchpoint.occurred_at,
            entry.partner_id,
            entry.touchpoint.event_type,
            entry.touchpoint.stage,
        )
    }

    fn matches_fields(
        &self,
        occurred_at: UnixNanos,
        partner_id: &str,
        event_type: &str,
        stage: JourneyStage,
    ) -> bool {
        self.from.is_none_or(|from| occurred_at >= from)
            && self.to.is_none_or(|to| occurred_at < to)
            && (self.partners.is_empty() || self.partners.contains(partner_id))
            && (self.event_types.is_empty() || self.event_types.contains(event_type))
            && (self.stages.is_empty() || self.stages.contains(&stage))
    }

    /// Whether only the time window filters: a store whose keys order entries by time then
    /// selects by its key range alone, without reading the entries.
    #[must_use]
    pub fn by_time_only(&self) -> bool {
        // Every field named: a filter added later is not skipped here unnoticed.
        let Self {
            from: _,
            to: _,
            partners,
            event_types,
            stages,
        } = self;
        partners.is_empty() && event_types.is_empty() && stages.is_empty()
    }
}

/// A page request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineQuery {
    pub customer_id: CustomerId,
    pub page_size: usize,
    /// Return entries strictly after this cursor.
    pub after: Option<TimelineCursor>,
    pub filter: TimelineFilter,
    /// Only entries whose log sequence is at most this; `None`: every applied entry. What is
    /// served to clients passes the store's [`EventStore::durable_sequence`], so that no client
    /// sees an entry that a crash could take back (to be applied again, perhaps under another
    /// sequence, from Kafka).
    pub up_to_sequence: Option<u64>,
}

/// A page of a timeline. `next` is set when more entries may follow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TimelinePage {
    pub entries: Vec<TimelineEntry>,
    pub next: Option<TimelineCursor>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("stored {what} at key {key} cannot be decoded: {reason}")]
    Corrupt {
        what: &'static str,
        key: String,
        reason: String,
    },
    #[error("storage backend failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store changed under a read that needs it still (a verification beside rebuilds that
    /// kept switching): nothing is wrong, the read can be tried again.
    #[error("the store changed during the read: {0}")]
    Conflict(String),
}

/// The log and its projections. [`EventStore::apply`] writes atomically: log appends, dedupe
/// markers, projection updates, dead letters and the positions they cover are stored together or
/// not at all (invariant 6); a store may split a batch into several such atomic writes, in order,
/// each storing the positions of the records it covers.
pub trait EventStore: Send + Sync + std::fmt::Debug {
    /// Applies a batch of consumed records of `stream`: appends new events to the log, drops
    /// duplicates of (partner, event id), updates the projections, keeps undecodable records as
    /// dead letters, and stores the next offset of each partition with the records it covers.
    ///
    /// # Errors
    /// When the backend fails; then at most a prefix of the batch is stored, with its positions
    /// (re-reading the rest is safe: events are deduplicated).
    fn apply(
        &self,
        stream: &StreamIdentity,
        records: Vec<ConsumedRecord>,
    ) -> Result<ApplyOutcome, StoreError>;

    /// Records that the records of `partition` of `stream` before `next_offset` are gone, read
    /// or not (retention deleted them): the partition's stored position moves to `next_offset`,
    /// with [`NO_RECORD_FINGERPRINT`], unless it is there or further already. Durable with the
    /// next flush.
    ///
    /// # Errors
    /// When the backend fails.
    fn skip_to(
        &self,
        stream: &StreamIdentity,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), StoreError>;

    /// The stored position per partition of `stream`; empty when the stream is new.
    ///
    /// # Errors
    /// When the backend fails or a stored position is corrupt.
    fn positions(
        &self,
        stream: &StreamIdentity,
    ) -> Result<BTreeMap<i32, StoredPosition>, StoreError>;

    /// A page of a customer's timeline.
    ///
    /// # Errors
    /// When the backend fails or an entry is corrupt.
    fn timeline(&self, query: &TimelineQuery) -> Result<TimelinePage, StoreError>;

    /// The page that [`Self::timeline`] reads, each entry handed to `each` in timeline order as a
    /// view of the stored entry rather than decoded into a [`TimelineEntry`] (a store that can
    /// borrow its strings from the stored bytes copies none): for a read that only re-encodes
    /// the entries, as `GetTimeline` does. Returns where the next page starts (the page's
    /// [`TimelinePage::next`]).
    ///
    /// # Errors
    /// As [`Self::timeline`].
    fn timeline_views(
        &self,
        query: &TimelineQuery,
        each: &mut dyn FnMut(&TimelineEntryView<'_>),
    ) -> Result<Option<TimelineCursor>, StoreError> {
        let page = self.timeline(query)?;
        for entry in &page.entries {
            each(&entry.view());
        }
        Ok(page.next)
    }

    /// A customer's summary; `None` for a customer without touchpoints.
    ///
    /// # Errors
    /// When the backend fails or the summary is corrupt.
    fn summary(&self, customer_id: &CustomerId) -> Result<Option<CustomerSummary>, StoreError>;

    /// The entry at `at` in a customer's timeline (a summary's first or last touch).
    ///
    /// # Errors
    /// When the backend fails or the entry is corrupt.
    fn timeline_entry(
        &self,
        customer_id: &CustomerId,
        at: TimelineCursor,
    ) -> Result<Option<TimelineEntry>, StoreError>;

    /// The last position in timeline order among `customer_id`'s entries whose log sequence is at
    /// most `sequence`: the end of the timeline a watcher resuming from that cursor holds, which
    /// its missed entries are late or not against. Reads back from the timeline's end, over the
    /// entries after the cursor only, and at most a bounded number of them: past that bound it
    /// returns the position of the last entry read, which is after the end the watcher holds (an
    /// entry before it is then marked late although the watcher holds nothing after it: the
    /// watcher inserts it at its place, which is its end).
    ///
    /// # Errors
    /// When the backend fails or a key is corrupt.
    fn latest_held(
        &self,
        customer_id: &CustomerId,
        sequence: u64,
    ) -> Result<Option<TimelineCursor>, StoreError>;

    /// The entries of `customer_id` among the log's events with sequences in `from..end`, in log
    /// order, as the timeline projection holds them (what a resumed watch missed, read from the
    /// log when that range is shorter than the customer's timeline).
    ///
    /// # Errors
    /// When the backend fails or a log record is corrupt.
    fn log_entries(
        &self,
        customer_id: &CustomerId,
        from: u64,
        end: u64,
    ) -> Result<Vec<TimelineEntry>, StoreError>;

    /// The log sequence of the event `event_id` of `partner`, `None` when the log does not hold
    /// it (the event may be applied and not yet durable: compare with
    /// [`Self::durable_sequence`]).
    ///
    /// # Errors
    /// When the backend fails.
    fn event_sequence(
        &self,
        partner: &PartnerId,
        event_id: &crate::EventId,
    ) -> Result<Option<u64>, StoreError>;

    /// Makes every applied batch durable (fsync).
    ///
    /// # Errors
    /// When the backend fails to sync.
    fn flush(&self) -> Result<(), StoreError>;

    /// Makes the log durable through `sequence`: at once when it is, else by a flush. Callers
    /// that wait for one flush share it (a store that serializes its flushes checks again once
    /// it is its turn), rather than making one each.
    ///
    /// # Errors
    /// When the backend fails to sync.
    fn flush_through(&self, sequence: u64) -> Result<(), StoreError> {
        if self.durable_sequence() >= sequence {
            return Ok(());
        }
        self.flush()
    }

    /// The log sequence up to which every event is durable: events with a higher sequence may be
    /// applied but not yet flushed (and renumbered after a crash).
    fn durable_sequence(&self) -> u64;

    /// The highest log sequence whose writes a read may already see: applied, or being applied
    /// (at least [`Self::durable_sequence`]). Taken after a read of a projection rewritten in
    /// place (a summary), it says how far the log must be durable before what was read is.
    fn visible_sequence(&self) -> u64;

    /// The identity of this log, drawn when the store was created: log sequences mean something
    /// only within one log (another node's log, or this node's after its store was reset, numbers
    /// events differently), so positions handed to clients carry it.
    fn log_id(&self) -> u64;
}
