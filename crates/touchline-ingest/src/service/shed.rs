//! Load shedding of unary `Publish` calls before their body is read: a call that finds every
//! in-flight slot (`ingest.max-in-flight-batches`) taken is answered `OVERLOADED` without being
//! decoded, so the memory of the batches being decoded and published at once is bounded by the
//! slots, whatever the number of connections.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;

use crate::auth::Authenticated;
use crate::error::Error;
use crate::metrics::INGEST;

/// The path of the unary call that is shed here (streams wait for their slots instead).
const PUBLISH: &str = "/touchline.v1.IngestService/Publish";

/// An in-flight slot taken before the call was decoded, handed to the handler in the request's
/// extensions (extensions must be `Clone`: the slot is freed when the last holder drops it).
#[derive(Debug, Clone)]
pub(crate) struct Slot(#[allow(dead_code, reason = "held, never read")] Arc<OwnedSemaphorePermit>);

impl Slot {
    /// A free slot, or `OVERLOADED`.
    pub(crate) fn take(in_flight: &Arc<Semaphore>) -> Result<Self, Error> {
        Arc::clone(in_flight)
            .try_acquire_owned()
            .map(|permit| Self(Arc::new(permit)))
            .map_err(|_| Error::Overloaded {
                retry_after: Duration::from_millis(200),
            })
    }
}

/// The ingest server, behind the shedding of unary calls.
#[derive(Debug, Clone)]
pub struct ShedBeforeDecode<S> {
    inner: S,
    in_flight: Arc<Semaphore>,
}

impl<S> ShedBeforeDecode<S> {
    pub(crate) fn new(inner: S, in_flight: Arc<Semaphore>) -> Self {
        Self { inner, in_flight }
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ShedBeforeDecode<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        if request.uri().path() == PUBLISH {
            match Slot::take(&self.in_flight) {
                Ok(slot) => {
                    request.extensions_mut().insert(slot);
                }
                Err(overloaded) => {
                    if let Some(partner) = request.extensions().get::<Authenticated>() {
                        INGEST.count_shed(&partner.partner_id);
                    }
                    let status = tonic::Status::from(overloaded);
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        }
        Box::pin(self.inner.call(request))
    }
}

impl<S: NamedService> NamedService for ShedBeforeDecode<S> {
    const NAME: &'static str = S::NAME;
}
