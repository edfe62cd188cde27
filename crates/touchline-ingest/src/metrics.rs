//! Ingest metrics: events accepted and rejected by partner and reason, produce latency.
//! Process-wide; a node registers them for `/metrics`.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use touchline_core::PartnerId;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EventLabels {
    pub partner: String,
    /// "accepted" or "rejected".
    pub outcome: &'static str,
    /// The rejection reason (an event's `RejectReason` or the call's `ErrorInfo` reason); empty
    /// for accepted events.
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ShedLabels {
    pub partner: String,
    /// `OVERLOADED` or `TOO_MANY_CALLS` (shed), or `BODY_TIMEOUT` (ended before its body came).
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AuthLabels {
    /// `ingest`, `admin` or `query`.
    pub service: &'static str,
    /// `TOKEN_MISSING`, `TOKEN_INVALID`, `TOKEN_EXPIRED`, `ADMIN_ONLY` or `INTERNAL_ONLY`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PartnerLabels {
    pub partner: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    /// "ok" or "failed".
    pub result: &'static str,
}

/// The ingest metrics.
#[derive(Debug)]
pub struct IngestMetrics {
    pub events: Family<EventLabels, Counter>,
    /// Unary calls shed before they were decoded (their events are unknown), by partner and
    /// reason.
    pub shed_calls: Family<ShedLabels, Counter>,
    pub produce_seconds: Histogram,
    /// Calls refused for their credentials when they open, by service and reason.
    pub auth_failures: Family<AuthLabels, Counter>,
    /// Reloads of the partners file, by result.
    pub partner_reloads: Family<ReloadLabels, Counter>,
    /// When the partners file in force was loaded (Unix seconds), and how many partners it has.
    pub partners_loaded_at: Gauge,
    pub partners: Gauge,
    /// `PublishStream` batches admitted and waiting for their partner's rate, its share of the
    /// calls or a server-wide slot, by partner.
    pub stream_batches_waiting: Family<PartnerLabels, Gauge>,
}

pub static INGEST: LazyLock<IngestMetrics> = LazyLock::new(|| IngestMetrics {
    partner_reloads: Family::default(),
    auth_failures: Family::default(),
    shed_calls: Family::default(),
    partners_loaded_at: Gauge::default(),
    partners: Gauge::default(),
    stream_batches_waiting: Family::default(),
    events: Family::default(),
    // 500 us .. ~16 s.
    produce_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
});

impl IngestMetrics {
    /// Counts `count` events of `partner` with an outcome and reason.
    pub fn count(
        &self,
        partner: &PartnerId,
        outcome: &'static str,
        reason: &'static str,
        count: u64,
    ) {
        if count > 0 {
            self.events
                .get_or_create(&EventLabels {
                    partner: partner.to_string(),
                    outcome,
                    reason,
                })
                .inc_by(count);
        }
    }

    /// Counts a call of `service` refused for its credentials, with the reason.
    pub fn count_auth_failure(&self, service: &'static str, reason: &'static str) {
        self.auth_failures
            .get_or_create(&AuthLabels { service, reason })
            .inc();
    }

    /// Counts a unary call of `partner` shed before it was decoded, with the reason.
    pub fn count_shed(&self, partner: &PartnerId, reason: &'static str) {
        self.shed_calls
            .get_or_create(&ShedLabels {
                partner: partner.to_string(),
                reason,
            })
            .inc();
    }

    /// Observes how long Kafka (or the local log, in dev mode) took to make a batch durable.
    pub fn observe_produce(&self, elapsed: Duration) {
        self.produce_seconds.observe(elapsed.as_secs_f64());
    }
}

/// Registers the ingest metrics.
pub fn register(registry: &mut Registry) {
    registry.register(
        "touchline_ingest_events",
        "Events received from partners, by partner, outcome and reason",
        INGEST.events.clone(),
    );
    registry.register(
        "touchline_ingest_produce_duration_seconds",
        "Time from producing a batch to every event of it being durable (acks=all)",
        INGEST.produce_seconds.clone(),
    );
    registry.register(
        "touchline_ingest_shed_calls",
        "Unary Publish calls refused before they were decoded, by partner and reason (OVERLOADED, TOO_MANY_CALLS, BODY_TIMEOUT)",
        INGEST.shed_calls.clone(),
    );
    registry.register(
        "touchline_auth_failures",
        "Calls refused for their credentials when they open, by service (ingest, admin, query) and reason",
        INGEST.auth_failures.clone(),
    );
    registry.register(
        "touchline_partners_reloads",
        "Reloads of the partners file by result (a failed one keeps the previous file in force)",
        INGEST.partner_reloads.clone(),
    );
    registry.register(
        "touchline_partners_loaded_timestamp_seconds",
        "When the partners file in force was loaded (Unix time; 0 without a partners file)",
        INGEST.partners_loaded_at.clone(),
    );
    registry.register(
        "touchline_partners",
        "Partners in the partners file in force",
        INGEST.partners.clone(),
    );
    registry.register(
        "touchline_ingest_stream_batches_waiting",
        "PublishStream batches admitted and waiting for their partner's rate, its share of the calls or a server-wide slot, by partner",
        INGEST.stream_batches_waiting.clone(),
    );
}
