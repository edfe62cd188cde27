//! The projector service: consumes its partitions of the touchpoints topic and applies each
//! consumed batch to the store in atomic writes that also store the positions they cover
//! (invariant 6). On start it seeks to the stored positions; Kafka commits are advisory, for lag
//! monitoring only.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use touchline_core::{
    ApplyOutcome, ConsumedRecord, Envelope, EventStore, RecordContent, StreamIdentity,
};
use touchline_kafka::KafkaOptions;
use tracing::{debug, info, warn};

use crate::{Error, Result, metrics};

mod gaps;
pub(crate) mod resume;

use resume::{Rereads, check_positions};

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the projector asks the broker for a partition's oldest offset after a gap (see
/// `gaps`) before it reads on without counting it: the consume loop waits meanwhile, and a node
/// that stops waits for the question to end.
const LOSS_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Batches (of `max-batch` records) the projector applies ahead of its flusher at most: past
/// that many events applied and not yet durable it reads no more until a flush ends (a flush
/// normally covers a batch or two; one that hangs, as sled 0.34's can once it failed to create a
/// file, would otherwise let the whole backlog pile up in memory, unflushed).
pub const UNFLUSHED_BATCHES: usize = 16;

/// The most memory one consumed record may take once decoded, estimated from its fields before
/// it is decoded ([`touchline_proto::codec::decoded_envelope_bytes`]): a record above it becomes
/// a dead letter, undecoded. Ingest refuses to publish an event above it, so only another
/// producer writes such a record to the topic; a dead letter above it can still be requeued,
/// which decodes it whatever its size (the operator's call).
pub use touchline_proto::codec::MAX_DECODED_RECORD_BYTES;

/// The most memory the records decoded at once take, estimated as for
/// [`MAX_DECODED_RECORD_BYTES`]: a consumed batch above it is decoded and written in parts of at
/// most this much (a record above it alone), so that what the projector holds decoded (one part
/// being written, the next one decoded) stays bounded whatever the records hold. Ordinary batches
/// of 1,000 events take a few MiB, and go whole.
pub const MAX_DECODED_PART_BYTES: usize = 64 << 20;

/// A batch given to the writer thread: its outcome once applied, and the records found lost to
/// retention just before it (counted once it is applied: see `gaps`).
type PendingWrite = std::pin::Pin<
    Box<
        dyn Future<
                Output = (
                    std::result::Result<
                        std::result::Result<ApplyOutcome, touchline_core::StoreError>,
                        crate::worker::WorkerGone,
                    >,
                    u64,
                ),
            > + Send,
    >,
>;

/// What the projector needs to run.
#[derive(Debug, Clone)]
pub struct ProjectorOptions {
    pub kafka: KafkaOptions,
    /// The partitions this node owns; `None` for every partition of the topic.
    pub partitions: Option<Vec<i32>>,
    /// The most records applied in one store write.
    pub max_batch: usize,
    /// How long one flush of the store may take before the projector stops with
    /// [`crate::Error::FlushStalled`] (sled 0.34 can wait in a flush for ever): a node whose
    /// store hangs fails, rather than stay up, acknowledging nothing (dev) or serving what it had.
    pub flush_stall: Duration,
}

/// [`ProjectorOptions::flush_stall`] by default: a flush covers at most [`UNFLUSHED_BATCHES`]
/// batches, milliseconds normally.
pub const FLUSH_STALL: Duration = Duration::from_secs(60);

impl ProjectorOptions {
    #[must_use]
    pub fn new(kafka: KafkaOptions) -> Self {
        Self {
            kafka,
            partitions: None,
            max_batch: 1000,
            flush_stall: FLUSH_STALL,
        }
    }
}

/// The next offset to read per partition, published after each batch is durable (flushed). Ingest
/// in dev mode waits on it: there, an event is acknowledged once it is in the local log.
pub type AppliedOffsets = watch::Receiver<BTreeMap<i32, i64>>;

/// A cheap handle on a running projector.
#[derive(Debug, Clone)]
pub struct ProjectorHandle {
    applied: AppliedOffsets,
    stream: StreamIdentity,
    partitions: Vec<i32>,
}

impl ProjectorHandle {
    /// The stream the projector consumes.
    #[must_use]
    pub fn stream(&self) -> &StreamIdentity {
        &self.stream
    }

    /// The partitions it owns.
    #[must_use]
    pub fn partitions(&self) -> &[i32] {
        &self.partitions
    }

    /// Durable positions, updated after each flushed batch.
    #[must_use]
    pub fn applied_offsets(&self) -> AppliedOffsets {
        self.applied.clone()
    }
}

/// The projector: `new` connects and seeks, `run` consumes until shut down.
pub struct Projector {
    /// Shared with the look-ups of a partition's oldest offset (see `gaps`).
    consumer: Arc<StreamConsumer>,
    store: Arc<dyn EventStore>,
    stream: StreamIdentity,
    max_batch: usize,
    flush_stall: Duration,
    /// The customers this node serves: an event of another is a dead letter.
    served: Served,
    applied: watch::Sender<BTreeMap<i32, i64>>,
    /// The records read again before each partition's resume point, dropped once.
    rereads: Rereads,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Projector")
            .field("stream", &self.stream)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

impl Projector {
    /// Connects to Kafka, identifies the stream (cluster id and topic) and assigns the owned
    /// partitions at the positions stored for that stream: from the beginning of a stream the
    /// store has never seen, since stored offsets of another broker or topic mean nothing.
    ///
    /// # Errors
    /// When Kafka cannot be reached, the topic is missing or the store fails.
    pub async fn new(
        options: ProjectorOptions,
        store: Arc<dyn EventStore>,
    ) -> Result<(Self, ProjectorHandle)> {
        let consumer: StreamConsumer = options.kafka.consumer_config().create()?;
        let consumer = Arc::new(consumer);
        let topic = options.kafka.topic.clone();
        // Where ingest puts a customer's records: murmur2 modulo `kafka.partitions`, also after
        // partitions were added to the topic while nodes run (a node refuses to start on a topic
        // of another count).
        let topic_partitions = options.kafka.partitions;
        let (consumer, stream, assignment, partitions, (applied_start, rereads)) =
            tokio::task::spawn_blocking({
                let store = Arc::clone(&store);
                move || -> Result<_> {
                    let cluster_id =
                        touchline_kafka::fetch_cluster_id(consumer.client(), METADATA_TIMEOUT)
                            .map_err(|error| kafka_setup(&error))?;
                    let stream = StreamIdentity {
                        cluster_id,
                        topic: topic.clone(),
                    };
                    let all = touchline_kafka::fetch_partitions(
                        consumer.client(),
                        &topic,
                        METADATA_TIMEOUT,
                    )
                    .map_err(|error| kafka_setup(&error))?;
                    let owned = owned_partitions(&topic, options.partitions, all)?;
                    let partitions = owned.clone();
                    let stored = store.positions(&stream)?;
                    let with_positions: Vec<_> = owned
                        .iter()
                        .filter_map(|partition| {
                            stored
                                .get(partition)
                                .map(|position| (*partition, *position))
                        })
                        .collect();
                    let mut checked =
                        check_positions(&consumer, &options.kafka, &topic, &with_positions)?;
                    let mut assignment = TopicPartitionList::new();
                    let mut applied = BTreeMap::new();
                    let mut rereads = Rereads::default();
                    let mut lost = 0;
                    for partition in owned {
                        // No stored position, or none verified: from the beginning.
                        let offset = match checked.remove(&partition).flatten() {
                            Some(resume) => {
                                if resume.lost > 0 {
                                    store.skip_to(&stream, partition, resume.next)?;
                                    lost += resume.lost;
                                }
                                applied.insert(partition, resume.next);
                                rereads.insert(partition, resume);
                                Offset::Offset(resume.fetch_from)
                            }
                            None => Offset::Beginning,
                        };
                        info!(partition, ?offset, "assigning partition");
                        assignment.add_partition_offset(&topic, partition, offset)?;
                    }
                    if lost > 0 {
                        // Durable before they are counted: a later start, finding the positions
                        // past the loss, does not count it again.
                        store.flush()?;
                        crate::metrics::PROJECTOR.lost_to_retention.inc_by(lost);
                    }
                    Ok((consumer, stream, assignment, partitions, (applied, rereads)))
                }
            })
            .await??;
        consumer.assign(&assignment)?;
        let (applied, receiver) = watch::channel(applied_start);
        info!(cluster_id = %stream.cluster_id, topic = %stream.topic, "projector assigned");
        Ok((
            Self {
                consumer,
                store,
                stream: stream.clone(),
                max_batch: options.max_batch.max(1),
                flush_stall: options.flush_stall,
                served: Served::new(topic_partitions, &partitions),
                applied,
                rereads,
            },
            ProjectorHandle {
                applied: receiver,
                stream,
                partitions,
            },
        ))
    }

    /// Consumes and applies batches until `shutdown` is cancelled. Every batch is flushed before
    /// its positions are published; on shutdown the in-flight batch completes first.
    ///
    /// # Errors
    /// When the store fails: the projector stops rather than skip records.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        // Group commit: batches are applied (atomically, in memory and sled's log) one after the
        // other while a flusher makes them durable; each flush covers every batch applied before
        // it started, and only flushed positions are published (dev-mode acks wait on them).
        let (unflushed, pending) = watch::channel(BTreeMap::new());
        // Set when the flusher stops, so that a failed flush stops the projector at once rather
        // than when the next batch arrives.
        let flusher_stopped = CancellationToken::new();
        let flusher = tokio::spawn(flush_loop(
            Arc::clone(&self.store),
            pending,
            self.applied.clone(),
            flusher_stopped.clone(),
            self.flush_stall,
        ));
        let rereads = std::mem::take(&mut self.rereads);
        // However the consuming ends (a stop, a failed write), what was applied is made durable
        // and published before the projector reports: dev-mode acknowledgements wait on it.
        let consumed = self
            .consume(&shutdown, &flusher_stopped, &flusher, &unflushed, rereads)
            .await;
        drop(unflushed);
        let flushed = flusher.await;
        if consumed.is_err() {
            // The consuming's error is the one reported; a flush failure beside it is logged.
            match &flushed {
                Ok(Err(error)) => warn!(%error, "the last flush failed too"),
                Err(error) => warn!(%error, "the flusher panicked too"),
                Ok(Ok(())) => {}
            }
        }
        consumed?;
        flushed??;
        info!("projector stopped");
        Ok(())
    }

    /// The consuming loop of [`Projector::run`]: reads, decodes and applies batches until
    /// `shutdown` is cancelled, the flusher stops or a write fails; the batch being written when
    /// it stops completes first.
    async fn consume(
        &self,
        shutdown: &CancellationToken,
        flusher_stopped: &CancellationToken,
        flusher: &tokio::task::JoinHandle<Result<()>>,
        unflushed: &watch::Sender<BTreeMap<i32, i64>>,
        mut rereads: Rereads,
    ) -> Result<()> {
        // Every write of this projector on one thread (see `worker`), and the decoding of the next
        // batch on another (one long-lived thread rather than the blocking pool's: the decoded
        // records are allocated in its share of the allocator, freed by the writer).
        let writer = crate::worker::Worker::start("tl-projector").map_err(Error::Thread)?;
        let decoder = crate::worker::Worker::start("tl-decoder").map_err(Error::Thread)?;
        let mut batches = self.consumer.stream().ready_chunks(self.max_batch);
        // At most one batch is being written while the next one is read and decoded (beside the
        // writer: decoding was 6% of the writer's time). Never more: a batch is written only once
        // the one before it is applied, so a failed write stops the projector before anything
        // after it is stored.
        let mut in_flight: Option<PendingWrite> = None;
        let ahead_limit =
            u64::try_from(UNFLUSHED_BATCHES.saturating_mul(self.max_batch)).unwrap_or(u64::MAX);
        let mut flushed = self.applied.subscribe();
        // From where the partitions resume (the published offsets are those still).
        let mut gaps = gaps::Gaps::new(&self.applied.borrow());
        'batches: loop {
            let ahead = self
                .store
                .visible_sequence()
                .saturating_sub(self.store.durable_sequence())
                >= ahead_limit;
            if ahead && in_flight.is_none() {
                // Whatever wrote it (this projector, or another writer of the store that flushes
                // later), a flush makes it durable: the flusher is asked for one.
                unflushed.send_modify(|_| {});
            }
            let batch = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = flusher_stopped.cancelled() => break,
                outcome = async {
                    match in_flight.as_mut() {
                        Some(write) => write.await,
                        None => std::future::pending().await,
                    }
                }, if in_flight.is_some() => {
                    in_flight = None;
                    let (outcome, lost) = outcome;
                    self.batch_applied(&outcome??, lost, unflushed);
                    if flusher.is_finished() {
                        break;
                    }
                    continue;
                }
                // Too far ahead of the flusher: the next flush first.
                Ok(()) = flushed.changed(), if ahead && in_flight.is_none() => continue,
                batch = batches.next(), if !ahead => batch,
            };
            let Some(batch) = batch else { break };
            let mut messages = Vec::with_capacity(batch.len());
            let mut skipped = Vec::new();
            for message in batch {
                match message {
                    // The verified record just before a resume point is read again: drop it once.
                    Ok(message) if rereads.drop_reread(message.partition(), message.offset()) => {}
                    Ok(message) => {
                        // Past the records read again: offsets skipped among those are no loss.
                        if let Some(offsets) = gaps.observe(message.partition(), message.offset()) {
                            skipped.push((message.partition(), offsets));
                        }
                        messages.push(message.detach());
                    }
                    // librdkafka retries by itself; errors here are informational (and counted: a
                    // batch it cannot read may hold its partition, which its lag shows).
                    Err(error) => {
                        metrics::PROJECTOR.consumer_errors.inc();
                        warn!(%error, "kafka consumer error");
                    }
                }
            }
            // Per record read after a gap, the records lost before it: counted with the part
            // that holds that record, once it is applied (with the position past the gap).
            let mut losses = BTreeMap::new();
            if !skipped.is_empty() {
                // The batch being written reaches the flusher first: asking may take a while.
                self.settle(&mut in_flight, unflushed).await?;
                match self.lost_in(skipped, shutdown, flusher_stopped).await {
                    Some(found) => losses = found,
                    // Stopped while asking: the stored position stays before the gap, and the
                    // next start counts what is gone (`resume`).
                    None => break,
                }
            }
            // Parts of bounded decoded size: the whole batch, but for records of unusual size.
            for part in decoded_parts(messages) {
                // Stopped between parts as between batches (each part stores its positions).
                if shutdown.is_cancelled() || flusher_stopped.is_cancelled() {
                    break 'batches;
                }
                let lost: u64 = part
                    .iter()
                    .filter_map(|(message, _)| {
                        losses.remove(&(message.partition(), message.offset()))
                    })
                    .sum();
                // Decoding a batch takes milliseconds: off the async runtime.
                let served = self.served.clone();
                let records = match decoder
                    .run(move || {
                        part.iter()
                            .map(|(message, estimate)| consumed_record(message, *estimate, &served))
                            .collect::<Vec<_>>()
                    })
                    .await
                {
                    Ok(records) => records,
                    Err(gone) => {
                        // The batch being written still completes and reaches the flusher.
                        self.settle(&mut in_flight, unflushed).await?;
                        return Err(gone.into());
                    }
                };
                self.settle(&mut in_flight, unflushed).await?;
                if flusher.is_finished() {
                    break 'batches;
                }
                let store = Arc::clone(&self.store);
                let stream = self.stream.clone();
                let write = writer.run(move || store.apply(&stream, records));
                in_flight = Some(Box::pin(async move { (write.await, lost) }));
            }
        }
        drop(batches);
        // The batch being written completes; the flusher makes the last batches durable.
        self.settle(&mut in_flight, unflushed).await
    }

    /// Of the offsets the consumer went past (`skipped`, per partition), how many the topic's
    /// retention deleted before they were read (see `gaps`), keyed by the partition and offset of
    /// the record read after them: asks the broker for each partition's oldest offset now, all at
    /// once, for at most [`LOSS_CHECK_TIMEOUT`]. `None` when the projector is stopped meanwhile.
    async fn lost_in(
        &self,
        skipped: Vec<(i32, Range<i64>)>,
        shutdown: &CancellationToken,
        flusher_stopped: &CancellationToken,
    ) -> Option<BTreeMap<(i32, i64), u64>> {
        let partitions: std::collections::BTreeSet<i32> =
            skipped.iter().map(|(partition, _)| *partition).collect();
        let fetches = partitions.into_iter().map(|partition| {
            let consumer = Arc::clone(&self.consumer);
            let topic = self.stream.topic.clone();
            let fetch = tokio::task::spawn_blocking(move || {
                consumer.fetch_watermarks(&topic, partition, LOSS_CHECK_TIMEOUT)
            });
            async move {
                let oldest = match fetch.await {
                    Ok(Ok((low, _))) => Ok(low),
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(error) => Err(error.to_string()),
                };
                (partition, oldest)
            }
        });
        let oldest: BTreeMap<i32, std::result::Result<i64, String>> = tokio::select! {
            biased;
            () = shutdown.cancelled() => return None,
            () = flusher_stopped.cancelled() => return None,
            oldest = futures::future::join_all(fetches) => oldest.into_iter().collect(),
        };
        let mut losses = BTreeMap::new();
        for (partition, offsets) in skipped {
            match oldest.get(&partition) {
                Some(Ok(oldest)) => {
                    let lost = gaps::lost(&offsets, *oldest);
                    if lost > 0 {
                        losses.insert((partition, offsets.end), lost);
                        warn!(
                            partition,
                            from = offsets.start,
                            to = offsets.end,
                            lost,
                            "records were deleted by retention before they were projected (the projector fell further behind than the topic keeps records): reading on from the oldest record left (counted in touchline_projector_records_lost_to_retention_total)"
                        );
                    } else {
                        info!(
                            partition,
                            from = offsets.start,
                            to = offsets.end,
                            "offsets skipped that retention did not delete: transaction markers or aborted transactions of another producer, or records the broker did not serve"
                        );
                    }
                }
                Some(Err(error)) => warn!(
                    partition,
                    from = offsets.start,
                    to = offsets.end,
                    %error,
                    "offsets were skipped, and whether retention deleted them could not be checked (not counted)"
                ),
                None => {}
            }
        }
        Some(losses)
    }

    /// Waits for the batch being written, if any, and accounts for it.
    async fn settle(
        &self,
        in_flight: &mut Option<PendingWrite>,
        unflushed: &watch::Sender<BTreeMap<i32, i64>>,
    ) -> Result<()> {
        if let Some(write) = in_flight.take() {
            let (outcome, lost) = write.await;
            self.batch_applied(&outcome??, lost, unflushed);
        }
        Ok(())
    }

    /// Accounts for an applied batch (and the records lost to retention just before it) and hands
    /// its positions to the flusher.
    fn batch_applied(
        &self,
        outcome: &ApplyOutcome,
        lost: u64,
        unflushed: &watch::Sender<BTreeMap<i32, i64>>,
    ) {
        metrics::PROJECTOR.applied.inc_by(outcome.appended);
        metrics::PROJECTOR.lost_to_retention.inc_by(lost);
        metrics::PROJECTOR.duplicates.inc_by(outcome.duplicates);
        metrics::PROJECTOR
            .dead_lettered
            .inc_by(outcome.dead_lettered);
        debug!(
            appended = outcome.appended,
            duplicates = outcome.duplicates,
            dead_lettered = outcome.dead_lettered,
            "applied batch"
        );
        if outcome.dead_lettered > 0 {
            warn!(
                count = outcome.dead_lettered,
                "undecodable or misplaced records moved to the dead-letter store"
            );
        }
        unflushed.send_modify(|offsets| offsets.extend(&outcome.next_offsets));
        let flushed = self.applied.borrow().clone();
        self.commit_advisory(&flushed);
    }

    /// Commits positions to Kafka for lag monitoring. Never read back: the store's positions are
    /// the truth, so a failed commit is only logged.
    fn commit_advisory(&self, next_offsets: &BTreeMap<i32, i64>) {
        let mut list = TopicPartitionList::new();
        for (partition, offset) in next_offsets {
            if let Err(error) =
                list.add_partition_offset(&self.stream.topic, *partition, Offset::Offset(*offset))
            {
                warn!(%error, partition, "cannot build the advisory commit");
                return;
            }
        }
        if let Err(error) = self.consumer.commit(&list, CommitMode::Async) {
            debug!(%error, "advisory offset commit failed");
        }
    }
}

/// Flushes the store whenever batches were applied since the last flush, then publishes the
/// positions that flush made durable. Ends, after a last flush, when the projector drops `pending`;
/// with [`Error::FlushStalled`] when a flush takes longer than `stall` (its blocking thread is
/// left to it).
async fn flush_loop(
    store: Arc<dyn EventStore>,
    mut pending: watch::Receiver<BTreeMap<i32, i64>>,
    applied: watch::Sender<BTreeMap<i32, i64>>,
    stopped: CancellationToken,
    stall: Duration,
) -> Result<()> {
    let _stopped = stopped.drop_guard();
    loop {
        let more = pending.changed().await.is_ok();
        let covered = pending.borrow_and_update().clone();
        let flushing = Arc::clone(&store);
        let started = std::time::Instant::now();
        tokio::time::timeout(stall, tokio::task::spawn_blocking(move || flushing.flush()))
            .await
            .map_err(|_| Error::FlushStalled(stall))???;
        metrics::PROJECTOR
            .flush_seconds
            .observe(started.elapsed().as_secs_f64());
        applied.send_modify(|offsets| offsets.extend(&covered));
        if !more {
            return Ok(());
        }
    }
}

pub(crate) fn kafka_setup(error: &touchline_kafka::Error) -> Error {
    match error {
        touchline_kafka::Error::TopicMissing { topic } => Error::TopicMissing {
            topic: topic.clone(),
        },
        other => Error::Setup(other.to_string()),
    }
}

/// `messages` in consecutive parts of at most [`MAX_DECODED_PART_BYTES`] once decoded
/// (estimated; a record above it in a part of its own, a record that will not be decoded counted
/// by its size): one part for ordinary batches. Each message comes with its estimate, for
/// [`consumed_record`].
pub(crate) fn decoded_parts<M: Message>(messages: Vec<M>) -> Vec<Vec<(M, usize)>> {
    parts_by_decoded_size(
        messages,
        |message| message.payload(),
        MAX_DECODED_RECORD_BYTES,
        usize::MAX,
    )
}

/// `items` in consecutive parts of at most `max_items` and at most [`MAX_DECODED_PART_BYTES`]
/// once their `payload`s are decoded as envelopes (estimated; an item above it in a part of its
/// own), each with its estimate. An item estimated above `undecoded_above` will not be decoded:
/// it counts by its size.
pub(crate) fn parts_by_decoded_size<T>(
    items: Vec<T>,
    payload: impl Fn(&T) -> Option<&[u8]>,
    undecoded_above: usize,
    max_items: usize,
) -> Vec<Vec<(T, usize)>> {
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let mut part_bytes = 0_usize;
    for item in items {
        let decoded = payload(&item).map_or(0, touchline_proto::codec::decoded_envelope_bytes);
        let bytes = if decoded > undecoded_above {
            payload(&item).map_or(0, <[u8]>::len)
        } else {
            decoded
        };
        if !part.is_empty()
            && (part.len() >= max_items
                || part_bytes.saturating_add(bytes) > MAX_DECODED_PART_BYTES)
        {
            parts.push(std::mem::take(&mut part));
            part_bytes = 0;
        }
        part_bytes = part_bytes.saturating_add(bytes);
        part.push((item, decoded));
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

/// Decodes a consumed message whose decoded size [`decoded_parts`] estimated (`decoded_bytes`);
/// anything undecodable, a record that would take more than [`MAX_DECODED_RECORD_BYTES`] once
/// decoded, or an event whose customer this node does not serve (see [`Served`]), becomes a dead
/// letter with its reason.
pub(crate) fn consumed_record(
    message: &impl Message,
    decoded_bytes: usize,
    served: &Served,
) -> ConsumedRecord {
    let decoded = if decoded_bytes > MAX_DECODED_RECORD_BYTES {
        Err(if decoded_bytes == usize::MAX {
            "record value holds a protobuf group (no Touchline message has one): not decoded"
                .to_owned()
        } else {
            format!(
                "record value would take about {} MiB once decoded (its touchpoint's fields), more than the {} MiB a record may take: not decoded (requeue it to project it anyway)",
                decoded_bytes >> 20,
                MAX_DECODED_RECORD_BYTES >> 20
            )
        })
    } else {
        touchline_proto::decode_envelope(message.payload()).map_err(|error| error.to_string())
    };
    let decoded = decoded.and_then(|envelope| match served.refuses(&envelope) {
        None => Ok(envelope),
        Some(reason) => Err(reason),
    });
    let content = match decoded {
        Ok(envelope) => RecordContent::Event {
            envelope: Box::new(envelope),
            raw: message.payload().unwrap_or_default().to_vec(),
        },
        Err(reason) => RecordContent::Undecodable {
            reason,
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
        },
    };
    ConsumedRecord {
        partition: message.partition(),
        offset: message.offset(),
        content,
    }
}

/// The customers a node serves: those whose partition (murmur2 of the customer id modulo
/// `kafka.partitions`, as ingest places their records) it owns; every customer when it owns
/// every partition. The projector keeps only their events, and the query service answers only
/// for them.
#[derive(Debug, Clone, Default)]
pub struct Served {
    partitions: i32,
    /// `None`: every partition.
    owned: Option<std::collections::BTreeSet<i32>>,
}

impl Served {
    /// What a node that owns `owned` of a topic of `partitions` partitions serves (empty
    /// `owned`: every partition).
    #[must_use]
    pub fn new(partitions: i32, owned: &[i32]) -> Self {
        let every = (0..partitions).all(|partition| owned.contains(&partition));
        Self {
            partitions,
            owned: (!every && !owned.is_empty()).then(|| owned.iter().copied().collect()),
        }
    }

    /// The partition of `customer`, when this node does not own it (`None`: served here).
    #[must_use]
    pub fn elsewhere(&self, customer: &touchline_core::CustomerId) -> Option<i32> {
        let owned = self.owned.as_ref()?;
        let partition =
            touchline_kafka::partition_for(customer.as_str().as_bytes(), self.partitions);
        (!owned.contains(&partition)).then_some(partition)
    }

    /// The partitions this node owns; empty when it owns every one.
    #[must_use]
    pub fn owned(&self) -> Vec<i32> {
        self.owned
            .iter()
            .flat_map(|owned| owned.iter().copied())
            .collect()
    }

    /// Why an event cannot be projected here, if it cannot: its customer belongs in a partition
    /// this node does not own (another producer placed it, or partitions were added to the
    /// topic and `kafka.partitions` changed since it was written), so no query for the customer
    /// comes to this node (`CUSTOMER_NOT_HERE` elsewhere). A node that owns every partition
    /// serves every customer, wherever their records are.
    fn refuses(&self, envelope: &Envelope) -> Option<String> {
        let customer = &envelope.touchpoint.customer_id;
        let partition = self.elsewhere(customer)?;
        Some(format!(
            "customer {:?} belongs in partition {partition} of {} (murmur2 of the customer_id, as ingest places records), which this node does not own (it owns {:?}): no query for the customer comes here",
            customer.as_str(),
            self.partitions,
            self.owned()
        ))
    }
}

/// The partitions a node owns: the configured ones, each once and each in the topic, or every
/// partition of the topic. A partition the topic does not have would leave the node reporting
/// healthy while it serves nothing of it.
fn owned_partitions(topic: &str, configured: Option<Vec<i32>>, all: Vec<i32>) -> Result<Vec<i32>> {
    let Some(configured) = configured else {
        return Ok(all);
    };
    let mut seen = std::collections::BTreeSet::new();
    for partition in &configured {
        if !seen.insert(*partition) {
            return Err(Error::Setup(format!(
                "projector.partitions lists partition {partition} twice"
            )));
        }
        if !all.contains(partition) {
            return Err(Error::Setup(format!(
                "projector.partitions names partition {partition}, which topic {topic} does not have (its partitions: {all:?})"
            )));
        }
    }
    Ok(configured)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event of a customer whose partition the node does not own (another producer placed it,
    /// or partitions were added since) is a dead letter on a node that owns some partitions, and
    /// projected on one that owns them all (it serves every customer, wherever the record is).
    #[test]
    fn an_event_of_a_customer_the_node_does_not_serve_is_a_dead_letter() {
        let mut envelope = envelope("alice", "e1");
        let alices = touchline_kafka::partition_for(b"alice", 6);
        let other = (alices + 1) % 6;
        let record = |envelope: &touchline_core::Envelope, partition: i32, served: &Served| {
            let content = consumed(
                &rdkafka::message::OwnedMessage::new(
                    Some(touchline_proto::encode_envelope(envelope)),
                    Some(envelope.touchpoint.customer_id.as_str().as_bytes().to_vec()),
                    "touchpoints".to_owned(),
                    rdkafka::Timestamp::NotAvailable,
                    partition,
                    7,
                    None,
                ),
                served,
            )
            .content;
            match content {
                RecordContent::Undecodable { reason, .. } => reason,
                RecordContent::Event { .. } => "projected".to_owned(),
            }
        };
        let owns_alices = Served::new(6, &[alices]);
        let owns_other = Served::new(6, &[other]);
        let owns_all = Served::new(6, &[0, 1, 2, 3, 4, 5]);
        assert_eq!(record(&envelope, alices, &owns_alices), "projected");
        // In a partition the node owns, but of a customer it does not serve.
        let refused = record(&envelope, other, &owns_other);
        assert!(
            refused.contains(&format!("belongs in partition {alices} of 6"))
                && refused.contains("does not own"),
            "{refused}"
        );
        assert_eq!(record(&envelope, other, &owns_all), "projected");
        assert_eq!(record(&envelope, other, &Served::default()), "projected");
        envelope.touchpoint.customer_id = touchline_core::CustomerId::parse("bob").expect("valid");
        let bobs = touchline_kafka::partition_for(b"bob", 6);
        assert_eq!(
            record(&envelope, bobs, &Served::new(6, &[bobs])),
            "projected"
        );
    }

    fn envelope(customer: &str, event: &str) -> touchline_core::Envelope {
        touchline_core::Envelope {
            partner_id: touchline_core::PartnerId::parse("courier").expect("valid"),
            touchpoint: touchline_core::Touchpoint {
                event_id: touchline_core::EventId::parse(event).expect("valid"),
                customer_id: touchline_core::CustomerId::parse(customer).expect("valid"),
                event_type: touchline_core::EventType::parse("parcel.delivered").expect("valid"),
                occurred_at: touchline_core::UnixNanos(1),
                channel: touchline_core::Channel::Web,
                stage: touchline_core::JourneyStage::Fulfil,
                outcome: None,
                attributes: BTreeMap::new(),
                payload: Vec::new(),
            },
            received_at: touchline_core::UnixNanos(1),
        }
    }

    /// An event whose touchpoint also holds `fields` empty attribute entries (two bytes each on
    /// the wire, estimated at 160 once decoded), in a second occurrence of the
    /// touchpoint field (which protobuf merges into the first).
    fn record_of_tiny_fields(fields: usize, offset: i64) -> rdkafka::message::OwnedMessage {
        let mut value = touchline_proto::encode_envelope(&envelope("alice", &format!("e{offset}")));
        let entries = [0x42, 0x00].repeat(fields);
        value.push(0x1a);
        prost::encoding::encode_varint(entries.len() as u64, &mut value);
        value.extend(entries);
        rdkafka::message::OwnedMessage::new(
            Some(value),
            Some(b"alice".to_vec()),
            "touchpoints".to_owned(),
            rdkafka::Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    /// [`consumed_record`] of `message`, its decoded size estimated here.
    fn consumed(message: &impl Message, served: &Served) -> ConsumedRecord {
        let decoded = message
            .payload()
            .map_or(0, touchline_proto::codec::decoded_envelope_bytes);
        consumed_record(message, decoded, served)
    }

    fn reason(record: ConsumedRecord) -> Option<String> {
        match record.content {
            RecordContent::Undecodable { reason, .. } => Some(reason),
            RecordContent::Event { .. } => None,
        }
    }

    /// Only another producer writes such a record: decoded, it would take hundreds of MiB (here
    /// its keys are all empty, so prost would keep one; the estimate counts the fields).
    #[test]
    fn a_record_too_large_once_decoded_is_a_dead_letter_undecoded() {
        let fields = MAX_DECODED_RECORD_BYTES / 160 + 1;
        let too_large = reason(consumed(
            &record_of_tiny_fields(fields, 1),
            &Served::default(),
        ))
        .expect("a dead letter");
        assert!(
            too_large.contains("once decoded") && too_large.contains("256 MiB"),
            "{too_large}"
        );
        // An ordinary record of the same shape decodes.
        assert_eq!(
            reason(consumed(&record_of_tiny_fields(0, 2), &Served::default())),
            None
        );
        // A group: no Touchline message has one.
        let grouped = record_of_tiny_fields(0, 3).set_payload(Some(vec![0x08, 0x01, 0x7b, 0x7c]));
        let grouped = reason(consumed(&grouped, &Served::default())).expect("a dead letter");
        assert!(grouped.contains("group"), "{grouped}");
    }

    /// A batch is decoded in parts of bounded decoded size: ordinary batches whole, records
    /// estimated at about 50 MiB each one to a part (with small ones beside them), a record too
    /// large to be decoded counted by its size.
    #[test]
    fn a_batch_is_decoded_in_parts_of_bounded_size() {
        let ordinary: Vec<_> = (0..1000)
            .map(|offset| record_of_tiny_fields(4, offset))
            .collect();
        assert_eq!(
            decoded_parts(ordinary)
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>(),
            vec![1000]
        );
        let fifty = (50 << 20) / 160;
        let batch = vec![
            record_of_tiny_fields(1, 1),
            record_of_tiny_fields(fifty, 2),
            record_of_tiny_fields(fifty, 3),
            record_of_tiny_fields(1, 4),
            record_of_tiny_fields(MAX_DECODED_RECORD_BYTES / 160 + 1, 5),
            record_of_tiny_fields(fifty, 6),
        ];
        let parts = decoded_parts(batch);
        let offsets: Vec<Vec<i64>> = parts
            .iter()
            .map(|part| part.iter().map(|(message, _)| message.offset()).collect())
            .collect();
        assert_eq!(offsets, vec![vec![1, 2], vec![3, 4, 5], vec![6]]);
    }

    #[test]
    fn configured_partitions_must_be_the_topics_each_once() {
        let all = vec![0, 1, 2];
        assert_eq!(
            owned_partitions("t", None, all.clone()).ok(),
            Some(all.clone())
        );
        assert_eq!(
            owned_partitions("t", Some(vec![2, 0]), all.clone()).ok(),
            Some(vec![2, 0])
        );
        let missing = owned_partitions("t", Some(vec![0, 6]), all.clone()).expect_err("refused");
        assert!(missing.to_string().contains("partition 6"), "{missing}");
        let twice = owned_partitions("t", Some(vec![1, 1]), all).expect_err("refused");
        assert!(twice.to_string().contains("twice"), "{twice}");
    }
}
