//! Ops end to end, on a real broker, a real sled and the real gRPC server: a projection rebuilt
//! while events stream in keeps queries answering, switches atomically and equals a clean rebuild
//! of the same log; admin calls need an admin token; replays and dead letters; live timelines
//! that resume from a cursor; health, reflection and `/metrics`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;
use touchline_proto::v1::{self, JourneyStage};
use touchline_tests::{
    ADMIN_TOKEN, COURIER, DEADLINE, active_checksums, admin_client, authorized, error_reason,
    ingest_client, publish, start_broker, start_node, start_node_with, timeline_client, touchpoint,
    wait_for_health, wait_for_timeline, wait_until,
};

async fn replay_to_end(
    admin: &mut v1::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    from: v1::replay_request::From,
    partitions: Vec<i32>,
) -> anyhow::Result<v1::ReplayProgress> {
    let mut stream = admin
        .replay(authorized(
            v1::ReplayRequest {
                from: Some(from),
                partitions,
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    let mut last = None;
    while let Some(progress) = tokio::time::timeout(DEADLINE, stream.next()).await? {
        last = Some(progress?);
    }
    last.ok_or_else(|| anyhow::anyhow!("no progress"))
}

async fn verify(
    admin: &mut v1::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
) -> anyhow::Result<v1::VerifyProjectionsResponse> {
    Ok(admin
        .verify_projections(authorized(v1::VerifyProjectionsRequest {}, ADMIN_TOKEN))
        .await?
        .into_inner())
}

async fn rebuild(
    admin: &mut v1::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    projection: &str,
) -> anyhow::Result<Vec<v1::RebuildProgress>> {
    let mut stream = admin
        .rebuild_projection(authorized(
            v1::RebuildProjectionRequest {
                projection: projection.to_owned(),
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    let mut seen = Vec::new();
    while let Some(progress) = tokio::time::timeout(DEADLINE, stream.next()).await? {
        seen.push(progress?);
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_during_ingest_keeps_serving_and_equals_a_clean_rebuild() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    // Small rebuild batches: the rebuild takes many steps while events arrive.
    let node = start_node_with(&broker, dir.path(), touchline_tests::partners(), |config| {
        config.projector.rebuild_batch = 20;
    })
    .await?;
    let mut ingest = ingest_client(&node).await?;
    let first: Vec<_> = (0..400)
        .map(|i| {
            touchpoint(
                &format!("seed-{i}"),
                &format!("cust-{}", i % 20),
                "delivery.completed",
                i,
                JourneyStage::Fulfil,
            )
        })
        .collect();
    for chunk in first.chunks(100) {
        publish(&mut ingest, COURIER.1, chunk.to_vec()).await?;
    }
    let store = node.store().expect("the node projects").clone();
    wait_until("the seed events to be projected", || store.log_len() == 400).await?;

    // Ingest goes on during the rebuild, and queries keep answering.
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn({
        let mut ingest = ingest.clone();
        let stop = stop.clone();
        async move {
            let mut sent = 0_i64;
            while !stop.is_cancelled() {
                let events = (0..10)
                    .map(|i| {
                        let n = sent + i;
                        // Some late events: they land before earlier ones.
                        touchpoint(
                            &format!("live-{n}"),
                            &format!("cust-{}", n % 20),
                            "support.ticket.opened",
                            if n % 3 == 0 { -n } else { n },
                            JourneyStage::Support,
                        )
                    })
                    .collect();
                publish(&mut ingest, COURIER.1, events).await?;
                sent += 10;
            }
            anyhow::Ok(sent)
        }
    });
    let mut timeline = timeline_client(&node).await?;
    let reader = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut answered = 0_u64;
            while !stop.is_cancelled() {
                let page = timeline
                    .get_timeline(v1::GetTimelineRequest {
                        customer_id: "cust-3".to_owned(),
                        page_size: 50,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(
                    !page.entries.is_empty(),
                    "a timeline read empty mid-rebuild"
                );
                answered += 1;
            }
            anyhow::Ok(answered)
        }
    });
    let mut admin = admin_client(&node).await?;
    let progress = rebuild(&mut admin, "timeline").await?;
    let last = progress.last().expect("progress was streamed");
    assert_eq!(last.state, v1::RebuildState::Switched as i32, "{last:?}");
    assert_eq!((last.version, last.previous_version), (2, 1));
    assert!(
        progress
            .iter()
            .any(|p| p.state == v1::RebuildState::Running as i32 && p.done < p.total),
        "progress was reported while the rebuild ran"
    );
    let summary_progress = rebuild(&mut admin, "summary").await?;
    assert_eq!(
        summary_progress.last().map(|p| p.state),
        Some(v1::RebuildState::Switched as i32)
    );
    stop.cancel();
    let sent = writer.await??;
    let answered = reader.await??;
    assert!(
        sent > 0 && answered > 0,
        "ingest ({sent}) and queries ({answered}) went on"
    );

    let total = 400 + usize::try_from(sent)?;
    wait_until("every event to be projected", || store.log_len() == total).await?;
    let status = admin
        .get_status(authorized(v1::GetStatusRequest {}, ADMIN_TOKEN))
        .await?
        .into_inner();
    let active: Vec<u32> = status
        .projections
        .iter()
        .map(|p| p.active_version)
        .collect();
    assert_eq!(active, [2, 2]);

    // The version rebuilt under load (then kept up to date incrementally) equals a clean rebuild
    // of the same log.
    let after_load = verify(&mut admin).await?;
    rebuild(&mut admin, "timeline").await?;
    rebuild(&mut admin, "summary").await?;
    // The replaced versions are deleted after the switch is reported.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        let status = admin
            .get_status(authorized(v1::GetStatusRequest {}, ADMIN_TOKEN))
            .await?
            .into_inner();
        let versions: Vec<(String, u32, i32)> = status
            .projections
            .iter()
            .flat_map(|p| {
                p.versions
                    .iter()
                    .map(|v| (p.name.clone(), v.version, v.state))
            })
            .collect();
        if versions
            .iter()
            .all(|(_, _, state)| *state != v1::VersionState::Dropping as i32)
        {
            assert_eq!(
                versions,
                [
                    ("timeline".to_owned(), 3, v1::VersionState::Active as i32),
                    ("summary".to_owned(), 3, v1::VersionState::Active as i32)
                ],
                "the clean rebuild is version 3 of each projection, the only one left"
            );
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "replaced versions still dropping: {versions:?}"
        );
    }
    let clean = verify(&mut admin).await?;
    assert_eq!(after_load.log_events, clean.log_events);
    assert_eq!(active_checksums(&after_load), active_checksums(&clean));
    assert_eq!(
        clean
            .checksums
            .iter()
            .filter(|c| c.name != "log")
            .map(|c| c.version)
            .collect::<Vec<_>>(),
        [3, 3],
        "the clean rebuild is version 3 of each projection, the only one left"
    );
    let timeline_entries = clean
        .checksums
        .iter()
        .find(|c| c.name == "timeline")
        .map(|c| c.entries);
    assert_eq!(timeline_entries, Some(u64::try_from(total)?));
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_an_admin_token_and_bad_requests_change_nothing() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    let mut admin = admin_client(&node).await?;

    let missing = admin
        .get_status(v1::GetStatusRequest {})
        .await
        .expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert_eq!(error_reason(&missing).as_deref(), Some("TOKEN_MISSING"));
    let partner = admin
        .get_status(authorized(v1::GetStatusRequest {}, COURIER.1))
        .await
        .expect_err("a partner token");
    assert_eq!(partner.code(), Code::PermissionDenied);
    assert_eq!(error_reason(&partner).as_deref(), Some("ADMIN_ONLY"));
    let wrong = admin
        .verify_projections(authorized(v1::VerifyProjectionsRequest {}, "not-a-token"))
        .await
        .expect_err("an unknown token");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(error_reason(&wrong).as_deref(), Some("TOKEN_INVALID"));
    for reason in ["TOKEN_MISSING", "ADMIN_ONLY", "TOKEN_INVALID"] {
        assert!(
            touchline_tests::auth_failures("admin", reason) >= 1,
            "admin refusals are counted: {reason}"
        );
    }

    let unknown = admin
        .rebuild_projection(authorized(
            v1::RebuildProjectionRequest {
                projection: "everything".to_owned(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect_err("an unknown projection");
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert_eq!(
        error_reason(&unknown).as_deref(),
        Some("UNKNOWN_PROJECTION")
    );
    let no_rebuild = admin
        .cancel_rebuild(authorized(
            v1::CancelRebuildRequest {
                projection: "timeline".to_owned(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect_err("nothing to cancel");
    assert_eq!(no_rebuild.code(), Code::NotFound);
    let no_start = admin
        .replay(authorized(v1::ReplayRequest::default(), ADMIN_TOKEN))
        .await
        .expect_err("no start");
    assert_eq!(
        error_reason(&no_start).as_deref(),
        Some("INVALID_REPLAY_START")
    );
    let missing_letter = admin
        .requeue_dead_letter(authorized(v1::DeadLetterRequest { id: 42 }, ADMIN_TOKEN))
        .await
        .expect_err("no such dead letter");
    assert_eq!(missing_letter.code(), Code::NotFound);
    assert_eq!(
        error_reason(&missing_letter).as_deref(),
        Some("DEAD_LETTER_NOT_FOUND")
    );
    let status = admin
        .get_status(authorized(v1::GetStatusRequest {}, ADMIN_TOKEN))
        .await?
        .into_inner();
    assert_eq!(status.projector_state, "running");
    assert!(status.kafka_reachable);
    assert_eq!(status.log_events, 0);
    assert!(
        status
            .projections
            .iter()
            .all(|p| p.active_version == 1 && p.versions.len() == 1)
    );
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_restores_nothing_twice_and_dead_letters_can_be_listed_and_discarded()
-> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    let events: Vec<_> = (0..30)
        .map(|i| {
            touchpoint(
                &format!("e{i}"),
                "cust-r",
                "delivery.completed",
                i,
                JourneyStage::Fulfil,
            )
        })
        .collect();
    publish(&mut ingest, COURIER.1, events).await?;
    touchline_tests::produce_raw(
        &broker,
        vec![("cust-r".to_owned(), b"\xff\xfe not protobuf".to_vec())],
    )
    .await?;
    let store = node.store().expect("projects").clone();
    wait_until("events and the dead letter", || {
        store.log_len() == 30 && store.dead_letter_count() == 1
    })
    .await?;

    let mut admin = admin_client(&node).await?;
    let mut stream = admin
        .replay(authorized(
            v1::ReplayRequest {
                from: Some(v1::replay_request::From::Earliest(true)),
                partitions: Vec::new(),
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    let mut last = None;
    while let Some(progress) = tokio::time::timeout(DEADLINE, stream.next()).await? {
        last = Some(progress?);
    }
    let last = last.expect("progress was streamed");
    assert!(last.finished, "{last:?}");
    assert_eq!(last.read, 31);
    assert_eq!((last.appended, last.duplicates), (0, 30));
    assert_eq!(store.log_len(), 30, "a replay appends nothing the log has");
    assert_eq!(store.dead_letter_count(), 1, "a dead letter is kept once");

    // From an offset, on one partition; from a timestamp after every record: nothing to read.
    let partition = last
        .ranges
        .iter()
        .find(|r| r.end_offset > 2)
        .expect("a partition with records");
    // The partition named twice: read once (Kafka refuses an assignment listing it twice).
    let from_offset = replay_to_end(
        &mut admin,
        v1::replay_request::From::Offset(2),
        vec![partition.partition, partition.partition],
    )
    .await?;
    assert!(from_offset.finished);
    // GetStatus reports the last replay.
    let status = admin
        .get_status(authorized(v1::GetStatusRequest {}, ADMIN_TOKEN))
        .await?
        .into_inner();
    assert!(!status.replay_running, "the replay ended");
    assert_eq!(
        status.replay.as_ref(),
        Some(&from_offset),
        "the last replay's progress"
    );
    assert_eq!(
        from_offset
            .ranges
            .iter()
            .map(|r| (r.partition, r.start_offset))
            .collect::<Vec<_>>(),
        [(partition.partition, 2)]
    );
    assert_eq!(
        from_offset.read,
        u64::try_from(partition.end_offset - 2)?,
        "{from_offset:?}"
    );
    let later = prost_types::Timestamp {
        seconds: 4_000_000_000,
        nanos: 0,
    };
    let from_time = replay_to_end(
        &mut admin,
        v1::replay_request::From::Timestamp(later),
        Vec::new(),
    )
    .await?;
    assert!(from_time.finished);
    if broker.embedded().is_some() {
        assert_eq!(from_time.read, 0, "{from_time:?}");
    } else {
        // Tansu 0.6 answers a ListOffsets by timestamp with the oldest offset: the replay reads
        // more than asked, which is safe (duplicates are skipped).
        assert_eq!(from_time.appended, 0, "{from_time:?}");
    }

    let listed = admin
        .list_dead_letters(authorized(
            v1::ListDeadLettersRequest::default(),
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    assert_eq!(listed.total, 1);
    let id = listed.dead_letters[0].id;
    assert!(!listed.dead_letters[0].reason.is_empty());
    let still = admin
        .requeue_dead_letter(authorized(v1::DeadLetterRequest { id }, ADMIN_TOKEN))
        .await
        .expect_err("still undecodable");
    assert_eq!(still.code(), Code::FailedPrecondition);
    assert_eq!(error_reason(&still).as_deref(), Some("STILL_UNDECODABLE"));
    assert_eq!(store.dead_letter_count(), 1);
    admin
        .discard_dead_letter(authorized(v1::DeadLetterRequest { id }, ADMIN_TOKEN))
        .await?;
    assert_eq!(store.dead_letter_count(), 0);
    let error = admin
        .replay(authorized(
            v1::ReplayRequest {
                from: Some(v1::replay_request::From::Offset(0)),
                partitions: vec![99],
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect_err("a partition this node does not own");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(error_reason(&error).as_deref(), Some("UNKNOWN_PARTITION"));
    node.shutdown().await
}

/// One request of 20 events of one customer: one record batch on brokers that batch what they
/// are sent together. On Tansu 0.6 the high watermark is then the batch's start plus one, and a
/// replay from inside the batch read nothing until the node's stored position was taken as the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_inside_the_last_record_batch_reads_to_the_partitions_end()
-> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    let events: Vec<_> = (0..20)
        .map(|i| {
            touchpoint(
                &format!("tail-{i}"),
                "cust-tail",
                "delivery.completed",
                i,
                JourneyStage::Fulfil,
            )
        })
        .collect();
    publish(&mut ingest, COURIER.1, events).await?;
    let store = node.store().expect("projects").clone();
    // The positions are stored in the same atomic write as the events.
    wait_until("the events", || store.log_len() == 20).await?;

    let mut admin = admin_client(&node).await?;
    let replayed =
        replay_to_end(&mut admin, v1::replay_request::From::Offset(17), Vec::new()).await?;
    assert!(replayed.finished, "{replayed:?}");
    let ranges: Vec<_> = replayed
        .ranges
        .iter()
        .filter(|range| range.end_offset > 0)
        .map(|range| (range.start_offset, range.end_offset))
        .collect();
    assert_eq!(ranges, [(17, 20)], "{replayed:?}");
    assert_eq!(
        (replayed.read, replayed.appended, replayed.duplicates),
        (3, 0, 3),
        "the last three records read, each already in the log: {replayed:?}"
    );
    assert_eq!(store.log_len(), 20);
    node.shutdown().await
}

async fn next(
    watch: &mut tonic::Streaming<v1::WatchTimelineResponse>,
) -> anyhow::Result<v1::WatchTimelineResponse> {
    tokio::time::timeout(DEADLINE, watch.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the watch ended"))?
        .map_err(anyhow::Error::from)
}

fn entry_id(message: &v1::WatchTimelineResponse) -> Option<String> {
    match &message.event {
        Some(v1::watch_timeline_response::Event::Entry(entry)) => {
            entry.touchpoint.as_ref().map(|t| t.event_id.clone())
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_gets_the_timeline_then_live_entries_and_resumes_from_its_cursor()
-> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    let mut timeline = timeline_client(&node).await?;
    let event = |id: &str, at: i64| {
        touchpoint(id, "cust-w", "delivery.completed", at, JourneyStage::Fulfil)
    };
    publish(&mut ingest, COURIER.1, vec![event("a", 10), event("b", 20)]).await?;
    wait_for_timeline(&mut timeline, "cust-w", 2).await?;
    // The catch-up holds durable entries; applied ones not yet flushed come live after it.
    let store = node.store().expect("projects").clone();
    wait_until("both events to be durable", || {
        touchline_core::EventStore::durable_sequence(&*store) >= 2
    })
    .await?;

    let mut watch = timeline
        .watch_timeline(v1::WatchTimelineRequest {
            customer_id: "cust-w".to_owned(),
            cursor: String::new(),
        })
        .await?
        .into_inner();
    let catch_up = [
        next(&mut watch).await?,
        next(&mut watch).await?,
        next(&mut watch).await?,
    ];
    assert_eq!(
        catch_up.iter().map(entry_id).collect::<Vec<_>>(),
        [Some("a".to_owned()), Some("b".to_owned()), None]
    );
    assert!(matches!(
        catch_up[2].event,
        Some(v1::watch_timeline_response::Event::CaughtUp(_))
    ));

    // Live: a new entry, then a late one that sorts before everything sent.
    publish(&mut ingest, COURIER.1, vec![event("c", 30)]).await?;
    let live = next(&mut watch).await?;
    assert_eq!(entry_id(&live).as_deref(), Some("c"));
    assert!(!live.late);
    publish(&mut ingest, COURIER.1, vec![event("early", 1)]).await?;
    let late = next(&mut watch).await?;
    assert_eq!(entry_id(&late).as_deref(), Some("early"));
    assert!(late.late, "a late event is marked as an insertion");
    let cursor = late.cursor.clone();
    drop(watch);

    // Missed while disconnected, plus another customer's event that must not show.
    publish(
        &mut ingest,
        COURIER.1,
        vec![
            event("d", 40),
            touchpoint(
                "other",
                "cust-x",
                "delivery.completed",
                5,
                JourneyStage::Fulfil,
            ),
            event("e", 15),
        ],
    )
    .await?;
    wait_for_timeline(&mut timeline, "cust-w", 6).await?;
    // Durable, so that the catch-up has them (applied but unflushed ones would come live).
    wait_until("the missed events to be durable", || {
        touchline_core::EventStore::durable_sequence(&*store) >= 7
    })
    .await?;
    let mut resumed = timeline
        .watch_timeline(v1::WatchTimelineRequest {
            customer_id: "cust-w".to_owned(),
            cursor,
        })
        .await?
        .into_inner();
    let mut ids = Vec::new();
    loop {
        let message = next(&mut resumed).await?;
        match entry_id(&message) {
            Some(id) => ids.push(id),
            None => break,
        }
    }
    assert_eq!(
        ids,
        ["e", "d"],
        "a resumed watch gets exactly what it missed, in timeline order (it came in log order d, e)"
    );

    let bad = timeline
        .watch_timeline(v1::WatchTimelineRequest {
            customer_id: "cust-x".to_owned(),
            cursor: late.cursor,
        })
        .await
        .expect_err("a cursor of another customer");
    assert_eq!(bad.code(), Code::InvalidArgument);
    node.shutdown().await
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut response)).await??;
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_metrics_describe_the_node() -> anyhow::Result<()> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    publish(
        &mut ingest,
        COURIER.1,
        vec![touchpoint(
            "m1",
            "cust-m",
            "delivery.completed",
            1,
            JourneyStage::Fulfil,
        )],
    )
    .await?;
    let rejected = publish(
        &mut ingest,
        COURIER.1,
        vec![touchpoint(
            "",
            "cust-m",
            "delivery.completed",
            1,
            JourneyStage::Fulfil,
        )],
    )
    .await?;
    assert_eq!(rejected.rejected, 1);

    // Health: every service SERVING once the first probe ran.
    for service in [
        "",
        "touchline.v1.IngestService",
        "touchline.v1.TimelineService",
        "touchline.v1.AdminService",
    ] {
        wait_for_health(&node, service, true).await?;
    }

    // Reflection lists every service, as grpcurl would see them.
    let mut reflection = ServerReflectionClient::new(
        tonic::transport::Channel::from_shared(node.endpoint())?
            .connect()
            .await?,
    );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let answer = answers.next().await.expect("an answer")?;
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        anyhow::bail!("not a service list: {answer:?}");
    };
    let services: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "touchline.v1.IngestService",
        "touchline.v1.TimelineService",
        "touchline.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(expected), "{expected} in {services:?}");
    }

    let metrics_addr = node.metrics_addr().expect("metrics are served");
    let mut timeline = timeline_client(&node).await?;
    wait_for_timeline(&mut timeline, "cust-m", 1).await?;
    let metrics = http_get(metrics_addr, "/metrics").await?;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for expected in [
        "touchline_consumer_lag{partition=\"0\"} 0",
        "touchline_projector_applied_events_total",
        "touchline_ingest_events_total{partner=\"swift-courier\",outcome=\"accepted\",reason=\"\"}",
        "touchline_ingest_events_total{partner=\"swift-courier\",outcome=\"rejected\",reason=\"EVENT_ID_MISSING\"}",
        "touchline_ingest_produce_duration_seconds_count",
        "touchline_query_duration_seconds_count{method=\"GetTimeline\"}",
        // Registered (its value is process-wide: other tests read beside this one).
        "touchline_query_reads_waiting ",
        "touchline_kafka_up 1",
        "touchline_log_events 1",
        "touchline_log_durable_events 1",
        "touchline_store_bytes ",
        "touchline_store_flush_seconds_count",
        "touchline_build_info{version=\"",
        "touchline_process_start_time_seconds ",
        "touchline_process_resident_memory_bytes ",
        "touchline_partners_loaded_timestamp_seconds ",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from:\n{metrics}"
        );
    }
    // Resident memory is read at scrape time, and is not zero on Linux.
    assert!(
        !metrics.contains("touchline_process_resident_memory_bytes 0\n"),
        "{metrics}"
    );
    node.shutdown().await
}
