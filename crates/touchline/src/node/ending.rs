//! Response streams ended when the server stops: reflection's, whose streams last while their
//! client keeps its request open, and would otherwise hold a graceful shutdown for its whole
//! grace (any client that reaches the port can open one: reflection needs no token). Health
//! watches end the same way, in their own service ([`super::health::EndingWatches`]).

use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::body::Body;
use tonic::server::NamedService;

/// `inner`, whose response bodies end with `UNAVAILABLE` once `stopped` is cancelled.
#[derive(Debug, Clone)]
pub(super) struct EndingAtStop<S> {
    inner: S,
    stopped: CancellationToken,
}

impl<S> EndingAtStop<S> {
    pub(super) fn new(inner: S, stopped: CancellationToken) -> Self {
        Self { inner, stopped }
    }
}

impl<S: NamedService> NamedService for EndingAtStop<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower_service::Service<http::Request<Body>> for EndingAtStop<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let stopped = self.stopped.clone();
        // The request's stream ends too: the service's task reading it ends, and lets the
        // HTTP/2 stream go (it would hold it, and the server's stop, while the client sends
        // nothing).
        let request = request.map(|body| UntilStopped::wrap(body, &stopped, false));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| UntilStopped::wrap(body, &stopped, true)))
        })
    }
}

/// A body that ends once the server stops, unless it ended before: a response's with
/// `UNAVAILABLE` trailers, a request's without more.
struct UntilStopped {
    inner: Body,
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    ended: bool,
    /// Ends with a status (a response's body).
    with_status: bool,
}

impl UntilStopped {
    fn wrap(inner: Body, stopped: &CancellationToken, with_status: bool) -> Body {
        Body::new(Self {
            inner,
            stopped: Box::pin(stopped.clone().cancelled_owned()),
            ended: false,
            with_status,
        })
    }
}

impl http_body::Body for UntilStopped {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if this.stopped.as_mut().poll(cx).is_ready() {
            this.ended = true;
            if !this.with_status {
                return Poll::Ready(None);
            }
            let mut trailers = http::HeaderMap::new();
            // A status's own text always makes valid headers.
            let _ = tonic::Status::unavailable("the server is stopping").add_header(&mut trailers);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let frame = http_body::Body::poll_frame(Pin::new(&mut this.inner), cx);
        if let Poll::Ready(None) = &frame {
            this.ended = true;
        }
        if let Poll::Ready(Some(Ok(frame))) = &frame
            && frame.is_trailers()
        {
            this.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || http_body::Body::is_end_stream(&self.inner)
    }
}
