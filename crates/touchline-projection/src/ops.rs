//! What ops run against a projector's store: rebuilds of a projection from the log (in the
//! background, beside the projector, switching atomically when caught up) and replays of the
//! Kafka topic into the log.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use touchline_core::{EventStore as _, StreamIdentity, UnixNanos};
use touchline_kafka::KafkaOptions;
use tracing::{info, warn};

use crate::metrics::{PROJECTOR, ProjectionLabel};
use crate::projector::{consumed_record, kafka_setup};
use crate::{Error, OpsError, Projection, SledStore};

/// Log events folded per atomic batch of a rebuild, unless configured otherwise.
pub const REBUILD_CHUNK: usize = 2000;

/// Rebuild rounds in a row without closing the gap to the log's end before the rebuild switches
/// anyway (folding the gap while the projector waits).
const MAX_ROUNDS_NOT_GAINING: u32 = 50;

/// A replay that receives nothing for this long (the broker is gone) ends with an error.
const REPLAY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a rebuild stands.
#[derive(Debug, Clone, PartialEq)]
pub enum RebuildState {
    /// Folding the log into the new version.
    Running,
    /// The new version is active; the previous one was dropped.
    Switched { previous: u32 },
    /// Cancelled: the new version was dropped, the active one is untouched.
    Cancelled,
    /// Failed: the new version was dropped (or will be on the next start), the active one is
    /// untouched.
    Failed(String),
}

/// Progress of one rebuild.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildProgress {
    pub projection: Projection,
    pub version: u32,
    /// Log events folded into the new version.
    pub done: u64,
    /// Events in the log now (it grows while events arrive).
    pub total: u64,
    /// Events folded per second since the rebuild started.
    pub rate: f64,
    pub started_at: UnixNanos,
    pub state: RebuildState,
}

impl RebuildProgress {
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.state != RebuildState::Running
    }
}

#[derive(Debug)]
struct Job {
    progress: watch::Receiver<RebuildProgress>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// The rebuilds of one store: at most one per projection at a time.
#[derive(Debug)]
pub struct Rebuilds {
    store: Arc<SledStore>,
    chunk: usize,
    jobs: Mutex<HashMap<Projection, Job>>,
}

impl Rebuilds {
    /// Rebuilds of `store`, folding `chunk` log events per atomic batch.
    #[must_use]
    pub fn new(store: Arc<SledStore>, chunk: usize) -> Self {
        Self {
            store,
            chunk: chunk.max(1),
            jobs: Mutex::new(HashMap::new()),
        }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<Projection, Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a rebuild of `projection`, or attaches to the one running. Returns its progress
    /// and whether it was started by this call. The rebuild runs on until it switches, fails or
    /// is cancelled, whether anyone watches its progress or not.
    ///
    /// # Errors
    /// When the store refuses to begin (it already builds a version this node does not run).
    pub fn start(
        &self,
        projection: Projection,
    ) -> std::result::Result<(watch::Receiver<RebuildProgress>, bool), OpsError> {
        let mut jobs = self.jobs();
        if let Some(job) = jobs.get(&projection)
            && !job.progress.borrow().is_finished()
            // A rebuild task that panicked never reports an end.
            && !job.task.is_finished()
        {
            return Ok((job.progress.clone(), false));
        }
        let (version, total) = self.store.begin_rebuild(projection)?;
        info!(%projection, version, total, "rebuild started");
        let (sender, progress) = watch::channel(RebuildProgress {
            projection,
            version,
            done: 0,
            total,
            rate: 0.0,
            started_at: UnixNanos::now(),
            state: RebuildState::Running,
        });
        let cancel = CancellationToken::new();
        let store = Arc::clone(&self.store);
        let chunk = self.chunk;
        let task = tokio::task::spawn_blocking({
            let cancel = cancel.clone();
            move || run_rebuild(&store, projection, version, chunk, &sender, &cancel)
        });
        jobs.insert(
            projection,
            Job {
                progress: progress.clone(),
                cancel,
                task,
            },
        );
        Ok((progress, true))
    }

    /// Cancels the running rebuild of `projection`; returns its progress, `None` when none runs.
    #[must_use]
    pub fn cancel(&self, projection: Projection) -> Option<watch::Receiver<RebuildProgress>> {
        let jobs = self.jobs();
        let job = jobs.get(&projection)?;
        if job.progress.borrow().is_finished() {
            return None;
        }
        job.cancel.cancel();
        Some(job.progress.clone())
    }

    /// The latest progress of every rebuild this node ran, running or finished.
    #[must_use]
    pub fn progress(&self) -> BTreeMap<Projection, RebuildProgress> {
        self.jobs()
            .iter()
            .map(|(projection, job)| (*projection, job.progress.borrow().clone()))
            .collect()
    }

    /// Cancels every running rebuild and waits for them to stop (shutdown).
    pub async fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> = self
            .jobs()
            .drain()
            .map(|(_, job)| {
                job.cancel.cancel();
                job.task
            })
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Folds the log into `version` chunk by chunk until it is close to the end, then catches up and
/// switches under the writer. Cancellation and errors drop the new version.
fn run_rebuild(
    store: &SledStore,
    projection: Projection,
    version: u32,
    chunk: usize,
    progress: &watch::Sender<RebuildProgress>,
    cancel: &CancellationToken,
) {
    let started = Instant::now();
    let label = ProjectionLabel {
        projection: projection.name().to_owned(),
    };
    let report = |done: u64, state: RebuildState| {
        let total = u64::try_from(store.log_len()).unwrap_or(u64::MAX);
        let elapsed = started.elapsed().as_secs_f64();
        PROJECTOR
            .rebuild_done
            .get_or_create(&label)
            .set(gauge(done));
        PROJECTOR
            .rebuild_total
            .get_or_create(&label)
            .set(gauge(total));
        progress.send_modify(|progress| {
            progress.done = done;
            progress.total = total.max(done);
            #[allow(clippy::cast_precision_loss, reason = "a rate")]
            let rate = if elapsed > 0.0 {
                done as f64 / elapsed
            } else {
                0.0
            };
            progress.rate = rate;
            progress.state = state;
        });
    };
    let mut next = 1;
    // Rounds in a row in which the projector appended as fast as the rebuild folded.
    let mut not_gaining = 0;
    let mut last_gap = u64::MAX;
    let result = loop {
        if cancel.is_cancelled() {
            break Err(None);
        }
        let end = u64::try_from(store.log_len()).unwrap_or(u64::MAX) + 1;
        let gap = end.saturating_sub(next);
        if gap >= last_gap {
            not_gaining += 1;
        } else {
            not_gaining = 0;
        }
        last_gap = gap;
        // Close to the end: the rest is folded under the writer, with the switch. Under an
        // ingest rate the rebuild cannot outrun, it switches anyway after a while: the projector
        // then waits while the gap is folded.
        if gap <= chunk as u64 || not_gaining >= MAX_ROUNDS_NOT_GAINING {
            break store
                .finish_rebuild(projection, version, next)
                .map_err(Some);
        }
        match store.rebuild_step(projection, version, next, chunk) {
            Ok(after) => next = after,
            Err(error) => break Err(Some(error)),
        }
        report(next - 1, RebuildState::Running);
    };
    match result {
        Ok(previous) => {
            let done = u64::try_from(store.log_len()).unwrap_or(u64::MAX);
            info!(%projection, version, previous, done, seconds = started.elapsed().as_secs_f64(), "rebuild switched");
            report(done, RebuildState::Switched { previous });
        }
        Err(None) => {
            if let Err(error) = store.cancel_rebuild(projection, version) {
                warn!(%projection, version, %error, "cannot drop the cancelled version; it is dropped on the next start");
            }
            info!(%projection, version, "rebuild cancelled; the active version is untouched");
            report(next - 1, RebuildState::Cancelled);
        }
        Err(Some(error)) => {
            warn!(%projection, version, %error, "rebuild failed; the active version is untouched");
            if let Err(error) = store.cancel_rebuild(projection, version) {
                warn!(%projection, version, %error, "cannot drop the failed version; it is dropped on the next start");
            }
            report(next - 1, RebuildState::Failed(error.to_string()));
        }
    }
}

fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A Kafka client for status and health: watermarks and reachability.
pub struct KafkaProbe {
    consumer: BaseConsumer,
    topic: String,
}

impl std::fmt::Debug for KafkaProbe {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("KafkaProbe")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaProbe {
    /// # Errors
    /// When the client configuration is invalid.
    pub fn new(kafka: &KafkaOptions) -> Result<Self, Error> {
        Ok(Self {
            consumer: kafka.consumer_config().create()?,
            topic: kafka.topic.clone(),
        })
    }

    /// (low, high) watermarks per partition; `None` when the broker does not answer within
    /// `timeout` (blocking).
    #[must_use]
    pub fn watermarks(
        &self,
        partitions: &[i32],
        timeout: Duration,
    ) -> Option<BTreeMap<i32, (i64, i64)>> {
        partitions
            .iter()
            .map(|partition| {
                self.consumer
                    .fetch_watermarks(&self.topic, *partition, timeout)
                    .ok()
                    .map(|marks| (*partition, marks))
            })
            .collect()
    }

    /// Whether the broker answers a metadata request for the topic within `timeout` (blocking).
    #[must_use]
    pub fn reachable(&self, timeout: Duration) -> bool {
        self.consumer
            .fetch_metadata(Some(&self.topic), timeout)
            .is_ok_and(|metadata| !metadata.brokers().is_empty())
    }
}

/// Where a replay starts reading each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// The oldest record the broker still has.
    Earliest,
    /// This offset (or the oldest record, when retention deleted it).
    Offset(i64),
    /// The first record with a timestamp at or after this instant.
    Timestamp(UnixNanos),
}

/// Progress of a replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayProgress {
    /// Records read from Kafka.
    pub read: u64,
    /// Events the log did not have, now appended and projected.
    pub appended: u64,
    /// Events already in the log.
    pub duplicates: u64,
    /// Records that cannot be decoded (kept once in the dead-letter store).
    pub dead_lettered: u64,
    /// Per partition: (start offset, end offset), the end being the high watermark when the
    /// replay started.
    pub ranges: BTreeMap<i32, (i64, i64)>,
    /// Partitions read to their end.
    pub partitions_done: usize,
    pub finished: bool,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("partition {partition} does not exist (the topic has {partitions})")]
    UnknownPartition { partition: i32, partitions: usize },
    #[error(transparent)]
    Projection(#[from] Error),
}

impl From<KafkaError> for ReplayError {
    fn from(error: KafkaError) -> Self {
        Self::Projection(Error::Kafka(error))
    }
}

impl From<touchline_core::StoreError> for ReplayError {
    fn from(error: touchline_core::StoreError) -> Self {
        Self::Projection(Error::Store(error))
    }
}

/// Re-reads `partitions` (every partition when empty) of the topic from `from` up to the high
/// watermark at the start, into the log: events it lacks are appended and projected, the rest
/// are duplicates (invariant 3 makes a replay safe at any time, beside the projector). Stored
/// positions do not move. Progress is published on `progress`; `cancel` stops it between
/// batches (what was applied stays).
///
/// # Errors
/// When a partition does not exist, Kafka cannot be reached or the store fails.
pub async fn replay(
    kafka: &KafkaOptions,
    store: Arc<SledStore>,
    from: ReplayFrom,
    partitions: &[i32],
    progress: &watch::Sender<ReplayProgress>,
    cancel: &CancellationToken,
) -> std::result::Result<ReplayProgress, ReplayError> {
    let consumer: StreamConsumer = kafka
        .consumer_config()
        .set("enable.partition.eof", "true")
        .create()
        .map_err(Error::from)?;
    let consumer = Arc::new(consumer);
    let (stream, ranges, assignment) = tokio::task::spawn_blocking({
        let consumer = Arc::clone(&consumer);
        let topic = kafka.topic.clone();
        let wanted = partitions.to_vec();
        move || plan_replay(&consumer, &topic, from, wanted)
    })
    .await
    .map_err(Error::from)??;
    consumer.assign(&assignment)?;
    let mut state = ReplayProgress {
        ranges: ranges.clone(),
        ..ReplayProgress::default()
    };
    let mut open: BTreeMap<i32, i64> = ranges
        .iter()
        .filter(|(_, (start, end))| start < end)
        .map(|(partition, (_, end))| (*partition, *end))
        .collect();
    state.partitions_done = ranges.len() - open.len();
    progress.send_replace(state.clone());
    info!(?from, ?ranges, "replay started");
    let mut batches = consumer.stream().ready_chunks(1000);
    let mut failure = None;
    while !open.is_empty() {
        let batch = tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(REPLAY_IDLE_TIMEOUT) => {
                failure = Some(ReplayError::Projection(Error::Setup(format!(
                    "nothing received from Kafka for {}s with partitions {:?} unfinished",
                    REPLAY_IDLE_TIMEOUT.as_secs(),
                    open.keys().collect::<Vec<_>>()
                ))));
                break;
            }
            batch = batches.next() => batch,
        };
        let Some(batch) = batch else { break };
        let mut records = Vec::with_capacity(batch.len());
        for message in batch {
            match message {
                Ok(message) => {
                    let partition = message.partition();
                    let Some(end) = open.get(&partition).copied() else {
                        continue;
                    };
                    if ranges
                        .get(&partition)
                        .is_some_and(|(start, _)| message.offset() < *start)
                    {
                        // Read from the oldest record, skipped up to the start (see plan_replay).
                        continue;
                    }
                    // Records past the end that arrive with the same fetch are applied too: some
                    // brokers (Tansu 0.6) report the base offset of the last batch + 1 as the
                    // high watermark, and re-reading is harmless.
                    records.push(consumed_record(&message));
                    if message.offset() + 1 >= end {
                        open.remove(&partition);
                    }
                }
                Err(KafkaError::PartitionEOF(partition)) => {
                    open.remove(&partition);
                }
                Err(error) => warn!(%error, "kafka consumer error during replay"),
            }
        }
        state.read += records.len() as u64;
        PROJECTOR.replayed.inc_by(records.len() as u64);
        if !records.is_empty() {
            let applying = Arc::clone(&store);
            let stream = stream.clone();
            // Applied and flushed per batch: what a replay restored is durable (and reaches
            // watchers) even if it stops early.
            let applied = tokio::task::spawn_blocking(move || {
                let outcome = applying.apply_replayed(&stream, records)?;
                applying.flush()?;
                Ok::<_, touchline_core::StoreError>(outcome)
            })
            .await
            .map_err(Error::from)?;
            let outcome = match applied {
                Ok(outcome) => outcome,
                Err(error) => {
                    failure = Some(error.into());
                    break;
                }
            };
            state.appended += outcome.appended;
            state.duplicates += outcome.duplicates;
            state.dead_lettered += outcome.dead_lettered;
        }
        state.partitions_done = ranges.len() - open.len();
        progress.send_replace(state.clone());
    }
    drop(batches);
    if let Some(failure) = failure {
        return Err(failure);
    }
    state.finished = open.is_empty();
    progress.send_replace(state.clone());
    info!(
        read = state.read,
        appended = state.appended,
        duplicates = state.duplicates,
        dead_lettered = state.dead_lettered,
        finished = state.finished,
        "replay ended"
    );
    Ok(state)
}

type Plan = (
    StreamIdentity,
    BTreeMap<i32, (i64, i64)>,
    TopicPartitionList,
);

/// Resolves the stream, each partition's range and the assignment to read it.
fn plan_replay(
    consumer: &StreamConsumer,
    topic: &str,
    from: ReplayFrom,
    wanted: Vec<i32>,
) -> std::result::Result<Plan, ReplayError> {
    let cluster_id = touchline_kafka::fetch_cluster_id(consumer.client(), METADATA_TIMEOUT)
        .map_err(|error| kafka_setup(&error))?;
    let all = touchline_kafka::fetch_partitions(consumer.client(), topic, METADATA_TIMEOUT)
        .map_err(|error| kafka_setup(&error))?;
    let partitions = if wanted.is_empty() {
        all.clone()
    } else {
        wanted
    };
    if let Some(partition) = partitions.iter().find(|p| !all.contains(p)) {
        return Err(ReplayError::UnknownPartition {
            partition: *partition,
            partitions: all.len(),
        });
    }
    let by_time = match from {
        ReplayFrom::Timestamp(at) => {
            let mut query = TopicPartitionList::new();
            for partition in &partitions {
                query.add_partition_offset(
                    topic,
                    *partition,
                    Offset::Offset(at.0.div_euclid(1_000_000)),
                )?;
            }
            Some(consumer.offsets_for_times(query, METADATA_TIMEOUT)?)
        }
        _ => None,
    };
    let mut ranges = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, METADATA_TIMEOUT)?;
        let start = match from {
            ReplayFrom::Earliest => low,
            ReplayFrom::Offset(offset) => offset.max(low).min(high.max(low)),
            ReplayFrom::Timestamp(_) => match by_time
                .as_ref()
                .and_then(|list| list.find_partition(topic, partition))
                .map(|element| element.offset())
            {
                Some(Offset::Offset(offset)) => offset.max(low).min(high.max(low)),
                // No record at or after the instant.
                _ => high,
            },
        };
        ranges.insert(partition, (start, high.max(start)));
        // Fetch from the oldest record and skip to the start: some brokers (Tansu 0.6) cannot
        // fetch from the middle of a record batch and would silently skip the rest of it. A
        // replay is rare; reading more than needed is the price of losing nothing.
        assignment.add_partition_offset(topic, partition, Offset::Offset(low.min(start)))?;
    }
    Ok((
        StreamIdentity {
            cluster_id,
            topic: topic.to_owned(),
        },
        ranges,
        assignment,
    ))
}
