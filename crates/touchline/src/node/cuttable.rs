//! Connections the node closes at once when the shutdown's grace is over.
//!
//! tonic runs each connection, and each call on it, as a task of its own; dropping the server's
//! task stops only the accepting. So a call that outlives the grace (a client that stopped
//! reading a stream, a request body that never ends) would go on past the shutdown, holding the
//! store and the producer, until the process exits, and its client would never hear that it
//! ended. A connection given a [`Cuttable`] fails its reads and writes once the node cuts it:
//! hyper then closes it, its calls are reset, and their tasks end.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

/// A connection that fails with [`io::ErrorKind::ConnectionAborted`] once `cut` is cancelled
/// (waking whoever waits on it). Its reads and writes share one waiter, which keeps one waker:
/// right while one task drives the connection, as hyper's server does.
#[derive(Debug)]
pub(super) struct Cuttable<IO> {
    io: IO,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<IO> Cuttable<IO> {
    pub(super) fn new(io: IO, cut: &CancellationToken) -> Self {
        Self {
            io,
            // A token of its own: its reads and writes poll no lock the other connections share
            // (the parent's is taken at the accept and at the cut).
            cut: Box::pin(cut.child_token().cancelled_owned()),
        }
    }

    /// `Err` once the connection is cut; else registers the task to be woken when it is.
    fn check(&mut self, context: &mut Context<'_>) -> io::Result<()> {
        match self.cut.as_mut().poll(context) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the node is stopping: its grace for in-flight calls is over",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Cuttable<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(context)?;
        Pin::new(&mut this.io).poll_read(context, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Cuttable<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(context)?;
        Pin::new(&mut this.io).poll_write(context, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(context)?;
        Pin::new(&mut this.io).poll_write_vectored(context, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(context)?;
        Pin::new(&mut this.io).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Closing is never refused: a cut connection closes its side as any other.
        Pin::new(&mut self.get_mut().io).poll_shutdown(context)
    }
}

impl<IO: Connected> Connected for Cuttable<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
