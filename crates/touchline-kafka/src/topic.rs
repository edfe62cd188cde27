//! Topic provisioning against a real broker: create the touchpoints topic when it is missing (with
//! the configured partitions, replication factor, retention and `min.insync.replicas`), and refuse
//! an existing topic whose partition count differs, since the partition of a customer is
//! `murmur2(customer_id) % partitions`.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{info, warn};

use crate::{Error, KafkaOptions, Result, fetch_partitions};

const TIMEOUT: Duration = Duration::from_secs(30);

/// What provisioning found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicState {
    /// The topic existed with the configured partition count.
    Existing,
    /// Touchline created it.
    Created,
}

fn admin_client(options: &KafkaOptions) -> Result<AdminClient<DefaultClientContext>> {
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", &options.bootstrap_servers);
    crate::apply_overrides(&mut config, &options.properties);
    // librdkafka's admin client is a producer, which asks the broker to create a topic it asks
    // about: the check below would create it with the broker's defaults (its partitions, its
    // cleanup policy) before Touchline could with its own, or refuse it as missing.
    config.set("allow.auto.create.topics", "false");
    Ok(config.create()?)
}

/// The topic's partition count, `None` when it does not exist. Blocking.
fn partition_count(admin: &AdminClient<DefaultClientContext>, topic: &str) -> Result<Option<i32>> {
    match fetch_partitions(admin.inner(), topic, TIMEOUT) {
        Ok(partitions) => Ok(Some(i32::try_from(partitions.len()).unwrap_or(i32::MAX))),
        Err(Error::TopicMissing { .. }) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Makes sure the topic exists with the configured partition count, creating it when missing and
/// allowed to.
///
/// # Errors
/// [`Error::PartitionMismatch`] for an existing topic with another partition count,
/// [`Error::TopicMissing`] when it is missing and `create-topic` is off, [`Error::CreateTopic`]
/// when the broker refuses to create it.
pub async fn ensure_topic(options: &KafkaOptions) -> Result<TopicState> {
    let admin = admin_client(options)?;
    let topic = options.topic.clone();
    let check = |admin: AdminClient<DefaultClientContext>, topic: String| {
        tokio_blocking(move || partition_count(&admin, &topic).map(|count| (admin, count)))
    };
    let (admin, existing) = check(admin, topic.clone()).await?;
    if let Some(actual) = existing {
        return verify(options, actual).map(|()| TopicState::Existing);
    }
    if !options.create_topic {
        return Err(Error::TopicMissing { topic });
    }
    let retention = options.retention_ms.map(|ms| ms.to_string());
    let min_insync = options
        .min_insync_replicas
        .map(|replicas| replicas.to_string());
    // Deleted by age, never compacted (whatever the broker's `log.cleanup.policy`): records are
    // keyed by customer, and compaction would keep only each customer's last event.
    let mut new_topic = NewTopic::new(
        &topic,
        options.partitions,
        TopicReplication::Fixed(options.replication_factor),
    )
    .set("cleanup.policy", "delete");
    if let Some(retention) = &retention {
        new_topic = new_topic.set("retention.ms", retention);
    }
    if let Some(min_insync) = &min_insync {
        new_topic = new_topic.set("min.insync.replicas", min_insync);
    }
    let results = admin
        .create_topics(
            [&new_topic],
            &AdminOptions::new().operation_timeout(Some(TIMEOUT)),
        )
        .await?;
    for result in results {
        match result {
            Ok(_) => {
                info!(%topic, partitions = options.partitions, replication_factor = options.replication_factor, "created topic");
            }
            // Another node created it at the same time: verify it like any existing topic.
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(Error::CreateTopic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    // Metadata can lag behind creation: wait until the topic shows with all its partitions.
    let deadline = Instant::now() + TIMEOUT;
    let mut admin = admin;
    loop {
        let (next_admin, count) = check(admin, topic.clone()).await?;
        admin = next_admin;
        match count {
            Some(actual) if actual == options.partitions || Instant::now() >= deadline => {
                return verify(options, actual).map(|()| TopicState::Created);
            }
            None if Instant::now() >= deadline => return Err(Error::TopicMissing { topic }),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn verify(options: &KafkaOptions, actual: i32) -> Result<()> {
    if actual != options.partitions {
        return Err(Error::PartitionMismatch {
            topic: options.topic.clone(),
            expected: options.partitions,
            actual,
        });
    }
    Ok(())
}

async fn tokio_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| {
            warn!(%error, "topic check task failed");
            Err(Error::CreateTopic {
                topic: String::new(),
                reason: error.to_string(),
            })
        })
}
