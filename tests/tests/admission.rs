//! Admission control and partner contracts: per-partner rates answered with RESOURCE_EXHAUSTED
//! and retry information (unary calls) or paced (streams) while other partners are unaffected, a cap on open streams per partner,
//! (freed as soon as a stream's partner disconnects), server-wide load shedding (each partner
//! holding at most its share of the slots, with its unary calls and its stream batches), and event types
//! and channels outside a partner's contract.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt as _;
use touchline_ingest::{PartnerRegistry, PartnersFile, hash_token};
use touchline_proto::v1::{self, JourneyStage, RejectReason};
use touchline_tests::{
    COURIER, RETAILER, authorized, error_reason, ingest_client, partners, publish, reject_reasons,
    start_broker, start_mock_broker, start_node_with, touchpoint, wait_until_shed,
};

fn batch(prefix: &str, count: usize) -> Vec<v1::Touchpoint> {
    (0..count)
        .map(|i| {
            touchpoint(
                &format!("{prefix}-{i}"),
                "gina",
                "parcel.scanned",
                i64::try_from(i).unwrap_or_default(),
                JourneyStage::Fulfil,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_over_its_rate_gets_resource_exhausted_while_another_is_unaffected()
-> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.rate_per_second = Some(1.0);
        config.ingest.burst = 20.0;
    })
    .await?;
    let mut ingest = ingest_client(&node).await?;
    assert_eq!(
        publish(&mut ingest, COURIER.1, batch("a", 20))
            .await?
            .accepted,
        20,
        "the burst passes"
    );
    let limited = publish(&mut ingest, COURIER.1, batch("b", 5))
        .await
        .expect_err("over the rate");
    assert_eq!(
        (limited.code(), error_reason(&limited).as_deref()),
        (Code::ResourceExhausted, Some("RATE_LIMITED"))
    );
    let retry = limited
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("retry information");
    assert!(
        retry > Duration::from_secs(1) && retry <= Duration::from_secs(5),
        "{retry:?}"
    );
    assert_eq!(
        publish(&mut ingest, RETAILER.1, batch("c", 20))
            .await?
            .accepted,
        20,
        "another partner is unaffected"
    );
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_its_rate_is_paced_not_ended() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.rate_per_second = Some(100.0);
        config.ingest.burst = 20.0;
    })
    .await?;
    let mut ingest = ingest_client(&node).await?;
    // Three times the burst on one stream: the first batch passes at once, the others wait for
    // their tokens (about 0.2 s each) instead of ending the stream with RATE_LIMITED.
    let requests: Vec<v1::PublishRequest> = (0..3)
        .map(|number| v1::PublishRequest {
            events: batch(&format!("paced-{number}"), 20),
            batch_id: number.to_string(),
        })
        .collect();
    let started = std::time::Instant::now();
    let mut answers = ingest
        .publish_stream(authorized(futures::stream::iter(requests), COURIER.1))
        .await?
        .into_inner();
    let mut accepted = Vec::new();
    while let Some(answer) = answers.message().await? {
        accepted.push((answer.batch_id, answer.accepted));
    }
    assert_eq!(
        accepted,
        [
            ("0".to_owned(), 20),
            ("1".to_owned(), 20),
            ("2".to_owned(), 20)
        ],
        "every batch answered, the stream ended by the partner"
    );
    // Paced: 40 events over the burst at 100 per second take at least 0.4 s (a lower bound,
    // which a slow machine only exceeds).
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "the rate was not applied: {:?}",
        started.elapsed()
    );
    // A unary call over the rate is still refused with retry information.
    let mut limited = None;
    for number in 0..10 {
        match publish(
            &mut ingest,
            COURIER.1,
            batch(&format!("unary-{number}"), 20),
        )
        .await
        {
            Ok(_) => {}
            Err(status) => {
                limited = Some(status);
                break;
            }
        }
    }
    let limited = limited.expect("a unary call over the rate is refused");
    assert_eq!(
        (limited.code(), error_reason(&limited).as_deref()),
        (Code::ResourceExhausted, Some("RATE_LIMITED"))
    );
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_cannot_open_more_streams_than_allowed() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.max_streams_per_partner = 1;
    })
    .await?;
    let mut ingest = ingest_client(&node).await?;
    let (_keep_open, requests) = tokio::sync::mpsc::channel::<v1::PublishRequest>(1);
    let _first = ingest
        .publish_stream(authorized(
            tokio_stream::wrappers::ReceiverStream::new(requests),
            COURIER.1,
        ))
        .await?;
    let second = ingest
        .publish_stream(authorized(
            futures::stream::iter(Vec::<v1::PublishRequest>::new()),
            COURIER.1,
        ))
        .await
        .expect_err("over the cap");
    assert_eq!(
        (second.code(), error_reason(&second).as_deref()),
        (Code::ResourceExhausted, Some("TOO_MANY_STREAMS"))
    );
    let other = ingest
        .publish_stream(authorized(
            futures::stream::iter(vec![v1::PublishRequest {
                events: batch("r", 1),
                batch_id: "0".into(),
            }]),
            RETAILER.1,
        ))
        .await?;
    let mut other = other.into_inner();
    assert_eq!(
        other.message().await?.map(|answer| answer.accepted),
        Some(1),
        "another partner's stream works"
    );
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_stream_frees_its_slot_and_its_rate_while_its_batch_waits()
-> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.max_streams_per_partner = 1;
        config.ingest.rate_per_second = Some(1.0);
        config.ingest.burst = 60.0;
    })
    .await?;
    let mut ingest = ingest_client(&node).await?;
    // The whole burst goes to a unary call: the stream's batch then owes a minute.
    assert_eq!(
        publish(&mut ingest, COURIER.1, batch("w", 60))
            .await?
            .accepted,
        60
    );
    let (sender, requests) = tokio::sync::mpsc::channel::<v1::PublishRequest>(4);
    let answers = ingest
        .publish_stream(authorized(
            tokio_stream::wrappers::ReceiverStream::new(requests),
            COURIER.1,
        ))
        .await?
        .into_inner();
    sender
        .send(v1::PublishRequest {
            events: batch("x", 60),
            batch_id: "0".into(),
        })
        .await?;
    // The batch waits on the server once the partner's bucket owes it: a unary call is then told
    // to come back in about a minute.
    touchline_tests::wait_until_rate_owes(
        &mut ingest,
        COURIER.1,
        || batch("probe", 60),
        Duration::from_secs(40),
    )
    .await?;
    // The partner goes away while the batch waits.
    drop(answers);
    drop(sender);
    // Its slot is free again long before the minute is over.
    let deadline = tokio::time::Instant::now() + touchline_tests::DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    let reopened = loop {
        poll.tick().await;
        match ingest
            .publish_stream(authorized(
                futures::stream::iter(Vec::<v1::PublishRequest>::new()),
                COURIER.1,
            ))
            .await
        {
            Ok(stream) => break Ok(stream),
            Err(status) if tokio::time::Instant::now() < deadline => {
                assert_eq!(error_reason(&status).as_deref(), Some("TOO_MANY_STREAMS"));
            }
            Err(status) => break Err(status),
        }
    };
    assert!(reopened.is_ok(), "the slot stayed taken: {reopened:?}");
    // The dropped batch gave its minute of rate back: a unary call passes again within seconds.
    let deadline = tokio::time::Instant::now() + touchline_tests::DEADLINE;
    loop {
        poll.tick().await;
        match publish(&mut ingest, COURIER.1, batch("y", 1)).await {
            Ok(response) => {
                assert_eq!(response.accepted, 1);
                break;
            }
            Err(status) => {
                assert_eq!(error_reason(&status).as_deref(), Some("RATE_LIMITED"));
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "the dropped batch's rate was not given back: {status:?}"
                );
            }
        }
    }
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sheds_load_past_its_in_flight_limit() -> anyhow::Result<()> {
    let broker = start_mock_broker();
    // Needs the mock cluster's fault injection (slow broker responses).
    let mock = broker.mock();
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.max_in_flight_batches = 1;
    })
    .await?;
    let ingest = ingest_client(&node).await?;
    mock.set_round_trip_time(Duration::from_millis(1500))?;
    // Two partners call at once; whichever takes the only slot first holds it for the slow round
    // trip, and the other is shed.
    let mut slow = ingest.clone();
    let first = tokio::spawn(async move { publish(&mut slow, COURIER.1, batch("slow", 1)).await });
    let mut shed = None;
    let mut held = None;
    let mut fast = ingest.clone();
    let deadline = tokio::time::Instant::now() + touchline_tests::DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    while shed.is_none() && !first.is_finished() && tokio::time::Instant::now() < deadline {
        poll.tick().await;
        match publish(&mut fast, RETAILER.1, batch("fast", 1)).await {
            Err(status) => shed = Some(status),
            Ok(response) => held = Some(response),
        }
    }
    mock.set_round_trip_time(Duration::ZERO)?;
    let first = first.await?;
    let (shed, holder) = match (shed, first) {
        (Some(shed), first) => (shed, first?),
        // The fast call took the slot first: the slow one was the call shed.
        (None, Err(shed)) => (
            shed,
            held.ok_or_else(|| anyhow::anyhow!("no call held the slot"))?,
        ),
        (None, Ok(_)) => anyhow::bail!("a call arriving while the only slot is busy is shed"),
    };
    assert_eq!(
        (shed.code(), error_reason(&shed).as_deref()),
        (Code::ResourceExhausted, Some("OVERLOADED"))
    );
    assert!(shed.get_details_retry_info().is_some());
    assert_eq!(holder.accepted, 1, "the call holding the slot completes");
    node.shutdown().await
}

/// Publishes one event, again while the call is shed: a probe of the test may hold the slot the
/// call needs for the moment it is decoded.
async fn publish_admitted(
    client: &mut touchline_proto::v1::ingest_service_client::IngestServiceClient<
        tonic::transport::Channel,
    >,
    token: &str,
    id: &str,
) -> Result<v1::PublishResponse, tonic::Status> {
    let deadline = tokio::time::Instant::now() + touchline_tests::DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        match publish(client, token, batch(id, 1)).await {
            Err(status)
                if matches!(
                    error_reason(&status).as_deref(),
                    Some("OVERLOADED" | "TOO_MANY_CALLS")
                ) && tokio::time::Instant::now() < deadline => {}
            answer => return answer,
        }
    }
}

/// A node on a mock cluster whose every request takes 1.5 s, and the courier's unary call holding
/// its slots meanwhile.
struct HeldCall {
    broker: touchline_tests::TestBroker,
    _dir: tempfile::TempDir,
    node: touchline::Node,
    ingest:
        touchline_proto::v1::ingest_service_client::IngestServiceClient<tonic::transport::Channel>,
    holder: tokio::task::JoinHandle<Result<v1::PublishResponse, tonic::Status>>,
}

impl HeldCall {
    async fn start(adjust: impl FnOnce(&mut touchline::Config)) -> anyhow::Result<Self> {
        let broker = start_mock_broker();
        let dir = tempfile::tempdir()?;
        let node = start_node_with(&broker, dir.path(), partners(), adjust).await?;
        let ingest = ingest_client(&node).await?;
        broker
            .mock()
            .set_round_trip_time(Duration::from_millis(1500))?;
        let mut slow = ingest.clone();
        let holder =
            tokio::spawn(async move { publish_admitted(&mut slow, COURIER.1, "hold").await });
        Ok(Self {
            broker,
            _dir: dir,
            node,
            ingest,
            holder,
        })
    }

    /// Lets the broker answer at once again; the held call completes.
    async fn finish(self) -> anyhow::Result<()> {
        self.broker.mock().set_round_trip_time(Duration::ZERO)?;
        assert_eq!(
            self.holder.await??.accepted,
            1,
            "the call holding the slot completes"
        );
        self.node.shutdown().await
    }
}

/// A unary call that finds every slot taken is shed before its body is decoded: bytes that are
/// no protobuf at all get `OVERLOADED` then, not the decoder's `INTERNAL`. So the memory of calls
/// being decoded is bounded by the slots, however many connections send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_finds_the_server_full_is_shed_before_it_is_decoded() -> anyhow::Result<()> {
    let held = HeldCall::start(|config| config.ingest.max_in_flight_batches = 1).await?;
    let channel = held.node.target().connect().await?;
    // While the slot is free the bytes are decoded, and refused for what they are.
    let shed = wait_until_shed(&channel, RETAILER.1, "OVERLOADED", || {
        !held.holder.is_finished()
    })
    .await?;
    assert_eq!(shed.code(), Code::ResourceExhausted);
    assert!(shed.get_details_retry_info().is_some());
    held.finish().await?;
    assert!(touchline_tests::shed_calls(RETAILER.0, "OVERLOADED") >= 1);
    Ok(())
}

/// A unary `Publish` of the courier whose request is one event of 10,000 attributes (about 70 KB
/// sent, over a MiB once decoded), then the `more` messages, its body then kept open.
fn hold_a_wide_call(
    channel: &tonic::transport::Channel,
    more: Vec<v1::PublishRequest>,
) -> tokio::task::JoinHandle<anyhow::Result<tonic::Status>> {
    let mut wide = touchpoint("wide", "gina", "parcel.scanned", 1, JourneyStage::Fulfil);
    wide.attributes = (0..10_000)
        .map(|i| (format!("{i:04x}"), String::new()))
        .collect();
    let mut requests = vec![v1::PublishRequest {
        events: vec![wide],
        batch_id: String::new(),
    }];
    requests.extend(more);
    tokio::spawn(touchline_tests::publish_holding_the_body(
        channel.clone(),
        COURIER.1,
        requests,
    ))
}

/// A unary call is charged what its request would hold once decoded (`ingest.max-in-flight-bytes`)
/// as it is decoded, before the server waits for the end of its body: a call that keeps its body
/// open keeps its charge, and a call that does not fit beside it is answered `OVERLOADED` without
/// being decoded. Once the first call goes, its charge comes back. Before, the charge came in the
/// handler, after the body's end: a decoded request could wait uncharged for the body timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_charged_its_decoded_size_as_it_is_decoded() -> anyhow::Result<()> {
    let broker = start_mock_broker();
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.max_in_flight_bytes = 1 << 20;
        config.ingest.rate_per_second = None;
    })
    .await?;
    let channel = node.target().connect().await?;
    // (A second message of the same call would find the courier's share, all of which the first
    // takes, used up: that messages add up is checked by the codec's unit test.)
    let holder = hold_a_wide_call(&channel, Vec::new());
    let shed =
        wait_until_shed(&channel, RETAILER.1, "OVERLOADED", || !holder.is_finished()).await?;
    assert_eq!(shed.code(), Code::ResourceExhausted);
    assert!(shed.get_details_retry_info().is_some());
    assert!(touchline_tests::shed_calls(RETAILER.0, "OVERLOADED") >= 1);
    holder.abort();
    let mut ingest = ingest_client(&node).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        match publish(&mut ingest, RETAILER.1, batch("after", 1)).await {
            Ok(answer) => {
                assert_eq!(answer.accepted, 1);
                break;
            }
            Err(status) if error_reason(&status).as_deref() == Some("OVERLOADED") => {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "the held call's charge never came back"
                );
            }
            Err(status) => anyhow::bail!("refused: {status:?}"),
        }
    }
    node.shutdown().await
}

/// A partner's unary calls hold at most its share of the server's bytes
/// (`ingest.max-in-flight-bytes-per-partner`): while one of its calls holds all of its share (its
/// body kept open), its next call is answered `TOO_MANY_CALLS` without being decoded, and another
/// partner's calls go through. Before, one partner could hold every byte of the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_holds_at_most_its_share_of_the_servers_bytes() -> anyhow::Result<()> {
    let broker = start_mock_broker();
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.max_in_flight_bytes = 4 << 20;
        config.ingest.max_in_flight_bytes_per_partner = 1 << 20;
        config.ingest.rate_per_second = None;
    })
    .await?;
    let channel = node.target().connect().await?;
    // Over a MiB once decoded: all of the courier's share.
    let holder = hold_a_wide_call(&channel, Vec::new());
    let refused = wait_until_shed(&channel, COURIER.1, "TOO_MANY_CALLS", || {
        !holder.is_finished()
    })
    .await?;
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.get_details_retry_info().is_some());
    // Another partner is not held back by it.
    let mut ingest = ingest_client(&node).await?;
    assert_eq!(
        publish(&mut ingest, RETAILER.1, batch("other", 1))
            .await?
            .accepted,
        1
    );
    holder.abort();
    node.shutdown().await
}

/// A partner holding its maximum of unary calls in flight gets `TOO_MANY_CALLS` for the next,
/// before it is decoded, while another partner's calls go through: no partner takes every slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_cannot_hold_more_unary_calls_than_allowed() -> anyhow::Result<()> {
    let held = HeldCall::start(|config| config.ingest.max_calls_per_partner = 1).await?;
    let channel = held.node.target().connect().await?;
    // Until the holder has taken its call slot, the bytes are decoded, and refused.
    let refused = wait_until_shed(&channel, COURIER.1, "TOO_MANY_CALLS", || {
        !held.holder.is_finished()
    })
    .await?;
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.get_details_retry_info().is_some());
    // Another partner is not held back by it.
    let mut other = held.ingest.clone();
    assert_eq!(
        publish(&mut other, RETAILER.1, batch("other", 1))
            .await?
            .accepted,
        1
    );
    held.finish().await
}

/// A partner's stream batches hold at most its share of the server's in-flight slots
/// (`max-calls-per-partner`, with its unary calls): a stream with more batches waiting for the
/// broker than that leaves slots to other partners, whose calls go through, while the partner's
/// own unary calls are refused with `TOO_MANY_CALLS`. Before, its stream batches took every slot
/// and every other partner's call was shed (`OVERLOADED`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partners_stream_batches_leave_slots_to_other_partners() -> anyhow::Result<()> {
    let broker = start_mock_broker();
    // Needs the mock cluster's fault injection (slow broker responses).
    let mock = broker.mock();
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.max_in_flight_batches = 3;
        config.ingest.max_calls_per_partner = 2;
    })
    .await?;
    let ingest = ingest_client(&node).await?;
    mock.set_round_trip_time(Duration::from_millis(1500))?;
    let requests: Vec<v1::PublishRequest> = (0..4)
        .map(|number| v1::PublishRequest {
            events: batch(&format!("streamed-{number}"), 1),
            batch_id: number.to_string(),
        })
        .collect();
    let mut streaming = ingest.clone();
    let stream = tokio::spawn(async move {
        let mut answers = streaming
            .publish_stream(authorized(futures::stream::iter(requests), COURIER.1))
            .await?
            .into_inner();
        let mut accepted = 0;
        while let Some(answer) = answers.message().await? {
            accepted += answer.accepted;
        }
        Ok::<_, tonic::Status>(accepted)
    });
    let channel = node.target().connect().await?;
    // The courier's share is held by its stream's batches.
    let refused = wait_until_shed(&channel, COURIER.1, "TOO_MANY_CALLS", || {
        !stream.is_finished()
    })
    .await?;
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // A slot is left for the retailer: its call is published (after the slow round trip).
    let mut other = ingest.clone();
    let answer = publish(&mut other, RETAILER.1, batch("other", 1)).await;
    mock.set_round_trip_time(Duration::ZERO)?;
    assert_eq!(answer?.accepted, 1, "another partner's call is not shed");
    assert_eq!(stream.await??, 4, "every batch of the stream is published");
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_outside_a_partners_contract_are_rejected_with_their_reason() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let file: PartnersFile = toml::from_str(&format!(
        "[[partner]]\nid = \"{}\"\ntoken-sha256 = [\"{}\"]\nevent-types = [\"parcel.*\", \"delivery.completed\"]\nchannels = [\"doorstep\", \"web\"]\n",
        COURIER.0,
        hash_token(COURIER.1)
    ))?;
    let node = start_node_with(
        &broker,
        dir.path(),
        PartnerRegistry::from_file(&file)?,
        |_| {},
    )
    .await?;
    let mut ingest = ingest_client(&node).await?;
    let mut wrong_channel = touchpoint("e3", "gina", "parcel.scanned", 3, JourneyStage::Fulfil);
    wrong_channel.channel = v1::Channel::Phone as i32;
    let response = publish(
        &mut ingest,
        COURIER.1,
        vec![
            touchpoint("e1", "gina", "parcel.scanned", 1, JourneyStage::Fulfil),
            touchpoint("e2", "gina", "review.posted", 2, JourneyStage::Advocate),
            wrong_channel,
            touchpoint("e4", "gina", "delivery.completed", 4, JourneyStage::Fulfil),
        ],
    )
    .await?;
    assert_eq!(
        reject_reasons(&response),
        [
            None,
            Some(RejectReason::ReasonTypeNotAllowed),
            Some(RejectReason::ReasonChannelNotAllowed),
            None
        ]
    );
    node.shutdown().await
}
