//! The `/metrics` listener: a few connections at once, a few of one address, each closed once
//! idle.
//!
//! axum's server keeps a connection for as long as its client holds it, and reads a request's
//! head without a deadline, so sockets opened and left silent (by anyone who can reach the port)
//! would pile up until the process ran out of file descriptors, which the gRPC listener, Kafka's
//! clients and sled need too. A scraper needs one connection, two while one is replaced.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Connections served at once; the next ones wait in the kernel's backlog, unaccepted.
pub(super) const MAX_CONNECTIONS: usize = 16;
/// Of them, what one peer address may hold; more are closed as soon as they are accepted.
pub(super) const MAX_CONNECTIONS_PER_PEER: usize = 4;
/// How long a connection may go without reading or writing a byte before it is closed.
pub(super) const IDLE: Duration = Duration::from_secs(30);

/// `listener`, accepting at most [`MAX_CONNECTIONS`] at once and [`MAX_CONNECTIONS_PER_PEER`]
/// of one address, each closed after [`IDLE`].
pub(super) struct Capped {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    per_peer: crate::peers::PerPeer,
}

impl Capped {
    pub(super) fn new(listener: TcpListener) -> Self {
        Self {
            listener,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            per_peer: crate::peers::PerPeer::new(
                MAX_CONNECTIONS_PER_PEER,
                "metrics-connections-per-peer",
            ),
        }
    }
}

impl axum::serve::Listener for Capped {
    type Io = Idle<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Never closed (this listener holds it): never `None`.
        let permit = Arc::clone(&self.permits).acquire_owned().await.ok();
        loop {
            // axum's accept: it logs and retries what fails (a full descriptor table, say).
            let (tcp, peer) = axum::serve::Listener::accept(&mut self.listener).await;
            // One address past its share is closed at once (dropped), so that it cannot hold
            // every place and keep the scrapers out.
            if let Some(place) = self.per_peer.take(peer.ip()) {
                return (Idle::new(tcp, permit, Some(place)), peer);
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A connection whose reads and writes fail with [`io::ErrorKind::TimedOut`] once it has made
/// no progress for [`IDLE`] (hyper then closes it), holding its place among the listener's
/// connections until it is dropped. Its reads and writes share one timer, which keeps one waker:
/// right while one task drives the connection, as hyper's server does.
pub(super) struct Idle<IO> {
    io: IO,
    idle: Pin<Box<Sleep>>,
    _permit: Option<OwnedSemaphorePermit>,
    _place: Option<crate::peers::PeerPlace>,
}

impl<IO> Idle<IO> {
    fn new(
        io: IO,
        permit: Option<OwnedSemaphorePermit>,
        place: Option<crate::peers::PeerPlace>,
    ) -> Self {
        Self {
            io,
            idle: Box::pin(tokio::time::sleep(IDLE)),
            _permit: permit,
            _place: place,
        }
    }

    /// `poll`'s outcome; when it is pending, a timeout once the connection has been idle for
    /// [`IDLE`], and after progress the timer starts again.
    fn progress<T>(
        &mut self,
        context: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(outcome) => {
                self.idle.as_mut().reset(Instant::now() + IDLE);
                Poll::Ready(outcome)
            }
            Poll::Pending => match self.idle.as_mut().poll(context) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the metrics connection was idle too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Idle<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_read(context, buf);
        this.progress(context, poll)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Idle<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(context, buf);
        this.progress(context, poll)
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(context);
        this.progress(context, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A connection that goes silent is closed once idle; one that keeps talking is not.
    #[tokio::test(start_paused = true)]
    async fn a_connection_idle_too_long_fails_and_progress_keeps_it() -> anyhow::Result<()> {
        let (client, server) = tokio::io::duplex(64);
        let mut server = Idle::new(server, None, None);
        let mut client = client;
        let mut byte = [0_u8; 1];
        // Bytes every 20 s: alive past 30 s.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            client.write_all(b"x").await?;
            server.read_exact(&mut byte).await?;
        }
        let started = Instant::now();
        let failed = server
            .read_exact(&mut byte)
            .await
            .expect_err("nothing comes");
        assert_eq!(failed.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), IDLE);
        Ok(())
    }
}
