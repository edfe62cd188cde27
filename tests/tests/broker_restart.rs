//! A real broker restarted in the middle of a stream of publishes: Tansu with sqlite storage is
//! stopped and started again on the same port while partners keep publishing. Partners see errors
//! or delays while it is down, never a false acknowledgement; afterwards every acknowledged event
//! is in the timeline exactly once, and ingest recovered without a Touchline restart.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use touchline_proto::v1::{self, JourneyStage};
use touchline_tests::{
    COURIER, DEADLINE, PARTITIONS, TestBroker, authorized, event_ids, ingest_client, start_node,
    timeline_client, touchpoint, wait_for_timeline, wait_until,
};

const BATCHES: usize = 40;
const CUSTOMERS: usize = 5;

fn tansu_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/tansu.sh")
}

fn tansu(args: &[&str], state: &Path) -> anyhow::Result<String> {
    let output = Command::new(tansu_script())
        .arg(args[0])
        .arg(state)
        .args(&args[1..])
        .output()?;
    ensure!(
        output.status.success(),
        "tansu.sh {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// Stops the broker even when the test fails.
struct Tansu(PathBuf);

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = tansu(&["stop"], &self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts and restarts its own Tansu broker (deploy/tansu.sh, tansu on PATH); .ci/run runs it with --ignored"]
async fn a_broker_restart_mid_stream_loses_no_acknowledged_event() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("tansu");
    let bootstrap = tansu(&["start", "sqlite"], &state)?;
    let _tansu = Tansu(state.clone());
    let topic = "touchline-restart-test".to_owned();
    touchline_kafka::ensure_topic(&touchline_kafka::KafkaOptions {
        bootstrap_servers: bootstrap.clone(),
        topic: topic.clone(),
        partitions: PARTITIONS,
        ..touchline_kafka::KafkaOptions::default()
    })
    .await?;
    let broker = TestBroker::External { bootstrap, topic };
    let node = start_node(&broker, dir.path()).await?;
    let ingest = ingest_client(&node).await?;

    // A partner that resends each batch until it is acknowledged, as the contract asks.
    let (progress, mut acked_batches) = tokio::sync::mpsc::unbounded_channel();
    let failures_seen = Arc::new(AtomicUsize::new(0));
    let failures = Arc::clone(&failures_seen);
    // The partner holds its sixth batch until the broker is down, so that it publishes into the
    // outage however fast the first five went.
    let (broker_down, mut down) = tokio::sync::watch::channel(false);
    let partner = tokio::spawn(async move {
        let mut ingest = ingest;
        for batch in 0..BATCHES {
            if batch == 5 {
                down.wait_for(|down| *down).await?;
            }
            let events: Vec<v1::Touchpoint> = (0..10)
                .map(|i| {
                    let index = batch * 10 + i;
                    touchpoint(
                        &format!("e{index}"),
                        &format!("cust-{}", index % CUSTOMERS),
                        "parcel.scanned",
                        i64::try_from(index).unwrap_or_default(),
                        JourneyStage::Fulfil,
                    )
                })
                .collect();
            let deadline = tokio::time::Instant::now() + DEADLINE * 4;
            let mut pace = tokio::time::interval(Duration::from_millis(50));
            loop {
                pace.tick().await;
                let mut request = authorized(
                    v1::PublishRequest {
                        events: events.clone(),
                        batch_id: batch.to_string(),
                    },
                    COURIER.1,
                );
                request.set_timeout(Duration::from_secs(10));
                match ingest.publish(request).await {
                    Ok(response) => {
                        let response = response.into_inner();
                        anyhow::ensure!(response.accepted == 10, "batch {batch}: {response:?}");
                        let _ = progress.send(events.clone());
                        break;
                    }
                    Err(status) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        anyhow::ensure!(
                            matches!(
                                status.code(),
                                tonic::Code::Unavailable
                                    | tonic::Code::DeadlineExceeded
                                    | tonic::Code::Cancelled
                            ),
                            "batch {batch}: unexpected {status:?}"
                        );
                        anyhow::ensure!(
                            tokio::time::Instant::now() < deadline,
                            "batch {batch} never acknowledged: {status:?}"
                        );
                    }
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    });

    let mut acked = BTreeMap::<String, BTreeSet<String>>::new();
    let mut record = |events: Vec<v1::Touchpoint>| {
        for event in events {
            acked
                .entry(event.customer_id)
                .or_default()
                .insert(event.event_id);
        }
    };
    for _ in 0..5 {
        record(
            acked_batches
                .recv()
                .await
                .context("the partner stopped early")?,
        );
    }
    // Down: partners get errors, never an acknowledgement of what Kafka did not confirm.
    tansu(&["stop"], &state)?;
    broker_down.send(true)?;
    wait_until("a publish to fail while the broker is down", || {
        failures_seen.load(Ordering::Relaxed) > 0
    })
    .await?;
    // Back: ingest recovers by itself.
    tansu(&["resume"], &state)?;
    while let Some(events) = acked_batches.recv().await {
        record(events);
    }
    partner.await??;
    println!(
        "publishes that failed while the broker was down: {}",
        failures_seen.load(Ordering::Relaxed)
    );

    let total: usize = acked.values().map(BTreeSet::len).sum();
    assert_eq!(
        total,
        BATCHES * 10,
        "every batch was acknowledged after the restart, without restarting Touchline"
    );
    let mut timeline = timeline_client(&node).await?;
    for (customer, expected) in &acked {
        let entries = wait_for_timeline(&mut timeline, customer, expected.len()).await?;
        let ids = event_ids(&entries);
        assert_eq!(ids.len(), expected.len(), "{customer}: nothing twice");
        assert_eq!(
            &ids.into_iter().collect::<BTreeSet<_>>(),
            expected,
            "{customer}: nothing lost"
        );
    }
    node.shutdown().await
}
