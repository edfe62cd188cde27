//! The bench's readers on `TimelineService`: closed-loop `GetTimeline` readers of random
//! customers, the watches that see sampled events become queryable, and the reads after ingest.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use touchline::Node;
use touchline_proto::v1;
use touchline_proto::v1::timeline_service_client::TimelineServiceClient;

use crate::pipeline::Shape;
use crate::stats::{Percentiles, per_second};
use crate::workload;

/// A page's size for the readers, the issue's `GetTimeline` (50 entries).
pub(crate) const PAGE: usize = 50;

/// What readers measured: the latency of each read of a full page of [`PAGE`] entries, and how
/// many reads returned fewer (a customer with fewer entries yet, early in a run: not counted as
/// reads of 50).
#[derive(Debug, Default)]
pub(crate) struct Reads {
    pub(crate) full: Vec<Duration>,
    pub(crate) short: usize,
}

impl Reads {
    pub(crate) fn absorb(&mut self, other: Self) {
        self.full.extend(other.full);
        self.short += other.short;
    }
}

/// Timeline readers: random customers among the [`workload::read_customer`]s, pages of 50, until
/// `stop`.
pub(crate) fn readers(
    endpoint: &str,
    count: usize,
    customers: usize,
    stop: &Stop,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<Reads>>> {
    let read = workload::read_customers(customers);
    (0..count)
        .map(|reader| {
            let endpoint = endpoint.to_owned();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut timeline = TimelineServiceClient::connect(endpoint).await?;
                let mut reads = Reads::default();
                let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ (reader as u64 + 1);
                while !stop.is_stopped() {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let customer = workload::read_customer(
                        usize::try_from(state % read as u64).unwrap_or_default(),
                        customers,
                    );
                    let started = Instant::now();
                    let page = timeline
                        .get_timeline(v1::GetTimelineRequest {
                            customer_id: workload::customer_id(customer),
                            page_size: u32::try_from(PAGE).unwrap_or(u32::MAX),
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    let elapsed = started.elapsed();
                    if page.entries.len() == PAGE {
                        reads.full.push(elapsed);
                    } else {
                        reads.short += 1;
                    }
                }
                Ok(reads)
            })
        })
        .collect()
}

/// For each sampled event, a `WatchTimeline` of its customer, opened when the event is sent,
/// until the event comes on it: how long after its send it became queryable. The node sends a
/// watch the entries of each flush as soon as the flush that makes them durable, and so visible
/// to `GetTimeline`, completes (an entry already durable when the watch opens comes in its
/// catch-up). Watching instead of polling `GetTimeline` keeps the measurement from loading the
/// node: polls every millisecond made about a third more reads than the readers whose latency
/// the same phase measures.
pub(crate) async fn watch_queryable(
    endpoint: String,
    mut sampled: tokio::sync::mpsc::UnboundedReceiver<(Instant, v1::Touchpoint)>,
) -> anyhow::Result<Vec<Duration>> {
    let timeline: TimelineServiceClient<Channel> = TimelineServiceClient::connect(endpoint).await?;
    let mut watches = tokio::task::JoinSet::new();
    while let Some((sent, event)) = sampled.recv().await {
        let mut timeline = timeline.clone();
        watches.spawn(async move {
            let seen = async {
                let mut watch = timeline
                    .watch_timeline(v1::WatchTimelineRequest {
                        customer_id: event.customer_id.clone(),
                        cursor: String::new(),
                    })
                    .await?
                    .into_inner();
                while let Some(message) = watch.message().await? {
                    if let Some(v1::watch_timeline_response::Event::Entry(entry)) = message.event
                        && entry
                            .touchpoint
                            .is_some_and(|touchpoint| touchpoint.event_id == event.event_id)
                    {
                        return Ok(sent.elapsed());
                    }
                }
                anyhow::bail!("the watch of event {} ended before it came", event.event_id)
            };
            tokio::time::timeout(Duration::from_secs(60), seen)
                .await
                .map_err(|_| anyhow::anyhow!("event {} never became queryable", event.event_id))?
        });
    }
    let mut latencies = Vec::new();
    while let Some(latency) = watches.join_next().await {
        latencies.push(latency??);
    }
    Ok(latencies)
}

/// Timeline reads after ingest: `readers` readers for `duration`: the latency of reads of full
/// pages, their rate, and the number of short pages.
///
/// # Errors
/// When a read fails.
pub async fn reads_after(
    node: &Node,
    shape: &Shape,
    duration: Duration,
) -> anyhow::Result<(Percentiles, f64, usize)> {
    let stop = Stop::default();
    let reading = readers(
        &node.endpoint(),
        shape.readers.max(1),
        shape.customers,
        &stop,
    );
    tokio::time::sleep(duration).await;
    stop.stop();
    let mut reads = Reads::default();
    for reader in reading {
        reads.absorb(reader.await??);
    }
    let rate = per_second(reads.full.len(), duration);
    Ok((Percentiles::of(&mut reads.full), rate, reads.short))
}

/// A stop flag shared by reader tasks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stop(Arc<AtomicBool>);

impl Stop {
    pub(crate) fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}
