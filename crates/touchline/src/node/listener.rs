//! The gRPC listener: accepted sockets, and how the server manages its HTTP/2 connections.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::config::ServerConfig;

/// Accepted connections with Nagle's algorithm off (gRPC writes small frames, and Nagle plus
/// delayed ACKs would add 40 ms to calls; tonic sets this only on listeners it binds itself) and
/// TCP keepalive on when configured.
pub(super) fn incoming(
    listener: TcpListener,
    config: &ServerConfig,
) -> impl futures::Stream<Item = std::io::Result<TcpStream>> + use<> {
    use futures::StreamExt as _;
    let keepalive = millis(config.tcp_keepalive_ms).map(|idle| {
        socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(idle.min(Duration::from_secs(10)))
    });
    TcpListenerStream::new(listener).map(move |accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        if let Some(keepalive) = &keepalive {
            socket2::SockRef::from(&stream).set_tcp_keepalive(keepalive)?;
        }
        Ok(stream)
    })
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
