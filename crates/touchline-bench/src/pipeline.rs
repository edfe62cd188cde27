//! The whole pipeline over real gRPC: K partner clients on `PublishStream`, a node with every role,
//! and readers on `TimelineService` ([`crate::readers`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_stream::wrappers::ReceiverStream;
use touchline::{BrokerChoice, Config, Node};
use touchline_core::PartnerId;
use touchline_ingest::PartnerRegistry;
use touchline_proto::v1;
use touchline_proto::v1::ingest_service_client::IngestServiceClient;

use crate::readers::{Stop, readers, watch_queryable};
use crate::stats::{Percentiles, per_second};
use crate::workload;

/// The shape of a pipeline run.
#[derive(Debug, Clone, Serialize)]
pub struct Shape {
    pub events: usize,
    pub customers: usize,
    pub clients: usize,
    pub batch_size: usize,
    pub window: usize,
    pub readers: usize,
    /// Records the projector takes from the consumer at once (`projector.max-batch`).
    pub projector_batch: usize,
    /// sled's page cache (`store.cache-mib`), for the node's store and the sled ceilings alike.
    pub cache_mib: u64,
    /// Store reads the node serves at once (`query.read-concurrency`).
    pub read_concurrency: usize,
}

const BASE_SECONDS: i64 = 1_760_000_000;

/// How long the projected log may stop growing before a run is declared broken.
const STALL: Duration = Duration::from_secs(30);

/// The admin token of the bench's nodes.
const ADMIN_TOKEN: &str = "bench-admin-token";

/// Rebuilds the timeline projection of `node` through the admin API, as ops would; returns the
/// events folded per second, from the start to the switch (the new version serves; the old one is
/// deleted after, in the background).
///
/// # Errors
/// When the call fails or the rebuild does not switch.
pub async fn rebuild(node: &Node) -> anyhow::Result<(u64, f64)> {
    use futures::StreamExt as _;
    let mut admin = v1::admin_service_client::AdminServiceClient::connect(node.endpoint()).await?;
    let request = authorized(
        v1::RebuildProjectionRequest {
            projection: "timeline".to_owned(),
        },
        ADMIN_TOKEN,
    )?;
    let started = Instant::now();
    let mut progress = admin.rebuild_projection(request).await?.into_inner();
    let mut last = None;
    while let Some(message) = progress.next().await {
        last = Some(message?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let last = last.ok_or_else(|| anyhow::anyhow!("no rebuild progress"))?;
    anyhow::ensure!(
        last.state == v1::RebuildState::Switched as i32,
        "the rebuild did not switch: {last:?}"
    );
    #[allow(clippy::cast_precision_loss, reason = "a rate")]
    let rate = last.done as f64 / elapsed.max(1e-9);
    Ok((last.done, rate))
}

/// A request carrying `token` as its bearer token.
fn authorized<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

fn token(client: usize) -> String {
    format!("bench-token-{client}")
}

/// A node with every role on `bootstrap`, on a free port, storing in `dir`, no rate limits.
///
/// # Errors
/// When the node cannot start.
pub async fn start_node(
    bootstrap: &str,
    topic: &str,
    dir: &std::path::Path,
    shape: &Shape,
) -> anyhow::Result<Node> {
    let clients = shape.clients;
    let mut config = Config::default();
    config.projector.max_batch = shape.projector_batch;
    config.store.cache_mib = shape.cache_mib;
    config.query.read_concurrency = shape.read_concurrency;
    config.server.listen = "127.0.0.1:0".parse()?;
    config.metrics.enabled = false;
    config.kafka.bootstrap_servers = bootstrap.to_owned();
    config.kafka.topic = topic.to_owned();
    // The count the bench creates its topics with (a node refuses a topic of another count).
    config.kafka.partitions = crate::PARTITIONS;
    config.store.path = dir.join("store");
    config.ingest.rate_per_second = None;
    config.ingest.max_streams_per_partner = 4;
    // Every client and reader connects from 127.0.0.1: one peer, whatever `--clients` says.
    config.server.max_connections_per_peer = 0;
    config.admin.token_sha256 = vec![touchline_ingest::hash_token(ADMIN_TOKEN)];
    let tokens: Vec<String> = (0..clients).map(token).collect();
    let registry =
        PartnerRegistry::from_tokens(tokens.iter().enumerate().map(|(client, token)| {
            (
                PartnerId::parse(format!("bench-partner-{client}")).expect("valid id"),
                token.as_str(),
            )
        }));
    Node::start(config, BrokerChoice::External, registry).await
}

/// Events in the node's log that queries can see: the durable ones (`GetTimeline` shows an entry
/// once it is flushed).
fn queryable(store: &touchline_projection::SledStore) -> usize {
    usize::try_from(touchline_core::EventStore::durable_sequence(store)).unwrap_or(usize::MAX)
}

/// Publishes one event per partner client and waits until they are projected, so that measured
/// runs do not include the node's first connections. The events are on a customer of their own.
/// Returns how long the first acknowledgement took, from the call (just after the node started)
/// with the client's connection: what a partner sending at once to a just-started node waits.
///
/// # Errors
/// When a publish fails or the events are not projected within a minute.
pub async fn warm_up(node: &Node, shape: &Shape) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut first_ack = None;
    let store = node
        .store()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the node has no store"))?;
    let before = queryable(&store);
    let mut ingest = IngestServiceClient::connect(node.endpoint()).await?;
    for client in 0..shape.clients {
        let mut event = workload::touchpoint(0, 1, BASE_SECONDS);
        event.event_id = format!("bench-warm-up-{client}");
        event.customer_id = "bench-warm-up".to_owned();
        let request = authorized(
            v1::PublishRequest {
                events: vec![event],
                batch_id: String::new(),
            },
            &token(client),
        )?;
        let answer = ingest.publish(request).await?.into_inner();
        anyhow::ensure!(answer.accepted == 1, "warm-up event refused: {answer:?}");
        first_ack.get_or_insert_with(|| started.elapsed());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while queryable(&store) < before + shape.clients {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the warm-up events were not projected within a minute"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(first_ack.unwrap_or_default())
}

/// When each batch was (or was meant to be) sent, to measure acknowledgement latency.
type SendTimes = Arc<Mutex<HashMap<String, Instant>>>;

/// One partner: streams its events in batches with at most `window` unanswered. With `pace`
/// (the interval, and the instant the run's schedule starts, the same for every client),
/// batches are scheduled at fixed intervals (open loop) and latency counts from the schedule.
async fn partner(
    endpoint: String,
    client: usize,
    shape: Shape,
    pace: Option<(Duration, Instant)>,
    sampled: Option<tokio::sync::mpsc::UnboundedSender<(Instant, v1::Touchpoint)>>,
) -> anyhow::Result<Vec<Duration>> {
    let mut ingest = IngestServiceClient::connect(endpoint).await?;
    // This client's events, `client`, `client + K`, ..., in batches: made as they are sent, so
    // that the bench holds no list that grows with the events (its peak RSS is the node's).
    let own_events = shape
        .events
        .saturating_sub(client)
        .div_ceil(shape.clients.max(1));
    let batch_count = own_events.div_ceil(shape.batch_size.max(1));
    let (requests, outgoing) = tokio::sync::mpsc::channel(shape.window);
    let request = authorized(ReceiverStream::new(outgoing), &token(client))?;
    let mut answers = ingest.publish_stream(request).await?.into_inner();
    let send_times: SendTimes = Arc::default();
    let window = Arc::new(tokio::sync::Semaphore::new(shape.window));
    let sender = {
        let send_times = Arc::clone(&send_times);
        let window = Arc::clone(&window);
        let customers = shape.customers;
        let batch_size = shape.batch_size.max(1);
        let clients_usize = shape.clients.max(1);
        let clients = u32::try_from(shape.clients.max(1)).unwrap_or(u32::MAX);
        let client_number = u32::try_from(client).unwrap_or(u32::MAX);
        tokio::spawn(async move {
            // Partners are not synchronized: each client's schedule is offset by its share of
            // the interval from the run's common start, so that arrivals are spread evenly
            // rather than in bursts of K batches.
            // This client's interval and its own start.
            let schedule = pace
                .map(|(interval, start)| (interval, start + interval / clients * client_number));
            for number in 0..batch_count {
                // Made before the batch's time comes, so that making it is not counted.
                let first = number * batch_size;
                let events: Vec<v1::Touchpoint> = (first..(first + batch_size).min(own_events))
                    .map(|position| {
                        workload::touchpoint(
                            client + position * clients_usize,
                            customers,
                            BASE_SECONDS,
                        )
                    })
                    .collect();
                // Paced: latency counts from the schedule, also while the window holds the
                // batch back (open loop, no coordinated omission). At full speed: from when the
                // window lets the batch go, so that waiting for earlier answers is not counted
                // as this one's latency.
                let scheduled = match schedule {
                    Some((interval, started)) => {
                        let at = started
                            + interval.saturating_mul(u32::try_from(number).unwrap_or(u32::MAX));
                        tokio::time::sleep_until(at.into()).await;
                        Some(at)
                    }
                    None => None,
                };
                let permit = window.acquire().await?;
                permit.forget();
                let scheduled = scheduled.unwrap_or_else(Instant::now);
                if number % 2 == 0
                    && let (Some(sampled), Some(last)) = (&sampled, events.last())
                {
                    let _ = sampled.send((scheduled, last.clone()));
                }
                send_times
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(number.to_string(), scheduled);
                requests
                    .send(v1::PublishRequest {
                        events,
                        batch_id: number.to_string(),
                    })
                    .await?;
            }
            anyhow::Ok(())
        })
    };
    let mut latencies = Vec::new();
    while let Some(answer) = answers.message().await? {
        let sent = send_times
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&answer.batch_id);
        if let Some(sent) = sent {
            latencies.push(sent.elapsed());
        }
        anyhow::ensure!(
            answer.rejected == 0,
            "the server rejected {} events",
            answer.rejected
        );
        window.add_permits(1);
        if sender.is_finished()
            && send_times
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
        {
            break;
        }
    }
    sender.await??;
    Ok(latencies)
}

/// Throughput and acknowledgement latency of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub events: usize,
    /// The paced rate the clients' schedule offered (events per second), `None` at full speed.
    pub offered_per_second: Option<f64>,
    pub seconds: f64,
    /// Events per second from the first send until the last event was projected and flushed
    /// (queryable: `GetTimeline` serves durable entries).
    pub end_to_end_per_second: f64,
    /// Events per second from the first send until the last acknowledgement: above the
    /// end-to-end rate when the projector, not ingest, bounds the run.
    pub acknowledged_per_second: f64,
    /// Events projected and flushed when the last acknowledgement came.
    pub projected_when_acknowledged: usize,
    /// Events per second projected from the last acknowledgement to the end: the projector's rate
    /// with ingest no longer taking CPU (`None` when it had caught up by then).
    pub projected_after_ingest_per_second: Option<f64>,
    pub ack_latency: Percentiles,
    pub ingest_to_queryable: Percentiles,
    /// `GetTimeline` reads of a full page of 50 during the run.
    pub reads_during: Percentiles,
    pub reads_during_per_second: f64,
    /// Reads during the run that returned fewer than 50 entries (not in `reads_during`).
    pub reads_during_short: usize,
    /// The process's resident memory as the run's projected events passed each quarter of them.
    pub rss_projected: Vec<RssSample>,
    /// How resident memory grew per event projected from half the run's events to all of them
    /// (bytes): what the node keeps per event once its caches are warm, where the run is long
    /// enough for sled's cache to fill in its first half. The whole process's: with the embedded
    /// broker, its stored records too (up to about 5 MiB a partition), so read it with `--kafka`.
    /// `None` where the platform does not tell, or when one flush made the half and the last
    /// sample at once.
    pub rss_growth_bytes_per_event: Option<f64>,
}

/// The process's resident memory when `projected` events of a run were queryable.
#[derive(Debug, Clone, Serialize)]
pub struct RssSample {
    pub projected: usize,
    pub rss_mib: f64,
}

impl RssSample {
    /// Bytes of resident memory per event from `from` to `to`.
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    fn growth_per_event(from: &Self, to: &Self) -> Option<f64> {
        let events = to
            .projected
            .checked_sub(from.projected)
            .filter(|&n| n > 0)?;
        Some((to.rss_mib - from.rss_mib) * 1024.0 * 1024.0 / events as f64)
    }
}

/// How often the memory sampler looks at the projected count.
const RSS_POLL: Duration = Duration::from_millis(5);

/// Samples the process's resident memory (`VmRSS`) as the events projected after `already` pass
/// each quarter of `events`, until the last quarter or `stop`. Empty where the platform does not
/// tell.
async fn sample_rss(
    store: Arc<touchline_projection::SledStore>,
    already: usize,
    events: usize,
    stop: Stop,
) -> Vec<RssSample> {
    let mut samples = Vec::new();
    let mut poll = tokio::time::interval(RSS_POLL);
    let mut quarter = 1;
    loop {
        // Read before the count: a run stops once every event is projected, so a count read
        // after a stop is seen has them all.
        let stopped = stop.is_stopped();
        let projected = queryable(&store).saturating_sub(already);
        while quarter <= 4 && projected >= events * quarter / 4 {
            let Some(kib) = touchline::metrics::process_status_kib("VmRSS") else {
                return Vec::new();
            };
            #[allow(clippy::cast_precision_loss, reason = "KiB far below 2^52")]
            samples.push(RssSample {
                projected,
                rss_mib: kib as f64 / 1024.0,
            });
            quarter += 1;
        }
        if quarter > 4 || stopped {
            return samples;
        }
        poll.tick().await;
    }
}

/// How far ahead of its call a paced run's schedule starts.
const SCHEDULE_LEAD: Duration = Duration::from_millis(100);

/// One run: every partner at full speed (`rate` `None`) or paced at `rate` events per second.
///
/// # Errors
/// When a client or the node fails.
pub async fn run(node: &Node, shape: &Shape, rate: Option<f64>) -> anyhow::Result<Run> {
    let endpoint = node.endpoint();
    let store = node
        .store()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the node has no store"))?;
    let already = queryable(&store);
    // A paced run's schedule starts a little ahead, the same instant for every client, so that
    // their connections are open when their first batches are due.
    let started = Instant::now() + rate.map_or(Duration::ZERO, |_| SCHEDULE_LEAD);
    let pace = rate.map(|rate| {
        (
            Duration::from_secs_f64(shape.batch_size as f64 * shape.clients as f64 / rate.max(1.0)),
            started,
        )
    });
    let (sampled, samples) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(watch_queryable(endpoint.clone(), samples));
    let stop = Stop::default();
    let memory = tokio::spawn(sample_rss(
        Arc::clone(&store),
        already,
        shape.events,
        stop.clone(),
    ));
    let reading = readers(&endpoint, shape.readers, shape.customers, &stop);
    let partners: Vec<_> = (0..shape.clients)
        .map(|client| {
            tokio::spawn(partner(
                endpoint.clone(),
                client,
                shape.clone(),
                pace,
                rate.map(|_| sampled.clone()),
            ))
        })
        .collect();
    drop(sampled);
    let mut acks = Vec::new();
    for partner in partners {
        acks.extend(partner.await??);
    }
    let acknowledged = started.elapsed();
    let projected_when_acknowledged = queryable(&store).saturating_sub(already);
    let target = already + shape.events;
    // Every event was acknowledged; if the log stops growing short of them, the broker lost
    // records (the embedded mock keeps about 5 MiB per partition and drops older unread data).
    let mut last = (queryable(&store), Instant::now());
    while queryable(&store) < target {
        let now = queryable(&store);
        if now != last.0 {
            last = (now, Instant::now());
        }
        anyhow::ensure!(
            last.1.elapsed() < STALL,
            "only {now} of {target} events were projected, none for {}s: the broker dropped acknowledged records (the embedded mock cluster keeps about 5 MiB per partition; run larger presets with --kafka)",
            STALL.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    stop.stop();
    let rss_projected = memory.await?;
    let mut reads = crate::readers::Reads::default();
    for reader in reading {
        reads.absorb(reader.await??);
    }
    let mut queryable = watcher.await??;
    Ok(Run {
        events: shape.events,
        offered_per_second: rate,
        seconds: elapsed.as_secs_f64(),
        end_to_end_per_second: per_second(shape.events, elapsed),
        acknowledged_per_second: per_second(shape.events, acknowledged),
        projected_when_acknowledged,
        projected_after_ingest_per_second: (projected_when_acknowledged < shape.events).then(
            || {
                per_second(
                    shape.events - projected_when_acknowledged,
                    elapsed.saturating_sub(acknowledged),
                )
            },
        ),
        ack_latency: Percentiles::of(&mut acks),
        ingest_to_queryable: Percentiles::of(&mut queryable),
        reads_during_per_second: per_second(reads.full.len(), elapsed),
        reads_during: Percentiles::of(&mut reads.full),
        reads_during_short: reads.short,
        rss_growth_bytes_per_event: match rss_projected.as_slice() {
            [_, half, _, all] => RssSample::growth_per_event(half, all),
            _ => None,
        },
        rss_projected,
    })
}
