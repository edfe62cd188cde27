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

    /// Whether the broker answers a metadata request for the topic within `timeout` (blocking),
    /// naming the topic without an error: a topic deleted (or never created) is answered with
    /// metadata too, and then nothing can be published.
    #[must_use]
    pub fn reachable(&self, timeout: Duration) -> bool {
        self.consumer
            .fetch_metadata(Some(&self.topic), timeout)
            .is_ok_and(|metadata| {
                !metadata.brokers().is_empty()
                    && metadata
                        .topics()
                        .iter()
                        .any(|topic| topic.name() == self.topic && topic.error().is_none())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_the_broker_does_not_have_is_not_reachable() {
        let broker = touchline_kafka::EmbeddedBroker::start(1, "present", 2).expect("starts");
        let probe = |topic: &str| {
            KafkaProbe::new(&KafkaOptions {
                bootstrap_servers: broker.bootstrap_servers().to_owned(),
                topic: topic.to_owned(),
                ..KafkaOptions::default()
            })
            .expect("a probe")
            .reachable(Duration::from_secs(10))
        };
        assert!(probe("present"));
        assert!(
            !probe("missing"),
            "a missing topic is answered, with an error"
        );
    }
}
