//! The node's standard gRPC health: each service's status follows what it depends on (Kafka for
//! ingest, the projector for the timeline and admin services, and for the timeline service the
//! projector's catch-up with the log after a start), re-checked every few seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::HealthReporter;
use touchline_projection::AppliedOffsets;
use touchline_projection::ops::KafkaProbe;
use tracing::info;

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

/// What a projector must reach after a start before its queries are ready: every partition it
/// owns projected up to the high watermark the broker first told after the start. A replica
/// started from an empty store (or one far behind) is not sent queries while it reads the log
/// again. Once caught up it stays ready: later lag is normal operation, shown by the lag metrics.
pub(super) struct CatchUp {
    partitions: Vec<i32>,
    applied: AppliedOffsets,
    /// Set once caught up, for the admin status.
    done: Arc<AtomicBool>,
}

impl CatchUp {
    /// The catch-up of `partitions`, and the flag it sets once caught up.
    pub(super) fn new(partitions: Vec<i32>, applied: AppliedOffsets) -> (Self, Arc<AtomicBool>) {
        let done = Arc::new(AtomicBool::new(false));
        let catch_up = Self {
            partitions,
            applied,
            done: Arc::clone(&done),
        };
        (catch_up, done)
    }
}

/// Whether `applied` (the first offset not yet projected, per partition) reached `target` (the
/// low and high watermarks per partition). A partition without an applied offset is read from
/// its beginning: nothing below its low watermark is left to read.
fn caught_up(target: &BTreeMap<i32, (i64, i64)>, applied: &BTreeMap<i32, i64>) -> bool {
    target.iter().all(|(partition, (low, high))| {
        applied.get(partition).copied().unwrap_or(*low).max(*low) >= *high
    })
}

/// Keeps the standard gRPC health service true: ingest is SERVING while Kafka answers, the
/// admin service while the projector runs, the timeline service while it runs once it has caught
/// up ([`CatchUp`]), the node ("") when all of its roles are.
pub(super) async fn report_health(
    health: NodeHealth,
    probe: Arc<KafkaProbe>,
    catch_up: Option<CatchUp>,
    projector_stopped: CancellationToken,
    shutdown: CancellationToken,
) {
    // The watermarks to reach, from the first probe that answers; none to reach without a
    // projector.
    let mut target: Option<BTreeMap<i32, (i64, i64)>> = None;
    let mut ready = catch_up.is_none();
    let NodeHealth {
        reporter: health,
        roles,
    } = health;
    let status = |up: bool| {
        if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    let mut reported = BTreeMap::new();
    loop {
        let probing = Arc::clone(&probe);
        // A probe of a slow broker (up to its timeout) does not hold the shutdown: the reporting
        // stops at once and the probe's thread ends on its own.
        let kafka_up = tokio::select! {
            () = shutdown.cancelled() => return,
            up = tokio::task::spawn_blocking(move || probing.reachable(HEALTH_PROBE_TIMEOUT)) => {
                up.unwrap_or(false)
            }
        };
        let projector_up = roles.projector && !projector_stopped.is_cancelled();
        if !ready && let Some(catch_up) = &catch_up {
            if target.is_none() {
                let probing = Arc::clone(&probe);
                let partitions = catch_up.partitions.clone();
                let watermarks = tokio::task::spawn_blocking(move || {
                    probing.watermarks(&partitions, HEALTH_PROBE_TIMEOUT)
                });
                target = tokio::select! {
                    () = shutdown.cancelled() => return,
                    watermarks = watermarks => watermarks.ok().flatten(),
                };
            }
            if let Some(target) = &target {
                ready = caught_up(target, &catch_up.applied.borrow());
                if ready {
                    catch_up.done.store(true, Ordering::Release);
                    info!("the projector caught up with the log as of the start: serving queries");
                }
            }
        }
        let mut desired = Vec::new();
        if roles.ingest {
            desired.push((INGEST_SERVICE, status(kafka_up)));
        }
        if roles.query {
            desired.push((TIMELINE_SERVICE, status(projector_up && ready)));
        }
        if roles.projector {
            desired.push((ADMIN_SERVICE, status(projector_up)));
        }
        desired.push((
            "",
            status(kafka_up && (!roles.projector || (projector_up && (ready || !roles.query)))),
        ));
        for (service, serving) in changes(&mut reported, desired) {
            health.set_service_status(service, serving).await;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
    }
}

/// The statuses of `desired` that differ from those `reported` (every one the first time), noted
/// as reported: the health service sends a message to every `Watch` on each status it is given,
/// and the gRPC health protocol sends one per change, not one per probe.
fn changes(
    reported: &mut BTreeMap<&'static str, ServingStatus>,
    desired: Vec<(&'static str, ServingStatus)>,
) -> Vec<(&'static str, ServingStatus)> {
    desired
        .into_iter()
        .filter(|(service, serving)| reported.insert(service, *serving) != Some(*serving))
        .collect()
}

/// The node's health: the reporter of the standard health service, and the roles it reports on.
#[derive(Clone)]
pub(super) struct NodeHealth {
    reporter: HealthReporter,
    roles: Roles,
}

impl std::fmt::Debug for NodeHealth {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NodeHealth")
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

impl NodeHealth {
    /// Health at start: the node ("") is not serving until the first probe says so
    /// (tonic-health starts it as SERVING), and is alive.
    pub(super) async fn start(reporter: HealthReporter, roles: Roles) -> Self {
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        Self { reporter, roles }
    }

    /// The node and each service it runs NOT_SERVING (one it does not run stays unknown):
    /// at shutdown, once the reporting has stopped (so that it cannot turn a service back to
    /// SERVING), for load balancers to stop sending.
    pub(super) async fn not_serving(&self) {
        let roles = self.roles;
        for (service, runs) in [
            ("", true),
            (INGEST_SERVICE, roles.ingest),
            (TIMELINE_SERVICE, roles.query),
            (ADMIN_SERVICE, roles.projector),
        ] {
            if runs {
                self.reporter
                    .set_service_status(service, ServingStatus::NotServing)
                    .await;
            }
        }
    }
}

/// `Health.Watch` streams open at once on a node: as many as its default `server.max-connections`.
pub(super) const MAX_HEALTH_WATCHES: usize = 10_000;
/// Of them, what one peer address may hold: a client watches a few services per channel.
pub(super) const MAX_HEALTH_WATCHES_PER_PEER: usize = 100;

/// The standard health service, whose `Watch` streams end when the server stops, with the status
/// in force then (NOT_SERVING): a client watching (client-side health checking) would otherwise
/// hold the server's graceful stop for the whole grace period. At most `max_watches` of them are
/// open at once, and `per_peer` of one peer address (more are answered UNIMPLEMENTED, see below):
/// they need no token and last until the client goes, so the connections' limits times HTTP/2's
/// streams a connection (hundreds of thousands from one address) would be their only bound, and
/// one peer could take every place.
pub(super) struct EndingWatches {
    inner: Arc<tonic_health::server::HealthService>,
    stopped: CancellationToken,
    watches: Arc<tokio::sync::Semaphore>,
    per_peer: crate::peers::PerPeer,
    /// Of the node-wide limit's refusals.
    throttle: std::sync::Mutex<crate::node::Throttle>,
}

impl EndingWatches {
    pub(super) fn new(
        reporter: &HealthReporter,
        stopped: CancellationToken,
        max_watches: usize,
        per_peer: usize,
    ) -> Self {
        Self {
            inner: Arc::new(tonic_health::server::HealthService::from_health_reporter(
                reporter.clone(),
            )),
            stopped,
            watches: Arc::new(tokio::sync::Semaphore::new(
                max_watches.min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            per_peer: crate::peers::PerPeer::new(per_peer, "health-watches-per-peer"),
            throttle: std::sync::Mutex::default(),
        }
    }
}

#[tonic::async_trait]
impl Health for EndingWatches {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.inner.check(request).await
    }

    type WatchStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>,
    >;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        use futures::StreamExt as _;
        // Past a limit, UNIMPLEMENTED: gRPC's client-side health checking (gRFC A17) then takes
        // the server as one without health checking and uses the channel as healthy, where any
        // other status would make it take a healthy node for a down one.
        let past = |what: &str| {
            tonic::Status::unimplemented(format!(
                "every health watch {what} is open: use Check (a client-side health checker stops watching on this connection)"
            ))
        };
        // Held by the stream until it is dropped. (A call whose peer's address is gone, that of
        // a connection already closed, has no address to count.)
        let peer_place = match request.remote_addr() {
            Some(peer) => Some(
                self.per_peer
                    .take(peer.ip())
                    .ok_or_else(|| past("one address may hold at once"))?,
            ),
            None => None,
        };
        let open = Arc::clone(&self.watches).try_acquire_owned().map_err(|_| {
            crate::peers::refused(
                "health-watches",
                &self.throttle,
                request.remote_addr().map(|peer| peer.ip()),
            );
            past("this node serves at once")
        })?;
        let service = request.get_ref().service.clone();
        let statuses = self.inner.watch(request).await?.into_inner();
        let inner = Arc::clone(&self.inner);
        // The last word: the status once the server stops, whether or not the stream had sent it.
        let last = futures::stream::once(async move {
            inner
                .check(tonic::Request::new(HealthCheckRequest { service }))
                .await
                .map(tonic::Response::into_inner)
        });
        Ok(tonic::Response::new(Box::pin(
            statuses
                .take_until(self.stopped.clone().cancelled_owned())
                .chain(last)
                .map(move |status| {
                    let _open = (&open, &peer_place);
                    status
                }),
        )))
    }
}

#[cfg(test)]
mod tests {

    /// Health watches past the node's limit, or past one address's, are refused until one goes.
    #[tokio::test]
    async fn at_most_max_watches_health_watches_are_open() {
        let (reporter, _) = tonic_health::server::health_reporter();
        let health = EndingWatches::new(&reporter, CancellationToken::new(), 3, 2);
        let watch = |peer: &str| {
            let mut request = tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            });
            request
                .extensions_mut()
                .insert(tonic::transport::server::TcpConnectInfo {
                    local_addr: None,
                    remote_addr: Some(peer.parse().expect("an address")),
                });
            health.watch(request)
        };
        let first = watch("10.0.0.1:1").await.expect("under the limits");
        let _second = watch("10.0.0.1:2").await.expect("under the limits");
        // One address holds at most its share.
        let refused = watch("10.0.0.1:3")
            .await
            .err()
            .expect("past the peer's limit");
        assert_eq!(refused.code(), tonic::Code::Unimplemented);
        assert!(refused.message().contains("one address"), "{refused:?}");
        let _third = watch("10.0.0.2:1").await.expect("another peer");
        // And the node at most its limit.
        let refused = watch("10.0.0.3:1")
            .await
            .err()
            .expect("past the node's limit");
        assert_eq!(refused.code(), tonic::Code::Unimplemented);
        assert!(refused.message().contains("this node"), "{refused:?}");
        drop(first);
        assert!(
            watch("10.0.0.1:4").await.is_ok(),
            "a watch that went gave its places back"
        );
    }

    #[test]
    fn a_status_is_reported_when_it_changes_not_at_every_probe() {
        let mut reported = BTreeMap::new();
        let serving = ServingStatus::Serving;
        let not = ServingStatus::NotServing;
        assert_eq!(
            changes(&mut reported, vec![("", not), ("ingest", serving)]),
            [("", not), ("ingest", serving)]
        );
        assert_eq!(
            changes(&mut reported, vec![("", not), ("ingest", serving)]),
            []
        );
        assert_eq!(
            changes(&mut reported, vec![("", serving), ("ingest", serving)]),
            [("", serving)]
        );
    }

    use super::*;

    #[test]
    fn caught_up_means_every_partition_projected_to_its_high_watermark() {
        let target = BTreeMap::from([(0, (0, 10)), (1, (5, 5)), (2, (100, 120))]);
        // Partition 2 not read yet: it starts at its low watermark, 20 short.
        assert!(!caught_up(&target, &BTreeMap::from([(0, 10)])));
        assert!(!caught_up(&target, &BTreeMap::from([(0, 9), (2, 120)])));
        // An empty partition (1) needs nothing; an offset past the mark is fine (a later one).
        assert!(caught_up(&target, &BTreeMap::from([(0, 10), (2, 125)])));
        assert!(caught_up(&BTreeMap::new(), &BTreeMap::new()));
    }
}
