//! The Kafka side of ingest: produces a batch of envelopes with every delivery in flight at once,
//! and reports each event's durable position only once Kafka (and, in dev mode, the local event
//! log) confirmed it.

use std::collections::VecDeque;
use std::time::Duration;

use futures::future::try_join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use touchline_core::Envelope;
use touchline_kafka::KafkaOptions;
use tracing::warn;

use crate::{Error, Result};

/// The next offset per partition that the local projector has flushed to its event log.
pub type AppliedOffsets = tokio::sync::watch::Receiver<std::collections::BTreeMap<i32, i64>>;

/// When an event counts as durable.
#[derive(Debug, Clone)]
pub enum Durability {
    /// Once Kafka confirmed it (`acks=all`): for real brokers.
    Broker,
    /// Once Kafka confirmed it and the local projector flushed it to the event log: for the
    /// embedded broker, which keeps data in memory only.
    LocalLog(AppliedOffsets),
}

/// The durable position of one produced event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub partition: i32,
    pub offset: i64,
}

/// A cloneable handle on the idempotent producer.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    topic: String,
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
        let producer: FutureProducer = kafka.producer_config().create()?;
        Ok(Self {
            producer,
            topic: kafka.topic.clone(),
            durability,
            ack_timeout,
        })
    }

    /// Produces every envelope and waits until all are durable. All or nothing from the partner's
    /// point of view: when any delivery fails, the call fails and the partner resends the batch
    /// (dedupe keeps the events that did land from doubling).
    ///
    /// # Errors
    /// [`Error::Unavailable`] when Kafka does not confirm, [`Error::AckTimeout`] past the deadline.
    pub async fn publish(&self, envelopes: &[(Envelope, Vec<u8>)]) -> Result<Vec<Produced>> {
        let timeout = self.ack_timeout;
        tokio::time::timeout(timeout, self.publish_unbounded(envelopes))
            .await
            .map_err(|_| Error::AckTimeout { timeout })?
    }

    async fn publish_unbounded(&self, envelopes: &[(Envelope, Vec<u8>)]) -> Result<Vec<Produced>> {
        let mut deliveries: VecDeque<DeliveryFuture> = VecDeque::with_capacity(envelopes.len());
        let mut done: Vec<Produced> = Vec::with_capacity(envelopes.len());
        for (envelope, value) in envelopes {
            let key = envelope.touchpoint.customer_id.as_str();
            loop {
                let record = FutureRecord::to(&self.topic).key(key).payload(value);
                match self.producer.send_result(record) {
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
        if let Durability::LocalLog(applied) = &self.durability {
            wait_until_logged(applied.clone(), &done).await?;
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
