//! A node out of file descriptors: `touchline dev` under a low `ulimit -n`, sent more connections
//! than it has descriptors for. It says so in its log and pauses accepting (an accept that fails
//! for want of a descriptor fails again at once, and retried at once it spun on a core), then
//! serves again once the connections go.
#![cfg(target_os = "linux")]

#[path = "support/banner.rs"]
mod banner;

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;
use touchline_proto::v1::ingest_service_client::IngestServiceClient;

const DEADLINE: Duration = Duration::from_secs(60);
/// The node's descriptor limit: enough to start, soon used up by connections.
const LIMIT: usize = 256;

/// The CPU time a process has used so far, in clock ticks (user and system).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command's name in parentheses: state is field 3, utime 14 and stime 15.
    let after = stat
        .rsplit_once(')')
        .map(|(_, after)| after)
        .context("a stat line")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |index: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(index - 3)
            .context("a stat field")?
            .parse::<u64>()?)
    };
    Ok(field(14)? + field(15)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_out_of_descriptors_pauses_accepting_and_serves_again() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new("sh")
        .args([
            "-c",
            &format!("ulimit -n {LIMIT} && exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_touchline"),
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("the node runs")?;
    let endpoint = banner::serving_endpoint(&mut child, DEADLINE).await?;
    // The warnings about accepting, as they come.
    let (warned, mut warnings) = tokio::sync::mpsc::unbounded_channel();
    let mut stderr = BufReader::new(child.stderr.take().context("stderr is piped")?).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            if line.contains("cannot accept connections") {
                let _ = warned.send(line);
            }
        }
    });

    // More connections than the node has descriptors left: the kernel completes them, the node
    // cannot take them all.
    let address = endpoint
        .strip_prefix("http://")
        .context("a plaintext endpoint")?
        .to_owned();
    let in_use = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let mut connections = Vec::new();
    for _ in 0..(LIMIT.saturating_sub(in_use) + 64) {
        connections.push(tokio::net::TcpStream::connect(&address).await?);
    }
    let first = tokio::time::timeout(DEADLINE, warnings.recv())
        .await
        .context("the node never said it could not accept")?
        .context("the node's log ended")?;
    assert!(first.contains("file descriptors"), "{first}");
    // Over the next two pauses, the node does not spin on a core: measured from a warning just
    // received (those that came while this test was not looking are passed over).
    while warnings.try_recv().is_ok() {}
    tokio::time::timeout(DEADLINE, warnings.recv())
        .await
        .context("the node stopped trying to accept")?
        .context("the node's log ended")?;
    let (ticks_before, since) = (cpu_ticks(pid)?, std::time::Instant::now());
    for _ in 0..2 {
        tokio::time::timeout(DEADLINE, warnings.recv())
            .await
            .context("the node stopped trying to accept")?
            .context("the node's log ended")?;
    }
    let ticks = cpu_ticks(pid)?.saturating_sub(ticks_before);
    // Clock ticks are hundredths of a second on Linux.
    let busy = Duration::from_millis(ticks * 10);
    let elapsed = since.elapsed();
    assert!(
        busy < elapsed / 2,
        "the node used {busy:?} of CPU in {elapsed:?} while it could not accept"
    );

    // Once the connections go, the node serves again.
    drop(connections);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        poll.tick().await;
        if let Ok(mut client) = IngestServiceClient::connect(endpoint.clone()).await {
            let mut request = tonic::Request::new(touchline_proto::v1::PublishRequest::default());
            request
                .metadata_mut()
                .insert("authorization", "Bearer dev-token-swift-courier".parse()?);
            // An empty batch: answered (refused as empty) by a node that serves.
            let answer = client.publish(request).await;
            if let Err(status) = answer
                && status.code() == tonic::Code::InvalidArgument
            {
                break;
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the node never served again"
        );
    }
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}
