//! Backup and restore end to end, on a real broker, a real sled and the real gRPC server: a node's
//! backup (taken while it runs) restored into a new store is the same log and projections, and a
//! node started on it goes on from the backup's positions, so that the events published after the
//! backup are projected once and nothing before it twice; so too for a backup taken while partners
//! publish and the projector writes (its cut is one point of the log). Bad files and existing stores are
//! refused and leave nothing behind; a backup needs an admin token; one backup runs at a time,
//! and one whose caller goes away, or whose admin token is revoked, frees its place.

use tonic::Code;
use touchline_core::EventStore as _;
use touchline_projection::SledStore;
use touchline_projection::sled_store::RESTORE_MARKER;
use touchline_proto::v1;
use touchline_tests::{
    ADMIN_TOKEN, COURIER, admin_client, authorized, error_reason, event_ids, full_timeline,
    ingest_client, publish, start_broker, start_node, timeline_client, wait_until,
};

fn events(from: usize, to: usize) -> Vec<v1::Touchpoint> {
    touchline_tests::series("b", 9, from..to)
}

/// Every customer's timeline, as event ids in timeline order.
async fn timelines(node: &touchline::Node) -> anyhow::Result<Vec<Vec<String>>> {
    let mut client = timeline_client(node).await?;
    let mut timelines = Vec::new();
    for customer in 0..9 {
        timelines.push(event_ids(
            &full_timeline(&mut client, &format!("cust-b{customer}")).await?,
        ));
    }
    Ok(timelines)
}

/// The active checksums (log, timeline, summary) of a node's store.
async fn checksums(node: &touchline::Node) -> anyhow::Result<Vec<(String, u64, String)>> {
    let verified = admin_client(node)
        .await?
        .verify_projections(authorized(v1::VerifyProjectionsRequest {}, ADMIN_TOKEN))
        .await?
        .into_inner();
    Ok(touchline_tests::active_checksums(&verified))
}

#[tokio::test]
async fn a_restored_node_goes_on_from_its_backup() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, &dir.path().join("a")).await?;
    let mut ingest = ingest_client(&node).await?;
    publish(&mut ingest, COURIER.1, events(0, 200)).await?;
    touchline_tests::produce_raw(
        &broker,
        vec![("cust-b1".to_owned(), b"\xff\xfe not protobuf".to_vec())],
    )
    .await?;
    let store = node.store().expect("projects").clone();
    wait_until("the events and the dead letter", || {
        store.log_len() == 200 && store.dead_letter_count() == 1
    })
    .await?;

    let file = dir.path().join("a.backup");
    let backups_done = || {
        touchline_query::metrics::BACKUPS
            .get_or_create(&touchline_query::metrics::BackupLabel { outcome: "done" })
            .get()
    };
    let done_before = backups_done();
    let backup = touchline::backup::backup(node.target(), ADMIN_TOKEN, &file).await?;
    assert_eq!(backup.events, 200);
    // Counted process-wide (the other tests of this binary take backups too).
    assert!(backups_done() > done_before);
    // The node's status tells the last backup (once its task has ended).
    let mut admin = admin_client(&node).await?;
    let deadline = tokio::time::Instant::now() + touchline_tests::DEADLINE;
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(20));
    let last = loop {
        poll.tick().await;
        let status = admin
            .get_status(authorized(v1::GetStatusRequest {}, ADMIN_TOKEN))
            .await?
            .into_inner();
        if let (false, Some(last)) = (status.backup_running, status.last_backup) {
            break last;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the status never told the backup"
        );
    };
    assert_eq!((last.events, last.bytes), (200, backup.bytes));
    assert!(touchline_query::metrics::LAST_BACKUP.get() > 1_700_000_000);
    assert_eq!(touchline::backup::check_file(&file)?, backup);
    assert!(!dir.path().join("a.backup.partial").exists());
    let at_backup = checksums(&node).await?;
    assert_eq!(at_backup[0].0, "log");
    assert_eq!(
        at_backup[0].2, backup.log_sha256,
        "the log as verify sees it"
    );

    // Published after the backup: in Kafka, beyond the backup's positions.
    publish(&mut ingest, COURIER.1, events(200, 260)).await?;
    // Durable, not only applied: timelines show flushed entries.
    wait_until("the later events", || {
        store.log_len() == 260 && store.durable_sequence() >= 260
    })
    .await?;
    let at_end = timelines(&node).await?;
    assert_eq!(at_end.iter().map(Vec::len).sum::<usize>(), 260);
    drop(store);
    node.shutdown().await?;

    let restored_store = dir.path().join("b").join("store");
    let restored = touchline::backup::restore(&file, &restored_store, 64 * 1024 * 1024)?;
    assert_eq!(restored.events, 200);
    assert_eq!(restored.dead_letters, 1);
    assert!(restored.positions >= 1);
    assert!(!restored_store.join(RESTORE_MARKER).exists());
    // The restored store is the store at the backup: log, timeline and summaries.
    let opened = SledStore::open(&restored_store)?;
    let (_, verified) = opened.verify()?;
    let verified: Vec<_> = verified
        .into_iter()
        .map(|v| (v.name.to_owned(), v.checksum.entries, v.checksum.sha256))
        .collect();
    assert_eq!(verified, at_backup);
    drop(opened);

    // Counted process-wide; the other tests of this binary make no duplicates.
    let duplicates = || touchline_projection::metrics::PROJECTOR.duplicates.get();
    let duplicates_before = duplicates();
    let node = start_node(&broker, &dir.path().join("b")).await?;
    let store = node.store().expect("projects").clone();
    // The 60 later events come from Kafka, each once.
    // (Their log sequences may differ from the first node's: the partitions interleave as they
    // come. The timelines are ordered by event time, which the events do not share.)
    wait_until("the later events on the restored node", || {
        store.log_len() == 260 && store.durable_sequence() >= 260
    })
    .await?;
    assert_eq!(store.dead_letter_count(), 1, "the dead letter once");
    assert_eq!(timelines(&node).await?, at_end, "the same timelines");
    // Read from the backup's positions on: the first 200 records were not read again (they
    // would be counted as duplicates).
    assert_eq!(duplicates() - duplicates_before, 0);
    drop(store);
    node.shutdown().await?;
    Ok(())
}

/// A backup's cut while the projector writes is one point: the log through some sequence and the
/// positions right after the records it holds. A node restored from it reads on from exactly
/// there: every event once, none read again, the same timelines as the node that took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_partners_publish_is_one_point_of_the_log() -> anyhow::Result<()> {
    const BATCH: usize = 50;
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, &dir.path().join("a")).await?;
    let store = node.store().expect("projects").clone();
    // The partner publishes until the backup is taken, and five batches more.
    let backed_up = tokio_util::sync::CancellationToken::new();
    let publishing = tokio::spawn({
        let mut ingest = ingest_client(&node).await?;
        let backed_up = backed_up.clone();
        async move {
            let mut batch = 0;
            let mut after = 0;
            while after < 5 {
                let answer = publish(
                    &mut ingest,
                    COURIER.1,
                    events(batch * BATCH, (batch + 1) * BATCH),
                )
                .await?;
                anyhow::ensure!(answer.accepted == 50, "{answer:?}");
                batch += 1;
                if backed_up.is_cancelled() {
                    after += 1;
                }
            }
            anyhow::Ok(batch * BATCH)
        }
    });
    // Taken once the projector is under way, while the partner goes on.
    wait_until("the first events", || store.log_len() >= 5 * BATCH).await?;
    let file = dir.path().join("moving.backup");
    let backup = touchline::backup::backup(node.target(), ADMIN_TOKEN, &file).await?;
    backed_up.cancel();
    let total = publishing.await??;
    wait_until("every event", || {
        store.log_len() == total && store.durable_sequence() >= total as u64
    })
    .await?;
    assert!(
        backup.events >= 5 * BATCH as u64 && backup.events < total as u64,
        "the backup is of the log while events came: {} of {total}",
        backup.events
    );
    let at_end = timelines(&node).await?;
    drop(store);
    node.shutdown().await?;

    let restored_store = dir.path().join("b").join("store");
    let restored = touchline::backup::restore(&file, &restored_store, 64 * 1024 * 1024)?;
    assert_eq!(restored.events, backup.events);
    // Counted process-wide; the other tests of this binary make no duplicates.
    let duplicates = || touchline_projection::metrics::PROJECTOR.duplicates.get();
    let duplicates_before = duplicates();
    let node = start_node(&broker, &dir.path().join("b")).await?;
    let store = node.store().expect("projects").clone();
    wait_until("the events after the cut on the restored node", || {
        store.log_len() == total && store.durable_sequence() >= total as u64
    })
    .await?;
    assert_eq!(
        duplicates() - duplicates_before,
        0,
        "the positions are right after the records the backup's log holds: none read again"
    );
    assert_eq!(timelines(&node).await?, at_end, "the same timelines");
    drop(store);
    node.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn bad_backups_and_existing_stores_are_refused() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, &dir.path().join("a")).await?;
    let mut ingest = ingest_client(&node).await?;
    publish(&mut ingest, COURIER.1, events(0, 40)).await?;
    let store = node.store().expect("projects").clone();
    wait_until("the events", || store.log_len() == 40).await?;
    drop(store);

    // Admins only.
    let mut admin = admin_client(&node).await?;
    let refused = admin
        .backup(v1::BackupRequest {})
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = admin
        .backup(authorized(v1::BackupRequest {}, COURIER.1))
        .await
        .expect_err("a partner's token");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(error_reason(&refused).as_deref(), Some("ADMIN_ONLY"));

    let file = dir.path().join("a.backup");
    touchline::backup::backup(node.target(), ADMIN_TOKEN, &file).await?;
    // Never over an existing file.
    let error = touchline::backup::backup(node.target(), ADMIN_TOKEN, &file)
        .await
        .expect_err("the file exists");
    assert!(error.to_string().contains("exists"), "{error:#}");
    // A partial file left by another backup is named as such; a folder that is missing is not.
    let other = dir.path().join("b.backup");
    std::fs::write(dir.path().join("b.backup.partial"), b"")?;
    let error = touchline::backup::backup(node.target(), ADMIN_TOKEN, &other)
        .await
        .expect_err("its partial file exists");
    assert!(
        error.to_string().contains("a backup in progress"),
        "{error:#}"
    );
    let nowhere = dir.path().join("missing").join("c.backup");
    let error = touchline::backup::backup(node.target(), ADMIN_TOKEN, &nowhere)
        .await
        .expect_err("no such folder");
    assert!(
        !error.to_string().contains("a backup in progress")
            && format!("{error:#}").contains("No such file"),
        "{error:#}"
    );
    node.shutdown().await?;

    // Into the store of a node: refused, and the store is untouched.
    let existing = dir.path().join("a").join("store");
    let error = touchline::backup::restore(&file, &existing, 64 * 1024 * 1024)
        .expect_err("the store exists");
    assert!(error.to_string().contains("holds a store"), "{error:#}");
    let reopened = SledStore::open(&existing)?;
    assert_eq!(reopened.log_len(), 40);
    drop(reopened);

    // A truncated file: refused, and nothing is left where the store would be.
    let bytes = std::fs::read(&file)?;
    let truncated = dir.path().join("truncated.backup");
    std::fs::write(&truncated, &bytes[..bytes.len() - 10])?;
    let target = dir.path().join("c").join("store");
    let error =
        touchline::backup::restore(&truncated, &target, 64 * 1024 * 1024).expect_err("truncated");
    assert!(format!("{error:#}").contains("truncated"), "{error:#}");
    assert!(!target.exists());
    assert!(touchline::backup::check_file(&truncated).is_err());

    // A restore that did not finish (killed): a node refuses the store, and a restore starts
    // over.
    let marked = dir.path().join("d").join("store");
    std::fs::create_dir_all(&marked)?;
    std::fs::write(marked.join(RESTORE_MARKER), b"")?;
    std::fs::write(marked.join("db"), b"half a store")?;
    let refused = SledStore::open(&marked).expect_err("half restored");
    assert!(refused.to_string().contains("did not finish"), "{refused}");
    // While another restore runs into it (holding the mark's lock): refused, and nothing deleted.
    let running = std::fs::File::options()
        .write(true)
        .open(marked.join(RESTORE_MARKER))?;
    running.lock()?;
    let error = touchline::backup::restore(&file, &marked, 64 * 1024 * 1024)
        .expect_err("another restore runs");
    assert!(error.to_string().contains("another restore"), "{error:#}");
    assert_eq!(std::fs::read(marked.join("db"))?, b"half a store");
    drop(running);
    let restored = touchline::backup::restore(&file, &marked, 64 * 1024 * 1024)?;
    assert_eq!(restored.events, 40);
    assert!(!marked.join(RESTORE_MARKER).exists());
    assert_eq!(SledStore::open(&marked)?.log_len(), 40);

    // A volume's mount point: empty but for the file system's own folder.
    let mount = dir.path().join("e");
    std::fs::create_dir_all(mount.join("lost+found"))?;
    touchline::backup::restore(&file, &mount, 64 * 1024 * 1024)?;
    assert!(mount.join("lost+found").is_dir());
    assert_eq!(SledStore::open(&mount)?.log_len(), 40);
    Ok(())
}

/// Publishes 1,000 events of 16 KiB each and waits until they are in the log: about 16 MiB,
/// far more than the pieces a backup makes ahead of a caller that does not read.
async fn publish_a_large_log(node: &touchline::Node) -> anyhow::Result<()> {
    let mut ingest = ingest_client(node).await?;
    for batch in 0..20 {
        let events = events(batch * 50, batch * 50 + 50)
            .into_iter()
            .map(|mut event| {
                event.payload = vec![b'p'; 16 * 1024];
                event
            })
            .collect();
        publish(&mut ingest, COURIER.1, events).await?;
    }
    let store = node.store().expect("projects").clone();
    wait_until("the events", || store.log_len() == 1000).await
}

/// The bytes of a whole backup taken with `token`.
async fn whole_backup(node: &touchline::Node, token: &str) -> anyhow::Result<usize> {
    use futures::StreamExt as _;
    let mut stream = admin_client(node)
        .await?
        .max_decoding_message_size(256 * 1024 * 1024)
        .backup(authorized(v1::BackupRequest {}, token))
        .await?
        .into_inner();
    let mut bytes = 0;
    while let Some(chunk) = stream.next().await {
        bytes += chunk?.data.len();
    }
    Ok(bytes)
}

#[tokio::test]
async fn one_backup_runs_at_a_time_and_a_caller_that_goes_away_frees_it() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    publish_a_large_log(&node).await?;

    let mut admin = admin_client(&node)
        .await?
        .max_decoding_message_size(256 * 1024 * 1024);
    let mut first = admin
        .backup(authorized(v1::BackupRequest {}, ADMIN_TOKEN))
        .await?
        .into_inner();
    // It runs: one piece read, the rest waits for the caller.
    assert!(first.next().await.transpose()?.is_some());
    let refused = admin
        .backup(authorized(v1::BackupRequest {}, ADMIN_TOKEN))
        .await
        .expect_err("a second backup while one runs");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(error_reason(&refused).as_deref(), Some("BACKUP_RUNNING"));

    // The caller goes away: the backup stops, and the next one runs whole.
    drop(first);
    let deadline = tokio::time::Instant::now() + touchline_tests::DEADLINE;
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(50));
    let bytes = loop {
        poll.tick().await;
        match admin
            .backup(authorized(v1::BackupRequest {}, ADMIN_TOKEN))
            .await
        {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut bytes = 0;
                while let Some(chunk) = stream.next().await {
                    bytes += chunk?.data.len();
                }
                break bytes;
            }
            Err(status) if error_reason(&status).as_deref() == Some("BACKUP_RUNNING") => {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "the stopped backup never freed its slot"
                );
            }
            Err(status) => return Err(status.into()),
        }
    };
    // Every payload is in it (1,000 × 16 KiB).
    assert!(bytes > 1000 * 16 * 1024, "{bytes} bytes");
    node.shutdown().await
}

/// A backup whose admin token is revoked while it runs (a configuration reload) stops within
/// about a second: its place is freed for the next backup, the pieces it made ahead are dropped,
/// and its caller gets what HTTP/2 had already taken on its way, then the error a new call with
/// that token gets, instead of the rest of the log.
#[tokio::test]
async fn a_backup_ends_once_its_admin_token_is_revoked() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    const ADMIN_NEW: &str = "admin-token-after-the-rotation-6c1d";
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let running = touchline_tests::config(&broker, dir.path());
    let node = touchline::Node::start(
        running.clone(),
        touchline::BrokerChoice::External,
        touchline_tests::partners(),
    )
    .await?;
    publish_a_large_log(&node).await?;

    let mut backup = admin_client(&node)
        .await?
        .max_decoding_message_size(256 * 1024 * 1024)
        .backup(authorized(v1::BackupRequest {}, ADMIN_TOKEN))
        .await?
        .into_inner();
    let mut bytes = backup
        .next()
        .await
        .transpose()?
        .map_or(0, |chunk| chunk.data.len());
    assert!(bytes > 0, "the backup runs");

    // Revoked while the caller reads nothing (the backup waits for it, pieces made ahead).
    let mut rotated = running.clone();
    rotated.admin.token_sha256 = vec![touchline_ingest::hash_token(ADMIN_NEW)];
    node.access().reload(&rotated, &running)?;
    // The revoked backup frees its place: the new token's backup runs, whole.
    let deadline = tokio::time::Instant::now() + touchline_tests::DEADLINE;
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(50));
    let whole = loop {
        poll.tick().await;
        match whole_backup(&node, ADMIN_NEW).await {
            Ok(whole) => break whole,
            Err(error)
                if error
                    .downcast_ref::<tonic::Status>()
                    .and_then(error_reason)
                    .as_deref()
                    == Some("BACKUP_RUNNING")
                    && tokio::time::Instant::now() < deadline => {}
            Err(error) => return Err(error),
        }
    };
    assert!(whole > 1000 * 16 * 1024, "{whole} bytes");
    // The revoked caller gets what was on its way, then its error.
    let ended = loop {
        match tokio::time::timeout(touchline_tests::DEADLINE, backup.next()).await? {
            Some(Ok(chunk)) => bytes += chunk.data.len(),
            Some(Err(status)) => break status,
            None => anyhow::bail!("the backup of a revoked token ended without an error"),
        }
    };
    assert_eq!(
        (ended.code(), error_reason(&ended).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_INVALID"))
    );
    assert!(
        bytes < whole,
        "{bytes} of {whole} bytes to the revoked caller"
    );
    node.shutdown().await
}
