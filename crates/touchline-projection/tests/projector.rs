//! The projector on the embedded Kafka broker and a real sled: batches are written one at a time,
//! in order (the next one is decoded while the current one is written), and a store write that
//! fails stops the projector before any later batch is stored. The failure is injected by a
//! wrapper that hands every call to the real store except the apply it is told to refuse. A
//! projector that resumes below a partition's oldest record (retention deleted what it had not
//! read), or whose next records are deleted while it lags, counts the records lost and reads on
//! from the oldest left.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use touchline_core::{
    ApplyOutcome, ConsumedRecord, CustomerId, EventStore, PartnerId, StoreError, StoredPosition,
    StreamIdentity, TimelineCursor, TimelineEntry, TimelinePage, TimelineQuery,
};
use touchline_kafka::{EmbeddedBroker, KafkaOptions};
use touchline_projection::{Projector, ProjectorOptions, SledStore};

mod support;

const TOPIC: &str = "touchpoints";
const EVENTS: usize = 600;

/// The real store, except that apply number `fail_at` (counting from 1) fails without writing.
#[derive(Debug)]
struct RefusingStore {
    inner: Arc<SledStore>,
    fail_at: usize,
    applies: AtomicUsize,
    /// Records in each apply that went through, in order.
    applied: Mutex<Vec<usize>>,
    /// While true, a flush waits (a hung flush).
    flush_held: Mutex<bool>,
    flush_released: std::sync::Condvar,
}

impl RefusingStore {
    fn new(inner: Arc<SledStore>, fail_at: usize) -> Self {
        Self {
            inner,
            fail_at,
            applies: AtomicUsize::new(0),
            applied: Mutex::new(Vec::new()),
            flush_held: Mutex::new(false),
            flush_released: std::sync::Condvar::new(),
        }
    }

    fn hold_flushes(&self, held: bool) {
        *self
            .flush_held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = held;
        self.flush_released.notify_all();
    }
}

/// Lets held flushes go when dropped, also when a test fails: a runtime waits for its blocking
/// tasks as it ends, and a held flush would hang the test instead of failing it.
struct ReleaseFlushes(Arc<RefusingStore>);

impl Drop for ReleaseFlushes {
    fn drop(&mut self) {
        self.0.hold_flushes(false);
    }
}

impl EventStore for RefusingStore {
    fn apply(
        &self,
        stream: &StreamIdentity,
        records: Vec<ConsumedRecord>,
    ) -> Result<ApplyOutcome, StoreError> {
        let number = self.applies.fetch_add(1, Ordering::SeqCst) + 1;
        if number == self.fail_at {
            return Err(StoreError::Backend("injected write failure".into()));
        }
        let count = records.len();
        let outcome = self.inner.apply(stream, records)?;
        self.applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(count);
        Ok(outcome)
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
        self.inner.log_entries(customer_id, from, end)
    }

    fn timeline(&self, query: &TimelineQuery) -> Result<TimelinePage, StoreError> {
        self.inner.timeline(query)
    }

    fn summary(
        &self,
        customer_id: &CustomerId,
    ) -> Result<Option<touchline_core::CustomerSummary>, StoreError> {
        self.inner.summary(customer_id)
    }

    fn timeline_entry(
        &self,
        customer_id: &CustomerId,
        at: TimelineCursor,
    ) -> Result<Option<TimelineEntry>, StoreError> {
        self.inner.timeline_entry(customer_id, at)
    }

    fn event_sequence(
        &self,
        partner: &PartnerId,
        event_id: &touchline_core::EventId,
    ) -> Result<Option<u64>, StoreError> {
        self.inner.event_sequence(partner, event_id)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let mut held = self
            .flush_held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *held {
            held = self
                .flush_released
                .wait(held)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        drop(held);
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

/// An embedded broker with the topic in one partition, and options to reach it.
fn one_partition_broker() -> (EmbeddedBroker, KafkaOptions) {
    let broker = EmbeddedBroker::start(1, TOPIC, 1).expect("broker starts");
    let kafka = KafkaOptions {
        bootstrap_servers: broker.bootstrap_servers().to_owned(),
        topic: TOPIC.to_owned(),
        partitions: 1,
        ..KafkaOptions::default()
    };
    (broker, kafka)
}

/// [`EVENTS`] events in a one-partition topic, and a fresh store behind a [`RefusingStore`] that
/// refuses apply number `fail_at`. Every event is in the topic before a projector starts: it
/// reads full batches back to back, so the next batch is being decoded while the one before is
/// written.
async fn produced(
    fail_at: usize,
) -> (
    EmbeddedBroker,
    KafkaOptions,
    tempfile::TempDir,
    Arc<SledStore>,
    Arc<RefusingStore>,
) {
    let (broker, kafka) = one_partition_broker();
    support::produce(&kafka, 0, EVENTS, 1000)
        .await
        .expect("produced");
    let dir = tempfile::tempdir().expect("temp dir");
    let sled = Arc::new(SledStore::open(dir.path()).expect("opens"));
    let store = Arc::new(RefusingStore::new(Arc::clone(&sled), fail_at));
    (broker, kafka, dir, sled, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_stops_the_projector_before_any_later_batch_is_stored() {
    let (_broker, kafka, _dir, sled, store) = produced(3).await;
    let mut options = ProjectorOptions::new(kafka);
    options.max_batch = 100;
    let shared: Arc<dyn EventStore> = store.clone();
    let (projector, handle) = Projector::new(options, shared).await.expect("starts");
    let stream = handle.stream().clone();
    let stopped = stops_by_itself(projector).await;
    assert!(
        stopped
            .as_ref()
            .is_err_and(|error| format!("{error:#}").contains("injected write failure")),
        "the failed write is reported: {stopped:?}"
    );

    let applied = store
        .applied
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    assert_eq!(applied.len(), 2, "the two writes before the failed one");
    assert_eq!(
        store.applies.load(Ordering::SeqCst),
        3,
        "nothing was written after the failed write"
    );
    let stored: usize = applied.iter().sum();
    assert!(stored > 0 && stored < EVENTS, "{applied:?}");
    assert_eq!(
        sled.log_len(),
        stored,
        "the log holds exactly those batches"
    );
    let positions = sled.positions(&stream).expect("positions");
    assert_eq!(
        positions.get(&0).map(|position| position.next_offset),
        Some(i64::try_from(stored).unwrap_or_default()),
        "the stored position is right after the last stored record: reading resumes there"
    );
    // What was applied before the failure was made durable and published before the projector
    // reported (dev-mode acknowledgements wait on the published offsets).
    assert_eq!(
        sled.durable_sequence(),
        u64::try_from(stored).unwrap_or_default()
    );
    assert_eq!(
        handle.applied_offsets().borrow().get(&0).copied(),
        Some(i64::try_from(stored).unwrap_or_default())
    );
}

/// A flush that does not end (sled 0.34's can hang once it failed to create a file) stops the
/// projector's reading after `UNFLUSHED_BATCHES` batches applied ahead of it, instead of letting
/// the backlog pile up in memory unflushed; once the flush ends, it reads on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_that_hangs_stops_the_reading_a_few_batches_ahead() {
    const BATCH: usize = 10;
    let (_broker, kafka, _dir, sled, store) = produced(usize::MAX).await;
    store.hold_flushes(true);
    let release = ReleaseFlushes(Arc::clone(&store));
    let mut options = ProjectorOptions::new(kafka);
    options.max_batch = BATCH;
    let shared: Arc<dyn EventStore> = store.clone();
    let (projector, _) = Projector::new(options, shared).await.expect("starts");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(projector.run(shutdown.clone()));

    let limit = u64::try_from(touchline_projection::UNFLUSHED_BATCHES * BATCH).unwrap_or(u64::MAX);
    // A write started just below the limit, and the batch decoded beside it.
    let bound = limit + 2 * u64::try_from(BATCH).unwrap_or(u64::MAX);
    until("the projector applies up to its limit", || {
        sled.visible_sequence() >= limit
    })
    .await;
    // Every record is in the consumer's reach: a projector that did not stop would apply all
    // 600 within milliseconds. Watched for a second.
    let watched = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    while tokio::time::Instant::now() < watched {
        let applied = sled.visible_sequence();
        assert!(
            applied <= bound,
            "{applied} events applied while no flush ended (at most {bound})"
        );
        poll.tick().await;
    }
    assert_eq!(sled.durable_sequence(), 0, "no flush ended");

    drop(release);
    let events = u64::try_from(EVENTS).unwrap_or(u64::MAX);
    until(
        "every event is applied and durable once flushes end",
        || sled.durable_sequence() == events,
    )
    .await;
    shutdown.cancel();
    running
        .await
        .expect("the projector's task")
        .expect("the projector stops cleanly");
}

/// A flush that does not end within `flush_stall` stops the projector with its error (the node
/// then fails and stops, rather than stay up acknowledging nothing): it waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_that_does_not_end_stops_the_projector() {
    let (_broker, kafka, _dir, _sled, store) = produced(usize::MAX).await;
    store.hold_flushes(true);
    let release = ReleaseFlushes(Arc::clone(&store));
    let mut options = ProjectorOptions::new(kafka);
    options.flush_stall = Duration::from_millis(300);
    let shared: Arc<dyn EventStore> = store.clone();
    let (projector, _) = Projector::new(options, shared).await.expect("starts");
    let stopped = stops_by_itself(projector).await;
    assert!(
        matches!(
            stopped,
            Err(touchline_projection::Error::FlushStalled(stall)) if stall == Duration::from_millis(300)
        ),
        "{stopped:?}"
    );
    drop(release);
}

/// Runs `projector` without a shutdown until it stops by itself (within a minute).
async fn stops_by_itself(projector: Projector) -> touchline_projection::Result<()> {
    tokio::time::timeout(
        Duration::from_secs(60),
        projector.run(CancellationToken::new()),
    )
    .await
    .expect("the projector stops by itself")
}

/// Polls `done` every 20 ms until it holds, or fails with `what` after a minute.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        poll.tick().await;
    }
}

/// Held by the tests that count lost records: the counter is the process's.
static LOSSES_COUNTED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn lost_so_far() -> u64 {
    touchline_projection::metrics::PROJECTOR
        .lost_to_retention
        .get()
}

/// The oldest and next offsets of `kafka`'s topic's partition 0.
fn watermarks(kafka: &KafkaOptions) -> (i64, i64) {
    let consumer: rdkafka::consumer::BaseConsumer =
        kafka.consumer_config().create().expect("consumer");
    rdkafka::consumer::Consumer::fetch_watermarks(&consumer, TOPIC, 0, Duration::from_secs(10))
        .expect("watermarks")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_retention_deleted_before_they_were_read_are_counted_as_lost() {
    let _counting = LOSSES_COUNTED.lock().await;
    let (_broker, kafka) = one_partition_broker();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(SledStore::open(dir.path()).expect("opens"));
    let project = || async {
        let shared: Arc<dyn EventStore> = store.clone();
        let (projector, _) = Projector::new(ProjectorOptions::new(kafka.clone()), shared)
            .await
            .expect("starts");
        let stop = CancellationToken::new();
        (tokio::spawn(projector.run(stop.clone())), stop)
    };

    // Ten events projected, their position stored; then the projector stops.
    support::produce(&kafka, 0, 10, 1000)
        .await
        .expect("produced");
    let (running, stop) = project().await;
    until("the first events were never projected", || {
        store.log_len() == 10
    })
    .await;
    stop.cancel();
    running.await.expect("joins").expect("stops cleanly");

    // While it is stopped, the broker drops the oldest records to make room (about 5 MiB a
    // partition, as retention would), the ten and the first ones after them among them.
    support::produce(&kafka, 10, 100_000, 1000)
        .await
        .expect("produced");
    until("the broker never dropped the oldest records", || {
        watermarks(&kafka).0 > 10
    })
    .await;
    let (low, high) = watermarks(&kafka);

    let lost_before = lost_so_far();
    // Counted at the start, once: the start stores the position past the loss, so a start after
    // one that stopped before it projected anything (a crash, a deploy) does not count it again,
    // also on a partition where no record comes.
    for _ in 0..2 {
        let shared: Arc<dyn EventStore> = store.clone();
        let (projector, _) = Projector::new(ProjectorOptions::new(kafka.clone()), shared)
            .await
            .expect("starts");
        drop(projector);
        assert_eq!(
            lost_so_far() - lost_before,
            u64::try_from(low - 10).expect("a count"),
            "the records between the stored position and the oldest one left, once"
        );
    }
    let (running, stop) = project().await;
    // It reads on from the oldest record left: every record from there is projected.
    let expected = 10 + usize::try_from(high - low).expect("a count");
    until("the records left were never projected", || {
        store.log_len() == expected
    })
    .await;
    assert_eq!(
        lost_so_far() - lost_before,
        u64::try_from(low - 10).expect("a count"),
        "the records between the stored position and the oldest one left"
    );
    stop.cancel();
    running.await.expect("joins").expect("stops cleanly");
}

/// A running projector that falls further behind than the broker keeps records: librdkafka moves
/// its consumer on to the oldest record left, and the records it went past are counted as lost,
/// as at a start below the oldest record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_while_the_projector_lags_are_counted_as_lost() {
    const BATCH: usize = 10;
    let _counting = LOSSES_COUNTED.lock().await;
    let (_broker, mut kafka) = one_partition_broker();
    // A small read-ahead: the consumer holds far fewer records fetched than the broker keeps.
    kafka.consumer_properties = [
        ("queued.min.messages", "100"),
        ("queued.max.messages.kbytes", "256"),
        ("max.partition.fetch.bytes", "65536"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    support::produce(&kafka, 0, EVENTS, 1000)
        .await
        .expect("produced");
    let dir = tempfile::tempdir().expect("temp dir");
    let sled = Arc::new(SledStore::open(dir.path()).expect("opens"));
    let store = Arc::new(RefusingStore::new(Arc::clone(&sled), usize::MAX));
    // Flushes held: the projector stops reading a few batches ahead of them (it lags).
    store.hold_flushes(true);
    let release = ReleaseFlushes(Arc::clone(&store));
    let mut options = ProjectorOptions::new(kafka.clone());
    options.max_batch = BATCH;
    let shared: Arc<dyn EventStore> = store.clone();
    let (projector, handle) = Projector::new(options, shared).await.expect("starts");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(projector.run(shutdown.clone()));
    let ahead = u64::try_from(touchline_projection::UNFLUSHED_BATCHES * BATCH).expect("a count");
    until("the projector never read up to its limit", || {
        sled.visible_sequence() >= ahead
    })
    .await;

    // Meanwhile the broker drops the oldest records to make room (about 5 MiB a partition, as
    // retention would): far past what the consumer has read or fetched ahead.
    support::produce(&kafka, EVENTS, 100_000, 1000)
        .await
        .expect("produced");
    until("the broker never dropped the oldest records", || {
        watermarks(&kafka).0 > 20_000
    })
    .await;
    let (_, high) = watermarks(&kafka);
    let lost_before = lost_so_far();
    drop(release);

    until("the last record was never projected", || {
        handle.applied_offsets().borrow().get(&0).copied() == Some(high)
    })
    .await;
    let lost = lost_so_far() - lost_before;
    assert!(lost > 0, "the records deleted unread are counted");
    assert_eq!(
        lost + u64::try_from(sled.log_len()).expect("a count"),
        u64::try_from(high).expect("a count"),
        "every record is either projected or counted as lost"
    );
    shutdown.cancel();
    running.await.expect("joins").expect("stops cleanly");
}
