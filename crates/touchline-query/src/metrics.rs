//! Query metrics: latency per method, and store reads waiting for a permit. Process-wide; a node
//! registers them for `/metrics`.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: &'static str,
}

type Latency = Family<MethodLabel, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    // 100 us .. ~3 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

pub static QUERY_SECONDS: LazyLock<Latency> =
    LazyLock::new(|| Family::new_with_constructor(histogram as fn() -> Histogram));

/// Store reads waiting for a permit (`query.read-concurrency`): above zero, the bound is what
/// keeps reads from going faster.
pub static READS_WAITING: LazyLock<Gauge> = LazyLock::new(Gauge::default);

/// Open `WatchTimeline` streams.
pub static WATCHES: LazyLock<Gauge> = LazyLock::new(Gauge::default);

/// Watches ended with `WATCH_LAGGED` (their client read too slowly).
pub static WATCHES_LAGGED: LazyLock<prometheus_client::metrics::counter::Counter> =
    LazyLock::new(Default::default);

/// How a backup ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BackupLabel {
    /// `done` (the whole file was sent), `stopped` (the caller went away or stalled, or the node
    /// stopped) or `failed` (the store failed).
    pub outcome: &'static str,
}

/// Backups served, by how they ended.
pub static BACKUPS: LazyLock<Family<BackupLabel, prometheus_client::metrics::counter::Counter>> =
    LazyLock::new(Family::default);

/// When the last whole backup was taken (its cut), in Unix seconds; 0 before the first.
pub static LAST_BACKUP: LazyLock<Gauge> = LazyLock::new(Gauge::default);

/// Events in the last whole backup.
pub static LAST_BACKUP_EVENTS: LazyLock<Gauge> = LazyLock::new(Gauge::default);

/// Observes the time since `started` for `method`.
pub fn observe(method: &'static str, started: Instant) {
    QUERY_SECONDS
        .get_or_create(&MethodLabel { method })
        .observe(started.elapsed().as_secs_f64());
}

/// Registers the query metrics.
pub fn register(registry: &mut Registry) {
    registry.register(
        "touchline_query_duration_seconds",
        "Time to answer a TimelineService call",
        QUERY_SECONDS.clone(),
    );
    registry.register(
        "touchline_query_reads_waiting",
        "Store reads waiting for a permit (query.read-concurrency)",
        READS_WAITING.clone(),
    );
    registry.register(
        "touchline_query_watches",
        "Open WatchTimeline streams",
        WATCHES.clone(),
    );
    registry.register(
        "touchline_query_watches_lagged",
        "WatchTimeline streams ended with WATCH_LAGGED: their client read too slowly, or their catch-up took long",
        WATCHES_LAGGED.clone(),
    );
    registry.register(
        "touchline_backups",
        "Backups served (AdminService.Backup), by outcome: done, stopped or failed",
        BACKUPS.clone(),
    );
    registry.register(
        "touchline_backup_last_success_timestamp_seconds",
        "When the last whole backup served by this process was taken (Unix seconds; 0 before the first)",
        LAST_BACKUP.clone(),
    );
    registry.register(
        "touchline_backup_last_success_events",
        "Events in the last whole backup served by this process",
        LAST_BACKUP_EVENTS.clone(),
    );
}
