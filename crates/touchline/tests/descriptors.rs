//! A node out of file descriptors: `touchline dev` under a low `ulimit -n`, sent more connections
//! than it has descriptors for. It says so in its log, with the error, and goes on trying (with
//! a pause: an accept that fails for want of a descriptor fails again at once, and retried at
//! once it spun on a core; the pause is the unit test of `listener::accepting`), then serves
//! again once the connections go.
#![cfg(target_os = "linux")]

#[path = "support/banner.rs"]
mod banner;
#[path = "support/dev.rs"]
mod dev;

use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use touchline_proto::v1::ingest_service_client::IngestServiceClient;

const DEADLINE: Duration = Duration::from_secs(60);
/// The node's descriptor limit: enough to start, soon used up by connections.
const LIMIT: usize = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_out_of_descriptors_says_so_and_serves_again() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut child = dev::dev_after(&format!("ulimit -n {LIMIT} && "), dir.path()).spawn()?;
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
    // The process's own error: out of descriptors (EMFILE), not one connection's.
    assert!(
        first.contains("Too many open files") || first.contains("os error 24"),
        "{first}"
    );
    // How often it tries again (a pause of 1 s at each error) is the unit test of `accepting`,
    // on a paused clock.

    // Once the connections go, the node serves again.
    drop(connections);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        poll.tick().await;
        // Each try within its own bound: a node that never answers fails the test, not hangs it.
        let answered = tokio::time::timeout(Duration::from_secs(5), async {
            let mut client = IngestServiceClient::connect(endpoint.clone()).await.ok()?;
            let request = dev::authorized(touchline_proto::v1::PublishRequest::default());
            // An empty batch: answered (refused as empty) by a node that serves.
            client.publish(request).await.err()
        })
        .await;
        if let Ok(Some(status)) = answered
            && status.code() == tonic::Code::InvalidArgument
        {
            break;
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
