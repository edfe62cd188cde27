//! Bad input gets its own documented reason and writes nothing: each rejection reason through the
//! real server, batch-level errors, and missing or wrong credentials.

use tonic::Code;
use tonic_types::StatusExt as _;
use touchline_proto::v1::{self, JourneyStage, RejectReason};
use touchline_tests::{
    COURIER, authorized, event_ids, ingest_client, publish, records_in_topic, start_broker,
    start_node, timeline_client, touchpoint, wait_for_timeline,
};

fn valid(event_id: &str) -> v1::Touchpoint {
    touchpoint(
        event_id,
        "dave",
        "delivery.completed",
        0,
        JourneyStage::Fulfil,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invalid_event_gets_its_reason_and_nothing_is_written() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    let far_future = prost_types::Timestamp {
        seconds: 4_102_444_800 + 86_400,
        nanos: 0,
    };
    let in_an_hour = prost_types::Timestamp {
        seconds: i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs(),
        )? + 3600,
        nanos: 0,
    };
    let cases: Vec<(v1::Touchpoint, RejectReason, &str)> = vec![
        (
            v1::Touchpoint {
                event_id: String::new(),
                ..valid("x")
            },
            RejectReason::ReasonEventIdMissing,
            "event_id",
        ),
        (
            v1::Touchpoint {
                event_id: "e".repeat(129),
                ..valid("x")
            },
            RejectReason::ReasonEventIdTooLong,
            "event_id",
        ),
        (
            v1::Touchpoint {
                event_id: "tab\there".into(),
                ..valid("x")
            },
            RejectReason::ReasonEventIdInvalid,
            "event_id",
        ),
        (
            v1::Touchpoint {
                customer_id: String::new(),
                ..valid("e1")
            },
            RejectReason::ReasonCustomerIdMissing,
            "customer_id",
        ),
        (
            v1::Touchpoint {
                customer_id: "c".repeat(100_000),
                ..valid("e2")
            },
            RejectReason::ReasonCustomerIdTooLong,
            "customer_id",
        ),
        (
            v1::Touchpoint {
                r#type: String::new(),
                ..valid("e3")
            },
            RejectReason::ReasonTypeMissing,
            "type",
        ),
        (
            v1::Touchpoint {
                r#type: "t".repeat(65),
                ..valid("e4")
            },
            RejectReason::ReasonTypeTooLong,
            "type",
        ),
        (
            v1::Touchpoint {
                occurred_at: None,
                ..valid("e5")
            },
            RejectReason::ReasonOccurredAtMissing,
            "occurred_at",
        ),
        (
            v1::Touchpoint {
                occurred_at: Some(prost_types::Timestamp {
                    seconds: -86_400,
                    nanos: 0,
                }),
                ..valid("e6")
            },
            RejectReason::ReasonOccurredAtTooOld,
            "occurred_at",
        ),
        (
            v1::Touchpoint {
                occurred_at: Some(in_an_hour),
                ..valid("e7")
            },
            RejectReason::ReasonOccurredAtInFuture,
            "occurred_at",
        ),
        (
            v1::Touchpoint {
                occurred_at: Some(far_future),
                ..valid("e8")
            },
            RejectReason::ReasonOccurredAtInFuture,
            "occurred_at",
        ),
        (
            v1::Touchpoint {
                stage: 0,
                ..valid("e9")
            },
            RejectReason::ReasonStageMissing,
            "stage",
        ),
        (
            v1::Touchpoint {
                stage: 42,
                ..valid("e10")
            },
            RejectReason::ReasonStageUnknown,
            "stage",
        ),
        (
            v1::Touchpoint {
                channel: 42,
                ..valid("e11")
            },
            RejectReason::ReasonChannelUnknown,
            "channel",
        ),
        (
            v1::Touchpoint {
                outcome: Some(v1::Outcome {
                    sentiment: 9,
                    score: None,
                }),
                ..valid("e12")
            },
            RejectReason::ReasonSentimentUnknown,
            "outcome.sentiment",
        ),
        (
            v1::Touchpoint {
                outcome: Some(v1::Outcome {
                    sentiment: 1,
                    score: Some(-1.0),
                }),
                ..valid("e13")
            },
            RejectReason::ReasonScoreOutOfRange,
            "outcome.score",
        ),
        (
            v1::Touchpoint {
                attributes: (0..33).map(|i| (format!("k{i}"), "v".to_owned())).collect(),
                ..valid("e14")
            },
            RejectReason::ReasonTooManyAttributes,
            "attributes",
        ),
        (
            v1::Touchpoint {
                attributes: [("bad key".to_owned(), "v".to_owned())].into(),
                ..valid("e15")
            },
            RejectReason::ReasonAttributeKeyInvalid,
            "attributes[\"bad key\"]",
        ),
        (
            v1::Touchpoint {
                attributes: [("k".to_owned(), "v".repeat(2000))].into(),
                ..valid("e16")
            },
            RejectReason::ReasonAttributeValueInvalid,
            "attributes.k",
        ),
        (
            v1::Touchpoint {
                payload: vec![0; 17 * 1024],
                ..valid("e17")
            },
            RejectReason::ReasonPayloadTooLarge,
            "payload",
        ),
    ];
    let (events, expected): (Vec<_>, Vec<_>) = cases
        .into_iter()
        .map(|(event, reason, field)| (event, (reason, field)))
        .unzip();
    let response = publish(&mut ingest, COURIER.1, events).await?;
    assert_eq!(
        (response.accepted, response.rejected),
        (0, u32::try_from(expected.len())?)
    );
    assert_eq!(response.results.len(), expected.len(), "a result per event");
    for (result, (reason, field)) in response.results.iter().zip(&expected) {
        let Some(v1::event_result::Result::Rejected(rejected)) = &result.result else {
            panic!("event {} was not rejected", result.index);
        };
        assert_eq!(
            (
                RejectReason::try_from(rejected.reason)?,
                rejected.field.as_str()
            ),
            (*reason, *field),
            "event {}",
            result.index
        );
        assert!(!rejected.message.is_empty());
    }
    // A duplicate within one batch: the first is accepted, the copy rejected.
    let response = publish(&mut ingest, COURIER.1, vec![valid("ok-1"), valid("ok-1")]).await?;
    assert!(matches!(
        response.results[0].result,
        Some(v1::event_result::Result::Accepted(_))
    ));
    assert!(
        matches!(&response.results[1].result, Some(v1::event_result::Result::Rejected(r)) if r.reason == RejectReason::ReasonDuplicateInBatch as i32)
    );

    // Only the one valid event was written, once.
    let mut timeline = timeline_client(&node).await?;
    let entries = wait_for_timeline(&mut timeline, "dave", 1).await?;
    assert_eq!(event_ids(&entries), ["ok-1"]);
    assert_eq!(node.store().map(|store| store.log_len()), Some(1));
    assert_eq!(
        records_in_topic(&broker).await?,
        1,
        "only the valid event reached Kafka"
    );
    node.shutdown().await
}

fn reason(status: &tonic::Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_errors_and_credentials_are_refused_with_their_codes() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    let batch = || v1::PublishRequest {
        events: vec![valid("e1")],
        batch_id: String::new(),
    };

    let no_token = ingest
        .publish(tonic::Request::new(batch()))
        .await
        .expect_err("refused");
    assert_eq!(
        (no_token.code(), reason(&no_token).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_MISSING"))
    );
    let mut basic = tonic::Request::new(batch());
    basic
        .metadata_mut()
        .insert("authorization", "Basic Y291cmllcjpwdw==".parse()?);
    let basic = ingest.publish(basic).await.expect_err("refused");
    assert_eq!(
        (basic.code(), reason(&basic).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_MISSING"))
    );
    let wrong = ingest
        .publish(authorized(batch(), "not-a-real-token"))
        .await
        .expect_err("refused");
    assert_eq!(
        (wrong.code(), reason(&wrong).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_INVALID"))
    );
    assert!(
        !wrong.message().contains("not-a-real-token"),
        "tokens never appear in errors"
    );
    let stream = ingest
        .publish_stream(authorized(
            futures::stream::iter(vec![batch()]),
            "not-a-real-token",
        ))
        .await
        .expect_err("refused");
    assert_eq!(stream.code(), Code::Unauthenticated);

    let empty = publish(&mut ingest, COURIER.1, Vec::new())
        .await
        .expect_err("refused");
    assert_eq!(
        (empty.code(), reason(&empty).as_deref()),
        (Code::InvalidArgument, Some("BATCH_EMPTY"))
    );
    let too_many = (0..1001).map(|i| valid(&format!("b{i}"))).collect();
    let too_many = publish(&mut ingest, COURIER.1, too_many)
        .await
        .expect_err("refused");
    assert_eq!(
        (too_many.code(), reason(&too_many).as_deref()),
        (Code::InvalidArgument, Some("BATCH_TOO_LARGE"))
    );
    assert_eq!(
        too_many
            .get_details_bad_request()
            .map(|bad| bad.field_violations[0].field.clone())
            .as_deref(),
        Some("events")
    );
    // The batch_id is echoed in the answer: a long one is refused, on a stream too (where an
    // unread answer waits outside the stream's window).
    let long_id = v1::PublishRequest {
        events: vec![valid("long-id")],
        batch_id: "b".repeat(129),
    };
    let long = ingest
        .publish(authorized(long_id.clone(), COURIER.1))
        .await
        .expect_err("refused");
    assert_eq!(
        (long.code(), reason(&long).as_deref()),
        (Code::InvalidArgument, Some("BATCH_ID_TOO_LONG"))
    );
    assert_eq!(
        long.get_details_bad_request()
            .map(|bad| bad.field_violations[0].field.clone())
            .as_deref(),
        Some("batch_id")
    );
    let mut answers = ingest
        .publish_stream(authorized(futures::stream::iter(vec![long_id]), COURIER.1))
        .await
        .map_err(|status| anyhow::anyhow!("stream refused: {status}"))?
        .into_inner();
    let long = answers
        .message()
        .await
        .expect_err("the stream ends at the batch");
    assert_eq!(reason(&long).as_deref(), Some("BATCH_ID_TOO_LONG"));
    // 128 bytes fit: the batch is answered (its one event is rejected for its stage).
    let mut no_stage = valid("fits");
    no_stage.stage = 0;
    let fits = ingest
        .publish(authorized(
            v1::PublishRequest {
                events: vec![no_stage],
                batch_id: "b".repeat(128),
            },
            COURIER.1,
        ))
        .await?
        .into_inner();
    assert_eq!((fits.batch_id.len(), fits.rejected), (128, 1));

    let mut timeline = timeline_client(&node).await?;
    let bad_query = timeline
        .get_timeline(v1::GetTimelineRequest {
            customer_id: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(bad_query.code(), Code::InvalidArgument);
    let bad_token = timeline
        .get_timeline(v1::GetTimelineRequest {
            customer_id: "dave".into(),
            page_token: "forged".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(bad_token.code(), Code::InvalidArgument);
    let huge_page = timeline
        .get_timeline(v1::GetTimelineRequest {
            customer_id: "dave".into(),
            page_size: 5000,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(huge_page.code(), Code::InvalidArgument);

    assert_eq!(
        node.store().map(|store| store.log_len()),
        Some(0),
        "nothing was written"
    );
    assert_eq!(records_in_topic(&broker).await?, 0, "nothing reached Kafka");
    node.shutdown().await
}
