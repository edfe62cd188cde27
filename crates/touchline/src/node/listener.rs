//! The gRPC listener: accepted sockets, and how the server manages its HTTP/2 connections.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::Router;
use tracing::{debug, warn};

use super::admission::{Admission, Ticket};
use super::cuttable::Cuttable;
use super::ending::EndingAtStop;
use super::throttle::Throttle;
use super::tls::TlsServer;
use crate::config::ServerConfig;

/// The router of every node: the standard health service and server reflection (v1 and v1alpha,
/// with the whole Touchline contract and the health service); the roles' services are added to it.
///
/// # Errors
/// When the reflection service cannot read the descriptors.
pub(super) fn router<H: tonic_health::pb::health_server::Health>(
    mut server: Server,
    health: tonic_health::pb::health_server::HealthServer<H>,
    stopped: &CancellationToken,
) -> anyhow::Result<Router> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(touchline_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Reflection's streams end when the server stops, as health watches do.
    Ok(server
        .add_service(health)
        .add_service(EndingAtStop::new(reflection().build_v1()?, stopped.clone()))
        .add_service(EndingAtStop::new(
            reflection().build_v1alpha()?,
            stopped.clone(),
        )))
}

/// Serves `router` on `listener` (over `tls` when configured) until `shutdown`, when it stops
/// accepting and waits for the calls in flight; `cut` closes every connection at once. The
/// connections are admitted under the limits of [`super::admission`].
pub(super) fn serve(
    router: Router,
    listener: TcpListener,
    config: &ServerConfig,
    tls: Option<&TlsServer>,
    shutdown: CancellationToken,
    cut: &CancellationToken,
) -> JoinHandle<Result<(), tonic::transport::Error>> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let admission = Admission::new(config);
    let accepted = incoming(listener, config)
        .filter_map(move |accepted| std::future::ready(admit(&admission, accepted)));
    let stopped = shutdown.cancelled_owned();
    let cut = cut.clone();
    match tls {
        None => tokio::spawn(router.serve_with_incoming_shutdown(
            accepted.map(move |(tcp, ticket)| {
                Ok::<_, std::io::Error>(Cuttable::new(tcp, &cut, ticket))
            }),
            stopped,
        )),
        Some(tls) => tokio::spawn(
            router.serve_with_incoming_shutdown(
                tls.incoming(accepted)
                    .map_ok(move |(tls, ticket)| Cuttable::new(tls, &cut, ticket)),
                stopped,
            ),
        ),
    }
}

/// An accepted connection with its ticket, or `None` (dropped: closed) when it is past a limit
/// or its peer's address is gone.
fn admit(
    admission: &Admission,
    accepted: std::io::Result<TcpStream>,
) -> Option<(TcpStream, Ticket)> {
    let tcp = accepted.ok()?;
    let peer = tcp
        .peer_addr()
        .inspect_err(|error| debug!(%error, "a connection dropped: its peer's address is gone"))
        .ok()?;
    let ticket = admission.admit(peer.ip()).ok()?;
    Some((tcp, ticket))
}

/// How long accepting pauses after an error that is not one connection's (the process is out of
/// file descriptors or memory): retried at once, such an error would come back at once, and the
/// accept loop would spin on a core until a descriptor is freed.
const ACCEPT_PAUSE: Duration = Duration::from_secs(1);
/// Accepted connections with Nagle's algorithm off (gRPC writes small frames, and Nagle plus
/// delayed ACKs would add 40 ms to calls; tonic sets this only on listeners it binds itself) and
/// TCP keepalive on when configured. Never an error: a connection that failed before it was
/// accepted, or whose options cannot be set, is dropped; any other accept error (out of file
/// descriptors) is logged and pauses accepting for [`ACCEPT_PAUSE`].
fn incoming(
    listener: TcpListener,
    config: &ServerConfig,
) -> impl futures::Stream<Item = std::io::Result<TcpStream>> + use<> {
    let keepalive = millis(config.tcp_keepalive_ms).map(|idle| {
        socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(idle.min(Duration::from_secs(10)))
    });
    let listener = std::sync::Arc::new(listener);
    accepting(
        move || {
            let listener = std::sync::Arc::clone(&listener);
            async move { listener.accept().await.map(|(stream, _)| stream) }
        },
        move |stream| configure(stream, keepalive.as_ref()),
    )
}

/// The connections `accept` gives that `configure` takes, as [`incoming`] describes.
fn accepting<A, F>(
    accept: A,
    configure: impl Fn(&TcpStream) -> std::io::Result<()>,
) -> impl futures::Stream<Item = std::io::Result<TcpStream>>
where
    A: FnMut() -> F,
    F: std::future::Future<Output = std::io::Result<TcpStream>>,
{
    // A lasting shortage warns once a minute, not at every pause.
    let warned = Throttle::default();
    futures::stream::unfold(
        (accept, configure, warned),
        |(mut accept, configure, mut warned)| async move {
            loop {
                match accept().await {
                    Ok(stream) => match configure(&stream) {
                        Ok(()) => return Some((Ok(stream), (accept, configure, warned))),
                        Err(error) => {
                            debug!(%error, "a connection dropped: its options cannot be set");
                        }
                    },
                    Err(error) if is_connection_error(&error) => {
                        debug!(%error, "a connection failed before it was accepted");
                    }
                    Err(error) => {
                        if let Some(errors) = warned.note() {
                            warn!(
                                %error,
                                errors,
                                "cannot accept connections, pausing for {} s at each error (out of file descriptors? raise the process's limit)",
                                ACCEPT_PAUSE.as_secs()
                            );
                        } else {
                            debug!(%error, "cannot accept connections");
                        }
                        tokio::time::sleep(ACCEPT_PAUSE).await;
                    }
                }
            }
        },
    )
}

/// Sets an accepted connection's options.
fn configure(stream: &TcpStream, keepalive: Option<&socket2::TcpKeepalive>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    if let Some(keepalive) = keepalive {
        socket2::SockRef::from(stream).set_tcp_keepalive(keepalive)?;
    }
    Ok(())
}

/// An accept error of one connection (it went before it was accepted, or Linux passed on a
/// network error pending on it: accept(2)), not of the listener.
fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionAborted
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionRefused
            | ErrorKind::Interrupted
            | ErrorKind::WouldBlock
            | ErrorKind::TimedOut
            | ErrorKind::NetworkDown
            | ErrorKind::NetworkUnreachable
            | ErrorKind::HostUnreachable
            // A firewall rule refused the connection.
            | ErrorKind::PermissionDenied
    ) || error.raw_os_error().is_some_and(is_pending_network_error)
}

/// The network errors Linux's accept(2) passes on from a connection, that Rust has no kind for.
#[cfg(target_os = "linux")]
fn is_pending_network_error(code: i32) -> bool {
    [
        libc::EPROTO,
        libc::ENOPROTOOPT,
        libc::EHOSTDOWN,
        libc::ENONET,
        libc::EOPNOTSUPP,
    ]
    .contains(&code)
}

#[cfg(not(target_os = "linux"))]
fn is_pending_network_error(_code: i32) -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn accepting_pauses_after_an_error_of_the_listener_not_of_a_connection() {
        use futures::StreamExt as _;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let mut accepted = std::pin::pin!(accepting(
            move || {
                let calls = Arc::clone(&counted);
                async move {
                    let call = calls.fetch_add(1, Ordering::SeqCst);
                    if call >= 1000 {
                        // A loop that never pauses would get here at once: stop it, so that the
                        // test fails instead of spinning.
                        std::future::pending::<()>().await;
                    }
                    tokio::task::yield_now().await;
                    // A connection's error, then the process out of descriptors, in turn.
                    let code = if call.is_multiple_of(2) {
                        libc::ECONNABORTED
                    } else {
                        libc::EMFILE
                    };
                    Err(std::io::Error::from_raw_os_error(code))
                }
            },
            |_| Ok(()),
        ));
        let waited = tokio::time::timeout(Duration::from_secs(10), accepted.next()).await;
        assert!(waited.is_err(), "nothing was accepted");
        // Over 10 s: a pause of 1 s after each EMFILE, none after an ECONNABORTED.
        let calls = calls.load(Ordering::SeqCst);
        assert!((19..=22).contains(&calls), "{calls} accepts in 10 s");
    }

    #[test]
    fn running_out_of_descriptors_is_not_one_connection_s_error() {
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(!is_connection_error(&std::io::Error::from_raw_os_error(
                code
            )));
        }
        for code in [
            libc::ECONNABORTED,
            libc::EPROTO,
            libc::EPERM,
            libc::ENETDOWN,
        ] {
            assert!(is_connection_error(&std::io::Error::from_raw_os_error(
                code
            )));
        }
    }
}

/// The server's HTTP/2 connection settings: keepalive pings, concurrent calls per connection and
/// connection age.
pub(super) fn connection_settings(server: Server, config: &ServerConfig) -> Server {
    let mut server = server
        .http2_keepalive_interval(millis(config.http2_keepalive_interval_ms))
        .http2_keepalive_timeout(Some(Duration::from_millis(
            config.http2_keepalive_timeout_ms,
        )))
        .max_concurrent_streams(config.max_concurrent_streams);
    if let Some(age) = millis(config.max_connection_age_ms) {
        // Without a grace: tonic 0.14 with one closes the connection at age + grace instead of
        // sending GOAWAY at the age.
        server = server.max_connection_age(age);
    }
    server
}

/// A duration in milliseconds, 0 meaning none.
fn millis(value: u64) -> Option<Duration> {
    (value > 0).then(|| Duration::from_millis(value))
}
