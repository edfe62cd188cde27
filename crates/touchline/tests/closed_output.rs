//! A command whose standard output is closed (`touchline config | head -1` once `head` has
//! exited) ends quietly with status 0, as Unix tools do, instead of panicking on its next write;
//! a command that fails for another reason still fails; a command whose output only reports its
//! work (`touchline replay`) does that work whole.

#[path = "support/banner.rs"]
mod banner;
#[path = "support/dev.rs"]
mod dev;

use std::process::{Command, Stdio};
use std::time::Duration;

use touchline_proto::v1;
use touchline_proto::v1::ingest_service_client::IngestServiceClient;

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn a_command_with_its_output_closed_ends_quietly() -> anyhow::Result<()> {
    // The reading end is closed before the command starts: its first write fails (EPIPE).
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_touchline"))
        .arg("config")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}

#[test]
fn a_command_that_fails_still_fails_with_its_output_closed() -> anyhow::Result<()> {
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    // Nothing listens on the discard port: the call fails before anything is printed.
    let output = Command::new(env!("CARGO_BIN_EXE_touchline"))
        .args(["timeline", "cust-0007", "--endpoint", "http://127.0.0.1:9"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{:?}: {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}

/// `touchline replay`'s lines are a report of the replay, which is its work: with its output
/// closed it still runs the replay to its end (leaving the progress stream would stop the replay
/// at its next batch, and the command would have ended with status 0 as if done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_with_its_output_closed_runs_to_its_end() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut node = dev::dev_after("", dir.path()).spawn()?;
    let endpoint = banner::serving_endpoint(&mut node, DEADLINE).await?;
    let mut ingest = IngestServiceClient::connect(endpoint.clone()).await?;
    let events: Vec<_> = (0..12).map(|index| dev::event(index, 6, 0)).collect();
    let answer = ingest
        .publish(dev::authorized(v1::PublishRequest {
            events,
            batch_id: String::new(),
        }))
        .await?
        .into_inner();
    assert_eq!(answer.accepted, 12);

    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let replay = tokio::process::Command::new(env!("CARGO_BIN_EXE_touchline"))
        .args(["replay", "--from", "earliest", "--endpoint", &endpoint])
        .stdout(writer)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Not `output()`, which would capture standard output in a pipe of its own.
        .spawn()?
        .wait_with_output();
    let output = tokio::time::timeout(DEADLINE, replay).await??;
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    // Its progress (on standard error) went on to the last partition: the first line to standard
    // output failed before any progress was reported.
    let partitions = touchline::config::Config::default().kafka.partitions;
    assert!(
        stderr.contains(&format!(
            "read 12  appended 0  duplicates 12  dead letters 0  partitions done {partitions}/{partitions}"
        )),
        "{stderr}"
    );
    node.start_kill()?;
    Ok(())
}
