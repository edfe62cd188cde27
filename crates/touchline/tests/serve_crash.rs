//! `touchline serve` killed with SIGKILL while its projector works through a backlog, against a
//! broker that outlives it (the test's own mock cluster, which the node reaches over its loopback
//! port as it would a remote Kafka). Started again on the same folder, the node reads the topic
//! again from the positions stored with its state: every acknowledged event is in its timeline
//! exactly once (invariants 1, 3), and no record it had already applied is read again (invariant
//! 6: the positions travel with the state; had they lagged it, those records would come back as
//! duplicates). The partner then sends every event again, as one that lost its answers would:
//! each is dropped as a duplicate.

#[path = "support/dev.rs"]
mod dev;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::Child;
use touchline_kafka::embedded::EmbeddedBroker;
use touchline_proto::v1;
use touchline_proto::v1::ingest_service_client::IngestServiceClient;
use touchline_proto::v1::timeline_service_client::TimelineServiceClient;

const DEADLINE: Duration = Duration::from_secs(60);
const TOPIC: &str = "touchline.touchpoints.v1";
/// Enough that the projector is still working through them when the last is acknowledged
/// (ingest acknowledges several times faster than the store projects, BENCHMARKS.md).
const EVENTS: usize = 30_000;
const CUSTOMERS: usize = 100;
const BATCH: usize = 500;
/// The partner `deploy/partners.example.toml` lists with this token.
const TOKEN: &str = "example-courier-token";

/// A running `touchline serve`: its gRPC endpoint and its metrics address, read from its log.
struct Serve {
    child: Child,
    endpoint: String,
    metrics: String,
}

/// Starts `touchline serve` on `data_dir` against `bootstrap`, on free ports, logging JSON.
async fn start_serve(data_dir: &std::path::Path, bootstrap: &str) -> anyhow::Result<Serve> {
    let partners = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/partners.example.toml"
    );
    let mut child = dev::serve(data_dir, bootstrap)
        .env("TOUCHLINE_INGEST__PARTNERS_FILE", partners)
        // No rate limit: the events are sent as fast as the node takes them.
        .env("TOUCHLINE_INGEST__RATE_PER_SECOND", "0")
        .spawn()?;
    let stderr = child.stderr.take().context("stderr is piped")?;
    let mut lines = BufReader::new(stderr).lines();
    let (mut endpoint, mut metrics) = (None, None);
    tokio::time::timeout(DEADLINE, async {
        while endpoint.is_none() || metrics.is_none() {
            let Some(line) = lines.next_line().await? else {
                anyhow::bail!("touchline serve exited before serving");
            };
            let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            // Flattened: the event's fields beside its message.
            match record["message"].as_str() {
                Some("touchline is serving") => {
                    endpoint = record["local_addr"]
                        .as_str()
                        .map(|addr| format!("http://{addr}"));
                }
                Some(message) if message.starts_with("metrics on ") => {
                    metrics = record["addr"].as_str().map(str::to_owned);
                }
                _ => {}
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("touchline serve did not start in time")??;
    // The rest of the log is drained, so that the node never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Serve {
        child,
        endpoint: endpoint.context("serving")?,
        metrics: metrics.context("metrics")?,
    })
}

/// The value of counter `name` in the node's `/metrics` (0 when absent).
async fn counter(metrics: &str, name: &str) -> anyhow::Result<u64> {
    let mut connection = tokio::net::TcpStream::connect(metrics).await?;
    connection
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, connection.read_to_string(&mut answer)).await??;
    let value = answer
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(Ok(0), str::parse::<u64>)?;
    Ok(value)
}

/// Publishes every event, four batches at a time; returns the acknowledged ids per customer.
async fn publish_all(endpoint: &str) -> anyhow::Result<dev::Acked> {
    let ingest = IngestServiceClient::connect(endpoint.to_owned()).await?;
    let batches = (0..EVENTS).step_by(BATCH).map(|first| {
        let mut client = ingest.clone();
        async move {
            let events: Vec<_> = (first..(first + BATCH).min(EVENTS))
                .map(|index| dev::event(index, CUSTOMERS, 0))
                .collect();
            let mut request = tonic::Request::new(v1::PublishRequest {
                events: events.clone(),
                batch_id: String::new(),
            });
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {TOKEN}").parse()?);
            let response = client.publish(request).await?.into_inner();
            anyhow::Ok((events, response))
        }
    });
    let answered: Vec<_> = futures::stream::iter(batches)
        .buffer_unordered(4)
        .collect()
        .await;
    let mut acked = dev::Acked::new();
    for answer in answered {
        let (events, response) = answer?;
        anyhow::ensure!(
            dev::add_accepted(&mut acked, &events, &response) == events.len(),
            "{response:?}"
        );
    }
    Ok(acked)
}

/// Each customer's event ids in its timeline, in order, every page read.
async fn timelines(endpoint: &str) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut timeline = TimelineServiceClient::connect(endpoint.to_owned()).await?;
    let mut held = BTreeMap::new();
    for customer in (0..CUSTOMERS).map(|customer| format!("cust-{customer}")) {
        let mut ids = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = timeline
                .get_timeline(v1::GetTimelineRequest {
                    customer_id: customer.clone(),
                    page_size: 1000,
                    page_token,
                    ..v1::GetTimelineRequest::default()
                })
                .await;
            let page = page?.into_inner();
            ids.extend(
                page.entries
                    .iter()
                    .filter_map(|entry| entry.touchpoint.as_ref())
                    .map(|touchpoint| touchpoint.event_id.clone()),
            );
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        held.insert(customer, ids);
    }
    Ok(held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_projection_resumes_from_its_stored_positions_exactly_once()
-> anyhow::Result<()> {
    let broker = EmbeddedBroker::start(1, TOPIC, 6)?;
    let dir = tempfile::tempdir()?;
    let mut serve = start_serve(dir.path(), broker.bootstrap_servers()).await?;
    let acked = publish_all(&serve.endpoint).await?;
    assert_eq!(acked.values().map(BTreeSet::len).sum::<usize>(), EVENTS);
    // Killed as soon as the last event is acknowledged: nothing flushed on the way out.
    serve.child.start_kill()?;
    serve.child.wait().await?;

    let mut serve = start_serve(dir.path(), broker.bootstrap_servers()).await?;
    let resent = publish_all(&serve.endpoint).await?;
    assert_eq!(resent, acked, "the resent events are acknowledged again");
    // Every acknowledged event projected, and every resent one dropped as a duplicate.
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    let held = tokio::time::timeout(DEADLINE, async {
        loop {
            poll.tick().await;
            let duplicates =
                counter(&serve.metrics, "touchline_projector_duplicate_events_total").await?;
            if duplicates >= EVENTS as u64 {
                let held = timelines(&serve.endpoint).await?;
                if held.values().map(Vec::len).sum::<usize>() >= EVENTS {
                    return anyhow::Ok(held);
                }
            }
        }
    })
    .await
    .context("the restarted node did not project everything in time")??;

    for (customer, expected) in &acked {
        let ids = &held[customer];
        let unique: BTreeSet<String> = ids.iter().cloned().collect();
        assert_eq!(unique.len(), ids.len(), "{customer}: no event twice");
        assert_eq!(
            &unique, expected,
            "{customer}: every acknowledged event, once"
        );
    }
    assert_eq!(
        counter(&serve.metrics, "touchline_projector_duplicate_events_total").await?,
        EVENTS as u64,
        "only the resent events were duplicates: no record applied before the kill was read again"
    );
    let applied = counter(&serve.metrics, "touchline_projector_applied_events_total").await?;
    // What makes the test a test of the resume: the kill came while the projector worked through
    // its backlog, after it had made some of it durable.
    assert!(
        applied > 0,
        "the first node had projected everything before the kill: nothing was left to resume"
    );
    assert!(
        applied < EVENTS as u64,
        "the first node had made nothing durable before the kill: no stored position to resume from"
    );
    serve.child.start_kill()?;
    serve.child.wait().await?;
    Ok(())
}
