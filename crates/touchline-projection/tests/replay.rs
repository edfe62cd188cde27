//! Replays that cannot read what they planned, on the embedded Kafka broker and a real sled: a
//! broker that no longer has the offsets still to be read (its retention deleted them) ends the
//! replay with `RangeGone`, never a finished replay that skipped them (and a fetch refused as out
//! of range with nothing gone, first or in the middle, is fetched again: every record once); a
//! broker that goes away in the middle ends it once its unfinished partitions received nothing
//! for the idle timeout.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::types::RDKafkaRespErr;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use touchline_kafka::{EmbeddedBroker, KafkaOptions};
use touchline_projection::SledStore;
use touchline_projection::ops::{ReplayError, ReplayFrom, ReplayProgress, replay};

mod support;

const TOPIC: &str = "touchpoints";

/// A broker with `events` events in its one partition (in record batches of at most `batch`),
/// and options to read it.
async fn broker_with(
    events: usize,
    batch: usize,
) -> anyhow::Result<(EmbeddedBroker, KafkaOptions)> {
    let broker = EmbeddedBroker::start(1, TOPIC, 1)?;
    let kafka = KafkaOptions {
        bootstrap_servers: broker.bootstrap_servers().to_owned(),
        topic: TOPIC.to_owned(),
        partitions: 1,
        ..KafkaOptions::default()
    };
    support::produce(&kafka, 0, events, batch).await?;
    Ok((broker, kafka))
}

/// A broker with `events` events in batches of 5, each fetch answered 50 ms late (the embedded
/// broker answers a fetch with one batch), and a replay of it under way: it has read some, not
/// all. Returns the broker, the store, the replay and its progress.
async fn replay_under_way(
    events: usize,
    idle: Duration,
) -> anyhow::Result<(
    EmbeddedBroker,
    Arc<SledStore>,
    tempfile::TempDir,
    tokio::task::JoinHandle<Result<ReplayProgress, ReplayError>>,
    watch::Receiver<ReplayProgress>,
)> {
    let (broker, kafka) = broker_with(events, 5).await?;
    broker.set_round_trip_time(Duration::from_millis(50))?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(dir.path())?);
    let (progress, mut watching) = watch::channel(ReplayProgress::default());
    let replaying = tokio::spawn({
        let store = Arc::clone(&store);
        async move { replay_all(&kafka, &store, &progress, idle).await }
    });
    let started = tokio::time::timeout(
        Duration::from_secs(60),
        watching.wait_for(|progress| progress.read > 0),
    )
    .await?
    .map(|_| ());
    if started.is_err() {
        anyhow::bail!("the replay ended first: {:?}", replaying.await?);
    }
    Ok((broker, store, dir, replaying, watching))
}

/// Runs a replay from the oldest record of every partition, its progress on `progress`.
async fn replay_all(
    kafka: &KafkaOptions,
    store: &Arc<SledStore>,
    progress: &watch::Sender<ReplayProgress>,
    idle: Duration,
) -> Result<ReplayProgress, ReplayError> {
    replay(
        kafka,
        Arc::clone(store),
        ReplayFrom::Earliest,
        &[],
        &touchline_projection::projector::Served::default(),
        progress,
        &CancellationToken::new(),
        idle,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_before_the_replay_read_them_end_it_unfinished() -> anyhow::Result<()> {
    // The embedded broker keeps about 5 MiB of a partition and drops older records, as
    // retention does. It refuses the replay's fetches (as timed out: librdkafka backs off and
    // tries again) until 100,000 more events, sent once the replay planned its range of the
    // first 20,000, have pushed its oldest record past the range's start.
    let (broker, kafka) = broker_with(20_000, 1000).await?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(dir.path())?);
    broker.fail_next_fetches(&[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 1000])?;
    let (progress, mut watching) = watch::channel(ReplayProgress::default());
    let replaying = tokio::spawn({
        let (kafka, store) = (kafka.clone(), Arc::clone(&store));
        async move { replay_all(&kafka, &store, &progress, Duration::from_secs(300)).await }
    });
    tokio::time::timeout(
        Duration::from_secs(60),
        watching.wait_for(|progress| !progress.ranges.is_empty()),
    )
    .await??;
    assert_eq!(
        watching.borrow().ranges.get(&0),
        Some(&(0, 20_000)),
        "the planned range"
    );
    support::produce(&kafka, 20_000, 100_000, 1000).await?;
    let watermarks: rdkafka::consumer::BaseConsumer = kafka.consumer_config().create()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        poll.tick().await;
        let (low, _) = rdkafka::consumer::Consumer::fetch_watermarks(
            &watermarks,
            TOPIC,
            0,
            Duration::from_secs(10),
        )?;
        if low > 0 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the broker never dropped the oldest records"
        );
    }
    broker.clear_fetch_errors()?;
    let replayed = tokio::time::timeout(Duration::from_secs(60), replaying).await??;
    assert!(
        matches!(replayed, Err(ReplayError::RangeGone)),
        "{replayed:?}"
    );
    assert!(!watching.borrow().finished);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_answered_out_of_range_with_nothing_gone_is_read_again() -> anyhow::Result<()> {
    let (broker, kafka) = broker_with(50, 1000).await?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(dir.path())?);
    // The broker refuses the replay's first fetch as out of range, though it has every record.
    broker.fail_next_fetches(&[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE])?;
    let (progress, _) = watch::channel(ReplayProgress::default());
    let replayed = tokio::time::timeout(
        Duration::from_secs(60),
        replay_all(&kafka, &store, &progress, Duration::from_secs(30)),
    )
    .await??;
    assert!(replayed.finished, "{replayed:?}");
    assert_eq!(replayed.appended, 50, "{replayed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_refused_in_the_middle_goes_on_from_where_the_replay_was() -> anyhow::Result<()> {
    // A fetch is refused as out of range while the replay reads, with nothing gone.
    let (broker, store, _dir, replaying, _) =
        replay_under_way(300, Duration::from_secs(30)).await?;
    broker.fail_next_fetches(&[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE])?;
    let replayed = tokio::time::timeout(Duration::from_secs(60), replaying).await???;
    // Every record once: none skipped, none applied twice.
    assert!(replayed.finished, "{replayed:?}");
    assert_eq!(
        (replayed.read, replayed.appended, replayed.duplicates),
        (300, 300, 0),
        "{replayed:?}"
    );
    assert_eq!(store.log_len(), 300);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_gone_in_the_middle_ends_the_replay_after_the_idle_timeout() -> anyhow::Result<()>
{
    let (broker, _store, _dir, replaying, watching) =
        replay_under_way(3000, Duration::from_secs(10)).await?;
    broker.broker_down()?;
    let replayed = tokio::time::timeout(Duration::from_secs(60), replaying).await??;
    let error = replayed.expect_err("the replay ends with an error");
    assert!(
        error.to_string().contains("nothing received from Kafka"),
        "{error}"
    );
    let read = watching.borrow().read;
    assert!(read > 0 && read < 3000, "{read}");
    assert!(!watching.borrow().finished);
    Ok(())
}
