//! The projector's Prometheus metrics. Process-wide, like a default registry: a node registers
//! them in the registry it serves on `/metrics`.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A projection, as a label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ProjectionLabel {
    pub projection: String,
}

/// Counters and gauges of the projector, rebuilds and replays.
#[derive(Debug)]
pub struct ProjectorMetrics {
    pub applied: Counter,
    pub duplicates: Counter,
    pub dead_lettered: Counter,
    pub rebuild_done: Family<ProjectionLabel, Gauge>,
    pub rebuild_total: Family<ProjectionLabel, Gauge>,
    pub replayed: Counter,
    /// Records the topic's retention deleted before the projector read them: found when it
    /// resumes below a partition's oldest record, or when its consumer skips offsets while it
    /// runs (see `projector::gaps`).
    pub lost_to_retention: Counter,
    /// How long each group-commit flush of the store took (what every acknowledgement in dev
    /// mode, and every durable position, waits for).
    pub flush_seconds: Histogram,
    /// Errors the Kafka consumer reported to the projector (librdkafka retries by itself).
    pub consumer_errors: Counter,
}

pub static PROJECTOR: LazyLock<ProjectorMetrics> = LazyLock::new(|| ProjectorMetrics {
    applied: Counter::default(),
    duplicates: Counter::default(),
    dead_lettered: Counter::default(),
    rebuild_done: Family::default(),
    rebuild_total: Family::default(),
    replayed: Counter::default(),
    lost_to_retention: Counter::default(),
    // 100 us .. ~3 s.
    flush_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
    consumer_errors: Counter::default(),
});

/// Registers the projector's metrics.
pub fn register(registry: &mut Registry) {
    let metrics = &*PROJECTOR;
    registry.register(
        "touchline_projector_applied_events",
        "Events appended to the log and projected",
        metrics.applied.clone(),
    );
    registry.register(
        "touchline_projector_duplicate_events",
        "Events dropped because their (partner, event id) was already in the log",
        metrics.duplicates.clone(),
    );
    registry.register(
        "touchline_projector_dead_lettered_records",
        "Records that could not be decoded (or events of customers the node does not serve) and went to the dead-letter store",
        metrics.dead_lettered.clone(),
    );
    registry.register(
        "touchline_rebuild_done_events",
        "Log events folded into the version being rebuilt",
        metrics.rebuild_done.clone(),
    );
    registry.register(
        "touchline_rebuild_total_events",
        "Log events the running rebuild has to fold (grows while events arrive)",
        metrics.rebuild_total.clone(),
    );
    registry.register(
        "touchline_replay_read_records",
        "Records re-read from Kafka by replays",
        metrics.replayed.clone(),
    );
    registry.register(
        "touchline_projector_records_lost_to_retention",
        "Records the topic's retention deleted before the projector read them (it resumed below a partition's oldest record: after a stop longer than the retention, or from an old backup; or it fell further behind than the retention while running): events that never reached this node's log",
        metrics.lost_to_retention.clone(),
    );
    registry.register(
        "touchline_store_flush_seconds",
        "How long each flush of the store (sled) took: the projector's group commit",
        metrics.flush_seconds.clone(),
    );
    registry.register(
        "touchline_projector_consumer_errors",
        "Errors the Kafka consumer reported to the projector (librdkafka retries by itself): with a partition's touchline_consumer_lag growing and nothing projected, a batch it cannot read (corrupt, or not decompressible) may hold the partition",
        metrics.consumer_errors.clone(),
    );
}
