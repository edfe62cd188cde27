//! The gRPC listener's settings: address, shutdown, connection management and TLS.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::DEFAULT_PORT;

/// The gRPC listener that every enabled service shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerConfig {
    /// Address to listen on. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// How long shutdown waits for in-flight calls to finish.
    pub shutdown_grace_ms: u64,
    /// Milliseconds between turning health to `NOT_SERVING` and closing the listener at
    /// shutdown, so that load balancers stop sending first (0: none).
    pub shutdown_delay_ms: u64,
    /// HTTP/2 pings on a connection that has been quiet this long, in ms (0: none). A peer that
    /// does not answer one within `http2-keepalive-timeout-ms` is disconnected, and its calls end:
    /// a partner whose connection vanished without a close frees its stream slots.
    pub http2_keepalive_interval_ms: u64,
    pub http2_keepalive_timeout_ms: u64,
    /// TCP keepalive probes on accepted connections after this many idle ms (0: off; else 1,000
    /// to 32,767,000, counted in whole seconds).
    pub tcp_keepalive_ms: u64,
    /// Calls served at once on one connection (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`); a
    /// client queues the rest.
    pub max_concurrent_streams: u32,
    /// Age in ms after which a connection is asked to go (HTTP/2 GOAWAY) so that clients spread
    /// over new nodes (0: never). Its calls in flight go on until they end; new calls go on a new
    /// connection.
    pub max_connection_age_ms: u64,
    /// Connections open at once (those in their TLS handshake included; 0: no limit). A
    /// connection past it is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Connections open at once from one IP address (0: no limit); past it, as past
    /// `max-connections`. Behind a proxy or NAT that hides the clients' addresses, every client
    /// counts as the proxy's: raise it, or set 0.
    pub max_connections_per_peer: usize,
    /// How long a connection has, from its accept (its TLS handshake included), to send the
    /// HTTP/2 client preface before it is closed (0: for ever).
    pub preface_timeout_ms: u64,
    /// TLS for every service on the listener; plaintext when absent.
    pub tls: Option<TlsConfig>,
}

/// Linux takes TCP keepalive times in whole seconds, from 1 to 32,767.
const TCP_KEEPALIVE_MS: std::ops::RangeInclusive<u64> = 1_000..=32_767_000;

/// The longest shutdown wait: an hour (past it a value is a mistake that would hold a stopping
/// node until a second signal).
const MAX_SHUTDOWN_WAIT_MS: u64 = 3_600_000;

impl ServerConfig {
    /// Values the listener cannot use. (Checked by [`super::Config::validate`].)
    ///
    /// # Errors
    /// When `tcp-keepalive-ms` is neither 0 nor 1,000 to 32,767,000 (else the kernel refuses the
    /// setting and every connection with it), or a shutdown wait or the preface timeout is past
    /// an hour.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.tcp_keepalive_ms == 0 || TCP_KEEPALIVE_MS.contains(&self.tcp_keepalive_ms),
            "server.tcp-keepalive-ms = {} is out of range: it must be 0 (off) or between {} and {} (the kernel counts whole seconds)",
            self.tcp_keepalive_ms,
            TCP_KEEPALIVE_MS.start(),
            TCP_KEEPALIVE_MS.end()
        );
        for (name, value) in [
            ("server.shutdown-grace-ms", self.shutdown_grace_ms),
            ("server.shutdown-delay-ms", self.shutdown_delay_ms),
            ("server.preface-timeout-ms", self.preface_timeout_ms),
        ] {
            anyhow::ensure!(
                value <= MAX_SHUTDOWN_WAIT_MS,
                "{name} = {value} is out of range: it must be between 0 and {MAX_SHUTDOWN_WAIT_MS}"
            );
        }
        Ok(())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            shutdown_grace_ms: 10_000,
            shutdown_delay_ms: 0,
            http2_keepalive_interval_ms: 30_000,
            http2_keepalive_timeout_ms: 10_000,
            tcp_keepalive_ms: 60_000,
            max_concurrent_streams: 200,
            max_connection_age_ms: 0,
            max_connections: 10_000,
            max_connections_per_peer: 1_000,
            preface_timeout_ms: 10_000,
            tls: None,
        }
    }
}

/// The gRPC listener's TLS: its certificate and key, and optionally the CA whose certificates
/// clients must present (mutual TLS). Checked at start; the certificate, key and client CA are
/// reloaded when their files change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsConfig {
    /// PEM: the server's certificate, then any intermediates.
    pub cert_file: PathBuf,
    /// PEM: the private key of `cert-file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM: the CA certificate(s) that client certificates must chain to. When set, a client
    /// without such a certificate cannot connect (besides its token, which is still required).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}
