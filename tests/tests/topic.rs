//! Topic provisioning: a missing topic is created with the configured partitions (against a broker
//! that creates topics: Tansu in `.ci/run`, not the mock cluster), a missing topic the node may not
//! create stays missing, and an existing topic with another partition count is refused with a
//! message that says so.

use std::time::Duration;

use touchline::{BrokerChoice, Node};
use touchline_tests::{PARTITIONS, config, partners, start_broker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_topic_with_another_partition_count_is_refused() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let mut config = config(&broker, dir.path());
    config.kafka.partitions = PARTITIONS * 2;
    let error = Node::start(config, BrokerChoice::External, partners())
        .await
        .expect_err("refused");
    let message = format!("{error:#}");
    assert!(
        message.contains(&format!(
            "has {PARTITIONS} partitions but kafka.partitions is {}",
            PARTITIONS * 2
        )),
        "{message}"
    );
    assert!(
        message.contains("move customers between partitions"),
        "{message}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the mock cluster has no CreateTopics (it made topics only as asked about, with its own 4 partitions): .ci/run runs it against Tansu"]
async fn a_missing_topic_is_created_with_the_configured_partitions() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let mut config = config(&broker, dir.path());
    config.kafka.topic = format!("{}-created", broker.topic());
    config.kafka.partitions = 4;
    config.kafka.retention_ms = Some(7 * 24 * 3600 * 1000);
    let options = config.kafka.clone();
    let node = Node::start(config, BrokerChoice::External, partners()).await?;
    let partitions = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<i32>> {
        let consumer: rdkafka::consumer::BaseConsumer = options.consumer_config().create()?;
        Ok(touchline_kafka::fetch_partitions(
            rdkafka::consumer::Consumer::client(&consumer),
            &options.topic,
            Duration::from_secs(10),
        )?)
    })
    .await??;
    assert_eq!(partitions, [0, 1, 2, 3]);
    node.shutdown().await
}

/// A node that may not create its topic finds it missing, and leaves it missing: asking whether
/// it exists does not make the broker create it with its own defaults (librdkafka's admin client
/// and producer ask the broker to create a topic they ask about, unless told not to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_stays_missing_when_the_node_may_not_create_it() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let mut config = config(&broker, dir.path());
    config.kafka.topic = format!("{}-absent", broker.topic());
    config.kafka.create_topic = false;
    let options = config.kafka.clone();
    let error = Node::start(config, BrokerChoice::External, partners())
        .await
        .expect_err("refused");
    let message = format!("{error:#}");
    assert!(message.contains("does not exist"), "{message}");
    let asked = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let consumer: rdkafka::consumer::BaseConsumer = options.consumer_config().create()?;
        Ok(touchline_kafka::fetch_partitions(
            rdkafka::consumer::Consumer::client(&consumer),
            &options.topic,
            Duration::from_secs(10),
        ))
    })
    .await??;
    assert!(
        matches!(asked, Err(touchline_kafka::Error::TopicMissing { .. })),
        "{asked:?}"
    );
    Ok(())
}
