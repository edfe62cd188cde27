//! Connection management on the gRPC listener: a partner whose connection vanishes without a
//! close (dropped by a NAT or a load balancer) is disconnected by the server's HTTP/2 keepalive,
//! which frees its stream slot; a unary call whose body stops arriving is ended at the body
//! timeout, which frees its call slot; a connection older than `server.max-connection-age-ms` is
//! asked to go, its stream going on and new calls taking a new connection; during the shutdown delay health already says `NOT_SERVING` (and
//! `liveness` still `SERVING`) while calls, on open and on new connections, are still served.
//! Before any call is authenticated: a peer past `server.max-connections-per-peer` has its next
//! connection closed at once while other peers connect, and a connection that does not start
//! HTTP/2 within `server.preface-timeout-ms` is closed; either way the slot comes back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use touchline::Target;
use touchline_proto::v1::ingest_service_client::IngestServiceClient;
use touchline_proto::v1::{self, JourneyStage};
use touchline_tests::{
    COURIER, DEADLINE, authorized, error_reason, ingest_client, partners, publish,
    publish_not_protobuf, start_broker, start_node_with, touchpoint, wait_for_health,
    wait_for_health_at, wait_until_shed,
};

/// A TCP proxy in front of `upstream` that can go silent: it then forwards nothing in either
/// direction and closes nothing, which is how a connection dropped by a NAT or a load balancer
/// looks to the server. With a `budget`, it stops forwarding from the client to the server
/// once that many bytes went through (and cancels the token it returns then), and goes on
/// forwarding the server's answers.
async fn silenceable_proxy(
    upstream: SocketAddr,
) -> anyhow::Result<(SocketAddr, CancellationToken)> {
    let (addr, silence, _) = proxy(upstream, None).await?;
    Ok((addr, silence))
}

/// Also counts the connections it was asked for.
async fn proxy(
    upstream: SocketAddr,
    budget: Option<usize>,
) -> anyhow::Result<(SocketAddr, CancellationToken, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let silence = CancellationToken::new();
    let silenced = silence.clone();
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(forward(
                client_read,
                server_write,
                silenced.clone(),
                budget.map(|bytes| (bytes, silenced.clone())),
            ));
            let both_ways = if budget.is_some() {
                CancellationToken::new()
            } else {
                silenced.clone()
            };
            tokio::spawn(forward(server_read, client_write, both_ways, None));
        }
    });
    Ok((addr, silence, connections))
}

async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    silenced: CancellationToken,
    mut budget: Option<(usize, CancellationToken)>,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            () = silenced.cancelled() => break,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(read) => {
                let passed = budget.as_ref().map_or(read, |(left, _)| read.min(*left));
                if to.write_all(&buffer[..passed]).await.is_err() {
                    return;
                }
                if let Some((left, spent)) = &mut budget {
                    *left -= passed;
                    if *left == 0 {
                        spent.cancel();
                        break;
                    }
                }
            }
        }
    }
    // Silent: both halves stay open, and nothing passes this way any more.
    std::future::pending::<()>().await;
    drop((from, to));
}

/// A TCP connection to `node` from `source`, a loopback address of the test's choosing (Linux
/// answers on all of 127.0.0.0/8), so that a test can be several peers.
async fn connect_from(source: &str, node: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse()?, 0))?;
    Ok(socket.connect(node).await?)
}

/// Reads `connection` until the server closes it (end of stream or reset); `false` when it is
/// still open at the deadline. What the server sent first (its HTTP/2 settings) is skipped.
async fn closed_by_server(connection: &mut TcpStream) -> bool {
    let mut buffer = [0_u8; 1024];
    let closed = async {
        loop {
            match connection.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(DEADLINE, closed).await.is_ok()
}

/// Whether the server admitted `connection`: it sends its HTTP/2 settings first.
async fn admitted(connection: &mut TcpStream) -> anyhow::Result<bool> {
    let mut byte = [0_u8; 1];
    let read = tokio::time::timeout(DEADLINE, connection.read(&mut byte)).await?;
    Ok(matches!(read, Ok(1)))
}

/// A health check of the node at `node` over a new connection from `source`.
async fn health_from(source: &str, node: SocketAddr) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{node}"))?
        .local_address(Some(source.parse()?))
        .connect()
        .await?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(())
}

/// Health checks from `source` on new connections until one is served.
async fn served_from_again(source: &str, node: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        match health_from(source, node).await {
            Ok(()) => return Ok(()),
            Err(error) => anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{source} was never served again: {error:#}"
            ),
        }
    }
}

// Several peers on one machine: Linux answers on all of 127.0.0.0/8 (macOS only on 127.0.0.1).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_past_its_connection_limit_is_closed_at_once_and_others_are_served()
-> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.server.max_connections_per_peer = 2;
        // Connections that send nothing stay: only the count closes them.
        config.server.preface_timeout_ms = 0;
    })
    .await?;
    let address = node.local_addr();
    // Two connections from one address that send nothing: its whole allowance.
    let mut first = connect_from("127.0.0.1", address).await?;
    let mut second = connect_from("127.0.0.1", address).await?;
    assert!(
        admitted(&mut first).await?,
        "the first connection is served"
    );
    assert!(
        admitted(&mut second).await?,
        "the second connection is served"
    );
    // A third from that address is closed at once, and so is a client's call from it.
    let mut third = connect_from("127.0.0.1", address).await?;
    assert!(
        closed_by_server(&mut third).await,
        "the third was not closed"
    );
    assert!(
        health_from("127.0.0.1", address).await.is_err(),
        "a call past the peer's limit was served"
    );
    // Another address is served all the same.
    health_from("127.0.0.2", address).await?;
    // A connection of the first address closes: its slot comes back.
    drop(first);
    served_from_again("127.0.0.1", address).await?;
    drop(second);
    node.shutdown().await
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_start_http2_in_time_is_closed_and_its_slot_comes_back()
-> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.server.preface_timeout_ms = 300;
        // One connection at a time from the address: the silent one holds it until it is closed.
        config.server.max_connections_per_peer = 1;
    })
    .await?;
    let address = node.local_addr();
    let mut silent = connect_from("127.0.0.1", address).await?;
    assert!(admitted(&mut silent).await?, "the connection is served");
    assert!(
        closed_by_server(&mut silent).await,
        "the silent connection was never closed"
    );
    // Its slot came back: a client from the same address is served (it sends the preface at
    // once, well within the timeout).
    served_from_again("127.0.0.1", address).await?;
    // Part of the preface is not the preface. (From another address: the health check's
    // connection may not have given its slot back yet.)
    let mut partial = connect_from("127.0.0.3", address).await?;
    assert!(admitted(&mut partial).await?, "the connection is served");
    partial.write_all(b"PRI * HTTP/2.0\r\n").await?;
    assert!(
        closed_by_server(&mut partial).await,
        "a partial preface held the connection"
    );
    served_from_again("127.0.0.3", address).await?;
    node.shutdown().await
}

fn batch(id: &str) -> v1::PublishRequest {
    v1::PublishRequest {
        events: vec![touchpoint(
            id,
            "cust-conn",
            "parcel.scanned",
            10,
            JourneyStage::Fulfil,
        )],
        batch_id: id.to_owned(),
    }
}

/// Opens a stream of one batch and reads its answer.
async fn one_batch_stream(
    ingest: &mut IngestServiceClient<Channel>,
    id: &str,
) -> Result<u32, tonic::Status> {
    let mut answers = ingest
        .publish_stream(authorized(
            futures::stream::iter(vec![batch(id)]),
            COURIER.1,
        ))
        .await?
        .into_inner();
    Ok(answers.message().await?.map_or(0, |answer| answer.accepted))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_whose_connection_vanished_is_disconnected_and_its_stream_slot_freed()
-> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.max_streams_per_partner = 1;
        config.server.http2_keepalive_interval_ms = 200;
        config.server.http2_keepalive_timeout_ms = 200;
    })
    .await?;
    let (proxy, silence) = silenceable_proxy(node.local_addr()).await?;
    let mut through_proxy =
        IngestServiceClient::new(Target::new(format!("http://{proxy}")).connect().await?);
    let (requests, outgoing) = mpsc::channel(4);
    let mut answers = through_proxy
        .publish_stream(authorized(ReceiverStream::new(outgoing), COURIER.1))
        .await?
        .into_inner();
    requests.send(batch("via-proxy")).await?;
    assert_eq!(
        answers.message().await?.map(|answer| answer.accepted),
        Some(1)
    );

    // While that stream is open, the partner has no slot for another.
    let mut direct = ingest_client(&node).await?;
    let refused = one_batch_stream(&mut direct, "refused")
        .await
        .expect_err("one stream at most");
    assert_eq!(error_reason(&refused).as_deref(), Some("TOO_MANY_STREAMS"));

    // The proxied connection goes silent without closing: the server's pings go unanswered, it
    // drops the connection, and the stream's slot is free again.
    silence.cancel();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    let mut attempt = 0;
    loop {
        poll.tick().await;
        attempt += 1;
        match one_batch_stream(&mut direct, &format!("direct-{attempt}")).await {
            Ok(accepted) => {
                assert_eq!(accepted, 1);
                break;
            }
            Err(status) if error_reason(&status).as_deref() == Some("TOO_MANY_STREAMS") => {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "the vanished connection still holds the partner's stream slot"
                );
            }
            Err(status) => anyhow::bail!("unexpected: {status:?}"),
        }
    }
    drop(requests);
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_whose_body_stops_arriving_is_ended_and_frees_its_slot() -> anyhow::Result<()>
{
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.max_calls_per_partner = 1;
        config.ingest.request_body_timeout_ms = 1_000;
        config.ingest.rate_per_second = None;
        // Keepalive off: only the body timeout can end the stalled call.
        config.server.http2_keepalive_interval_ms = 0;
    })
    .await?;
    // The proxy lets the call's headers and the start of its body through, then nothing.
    let (proxy, stalled, _) = proxy(node.local_addr(), Some(4096)).await?;
    let mut through_proxy =
        IngestServiceClient::new(Target::new(format!("http://{proxy}")).connect().await?);
    let events = (0..1000)
        .map(|n| {
            touchpoint(
                &format!("stalled-{n}"),
                "cust-conn",
                "parcel.scanned",
                10,
                JourneyStage::Fulfil,
            )
        })
        .collect();
    let staller = tokio::spawn(async move { publish(&mut through_proxy, COURIER.1, events).await });
    stalled.cancelled().await;

    // The stalled call holds the partner's only call slot...
    let channel = node.target().connect().await?;
    wait_until_shed(&channel, COURIER.1, "TOO_MANY_CALLS", || {
        !staller.is_finished()
    })
    .await?;
    // ...until its body timeout ends it: then a call of the partner is decoded again.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        poll.tick().await;
        let status = publish_not_protobuf(&channel, COURIER.1).await?;
        if status.code() == tonic::Code::Internal {
            break;
        }
        assert_eq!(
            error_reason(&status).as_deref(),
            Some("TOO_MANY_CALLS"),
            "{status:?}"
        );
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the stalled call still holds the partner's call slot"
        );
    }
    // The stalled client is told why, if it still reads.
    let told = staller.await?.expect_err("a call whose body never came");
    assert_eq!(
        (told.code(), error_reason(&told).as_deref()),
        (tonic::Code::DeadlineExceeded, Some("BODY_TIMEOUT")),
        "{told:?}"
    );
    assert_eq!(
        touchline_tests::shed_calls(COURIER.0, "BODY_TIMEOUT"),
        1,
        "the timeout is counted for its partner"
    );
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_shutdown_delay_health_says_not_serving_and_calls_are_still_served()
-> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.server.shutdown_delay_ms = 5_000;
    })
    .await?;
    // Serving first: the node is NOT_SERVING at its start too, until its first probe.
    wait_for_health(&node, "", true).await?;
    let target = node.target().clone();
    let mut ingest = ingest_client(&node).await?;
    let mut health = HealthClient::new(target.connect().await?);
    let stopping = tokio::spawn(node.shutdown());
    wait_for_health_at(&target, "", false).await?;
    // The process is alive all the same (what a liveness probe asks).
    let alive = health
        .check(HealthCheckRequest {
            service: "liveness".to_owned(),
        })
        .await?
        .into_inner()
        .status;
    assert_eq!(alive, ServingStatus::Serving as i32);
    // Still served: on an open connection, and on a new one.
    let open = publish(&mut ingest, COURIER.1, batch("during-delay").events).await?;
    assert_eq!(open.accepted, 1);
    let mut fresh = IngestServiceClient::new(target.connect().await?);
    let new = publish(&mut fresh, COURIER.1, batch("new-connection").events).await?;
    assert_eq!(new.accepted, 1);
    assert!(!stopping.is_finished(), "the delay is not over yet");
    stopping.await?
}

/// A stopping node turns NOT_SERVING what it runs, and nothing else: on an ingest-only node the
/// timeline service stays unknown (`NOT_FOUND`), as it was while the node served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_reports_only_the_services_it_runs() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.projector.enabled = false;
        config.query.enabled = false;
        config.server.shutdown_delay_ms = 5_000;
    })
    .await?;
    wait_for_health(&node, "touchline.v1.IngestService", true).await?;
    let target = node.target().clone();
    let mut health = HealthClient::new(target.connect().await?);
    let stopping = tokio::spawn(node.shutdown());
    wait_for_health_at(&target, "touchline.v1.IngestService", false).await?;
    let timeline = health
        .check(HealthCheckRequest {
            service: "touchline.v1.TimelineService".to_owned(),
        })
        .await
        .expect_err("a service the node does not run");
    assert_eq!(timeline.code(), tonic::Code::NotFound, "{timeline:?}");
    stopping.await?
}

/// A client watching the node's health (client-side health checking) sees NOT_SERVING, then its
/// stream ends when the server stops: it does not hold the stop for the grace period (ten
/// minutes here, far past the test's deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_watch_ends_with_the_server_and_does_not_hold_its_stop() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.server.shutdown_grace_ms = 600_000;
    })
    .await?;
    wait_for_health(&node, "", true).await?;
    let mut health = HealthClient::new(node.target().connect().await?);
    let mut statuses = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    // The watch is live: its first status (SERVING, or NOT_SERVING for the moment a Kafka probe
    // of the health report timed out under load).
    let first = tokio::time::timeout(touchline_tests::DEADLINE, statuses.message()).await??;
    assert!(first.is_some(), "the watch sends the status in force");
    let stopping = tokio::spawn(node.shutdown());
    let mut seen = Vec::new();
    while let Some(response) =
        tokio::time::timeout(touchline_tests::DEADLINE, statuses.message()).await??
    {
        seen.push(response.status);
    }
    assert_eq!(
        seen.last(),
        Some(&(ServingStatus::NotServing as i32)),
        "NOT_SERVING, then the end of the stream: {seen:?}"
    );
    tokio::time::timeout(touchline_tests::DEADLINE, stopping).await???;
    Ok(())
}

/// A reflection stream (no token needed) whose client keeps its request side open ends with
/// `UNAVAILABLE` when the server stops: it does not hold the stop for the grace period (ten
/// minutes here, far past the test's deadline), and its answers before that are whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflection_stream_ends_with_the_server_and_does_not_hold_its_stop() -> anyhow::Result<()>
{
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_response};

    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.server.shutdown_grace_ms = 600_000;
    })
    .await?;
    let mut reflection = ServerReflectionClient::new(node.target().connect().await?);
    // The request side stays open: the sender is kept.
    let (requests, outgoing) = mpsc::channel(4);
    let mut answers = reflection
        .server_reflection_info(ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    requests
        .send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .await?;
    let answer = tokio::time::timeout(touchline_tests::DEADLINE, answers.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("no answer"))?;
    assert!(matches!(
        answer.message_response,
        Some(server_reflection_response::MessageResponse::ListServicesResponse(_))
    ));
    let stopping = tokio::spawn(node.shutdown());
    let ended = tokio::time::timeout(touchline_tests::DEADLINE, answers.message())
        .await?
        .expect_err("the stream ends with the server");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    tokio::time::timeout(touchline_tests::DEADLINE, stopping).await???;
    drop(requests);
    Ok(())
}

/// With `server.max-connection-age-ms`, a connection is asked to go (HTTP/2 GOAWAY) once that old:
/// the partner's stream in flight on it goes on, and its new calls go on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_connection_is_asked_to_go_and_its_open_stream_goes_on() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.server.max_connection_age_ms = 300;
    })
    .await?;
    let (proxy, _, connections) = proxy(node.local_addr(), None).await?;
    let mut ingest =
        IngestServiceClient::new(Target::new(format!("http://{proxy}")).connect().await?);
    let (requests, outgoing) = mpsc::channel(4);
    let mut answers = ingest
        .publish_stream(authorized(ReceiverStream::new(outgoing), COURIER.1))
        .await?
        .into_inner();
    requests.send(batch("age-stream-1")).await?;
    assert_eq!(
        answers.message().await?.map(|answer| answer.accepted),
        Some(1)
    );
    assert_eq!(connections.load(Ordering::SeqCst), 1);

    // New calls until one takes a new connection: the first one, past its age, was asked to go.
    // (A call racing the GOAWAY may be refused; the next goes on the new connection.)
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    let mut attempt = 0;
    while connections.load(Ordering::SeqCst) < 2 {
        poll.tick().await;
        attempt += 1;
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no new connection: the old one was never asked to go"
        );
        let _ = publish(
            &mut ingest,
            COURIER.1,
            batch(&format!("age-unary-{attempt}")).events,
        )
        .await;
    }
    let answer = publish(&mut ingest, COURIER.1, batch("age-unary-new").events).await?;
    assert_eq!(answer.accepted, 1, "a new call goes on the new connection");
    // The stream opened on the old connection goes on.
    requests.send(batch("age-stream-2")).await?;
    assert_eq!(
        answers.message().await?.map(|answer| answer.accepted),
        Some(1)
    );
    drop(requests);
    node.shutdown().await
}
