//! A watcher's inbox: its customer's entries from the store's feed, taken off the feed by a task
//! of its own as each flush is published. A watcher busy elsewhere (its catch-up, a client that
//! reads slowly) therefore keeps neither the shared feed's slots (every customer's entries of up
//! to [`touchline_projection::WATCH_BUFFER`] flushes) nor its place in it: it holds at most its
//! own customer's entries, [`MAX_ENTRIES`] and about [`MAX_BYTES`] of them (or one flush's of up
//! to eight times as many), and lags past that.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::{CancellationToken, DropGuard};
use touchline_core::{CustomerId, TimelineEntry};
use touchline_projection::MAX_PAGE_BYTES;

use super::approximate_bytes;
use crate::still_allowed::lock;

/// Entries of its customer an inbox holds at most, untaken.
pub(super) const MAX_ENTRIES: usize = 1000;
/// Bytes of them (about: [`approximate_bytes`]) an inbox holds at most, untaken.
pub(super) const MAX_BYTES: usize = MAX_PAGE_BYTES;
/// An empty inbox takes one flush whole up to this many times the bounds above: a watcher that
/// keeps up is not ended by one large flush (a replay, a backfill), and still holds a bounded
/// copy of it.
const ONE_FLUSH_FACTOR: usize = 8;

/// Why the feed ended for a watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FeedEnd {
    /// Its inbox filled up, or the feed went on without it.
    Lagged,
    /// The store stopped publishing (the node stops).
    Closed,
}

/// What a watcher takes from its inbox at once.
pub(super) struct Taken {
    /// The customer's entries, in log order.
    pub entries: VecDeque<TimelineEntry>,
    /// The feed was read through this log sequence: every entry of the customer up to it is among
    /// the entries taken now or before.
    pub through: u64,
    /// The feed's end, once it ended (after the entries taken).
    pub end: Option<FeedEnd>,
}

#[derive(Debug, Default)]
struct State {
    entries: VecDeque<TimelineEntry>,
    bytes: usize,
    through: u64,
    end: Option<FeedEnd>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    arrived: Notify,
}

/// The inbox of one watcher; its task ends with it.
pub(super) struct Inbox {
    shared: Arc<Shared>,
    _task: DropGuard,
}

impl Inbox {
    /// Starts taking `customer`'s entries off `live`, from where that receiver is.
    pub(super) fn start(
        live: broadcast::Receiver<Arc<[TimelineEntry]>>,
        customer: CustomerId,
    ) -> Self {
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        tokio::spawn(take_off_feed(
            live,
            customer,
            Arc::clone(&shared),
            stop.clone(),
        ));
        Self {
            shared,
            _task: stop.drop_guard(),
        }
    }

    /// Takes what arrived since the last take.
    pub(super) fn take(&self) -> Taken {
        let mut state = lock(&self.shared.state);
        state.bytes = 0;
        Taken {
            entries: std::mem::take(&mut state.entries),
            through: state.through,
            end: state.end,
        }
    }

    /// Resolves once something arrived since the last wait (at once if it did meanwhile).
    pub(super) async fn arrived(&self) {
        self.shared.arrived.notified().await;
    }
}

/// Reads the feed until it ends for this watcher, keeping `customer`'s entries of each flush and
/// how far the feed was read, or until `stop` (the watcher went).
async fn take_off_feed(
    mut live: broadcast::Receiver<Arc<[TimelineEntry]>>,
    customer: CustomerId,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let received = tokio::select! {
            received = live.recv() => received,
            () = stop.cancelled() => return,
        };
        let ended = {
            let mut state = lock(&shared.state);
            match received {
                Ok(batch) => {
                    let mine: Vec<TimelineEntry> = batch
                        .iter()
                        .filter(|entry| entry.touchpoint.customer_id == customer)
                        .cloned()
                        .collect();
                    let bytes = mine
                        .iter()
                        .map(approximate_bytes)
                        .fold(state.bytes, usize::saturating_add);
                    let factor = if state.entries.is_empty() {
                        ONE_FLUSH_FACTOR
                    } else {
                        1
                    };
                    if state.entries.len().saturating_add(mine.len()) > MAX_ENTRIES * factor
                        || bytes > MAX_BYTES * factor
                    {
                        // Not this flush's entries: the watcher resumes before them.
                        state.end = Some(FeedEnd::Lagged);
                    } else {
                        state.entries.extend(mine);
                        state.bytes = bytes;
                        if let Some(last) = batch.last() {
                            state.through = state.through.max(last.position.sequence);
                        }
                    }
                }
                Err(RecvError::Lagged(_)) => state.end = Some(FeedEnd::Lagged),
                Err(RecvError::Closed) => state.end = Some(FeedEnd::Closed),
            }
            state.end.is_some()
        };
        shared.arrived.notify_one();
        if ended {
            return;
        }
    }
}
