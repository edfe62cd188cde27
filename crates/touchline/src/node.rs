//! Wiring: builds every enabled role from the configuration, serves them on one gRPC listener and
//! shuts them down in order (stop accepting, drain in-flight acks, stop the projector, flush).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use touchline_core::EventStore;
use touchline_ingest::{Durability, IngestService, PartnerDirectory, Publisher};
use touchline_kafka::EmbeddedBroker;
use touchline_projection::ops::{KafkaProbe, Rebuilds};
use touchline_projection::{Projector, ProjectorOptions, SledStore};
use touchline_query::TimelineService;
use touchline_query::admin::{AdminContext, AdminService};
use tracing::{error, info, warn};

use crate::access::AccessTokens;
use crate::admin_auth;
use crate::config::Config;

mod admission;
mod cuttable;
mod ending;
mod health;
mod listener;
mod open_files;
mod own_thread;
mod signals;
mod throttle;
mod tls;
use tls::TlsServer;

pub(crate) use admission::register_metrics as register_connection_metrics;
use health::{NodeHealth, Roles, report_health};
pub use open_files::{OpenFiles, raise_open_files_limit};
use own_thread::spawn_on_own_thread;
pub use signals::{ShutdownSignals, ignore_hangups};
pub(crate) use throttle::Throttle;
pub(crate) use tls::register_metrics as register_tls_metrics;
use tonic_health::server::HealthReporter;

/// Which Kafka the node talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerChoice {
    /// Start the in-process mock cluster. It keeps data in memory only, so ingest acknowledges an
    /// event once it is durably in the local event log.
    Embedded,
    /// Use `kafka.bootstrap-servers`; ingest acknowledges once Kafka confirmed (`acks=all`).
    External,
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    local_addr: SocketAddr,
    target: crate::Target,
    server_shutdown: CancellationToken,
    /// Closes every connection of the gRPC server (the grace for in-flight calls is over).
    cut_connections: CancellationToken,
    projector_shutdown: CancellationToken,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    projector: Option<JoinHandle<touchline_projection::Result<()>>>,
    store: Option<Arc<SledStore>>,
    rebuilds: Option<Arc<Rebuilds>>,
    /// The admin service, whose replay a stop waits for.
    admin: Option<AdminService>,
    broker: Option<EmbeddedBroker>,
    shutdown_grace: Duration,
    shutdown_delay: Duration,
    health: NodeHealth,
    background: Vec<JoinHandle<()>>,
    background_shutdown: CancellationToken,
    /// The partners file's and TLS files' reloads: they go on until the server has stopped, so
    /// that a token or client CA revoked during the shutdown's delay and grace (calls are served
    /// meanwhile) is refused.
    reloads: Vec<JoinHandle<()>>,
    reloads_shutdown: CancellationToken,
    metrics_addr: Option<SocketAddr>,
    access: AccessTokens,
    /// Stops the server, the projector and the background tasks when the node is dropped without
    /// [`Node::shutdown`] (abruptly: nothing is drained). The projector runs on a thread of its
    /// own, which would otherwise outlive the node and keep the store open.
    _stop_on_drop: StopOnDrop,
}

impl Node {
    /// Starts every enabled role.
    ///
    /// # Errors
    /// When the store cannot be opened, Kafka cannot be reached, the topic is missing or the
    /// listener cannot bind.
    pub async fn start(
        config: Config,
        broker: BrokerChoice,
        partners: impl Into<PartnerDirectory>,
    ) -> anyhow::Result<Self> {
        Self::start_until(config, broker, partners, &CancellationToken::new())
            .await?
            .ok_or_else(|| anyhow::anyhow!("stopped during the start"))
    }

    /// [`Self::start`], given up when `stop` is cancelled first: `None` then, and the caller
    /// should exit (the process's `main` does): stopped before it served, the start stops what it
    /// started as it is dropped (the store is crash-safe), without waiting for the blocking Kafka
    /// calls under way or for the projector's thread. A start that failed fails, even when `stop`
    /// came meanwhile (while its projector stops, or at the same instant).
    ///
    /// # Errors
    /// As [`Self::start`].
    pub async fn start_until(
        config: Config,
        broker: BrokerChoice,
        partners: impl Into<PartnerDirectory>,
        stop: &CancellationToken,
    ) -> anyhow::Result<Option<Self>> {
        // Once the projector runs, a start that fails after it stops it and waits for it, so
        // that the store is closed (and unlocked) when the error is returned; the embedded broker
        // of a failed start stops after it (the projector does not lose its broker mid-batch).
        let mut projector = None;
        let mut embedded = None;
        let started = tokio::select! {
            biased;
            started = Self::start_roles(
                config,
                broker,
                partners.into(),
                &mut projector,
                &mut embedded,
            ) => started,
            () = stop.cancelled() => return Ok(None),
        };
        if started.is_err()
            && let Some((shutdown, task)) = projector.take()
        {
            shutdown.cancel();
            // Bounded: the projector ends with a flush, which sled 0.34 can wait in for ever;
            // the start's error is reported either way.
            if let Some(error) = within_flush_wait(task, "projector").await {
                warn!(error = format!("{error:#}"), "after the failed start");
            }
        }
        drop(embedded);
        started.map(Some)
    }

    async fn start_roles(
        mut config: Config,
        broker: BrokerChoice,
        partners: PartnerDirectory,
        projector_slot: &mut Option<(
            CancellationToken,
            JoinHandle<touchline_projection::Result<()>>,
        )>,
        embedded_slot: &mut Option<EmbeddedBroker>,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        let access = AccessTokens::new(&config, broker == BrokerChoice::Embedded);
        let tls = config
            .server
            .tls
            .as_ref()
            .map(TlsServer::load)
            .transpose()?;
        let server =
            listener::connection_settings(tonic::transport::Server::builder(), &config.server);
        anyhow::ensure!(
            broker != BrokerChoice::Embedded
                || config.projector.partitions.is_empty()
                || (0..config.kafka.partitions).all(|p| config.projector.partitions.contains(&p)),
            "on the embedded broker an event is acknowledged once this node's projector has it: projector.partitions must be empty (every partition) or name every partition"
        );
        // Bound first: a port in use fails the start before anything holds the store.
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.listen))?;
        *embedded_slot = match broker {
            BrokerChoice::Embedded => {
                let embedded =
                    EmbeddedBroker::start(1, &config.kafka.topic, config.kafka.partitions)?;
                config.kafka.bootstrap_servers = embedded.bootstrap_servers().to_owned();
                Some(embedded)
            }
            BrokerChoice::External => {
                let state = touchline_kafka::ensure_topic(&config.kafka)
                    .await
                    .with_context(|| format!("topic {} is not usable", config.kafka.topic))?;
                info!(topic = %config.kafka.topic, ?state, "topic ready");
                None
            }
        };

        let projector_shutdown = CancellationToken::new();
        let server_shutdown = CancellationToken::new();
        let cut_connections = CancellationToken::new();
        let background_shutdown = CancellationToken::new();
        let reloads_shutdown = CancellationToken::new();
        let projector_stopped = CancellationToken::new();
        // A start that fails half-way stops what it started (the projector, health, metrics); a
        // node dropped without shutdown stops everything the same way.
        let start_guard = StopOnDrop(vec![
            projector_shutdown.clone(),
            server_shutdown.clone(),
            cut_connections.clone(),
            background_shutdown.clone(),
            reloads_shutdown.clone(),
        ]);
        let probe = Arc::new(KafkaProbe::new(&config.kafka)?);
        let mut store = None;
        let mut applied_offsets = None;
        let mut catch_up = None;
        let mut admin = None;
        let mut rebuilds = None;
        if config.projector.enabled {
            let path = config.store.path.clone();
            let cache_bytes = config.store.cache_mib.saturating_mul(1024 * 1024);
            let opened =
                tokio::task::spawn_blocking(move || SledStore::open_with_cache(&path, cache_bytes))
                    .await?
                    .with_context(|| {
                        format!("cannot open the store in {}", config.store.path.display())
                    })?;
            let opened = Arc::new(opened);
            let options = ProjectorOptions {
                kafka: config.kafka.clone(),
                partitions: (!config.projector.partitions.is_empty())
                    .then(|| config.projector.partitions.clone()),
                max_batch: config.projector.max_batch,
                flush_stall: touchline_projection::projector::FLUSH_STALL,
            };
            let shared: Arc<dyn EventStore> = opened.clone();
            let (projector, handle) = Projector::new(options, shared)
                .await
                .context("cannot start the projector")?;
            applied_offsets = Some(handle.applied_offsets());
            let (projector_catch_up, caught_up) =
                health::CatchUp::new(handle.partitions().to_vec(), handle.applied_offsets());
            catch_up = Some(projector_catch_up);
            // Health and status learn of the end however it comes: a panic, or a thread whose
            // runtime could not start (the future is dropped unpolled).
            let stopped = projector_stopped.clone().drop_guard();
            let shutdown = projector_shutdown.clone();
            let task = spawn_on_own_thread("tl-consumer", async move {
                let _stopped = stopped;
                projector.run(shutdown).await
            })?;
            *projector_slot = Some((projector_shutdown.clone(), task));
            access.warn_if_admin_closed();
            let node_rebuilds = Arc::new(Rebuilds::new(
                Arc::clone(&opened),
                config.projector.rebuild_batch,
            ));
            admin = Some(AdminService::new(
                AdminContext {
                    store: Arc::clone(&opened),
                    rebuilds: Arc::clone(&node_rebuilds),
                    kafka: config.kafka.clone(),
                    probe: Arc::clone(&probe),
                    stream: handle.stream().clone(),
                    partitions: handle.partitions().to_vec(),
                    applied: handle.applied_offsets(),
                    projector_stopped: projector_stopped.clone(),
                    caught_up,
                    shutdown: server_shutdown.clone(),
                },
                admin_auth::authorizer(access.clone(), partners.clone()),
            ));
            rebuilds = Some(node_rebuilds);
            store = Some(opened);
        }

        let ingest = if config.ingest.enabled {
            let durability = match (broker, applied_offsets) {
                (BrokerChoice::Embedded, Some(applied)) => {
                    let shared: Arc<dyn EventStore> =
                        store.clone().ok_or_else(|| anyhow::anyhow!("no store"))?;
                    Durability::LocalLog(applied, shared)
                }
                (BrokerChoice::Embedded, None) => {
                    anyhow::bail!("the embedded broker needs the projector in the same process")
                }
                (BrokerChoice::External, _) => Durability::Broker,
            };
            let publisher = Publisher::new(
                &config.kafka,
                durability,
                Duration::from_millis(config.ingest.ack_timeout_ms),
            )?;
            Some(
                IngestService::new(
                    partners.clone(),
                    publisher,
                    config.ingest.options(),
                    server_shutdown.clone(),
                )
                .into_server(),
            )
        } else {
            None
        };
        let query = match (&store, config.query.enabled) {
            (Some(store), true) => {
                let shared: Arc<dyn EventStore> = store.clone();
                access.warn_if_query_open();
                let authorize = admin_auth::query_authorizer(access.clone(), partners.clone());
                Some(InterceptedService::new(
                    TimelineService::new(shared)
                        .with_owned_partitions(
                            config.kafka.partitions,
                            &config.projector.partitions,
                        )
                        .with_read_concurrency(config.query.read_concurrency)
                        .with_max_watches(config.query.max_watches)
                        .with_feed(store.watch_sender(), server_shutdown.clone())
                        .with_authorizer(Arc::clone(&authorize))
                        .into_server(),
                    on_headers(authorize),
                ))
            }
            _ => None,
        };
        let reporter = HealthReporter::new();
        // Its `Watch` streams end when the server stops (after NOT_SERVING and the delay).
        let health_service =
            tonic_health::pb::health_server::HealthServer::new(health::EndingWatches::new(
                &reporter,
                server_shutdown.clone(),
                health::MAX_HEALTH_WATCHES,
                health::MAX_HEALTH_WATCHES_PER_PEER,
            ));
        let roles = Roles {
            ingest: config.ingest.enabled,
            projector: config.projector.enabled,
            query: config.query.enabled,
        };
        let health = NodeHealth::start(reporter, roles).await;
        let mut background = Vec::new();
        let metrics_addr = match config.metrics.enabled.then_some(config.metrics.listen) {
            Some(listen) => {
                let (addr, task) =
                    crate::metrics::serve(listen, admin.clone(), background_shutdown.clone())
                        .await?;
                background.push(task);
                info!(%addr, "metrics on http://{addr}/metrics");
                Some(addr)
            }
            None => None,
        };
        background.push(tokio::spawn(report_health(
            health.clone(),
            Arc::clone(&probe),
            catch_up,
            projector_stopped,
            background_shutdown.clone(),
        )));

        let local_addr = listener.local_addr()?;
        let admin_handle = admin.clone();
        let router = listener::router(server, health_service, &server_shutdown)?
            .add_optional_service(ingest)
            .add_optional_service(query)
            .add_optional_service(admin.map(|admin| {
                let authorize = admin.authorizer();
                InterceptedService::new(admin.into_server(), on_headers(authorize))
            }));
        if let Some(rebuilds) = &rebuilds {
            // Started once nothing of the start can fail any more: shutdown stops and awaits it.
            rebuilds.drop_leftovers();
        }
        let mut reloads = Vec::new();
        if let Some(tls) = &tls {
            reloads.push(tls.watch(reloads_shutdown.clone()));
        }
        // Every role reads the partners file (admin and query calls tell a partner's token from
        // an unknown one), so every node reloads it; started once the start cannot fail.
        reloads.push(tokio::spawn(
            partners.clone().watch(reloads_shutdown.clone()),
        ));
        let server = listener::serve(
            router,
            listener,
            &config.server,
            tls.as_ref(),
            server_shutdown.clone(),
            &cut_connections,
        );
        info!(%local_addr, ingest = config.ingest.enabled, projector = config.projector.enabled, query = config.query.enabled, "touchline is serving");
        Ok(Self {
            local_addr,
            target: tls::own_target(local_addr, config.server.tls.as_ref()),
            server_shutdown,
            cut_connections,
            _stop_on_drop: start_guard,
            projector_shutdown,
            server: Some(server),
            projector: projector_slot.take().map(|(_, task)| task),
            store,
            rebuilds,
            admin: admin_handle,
            broker: embedded_slot.take(),
            shutdown_grace: Duration::from_millis(config.server.shutdown_grace_ms),
            shutdown_delay: Duration::from_millis(config.server.shutdown_delay_ms),
            health,
            background,
            background_shutdown,
            reloads,
            reloads_shutdown,
            metrics_addr,
            access,
        })
    }

    /// The address `/metrics` is served on, when enabled.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The address the gRPC server listens on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://ADDR`, or `https://ADDR` with `server.tls`, for clients.
    #[must_use]
    pub fn endpoint(&self) -> String {
        self.target.endpoint.clone()
    }

    /// The gRPC endpoint with the TLS settings this process's own clients use (over TLS, they
    /// trust the node's certificate file).
    #[must_use]
    pub fn target(&self) -> &crate::Target {
        &self.target
    }

    /// The admin and query tokens in force: [`crate::access::watch_config`] replaces them from
    /// the configuration file while the node runs.
    #[must_use]
    pub fn access(&self) -> &AccessTokens {
        &self.access
    }

    /// The local store, when the projector runs here.
    #[must_use]
    pub fn store(&self) -> Option<&Arc<SledStore>> {
        self.store.as_ref()
    }

    /// The embedded broker, when the node started one.
    #[must_use]
    pub fn embedded_broker(&self) -> Option<&EmbeddedBroker> {
        self.broker.as_ref()
    }

    /// Resolves when a role stops by itself (it failed) or the store failed a write: the node
    /// should then shut down.
    pub async fn failed(&mut self) -> anyhow::Error {
        let projector = async {
            match self.projector.as_mut() {
                Some(task) => Some(match task.await {
                    Ok(Ok(())) => anyhow::anyhow!("the projector stopped"),
                    Ok(Err(error)) => anyhow::Error::new(error).context("the projector failed"),
                    Err(error) => anyhow::Error::new(error).context("the projector panicked"),
                }),
                None => std::future::pending().await,
            }
        };
        let server = async {
            match self.server.as_mut() {
                Some(task) => Some(match task.await {
                    Ok(Ok(())) => anyhow::anyhow!("the gRPC server stopped"),
                    Ok(Err(error)) => anyhow::Error::new(error).context("the gRPC server failed"),
                    Err(error) => anyhow::Error::new(error).context("the gRPC server panicked"),
                }),
                None => std::future::pending().await,
            }
        };
        // A write that failed stops the node even where no projector write would see it (a
        // replay's, an admin call's): the store refuses writes from then on.
        let store = async {
            match self.store.as_ref() {
                Some(store) => {
                    store.failed().await;
                    anyhow::anyhow!(
                        "the store failed a write: {}",
                        store.failure().unwrap_or("unknown")
                    )
                }
                None => std::future::pending().await,
            }
        };
        // A finished task is taken out so that shutdown does not await it again.
        tokio::select! {
            error = projector => { self.projector = None; error.unwrap_or_else(|| anyhow::anyhow!("the projector stopped")) }
            error = server => { self.server = None; error.unwrap_or_else(|| anyhow::anyhow!("the gRPC server stopped")) }
            error = store => error,
        }
    }

    /// Graceful shutdown: stop accepting calls and let in-flight ones finish (their acks need the
    /// projector in dev mode, so it keeps running meanwhile), then stop the projector after its
    /// current batch, flush the store and stop the embedded broker. Every step runs even when an
    /// earlier one failed; the first failure is returned.
    ///
    /// # Errors
    /// When a role failed while stopping or the final flush failed.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        info!("shutting down: no new calls, draining in-flight ones");
        let mut errors: Vec<anyhow::Error> = Vec::new();
        // Health and metrics stop first (so that health cannot turn back to SERVING), then load
        // balancers are told to stop sending.
        self.background_shutdown.cancel();
        // `/metrics` waits for its connections: one stalled in the middle of a request (hyper
        // keeps it open) must not hold the shutdown before health even says NOT_SERVING.
        stop_within(self.background, "metrics, health").await;
        self.health.not_serving().await;
        if !self.shutdown_delay.is_zero() {
            // Load balancers and endpoint lists see NOT_SERVING (or the pod going) before the
            // listener closes; calls keep being served meanwhile.
            info!(
                delay_ms = self.shutdown_delay.as_millis(),
                "waiting before closing the listener"
            );
            tokio::time::sleep(self.shutdown_delay).await;
        }
        self.server_shutdown.cancel();
        // One grace for the calls and a replay's last batch together (a replay is told to stop
        // with the calls), so that the shutdown takes the delay and the grace, not twice the
        // grace; a replay still gets a moment past a grace the calls used up.
        let drain_deadline = tokio::time::Instant::now() + self.shutdown_grace;
        if let Some(mut server) = self.server {
            match tokio::time::timeout_at(drain_deadline, &mut server).await {
                Ok(joined) => errors.extend(failure(joined, "gRPC server")),
                Err(_) => {
                    warn!(
                        grace_ms = self.shutdown_grace.as_millis(),
                        "in-flight calls did not finish in time: closing their connections"
                    );
                    self.cut_connections.cancel();
                    match tokio::time::timeout(CUT_WAIT, &mut server).await {
                        Ok(joined) => errors.extend(failure(joined, "gRPC server")),
                        Err(_) => {
                            warn!("the gRPC server did not stop once its connections were closed");
                            server.abort();
                        }
                    }
                }
            }
        }
        // No call is served any more: the partners file and the TLS files need no reload.
        self.reloads_shutdown.cancel();
        stop_within(self.reloads, "partners file, TLS reload").await;
        if let Some(admin) = &self.admin {
            // A replay stops at its next batch (told when the server stopped); none is written
            // after the final flush.
            let replay_deadline =
                drain_deadline.max(tokio::time::Instant::now() + REPLAY_LAST_BATCH_WAIT);
            if tokio::time::timeout_at(replay_deadline, admin.replay_ended())
                .await
                .is_err()
            {
                warn!("a replay did not stop in time");
            }
        }
        if let Some(rebuilds) = &self.rebuilds {
            // An unfinished rebuild is cancelled: the active version stays as it is. Bounded like
            // the steps after it: a rebuild's switch flushes the store, which can hang.
            if tokio::time::timeout(FINAL_FLUSH_WAIT, rebuilds.shutdown())
                .await
                .is_err()
            {
                errors.push(anyhow::anyhow!(
                    "a rebuild did not stop within {} s (its store's flush does not end?)",
                    FINAL_FLUSH_WAIT.as_secs()
                ));
            }
        }
        self.projector_shutdown.cancel();
        if let Some(projector) = self.projector {
            // Bounded like the final flush below: the projector ends with its last flush.
            errors.extend(within_flush_wait(projector, "projector").await);
        }
        if let Some(store) = self.store {
            // Bounded: sled 0.34 can wait for ever in a flush (and in the one it makes when its
            // last handle goes, here) once a blob file of a large node could not be created (a
            // full disk, no descriptors): its write to the log is never counted as done. What
            // the flush did not make durable is read again from Kafka at the next start.
            let flushing = tokio::task::spawn_blocking(move || store.flush());
            errors.extend(within_flush_wait(flushing, "final flush").await);
        }
        drop(self.broker);
        for error in &errors {
            error!(error = format!("{error:#}"), "shutdown step failed");
        }
        match errors.into_iter().next() {
            Some(error) => Err(error),
            None => {
                info!("touchline stopped");
                Ok(())
            }
        }
    }
}

/// A call's token checked on its headers, before its body is read and decoded: a caller without
/// a valid token gets its `UNAUTHENTICATED` (or `PERMISSION_DENIED`) error whatever the body
/// holds, and costs no decoding.
fn on_headers(
    authorize: touchline_query::admin::Authorize,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |request| {
        authorize(request.metadata())?;
        Ok(request)
    }
}

/// How long a shutdown waits for the store's final flush (a few milliseconds when it works: the
/// projector's group commit has flushed all but its last batch).
const FINAL_FLUSH_WAIT: Duration = Duration::from_secs(30);

/// How long a shutdown waits for the background tasks (metrics, health reporting), and then for
/// the reloads (partners file, TLS files).
const BACKGROUND_STOP_WAIT: Duration = Duration::from_secs(1);

/// Awaits `tasks` (told to stop) for [`BACKGROUND_STOP_WAIT`] in all; those still running then
/// are ended, and awaited a moment ([`ABORTED_WAIT`]) once ended: a task being polled on another
/// thread as it is aborted (health reporting, in the middle of a write of SERVING) is done with
/// when this returns, unless its poll is stuck (a file read on a hung mount), which is left.
async fn stop_within(tasks: Vec<JoinHandle<()>>, what: &str) {
    let deadline = tokio::time::Instant::now() + BACKGROUND_STOP_WAIT;
    for mut task in tasks {
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            warn!(
                tasks = what,
                "a background task did not stop in time: ended"
            );
            task.abort();
            if tokio::time::timeout(ABORTED_WAIT, task).await.is_err() {
                warn!(
                    tasks = what,
                    "an ended background task is still running: left"
                );
            }
        }
    }
}

/// How long [`stop_within`] waits for a task it ended.
const ABORTED_WAIT: Duration = Duration::from_millis(200);

/// How long the gRPC server gets to end once its connections were closed: their calls' tasks end
/// as they see the connection gone.
const CUT_WAIT: Duration = Duration::from_secs(1);

/// How long a shutdown waits for a replay's last batch once the grace is used up.
const REPLAY_LAST_BATCH_WAIT: Duration = Duration::from_secs(1);

/// [`failure`] of `task`, a step that ends with a flush of the store, waited for at most
/// [`FINAL_FLUSH_WAIT`] (sled 0.34 can wait in a flush for ever): past it, an error of its own
/// (the task is left to run).
async fn within_flush_wait<E: std::error::Error + Send + Sync + 'static>(
    task: JoinHandle<Result<(), E>>,
    what: &str,
) -> Option<anyhow::Error> {
    match tokio::time::timeout(FINAL_FLUSH_WAIT, task).await {
        Ok(stopped) => failure(stopped, what),
        Err(_) => Some(anyhow::anyhow!(
            "the {what} did not end within {} s (a flush of the store that does not end?): what it had not made durable is read again from Kafka at the next start",
            FINAL_FLUSH_WAIT.as_secs()
        )),
    }
}

/// A stopped task's failure, if any: the error it returned, or its panic.
fn failure<E: std::error::Error + Send + Sync + 'static>(
    joined: Result<Result<(), E>, tokio::task::JoinError>,
    what: &str,
) -> Option<anyhow::Error> {
    match joined {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(anyhow::Error::new(error).context(format!("the {what} failed"))),
        Err(error) => Some(anyhow::Error::new(error).context(format!("the {what} panicked"))),
    }
}

/// Cancels its tokens when dropped.
#[derive(Debug)]
struct StopOnDrop(Vec<CancellationToken>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for token in &self.0 {
            token.cancel();
        }
    }
}
