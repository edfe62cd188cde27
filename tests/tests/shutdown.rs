//! Graceful shutdown with a partner stream open: the server ends the stream with UNAVAILABLE
//! (`SHUTTING_DOWN`, so the partner reconnects and resends what has no answer), and every
//! acknowledged event is in the log after a restart, once. A batch still waiting in the server
//! (for the partner's rate) when it stops is answered `SHUTTING_DOWN` and not published.

use std::collections::BTreeSet;

use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use touchline_proto::v1::{self, JourneyStage};

use touchline_tests::{
    COURIER, authorized, error_reason, event_ids, ingest_client, partners, publish, start_broker,
    start_node, start_node_with, timeline_client, touchpoint, wait_for_timeline, wait_until,
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
    assert_eq!(error_reason(&ended).as_deref(), Some("SHUTTING_DOWN"));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waiting_in_the_server_at_shutdown_is_answered_and_not_published()
-> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        // A token every five seconds: nothing the test sends later can pass the bucket.
        config.ingest.rate_per_second = Some(0.2);
        config.ingest.burst = 5.0;
    })
    .await?;
    let mut ingest = ingest_client(&node).await?;
    let event = |id: &str| touchpoint(id, "greta", "parcel.scanned", 1, JourneyStage::Fulfil);
    // The burst goes to a unary call; the stream's batch then owes 25 seconds.
    let first: Vec<_> = (0..5).map(|i| event(&format!("unary-{i}"))).collect();
    assert_eq!(publish(&mut ingest, COURIER.1, first).await?.accepted, 5);
    let (batches, requests) = tokio::sync::mpsc::channel(4);
    let mut answers = ingest
        .publish_stream(authorized(ReceiverStream::new(requests), COURIER.1))
        .await?
        .into_inner();
    batches
        .send(v1::PublishRequest {
            events: (0..5).map(|i| event(&format!("waiting-{i}"))).collect(),
            batch_id: "waiting".to_owned(),
        })
        .await?;
    // The batch waits in the server once the partner's bucket owes it: a unary call (of a whole
    // burst, which needs the bucket full) is told to come back in tens of seconds.
    touchline_tests::wait_until_rate_owes(
        &mut ingest,
        COURIER.1,
        || (0..5).map(|i| event(&format!("probe-{i}"))).collect(),
        Duration::from_secs(30),
    )
    .await?;

    node.shutdown().await?;
    let ended = answers
        .message()
        .await
        .expect_err("the waiting batch is answered with the shutdown");
    assert_eq!(
        (ended.code(), error_reason(&ended).as_deref()),
        (tonic::Code::Unavailable, Some("SHUTTING_DOWN"))
    );
    drop(batches);

    // After a restart: the unary events and a marker, nothing of the waiting batch.
    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    assert_eq!(
        publish(&mut ingest, COURIER.1, vec![event("marker")])
            .await?
            .accepted,
        1
    );
    let mut timeline = timeline_client(&node).await?;
    let entries = wait_for_timeline(&mut timeline, "greta", 6).await?;
    let mut ids = event_ids(&entries);
    ids.sort();
    assert_eq!(
        ids,
        [
            "marker", "unary-0", "unary-1", "unary-2", "unary-3", "unary-4"
        ],
        "the batch that waited was not published"
    );
    node.shutdown().await
}

/// A `/metrics` client that sent half a request and stalls does not hold the shutdown (hyper
/// keeps such a connection open through a graceful stop): the node stops, health included.
/// Before, the shutdown waited for that connection forever, health never said `NOT_SERVING`, and
/// the projector was never stopped or flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_metrics_client_does_not_hold_the_shutdown() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    let metrics = node.metrics_addr().expect("metrics are served");
    let mut stalled = tokio::net::TcpStream::connect(metrics).await?;
    stalled
        .write_all(format!("GET /metrics HTTP/1.1\r\nHost: {metrics}\r\n").as_bytes())
        .await?;
    // A whole request on another connection, answered: the server has been reading meanwhile.
    let mut other = tokio::net::TcpStream::connect(metrics).await?;
    other
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(30), other.read_to_string(&mut answer)).await??;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    tokio::time::timeout(Duration::from_secs(30), node.shutdown())
        .await
        .map_err(|_| anyhow::anyhow!("the shutdown waited for the stalled metrics client"))??;
    drop(stalled);
    Ok(())
}

/// A call still open when the grace is over (here a `Publish` whose body never comes: tonic waits
/// for it without end) is cut: its client hears that it ended, and the stopped node lets go of
/// its store. Before, dropping the server's task stopped only the accepting: the call went on
/// past the shutdown, holding the store, until the process exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_still_open_when_the_grace_is_over_is_cut_and_the_store_let_go() -> anyhow::Result<()>
{
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.server.shutdown_grace_ms = 300;
    })
    .await?;
    let channel = tonic::transport::Endpoint::from_shared(node.endpoint())?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static("/touchline.v1.IngestService/Publish");
    // A body that never comes: the client polls it once it sent the call's headers.
    let (polled, headers_sent) = tokio::sync::oneshot::channel::<()>();
    let mut polled = Some(polled);
    let body = futures::stream::poll_fn(move |_| {
        if let Some(polled) = polled.take() {
            let _ = polled.send(());
        }
        std::task::Poll::<Option<Vec<u8>>>::Pending
    });
    let call = tokio::spawn(async move {
        grpc.client_streaming(authorized(body, COURIER.1), path, touchline_tests::RawCodec)
            .await
    });
    tokio::time::timeout(Duration::from_secs(30), headers_sent).await??;
    // A call answered on the same connection after it: the server has taken the open call's
    // headers (HTTP/2 frames of one connection are read in order).
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?;
    tokio::time::timeout(Duration::from_secs(30), node.shutdown())
        .await
        .map_err(|_| anyhow::anyhow!("the shutdown waited for the open call"))??;
    let ended = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| anyhow::anyhow!("the open call was not ended"))??;
    assert!(ended.is_err(), "the call cannot have succeeded");
    // Nothing holds the store any longer (sled releases its lock from a thread of its own).
    wait_until("the stopped node to let go of its store", || {
        touchline_projection::SledStore::open(&dir.path().join("store")).is_ok()
    })
    .await
}
