//! Watchers' inboxes, and the one task that fills them: [`Watchers`] reads the store's feed once
//! for every watcher of the node and hands each flush's entries to the inboxes of their customers'
//! watchers, so a flush costs its entries, not its entries times the watchers (each watcher
//! reading the feed itself compared every entry of every flush with its customer, and woke at
//! every flush). A watcher busy elsewhere (its catch-up, a client that reads slowly) therefore
//! keeps neither the shared feed's slots (every customer's entries of up to
//! [`touchline_projection::WATCH_BUFFER`] flushes) nor its place in it: it holds at most its own
//! customer's entries, [`MAX_ENTRIES`] and about [`MAX_BYTES`] of them (or one flush's of up to
//! eight times as many, taken or not, beside those), and lags past that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;
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

type Batch = Arc<[TimelineEntry]>;

/// Why the feed ended for a watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FeedEnd {
    /// Its inbox filled up, or the node's reading of the feed fell behind it.
    Lagged,
    /// The store stopped publishing (the node stops).
    Closed,
}

/// What a watcher takes from its inbox at once.
pub(super) struct Taken {
    /// The customer's entries, in log order: a part per flush, shared by its customer's inboxes.
    pub entries: Vec<Batch>,
    /// The feed was read through this log sequence: every entry of the customer up to it is among
    /// the entries taken now or before.
    pub through: u64,
    /// The feed's end, once it ended (after the entries taken).
    pub end: Option<FeedEnd>,
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Batch>,
    /// The entries in `entries`, and about their bytes ([`approximate_bytes`]).
    count: usize,
    bytes: usize,
    /// The entries the watcher took and has not sent yet ([`Inbox::take`] to [`Inbox::sent`]),
    /// and about their bytes: an empty inbox takes one flush whole only while those are within
    /// the bounds, so that a watcher holds at most one such flush, not one taken and another
    /// queued.
    held_count: usize,
    held_bytes: usize,
    /// The feed's end for this inbox, and how far the feed was read for it then.
    end: Option<(FeedEnd, u64)>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    arrived: Notify,
}

impl Shared {
    /// Ends the feed for this inbox, read through `through`, and wakes its watcher.
    fn end(&self, end: FeedEnd, through: u64) {
        lock(&self.state).end.get_or_insert((end, through));
        self.arrived.notify_one();
    }
}

/// The node's watchers of live timelines: one reading of the store's feed, from the first
/// watcher's subscription until the last goes, routed by customer to their inboxes.
#[derive(Clone)]
#[allow(
    missing_debug_implementations,
    reason = "holds a feed handle and inboxes"
)]
pub struct Watchers {
    router: Arc<Router>,
}

struct Router {
    /// The store's feed, not kept open by its watchers.
    feed: broadcast::WeakSender<Batch>,
    /// The feed was read through this log sequence, for every inbox that has not ended: stored
    /// after a flush's entries are in their inboxes, read under an inbox's lock as its entries are
    /// taken.
    through: AtomicU64,
    routes: Mutex<Routes>,
}

#[derive(Default)]
struct Routes {
    inboxes: HashMap<CustomerId, Vec<(u64, Arc<Shared>)>>,
    next_inbox: u64,
    /// The task reading the feed, while anyone watches: its generation and its stop.
    reading: Option<(u64, CancellationToken)>,
    generation: u64,
}

impl Watchers {
    /// The watchers of `feed`: nothing reads it until the first [`Watchers::subscribe`].
    #[must_use]
    pub fn new(feed: &broadcast::Sender<Batch>) -> Self {
        Self {
            router: Arc::new(Router {
                feed: feed.downgrade(),
                through: AtomicU64::new(0),
                routes: Mutex::new(Routes::default()),
            }),
        }
    }

    /// An inbox for a watcher of `customer`: it gets the customer's entries of every flush
    /// published from now on (a watcher that reads the durable sequence after this misses none).
    /// Starts the reading of the feed if nobody watched; on a tokio runtime.
    #[must_use]
    pub fn subscribe(&self, customer: CustomerId) -> Inbox {
        let shared = Arc::new(Shared::default());
        let mut routes = lock(&self.router.routes);
        if routes.reading.is_none() {
            let Some(feed) = self.router.feed.upgrade() else {
                shared.end(FeedEnd::Closed, self.router.through.load(Ordering::Acquire));
                return Inbox {
                    shared,
                    registered: None,
                };
            };
            // Subscribed under the routes' lock: the inbox gets every flush published after it.
            let live = feed.subscribe();
            routes.generation += 1;
            let stop = CancellationToken::new();
            routes.reading = Some((routes.generation, stop.clone()));
            tokio::spawn(read_feed(
                live,
                Reader {
                    router: Arc::clone(&self.router),
                    generation: routes.generation,
                },
                stop,
            ));
        }
        let id = routes.next_inbox;
        routes.next_inbox += 1;
        routes
            .inboxes
            .entry(customer.clone())
            .or_default()
            .push((id, Arc::clone(&shared)));
        Inbox {
            shared,
            registered: Some((Arc::clone(&self.router), customer, id)),
        }
    }
}

/// The inbox of one watcher, from [`Watchers::subscribe`]; it leaves the routes when dropped.
#[allow(missing_debug_implementations, reason = "holds the router")]
pub struct Inbox {
    shared: Arc<Shared>,
    registered: Option<(Arc<Router>, CustomerId, u64)>,
}

impl Inbox {
    /// Takes what arrived since the last take.
    pub(super) fn take(&self) -> Taken {
        let mut state = lock(&self.shared.state);
        state.held_count = std::mem::take(&mut state.count);
        state.held_bytes = std::mem::take(&mut state.bytes);
        let (end, through) = match state.end {
            Some((end, through)) => (Some(end), through),
            // Under the inbox's lock: a flush whose `through` is seen here put its entries in the
            // inbox before, and they are taken now (or were).
            None => (
                None,
                self.registered
                    .as_ref()
                    .map_or(0, |(router, _, _)| router.through.load(Ordering::Acquire)),
            ),
        };
        Taken {
            entries: std::mem::take(&mut state.entries),
            through,
            end,
        }
    }

    /// Tells the inbox that the watcher sent (or dropped) what it took last.
    pub(super) fn sent(&self) {
        let mut state = lock(&self.shared.state);
        state.held_count = 0;
        state.held_bytes = 0;
    }

    /// Resolves once something arrived since the last wait (at once if it did meanwhile).
    pub(super) async fn arrived(&self) {
        self.shared.arrived.notified().await;
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let Some((router, customer, id)) = self.registered.take() else {
            return;
        };
        let mut routes = lock(&router.routes);
        if let Some(inboxes) = routes.inboxes.get_mut(&customer) {
            inboxes.retain(|(inbox, _)| *inbox != id);
            if inboxes.is_empty() {
                routes.inboxes.remove(&customer);
            }
        }
        if routes.inboxes.is_empty()
            && let Some((_, stop)) = routes.reading.take()
        {
            // Nobody watches: the feed is not read (the store publishes nothing nobody hears).
            stop.cancel();
        }
    }
}

/// One reading of the feed: while it is the router's current one, its end (however it ends: the
/// feed closed, nobody watches, a panic, a runtime that dropped the task unpolled) leaves the
/// router without a reading, so that the next watcher starts one, and ends the inboxes left.
struct Reader {
    router: Arc<Router>,
    generation: u64,
}

impl Reader {
    fn is_current(&self, routes: &Routes) -> bool {
        routes
            .reading
            .as_ref()
            .is_some_and(|(reading, _)| *reading == self.generation)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut routes = lock(&self.router.routes);
        if !self.is_current(&routes) {
            return;
        }
        routes.reading = None;
        if !routes.inboxes.is_empty() {
            tracing::error!(
                watchers = routes.inboxes.values().map(Vec::len).sum::<usize>(),
                "the reading of the watch feed ended unexpectedly: its watchers end as lagged"
            );
            routes.end_all(FeedEnd::Lagged, self.router.through.load(Ordering::Acquire));
        }
    }
}

/// Reads the feed until `stop` (nobody watches), the feed closes or every inbox ended, handing
/// each flush's entries to their customers' inboxes.
async fn read_feed(mut live: broadcast::Receiver<Batch>, reader: Reader, stop: CancellationToken) {
    let router = Arc::clone(&reader.router);
    loop {
        let received = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            received = live.recv() => received,
        };
        let mut routes = lock(&router.routes);
        if !reader.is_current(&routes) {
            // Stopped while this waited for the routes: they may be a newer reading's already.
            return;
        }
        let through = router.through.load(Ordering::Acquire);
        match received {
            Ok(batch) => {
                routes.route(&batch, through);
                if let Some(last) = batch.last() {
                    router
                        .through
                        .fetch_max(last.position.sequence, Ordering::AcqRel);
                }
            }
            Err(RecvError::Lagged(missed)) => {
                // Flushes went by unread: every watcher resumes before them.
                tracing::warn!(
                    missed,
                    watchers = routes.inboxes.values().map(Vec::len).sum::<usize>(),
                    "the reading of the watch feed fell behind the store's flushes: every watcher ends as lagged"
                );
                routes.end_all(FeedEnd::Lagged, through);
            }
            Err(RecvError::Closed) => routes.end_all(FeedEnd::Closed, through),
        }
        if routes.inboxes.is_empty() {
            // Every inbox ended or went: the feed is not read until the next watcher. The router
            // is left without a reading here, under the lock that saw no inbox: left to the
            // reader's end, a watcher that subscribed in between would find this reading still
            // current, start none, and be ended as lagged by that end.
            routes.reading = None;
            return;
        }
    }
}

impl Routes {
    /// Ends every inbox (`end`, read through `through`) and takes it off the routes.
    fn end_all(&mut self, end: FeedEnd, through: u64) {
        for (_, shared) in self.inboxes.drain().flat_map(|(_, inboxes)| inboxes) {
            shared.end(end, through);
        }
    }

    /// Puts `batch`'s entries in the inboxes of their customers' watchers; an inbox they do not
    /// fit in ends (lagged, read through `through`, before this flush) and leaves the routes.
    fn route(&mut self, batch: &[TimelineEntry], through: u64) {
        if self.inboxes.is_empty() {
            return;
        }
        let mut mine: HashMap<&CustomerId, Vec<&TimelineEntry>> = HashMap::new();
        for entry in batch {
            let customer = &entry.touchpoint.customer_id;
            if self.inboxes.contains_key(customer) {
                mine.entry(customer).or_default().push(entry);
            }
        }
        for (customer, entries) in mine {
            let Some(inboxes) = self.inboxes.get_mut(customer) else {
                continue;
            };
            let bytes = entries
                .iter()
                .copied()
                .map(approximate_bytes)
                .fold(0, usize::saturating_add);
            // One copy for all the customer's watchers.
            let entries: Batch = entries.into_iter().cloned().collect();
            inboxes.retain(|(_, shared)| {
                let kept = {
                    let mut state = lock(&shared.state);
                    if state.end.is_some() {
                        false
                    } else {
                        let holds_a_flush =
                            state.held_count > MAX_ENTRIES || state.held_bytes > MAX_BYTES;
                        let factor = if state.entries.is_empty() && !holds_a_flush {
                            ONE_FLUSH_FACTOR
                        } else {
                            1
                        };
                        if state.count.saturating_add(entries.len()) > MAX_ENTRIES * factor
                            || state.bytes.saturating_add(bytes) > MAX_BYTES * factor
                        {
                            // Not this flush's entries: the watcher resumes before them.
                            state.end = Some((FeedEnd::Lagged, through));
                            false
                        } else {
                            state.entries.push(Arc::clone(&entries));
                            state.count = state.count.saturating_add(entries.len());
                            state.bytes = state.bytes.saturating_add(bytes);
                            true
                        }
                    }
                };
                shared.arrived.notify_one();
                kept
            });
            if inboxes.is_empty() {
                self.inboxes.remove(customer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use touchline_core::{
        Channel, EventId, EventType, JourneyStage, LogPosition, PartnerId, Touchpoint, UnixNanos,
    };

    use super::*;

    fn entry(customer: &str, sequence: u64) -> TimelineEntry {
        TimelineEntry {
            partner_id: PartnerId::parse("courier").expect("valid"),
            touchpoint: Touchpoint {
                event_id: EventId::parse(format!("e{sequence}")).expect("valid"),
                customer_id: customer_id(customer),
                event_type: EventType::parse("delivery.completed").expect("valid"),
                occurred_at: UnixNanos(i64::try_from(sequence).unwrap_or_default()),
                channel: Channel::Web,
                stage: JourneyStage::Fulfil,
                outcome: None,
                attributes: BTreeMap::new(),
                payload: Vec::new(),
            },
            received_at: UnixNanos(0),
            position: LogPosition {
                partition: 0,
                offset: i64::try_from(sequence).unwrap_or_default(),
                sequence,
            },
        }
    }

    fn customer_id(customer: &str) -> CustomerId {
        CustomerId::parse(customer).expect("valid")
    }

    fn batch(entries: Vec<TimelineEntry>) -> Batch {
        Arc::from(entries)
    }

    fn sequences(taken: &Taken) -> Vec<u64> {
        taken
            .entries
            .iter()
            .flat_map(|part| part.iter())
            .map(|entry| entry.position.sequence)
            .collect()
    }

    /// The sequences of the entries taken, in order.
    fn routed(taken: &[Taken]) -> Vec<u64> {
        taken.iter().flat_map(sequences).collect()
    }

    /// Waits until `inbox` has taken what the feed's reader routed through `sequence`, or ended.
    async fn take_through(inbox: &Inbox, sequence: u64) -> anyhow::Result<Vec<Taken>> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut taken = Vec::new();
        loop {
            let now = inbox.take();
            let done = now.through >= sequence || now.end.is_some();
            taken.push(now);
            if done {
                return Ok(taken);
            }
            tokio::time::timeout_at(deadline, inbox.arrived())
                .await
                .map_err(|_| anyhow::anyhow!("not routed through {sequence} within 30 s"))?;
        }
    }

    /// Polls `condition` until it holds, for up to 30 s.
    async fn wait_until(what: &str, condition: impl Fn() -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while !condition() {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "not within 30 s: {what}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Ok(())
    }

    #[tokio::test]
    async fn each_inbox_gets_its_customers_entries_and_how_far_the_feed_was_read()
    -> anyhow::Result<()> {
        let (feed, _) = broadcast::channel(16);
        let watchers = Watchers::new(&feed);
        let alice = watchers.subscribe(customer_id("alice"));
        let alice_again = watchers.subscribe(customer_id("alice"));
        let bob = watchers.subscribe(customer_id("bob"));
        let quiet = watchers.subscribe(customer_id("carol"));
        feed.send(batch(vec![
            entry("alice", 1),
            entry("bob", 2),
            entry("dave", 3),
            entry("alice", 4),
        ]))?;
        feed.send(batch(vec![entry("bob", 5), entry("dave", 6)]))?;

        assert_eq!(routed(&take_through(&alice, 6).await?), vec![1, 4]);
        assert_eq!(routed(&take_through(&alice_again, 6).await?), vec![1, 4]);
        assert_eq!(routed(&take_through(&bob, 6).await?), vec![2, 5]);
        // A quiet customer's inbox knows how far the feed was read: its watcher resumes there.
        let taken = quiet.take();
        assert!(taken.entries.is_empty());
        assert_eq!((taken.through, taken.end), (6, None));
        Ok(())
    }

    #[tokio::test]
    async fn the_feed_is_read_while_anyone_watches() -> anyhow::Result<()> {
        let (feed, _) = broadcast::channel(16);
        let watchers = Watchers::new(&feed);
        assert_eq!(feed.receiver_count(), 0, "nobody watches: nothing reads");
        let first = watchers.subscribe(customer_id("alice"));
        let second = watchers.subscribe(customer_id("bob"));
        assert_eq!(feed.receiver_count(), 1, "one reading for every watcher");
        drop(first);
        feed.send(batch(vec![entry("bob", 1)]))?;
        let taken = take_through(&second, 1).await?;
        assert_eq!(routed(&taken), vec![1]);
        drop(second);
        wait_until("the feed's reader stops", || feed.receiver_count() == 0).await?;
        // A watcher after that gets the flushes published after its subscription.
        let again = watchers.subscribe(customer_id("bob"));
        assert_eq!(feed.receiver_count(), 1);
        feed.send(batch(vec![entry("bob", 2)]))?;
        let taken = take_through(&again, 2).await?;
        assert_eq!(routed(&taken), vec![2]);
        Ok(())
    }

    #[tokio::test]
    async fn an_inbox_that_overflows_ends_before_the_flush_and_the_others_go_on()
    -> anyhow::Result<()> {
        let (feed, _) = broadcast::channel(16);
        let watchers = Watchers::new(&feed);
        let slow = watchers.subscribe(customer_id("alice"));
        let other = watchers.subscribe(customer_id("bob"));
        let half = u64::try_from(MAX_ENTRIES / 2)?;
        feed.send(batch(
            (1..=half)
                .map(|sequence| entry("alice", sequence))
                .collect(),
        ))?;
        let next = half + 1;
        feed.send(batch(vec![entry("alice", next), entry("bob", next + 1)]))?;
        // Half of the bound again, with what the inbox holds: more than it takes.
        let overflowing = next + 2;
        let bob_last = overflowing + half;
        feed.send(batch(
            (overflowing..bob_last)
                .map(|sequence| entry("alice", sequence))
                .chain([entry("bob", bob_last)])
                .collect(),
        ))?;
        let bob = take_through(&other, bob_last).await?;
        assert_eq!(
            routed(&bob),
            vec![next + 1, bob_last],
            "the other watcher goes on"
        );
        let taken = slow.take();
        assert_eq!(sequences(&taken).len(), MAX_ENTRIES / 2 + 1);
        assert_eq!(
            (taken.through, taken.end),
            (next + 1, Some(FeedEnd::Lagged)),
            "resumes before the flush it could not take"
        );
        Ok(())
    }

    /// An empty inbox takes one flush whole up to eight times the bounds, but only while its
    /// watcher holds no such flush it took: a watcher holds one at most, not one it sends and
    /// another queued (holding a few entries, it takes one).
    #[tokio::test]
    async fn an_empty_inbox_takes_one_large_flush_while_its_watcher_holds_none()
    -> anyhow::Result<()> {
        let (feed, _) = broadcast::channel(16);
        let watchers = Watchers::new(&feed);
        let alice = watchers.subscribe(customer_id("alice"));
        let large = u64::try_from(MAX_ENTRIES * 2)?;
        let flush = |first: u64| {
            batch(
                (first..first + large)
                    .map(|sequence| entry("alice", sequence))
                    .collect(),
            )
        };
        feed.send(flush(1))?;
        let taken = take_through(&alice, large).await?;
        assert_eq!(routed(&taken).len(), MAX_ENTRIES * 2, "taken whole");
        alice.sent();
        // Sent: the next large flush is taken whole too.
        feed.send(flush(large + 1))?;
        let taken = take_through(&alice, 2 * large).await?;
        assert_eq!(routed(&taken).len(), MAX_ENTRIES * 2);
        assert!(taken.iter().all(|taken| taken.end.is_none()));
        alice.sent();
        // A few entries held (not sent yet): a large flush is taken whole all the same.
        feed.send(batch(vec![entry("alice", 2 * large + 1)]))?;
        take_through(&alice, 2 * large + 1).await?;
        feed.send(flush(2 * large + 2))?;
        let taken = take_through(&alice, 3 * large + 1).await?;
        assert_eq!(routed(&taken).len(), MAX_ENTRIES * 2);
        assert!(taken.iter().all(|taken| taken.end.is_none()));
        // A large flush held (not sent yet): another is past the bounds, and the watcher lags.
        feed.send(flush(3 * large + 2))?;
        wait_until("the inbox ended", || {
            lock(&alice.shared.state).end.is_some()
        })
        .await?;
        let taken = alice.take();
        assert_eq!(
            (taken.through, taken.end),
            (3 * large + 1, Some(FeedEnd::Lagged))
        );
        assert!(
            sequences(&taken).is_empty(),
            "none of the flush it could not take"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_reader_left_behind_by_the_feed_ends_every_inbox_where_it_was() -> anyhow::Result<()>
    {
        let (feed, _) = broadcast::channel(2);
        let watchers = Watchers::new(&feed);
        let alice = watchers.subscribe(customer_id("alice"));
        let bob = watchers.subscribe(customer_id("bob"));
        feed.send(batch(vec![entry("alice", 1)]))?;
        take_through(&alice, 1).await?;
        // On this single-threaded runtime the reader runs only when the test waits.
        for sequence in 2..=10 {
            feed.send(batch(vec![entry("bob", sequence)]))?;
        }
        for inbox in [&alice, &bob] {
            let taken = take_through(inbox, u64::MAX).await?;
            assert!(
                taken.iter().all(|taken| taken.entries.is_empty()),
                "none of the flushes after the reader fell behind"
            );
            let last = taken.last().expect("taken");
            assert_eq!((last.through, last.end), (1, Some(FeedEnd::Lagged)));
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_reading_that_ends_unexpectedly_ends_its_inboxes_and_the_next_watcher_reads_again()
    -> anyhow::Result<()> {
        let (feed, _) = broadcast::channel(16);
        let watchers = Watchers::new(&feed);
        let alice = watchers.subscribe(customer_id("alice"));
        // What a panic, or a runtime dropping the task unpolled, does: the current reading's
        // guard goes.
        let generation = lock(&watchers.router.routes)
            .reading
            .as_ref()
            .map(|(generation, _)| *generation)
            .ok_or_else(|| anyhow::anyhow!("no reading"))?;
        drop(Reader {
            router: Arc::clone(&watchers.router),
            generation,
        });
        assert_eq!(alice.take().end, Some(FeedEnd::Lagged));
        let bob = watchers.subscribe(customer_id("bob"));
        feed.send(batch(vec![entry("bob", 1)]))?;
        let taken = take_through(&bob, 1).await?;
        assert_eq!(
            routed(&taken),
            vec![1],
            "a new reading routes the flushes after it"
        );
        Ok(())
    }

    #[tokio::test]
    async fn inboxes_end_when_the_feed_closes() -> anyhow::Result<()> {
        let (feed, _) = broadcast::channel(2);
        let watchers = Watchers::new(&feed);
        let alice = watchers.subscribe(customer_id("alice"));
        feed.send(batch(vec![entry("alice", 1)]))?;
        drop(feed);
        let taken = take_through(&alice, u64::MAX).await?;
        assert_eq!(routed(&taken), vec![1]);
        let last = taken.last().expect("taken");
        assert_eq!((last.through, last.end), (1, Some(FeedEnd::Closed)));
        // A watcher of a closed feed ends at once.
        let late = watchers.subscribe(customer_id("alice"));
        assert_eq!(late.take().end, Some(FeedEnd::Closed));
        Ok(())
    }
}
