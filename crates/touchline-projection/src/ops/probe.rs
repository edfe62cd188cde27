//! A Kafka client for status and health: partition watermarks and broker reachability.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use touchline_kafka::KafkaOptions;

use crate::Error;

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
