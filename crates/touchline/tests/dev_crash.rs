//! The `touchline dev` process, stopped the hard way and the polite way. Killed with SIGKILL in the
//! middle of a stream of publishes: after a restart on the same data folder, every acknowledged
//! event is in the timeline exactly once (the embedded broker loses everything at the kill; the
//! local event log must not). Sent SIGTERM under load: it drains, flushes, exits 0, and loses
//! nothing acknowledged. Killed in the middle of a projection rebuild: the old version is still
//! active and intact after the restart, and a new rebuild runs cleanly. Sent SIGTERM while still
//! starting (a `touchline serve` waiting for a Kafka that does not answer): it exits 0 at once and
//! says so, instead of dying of the signal.

#[path = "support/banner.rs"]
mod banner;
#[path = "support/dev.rs"]
mod dev;

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use dev::{Acked, assert_all_there_once, authorized};
use touchline_proto::v1;
use touchline_proto::v1::admin_service_client::AdminServiceClient;
use touchline_proto::v1::ingest_service_client::IngestServiceClient;

const DEADLINE: Duration = Duration::from_secs(60);

/// Starts `touchline dev` on a free port and returns it with its endpoint, read from its banner.
async fn start_dev(data_dir: &std::path::Path) -> anyhow::Result<(Child, String)> {
    start_dev_with(data_dir, &[]).await
}

/// Starts `touchline dev` with extra environment variables.
async fn start_dev_with(
    data_dir: &std::path::Path,
    env: &[(&str, &str)],
) -> anyhow::Result<(Child, String)> {
    start_dev_at(data_dir, "127.0.0.1:0", env).await
}

/// Starts `touchline dev` listening on `listen`.
async fn start_dev_at(
    data_dir: &std::path::Path,
    listen: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_touchline"))
        .args([
            "dev",
            "--listen",
            listen,
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let endpoint = banner::serving_endpoint(&mut child, DEADLINE).await?;
    Ok((child, endpoint))
}

fn event(index: usize) -> v1::Touchpoint {
    dev::event(index, 5, 0)
}

/// Four publishers send batches one after another until a call fails; `stop` is called once 100
/// events are acknowledged (with other batches in flight). Returns what was acknowledged.
async fn publish_until_stopped(
    endpoint: &str,
    stop: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Acked> {
    let ingest = IngestServiceClient::connect(endpoint.to_owned()).await?;
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
    let mut acked = Acked::new();
    let mut acked_count = 0;
    let mut stop = Some(stop);
    while let Some((events, response)) = answers.recv().await {
        let Ok(response) = response else { continue };
        acked_count += dev::add_accepted(&mut acked, &events, response.get_ref());
        if acked_count >= 100
            && let Some(stop) = stop.take()
        {
            stop()?;
        }
    }
    anyhow::ensure!(stop.is_none(), "the process was stopped mid-stream");
    Ok(acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_dev_loses_no_acknowledged_event() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut child, endpoint) = start_dev(dir.path()).await?;
    let acked = publish_until_stopped(&endpoint, || Ok(child.start_kill()?)).await?;
    child.wait().await?;

    let (mut child, endpoint) = start_dev(dir.path()).await?;
    assert_all_there_once(&endpoint, &acked).await?;
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}

/// `touchline watch` outlives a crash of its node: killed and started again on the same address
/// (longer than a second, and the connection reset, which tonic reports as `UNKNOWN`), the watch
/// resumes from its last cursor and prints what comes next, and nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_after_its_node_crashed_and_came_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut node, endpoint) = start_dev(dir.path()).await?;
    let publish = |endpoint: String, indexes: Vec<usize>| async move {
        let mut ingest = IngestServiceClient::connect(endpoint).await?;
        let response = ingest
            .publish(authorized(v1::PublishRequest {
                events: indexes
                    .into_iter()
                    .map(|index| {
                        // The watch prints attributes, not event ids.
                        let mut touchpoint = event(index);
                        touchpoint
                            .attributes
                            .insert("n".to_owned(), format!("evt-{index}"));
                        touchpoint
                    })
                    .collect(),
                batch_id: String::new(),
            }))
            .await?
            .into_inner();
        anyhow::ensure!(response.rejected == 0, "{response:?}");
        anyhow::Ok(())
    };
    // Events 0 and 5 are customer cust-0's.
    publish(endpoint.clone(), vec![0, 5]).await?;
    let mut watch = Command::new(env!("CARGO_BIN_EXE_touchline"))
        .args(["watch", "cust-0", "--endpoint", &endpoint])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(watch.stdout.take().context("stdout is piped")?).lines();
    let mut printed = Vec::new();
    let mut read_until = async |wanted: &str, printed: &mut Vec<String>| {
        tokio::time::timeout(DEADLINE, async {
            while let Some(line) = lines.next_line().await? {
                let found = line.contains(wanted);
                printed.push(line);
                if found {
                    return Ok(());
                }
            }
            anyhow::bail!("the watch ended: {printed:?}")
        })
        .await
        .with_context(|| format!("no {wanted:?} in time"))?
    };
    read_until("-- caught up", &mut printed).await?;

    node.start_kill()?;
    node.wait().await?;
    let listen = endpoint.trim_start_matches("http://").to_owned();
    let (mut node, endpoint) = start_dev_at(dir.path(), &listen, &[]).await?;
    publish(endpoint, vec![10]).await?;
    read_until("n=evt-10", &mut printed).await?;
    for id in ["n=evt-0", "n=evt-5", "n=evt-10"] {
        assert_eq!(
            printed.iter().filter(|line| line.contains(id)).count(),
            1,
            "{id} printed once: {printed:?}"
        );
    }

    watch.start_kill()?;
    node.start_kill()?;
    node.wait().await?;
    Ok(())
}

/// Sends a signal (through the shell's own `kill`: the crate forbids unsafe code, and slim images
/// lack kill(1)).
fn signal(child: &Child, name: &str) -> anyhow::Result<()> {
    let pid = child.id().context("the process is running")?;
    let status = std::process::Command::new("sh")
        .args(["-c", "kill -\"$1\" \"$2\"", "sh", name, &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

fn terminate(child: &Child) -> anyhow::Result<()> {
    signal(child, "TERM")
}

/// Also: a SIGHUP (no partners file to reload in dev) does not end the process; it goes on
/// serving and exits 0 on the SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_flushes_and_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut child, endpoint) = start_dev(dir.path()).await?;
    signal(&child, "HUP")?;
    let acked = publish_until_stopped(&endpoint, || terminate(&child)).await?;
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .context("touchline dev did not stop after SIGTERM")??;
    assert!(status.success(), "a graceful shutdown exits 0: {status:?}");

    let (mut child, endpoint) = start_dev(dir.path()).await?;
    assert_all_there_once(&endpoint, &acked).await?;
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}

fn admin<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        "Bearer dev-admin-token".parse().expect("valid header"),
    );
    request
}

/// Starts a rebuild of the timeline projection; returns its progress stream.
async fn rebuild_timeline(endpoint: &str) -> anyhow::Result<tonic::Streaming<v1::RebuildProgress>> {
    Ok(AdminServiceClient::connect(endpoint.to_owned())
        .await?
        .rebuild_projection(admin(v1::RebuildProjectionRequest {
            projection: "timeline".to_owned(),
        }))
        .await?
        .into_inner())
}

async fn active_checksums(endpoint: &str) -> anyhow::Result<Vec<(String, u32, u64, String)>> {
    let verified = AdminServiceClient::connect(endpoint.to_owned())
        .await?
        .verify_projections(admin(v1::VerifyProjectionsRequest {}))
        .await?
        .into_inner();
    // A version replaced by a switch may still be being deleted (state dropping).
    Ok(verified
        .checksums
        .into_iter()
        .filter(|c| c.state == v1::VersionState::Active as i32)
        .map(|c| (c.name, c.version, c.entries, c.sha256))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_rebuild_leaves_the_old_version_active_and_intact() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // One log event per rebuild step: the rebuild is still running when the kill lands.
    let slow_rebuild = [("TOUCHLINE_PROJECTOR__REBUILD_BATCH", "1")];
    let (mut child, endpoint) = start_dev_with(dir.path(), &slow_rebuild).await?;
    let mut ingest = IngestServiceClient::connect(endpoint.clone()).await?;
    for batch in 0..4 {
        let events: Vec<_> = (batch * 500..(batch + 1) * 500).map(event).collect();
        ingest
            .publish(authorized(v1::PublishRequest {
                events,
                batch_id: String::new(),
            }))
            .await?;
    }
    let before = active_checksums(&endpoint).await?;
    assert_eq!(before[0].2, 2000, "every event is in the log: {before:?}");

    let mut progress = rebuild_timeline(&endpoint).await?;
    let first = tokio::time::timeout(DEADLINE, progress.message())
        .await??
        .context("progress")?;
    assert_eq!(first.state, v1::RebuildState::Running as i32);
    assert!(first.done < first.total, "{first:?}");
    child.start_kill()?;
    child.wait().await?;

    let (mut child, endpoint) = start_dev_with(dir.path(), &slow_rebuild).await?;
    assert_eq!(
        active_checksums(&endpoint).await?,
        before,
        "the old version is active and intact"
    );
    // The half-built version is deleted in the background after the start.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        let status = AdminServiceClient::connect(endpoint.clone())
            .await?
            .get_status(admin(v1::GetStatusRequest {}))
            .await?
            .into_inner();
        let dropping: Vec<_> = status
            .projections
            .iter()
            .flat_map(|p| {
                p.versions
                    .iter()
                    .map(|v| (p.name.clone(), v.version, v.state))
            })
            .filter(|(_, _, state)| *state == v1::VersionState::Dropping as i32)
            .collect();
        if dropping.is_empty() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the half-built version is still being dropped: {dropping:?}"
        );
    }
    let mut progress = rebuild_timeline(&endpoint).await?;
    let mut last = None;
    while let Some(message) = tokio::time::timeout(DEADLINE, progress.message()).await?? {
        last = Some(message);
    }
    let last = last.context("progress")?;
    assert_eq!(last.state, v1::RebuildState::Switched as i32, "{last:?}");
    let after: Vec<_> = active_checksums(&endpoint)
        .await?
        .into_iter()
        .map(|(name, _, entries, sha)| (name, entries, sha))
        .collect();
    let expected: Vec<_> = before
        .into_iter()
        .map(|(name, _, entries, sha)| (name, entries, sha))
        .collect();
    assert_eq!(after, expected, "the new rebuild equals the old version");
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}

/// A SIGTERM while the node is still starting, here while it waits (up to 30 s) for the metadata
/// of a Kafka that takes connections but does not answer, stops it at once with status 0 and a log line, instead of
/// ending the process by the signal's default action or waiting out the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_the_start_exits_cleanly_at_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A Kafka that does not answer: connections are taken (the kernel's backlog), requests never
    // answered. Held for the whole test, so that no other test's broker can take the port.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let closed = silent.local_addr()?;
    let mut child = dev::serve(dir.path(), &closed.to_string())
        .env("TOUCHLINE_INGEST__ENABLED", "false")
        .spawn()?;
    let stderr = child.stderr.take().context("stderr is piped")?;
    let mut lines = BufReader::new(stderr).lines();
    tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("\"starting\"") {
                return Ok(());
            }
        }
        anyhow::bail!("touchline serve exited before starting")
    })
    .await
    .context("touchline serve did not log its start")??;
    terminate(&child)?;
    // Well under the 30 s the metadata request may take: the stop does not wait for it.
    let (status, rest) = tokio::time::timeout(Duration::from_secs(15), async {
        let mut rest = Vec::new();
        while let Some(line) = lines.next_line().await? {
            rest.push(line);
        }
        anyhow::Ok((child.wait().await?, rest))
    })
    .await
    .context("touchline serve did not stop at once after SIGTERM during its start")??;
    assert!(
        status.success(),
        "a SIGTERM during the start exits 0: {status:?}, {rest:#?}"
    );
    assert!(
        rest.iter()
            .any(|line| line.contains("stopped during the start")),
        "{rest:#?}"
    );
    drop(silent);
    Ok(())
}
