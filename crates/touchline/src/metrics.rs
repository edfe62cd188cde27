//! `GET /metrics` in the Prometheus text format: the process-wide metrics of every role, plus
//! gauges read at scrape time from the pipeline's status (lag per partition, log size, dead
//! letters, Kafka reachability).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use touchline_query::admin::AdminService;
use tracing::warn;

mod listener;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PartitionLabel {
    partition: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
}

/// When the process started: forced first thing in `main`.
pub static PROCESS_STARTED: std::sync::LazyLock<std::time::SystemTime> =
    std::sync::LazyLock::new(std::time::SystemTime::now);

/// The process: its version, when it started, and its resident memory (read at scrape time).
#[derive(Debug, Default)]
struct ProcessGauges {
    build_info: Family<BuildLabel, Gauge>,
    start_time: Gauge,
    resident_bytes: Gauge,
}

impl ProcessGauges {
    fn register(&self, registry: &mut Registry) {
        self.build_info
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let started = PROCESS_STARTED
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        self.start_time
            .set(i64::try_from(started).unwrap_or(i64::MAX));
        registry.register(
            "touchline_build_info",
            "1, labelled with the running Touchline's version",
            self.build_info.clone(),
        );
        registry.register(
            "touchline_process_start_time_seconds",
            "When the process started (Unix time)",
            self.start_time.clone(),
        );
        registry.register(
            "touchline_process_resident_memory_bytes",
            "Resident memory of the process (Linux: VmRSS; 0 elsewhere)",
            self.resident_bytes.clone(),
        );
    }

    fn refresh(&self) {
        self.resident_bytes.set(resident_bytes().unwrap_or(0));
    }
}

/// The process's resident memory, from `/proc/self/status` (Linux).
fn resident_bytes() -> Option<i64> {
    i64::try_from(process_status_kib("VmRSS")?)
        .ok()?
        .checked_mul(1024)
}

/// A KiB figure of `/proc/self/status` (`VmRSS`, `VmHWM`...), where the platform has one.
#[must_use]
pub fn process_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?;
    value.split_whitespace().next()?.parse().ok()
}

/// Gauges refreshed from the status on each scrape.
#[derive(Debug, Default)]
struct StatusGauges {
    lag: Family<PartitionLabel, Gauge>,
    high_watermark: Family<PartitionLabel, Gauge>,
    projected: Family<PartitionLabel, Gauge>,
    log_events: Gauge,
    log_durable_events: Gauge,
    store_bytes: Gauge,
    dead_letters: Gauge,
    kafka_up: Gauge,
    projector_up: Gauge,
}

/// What the endpoint serves.
struct Exporter {
    registry: Registry,
    gauges: StatusGauges,
    process: ProcessGauges,
    admin: Option<AdminService>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Exporter").finish_non_exhaustive()
    }
}

fn build(admin: Option<AdminService>) -> Exporter {
    let mut registry = Registry::default();
    touchline_ingest::metrics::register(&mut registry);
    touchline_projection::metrics::register(&mut registry);
    touchline_query::metrics::register(&mut registry);
    crate::access::register_metrics(&mut registry);
    crate::node::register_tls_metrics(&mut registry);
    crate::node::register_connection_metrics(&mut registry);
    crate::peers::register_metrics(&mut registry);
    let gauges = StatusGauges::default();
    if admin.is_some() {
        register_status(&mut registry, &gauges);
    }
    let process = ProcessGauges::default();
    process.register(&mut registry);
    Exporter {
        registry,
        gauges,
        process,
        admin,
    }
}

/// The gauges read from the status: only on nodes that run the projector (they have one).
fn register_status(registry: &mut Registry, gauges: &StatusGauges) {
    registry.register(
        "touchline_consumer_lag",
        "Records in the partition not yet durably projected (high watermark - projected offset)",
        gauges.lag.clone(),
    );
    registry.register(
        "touchline_partition_high_watermark",
        "The broker's high watermark of the partition",
        gauges.high_watermark.clone(),
    );
    registry.register(
        "touchline_partition_projected_offset",
        "The next offset durably projected",
        gauges.projected.clone(),
    );
    registry.register(
        "touchline_log_events",
        "Events in the local append-only log",
        gauges.log_events.clone(),
    );
    registry.register(
        "touchline_log_durable_events",
        "Events of the local log flushed to disk (what queries show)",
        gauges.log_durable_events.clone(),
    );
    registry.register(
        "touchline_store_bytes",
        "Size of the local sled store on disk",
        gauges.store_bytes.clone(),
    );
    registry.register(
        "touchline_dead_letters",
        "Records in the dead-letter store",
        gauges.dead_letters.clone(),
    );
    registry.register(
        "touchline_kafka_up",
        "1 when the broker answered the last status's watermark requests (for at least one partition)",
        gauges.kafka_up.clone(),
    );
    registry.register(
        "touchline_projector_up",
        "1 while the projector runs",
        gauges.projector_up.clone(),
    );
}

impl Exporter {
    fn refresh(&self) {
        self.process.refresh();
        let Some(admin) = &self.admin else { return };
        match admin.status() {
            Ok(status) => {
                for partition in &status.partitions {
                    let label = PartitionLabel {
                        partition: partition.partition,
                    };
                    self.gauges.lag.get_or_create(&label).set(partition.lag);
                    self.gauges
                        .high_watermark
                        .get_or_create(&label)
                        .set(partition.high_watermark);
                    self.gauges
                        .projected
                        .get_or_create(&label)
                        .set(partition.projected_offset);
                }
                let count = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
                self.gauges.log_events.set(count(status.log_events));
                self.gauges
                    .log_durable_events
                    .set(count(status.log_durable_events));
                self.gauges.store_bytes.set(count(status.store_bytes));
                self.gauges.dead_letters.set(count(status.dead_letters));
                self.gauges.kafka_up.set(i64::from(status.kafka_reachable));
                self.gauges
                    .projector_up
                    .set(i64::from(status.projector_state == "running"));
            }
            Err(error) => {
                // The status could not be read (a store error). The per-partition series go, so
                // that a lag alert sees no value rather than a frozen one, and the projector reads
                // down. The log, store and dead-letter gauges and `kafka_up` keep their last
                // values (the broker was not asked: this is not its failure).
                warn!(%error, "cannot read the status for metrics");
                self.gauges.lag.clear();
                self.gauges.high_watermark.clear();
                self.gauges.projected.clear();
                self.gauges.projector_up.set(0);
            }
        }
    }

    fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// How long a scrape waits for the one refreshing before it (a refresh asks the broker for up to
/// 1.5 s).
const SCRAPE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a scrape's text serves the scrapes that come after it.
const SCRAPE_REUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// The last scrape's text and when it was made. Scrapes run one at a time under its lock: each
/// reads the node's status (the store, and the broker for up to 1.5 s) on a blocking thread, so
/// that many clients of `/metrics` (or one scraping in a loop) hold one thread, not one each,
/// and those that come within [`SCRAPE_REUSE`] get the same text. The refresh holds the lock, not
/// the request: a client that leaves during a refresh does not let another start beside it (one
/// that connects and leaves in a loop would otherwise fill the blocking pool with status reads
/// waiting for a slow broker, and every blocking task of the node behind them).
type LastScrape = tokio::sync::Mutex<Option<(std::time::Instant, Arc<str>)>>;

async fn scrape(exporter: Arc<Exporter>, last: Arc<LastScrape>) -> axum::response::Response {
    match scrape_with(last, SCRAPE_LOCK_WAIT, move || {
        exporter.refresh();
        exporter.encode()
    })
    .await
    {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text.to_string(),
        )
            .into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, error).into_response(),
    }
}

/// The text of a scrape: the last one's within [`SCRAPE_REUSE`], else `refresh`'s, run on a
/// blocking thread that holds `last` until it ends; waits for the refresh before it up to `wait`
/// ([`SCRAPE_LOCK_WAIT`]).
async fn scrape_with(
    last: Arc<LastScrape>,
    wait: std::time::Duration,
    refresh: impl FnOnce() -> Result<String, std::fmt::Error> + Send + 'static,
) -> Result<Arc<str>, String> {
    // A refresh stuck past `wait` (a store call that does not return) fails the scrapes behind
    // it, rather than holding each for ever.
    let mut last = tokio::time::timeout(wait, last.lock_owned())
        .await
        .map_err(|_| {
            format!(
                "the node's status has not been read for {} ms: a refresh does not end",
                wait.as_millis()
            )
        })?;
    if let Some((at, text)) = last.as_ref()
        && at.elapsed() < SCRAPE_REUSE
    {
        return Ok(Arc::clone(text));
    }
    tokio::task::spawn_blocking(move || {
        let text: Arc<str> = refresh().map_err(|error| error.to_string())?.into();
        *last = Some((std::time::Instant::now(), Arc::clone(&text)));
        Ok(text)
    })
    .await
    .map_err(|error| error.to_string())?
}

/// Serves `/metrics` on `listen` until `shutdown`; returns the bound address and the task.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    listen: SocketAddr,
    admin: Option<AdminService>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let exporter = Arc::new(build(admin));
    let last = Arc::new(LastScrape::default());
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || scrape(Arc::clone(&exporter), Arc::clone(&last))),
    );
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for metrics on {listen}"))?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let served = axum::serve(listener::Capped::new(listener), app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            warn!(%error, "the metrics endpoint stopped");
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A refresh that does not end fails the scrapes behind it once they have waited for it,
    /// rather than holding them for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrape_behind_a_refresh_that_does_not_end_fails_after_its_wait() -> anyhow::Result<()>
    {
        let last = Arc::new(LastScrape::default());
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (started, refreshing) = tokio::sync::oneshot::channel();
        let first = tokio::spawn(scrape_with(
            Arc::clone(&last),
            SCRAPE_LOCK_WAIT,
            move || {
                let _ = started.send(());
                let _ = released.recv();
                Ok("first".to_owned())
            },
        ));
        refreshing.await?;
        let second = tokio::time::timeout(
            Duration::from_secs(10),
            scrape_with(Arc::clone(&last), Duration::from_millis(100), || {
                Ok("second".to_owned())
            }),
        )
        .await?;
        assert!(
            second
                .as_ref()
                .is_err_and(|error| error.contains("a refresh does not end")),
            "{second:?}"
        );
        release.send(())?;
        assert_eq!(&*first.await?.map_err(anyhow::Error::msg)?, "first");
        Ok(())
    }

    /// A scrape whose client leaves during its refresh keeps the lock until the refresh ends: a
    /// scrape after it waits for it and gets its text, rather than starting a second refresh
    /// beside it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrape_left_by_its_client_holds_the_lock_until_its_refresh_ends()
    -> anyhow::Result<()> {
        let last = Arc::new(LastScrape::default());
        let refreshes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let first = tokio::spawn(scrape_with(Arc::clone(&last), SCRAPE_LOCK_WAIT, {
            let refreshes = Arc::clone(&refreshes);
            move || {
                refreshes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = released.recv();
                Ok("first".to_owned())
            }
        }));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while refreshes.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no refresh");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The client leaves: its request is dropped while the refresh runs.
        first.abort();
        assert!(first.await.is_err_and(|error| error.is_cancelled()));
        assert!(last.try_lock().is_err(), "the refresh still holds the lock");
        let second = tokio::spawn(scrape_with(Arc::clone(&last), SCRAPE_LOCK_WAIT, {
            let refreshes = Arc::clone(&refreshes);
            move || {
                refreshes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok("second".to_owned())
            }
        }));
        release.send(())?;
        let text = tokio::time::timeout(Duration::from_secs(10), second)
            .await??
            .map_err(anyhow::Error::msg)?;
        assert_eq!(&*text, "first", "the refresh's text, reused");
        assert_eq!(refreshes.load(std::sync::atomic::Ordering::SeqCst), 1);
        Ok(())
    }

    async fn scrape_on(
        stream: &mut tokio::net::TcpStream,
        addr: SocketAddr,
    ) -> std::io::Result<()> {
        stream
            .write_all(
                format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
    }

    /// A connection from `ip` (an address of the loopback network) to `addr`.
    async fn connect_from(ip: [u8; 4], addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((ip, 0)))?;
        socket.connect(addr).await
    }

    /// Silent connections hold at most `MAX_CONNECTIONS` places, and those of one address at most
    /// `MAX_CONNECTIONS_PER_PEER`: past the first, the next connection waits, unaccepted, until
    /// one of them goes (or is closed when idle); past the second, it is closed at once. Instead
    /// of each taking a descriptor, or one address taking every place.
    #[tokio::test]
    async fn the_endpoint_serves_a_few_connections_at_once_and_a_few_of_one_address()
    -> anyhow::Result<()> {
        let shutdown = CancellationToken::new();
        let (addr, task) = serve("127.0.0.1:0".parse()?, None, shutdown.clone()).await?;
        let mut silent = Vec::new();
        for _ in 0..listener::MAX_CONNECTIONS_PER_PEER {
            silent.push(connect_from([127, 0, 0, 1], addr).await?);
        }
        // One more of the same address is closed unanswered.
        let mut closed = connect_from([127, 0, 0, 1], addr).await?;
        let _ = scrape_on(&mut closed, addr).await;
        let mut answer = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), closed.read_to_string(&mut answer))
            .await?;
        assert!(
            answer.is_empty(),
            "answered past the address's limit: {answer}"
        );
        // Other addresses take the rest of the places.
        let others = listener::MAX_CONNECTIONS - listener::MAX_CONNECTIONS_PER_PEER;
        for n in 0..others {
            let ip = [
                127,
                0,
                0,
                2 + u8::try_from(n / listener::MAX_CONNECTIONS_PER_PEER)?,
            ];
            silent.push(connect_from(ip, addr).await?);
        }
        let mut waiting = connect_from([127, 0, 0, 100], addr).await?;
        scrape_on(&mut waiting, addr).await?;
        // Not answered while every place is held (an absence: looked for a little while).
        assert!(
            tokio::time::timeout(
                Duration::from_millis(300),
                waiting.read_to_string(&mut answer)
            )
            .await
            .is_err(),
            "answered past the limit: {answer}"
        );
        drop(silent.pop());
        tokio::time::timeout(Duration::from_secs(30), waiting.read_to_string(&mut answer))
            .await??;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        drop(silent);
        shutdown.cancel();
        task.await?;
        Ok(())
    }
}
