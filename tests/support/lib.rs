//! Shared harness of the end-to-end tests: a real Kafka-protocol broker, real nodes on
//! `127.0.0.1:0` with sled on temporary directories, and the generated gRPC clients.
//!
//! The broker is the in-process mock cluster by default. When `TOUCHLINE_TEST_KAFKA` names
//! bootstrap servers (for example a Tansu broker started by `deploy/tansu.sh`), the same tests run
//! against that broker instead, each on a topic of its own. Tests that need the mock cluster's
//! fault injection call [`TestBroker::embedded`] and say so.

use std::time::Duration;

use anyhow::Context as _;
use tonic::transport::Channel;
use touchline::{BrokerChoice, Config, Node};
use touchline_core::PartnerId;
use touchline_ingest::PartnerRegistry;
use touchline_kafka::EmbeddedBroker;
use touchline_proto::v1;
use touchline_proto::v1::ingest_service_client::IngestServiceClient;
use touchline_proto::v1::timeline_service_client::TimelineServiceClient;

pub use touchline_proto::v1::{JourneyStage, PublishRequest, Touchpoint};

/// The test partners: (id, token).
pub const COURIER: (&str, &str) = ("swift-courier", "courier-secret-token");
pub const RETAILER: (&str, &str) = ("northwind-retail", "retailer-secret-token");
/// The admin token of test nodes.
pub const ADMIN_TOKEN: &str = "admin-secret-token";

/// How long a test waits for a condition before it fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub const PARTITIONS: i32 = 3;

/// The variable that points the end-to-end suite at an external broker.
pub const EXTERNAL_BROKER_VARIABLE: &str = "TOUCHLINE_TEST_KAFKA";

/// The broker of one test: the in-process mock cluster, or a fresh topic on an external broker.
#[derive(Debug)]
pub enum TestBroker {
    Embedded {
        broker: EmbeddedBroker,
        topic: String,
    },
    External {
        bootstrap: String,
        topic: String,
    },
}

impl TestBroker {
    #[must_use]
    pub fn bootstrap_servers(&self) -> &str {
        match self {
            Self::Embedded { broker, .. } => broker.bootstrap_servers(),
            Self::External { bootstrap, .. } => bootstrap,
        }
    }

    #[must_use]
    pub fn topic(&self) -> &str {
        match self {
            Self::Embedded { topic, .. } | Self::External { topic, .. } => topic,
        }
    }

    /// The mock cluster, for fault injection; `None` against an external broker.
    #[must_use]
    pub fn embedded(&self) -> Option<&EmbeddedBroker> {
        match self {
            Self::Embedded { broker, .. } => Some(broker),
            Self::External { .. } => None,
        }
    }

    /// The mock cluster of a broker from [`start_mock_broker`], for fault injection.
    ///
    /// # Panics
    /// On an external broker (a test that injects faults starts with [`start_mock_broker`]).
    #[must_use]
    pub fn mock(&self) -> &EmbeddedBroker {
        self.embedded()
            .expect("fault injection needs the mock cluster: start the test with start_mock_broker")
    }
}

/// Logs of the code under test, shown for failing tests; `RUST_LOG` picks what (default: warnings).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

fn unique_topic() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("touchline-test-{}-{nanos}-{count}", std::process::id())
}

/// The partners every test node knows.
#[must_use]
pub fn partners() -> PartnerRegistry {
    PartnerRegistry::from_tokens(
        [COURIER, RETAILER]
            .map(|(id, token)| (PartnerId::parse(id).expect("valid partner id"), token)),
    )
}

/// The broker for one test: a new mock cluster, or a new topic on the external broker named by
/// `TOUCHLINE_TEST_KAFKA`.
///
/// # Panics
/// When the broker cannot start or the topic cannot be created.
pub async fn start_broker() -> TestBroker {
    init_logs();
    let topic = unique_topic();
    match std::env::var(EXTERNAL_BROKER_VARIABLE) {
        Ok(bootstrap) if !bootstrap.is_empty() => {
            let options = touchline_kafka::KafkaOptions {
                bootstrap_servers: bootstrap.clone(),
                topic: topic.clone(),
                partitions: PARTITIONS,
                ..touchline_kafka::KafkaOptions::default()
            };
            touchline_kafka::ensure_topic(&options)
                .await
                .expect("the test topic is created on the external broker");
            TestBroker::External { bootstrap, topic }
        }
        _ => embedded(topic),
    }
}

/// The broker for a test that injects faults (a broker down, errors, round-trip delays): always a
/// new in-process mock cluster, even when `TOUCHLINE_TEST_KAFKA` names an external broker, which
/// cannot inject them. Such a test runs in full in every run of the suite instead of being skipped;
/// its mock is [`TestBroker::mock`].
///
/// # Panics
/// When the mock cluster cannot start.
#[must_use]
pub fn start_mock_broker() -> TestBroker {
    init_logs();
    embedded(unique_topic())
}

fn embedded(topic: String) -> TestBroker {
    TestBroker::Embedded {
        broker: EmbeddedBroker::start(1, &topic, PARTITIONS).expect("the embedded broker starts"),
        topic,
    }
}

/// A configuration for a test node on `broker`, listening on a free port, storing in `dir`.
#[must_use]
pub fn config(broker: &TestBroker, dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("valid address");
    config.metrics.listen = "127.0.0.1:0".parse().expect("valid address");
    config.admin.token_sha256 = vec![touchline_ingest::hash_token(ADMIN_TOKEN)];
    config.kafka.bootstrap_servers = broker.bootstrap_servers().to_owned();
    config.kafka.topic = broker.topic().to_owned();
    config.kafka.partitions = PARTITIONS;
    config
        .kafka
        .producer_properties
        .insert("linger.ms".to_owned(), "1".to_owned());
    config.store.path = dir.join("store");
    config.server.shutdown_grace_ms = 5_000;
    config
}

/// Starts a node with every role on `broker`, storing in `dir`.
///
/// # Errors
/// When the node cannot start.
pub async fn start_node(broker: &TestBroker, dir: &std::path::Path) -> anyhow::Result<Node> {
    Node::start(config(broker, dir), BrokerChoice::External, partners()).await
}

/// Starts a node on `broker` with `partners`, after `adjust` changed its configuration.
///
/// # Errors
/// When the node cannot start.
pub async fn start_node_with(
    broker: &TestBroker,
    dir: &std::path::Path,
    partners: impl Into<touchline_ingest::PartnerDirectory>,
    adjust: impl FnOnce(&mut Config),
) -> anyhow::Result<Node> {
    let mut config = config(broker, dir);
    adjust(&mut config);
    Node::start(config, BrokerChoice::External, partners).await
}

/// The `ErrorInfo.reason` of a status, if it has one.
#[must_use]
pub fn error_reason(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt as _;
    status.get_details_error_info().map(|info| info.reason)
}

/// The reject reason of each event of a response, `None` for accepted events.
#[must_use]
pub fn reject_reasons(response: &v1::PublishResponse) -> Vec<Option<v1::RejectReason>> {
    response
        .results
        .iter()
        .map(|result| match &result.result {
            Some(v1::event_result::Result::Rejected(rejected)) => {
                v1::RejectReason::try_from(rejected.reason).ok()
            }
            _ => None,
        })
        .collect()
}

/// A connected ingest client.
///
/// # Errors
/// When the endpoint cannot be reached.
pub async fn ingest_client(node: &Node) -> anyhow::Result<IngestServiceClient<Channel>> {
    Ok(IngestServiceClient::new(
        node.target()
            .connect()
            .await
            .context("connects to ingest")?,
    ))
}

/// A client of the node's `AdminService` (send [`ADMIN_TOKEN`]).
///
/// # Errors
/// When the endpoint cannot be reached.
pub async fn admin_client(
    node: &Node,
) -> anyhow::Result<touchline_proto::v1::admin_service_client::AdminServiceClient<Channel>> {
    Ok(
        touchline_proto::v1::admin_service_client::AdminServiceClient::new(
            node.target().connect().await?,
        ),
    )
}

/// The active versions' checksums of a `VerifyProjections` answer: (name, entries, sha256), the
/// log first.
#[must_use]
pub fn active_checksums(verified: &v1::VerifyProjectionsResponse) -> Vec<(String, u64, String)> {
    verified
        .checksums
        .iter()
        .filter(|c| c.state == v1::VersionState::Active as i32)
        .map(|c| (c.name.clone(), c.entries, c.sha256.clone()))
        .collect()
}

/// Polls the node's gRPC health service until `service` reports `serving` (or not).
///
/// # Errors
/// When the deadline passes first.
pub async fn wait_for_health(node: &Node, service: &str, serving: bool) -> anyhow::Result<()> {
    wait_for_health_at(node.target(), service, serving).await
}

/// [`wait_for_health`] for the node at `target` (one that is being shut down, say).
///
/// # Errors
/// When the deadline passes first.
pub async fn wait_for_health_at(
    target: &touchline::Target,
    service: &str,
    serving: bool,
) -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = target.connect().await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let wanted = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    } as i32;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        poll.tick().await;
        let answer = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await;
        if answer
            .as_ref()
            .is_ok_and(|answer| answer.get_ref().status == wanted)
        {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "health of {service:?} never became {}: {answer:?}",
            if serving { "SERVING" } else { "NOT_SERVING" }
        );
    }
}

/// A connected timeline client.
///
/// # Errors
/// When the endpoint cannot be reached.
pub async fn timeline_client(node: &Node) -> anyhow::Result<TimelineServiceClient<Channel>> {
    Ok(TimelineServiceClient::new(
        node.target().connect().await.context("connects to query")?,
    ))
}

/// A request carrying `authorization: Bearer TOKEN`.
///
/// # Panics
/// When the token is not a valid header value.
#[must_use]
pub fn authorized<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("valid header"),
    );
    request
}

/// Seconds since the epoch, some days in the past, as a base for event times.
pub const BASE_SECONDS: i64 = 1_780_000_000;

/// A valid touchpoint.
#[must_use]
pub fn touchpoint(
    event_id: &str,
    customer_id: &str,
    event_type: &str,
    offset_seconds: i64,
    stage: JourneyStage,
) -> Touchpoint {
    Touchpoint {
        event_id: event_id.to_owned(),
        customer_id: customer_id.to_owned(),
        r#type: event_type.to_owned(),
        occurred_at: Some(prost_types::Timestamp {
            seconds: BASE_SECONDS + offset_seconds,
            nanos: 0,
        }),
        channel: v1::Channel::Web as i32,
        stage: stage as i32,
        outcome: Some(v1::Outcome {
            sentiment: v1::Sentiment::Positive as i32,
            score: Some(80.0),
        }),
        attributes: std::collections::BTreeMap::new(),
        payload: Vec::new(),
    }
}

/// Events `{series}{i}` for `i` in `range`, over `customers` customers `cust-{series}{i %
/// customers}`, spread over 40 seconds of event time (no two events of a customer share one).
#[must_use]
pub fn series(series: &str, customers: usize, range: std::ops::Range<usize>) -> Vec<Touchpoint> {
    range
        .map(|i| {
            touchpoint(
                &format!("{series}{i}"),
                &format!("cust-{series}{}", i % customers.max(1)),
                "delivery.completed",
                i64::try_from(i % 40).unwrap_or_default(),
                JourneyStage::Fulfil,
            )
        })
        .collect()
}

/// Publishes one batch as `partner` and returns the response.
///
/// # Errors
/// When the call fails.
pub async fn publish(
    client: &mut IngestServiceClient<Channel>,
    token: &str,
    events: Vec<Touchpoint>,
) -> Result<v1::PublishResponse, tonic::Status> {
    client
        .publish(authorized(
            PublishRequest {
                events,
                batch_id: String::new(),
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// Waits until the partner of `token` owes its rate bucket more than `more_than`: a unary call of
/// `probe` events (a whole burst or more, so that it can never pass) is refused with a retry delay
/// above it. How a test knows that a stream's batch was charged and waits in the server.
///
/// # Errors
/// When a probe is accepted, or the debt is not reached within [`DEADLINE`].
pub async fn wait_until_rate_owes(
    client: &mut IngestServiceClient<Channel>,
    token: &str,
    probe: impl Fn() -> Vec<Touchpoint>,
    more_than: Duration,
) -> anyhow::Result<()> {
    use tonic_types::StatusExt as _;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        let Err(limited) = publish(client, token, probe()).await else {
            anyhow::bail!("a probe passed the partner's rate");
        };
        let retry = limited
            .get_details_retry_info()
            .and_then(|info| info.retry_delay)
            .unwrap_or_default();
        if retry > more_than {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the stream's batch never reached the rate limiter"
        );
    }
}

/// Every entry of a customer's timeline, following pages.
///
/// # Errors
/// When a call fails.
pub async fn full_timeline(
    client: &mut TimelineServiceClient<Channel>,
    customer_id: &str,
) -> Result<Vec<v1::TimelineEntry>, tonic::Status> {
    let mut request = v1::GetTimelineRequest {
        customer_id: customer_id.to_owned(),
        page_size: 1000,
        ..Default::default()
    };
    let mut entries = Vec::new();
    loop {
        let page = client.get_timeline(request.clone()).await?.into_inner();
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            return Ok(entries);
        }
        request.page_token = page.next_page_token;
    }
}

/// Polls a customer's timeline until it has at least `count` entries, or fails at the deadline.
///
/// # Errors
/// When the deadline passes first or a call fails.
pub async fn wait_for_timeline(
    client: &mut TimelineServiceClient<Channel>,
    customer_id: &str,
    count: usize,
) -> anyhow::Result<Vec<v1::TimelineEntry>> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        let entries = full_timeline(client, customer_id).await?;
        if entries.len() >= count {
            return Ok(entries);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "customer {customer_id} has {} of {count} entries after {DEADLINE:?}",
            entries.len()
        );
    }
}

/// Polls `condition` until it holds, or fails at the deadline.
///
/// # Errors
/// When the deadline passes first.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    while !condition() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        poll.tick().await;
    }
    Ok(())
}

/// The event ids of timeline entries, in timeline order.
#[must_use]
pub fn event_ids(entries: &[v1::TimelineEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|entry| {
            entry
                .touchpoint
                .as_ref()
                .map(|t| t.event_id.clone())
                .unwrap_or_default()
        })
        .collect()
}

/// Records in the test topic, all partitions, counted by reading each one to its end: what
/// reached Kafka. (Watermarks would not do on Tansu 0.6, whose high watermark is the base offset
/// of the last batch plus one.)
///
/// # Errors
/// When the broker cannot be read, or a partition's end is not reached within [`DEADLINE`].
pub async fn records_in_topic(broker: &TestBroker) -> anyhow::Result<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::error::KafkaError;
    use rdkafka::{Offset, TopicPartitionList};
    let bootstrap = broker.bootstrap_servers().to_owned();
    let topic = broker.topic().to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "touchline-tests-count")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let deadline = std::time::Instant::now() + DEADLINE;
        let mut at_end = std::collections::BTreeSet::new();
        let mut total = 0;
        while at_end.len() < usize::try_from(PARTITIONS).unwrap_or(usize::MAX) {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "partitions {at_end:?} read to their end, {total} records, after {DEADLINE:?}"
            );
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(_)) => total += 1,
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    at_end.insert(partition);
                }
                Some(Err(error)) => return Err(error.into()),
                None => {}
            }
        }
        Ok(total)
    })
    .await?
}

/// Produces raw record values keyed by customer, as another producer (or a replay) would, and
/// returns where each landed (partition, offset).
///
/// # Errors
/// When a delivery fails.
pub async fn produce_raw(
    broker: &TestBroker,
    records: Vec<(String, Vec<u8>)>,
) -> anyhow::Result<Vec<(i32, i64)>> {
    produce_values(
        broker,
        records
            .into_iter()
            .map(|(key, value)| (key, Some(value)))
            .collect(),
    )
    .await
}

/// [`produce_raw`] of records that may have no value (`None`: a tombstone, as another producer
/// may write).
///
/// # Errors
/// When a record cannot be produced.
pub async fn produce_values(
    broker: &TestBroker,
    records: Vec<(String, Option<Vec<u8>>)>,
) -> anyhow::Result<Vec<(i32, i64)>> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .create()?;
    let deliveries: Vec<_> = records
        .iter()
        .map(|(key, value)| {
            let record = FutureRecord::<String, Vec<u8>>::to(broker.topic()).key(key);
            let record = match value {
                Some(value) => record.payload(value),
                None => record,
            };
            producer.send_result(record).map_err(|(error, _)| error)
        })
        .collect::<Result<_, _>>()?;
    let mut positions = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        let delivered = delivery.await?.map_err(|(error, _)| error)?;
        positions.push((delivered.partition, delivered.offset));
    }
    Ok(positions)
}

/// Bytes in, bytes out: what any gRPC client can send.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Self;
    type Decoder = Self;
    fn encoder(&mut self) -> Self {
        Self
    }
    fn decoder(&mut self) -> Self {
        Self
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buffer: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buffer, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buffer: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let length = bytes::Buf::remaining(buffer);
        Ok(Some(bytes::Buf::copy_to_bytes(buffer, length).to_vec()))
    }
}

/// Sends bytes that are no protobuf as a unary `Publish` of the partner of `token`, and returns
/// how the call was refused: `INTERNAL` when the server decoded them (the call held its slots),
/// or the reason it was shed before decoding (`OVERLOADED`, `TOO_MANY_CALLS`).
///
/// # Errors
/// When the channel fails, or the bytes are accepted.
pub async fn publish_not_protobuf(channel: &Channel, token: &str) -> anyhow::Result<tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static("/touchline.v1.IngestService/Publish");
    match grpc
        .unary(authorized(vec![0xff_u8; 64], token), path, RawCodec)
        .await
    {
        Ok(_) => anyhow::bail!("bytes that are no protobuf were accepted"),
        Err(status) => Ok(status),
    }
}

/// Sends `requests` as the body of a unary `Publish` of the partner of `token` that then stays
/// open: the messages go, the end of the stream never comes, so the server decodes the request
/// (and the messages after it) and waits for the end (until `ingest.request-body-timeout-ms`).
/// Returns how the call ended.
///
/// # Errors
/// When the channel fails, or the call is answered as if its body had ended.
pub async fn publish_holding_the_body(
    channel: Channel,
    token: &'static str,
    requests: Vec<PublishRequest>,
) -> anyhow::Result<tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static("/touchline.v1.IngestService/Publish");
    let messages: Vec<Vec<u8>> = requests.iter().map(prost::Message::encode_to_vec).collect();
    let body =
        futures::StreamExt::chain(futures::stream::iter(messages), futures::stream::pending());
    match grpc
        .client_streaming(authorized(body, token), path, RawCodec)
        .await
    {
        Ok(_) => anyhow::bail!("a call whose body never ended was answered"),
        Err(status) => Ok(status),
    }
}

/// Probes with [`publish_not_protobuf`] until a call is shed with `reason` before it is decoded,
/// and returns that refusal. Probes decoded meanwhile (`INTERNAL`: the slot was free) are fine
/// while `holding()` says the call expected to hold the slot is still in flight.
///
/// # Errors
/// When a probe gets another answer, `holding()` turns false, or [`DEADLINE`] passes first.
pub async fn wait_until_shed(
    channel: &Channel,
    token: &str,
    reason: &str,
    holding: impl Fn() -> bool,
) -> anyhow::Result<tonic::Status> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        let status = publish_not_protobuf(channel, token).await?;
        if error_reason(&status).as_deref() == Some(reason) {
            return Ok(status);
        }
        anyhow::ensure!(
            status.code() == tonic::Code::Internal,
            "a probe got neither {reason} nor decoded: {status:?}"
        );
        // Two failures, told apart: the call meant to hold the slot ended (it was answered at
        // once: refused, or its producer unavailable), or it never took the slot in time.
        anyhow::ensure!(
            holding(),
            "the call meant to hold the slot ended before a call was shed with {reason}"
        );
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no call was shed with {reason} within {DEADLINE:?}, the call meant to hold the slot still in flight"
        );
    }
}

/// Unary calls of `partner` refused before decoding with `reason`, counted process-wide (by every
/// node of the test binary).
#[must_use]
pub fn shed_calls(partner: &str, reason: &'static str) -> u64 {
    touchline_ingest::metrics::INGEST
        .shed_calls
        .get_or_create(&touchline_ingest::metrics::ShedLabels {
            partner: partner.to_owned(),
            reason,
        })
        .get()
}

/// Calls of `service` refused for their credentials with `reason`, counted process-wide.
#[must_use]
pub fn auth_failures(service: &'static str, reason: &'static str) -> u64 {
    touchline_ingest::metrics::INGEST
        .auth_failures
        .get_or_create(&touchline_ingest::metrics::AuthLabels { service, reason })
        .get()
}
