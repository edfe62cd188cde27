//! Readiness after a start: a replica started from an empty store reads the whole log again, and
//! its `TimelineService` health is `NOT_SERVING` until its projector has caught up with the log as
//! it was at the start, so that a load balancer never sends it queries it would answer with a
//! partial timeline. Its `AdminService` serves meanwhile (ops watch the catch-up).

use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use touchline_proto::v1::JourneyStage;
use touchline_tests::{
    ADMIN_TOKEN, COURIER, DEADLINE, admin_client, authorized, full_timeline, ingest_client,
    partners, publish, start_mock_broker, start_node_with, timeline_client, touchpoint,
    wait_for_timeline,
};

const EVENTS: usize = 2_000;
const BATCH: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serves_queries_only_once_it_has_caught_up_with_the_log() -> anyhow::Result<()> {
    // The mock cluster, to slow the replica's reading down (round-trip delay).
    let broker = start_mock_broker();
    let first_dir = tempfile::tempdir()?;
    let first = start_node_with(&broker, first_dir.path(), partners(), |_| {}).await?;
    let mut ingest = ingest_client(&first).await?;
    // Small requests, so that the log is many small record batches: a fetch (of at most 16 KiB
    // below, or one batch) then carries only a few of them.
    for chunk in 0..EVENTS / BATCH {
        let events = (0..BATCH)
            .map(|i| {
                let n = chunk * BATCH + i;
                touchpoint(
                    &format!("e-{n}"),
                    "catching-up",
                    "parcel.scanned",
                    i64::try_from(n).unwrap_or_default(),
                    JourneyStage::Fulfil,
                )
            })
            .collect();
        assert_eq!(
            publish(&mut ingest, COURIER.1, events).await?.accepted,
            u32::try_from(BATCH)?
        );
    }
    let mut timeline = timeline_client(&first).await?;
    wait_for_timeline(&mut timeline, "catching-up", EVENTS).await?;
    first.shutdown().await?;

    // Every request to the broker now takes 100 ms, and the replica fetches 16 KiB at a time:
    // reading the 2,000 records (40 batches, one partition) again takes about a fetch per batch,
    // seconds, where the node's first health probe comes within a second of its start.
    broker
        .mock()
        .set_round_trip_time(Duration::from_millis(100))?;
    let replica_dir = tempfile::tempdir()?;
    let replica = start_node_with(&broker, replica_dir.path(), partners(), |config| {
        config
            .kafka
            .consumer_properties
            .insert("max.partition.fetch.bytes".to_owned(), "16384".to_owned());
    })
    .await?;
    let mut health = HealthClient::new(replica.target().connect().await?);
    let mut timeline = timeline_client(&replica).await?;
    let check = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };

    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    let mut seen_not_serving = false;
    loop {
        poll.tick().await;
        // NOT_FOUND until the first probe: not serving either.
        let serving = health
            .check(check("touchline.v1.TimelineService"))
            .await
            .is_ok_and(|answer| answer.get_ref().status == ServingStatus::Serving as i32);
        if serving {
            // Ready: the whole log as of the start is there.
            let entries = full_timeline(&mut timeline, "catching-up").await?;
            assert_eq!(entries.len(), EVENTS, "SERVING with a partial timeline");
            break;
        }
        if !seen_not_serving {
            let answer = health.check(check("touchline.v1.TimelineService")).await;
            seen_not_serving = answer
                .is_ok_and(|answer| answer.get_ref().status == ServingStatus::NotServing as i32);
            if seen_not_serving {
                // Meanwhile ops can watch the catch-up.
                let admin = health.check(check("touchline.v1.AdminService")).await?;
                assert_eq!(admin.get_ref().status, ServingStatus::Serving as i32);
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the replica never became ready"
        );
    }
    assert!(
        seen_not_serving,
        "the replica was never seen NOT_SERVING while catching up"
    );
    // The admin status says so too (set before health turns SERVING).
    let mut admin = admin_client(&replica).await?;
    let status = admin
        .get_status(authorized(
            touchline_proto::v1::GetStatusRequest {},
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    assert!(status.caught_up, "{status:?}");
    replica.shutdown().await
}
