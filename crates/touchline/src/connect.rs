//! Where the command-line clients connect: a node's gRPC endpoint, over TLS when it is `https://`.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::DEFAULT_PORT;

/// A node's gRPC endpoint and the TLS settings to reach it with.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The Touchline gRPC endpoint: `http://` for plaintext, `https://` for a node with
    /// `server.tls`.
    #[arg(long, global = true, env = "TOUCHLINE_ENDPOINT", default_value_t = format!("http://127.0.0.1:{DEFAULT_PORT}"))]
    pub endpoint: String,
    /// PEM file of the CA certificate(s) the node's certificate chains to (`https://` only; the
    /// system's roots when not given).
    #[arg(long, global = true, env = "TOUCHLINE_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// PEM certificate this client presents, for a node that requires client certificates
    /// (`server.tls.client-ca-file`).
    /// With `--client-key` (checked when connecting: flags given on either side of a
    /// subcommand meet only then).
    #[arg(long, global = true, env = "TOUCHLINE_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `--client-cert`.
    #[arg(long, global = true, env = "TOUCHLINE_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// The name the node's certificate must carry, when it is not the endpoint's host (an
    /// endpoint by IP address, a certificate for a DNS name).
    #[arg(long, global = true, env = "TOUCHLINE_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

/// How long the commands wait for a connection to a node.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// HTTP/2 pings (and TCP keepalive probes) on a quiet connection, also while a watch waits.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// A ping unanswered this long ends the connection (the node's own keepalive timeout).
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Target {
    /// A plaintext endpoint, or an `https://` one trusting the system's roots.
    #[must_use]
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            ca_cert: None,
            client_cert: None,
            client_key: None,
            tls_server_name: None,
        }
    }

    /// Trusts the CA certificate(s) in `ca_cert` (PEM) for the node's certificate.
    #[must_use]
    pub fn with_ca_cert(mut self, ca_cert: impl Into<PathBuf>) -> Self {
        self.ca_cert = Some(ca_cert.into());
        self
    }

    /// Presents `cert` (PEM) with its `key` to a node that requires client certificates.
    #[must_use]
    pub fn with_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some(cert.into());
        self.client_key = Some(key.into());
        self
    }

    /// The endpoint with its TLS settings, not yet connected.
    ///
    /// # Errors
    /// When the endpoint is not a URI, a TLS file cannot be read, or TLS files are given for a
    /// plaintext (`http://`) endpoint.
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        // A node that does not answer, or a connection dropped without a close (a NAT, a load
        // balancer), is found out: the commands retry or fail instead of waiting forever.
        let endpoint = Endpoint::from_shared(self.endpoint.clone())
            .with_context(|| format!("{} is not an endpoint", self.endpoint))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Some(KEEPALIVE_INTERVAL))
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        anyhow::ensure!(
            self.client_cert.is_some() == self.client_key.is_some(),
            "--client-cert and --client-key (TOUCHLINE_CLIENT_CERT, TOUCHLINE_CLIENT_KEY) go together"
        );
        if endpoint.uri().scheme_str() != Some("https") {
            anyhow::ensure!(
                self.ca_cert.is_none()
                    && self.client_cert.is_none()
                    && self.tls_server_name.is_none(),
                "{} is plaintext: TLS settings (a CA or client certificate, a server name) need an https:// endpoint",
                self.endpoint
            );
            return Ok(endpoint);
        }
        // The handshake has a timeout of its own: `connect_timeout` covers the TCP connect only.
        let mut tls = ClientTlsConfig::new().timeout(CONNECT_TIMEOUT);
        tls = match &self.ca_cert {
            Some(path) => tls.ca_certificate(Certificate::from_pem(read(
                "--ca-cert",
                path,
                touchline_ingest::files::read_bounded,
            )?)),
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            tls = tls.identity(Identity::from_pem(
                read("--client-cert", cert, touchline_ingest::files::read_bounded)?,
                read("--client-key", key, touchline_ingest::files::read_bounded)?,
            ));
        }
        if let Some(name) = &self.tls_server_name {
            tls = tls.domain_name(name);
        }
        endpoint.tls_config(tls).with_context(|| {
            format!(
                "cannot set up TLS for {}{}",
                self.endpoint,
                if self.ca_cert.is_none() {
                    " (without --ca-cert, with the system's roots)"
                } else {
                    ""
                }
            )
        })
    }

    /// Connects.
    ///
    /// # Errors
    /// As [`Target::endpoint`], and when the node cannot be reached or the TLS handshake fails.
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        self.endpoint()?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", self.endpoint))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.endpoint)
    }
}

/// An error and its sources on one line: tonic's transport error alone says only "transport
/// error".
#[must_use]
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(error) = source {
        let message = error.to_string();
        // An I/O error shows its inner error, which is also its source: once is enough.
        if !text.ends_with(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = error.source();
    }
    text
}

/// Whether a connection failed on the node's certificate or this client's TLS settings (rustls
/// refused it): trying again will not help.
#[must_use]
pub fn is_tls_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        let inner = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        if error.is::<rustls::Error>()
            || inner.is_some_and(<dyn std::error::Error>::is::<rustls::Error>)
            || inner.is_some_and(is_alert_text)
        {
            return true;
        }
        current = error.source();
    }
    false
}

/// A TLS alert the node sent after the handshake (under TLS 1.3 a refused client certificate
/// shows only at the first call) reaches a call as an I/O error that h2 rebuilt from rustls's
/// text, without the `rustls::Error` itself: recognised by that text.
fn is_alert_text(error: &(dyn std::error::Error + 'static)) -> bool {
    error.to_string().starts_with("received fatal alert")
}

/// The largest certificate, key or CA bundle read (a public CA bundle is about 200 KiB).
const MAX_PEM_BYTES: u64 = 4 << 20;

/// The bytes of the PEM file `path`, at most 4 MiB, read by `reader` (a node's, or a command's:
/// [`touchline_ingest::files::Reader`]); an error names the setting it came from (`what`) and the
/// file.
pub(crate) fn read(
    what: &str,
    path: &Path,
    reader: touchline_ingest::files::Reader,
) -> anyhow::Result<Vec<u8>> {
    reader(path, MAX_PEM_BYTES).with_context(|| format!("{what} {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(target: &Target) -> String {
        format!("{:#}", target.endpoint().expect_err("refused"))
    }

    #[test]
    fn tls_files_need_an_https_endpoint() {
        let plaintext = Target::new("http://127.0.0.1:7451");
        assert!(plaintext.endpoint().is_ok());
        assert!(error(&plaintext.clone().with_ca_cert("ca.pem")).contains("is plaintext"));
        assert!(
            error(
                &plaintext
                    .clone()
                    .with_client_cert("client.pem", "client.key")
            )
            .contains("is plaintext")
        );
        let named = Target {
            tls_server_name: Some("touchline.example".to_owned()),
            ..plaintext
        };
        assert!(error(&named).contains("is plaintext"));
    }

    #[test]
    fn unreadable_tls_files_and_bad_endpoints_are_named() {
        let missing = Target::new("https://localhost:7451").with_ca_cert("/nonexistent/ca.pem");
        assert!(error(&missing).contains("--ca-cert /nonexistent/ca.pem"));
        assert!(error(&Target::new("not an endpoint")).contains("is not an endpoint"));
        let half = Target {
            client_key: Some("client.key".into()),
            ..Target::new("https://localhost:7451")
        };
        assert!(error(&half).contains("go together"));
    }
}
