//! A request body that must arrive in full before a deadline: a unary call holds its in-flight
//! slots from its headers on, and a client that stops sending its body would hold them forever
//! (HTTP/2 keepalive pings find dead connections, not idle senders).

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;
use tonic::codegen::StdError;
use touchline_core::PartnerId;

/// `inner`, failing once `deadline` passes before its end was read (with a `tonic::Status`,
/// `DEADLINE_EXCEEDED` `BODY_TIMEOUT`, that tonic answers the call with), and ended after that.
#[derive(Debug)]
pub struct TimedBody<B> {
    inner: B,
    deadline: Option<(Pin<Box<Sleep>>, Duration)>,
    expired: bool,
    /// The partner the call's timeout is counted for.
    partner: Option<PartnerId>,
}

impl<B> TimedBody<B> {
    /// `inner` with no deadline.
    pub(crate) fn untimed(inner: B) -> Self {
        Self {
            inner,
            deadline: None,
            expired: false,
            partner: None,
        }
    }

    /// `inner`, to be read in full within `limit` from now; a timeout is counted for `partner`.
    pub(crate) fn within(inner: B, limit: Duration, partner: Option<PartnerId>) -> Self {
        Self {
            inner,
            deadline: Some((Box::pin(tokio::time::sleep(limit)), limit)),
            expired: false,
            partner,
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body + Unpin,
    B::Error: Into<StdError>,
{
    type Data = B::Data;
    type Error = StdError;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(None);
        }
        if let Some((deadline, limit)) = &mut this.deadline
            && deadline.as_mut().poll(context).is_ready()
        {
            let limit = *limit;
            this.deadline = None;
            this.expired = true;
            let timeout = crate::Error::BodyTimeout { limit };
            if let Some(partner) = &this.partner {
                crate::metrics::INGEST.count_shed(partner, timeout.reason());
            }
            let status = tonic::Status::from(timeout);
            return Poll::Ready(Some(Err(Box::new(status))));
        }
        Pin::new(&mut this.inner)
            .poll_frame(context)
            .map(|frame| frame.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
