//! Connections the node closes at once when the shutdown's grace is over.
//!
//! tonic runs each connection, and each call on it, as a task of its own; dropping the server's
//! task stops only the accepting. So a call that outlives the grace (a client that stopped
//! reading a stream, a request body that never ends) would go on past the shutdown, holding the
//! store and the producer, until the process exits, and its client would never hear that it
//! ended. A connection given a [`Cuttable`] fails its reads and writes once the node cuts it:
//! hyper then closes it, its calls are reset, and their tasks end.
//!
//! The same way, a connection that has not sent the HTTP/2 client preface by the time its
//! [`Ticket`] says (`server.preface-timeout-ms` from its accept) fails its reads: hyper waits for
//! the preface without a deadline of its own (and its keepalive pings start after it), so a client
//! that connects and sends nothing would hold the connection for ever.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use super::admission::{self, Ticket};

/// The HTTP/2 client preface: `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` (RFC 9113, 3.4).
const PREFACE_LEN: usize = 24;

/// A connection that fails with [`io::ErrorKind::ConnectionAborted`] once `cut` is cancelled
/// (waking whoever waits on it), and its reads with [`io::ErrorKind::TimedOut`] once its
/// preface is due and not read. Its reads and writes share one waiter, which keeps one waker:
/// right while one task drives the connection, as hyper's server does.
#[derive(Debug)]
pub(super) struct Cuttable<IO> {
    io: IO,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Until the preface is read: when it is due, and the bytes read so far.
    preface: Option<(Pin<Box<Sleep>>, usize)>,
    /// Holds the connection's place in the listener's counts.
    _ticket: Ticket,
}

impl<IO> Cuttable<IO> {
    pub(super) fn new(io: IO, cut: &CancellationToken, ticket: Ticket) -> Self {
        Self {
            io,
            // A token of its own: its reads and writes poll no lock the other connections share
            // (the parent's is taken at the accept and at the cut).
            cut: Box::pin(cut.child_token().cancelled_owned()),
            preface: ticket
                .preface_due
                .map(|due| (Box::pin(tokio::time::sleep_until(due)), 0)),
            _ticket: ticket,
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
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(context, buf);
        let Some((due, read)) = &mut this.preface else {
            return polled;
        };
        if polled.is_ready() {
            // Bytes that came by the deadline count, even when the task is polled after it.
            *read += buf.filled().len().saturating_sub(before);
            if *read >= PREFACE_LEN {
                this.preface = None;
            }
            return polled;
        }
        // Waiting for more: the deadline's timer wakes the task too.
        if due.as_mut().poll(context).is_ready() {
            admission::preface_timed_out();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not send the HTTP/2 preface within server.preface-timeout-ms",
            )));
        }
        Poll::Pending
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
