//! A node restarted after catching up goes on from its stored positions: nothing it projected is
//! read again, on any broker (Tansu 0.6 fetches only from the start of a record batch, and the
//! record before a caught-up position is inside the partition's last batch). A test binary of
//! its own: the projector's duplicate count is process-wide, and no other test here makes any.

use touchline_core::EventStore as _;
use touchline_proto::v1;
use touchline_tests::{COURIER, ingest_client, publish, start_broker, start_node, wait_until};

fn events(from: usize, to: usize) -> Vec<v1::Touchpoint> {
    touchline_tests::series("r", 11, from..to)
}

#[tokio::test]
async fn a_caught_up_node_restarts_without_reading_its_partitions_again() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let duplicates = || touchline_projection::metrics::PROJECTOR.duplicates.get();

    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    // Several batches per partition, the last one of several records.
    for start in (0..300).step_by(100) {
        publish(&mut ingest, COURIER.1, events(start, start + 100)).await?;
    }
    let store = node.store().expect("projects").clone();
    wait_until("every event durable", || {
        store.log_len() == 300 && store.durable_sequence() >= 300
    })
    .await?;
    drop(store);
    node.shutdown().await?;

    let before = duplicates();
    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    publish(&mut ingest, COURIER.1, events(300, 320)).await?;
    let store = node.store().expect("projects").clone();
    wait_until("the new events", || store.log_len() == 320).await?;
    assert_eq!(
        duplicates() - before,
        0,
        "a record projected before the restart was read again"
    );
    drop(store);
    node.shutdown().await
}
