//! `WatchTimeline`: a customer's durable timeline from a cursor, then its new entries live.
//!
//! The cursor is a log sequence bound to the customer: everything of the customer up to it has
//! been delivered. Live entries come from the store's feed, which publishes each flush's entries
//! in log order; subscribing before reading the durable sequence means an entry is either in the
//! catch-up (sequence up to the durable one) or in the feed (after it), never in neither.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::metadata::MetadataValue;
use tonic_types::{ErrorDetails, StatusExt as _};
use touchline_core::{
    CustomerId, TimelineCursor, TimelineEntry, TimelineFilter, TimelineQuery, UnixNanos,
    fingerprint,
};
use touchline_projection::MAX_PAGE_BYTES;
use touchline_proto::convert::wire_timeline_entry;
use touchline_proto::v1;
use tracing::warn;

use crate::StillAllowed;
use crate::reads::StoreReads;
use crate::{ERROR_DOMAIN, Error};

/// Entries of a durable batch, as the store publishes them.
pub type Feed = broadcast::Sender<Arc<[TimelineEntry]>>;

/// Messages a watcher buffers before it waits for its client (then its inbox fills, and may lag
/// it).
const CLIENT_BUFFER: usize = 256;
/// Entries read per catch-up page.
const CATCH_UP_PAGE: usize = 1000;
/// A cursor: version, log sequence, customer fingerprint, log identity.
const CURSOR_VERSION: u8 = 2;
/// Cursors issued before cursors named their log: still accepted, not bound to a log.
const CURSOR_VERSION_UNBOUND: u8 = 1;
/// Log events a resumed watch reads instead of the customer's timeline, at most (when the
/// customer has more entries than events were logged since its cursor, and at most a page of them
/// are missed).
const MAX_LOG_CATCH_UP: u64 = 10_000;

/// Encodes a watch cursor: the log sequence, bound to the customer and to the log
/// ([`touchline_core::EventStore::log_id`]) whose sequence it is.
#[must_use]
pub fn encode_cursor(customer: &CustomerId, log: u64, sequence: u64) -> String {
    let mut bytes = Vec::with_capacity(25);
    bytes.push(CURSOR_VERSION);
    bytes.extend_from_slice(&sequence.to_be_bytes());
    bytes.extend_from_slice(&fingerprint(Some(customer.as_str().as_bytes())).to_be_bytes());
    bytes.extend_from_slice(&log.to_be_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Why a cursor cannot be resumed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorError {
    /// Not a cursor, or one issued for another customer.
    NotForCustomer,
    /// A cursor of another log (another node's, or this node's before its store was reset): its
    /// sequence means nothing here.
    OtherLog,
}

/// Decodes a cursor issued for `customer` by the log `log`. Cursors of the first format, which
/// did not name their log, are accepted as they were.
///
/// # Errors
/// [`CursorError`] says why the cursor cannot be used.
pub fn decode_cursor(customer: &CustomerId, log: u64, cursor: &str) -> Result<u64, CursorError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| CursorError::NotForCustomer)?;
    let field = |at: usize| {
        bytes
            .get(at..at + 8)
            .and_then(|slice| slice.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or(CursorError::NotForCustomer)
    };
    let issued_by = match (bytes.len(), bytes.first()) {
        (25, Some(&CURSOR_VERSION)) => Some(field(17)?),
        (17, Some(&CURSOR_VERSION_UNBOUND)) => None,
        _ => return Err(CursorError::NotForCustomer),
    };
    let sequence = field(1)?;
    if field(9)? != fingerprint(Some(customer.as_str().as_bytes())) {
        return Err(CursorError::NotForCustomer);
    }
    match issued_by {
        Some(issued_by) if issued_by != log => Err(CursorError::OtherLog),
        _ => Ok(sequence),
    }
}

mod inbox;

use inbox::{FeedEnd, Taken};
pub use inbox::{Inbox, Watchers};

type Message = Result<v1::WatchTimelineResponse, Status>;

/// The response stream of a watch.
pub type WatchStream = std::pin::Pin<Box<dyn futures::Stream<Item = Message> + Send>>;

/// How long a watcher waits, by default, for its client to take a message before it gives up on
/// it: the watch ends as if it had lagged (`WATCH_LAGGED`, with the cursor of the last message
/// queued), and its task and inbox go; the messages already queued stay for the
/// client, then the error.
pub const STALLED_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// The error that ends a watch when its client's buffer is full: yielded after the messages
/// queued, so that a watcher never waits on a client to end.
#[derive(Debug, Clone, Default)]
struct Tail(Arc<std::sync::Mutex<Option<Status>>>);

impl Tail {
    fn set(&self, status: Status) {
        *crate::still_allowed::lock(&self.0) = Some(status);
    }

    fn take(&self) -> Option<Status> {
        crate::still_allowed::lock(&self.0).take()
    }
}

/// One watcher: sends the catch-up, then live entries, until the client goes, the server stops
/// or the feed lags it.
#[allow(
    missing_debug_implementations,
    reason = "holds a store handle and channels"
)]
pub struct Watch {
    pub reads: StoreReads,
    pub customer: CustomerId,
    pub after: u64,
    /// The watcher's inbox ([`Watchers::subscribe`]), taken before the watcher reads the durable
    /// sequence: an entry is in its catch-up or in its inbox.
    pub live: Inbox,
    pub shutdown: CancellationToken,
    /// Asked every second while the watch runs; `None`: nothing to ask.
    pub still_allowed: Option<Arc<StillAllowed>>,
    /// How long the watcher waits for its client to take a message ([`STALLED_AFTER`]).
    pub stalled_after: std::time::Duration,
}

impl Watch {
    /// The identity of the log this watcher's cursors are positions in.
    fn log(&self) -> u64 {
        self.reads.store().log_id()
    }

    /// Starts the watcher: its response stream, which ends with the caller's error once
    /// `still_allowed` sees a revocation, and with the watch's own error (lagged, stalled, the
    /// store failed) after the messages queued before it. The watcher's task holds `slot` until
    /// it ends (its client went, or stalled, or the watch ended otherwise); a stream whose client
    /// stopped reading keeps at most its queued messages after that, until the client goes, and
    /// holds `open` until it is dropped.
    #[must_use]
    pub fn stream(
        self,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
        open: tokio::sync::OwnedSemaphorePermit,
    ) -> WatchStream {
        let tail = Tail::default();
        let still_allowed = self.still_allowed.clone();
        let ending = tail.clone();
        let messages = crate::still_allowed::ending_with(
            tokio_stream::wrappers::ReceiverStream::new(self.spawn_with(tail, slot)),
            move || ending.take(),
        );
        let messages = futures::StreamExt::map(messages, move |message| {
            // The stream owns `open`: it goes when the stream is dropped.
            let _open = &open;
            message
        });
        match still_allowed {
            Some(still_allowed) => {
                Box::pin(crate::still_allowed::until_revoked(messages, still_allowed))
            }
            None => Box::pin(messages),
        }
    }

    /// Starts the watcher; the receiver is the response stream, but for a revocation, which
    /// only ends it, and an ending error that found the client's buffer full (256 messages
    /// unread), which is dropped: [`Watch::stream`] tells the caller both.
    #[must_use]
    pub fn spawn(self) -> mpsc::Receiver<Message> {
        self.spawn_with(Tail::default(), None)
    }

    fn spawn_with(
        self,
        tail: Tail,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> mpsc::Receiver<Message> {
        let (sender, receiver) = mpsc::channel(CLIENT_BUFFER);
        tokio::spawn(async move {
            crate::metrics::WATCHES.inc();
            let _open = OpenWatch;
            let _slot = slot;
            let shutdown = self.shutdown.clone();
            tokio::select! {
                () = self.run(&sender, &tail) => {}
                () = shutdown.cancelled() => {
                    // After the answers the client has not read yet: a stream that just ended
                    // would tell it that nothing more will come.
                    end(&sender, &tail, shutting_down());
                }
            }
        });
        receiver
    }

    async fn run(self, sender: &mpsc::Sender<Message>, tail: &Tail) {
        // The inbox fills from the feed also while the catch-up below runs.
        let inbox = &self.live;
        // Subscribed before this read: later entries come through the feed.
        let durable = self.reads.store().durable_sequence();
        let Some(mut latest) = self.catch_up(sender, tail, durable).await else {
            return;
        };
        let caught_up = v1::WatchTimelineResponse {
            event: Some(v1::watch_timeline_response::Event::CaughtUp(
                v1::CaughtUp {},
            )),
            cursor: encode_cursor(&self.customer, self.log(), durable.max(self.after)),
            late: false,
        };
        if !self.queue(sender, tail, caught_up, self.after).await {
            return;
        }
        let mut delivered = durable.max(self.after);
        let mut check = tokio::time::interval(crate::still_allowed::PERIOD);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let Taken {
                entries,
                through,
                end: feed_end,
            } = inbox.take();
            for entry in entries.iter().flat_map(|part| part.iter()) {
                let sequence = entry.position.sequence;
                // Up to `delivered`: in the catch-up.
                if sequence <= delivered {
                    continue;
                }
                let late = mark_late(&mut latest, entry);
                let queued = delivered;
                delivered = sequence;
                if !self.send(sender, tail, entry, sequence, late, queued).await {
                    return;
                }
            }
            inbox.sent();
            // Every entry of the customer up to where the feed was read is queued: a watch that
            // lags resumes after it, without reading other customers' entries again.
            delivered = delivered.max(through);
            match feed_end {
                Some(FeedEnd::Lagged) => {
                    crate::metrics::WATCHES_LAGGED.inc();
                    end(sender, tail, self.lagged(delivered));
                    return;
                }
                Some(FeedEnd::Closed) => {
                    end(sender, tail, shutting_down());
                    return;
                }
                None => {}
            }
            // A client that went away ends the watcher even when its customer is quiet, and so
            // does a token revoked meanwhile.
            tokio::select! {
                () = inbox.arrived() => {}
                () = sender.closed() => return,
                _ = check.tick() => {
                    if self.revoked() {
                        return;
                    }
                }
            }
        }
    }

    /// Sends the durable entries after the cursor, in timeline order, each `late` when it sorts
    /// before the end of what the client holds (a resumed watch's entries up to its cursor).
    /// Returns the latest timeline order the client holds, or `None` when the watch is over (the
    /// client went, or the store failed and the client was told).
    async fn catch_up(
        &self,
        sender: &mpsc::Sender<Message>,
        tail: &Tail,
        durable: u64,
    ) -> Option<Option<(UnixNanos, u64)>> {
        let mut latest = if self.after == 0 {
            None
        } else {
            let customer = self.customer.clone();
            let after = self.after;
            match self
                .reads
                .run(move |store| store.latest_held(&customer, after))
                .await
            {
                Ok(held) => held.map(|cursor| (cursor.occurred_at, cursor.sequence)),
                Err(status) => {
                    end(sender, tail, status);
                    return None;
                }
            }
        };
        if let Some(mut entries) = self.missed_in_log(sender, durable).await {
            entries.sort_by_key(TimelineEntry::timeline_order);
            for entry in &entries {
                let late = mark_late(&mut latest, entry);
                // Until caught up the cursor stays where the watch started.
                if !self
                    .send(sender, tail, entry, self.after, late, self.after)
                    .await
                {
                    return None;
                }
            }
            return Some(latest);
        }
        let mut page_after: Option<TimelineCursor> = None;
        loop {
            // A resumed watch passes over its customer's entries up to its cursor without
            // sending anything, which would notice a client gone or a token revoked: page by page
            // it looks (else the watcher would scan a long timeline for no one, holding its slot).
            if self.gone(sender) {
                return None;
            }
            let query = TimelineQuery {
                customer_id: self.customer.clone(),
                page_size: CATCH_UP_PAGE,
                after: page_after,
                filter: TimelineFilter::default(),
                // Entries past `durable` are read and passed over here (they come from the
                // inbox): a page of the durable ones only would stop before them, to be read
                // again once flushed, as `GetTimeline` wants, and this read would not move on.
                up_to_sequence: None,
            };
            let page = match self.reads.run(move |store| store.timeline(&query)).await {
                Ok(page) => page,
                Err(status) => {
                    end(sender, tail, status);
                    return None;
                }
            };
            for entry in &page.entries {
                let sequence = entry.position.sequence;
                if sequence <= self.after || sequence > durable {
                    continue;
                }
                let late = mark_late(&mut latest, entry);
                if !self
                    .send(sender, tail, entry, self.after, late, self.after)
                    .await
                {
                    return None;
                }
            }
            match page.next {
                Some(next) => page_after = Some(next),
                None => return Some(latest),
            }
        }
    }

    /// What a resumed watch missed, read from the log when that is the shorter read: at most
    /// [`MAX_LOG_CATCH_UP`] log events, fewer than the customer's entries (a short break in a
    /// long timeline), read a page of [`CATCH_UP_PAGE`] events at a time and given up past
    /// [`CATCH_UP_PAGE`] entries or about [`MAX_PAGE_BYTES`] of them (so that it holds no more
    /// than a page of the timeline read would). `None`: read the timeline instead, also when the
    /// log read fails (the timeline read answers for itself) or the client is gone (which the
    /// timeline read sees before it reads).
    async fn missed_in_log(
        &self,
        sender: &mpsc::Sender<Message>,
        durable: u64,
    ) -> Option<Vec<TimelineEntry>> {
        let missed_events = durable.saturating_sub(self.after);
        if self.after == 0 || missed_events > MAX_LOG_CATCH_UP {
            return None;
        }
        let customer = self.customer.clone();
        let entries = self
            .reads
            .run(move |store| Ok(store.summary(&customer)?.map_or(0, |summary| summary.total)))
            .await;
        match entries {
            Ok(entries) if missed_events < entries => {}
            Ok(_) => return None,
            Err(status) => {
                warn!(customer = %self.customer, %status, "resume: cannot read the summary; reading the timeline");
                return None;
            }
        }
        let mut missed = Vec::new();
        let mut bytes = 0_usize;
        let end = durable.saturating_add(1);
        let mut from = self.after.saturating_add(1);
        while from < end {
            if self.gone(sender) {
                return None;
            }
            let page_end = from.saturating_add(CATCH_UP_PAGE as u64).min(end);
            let customer = self.customer.clone();
            let page = self
                .reads
                .run(move |store| store.log_entries(&customer, from, page_end))
                .await;
            match page {
                Ok(page) => {
                    bytes = page
                        .iter()
                        .map(approximate_bytes)
                        .fold(bytes, usize::saturating_add);
                    missed.extend(page);
                }
                Err(status) => {
                    warn!(customer = %self.customer, %status, "resume: cannot read the log; reading the timeline");
                    return None;
                }
            }
            if missed.len() > CATCH_UP_PAGE || bytes > MAX_PAGE_BYTES {
                return None;
            }
            from = page_end;
        }
        Some(missed)
    }

    /// Queues `entry` with `cursor`; `queued` is the cursor of the last message queued before
    /// it, which a client that stalls resumes from.
    async fn send(
        &self,
        sender: &mpsc::Sender<Message>,
        tail: &Tail,
        entry: &TimelineEntry,
        cursor: u64,
        late: bool,
        queued: u64,
    ) -> bool {
        let message = v1::WatchTimelineResponse {
            event: Some(v1::watch_timeline_response::Event::Entry(
                wire_timeline_entry(entry),
            )),
            cursor: encode_cursor(&self.customer, self.log(), cursor),
            late,
        };
        self.queue(sender, tail, message, queued).await
    }

    /// Queues `message` for the client; false when the watch is over. A client that does not
    /// read holds the send: the token check goes on meanwhile, and past `stalled_after` the
    /// watch ends as lagged, resuming from `queued` (the cursor of the last message queued).
    async fn queue(
        &self,
        sender: &mpsc::Sender<Message>,
        tail: &Tail,
        message: v1::WatchTimelineResponse,
        queued: u64,
    ) -> bool {
        let sending = crate::still_allowed::send_while_allowed(
            sender,
            Ok(message),
            self.still_allowed.as_deref(),
        );
        if let Ok(sent) = tokio::time::timeout(self.stalled_after, sending).await {
            return sent;
        }
        crate::metrics::WATCHES_LAGGED.inc();
        end(sender, tail, self.lagged(queued));
        false
    }

    /// The error of a watch that fell behind, resuming from `cursor`.
    fn lagged(&self, cursor: u64) -> Status {
        lagged(&encode_cursor(&self.customer, self.log(), cursor))
    }

    /// Whether the caller was revoked: the watch then ends (`until_revoked` tells the caller).
    fn revoked(&self) -> bool {
        self.still_allowed
            .as_ref()
            .is_some_and(|still| still.revoked().is_some())
    }

    /// Whether the watch is over for want of a client: it went, or its token was revoked.
    fn gone(&self, sender: &mpsc::Sender<Message>) -> bool {
        sender.is_closed() || self.revoked()
    }
}

/// Ends the watch with `status`, after what was queued: at once when the client's buffer has room,
/// else as the stream's [`Tail`].
fn end(sender: &mpsc::Sender<Message>, tail: &Tail, status: Status) {
    if let Err(mpsc::error::TrySendError::Full(Err(status))) = sender.try_send(Err(status)) {
        tail.set(status);
    }
}

/// Whether `entry` sorts before `latest`, the last timeline position the client holds, which it
/// then moves on to (`late`, for the client to insert the entry at its place).
fn mark_late(latest: &mut Option<(UnixNanos, u64)>, entry: &TimelineEntry) -> bool {
    let order = entry.timeline_order();
    let late = latest.is_some_and(|latest| order < latest);
    *latest = (*latest).max(Some(order));
    late
}

/// About the bytes an entry takes: its payload, attributes and a bound for the rest (ids, type,
/// numbers).
fn approximate_bytes(entry: &TimelineEntry) -> usize {
    let touchpoint = &entry.touchpoint;
    touchpoint
        .attributes
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .fold(touchpoint.payload.len() + 1024, usize::saturating_add)
}

/// Counts an open watch down when its task ends, however it ends.
struct OpenWatch;

impl Drop for OpenWatch {
    fn drop(&mut self) {
        crate::metrics::WATCHES.dec();
    }
}

fn lagged(cursor: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        "WATCH_LAGGED",
        ERROR_DOMAIN,
        [("cursor".to_owned(), cursor.to_owned())],
    );
    let mut status = Status::with_error_details(
        tonic::Code::Aborted,
        "the watcher fell too far behind the projector; resume from the cursor",
        details,
    );
    if let Ok(value) = MetadataValue::try_from(cursor) {
        status.metadata_mut().insert("cursor", value);
    }
    status
}

fn shutting_down() -> Status {
    Error::Rejected {
        code: tonic::Code::Unavailable,
        reason: "SHUTTING_DOWN",
        message: "the server is shutting down; resume from the last cursor once it is back"
            .to_owned(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_are_bound_to_their_customer_and_their_log() {
        let alice = CustomerId::parse("alice").expect("valid");
        let bob = CustomerId::parse("bob").expect("valid");
        let cursor = encode_cursor(&alice, 7, 42);
        assert_eq!(decode_cursor(&alice, 7, &cursor), Ok(42));
        assert_eq!(
            decode_cursor(&bob, 7, &cursor),
            Err(CursorError::NotForCustomer)
        );
        assert_eq!(
            decode_cursor(&alice, 8, &cursor),
            Err(CursorError::OtherLog)
        );
        assert_eq!(
            decode_cursor(&alice, 7, "garbage"),
            Err(CursorError::NotForCustomer)
        );
        assert_eq!(
            decode_cursor(&alice, 7, ""),
            Err(CursorError::NotForCustomer)
        );
    }

    /// Cursors issued before cursors named their log still resume, on any log.
    #[test]
    fn cursors_of_the_first_format_are_accepted() {
        let alice = CustomerId::parse("alice").expect("valid");
        let mut bytes = vec![CURSOR_VERSION_UNBOUND];
        bytes.extend_from_slice(&42_u64.to_be_bytes());
        bytes.extend_from_slice(&fingerprint(Some(b"alice")).to_be_bytes());
        let cursor = URL_SAFE_NO_PAD.encode(bytes);
        assert_eq!(decode_cursor(&alice, 9, &cursor), Ok(42));
    }
}
