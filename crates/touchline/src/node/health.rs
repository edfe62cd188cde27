//! The node's standard gRPC health: each service's status follows what it depends on (Kafka for
//! ingest, the projector for the timeline and admin services), re-checked every few seconds.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use touchline_projection::ops::KafkaProbe;

/// How often health reflects Kafka connectivity and the projector's state.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The gRPC services whose health is reported (besides "" for the whole node).
const INGEST_SERVICE: &str = "touchline.v1.IngestService";
const TIMELINE_SERVICE: &str = "touchline.v1.TimelineService";
const ADMIN_SERVICE: &str = "touchline.v1.AdminService";
/// SERVING while the process serves at all, whatever Kafka or the projector do: for liveness
/// probes, which should not restart a node because Kafka is away.
const LIVENESS: &str = "liveness";

/// The roles a node runs, for health.
#[derive(Debug, Clone, Copy)]
pub(super) struct Roles {
    pub(super) ingest: bool,
    pub(super) projector: bool,
    pub(super) query: bool,
}

/// Keeps the standard gRPC health service true: ingest is SERVING while Kafka answers, the
/// timeline and admin services while the projector runs, the node ("") when all of its roles are.
pub(super) async fn report_health(
    health: HealthReporter,
    probe: Arc<KafkaProbe>,
    roles: Roles,
    projector_stopped: CancellationToken,
    shutdown: CancellationToken,
) {
    let status = |up: bool| {
        if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    loop {
        let probing = Arc::clone(&probe);
        let kafka_up = tokio::task::spawn_blocking(move || probing.reachable(HEALTH_PROBE_TIMEOUT))
            .await
            .unwrap_or(false);
        if shutdown.is_cancelled() {
            return;
        }
        let projector_up = roles.projector && !projector_stopped.is_cancelled();
        if roles.ingest {
            health
                .set_service_status(INGEST_SERVICE, status(kafka_up))
                .await;
        }
        if roles.query {
            health
                .set_service_status(TIMELINE_SERVICE, status(projector_up))
                .await;
        }
        if roles.projector {
            health
                .set_service_status(ADMIN_SERVICE, status(projector_up))
                .await;
        }
        health
            .set_service_status("", status(kafka_up && (projector_up || !roles.projector)))
            .await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
    }
}

/// Every service NOT_SERVING: at shutdown, once the reporting has stopped (so that it cannot turn
/// a service back to SERVING), for load balancers to stop sending.
/// Health at start: the node ("") is not serving until the first probe says so (tonic-health
/// starts it as SERVING), and is alive.
pub(super) async fn starting(health: &HealthReporter) {
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
}

pub(super) async fn not_serving(health: &HealthReporter) {
    for service in ["", INGEST_SERVICE, TIMELINE_SERVICE, ADMIN_SERVICE] {
        health
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
}
