//! A Kafka client for status and health: partition watermarks and broker reachability.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use touchline_kafka::KafkaOptions;

use crate::Error;

/// Partitions whose watermarks are asked for at once, each on a thread of its own.
pub const PARTITIONS_AT_ONCE: usize = 16;

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

    /// (low, high) watermarks per partition; `None` unless every partition's are answered within
    /// `timeout` (blocking).
    #[must_use]
    pub fn watermarks(
        &self,
        partitions: &[i32],
        timeout: Duration,
    ) -> Option<BTreeMap<i32, (i64, i64)>> {
        let marks = self.watermarks_each(partitions, timeout);
        (marks.len() == partitions.len()).then_some(marks)
    }

    /// (low, high) watermarks of each partition whose leader answers within `timeout`
    /// (blocking): one partition without a leader does not hide the others'. Partitions are asked
    /// at once, up to `PARTITIONS_AT_ONCE` of them, within one deadline for the whole call: a
    /// broker that answers none takes `timeout`, and the partitions not asked by then are unknown.
    #[must_use]
    pub fn watermarks_each(
        &self,
        partitions: &[i32],
        timeout: Duration,
    ) -> BTreeMap<i32, (i64, i64)> {
        let deadline = std::time::Instant::now() + timeout;
        let mut marks = BTreeMap::new();
        for group in partitions.chunks(PARTITIONS_AT_ONCE) {
            let timeout = deadline.saturating_duration_since(std::time::Instant::now());
            if timeout.is_zero() {
                break;
            }
            std::thread::scope(|scope| {
                let asked: Vec<_> = group
                    .iter()
                    .map(|&partition| {
                        let asking = std::thread::Builder::new()
                            .name("tl-watermarks".to_owned())
                            .spawn_scoped(scope, move || {
                                self.consumer
                                    .fetch_watermarks(&self.topic, partition, timeout)
                            });
                        (partition, asking)
                    })
                    .collect();
                for (partition, asking) in asked {
                    // A thread that could not start, or failed: that partition is unknown.
                    if let Ok(Ok(Ok(found))) = asking.map(std::thread::ScopedJoinHandle::join) {
                        marks.insert(partition, found);
                    }
                }
            });
        }
        marks
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
    fn a_partition_whose_leader_is_down_does_not_hide_the_others_watermarks() {
        let cluster = rdkafka::mocking::MockCluster::new(2).expect("a mock cluster");
        cluster.create_topic("split", 2, 1).expect("a topic");
        cluster
            .partition_leader("split", 0, Some(1))
            .expect("a leader");
        cluster
            .partition_leader("split", 1, Some(2))
            .expect("a leader");
        let probe = KafkaProbe::new(&KafkaOptions {
            bootstrap_servers: cluster.bootstrap_servers(),
            topic: "split".to_owned(),
            ..KafkaOptions::default()
        })
        .expect("a probe");
        let timeout = Duration::from_secs(10);
        assert_eq!(probe.watermarks_each(&[0, 1], timeout).len(), 2);
        cluster.broker_down(2).expect("down");
        let marks = probe.watermarks_each(&[0, 1], Duration::from_secs(3));
        assert_eq!(marks.keys().copied().collect::<Vec<_>>(), [0]);
        assert_eq!(probe.watermarks(&[0, 1], Duration::from_secs(3)), None);
    }

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
