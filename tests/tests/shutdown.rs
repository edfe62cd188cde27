//! Graceful shutdown with a partner stream open: the server ends the stream with UNAVAILABLE
//! (`SHUTTING_DOWN`, so the partner reconnects and resends what has no answer), and every
//! acknowledged event is in the log after a restart, once. (Batches in flight at the shutdown are
//! not exercised here: `nothing_after_a_failed_batch_of_a_stream_is_published` in streaming.rs
//! covers how a stream ends with batches in flight.)

use std::collections::BTreeSet;

use tokio_stream::wrappers::ReceiverStream;
use touchline_proto::v1::{self, JourneyStage};
use touchline_tests::{
    COURIER, authorized, event_ids, ingest_client, start_broker, start_node, timeline_client,
    touchpoint, wait_for_timeline,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_open_streams_and_keeps_every_acknowledged_event() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;

    let (batches, requests) = tokio::sync::mpsc::channel(4);
    let mut answers = ingest
        .publish_stream(authorized(ReceiverStream::new(requests), COURIER.1))
        .await?
        .into_inner();
    let mut acked = BTreeSet::new();
    for batch in 0..3 {
        let events: Vec<_> = (0..5)
            .map(|i| {
                touchpoint(
                    &format!("s-{batch}-{i}"),
                    "frank",
                    "parcel.scanned",
                    batch * 10 + i,
                    JourneyStage::Fulfil,
                )
            })
            .collect();
        batches
            .send(v1::PublishRequest {
                events: events.clone(),
                batch_id: batch.to_string(),
            })
            .await?;
        let answer = answers.message().await?.expect("an answer per batch");
        assert_eq!(
            (answer.batch_id.as_str(), answer.accepted),
            (batch.to_string().as_str(), 5)
        );
        acked.extend(events.into_iter().map(|event| event.event_id));
    }

    // The stream is still open (the sender is alive) while the node shuts down.
    node.shutdown().await?;
    let ended = answers
        .message()
        .await
        .expect_err("the stream ends with a status");
    assert_eq!(ended.code(), tonic::Code::Unavailable);
    assert!(
        ended.message().contains("shutting down"),
        "{}",
        ended.message()
    );
    drop(batches);

    let node = start_node(&broker, dir.path()).await?;
    let mut timeline = timeline_client(&node).await?;
    let entries = wait_for_timeline(&mut timeline, "frank", acked.len()).await?;
    assert_eq!(
        event_ids(&entries).into_iter().collect::<BTreeSet<_>>(),
        acked
    );
    assert_eq!(entries.len(), acked.len());
    node.shutdown().await
}
