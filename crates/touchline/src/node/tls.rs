//! TLS of the gRPC listener (`server.tls`): every service on it, health and reflection included.
//! The handshakes are made here (rustls), not by tonic, so that a renewed certificate (or client
//! CA) is served without a restart: the certificate, key and client-CA files are checked every few
//! seconds and reloaded when they change; files that do not load keep the ones in force, with a
//! logged error.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
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
use tracing::{debug, error, info};

use crate::config::TlsConfig;
use crate::connect::{Target, read};

/// How long a connection may take to finish its TLS handshake before it is closed.
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
    /// The files' modification times before they were loaded: the reload starts from them.
    loaded: Times,
}

/// When the certificate, key and client-CA files last changed.
type Times = [Option<SystemTime>; 3];

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
        let loaded = modified(files);
        let current = Arc::new(Current(RwLock::new(Arc::new(certified_key(
            files, &provider,
        )?))));
        let acceptor = acceptor(files, &provider, &current)?;
        Ok(Self {
            acceptor: Arc::new(RwLock::new(acceptor)),
            current,
            files: files.clone(),
            loaded,
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
            let pem = read("server.tls.client-ca-file", path)?;
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

impl TlsServer {
    /// The accepted connections once their handshake is done, each handshake a task of its own
    /// (so that they use every core); failed handshakes (plaintext, an untrusted client
    /// certificate) and slow ones are dropped, logged at debug. When the server stops accepting
    /// (and drops this stream), the handshakes under way are aborted.
    pub(super) fn incoming<S>(
        &self,
        accepted: S,
    ) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> + use<S>
    where
        S: Stream<Item = std::io::Result<TcpStream>>,
    {
        let acceptor = Arc::clone(&self.acceptor);
        accepted
            .filter_map(|accepted| {
                std::future::ready(
                    accepted
                        .inspect_err(|error| debug!(%error, "accepting a connection failed"))
                        .ok(),
                )
            })
            .map(move |tcp| {
                // The one in force when the connection came.
                let acceptor = acceptor
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                AbortOnDrop(tokio::spawn(async move {
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
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

    /// Reloads the certificate and key, and the client CA, when their files change, until
    /// `shutdown`.
    pub(super) fn watch(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        let (current, files) = (Arc::clone(&self.current), self.files.clone());
        let acceptor = Arc::clone(&self.acceptor);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut served = self.loaded;
        tokio::spawn(async move {
            // The times of the last failed attempt: its error is logged once per change.
            let mut failed = None;
            let mut settled = None;
            let mut poll = tokio::time::interval(RELOAD_INTERVAL);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = poll.tick() => {}
                }
                let now = modified(&files);
                if now == served {
                    continue;
                }
                // Read once they have stayed the same for a tick: a chain written in pieces
                // could otherwise parse (and be served) without its intermediates.
                if settled != Some(now) {
                    settled = Some(now);
                    continue;
                }
                // Tried on every tick until the files load: a certificate written before its
                // key, or a file read half-written, loads at a later try. The client CA is
                // loaded whole before anything changes.
                let client_ca_changed = now[2] != served[2];
                let loaded = certified_key(&files, &provider).and_then(|key| {
                    let new_acceptor = if client_ca_changed {
                        Some(self::acceptor(&files, &provider, &current)?)
                    } else {
                        None
                    };
                    Ok((key, new_acceptor))
                });
                match loaded {
                    // Changed while they were read: tried again once they settle.
                    Ok(_) if modified(&files) != now => {}
                    Ok((key, new_acceptor)) => {
                        *current.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
                        if let Some(new_acceptor) = new_acceptor {
                            *acceptor.write().unwrap_or_else(PoisonError::into_inner) =
                                new_acceptor;
                            info!(
                                client_ca = ?files.client_ca_file,
                                "TLS client CA reloaded"
                            );
                        }
                        if now[..2] != served[..2] {
                            info!(cert = %files.cert_file.display(), "TLS certificate reloaded");
                        }
                        served = now;
                        failed = None;
                    }
                    Err(error) => {
                        if failed != Some(now) {
                            failed = Some(now);
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
    let cert = read("server.tls.cert-file", &files.cert_file)?;
    let chain = certificates("cert-file", &files.cert_file, &cert)?;
    let key = read("server.tls.key-file", &files.key_file)?;
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

/// When the certificate, key and client-CA files last changed.
fn modified(files: &TlsConfig) -> Times {
    [
        Some(files.cert_file.as_path()),
        Some(files.key_file.as_path()),
        files.client_ca_file.as_deref(),
    ]
    .map(|path| {
        path.and_then(|path| {
            std::fs::metadata(path)
                .and_then(|metadata| metadata.modified())
                .ok()
        })
    })
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
