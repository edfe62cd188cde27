//! A node whose disk fills up: `touchline dev` under a file-size limit (`ulimit -f`, with SIGXFSZ
//! ignored, so that a write past it fails with EFBIG as a full disk's fails with ENOSPC), sent
//! events until its store cannot write. It says so in its log, refuses every later write (sled
//! may have applied part of the failed batch in memory only), stops and exits with status 1.
//! Started again without the limit on the same folder, it has every acknowledged event once. A
//! restore on a full disk leaves no store behind.
#![cfg(target_os = "linux")]

#[path = "support/banner.rs"]
mod banner;
#[path = "support/dev.rs"]
mod dev;

use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use touchline_proto::v1;
use touchline_proto::v1::ingest_service_client::IngestServiceClient;

const DEADLINE: Duration = Duration::from_secs(60);
/// The node's file-size limit in the shell's `ulimit -f` blocks (512 bytes in a POSIX `sh`, 1 KiB
/// in bash): 2 to 4 MiB, enough to start, soon used up by events.
const LIMIT_BLOCKS: u64 = 4096;
const CUSTOMERS: usize = 20;
/// Bytes of payload per event, so that the limit is reached in a few batches.
const PAYLOAD: usize = 2048;

/// Starts `touchline dev` on `data_dir`, under the file-size limit when `limited`.
async fn start_dev(data_dir: &std::path::Path, limited: bool) -> anyhow::Result<(Child, String)> {
    let limit = if limited {
        format!("trap '' XFSZ; ulimit -f {LIMIT_BLOCKS} && ")
    } else {
        String::new()
    };
    let mut child = dev::dev_after(&limit, data_dir).spawn()?;
    let endpoint = banner::serving_endpoint(&mut child, DEADLINE).await?;
    Ok((child, endpoint))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_is_full_stops_and_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut child, endpoint) = start_dev(dir.path(), true).await?;
    let mut stderr = BufReader::new(child.stderr.take().context("stderr is piped")?).lines();
    let log = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            lines.push(line);
        }
        lines
    });

    // Batches one after another until one fails: the store could not write it.
    let mut ingest = IngestServiceClient::connect(endpoint.clone()).await?;
    let mut acked = dev::Acked::new();
    let mut next = 0;
    let failed = tokio::time::timeout(DEADLINE * 3, async {
        loop {
            let events: Vec<_> = (next..next + 50)
                .map(|index| dev::event(index, CUSTOMERS, PAYLOAD))
                .collect();
            next += 50;
            let request = dev::authorized(v1::PublishRequest {
                events: events.clone(),
                batch_id: String::new(),
            });
            match ingest.publish(request).await {
                Ok(response) => {
                    dev::add_accepted(&mut acked, &events, response.get_ref());
                }
                Err(status) => return anyhow::Ok(status),
            }
        }
    })
    .await
    .context("the store never filled its limit")??;
    assert!(!acked.is_empty(), "some batches were stored first");
    eprintln!(
        "refused after {} acknowledged events: {failed:?}",
        acked
            .values()
            .map(std::collections::BTreeSet::len)
            .sum::<usize>()
    );

    // It stops by itself, with a failure, and its log says why.
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .context("the node did not stop after its store failed")??;
    assert_eq!(status.code(), Some(1), "{status:?}");
    let lines = tokio::time::timeout(DEADLINE, log)
        .await
        .context("the node's log did not end")??;
    assert!(
        lines
            .iter()
            .any(|line| line.contains("a store write failed")),
        "{lines:#?}"
    );

    // Without the limit, on the same folder: every acknowledged event, once.
    let (mut child, endpoint) = start_dev(dir.path(), false).await?;
    dev::assert_all_there_once(&endpoint, &acked).await?;
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}

/// `touchline restore` on a full disk (a file-size limit of 0: sled cannot write its first file)
/// fails, and leaves nothing a node would start on: before, sled's first files stayed in the
/// folder without the restore's mark, and a node started on them as on an empty store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_on_a_full_disk_leaves_no_store_behind() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The store cannot be made, so the file is not read before the failure.
    let backup = dir.path().join("any.backup");
    std::fs::write(&backup, b"")?;
    let store = dir.path().join("store");
    let output = tokio::time::timeout(
        DEADLINE,
        Command::new("sh")
            .args([
                "-c",
                "trap '' XFSZ; ulimit -f 0 && exec \"$0\" \"$@\"",
                env!("CARGO_BIN_EXE_touchline"),
                "restore",
            ])
            .arg(&backup)
            .arg("--data-dir")
            .arg(&store)
            .env("RUST_LOG", "warn")
            .output(),
    )
    .await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("File too large"), "{stderr}");
    assert!(
        !store.exists(),
        "left behind: {:?}",
        std::fs::read_dir(&store)?.collect::<Vec<_>>()
    );
    Ok(())
}
