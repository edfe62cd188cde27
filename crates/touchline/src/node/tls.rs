//! TLS of the gRPC listener (`server.tls`): every service on it, health and reflection included.
//! The handshakes are made here (rustls), not by tonic, so that a renewed certificate (or client
//! CA) is served without a restart: the certificate, key and client-CA files are checked every few
//! seconds and reloaded when they change (or on SIGHUP); files that do not load keep the ones in
//! force, with a logged error and `touchline_tls_reloads_total{result="failed"}`. When the
//! served chain in force expires is `touchline_tls_expiry_timestamp_seconds{file="cert"}`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use touchline_ingest::files::{Stamp, read_regular, stamp};
use touchline_ingest::metrics::ReloadLabels;
use tracing::{debug, error, info, warn};

use super::admission::{self, Ticket};
use crate::config::TlsConfig;
use crate::connect::{Target, read};

mod expiry;

/// How long a connection may take to finish its TLS handshake before it is closed (sooner when
/// `server.preface-timeout-ms`, which counts the handshake in, is shorter): a longer wait would
/// let a few silent peers hold every one of the [`MAX_HANDSHAKES`].
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes under way at once; past it, accepting waits for one to end (or time out).
const MAX_HANDSHAKES: usize = 1024;
/// How often the certificate, key and client-CA files are checked for a change.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// The listener's TLS: the acceptor in force (its configuration holds the client-CA verifier),
/// and the certificate it serves now.
pub(super) struct TlsServer {
    acceptor: Arc<RwLock<TlsAcceptor>>,
    current: Arc<Current>,
    files: TlsConfig,
    /// The files' stamps before they were loaded: the reload starts from them.
    loaded: Stamps,
    /// Reloads that took (the files changed or SIGHUP), and that failed, for tests.
    reloaded: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
}

/// The stamps of the certificate, key and client-CA files.
type Stamps = [Option<Stamp>; 3];

/// Reloads of the TLS files, by result.
static RELOADS: std::sync::LazyLock<Family<ReloadLabels, Counter>> =
    std::sync::LazyLock::new(Family::default);
/// When the TLS files in force were loaded (Unix seconds).
static LOADED_AT: std::sync::LazyLock<Gauge> = std::sync::LazyLock::new(Gauge::default);
/// When the first certificate of the served chain in force expires (Unix seconds).
static EXPIRES_AT: std::sync::LazyLock<Family<FileLabel, Gauge>> =
    std::sync::LazyLock::new(Family::default);

/// A TLS file, as a label: "cert" (the served chain). Not "client-ca": rustls does not look at
/// a trust anchor's validity, so an expired client CA stops nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct FileLabel {
    file: &'static str,
}

/// Registers `touchline_tls_reloads_total{result}`, `touchline_tls_loaded_timestamp_seconds` and
/// `touchline_tls_expiry_timestamp_seconds{file="cert"}`.
pub(crate) fn register_metrics(registry: &mut prometheus_client::registry::Registry) {
    registry.register(
        "touchline_tls_reloads",
        "reloads of the listener's TLS certificate, key and client CA, ok or failed (a failed one keeps the files in force: alert on it, a certificate that is not renewed expires)",
        RELOADS.clone(),
    );
    registry.register(
        "touchline_tls_loaded_timestamp_seconds",
        "when the TLS files in force were loaded (Unix seconds)",
        LOADED_AT.clone(),
    );
    registry.register(
        "touchline_tls_expiry_timestamp_seconds",
        "when the first of the served chain's certificates in force to expire does (Unix seconds, the chain's earliest notAfter; file=\"cert\"; absent when a certificate's validity cannot be read, with a warning): alert on it minus time(), clients refuse an expired certificate",
        EXPIRES_AT.clone(),
    );
}

/// Counts a reload of the TLS files by its result.
fn reloads(result: &'static str) {
    RELOADS.get_or_create(&ReloadLabels { result }).inc();
}

/// Records that the TLS files in force were loaded now.
fn loaded_now() {
    LOADED_AT.set(touchline_core::UnixNanos::now().to_parts().0);
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TlsServer")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// The certificate and key in force, swapped on reload.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.0.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

impl TlsServer {
    /// Reads and checks the files, each error naming its key and file, so that a missing file,
    /// one without a certificate or key, a CA certificate that does not parse or a key that does
    /// not match the certificate stops the start.
    pub(super) fn load(files: &TlsConfig) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Before reading: a change while the node starts is a change the reload sees.
        let loaded = stamps(files);
        let key = certified_key(files, &provider)?;
        let served = key.cert.clone();
        let current = Arc::new(Current(RwLock::new(Arc::new(key))));
        let acceptor = acceptor(files, &provider, &current)?;
        loaded_now();
        expiry_in_force(&files.cert_file, &served);
        Ok(Self {
            acceptor: Arc::new(RwLock::new(acceptor)),
            current,
            files: files.clone(),
            loaded,
            reloaded: Arc::default(),
            failures: Arc::default(),
        })
    }
}

/// An acceptor with the client-CA verifier of `files` (if any), serving `current`.
fn acceptor(
    files: &TlsConfig,
    provider: &Arc<CryptoProvider>,
    current: &Arc<Current>,
) -> anyhow::Result<TlsAcceptor> {
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .context("server.tls: no protocol version")?;
    let builder = match &files.client_ca_file {
        Some(path) => {
            let pem = read("server.tls.client-ca-file", path, read_regular)?;
            // A bundle is taken whole or refused.
            let mut roots = RootCertStore::empty();
            for certificate in certificates("client-ca-file", path, &pem)? {
                roots.add(certificate).with_context(|| {
                    format!(
                        "server.tls.client-ca-file {}: a certificate",
                        path.display()
                    )
                })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
                    .build()
                    .with_context(|| format!("server.tls.client-ca-file {}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::clone(current) as _);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Sets when the first of the served chain in force (`certificates`, of the file at `path`)
/// expires, and warns when that is past (or cannot be read).
fn expiry_in_force(path: &Path, certificates: &[CertificateDer<'_>]) {
    let label = FileLabel { file: "cert" };
    let Some(expires_at) = expiry::earliest(certificates.iter().map(AsRef::as_ref)) else {
        EXPIRES_AT.remove(&label);
        warn!(
            file = %path.display(),
            "the expiry of a TLS certificate in force cannot be read: touchline_tls_expiry_timestamp_seconds is not set for it"
        );
        return;
    };
    EXPIRES_AT.get_or_create(&label).set(expires_at);
    if expires_at <= touchline_core::UnixNanos::now().to_parts().0 {
        warn!(
            file = %path.display(),
            expires_at,
            "a TLS certificate in force has expired (expires_at, Unix seconds): renew the file, the node reloads it when it changes"
        );
    }
}

impl TlsServer {
    /// The admitted connections once their handshake is done, each handshake a task of its own
    /// (so that they use every core), each with its ticket (dropped with a connection whose
    /// handshake failed, which gives its slot back); failed handshakes (plaintext, an untrusted
    /// client certificate) and slow ones (past the ticket's preface deadline or
    /// [`HANDSHAKE_TIMEOUT`], whichever comes first) are dropped, logged at debug. When the server stops
    /// accepting (and drops this stream), the handshakes under way are aborted.
    pub(super) fn incoming<S>(
        &self,
        accepted: S,
    ) -> impl Stream<Item = std::io::Result<(TlsStream<TcpStream>, Ticket)>> + use<S>
    where
        S: Stream<Item = (TcpStream, Ticket)>,
    {
        let acceptor = Arc::clone(&self.acceptor);
        accepted
            .map(move |(tcp, ticket)| {
                // The one in force when the connection came.
                let acceptor = acceptor
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                AbortOnDrop(tokio::spawn(async move {
                    let longest = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
                    let due = ticket.preface_due.filter(|due| *due < longest);
                    let handshake =
                        tokio::time::timeout_at(due.unwrap_or(longest), acceptor.accept(tcp)).await;
                    if handshake.is_err() && due.is_some() {
                        admission::preface_timed_out();
                    }
                    handshake.map(|handshake| handshake.map(|tls| (tls, ticket)))
                }))
            })
            .buffer_unordered(MAX_HANDSHAKES)
            .filter_map(|handshake| {
                std::future::ready(match handshake {
                    Ok(Ok(Ok(tls))) => Some(Ok(tls)),
                    Ok(Ok(Err(error))) => {
                        debug!(%error, "TLS handshake failed");
                        None
                    }
                    Ok(Err(_)) => {
                        debug!("TLS handshake timed out");
                        None
                    }
                    Err(error) => {
                        debug!(%error, "TLS handshake task ended");
                        None
                    }
                })
            })
    }

    /// Reloads the certificate and key, and the client CA, when their files change or on
    /// SIGHUP, until `shutdown`.
    pub(super) fn watch(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        self.watch_with(
            touchline_ingest::directory::hangups("the TLS files"),
            shutdown,
        )
    }

    /// [`Self::watch`], reloading whenever `hangups` yields.
    fn watch_with(
        &self,
        mut hangups: futures::stream::BoxStream<'static, ()>,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let (current, files) = (Arc::clone(&self.current), self.files.clone());
        let acceptor = Arc::clone(&self.acceptor);
        let reloaded = Arc::clone(&self.reloaded);
        let failures = Arc::clone(&self.failures);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut served = self.loaded;
        tokio::spawn(async move {
            // The stamps of the last failed attempt: its error is logged once per change.
            let mut failed = None;
            let mut settled = None;
            let mut poll = tokio::time::interval(RELOAD_INTERVAL);
            // After a stall (a paused process), not two checks at once: the files must stay the
            // same for a whole interval.
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let hangup = tokio::select! {
                    () = shutdown.cancelled() => return,
                    Some(()) = hangups.next() => true,
                    _ = poll.tick() => false,
                };
                let now = stamps(&files);
                if hangup {
                    // The operator says the files are ready: read them at once, all of them,
                    // changed or not, and report the result again.
                    info!("SIGHUP: reloading the TLS files");
                    failed = None;
                } else {
                    if now == served {
                        continue;
                    }
                    // Read once they have stayed the same for a tick: a chain written in pieces
                    // could otherwise parse (and be served) without its intermediates.
                    if settled != Some(now) {
                        settled = Some(now);
                        continue;
                    }
                }
                // Tried on every tick until the files load: a certificate written before its
                // key, or a file read half-written, loads at a later try. The client CA is
                // loaded whole before anything changes.
                let client_ca_changed = hangup || now[2] != served[2];
                let loaded = certified_key(&files, &provider).and_then(|key| {
                    let new_acceptor = if client_ca_changed {
                        Some(self::acceptor(&files, &provider, &current)?)
                    } else {
                        None
                    };
                    Ok((key, new_acceptor))
                });
                match loaded {
                    // Changed while they were read (a renewal under way): tried again once they
                    // settle, and not an error yet.
                    _ if stamps(&files) != now => settled = None,
                    Ok((key, new_acceptor)) => {
                        expiry_in_force(&files.cert_file, &key.cert);
                        *current.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
                        if let Some(new_acceptor) = new_acceptor {
                            *acceptor.write().unwrap_or_else(PoisonError::into_inner) =
                                new_acceptor;
                            info!(
                                client_ca = ?files.client_ca_file,
                                "TLS client CA reloaded"
                            );
                        }
                        if hangup || now[..2] != served[..2] {
                            info!(cert = %files.cert_file.display(), "TLS certificate reloaded");
                        }
                        served = now;
                        failed = None;
                        reloads("ok");
                        loaded_now();
                        reloaded.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        if failed != Some(now) {
                            failed = Some(now);
                            reloads("failed");
                            failures.fetch_add(1, Ordering::Relaxed);
                            error!(
                                error = format!("{error:#}"),
                                "TLS files not reloaded, the ones in force stay"
                            );
                        }
                    }
                }
            }
        })
    }
}

/// A task that is aborted when this handle is dropped: a handshake under way when the server
/// stops accepting ends with it.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(context)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The certificate chain and key of `files`, checked to match.
fn certified_key(files: &TlsConfig, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let cert = read("server.tls.cert-file", &files.cert_file, read_regular)?;
    let chain = certificates("cert-file", &files.cert_file, &cert)?;
    let key = read("server.tls.key-file", &files.key_file, read_regular)?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|error| {
        anyhow::anyhow!(
            "server.tls.key-file {}: no private key in it ({error})",
            files.key_file.display()
        )
    })?;
    CertifiedKey::from_der(chain, key, provider).with_context(|| {
        format!(
            "server.tls: cannot serve the certificate {} with the key {}",
            files.cert_file.display(),
            files.key_file.display()
        )
    })
}

/// The stamps of the certificate, key and client-CA files.
fn stamps(files: &TlsConfig) -> Stamps {
    [
        Some(files.cert_file.as_path()),
        Some(files.key_file.as_path()),
        files.client_ca_file.as_deref(),
    ]
    .map(|path| path.and_then(stamp))
}

/// Where this process's own clients (the dev demo) reach the node: over TLS they trust the
/// node's certificate file itself, which is enough for a self-signed certificate (or a file whose
/// chain ends with its root) that carries the listener's IP (127.0.0.1 for a wildcard address).
pub(super) fn own_target(local_addr: SocketAddr, tls: Option<&TlsConfig>) -> Target {
    let mut addr = local_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    match tls {
        None => Target::new(format!("http://{addr}")),
        Some(tls) => Target::new(format!("https://{addr}")).with_ca_cert(&tls.cert_file),
    }
}

/// The PEM certificates of a file: at least one, each a well-formed PEM block.
fn certificates(
    key: &str,
    path: &Path,
    pem: &[u8],
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| anyhow::anyhow!("server.tls.{key} {}: {error}", path.display()))?;
    anyhow::ensure!(
        !certificates.is_empty(),
        "server.tls.{key} {}: no PEM certificate in it",
        path.display()
    );
    Ok(certificates)
}

#[cfg(test)]
mod tests;
