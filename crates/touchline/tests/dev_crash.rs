//! `touchline dev` killed with SIGKILL in the middle of a stream of publishes: after a restart on
//! the same data folder, every acknowledged event is in the timeline exactly once. The embedded
//! broker loses everything at the kill; the local event log must not.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use touchline_proto::v1;
use touchline_proto::v1::ingest_service_client::IngestServiceClient;
use touchline_proto::v1::timeline_service_client::TimelineServiceClient;

const DEADLINE: Duration = Duration::from_secs(60);
const TOKEN: &str = "dev-token-swift-courier";

/// Starts `touchline dev` on a free port and returns it with its endpoint, read from its banner.
async fn start_dev(data_dir: &std::path::Path) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_touchline"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout is piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let endpoint = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(endpoint) = line.strip_prefix("touchline dev is serving on ") {
                return Ok(endpoint.to_owned());
            }
        }
        anyhow::bail!("touchline dev exited before serving")
    })
    .await
    .context("touchline dev did not start in time")??;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, endpoint))
}

fn event(index: usize) -> v1::Touchpoint {
    let seconds = i64::try_from(1_780_000_000 + index).unwrap_or_default();
    v1::Touchpoint {
        event_id: format!("evt-{index}"),
        customer_id: format!("cust-{}", index % 5),
        r#type: "delivery.completed".to_owned(),
        occurred_at: Some(prost_types::Timestamp { seconds, nanos: 0 }),
        channel: v1::Channel::Doorstep as i32,
        stage: v1::JourneyStage::Fulfil as i32,
        ..v1::Touchpoint::default()
    }
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("valid header"),
    );
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_dev_loses_no_acknowledged_event() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut child, endpoint) = start_dev(dir.path()).await?;
    let ingest = IngestServiceClient::connect(endpoint.clone()).await?;

    // Four partners' worth of concurrent publishers, each sending batches one after another until
    // a call fails; the process is killed once some batches are acknowledged, with others in flight.
    let (results, mut answers) = tokio::sync::mpsc::channel(64);
    for worker in 0..4 {
        let mut client = ingest.clone();
        let results = results.clone();
        tokio::spawn(async move {
            for batch in 0..50 {
                let first = (worker * 50 + batch) * 5;
                let events: Vec<_> = (first..first + 5).map(event).collect();
                let response = client
                    .publish(authorized(v1::PublishRequest {
                        events: events.clone(),
                        batch_id: String::new(),
                    }))
                    .await;
                let failed = response.is_err();
                if results.send((events, response)).await.is_err() || failed {
                    return;
                }
            }
        });
    }
    drop(results);
    let mut acked = BTreeMap::<String, BTreeSet<String>>::new();
    let mut acked_count = 0;
    let mut killed = false;
    while let Some((events, response)) = answers.recv().await {
        let Ok(response) = response else { continue };
        for (event, result) in events.iter().zip(&response.into_inner().results) {
            if matches!(result.result, Some(v1::event_result::Result::Accepted(_))) {
                acked
                    .entry(event.customer_id.clone())
                    .or_default()
                    .insert(event.event_id.clone());
                acked_count += 1;
            }
        }
        if acked_count >= 100 && !killed {
            child.start_kill()?;
            killed = true;
        }
    }
    assert!(killed, "the process was killed mid-stream");
    child.wait().await?;
    drop(ingest);

    let (mut child, endpoint) = start_dev(dir.path()).await?;
    let mut timeline = TimelineServiceClient::connect(endpoint).await?;
    for (customer, expected) in &acked {
        let entries = timeline
            .get_timeline(v1::GetTimelineRequest {
                customer_id: customer.clone(),
                page_size: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .entries;
        let ids: Vec<String> = entries
            .iter()
            .filter_map(|entry| entry.touchpoint.as_ref().map(|t| t.event_id.clone()))
            .collect();
        let unique: BTreeSet<String> = ids.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            ids.len(),
            "customer {customer}: no event twice"
        );
        assert!(
            unique.is_superset(expected),
            "customer {customer}: every acknowledged event survived the kill"
        );
    }
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}
