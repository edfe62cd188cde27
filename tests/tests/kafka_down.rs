//! Kafka down: ingest answers UNAVAILABLE (not DEADLINE_EXCEEDED: before the call's deadline)
//! and acknowledges nothing, and it recovers by itself when the broker returns, with every
//! acknowledged event present exactly once; a producer that hits a fatal error is replaced.
//! Needs the mock cluster's fault injection (`broker_down`/`broker_up`, injected produce errors):
//! always on the mock cluster (`start_mock_broker`), also when the suite runs against Tansu.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::types::RDKafkaRespErr;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;
use touchline_proto::v1::ingest_service_client::IngestServiceClient;
use touchline_proto::v1::{self, JourneyStage};
use touchline_tests::{
    COURIER, authorized, error_reason, event_ids, ingest_client, publish, start_mock_broker,
    start_node_with, timeline_client, touchpoint, wait_for_timeline,
};

fn event(id: &str, second: i64) -> v1::Touchpoint {
    touchpoint(id, "hana", "parcel.scanned", second, JourneyStage::Fulfil)
}

/// Publishes one event as the courier: how many were accepted, or the refusal's message.
async fn accepted(
    ingest: &mut IngestServiceClient<Channel>,
    id: &str,
    second: i64,
) -> Result<u32, String> {
    publish(ingest, COURIER.1, vec![event(id, second)])
        .await
        .map(|response| response.accepted)
        .map_err(|status| status.message().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_down_publishes_fail_fast_and_recover_afterwards() -> anyhow::Result<()> {
    let broker = start_mock_broker();
    let mock = broker.mock();
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), touchline_tests::partners(), |config| {
        config.ingest.max_in_flight_batches = 4;
    })
    .await?;
    let mut ingest = ingest_client(&node).await?;
    let mut acked = BTreeSet::new();
    assert_eq!(
        publish(&mut ingest, COURIER.1, vec![event("before", 0)])
            .await?
            .accepted,
        1
    );
    acked.insert("before".to_owned());

    mock.broker_down()?;
    let mut failures = 0;
    for attempt in 0..3 {
        let mut request = authorized(
            v1::PublishRequest {
                events: vec![event(&format!("down-{attempt}"), 1)],
                batch_id: String::new(),
            },
            COURIER.1,
        );
        request.set_timeout(Duration::from_secs(2));
        match ingest.publish(request).await {
            Ok(response) => {
                // Kafka confirmed it before the broker went away: it must be in the timeline.
                acked.extend(
                    response
                        .into_inner()
                        .results
                        .into_iter()
                        .map(|result| result.event_id),
                );
            }
            Err(status) => {
                failures += 1;
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert_eq!(error_reason(&status).as_deref(), Some("LOG_UNAVAILABLE"));
                assert!(
                    status.get_details_retry_info().is_some(),
                    "retry information"
                );
            }
        }
    }
    assert!(failures >= 2, "publishes fail while the broker is down");
    touchline_tests::wait_for_health(&node, "touchline.v1.IngestService", false).await?;
    touchline_tests::wait_for_health(&node, "", false).await?;

    mock.broker_up()?;
    // The partner resends until acknowledged; ingest recovers without a restart.
    let deadline = tokio::time::Instant::now() + touchline_tests::DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let mut recovered = false;
    while !recovered && tokio::time::Instant::now() < deadline {
        poll.tick().await;
        let mut request = authorized(
            v1::PublishRequest {
                events: (0..3)
                    .map(|i| event(&format!("down-{i}"), 1))
                    .chain([event("after", 2)])
                    .collect(),
                batch_id: String::new(),
            },
            COURIER.1,
        );
        request.set_timeout(Duration::from_secs(2));
        if let Ok(response) = ingest.publish(request).await {
            acked.extend(
                response
                    .into_inner()
                    .results
                    .into_iter()
                    .map(|result| result.event_id),
            );
            recovered = true;
        }
    }
    assert!(recovered, "ingest recovered after the broker returned");
    touchline_tests::wait_for_health(&node, "touchline.v1.IngestService", true).await?;
    touchline_tests::wait_for_health(&node, "", true).await?;

    let mut timeline = timeline_client(&node).await?;
    let entries = wait_for_timeline(&mut timeline, "hana", acked.len()).await?;
    let ids = event_ids(&entries);
    assert_eq!(ids.len(), acked.len(), "nothing twice");
    assert_eq!(
        ids.into_iter().collect::<BTreeSet<_>>(),
        acked,
        "every acknowledged event, exactly once"
    );
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_produce_errors_are_retried_or_answered_unavailable_never_acknowledged()
-> anyhow::Result<()> {
    let broker = start_mock_broker();
    let mock = broker.mock();
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), touchline_tests::partners(), |_| {}).await?;
    let mut ingest = ingest_client(&node).await?;

    // Retriable errors: librdkafka retries and the batch is acknowledged once Kafka took it.
    mock.fail_next_produces(&[
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
    ])?;
    assert_eq!(
        accepted(&mut ingest, "retried", 0).await,
        Ok(1),
        "the retried batch"
    );

    // A permanent error: nothing is acknowledged.
    mock.fail_next_produces(&[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE])?;
    let refused = publish(&mut ingest, COURIER.1, vec![event("refused", 1)])
        .await
        .expect_err("not acknowledged");
    assert_eq!(refused.code(), Code::Unavailable);

    // The next call works, and only acknowledged events are in the timeline, once.
    assert_eq!(
        accepted(&mut ingest, "after", 2).await,
        Ok(1),
        "the call after"
    );
    let mut timeline = timeline_client(&node).await?;
    let entries = wait_for_timeline(&mut timeline, "hana", 2).await?;
    assert_eq!(event_ids(&entries), ["retried", "after"]);
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_starts_a_new_producer_session_and_loses_nothing()
-> anyhow::Result<()> {
    let broker = start_mock_broker();
    let mock = broker.mock();
    let dir = tempfile::tempdir()?;
    // With the gap-less guarantee (a librdkafka property passed through), a permanent produce
    // error is fatal to the idempotent producer: it refuses every later message.
    let node = start_node_with(&broker, dir.path(), touchline_tests::partners(), |config| {
        config
            .kafka
            .producer_properties
            .insert("enable.gapless.guarantee".to_owned(), "true".to_owned());
    })
    .await?;
    let mut ingest = ingest_client(&node).await?;
    let before = publish(&mut ingest, COURIER.1, vec![event("before", 0)]).await;
    assert_eq!(before.map(|response| response.accepted).ok(), Some(1));

    mock.fail_next_produces(&[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE])?;
    let refused = publish(&mut ingest, COURIER.1, vec![event("refused", 1)])
        .await
        .expect_err("not acknowledged");
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(error_reason(&refused).as_deref(), Some("LOG_UNAVAILABLE"));

    // The producer that hit the fatal error was replaced: the next batches are acknowledged,
    // and resending the refused one is safe.
    for (id, second) in [("after", 2), ("refused", 1)] {
        assert_eq!(
            accepted(&mut ingest, id, second).await,
            Ok(1),
            "{id} on the new producer session"
        );
    }
    let mut timeline = timeline_client(&node).await?;
    let entries = wait_for_timeline(&mut timeline, "hana", 3).await?;
    assert_eq!(event_ids(&entries), ["before", "refused", "after"]);
    node.shutdown().await
}
