//! TLS of the gRPC listener (`server.tls`): every service on it, health and reflection included.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::TlsConfig;
use crate::connect::Target;

/// How long a connection may take to finish its TLS handshake before it is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server builder, with TLS when configured. The files are read and checked here, each error
/// naming its key and file, so that a missing file, one without a certificate or key, a CA
/// certificate that does not parse or a key that does not match the certificate stops the start.
pub(super) fn server_builder(tls: Option<&TlsConfig>) -> anyhow::Result<Server> {
    let builder = Server::builder();
    let Some(tls) = tls else {
        return Ok(builder);
    };
    let cert = read("cert-file", &tls.cert_file)?;
    certificates("cert-file", &tls.cert_file, &cert)?;
    let key = read("key-file", &tls.key_file)?;
    PrivateKeyDer::from_pem_slice(&key).map_err(|error| {
        anyhow::anyhow!(
            "server.tls.key-file {}: no private key in it ({error})",
            tls.key_file.display()
        )
    })?;
    let mut settings = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(path) = &tls.client_ca_file {
        let pem = read("client-ca-file", path)?;
        // tonic skips CA certificates that do not parse; a bundle is taken whole or refused.
        let mut roots = RootCertStore::empty();
        for certificate in certificates("client-ca-file", path, &pem)? {
            roots.add(certificate).with_context(|| {
                format!(
                    "server.tls.client-ca-file {}: a certificate",
                    path.display()
                )
            })?;
        }
        settings = settings.client_ca_root(Certificate::from_pem(pem));
    }
    builder.tls_config(settings).with_context(|| {
        format!(
            "server.tls: cannot serve the certificate {} with the key {}",
            tls.cert_file.display(),
            tls.key_file.display()
        )
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

fn read(key: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("server.tls.{key} {}", path.display()))
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
