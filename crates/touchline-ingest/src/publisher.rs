//! The Kafka side of ingest: produces a batch of envelopes with every delivery in flight at once,
//! and reports each event's durable position only once Kafka (and, in dev mode, the local event
//! log) confirmed it.

use std::collections::VecDeque;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _, PurgeConfig};
use tokio::sync::watch;
use touchline_core::{Envelope, EventStore};
use touchline_kafka::{KafkaOptions, OffRuntime};
use tracing::{debug, error, warn};

use crate::{Error, Result};

/// The next offset per partition that the local projector has flushed to its event log.
pub type AppliedOffsets = tokio::sync::watch::Receiver<std::collections::BTreeMap<i32, i64>>;

/// When an event counts as durable.
#[derive(Debug, Clone)]
pub enum Durability {
    /// Once Kafka confirmed it (`acks=all`): for real brokers.
    Broker,
    /// Once Kafka confirmed it and the local projector flushed it to the event log: for the
    /// embedded broker, which keeps data in memory only (and drops unread records past about
    /// 5 MiB per partition, so a lagging projector can skip records: each event is looked up in
    /// the log before it is acknowledged).
    LocalLog(AppliedOffsets, Arc<dyn EventStore>),
}

/// The durable position of one produced event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub partition: i32,
    pub offset: i64,
}

/// The producer's client context: librdkafka reports through it when every broker is down.
struct ConnectionWatch {
    all_brokers_down: watch::Sender<u64>,
}

impl ClientContext for ConnectionWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown)) {
            self.all_brokers_down.send_modify(|count| *count += 1);
        }
        warn!(%error, reason, "kafka producer error");
    }
}

type Producer = FutureProducer<ConnectionWatch>;

/// The shortest time between two producer replacements for a lost broker. While Kafka stays
/// unreachable every call would otherwise start a new producer (a librdkafka client, with a thread
/// per broker) and tear the last one down; calls in between are answered `UNAVAILABLE` (with
/// `RetryInfo`) by the current producer. A fatal error replaces the producer at once: it would
/// refuse everything.
const MIN_REPLACE_INTERVAL: Duration = Duration::from_secs(1);

/// Why a producer is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replacement {
    /// It lost every broker.
    Lost,
    /// It hit a fatal error.
    Fatal,
}

impl Replacement {
    fn as_str(self) -> &'static str {
        match self {
            Self::Lost => "the producer lost every broker",
            Self::Fatal => "fatal producer error",
        }
    }
}

/// The current producer, how many times it was replaced, when it started, and its broker-loss
/// signal.
struct ProducerSlot {
    generation: u64,
    started: std::time::Instant,
    producer: Arc<OffRuntime<Producer>>,
    all_brokers_down: watch::Receiver<u64>,
}

impl ProducerSlot {
    /// Creates a producer and starts its session early ([`warm_up`]).
    fn create(config: &ClientConfig, topic: &str, generation: u64) -> Result<Self> {
        let (sender, all_brokers_down) = watch::channel(0);
        let producer: Producer = config.create_with_context(ConnectionWatch {
            all_brokers_down: sender,
        })?;
        spawn_warm_up(producer.clone(), topic.to_owned());
        Ok(Self {
            generation,
            started: std::time::Instant::now(),
            producer: Arc::new(OffRuntime::new(producer)),
            all_brokers_down,
        })
    }
}

/// Metadata requests a warm-up makes at most.
const WARM_UP_ATTEMPTS: usize = 10;
/// How long one warm-up metadata request may wait. Short: while Kafka is unreachable the warm-up
/// thread holds its producer this long (a replaced producer is destroyed only when it lets go).
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts a new producer's session early, and returns the id of the broker that answered.
///
/// An idempotent producer sends nothing before it has its producer id. librdkafka asks for the
/// id on a 500 ms timer after the producer is created, or as soon as a metadata reply comes from
/// a broker it knows by id, so a node's first acknowledgement came about half a second late
/// (measured on Tansu: 502 ms for the first produce, 2.4 ms for the next). This asks for the
/// topic's metadata until such a broker answered (a first reply can come from the bootstrap
/// address, which has no id): the id is then requested at once. Best effort: a producer that is
/// not warmed up still gets its id on the timer.
///
/// Blocks for up to `WARM_UP_ATTEMPTS` requests of `WARM_UP_TIMEOUT` each: off the async
/// threads.
#[must_use]
pub fn warm_up<C: ClientContext>(producer: &FutureProducer<C>, topic: &str) -> Option<i32> {
    let started = Instant::now();
    for attempt in 1..=WARM_UP_ATTEMPTS {
        match producer
            .client()
            .fetch_metadata(Some(topic), WARM_UP_TIMEOUT)
        {
            Ok(metadata) if metadata.orig_broker_id() >= 0 => {
                debug!(
                    broker = metadata.orig_broker_id(),
                    attempt,
                    elapsed_ms = started.elapsed().as_millis(),
                    "producer warmed up"
                );
                return Some(metadata.orig_broker_id());
            }
            // The bootstrap address answered; the next request goes to a broker by id.
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            Err(error) => {
                debug!(%error, "producer warm-up: no metadata (Kafka unreachable?)");
                return None;
            }
        }
    }
    None
}

/// Runs [`warm_up`] on a thread of its own: nothing waits for it.
fn spawn_warm_up(producer: Producer, topic: String) {
    let spawned = std::thread::Builder::new()
        .name("tl-producer-warm-up".to_owned())
        .spawn(move || {
            let _ = warm_up(&producer, &topic);
        });
    if let Err(error) = spawned {
        warn!(%error, "cannot start the producer warm-up thread; the first produce may wait for the producer id");
    }
}

/// A cloneable handle on the idempotent producer.
///
/// The producer is replaced, with its queue purged, when it loses every broker or hits a fatal
/// error: batches waiting on it fail at once with `UNAVAILABLE` (partners resend; dedupe makes that
/// safe) instead of hanging until their deadline, and the next batch starts a fresh producer
/// session. A fresh session matters for brokers that do not keep idempotent-producer state across
/// a restart (Tansu 0.6 with sqlite storage fails every later produce of the old session).
#[derive(Clone)]
pub struct Publisher {
    slot: Arc<RwLock<ProducerSlot>>,
    config: ClientConfig,
    topic: String,
    /// The configured partition count: each record's partition is computed from it.
    partitions: i32,
    durability: Durability,
    ack_timeout: Duration,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Publisher")
            .field("topic", &self.topic)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Creates the producer.
    ///
    /// # Errors
    /// When librdkafka refuses the configuration.
    pub fn new(
        kafka: &KafkaOptions,
        durability: Durability,
        ack_timeout: Duration,
    ) -> Result<Self> {
        let config = kafka.producer_config_lasting(ack_timeout);
        let slot = ProducerSlot::create(&config, &kafka.topic, 0)?;
        Ok(Self {
            slot: Arc::new(RwLock::new(slot)),
            config,
            topic: kafka.topic.clone(),
            partitions: kafka.partitions,
            durability,
            ack_timeout,
        })
    }

    /// Produces every envelope and waits until all are durable. All or nothing from the partner's
    /// point of view: when any delivery fails, the call fails and the partner resends the batch
    /// (dedupe keeps the events that did land from doubling). With `answer_by` (from the call's
    /// deadline), the answer comes before it.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when Kafka does not confirm (or not before `answer_by`: then nothing
    /// is produced when no time is left), [`Error::AckTimeout`] past the acknowledgement timeout.
    pub async fn publish(
        &self,
        envelopes: &[(Envelope, Vec<u8>)],
        answer_by: Option<Instant>,
    ) -> Result<Vec<Produced>> {
        // Answer before the partner's own deadline expires, so that it gets UNAVAILABLE with retry
        // information rather than a bare DEADLINE_EXCEEDED.
        let within_call = answer_by.map(|at| at.saturating_duration_since(Instant::now()));
        match within_call {
            Some(left) if left.is_zero() => Err(unavailable(
                "the call's deadline left no time to publish its events; nothing was published"
                    .to_owned(),
            )),
            Some(timeout) if timeout < self.ack_timeout => {
                tokio::time::timeout(timeout, self.publish_unbounded(envelopes))
                    .await
                    .map_err(|_| {
                        unavailable(format!(
                            "kafka did not confirm within the call's deadline ({}ms left)",
                            timeout.as_millis()
                        ))
                    })?
            }
            _ => {
                let timeout = self.ack_timeout;
                tokio::time::timeout(timeout, self.publish_unbounded(envelopes))
                    .await
                    .map_err(|_| Error::AckTimeout { timeout })?
            }
        }
    }

    fn current_producer(&self) -> (u64, Arc<OffRuntime<Producer>>, watch::Receiver<u64>) {
        let slot = self.slot.read().unwrap_or_else(PoisonError::into_inner);
        (
            slot.generation,
            slot.producer.clone(),
            slot.all_brokers_down.clone(),
        )
    }

    /// Replaces the producer of `generation` (unless another call did already, or, for `Lost`,
    /// it started less than [`MIN_REPLACE_INTERVAL`] ago), purging what is still queued or in
    /// flight on it.
    fn replace(&self, generation: u64, why: Replacement) {
        let mut slot = self.slot.write().unwrap_or_else(PoisonError::into_inner);
        if slot.generation != generation {
            return;
        }
        if why == Replacement::Lost && slot.started.elapsed() < MIN_REPLACE_INTERVAL {
            tracing::debug!(
                generation,
                "the producer lost every broker, but started moments ago: kept for now"
            );
            return;
        }
        match ProducerSlot::create(&self.config, &self.topic, generation + 1) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut *slot, fresh);
                old.producer
                    .purge(PurgeConfig::default().queue().inflight().non_blocking());
                // Destroyed off the runtime's threads by whoever lets go of it last: this, or a
                // call still in flight on it (`OffRuntime`).
                warn!(
                    generation = generation + 1,
                    why = why.as_str(),
                    "started a new producer session"
                );
            }
            Err(create_error) => {
                error!(%create_error, why = why.as_str(), "cannot start a new producer session");
            }
        }
    }

    async fn publish_unbounded(&self, envelopes: &[(Envelope, Vec<u8>)]) -> Result<Vec<Produced>> {
        let (mut generation, mut producer, mut all_brokers_down) = self.current_producer();
        if *all_brokers_down.borrow_and_update() > 0 {
            self.replace(generation, Replacement::Lost);
            let kept = generation;
            (generation, producer, all_brokers_down) = self.current_producer();
            if generation == kept {
                // Kept (it started moments ago, or a new one could not start): it has lost every
                // broker, so the call fails now rather than wait for its deadline.
                return Err(unavailable("no Kafka broker is reachable".to_owned()));
            }
            all_brokers_down.borrow_and_update();
        }
        let held: &Producer = &producer;
        let result = tokio::select! {
            result = self.produce_all(held, envelopes) => result,
            _ = all_brokers_down.changed() => Err(unavailable("no Kafka broker is reachable".to_owned())),
        };
        if result.is_err() {
            if let Some((code, reason)) = held.client().fatal_error() {
                error!(%code, %reason, "the idempotent producer hit a fatal error");
                self.replace(generation, Replacement::Fatal);
            } else if *all_brokers_down.borrow() > 0 {
                self.replace(generation, Replacement::Lost);
            }
        }
        result
    }

    async fn produce_all(
        &self,
        producer: &Producer,
        envelopes: &[(Envelope, Vec<u8>)],
    ) -> Result<Vec<Produced>> {
        let mut deliveries: VecDeque<DeliveryFuture> = VecDeque::with_capacity(envelopes.len());
        let mut done: Vec<Produced> = Vec::with_capacity(envelopes.len());
        for (envelope, value) in envelopes {
            let key = envelope.touchpoint.customer_id.as_str();
            loop {
                // murmur2 over the configured count, as the partitioner would over the topic's:
                // partitions added to the topic later do not move a customer away from the
                // projectors that own it.
                let record = FutureRecord::to(&self.topic)
                    .key(key)
                    .payload(value)
                    .partition(touchline_kafka::partition_for(
                        key.as_bytes(),
                        self.partitions,
                    ));
                match producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push_back(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        // Backpressure: wait for our oldest delivery, or for librdkafka to drain
                        // other callers' messages, then try again.
                        match deliveries.pop_front() {
                            Some(oldest) => done.push(delivered(oldest).await?),
                            None => tokio::time::sleep(Duration::from_millis(2)).await,
                        }
                    }
                    Err((error, _)) => return Err(unavailable(error.to_string())),
                }
            }
        }
        done.extend(try_join_all(deliveries.into_iter().map(delivered)).await?);
        if let Durability::LocalLog(applied, store) = &self.durability {
            wait_until_logged(applied.clone(), &done).await?;
            let identities: Vec<_> = envelopes
                .iter()
                .map(|(envelope, _)| {
                    (
                        envelope.partner_id.clone(),
                        envelope.touchpoint.event_id.clone(),
                    )
                })
                .collect();
            let looking = Arc::clone(store);
            let sequences = tokio::task::spawn_blocking(move || {
                identities
                    .iter()
                    .map(|(partner, event_id)| looking.event_sequence(partner, event_id))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(|error| unavailable(error.to_string()))?
            .map_err(|error| unavailable(error.to_string()))?;
            let Some(last) = sequences
                .into_iter()
                .try_fold(0_u64, |last, sequence| sequence.map(|s| last.max(s)))
            else {
                return Err(unavailable(
                    "the embedded broker dropped records before the projector read them".to_owned(),
                ));
            };
            // An event found may be another copy of it (a resend), applied and not flushed yet:
            // acknowledged once the log is durable up to it (the projector's flushes get there;
            // each one moves the applied offsets).
            let mut flushed = applied.clone();
            while store.durable_sequence() < last {
                flushed
                    .changed()
                    .await
                    .map_err(|_| unavailable("the projector stopped".to_owned()))?;
            }
        }
        Ok(done)
    }
}

async fn delivered(delivery: DeliveryFuture) -> Result<Produced> {
    match delivery.await {
        // A negative offset means the broker did not report one (acks other than all): nothing
        // says the event is durable.
        Ok(Ok(delivery)) if delivery.offset < 0 => Err(unavailable(format!(
            "the broker reported no offset for partition {}",
            delivery.partition
        ))),
        Ok(Ok(delivery)) => Ok(Produced {
            partition: delivery.partition,
            offset: delivery.offset,
        }),
        Ok(Err((error, _))) => {
            warn!(%error, "kafka delivery failed");
            Err(unavailable(error.to_string()))
        }
        Err(_) => Err(unavailable("the producer was dropped".to_owned())),
    }
}

fn unavailable(reason: String) -> Error {
    Error::Unavailable {
        reason,
        retry_after: Duration::from_secs(1),
    }
}

/// Waits until the local projector has flushed every produced offset to the event log.
async fn wait_until_logged(mut applied: AppliedOffsets, produced: &[Produced]) -> Result<()> {
    let mut needed = std::collections::BTreeMap::<i32, i64>::new();
    for position in produced {
        let after = position.offset.saturating_add(1);
        let next = needed.entry(position.partition).or_insert(after);
        *next = (*next).max(after);
    }
    applied
        .wait_for(|offsets| {
            needed.iter().all(|(partition, next)| {
                offsets
                    .get(partition)
                    .is_some_and(|applied| applied >= next)
            })
        })
        .await
        .map_err(|_| unavailable("the projector stopped".to_owned()))?;
    Ok(())
}

#[cfg(test)]
mod tests;
