//! TLS of the gRPC listener (`server.tls`): every service on it, health and reflection included.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::TlsConfig;
use crate::connect::Target;

/// How long a connection may take to finish its TLS handshake before it is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server builder, with TLS when configured. The files are read and checked here, so that a
/// missing file, a certificate that does not parse or a key that does not match it stops the
/// start with an error that names the key.
pub(super) fn server_builder(tls: Option<&TlsConfig>) -> anyhow::Result<Server> {
    let builder = Server::builder();
    let Some(tls) = tls else {
        return Ok(builder);
    };
    let identity = Identity::from_pem(
        read("cert-file", &tls.cert_file)?,
        read("key-file", &tls.key_file)?,
    );
    let mut settings = ServerTlsConfig::new()
        .identity(identity)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = &tls.client_ca_file {
        settings = settings.client_ca_root(Certificate::from_pem(read("client-ca-file", ca)?));
    }
    builder.tls_config(settings).with_context(|| {
        format!(
            "server.tls: cannot serve {} with the key {}",
            tls.cert_file.display(),
            tls.key_file.display()
        )
    })
}

/// Where this process's own clients (the dev demo) reach the node. Over TLS they trust the
/// node's certificate file itself: enough for a self-signed certificate, or a file whose chain
/// ends with its root.
pub(super) fn own_target(local_addr: SocketAddr, tls: Option<&TlsConfig>) -> Target {
    match tls {
        None => Target::new(format!("http://{local_addr}")),
        Some(tls) => Target::new(format!("https://{local_addr}")).with_ca_cert(&tls.cert_file),
    }
}

fn read(key: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("server.tls.{key} {}", path.display()))
}
