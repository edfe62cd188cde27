//! Starting a node: a dev node whose projector would not own every partition is refused (its
//! acknowledgements wait for its own projector), and a start that fails after the projector
//! started stops it, so that the store can be opened again at once. The embedded broker and real
//! sled stores on temporary directories.

use touchline::{BrokerChoice, Config, Node};
use touchline_ingest::PartnerRegistry;

fn dev_config(dir: &tempfile::TempDir) -> Config {
    let mut config = Config::default();
    config.store.path = dir.path().join("store");
    config.server.listen = "127.0.0.1:0".parse().expect("an address");
    config.metrics.enabled = false;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_node_whose_projector_owns_only_some_partitions_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = dev_config(&dir);
    config.projector.partitions = vec![0];
    let error = Node::start(config, BrokerChoice::Embedded, PartnerRegistry::default())
        .await
        .expect_err("refused");
    assert!(
        format!("{error:#}").contains("projector.partitions"),
        "{error:#}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_fails_after_the_projector_started_releases_the_store() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The metrics port is taken: the start fails after the store and the projector started.
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut config = dev_config(&dir);
    config.metrics.enabled = true;
    config.metrics.listen = taken.local_addr()?;
    let error = Node::start(config, BrokerChoice::Embedded, PartnerRegistry::default())
        .await
        .expect_err("the metrics port is taken");
    assert!(
        format!("{error:#}").contains("metrics") || format!("{error:#}").contains("listen"),
        "{error:#}"
    );
    // The same store opens again at once: the failed start closed it.
    let node = Node::start(
        dev_config(&dir),
        BrokerChoice::Embedded,
        PartnerRegistry::default(),
    )
    .await?;
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_failed_fails_even_when_a_stop_came_at_the_same_time() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let stop = tokio_util::sync::CancellationToken::new();
    stop.cancel();
    // The refusal is known at the first poll, when the stop is there too: the failure wins (an
    // operator's exit status and a supervisor's restart policy see a failed start), every time.
    for _ in 0..32 {
        let mut config = dev_config(&dir);
        config.projector.partitions = vec![0];
        let started = Node::start_until(
            config,
            BrokerChoice::Embedded,
            PartnerRegistry::default(),
            &stop,
        )
        .await;
        assert!(
            started.is_err(),
            "a stop hid the failure: {:?}",
            started.map(|node| node.is_some())
        );
    }
    Ok(())
}
