//! Kafka for Touchline, in one place: the connection options every role shares, the producer and
//! consumer configurations built from them (with librdkafka property pass-through), and the
//! embedded broker (librdkafka's in-process mock cluster) that `touchline dev` and the tests use.

pub mod embedded;
pub mod partition;
pub mod topic;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::{Client, ClientContext};
use serde::{Deserialize, Serialize};

pub use embedded::EmbeddedBroker;
pub use partition::partition_for;
pub use topic::{TopicState, ensure_topic};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the embedded kafka broker failed to start: {0}")]
    EmbeddedStart(String),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the broker did not report a cluster id within {}ms", .timeout.as_millis())]
    ClusterIdUnavailable { timeout: Duration },
    #[error("topic {topic} does not exist or has no partitions")]
    TopicMissing { topic: String },
    #[error(
        "topic {topic} has {actual} partitions but kafka.partitions is {expected}: a different partition count would move customers between partitions; set kafka.partitions = {actual} or use another topic"
    )]
    PartitionMismatch {
        topic: String,
        expected: i32,
        actual: i32,
    },
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
}

/// How to reach Kafka and which topic carries touchpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct KafkaOptions {
    /// Comma-separated `host:port` list. Ignored by `touchline dev`, which starts its own broker.
    pub bootstrap_servers: String,
    /// The touchpoints topic. Record key: customer id; value: a `touchline.v1.Envelope`.
    pub topic: String,
    /// Partitions of the topic. Touchline creates the topic with this many when it is missing and
    /// refuses to start when an existing topic has another count (customers would move between
    /// partitions).
    pub partitions: i32,
    /// Create the topic when it is missing (through the Kafka admin API).
    pub create_topic: bool,
    /// Replication factor of a topic Touchline creates. Use 3 on a production cluster.
    pub replication_factor: i32,
    /// `retention.ms` of a topic Touchline creates; the broker's default when unset. Replays read
    /// the topic, so keep it as long as you may need to recover a log.
    pub retention_ms: Option<i64>,
    /// `min.insync.replicas` of a topic Touchline creates; the broker's default when unset. With
    /// `acks=all`, 2 on a 3-replica topic survives one broker loss without losing acknowledged data.
    pub min_insync_replicas: Option<i32>,
    /// The consumer group id the projector commits its (advisory) offsets under.
    pub group_id: String,
    /// librdkafka properties applied to every client last, overriding Touchline's settings
    /// (for example `security.protocol`, `sasl.mechanisms`, `linger.ms`).
    pub properties: BTreeMap<String, String>,
    /// Extra librdkafka properties for the producer only.
    pub producer_properties: BTreeMap<String, String>,
    /// Extra librdkafka properties for the consumer only.
    pub consumer_properties: BTreeMap<String, String>,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".to_owned(),
            topic: "touchline.touchpoints.v1".to_owned(),
            partitions: 6,
            create_topic: true,
            replication_factor: 1,
            retention_ms: None,
            min_insync_replicas: None,
            group_id: "touchline-projector".to_owned(),
            properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
        }
    }
}

/// `message.timeout.ms` unless a publisher waits longer.
const DEFAULT_MESSAGE_TIMEOUT_MS: u128 = 30_000;

/// librdkafka's largest `message.timeout.ms`.
const MAX_MESSAGE_TIMEOUT_MS: u128 = i32::MAX as u128;

/// Topic properties among those Touchline sets or guards: librdkafka also takes them with a
/// `topic.` prefix in a client's configuration.
const TOPIC_PROPERTIES: [&str; 8] = [
    "acks",
    "request.required.acks",
    "auto.offset.reset",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "compression.type",
    "compression.codec",
    "partitioner",
];

/// The name of the property a pass-through name sets, for the properties Touchline sets or
/// guards: librdkafka takes a topic property with a `topic.` prefix too, and some properties
/// under an alias (`request.required.acks` for `acks`, say). Two spellings of one property would
/// be two settings applied in no fixed order (rdkafka keeps them in a hash map), so the
/// pass-through is applied, and checked, under this name. Other names are returned as they are.
#[must_use]
pub fn canonical_property(name: &str) -> &str {
    let bare = name
        .strip_prefix("topic.")
        .filter(|bare| TOPIC_PROPERTIES.contains(bare))
        .unwrap_or(name);
    match bare {
        "metadata.broker.list" => "bootstrap.servers",
        "request.required.acks" => "acks",
        "delivery.timeout.ms" => "message.timeout.ms",
        "queue.buffering.max.ms" => "linger.ms",
        "compression.codec" => "compression.type",
        canonical => canonical,
    }
}

/// Properties Touchline sets from keys of its own (`bootstrap-servers`, `group-id`): a
/// pass-through table may repeat them (the configuration refuses another value), and the key
/// wins. `touchline dev` points `bootstrap-servers` at its embedded broker: a table that repeated
/// the real brokers must not point its clients back at them.
pub const SET_FROM_KEYS: [&str; 2] = ["bootstrap.servers", "group.id"];

/// Sets pass-through `properties` on `config`, each under its [`canonical_property`] name, except
/// those [`SET_FROM_KEYS`].
pub(crate) fn apply_overrides(config: &mut ClientConfig, properties: &BTreeMap<String, String>) {
    for (key, value) in properties {
        let property = canonical_property(key);
        if !SET_FROM_KEYS.contains(&property) {
            config.set(property, value);
        }
    }
}

impl KafkaOptions {
    /// The producer: idempotent, `acks=all`, murmur2 partitioning (what Java clients use, so a
    /// customer lands on the same partition whichever client produced it), a short linger so that
    /// concurrent partners share requests, and deliveries given up after 30 s.
    #[must_use]
    pub fn producer_config(&self) -> ClientConfig {
        self.producer_config_lasting(Duration::ZERO)
    }

    /// [`Self::producer_config`] for a publisher that waits up to `ack_timeout` for a delivery:
    /// librdkafka gives up on one after `message.timeout.ms`, which is then at least that long
    /// (unless the properties set it), so that a longer acknowledgement timeout is not cut short
    /// by a failed delivery at 30 s.
    #[must_use]
    pub fn producer_config_lasting(&self, ack_timeout: Duration) -> ClientConfig {
        let message_timeout_ms = ack_timeout
            .as_millis()
            .clamp(DEFAULT_MESSAGE_TIMEOUT_MS, MAX_MESSAGE_TIMEOUT_MS);
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "2")
            .set("socket.nagle.disable", "true")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", "200000")
            .set("message.timeout.ms", message_timeout_ms.to_string())
            // A topic deleted while ingest runs is not created again by its metadata requests,
            // with the broker's defaults: Touchline creates it, with its settings, at a start.
            .set("allow.auto.create.topics", "false");
        apply_overrides(&mut config, &self.properties);
        apply_overrides(&mut config, &self.producer_properties);
        config
    }

    /// The consumer: manual assignment (positions live in the store, invariant 6), no automatic
    /// commits (commits are advisory, for lag monitoring), read only committed records. Records
    /// read ahead are capped at 16 MiB and 20,000 records (librdkafka's defaults, 64 MiB and
    /// 100,000, let a lagging projector hold hundreds of MiB; the projector takes 1,000 at most at
    /// once by default), and a partition whose read-ahead is full is fetched again after 20 ms.
    #[must_use]
    pub fn consumer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "10")
            .set("queued.max.messages.kbytes", "16384")
            .set("queued.min.messages", "20000")
            // Once the read-ahead is full, look again soon (librdkafka waits 1 s by default,
            // which stalled a consumer that keeps up).
            .set("fetch.queue.backoff.ms", "20")
            .set("socket.nagle.disable", "true")
            .set("enable.partition.eof", "false");
        apply_overrides(&mut config, &self.properties);
        apply_overrides(&mut config, &self.consumer_properties);
        config
    }
}

/// A value whose last holder, when it lets go inside the runtime, has it dropped on a blocking
/// thread: destroying a librdkafka client blocks (it joins its threads; a consumer of a group
/// closes first, polling until it has), and the last holder of a client (a replaced producer, a
/// replay's consumer) may be a task ending on an async worker, which would stall every task
/// scheduled there.
#[derive(Debug)]
pub struct OffRuntime<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> OffRuntime<T> {
    /// Holds `value` until the last holder lets go.
    #[must_use]
    pub fn new(value: T) -> Self {
        Self(Some(value))
    }
}

impl<T: Send + 'static> std::ops::Deref for OffRuntime<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // Taken only by `drop`, after which nothing can reach it.
        self.0
            .as_ref()
            .expect("an OffRuntime's value is taken only when it is dropped")
    }
}

impl<T: Send + 'static> Drop for OffRuntime<T> {
    fn drop(&mut self) {
        let Some(value) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            // A runtime shutting down refuses the task and drops the value here: blocking, but
            // only at the end.
            Ok(runtime) => {
                runtime.spawn_blocking(move || drop(value));
            }
            Err(_) => drop(value),
        }
    }
}

/// Asks the broker for its cluster id. Blocking: call it from a blocking context.
///
/// # Errors
/// When the broker does not answer within `timeout`.
pub fn fetch_cluster_id<C: ClientContext>(client: &Client<C>, timeout: Duration) -> Result<String> {
    client
        .fetch_cluster_id(timeout)
        .ok_or(Error::ClusterIdUnavailable { timeout })
}

/// The partitions of `topic`, sorted. Blocking: call it from a blocking context.
///
/// # Errors
/// When metadata cannot be fetched or the topic has no partitions.
pub fn fetch_partitions<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>> {
    let metadata = client.fetch_metadata(Some(topic), timeout)?;
    let mut partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|candidate| candidate.name() == topic && candidate.error().is_none())
        .flat_map(|candidate| {
            candidate
                .partitions()
                .iter()
                .map(rdkafka::metadata::MetadataPartition::id)
        })
        .collect();
    partitions.sort_unstable();
    if partitions.is_empty() {
        return Err(Error::TopicMissing {
            topic: topic.to_owned(),
        });
    }
    Ok(partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_over_touchline_settings() {
        let options = KafkaOptions {
            properties: BTreeMap::from([("linger.ms".to_owned(), "20".to_owned())]),
            producer_properties: BTreeMap::from([("acks".to_owned(), "all".to_owned())]),
            consumer_properties: BTreeMap::from([("fetch.wait.max.ms".to_owned(), "5".to_owned())]),
            ..KafkaOptions::default()
        };
        let producer = options.producer_config();
        assert_eq!(producer.get("linger.ms"), Some("20"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("partitioner"), Some("murmur2_random"));
        assert_eq!(
            options.consumer_config().get("fetch.wait.max.ms"),
            Some("5")
        );
        assert_eq!(options.consumer_config().get("linger.ms"), Some("20"));
    }

    /// `touchline dev` points `bootstrap-servers` at its embedded broker: the real brokers
    /// repeated in a table (the configuration allows only the key's value) do not win.
    #[test]
    fn the_brokers_and_the_group_come_from_their_keys_whatever_the_tables_repeat() {
        let options = KafkaOptions {
            bootstrap_servers: "127.0.0.1:9092".to_owned(),
            group_id: "touchline-dev".to_owned(),
            properties: BTreeMap::from([
                ("bootstrap.servers".to_owned(), "kafka:9092".to_owned()),
                ("group.id".to_owned(), "touchline".to_owned()),
            ]),
            producer_properties: BTreeMap::from([(
                "metadata.broker.list".to_owned(),
                "kafka:9092".to_owned(),
            )]),
            consumer_properties: BTreeMap::from([("group.id".to_owned(), "touchline".to_owned())]),
            ..KafkaOptions::default()
        };
        for config in [options.producer_config(), options.consumer_config()] {
            assert_eq!(config.get("bootstrap.servers"), Some("127.0.0.1:9092"));
            assert_eq!(config.get("metadata.broker.list"), None);
        }
        assert_eq!(
            options.consumer_config().get("group.id"),
            Some("touchline-dev")
        );
        assert_eq!(options.producer_config().get("group.id"), None);
    }

    #[test]
    fn other_spellings_of_a_property_set_it_under_its_own_name() {
        let options = KafkaOptions {
            producer_properties: BTreeMap::from([
                ("delivery.timeout.ms".to_owned(), "10000".to_owned()),
                ("topic.compression.codec".to_owned(), "zstd".to_owned()),
                (
                    "topic.metadata.refresh.interval.ms".to_owned(),
                    "1000".to_owned(),
                ),
            ]),
            consumer_properties: BTreeMap::from([(
                "topic.auto.offset.reset".to_owned(),
                "smallest".to_owned(),
            )]),
            ..KafkaOptions::default()
        };
        let producer = options.producer_config();
        assert_eq!(producer.get("message.timeout.ms"), Some("10000"));
        assert_eq!(producer.get("delivery.timeout.ms"), None);
        assert_eq!(producer.get("compression.type"), Some("zstd"));
        assert_eq!(producer.get("topic.compression.codec"), None);
        assert_eq!(
            producer.get("topic.metadata.refresh.interval.ms"),
            Some("1000")
        );
        let consumer = options.consumer_config();
        assert_eq!(consumer.get("auto.offset.reset"), Some("smallest"));
        assert_eq!(consumer.get("topic.auto.offset.reset"), None);
        // What a client sets after the pass-through still wins (a replay's `error`).
        assert_eq!(
            options
                .consumer_config()
                .set("auto.offset.reset", "error")
                .get("auto.offset.reset"),
            Some("error")
        );
    }

    #[test]
    fn deliveries_last_as_long_as_the_acknowledgement_waits() {
        let options = KafkaOptions::default();
        let timeout = |config: &ClientConfig| config.get("message.timeout.ms").map(str::to_owned);
        assert_eq!(
            timeout(&options.producer_config()).as_deref(),
            Some("30000")
        );
        assert_eq!(
            timeout(&options.producer_config_lasting(Duration::from_secs(5))).as_deref(),
            Some("30000")
        );
        assert_eq!(
            timeout(&options.producer_config_lasting(Duration::from_secs(90))).as_deref(),
            Some("90000")
        );
        let set = KafkaOptions {
            producer_properties: BTreeMap::from([(
                "message.timeout.ms".to_owned(),
                "10000".to_owned(),
            )]),
            ..KafkaOptions::default()
        };
        assert_eq!(
            timeout(&set.producer_config_lasting(Duration::from_secs(90))).as_deref(),
            Some("10000")
        );
    }

    /// The last holder of a client (a replaced producer, a replay's consumer) may be a task
    /// ending on an async worker: what it holds is dropped on a blocking thread, not there
    /// (destroying a librdkafka client joins its threads).
    #[test]
    fn a_value_let_go_of_on_the_runtime_is_dropped_on_another_thread()
    -> Result<(), Box<dyn std::error::Error>> {
        #[derive(Debug)]
        struct Recorder(std::sync::mpsc::Sender<std::thread::ThreadId>);
        impl Drop for Recorder {
            fn drop(&mut self) {
                let _ = self.0.send(std::thread::current().id());
            }
        }
        let (dropped, dropped_on) = std::sync::mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().build()?;
        let worker = runtime.block_on(async {
            drop(std::sync::Arc::new(OffRuntime::new(Recorder(
                dropped.clone(),
            ))));
            std::thread::current().id()
        });
        let on = dropped_on.recv_timeout(Duration::from_secs(30))?;
        assert_ne!(on, worker, "dropped on the runtime's own thread");
        drop(runtime);
        // Outside a runtime: at once, where it is let go of.
        drop(OffRuntime::new(Recorder(dropped)));
        assert_eq!(
            dropped_on.recv_timeout(Duration::from_secs(30))?,
            std::thread::current().id()
        );
        Ok(())
    }
}
