//! Hostile input, sent as raw bytes by a generic gRPC client (no generated stubs on the way in):
//! each case gets its documented reason, nothing of any of them is written, and no input takes
//! the server down.

use http::uri::PathAndQuery;
use prost::Message as _;
use tonic::Code;
use touchline_proto::v1::{self, JourneyStage, RejectReason};
use touchline_tests::{
    COURIER, RawCodec, authorized, error_reason, partners, records_in_topic, reject_reasons,
    start_broker, start_node_with, timeline_client, touchpoint, wait_for_timeline,
};

/// What a case must produce.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// The call succeeds and the (only) event is rejected with this reason.
    Rejected(RejectReason),
    /// The call succeeds; the events are rejected with these reasons (`None`: accepted).
    Results(Vec<Option<RejectReason>>),
    /// The call fails with this code and, when given, this `ErrorInfo.reason`.
    Status(Code, Option<&'static str>),
}

fn valid(id: &str) -> v1::Touchpoint {
    touchpoint(
        id,
        "hostile-customer",
        "parcel.scanned",
        0,
        JourneyStage::Fulfil,
    )
}

fn one(event: v1::Touchpoint) -> Vec<u8> {
    v1::PublishRequest {
        events: vec![event],
        batch_id: String::new(),
    }
    .encode_to_vec()
}

fn at(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos })
}

/// A protobuf length-delimited field.
fn field(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

#[allow(clippy::too_many_lines, reason = "one table of cases")]
fn cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
    use Expect::{Rejected, Results, Status};
    use RejectReason as R;
    let megabyte = "x".repeat(1 << 20);
    let with = |change: &dyn Fn(&mut v1::Touchpoint)| {
        let mut event = valid("e");
        change(&mut event);
        one(event)
    };
    vec![
        (
            "empty event id",
            with(&|e| e.event_id.clear()),
            Rejected(R::ReasonEventIdMissing),
        ),
        (
            "1 MB event id",
            with(&|e| e.event_id.clone_from(&megabyte)),
            Rejected(R::ReasonEventIdTooLong),
        ),
        (
            "NUL in event id",
            with(&|e| e.event_id = "a\0b".into()),
            Rejected(R::ReasonEventIdInvalid),
        ),
        (
            "space in event id",
            with(&|e| e.event_id = "a b".into()),
            Rejected(R::ReasonEventIdInvalid),
        ),
        (
            "empty customer id",
            with(&|e| e.customer_id.clear()),
            Rejected(R::ReasonCustomerIdMissing),
        ),
        (
            "1 MB customer id",
            with(&|e| e.customer_id.clone_from(&megabyte)),
            Rejected(R::ReasonCustomerIdTooLong),
        ),
        (
            "bell in customer id",
            with(&|e| e.customer_id = "c\u{7}".into()),
            Rejected(R::ReasonCustomerIdInvalid),
        ),
        (
            "look-alike Unicode customer id",
            with(&|e| e.customer_id = "\u{441}ust-1".into()),
            Rejected(R::ReasonCustomerIdInvalid),
        ),
        (
            "empty type",
            with(&|e| e.r#type.clear()),
            Rejected(R::ReasonTypeMissing),
        ),
        (
            "upper-case type",
            with(&|e| e.r#type = "Parcel.Scanned".into()),
            Rejected(R::ReasonTypeInvalid),
        ),
        (
            "NUL in type",
            with(&|e| e.r#type = "parcel\0".into()),
            Rejected(R::ReasonTypeInvalid),
        ),
        (
            "1 MB type",
            with(&|e| e.r#type.clone_from(&megabyte)),
            Rejected(R::ReasonTypeTooLong),
        ),
        (
            "no occurred_at",
            with(&|e| e.occurred_at = None),
            Rejected(R::ReasonOccurredAtMissing),
        ),
        (
            "before 1970",
            with(&|e| e.occurred_at = at(-1, 0)),
            Rejected(R::ReasonOccurredAtTooOld),
        ),
        (
            "long before 1970",
            with(&|e| e.occurred_at = at(i64::MIN, 0)),
            Rejected(R::ReasonOccurredAtTooOld),
        ),
        (
            "after 2100",
            with(&|e| e.occurred_at = at(4_200_000_000, 0)),
            Rejected(R::ReasonOccurredAtInFuture),
        ),
        (
            "far in the future",
            with(&|e| e.occurred_at = at(i64::MAX, 999_999_999)),
            Rejected(R::ReasonOccurredAtInFuture),
        ),
        (
            "negative nanos",
            with(&|e| e.occurred_at = at(1_700_000_000, -1)),
            Rejected(R::ReasonOccurredAtInvalid),
        ),
        (
            "nanos over a second",
            with(&|e| e.occurred_at = at(1_700_000_000, 2_000_000_000)),
            Rejected(R::ReasonOccurredAtInvalid),
        ),
        (
            "no stage",
            with(&|e| e.stage = 0),
            Rejected(R::ReasonStageMissing),
        ),
        (
            "unknown stage",
            with(&|e| e.stage = 99),
            Rejected(R::ReasonStageUnknown),
        ),
        (
            "negative stage",
            with(&|e| e.stage = -7),
            Rejected(R::ReasonStageUnknown),
        ),
        (
            "unknown channel",
            with(&|e| e.channel = i32::MAX),
            Rejected(R::ReasonChannelUnknown),
        ),
        (
            "unknown sentiment",
            with(&|e| {
                e.outcome = Some(v1::Outcome {
                    sentiment: 42,
                    score: None,
                });
            }),
            Rejected(R::ReasonSentimentUnknown),
        ),
        (
            "NaN score",
            with(&|e| {
                e.outcome = Some(v1::Outcome {
                    sentiment: 1,
                    score: Some(f64::NAN),
                });
            }),
            Rejected(R::ReasonScoreOutOfRange),
        ),
        (
            "infinite score",
            with(&|e| {
                e.outcome = Some(v1::Outcome {
                    sentiment: 1,
                    score: Some(f64::INFINITY),
                });
            }),
            Rejected(R::ReasonScoreOutOfRange),
        ),
        (
            "10,000 attributes",
            with(&|e| {
                e.attributes = (0..10_000)
                    .map(|i| (format!("k{i}"), "v".to_owned()))
                    .collect();
            }),
            Rejected(R::ReasonTooManyAttributes),
        ),
        (
            "NUL in an attribute key",
            with(&|e| e.attributes = [("k\0".to_owned(), "v".to_owned())].into()),
            Rejected(R::ReasonAttributeKeyInvalid),
        ),
        (
            "control character in an attribute value",
            with(&|e| e.attributes = [("k".to_owned(), "line\u{1b}[2J".to_owned())].into()),
            Rejected(R::ReasonAttributeValueInvalid),
        ),
        (
            "1 MB attribute value",
            with(&|e| e.attributes = [("k".to_owned(), megabyte.clone())].into()),
            Rejected(R::ReasonAttributeValueInvalid),
        ),
        (
            "1 MB payload",
            with(&|e| e.payload = vec![0; 1 << 20]),
            Rejected(R::ReasonPayloadTooLarge),
        ),
        (
            "invalid duplicates of one event id each get their own reason",
            v1::PublishRequest {
                events: vec![valid("twice"), valid("twice")]
                    .into_iter()
                    .map(|mut e| {
                        e.stage = 99;
                        e
                    })
                    .collect(),
                batch_id: String::new(),
            }
            .encode_to_vec(),
            Results(vec![
                Some(R::ReasonStageUnknown),
                Some(R::ReasonStageUnknown),
            ]),
        ),
        (
            "duplicate event ids in one batch, the first invalid",
            v1::PublishRequest {
                events: vec![
                    {
                        let mut e = valid("dup");
                        e.stage = 0;
                        e
                    },
                    {
                        let mut e = valid("dup");
                        e.channel = -1;
                        e
                    },
                ],
                batch_id: String::new(),
            }
            .encode_to_vec(),
            Results(vec![
                Some(R::ReasonStageMissing),
                Some(R::ReasonChannelUnknown),
            ]),
        ),
        (
            "empty batch",
            v1::PublishRequest::default().encode_to_vec(),
            Status(Code::InvalidArgument, Some("BATCH_EMPTY")),
        ),
        (
            "a batch over the limit",
            v1::PublishRequest {
                events: (0..1001)
                    .map(|i| {
                        let mut e = valid(&format!("b{i}"));
                        e.stage = 0;
                        e
                    })
                    .collect(),
                batch_id: String::new(),
            }
            .encode_to_vec(),
            Status(Code::InvalidArgument, Some("BATCH_TOO_LARGE")),
        ),
        (
            "garbage bytes instead of a protobuf",
            vec![0xff; 64],
            Status(Code::Internal, None),
        ),
        (
            "a truncated protobuf",
            {
                let mut bytes = one(valid("t"));
                bytes.truncate(bytes.len() / 2);
                bytes
            },
            Status(Code::Internal, None),
        ),
        (
            "invalid UTF-8 in a string",
            field(1, &field(1, &[0xff, 0xfe, 0xfd])),
            Status(Code::Internal, None),
        ),
        (
            "a wrong wire type",
            vec![0x08, 0x96, 0x01],
            Status(Code::Internal, None),
        ),
        (
            // 400 KB that would decode into about 40 MB of empty events: refused before decoding.
            "more fields than any request holds",
            field(1, &[]).repeat(200_001),
            Status(Code::InvalidArgument, Some("TOO_MANY_FIELDS")),
        ),
        (
            // One event whose attributes are 3 MB of empty map entries: about 190 MB once
            // decoded. Refused before decoding.
            "an event of tiny nested fields",
            field(1, &[0x42, 0x00].repeat(1_500_000)),
            Status(Code::InvalidArgument, Some("TOO_MANY_FIELDS")),
        ),
        (
            // A proto2 group, which prost skips on an unknown field number: it must not hide
            // the events after it from the count.
            "a group before the events",
            [vec![0x7b, 0x7c], field(1, &[]).repeat(10)].concat(),
            Status(Code::InvalidArgument, Some("TOO_MANY_FIELDS")),
        ),
        (
            "a message over the gRPC limit",
            one({
                let mut e = valid("big");
                e.payload = vec![7; 5 << 20];
                e
            }),
            Status(Code::OutOfRange, None),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_their_documented_reason_and_write_nothing() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.rate_per_second = None;
    })
    .await?;
    let channel = tonic::transport::Endpoint::from_shared(node.endpoint())?
        .connect()
        .await?;
    let path = PathAndQuery::from_static("/touchline.v1.IngestService/Publish");
    let cases = cases();
    assert!(cases.len() >= 30);
    for (name, bytes, expect) in cases {
        let mut grpc = tonic::client::Grpc::new(channel.clone())
            .max_encoding_message_size(64 << 20)
            .max_decoding_message_size(64 << 20);
        grpc.ready().await?;
        let outcome = grpc
            .unary(authorized(bytes, COURIER.1), path.clone(), RawCodec)
            .await;
        match (&expect, outcome) {
            (Expect::Rejected(reason), Ok(response)) => {
                let response = v1::PublishResponse::decode(response.into_inner().as_slice())?;
                assert_eq!(reject_reasons(&response), [Some(*reason)], "{name}");
            }
            (Expect::Results(reasons), Ok(response)) => {
                let response = v1::PublishResponse::decode(response.into_inner().as_slice())?;
                assert_eq!(&reject_reasons(&response), reasons, "{name}");
            }
            (Expect::Status(code, reason), Err(status)) => {
                assert_eq!(status.code(), *code, "{name}: {status:?}");
                if let Some(reason) = reason {
                    assert_eq!(error_reason(&status).as_deref(), Some(*reason), "{name}");
                }
            }
            (expect, outcome) => panic!("{name}: expected {expect:?}, got {outcome:?}"),
        }
    }

    // An unknown field naming another partner is ignored: the partner is the token's.
    let mut spoofed = field(1, &valid("spoofed").encode_to_vec());
    spoofed.extend(field(99, b"northwind-retail"));
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let response = grpc
        .unary(authorized(spoofed, COURIER.1), path.clone(), RawCodec)
        .await?;
    let response = v1::PublishResponse::decode(response.into_inner().as_slice())?;
    assert_eq!(response.accepted, 1);

    // Calls are authenticated on their headers, before the body is decoded: without a token, a
    // body that cannot be decoded (or one over the size limit) is refused as unauthenticated.
    for (name, body) in [
        ("undecodable", vec![0x08, 0x96, 0x01]),
        (
            "over the limit",
            one({
                let mut e = valid("big-anonymous");
                e.payload = vec![7; 5 << 20];
                e
            }),
        ),
    ] {
        let mut grpc =
            tonic::client::Grpc::new(channel.clone()).max_encoding_message_size(64 << 20);
        grpc.ready().await?;
        let refused = grpc
            .unary(tonic::Request::new(body), path.clone(), RawCodec)
            .await
            .expect_err("refused");
        assert_eq!(
            (refused.code(), error_reason(&refused).as_deref()),
            (Code::Unauthenticated, Some("TOKEN_MISSING")),
            "{name}"
        );
    }
    // So are admin calls (each method checks the token again, for its audit).
    let admin_path = PathAndQuery::from_static("/touchline.v1.AdminService/ListDeadLetters");
    for (name, body) in [
        ("garbage bytes", vec![0xff; 64]),
        (
            "more fields than any request holds",
            field(1, &[]).repeat(200_001),
        ),
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await?;
        let refused = grpc
            .unary(tonic::Request::new(body), admin_path.clone(), RawCodec)
            .await
            .expect_err("refused");
        assert_eq!(
            (refused.code(), error_reason(&refused).as_deref()),
            (Code::Unauthenticated, Some("TOKEN_MISSING")),
            "admin, {name}"
        );
    }

    let mut timeline = timeline_client(&node).await?;
    let entries = wait_for_timeline(&mut timeline, "hostile-customer", 1).await?;
    assert_eq!(entries.len(), 1, "nothing of the hostile cases was written");
    assert_eq!(entries[0].partner_id, COURIER.0);
    assert_eq!(
        records_in_topic(&broker).await?,
        1,
        "nothing of the hostile cases reached Kafka"
    );
    assert_eq!(node.store().map(|store| store.log_len()), Some(1));
    node.shutdown().await
}
