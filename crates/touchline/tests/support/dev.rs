//! `touchline dev` children of the tests, and what they acknowledged.

#![allow(dead_code, reason = "each test file uses its share")]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;

use tokio::process::Command;
use touchline_proto::v1;
use touchline_proto::v1::timeline_service_client::TimelineServiceClient;

/// The partner token `touchline dev` accepts (its demo courier's).
pub const TOKEN: &str = "dev-token-swift-courier";

/// `message` with the dev partner's bearer token.
pub fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("valid header"),
    );
    request
}

/// Acknowledged event ids per customer.
pub type Acked = BTreeMap<String, BTreeSet<String>>;

/// A node's flags to listen on free ports, then the flag of its data folder.
const FREE_PORTS_IN: [&str; 5] = [
    "--listen",
    "127.0.0.1:0",
    "--metrics-listen",
    "127.0.0.1:0",
    "--data-dir",
];

/// `touchline dev` on free ports and `data_dir`, started by `sh` after `shell` (limits of the
/// process, say `ulimit -n 256 && `), logging warnings; stdout and stderr piped, killed when
/// dropped.
pub fn dev_after(shell: &str, data_dir: &std::path::Path) -> Command {
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            &format!("{shell}exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_touchline"),
            "dev",
        ])
        .args(FREE_PORTS_IN)
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// `touchline serve` on free ports and `data_dir`, against the Kafka at `bootstrap`, logging JSON
/// at level info to its stderr (piped; stdout discarded); killed when dropped.
pub fn serve(data_dir: &std::path::Path, bootstrap: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_touchline"));
    command
        .arg("serve")
        .args(FREE_PORTS_IN)
        .arg(data_dir)
        .env("TOUCHLINE_KAFKA__BOOTSTRAP_SERVERS", bootstrap)
        .env("TOUCHLINE_LOG__FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// The test's event `index`: customer `index mod customers`, one second after the one before, with
/// `payload` bytes of payload.
pub fn event(index: usize, customers: usize, payload: usize) -> v1::Touchpoint {
    let seconds = i64::try_from(1_780_000_000 + index).unwrap_or_default();
    v1::Touchpoint {
        event_id: format!("evt-{index}"),
        customer_id: format!("cust-{}", index % customers),
        r#type: "delivery.completed".to_owned(),
        occurred_at: Some(prost_types::Timestamp { seconds, nanos: 0 }),
        channel: v1::Channel::Doorstep as i32,
        stage: v1::JourneyStage::Fulfil as i32,
        payload: vec![u8::try_from(index % 251).unwrap_or_default(); payload],
        ..v1::Touchpoint::default()
    }
}

/// Adds the events of `response` that were accepted (of `events`, the request's) to `acked`;
/// returns how many.
pub fn add_accepted(
    acked: &mut Acked,
    events: &[v1::Touchpoint],
    response: &v1::PublishResponse,
) -> usize {
    let mut accepted = 0;
    for (event, result) in events.iter().zip(&response.results) {
        if matches!(result.result, Some(v1::event_result::Result::Accepted(_))) {
            acked
                .entry(event.customer_id.clone())
                .or_default()
                .insert(event.event_id.clone());
            accepted += 1;
        }
    }
    accepted
}

/// Every acknowledged event is in its customer's timeline, once.
pub async fn assert_all_there_once(endpoint: &str, acked: &Acked) -> anyhow::Result<()> {
    let mut timeline = TimelineServiceClient::connect(endpoint.to_owned()).await?;
    for (customer, expected) in acked {
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
            "customer {customer}: every acknowledged event survived"
        );
    }
    Ok(())
}
