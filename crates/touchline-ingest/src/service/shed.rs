//! Load shedding of unary `Publish` calls before their body is read. A call whose partner already
//! holds `ingest.max-calls-per-partner` in-flight slots (unary calls and stream batches) is
//! answered `TOO_MANY_CALLS`, and one that finds every in-flight slot
//! (`ingest.max-in-flight-batches`) taken `OVERLOADED`, both
//! without being decoded: the memory of the batches being decoded and published at once is
//! bounded by the slots whatever the number of connections, and no partner takes every slot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;
use touchline_core::PartnerId;
use touchline_proto::codec::{BytePool, DecodeBudget};

use super::timed_body::TimedBody;
use crate::auth::Authenticated;
use crate::error::Error;
use crate::limits::PartnerPermits;
use crate::metrics::INGEST;

/// The path of the unary call that is shed here (streams wait for their slots instead).
const PUBLISH: &str = "/touchline.v1.IngestService/Publish";

/// How soon a shed call may try again.
pub(super) const RETRY_AFTER: Duration = Duration::from_millis(200);

/// An in-flight slot (and the partner's share of them) taken before the call was decoded, handed
/// to the handler in the request's extensions, with when the call arrived (its deadline counts
/// from then, not from the end of its body). Extensions must be `Clone`: the slots are freed when
/// the last holder drops them.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    #[allow(dead_code, reason = "held, never read")]
    permits: Arc<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)>,
    arrived: Instant,
    /// The call's scope of `max-in-flight-bytes`, which its decoding is charged against.
    budget: Option<DecodeBudget>,
}

impl Slot {
    /// A slot of `partner`'s share (`TOO_MANY_CALLS` when it holds all of them; not counted when
    /// the call was not authenticated here), then a free in-flight slot (`OVERLOADED`).
    pub(crate) fn take(
        in_flight: &Arc<Semaphore>,
        calls: &PartnerPermits,
        partner: Option<&PartnerId>,
    ) -> Result<Self, Error> {
        let share = match partner {
            Some(partner) => Some(calls.try_take(partner).ok_or(Error::TooManyCalls {
                max: calls.max(),
                retry_after: RETRY_AFTER,
            })?),
            None => None,
        };
        Arc::clone(in_flight)
            .try_acquire_owned()
            .map(|permit| Self {
                permits: Arc::new((permit, share)),
                arrived: Instant::now(),
                budget: None,
            })
            .map_err(|_| Error::Overloaded {
                retry_after: RETRY_AFTER,
            })
    }

    /// When the call took its slots: as its headers arrived.
    pub(crate) fn arrived(&self) -> Instant {
        self.arrived
    }

    /// What the call's request was charged of `max-in-flight-bytes` (and of its partner's share)
    /// as it was decoded; `None` when it was decoded outside a budget's scope (served without
    /// [`ShedBeforeDecode`]).
    pub(crate) fn decoded_charge(&self) -> Option<Vec<OwnedSemaphorePermit>> {
        self.budget.as_ref().map(DecodeBudget::charged)
    }
}

/// What [`ShedBeforeDecode`] sheds by.
#[derive(Debug, Clone)]
pub(crate) struct Shedding {
    in_flight: Arc<Semaphore>,
    calls: PartnerPermits,
    body_timeout: Duration,
    /// `max-in-flight-bytes` in KiB, and all of it.
    bytes: (Arc<Semaphore>, u32),
    /// Each partner's share of them, in KiB.
    partner_bytes: PartnerPermits,
}

/// The ingest server, behind the shedding of unary calls.
#[derive(Debug, Clone)]
pub struct ShedBeforeDecode<S> {
    inner: S,
    shedding: Shedding,
}

impl Shedding {
    /// Sheds by `in_flight` and by `calls` (each partner's share of the slots, which its stream
    /// batches hold too); a unary call's body must arrive within `body_timeout`.
    pub(crate) fn new(
        in_flight: Arc<Semaphore>,
        calls: PartnerPermits,
        body_timeout: Duration,
        bytes: (Arc<Semaphore>, u32),
        partner_bytes: PartnerPermits,
    ) -> Self {
        Self {
            in_flight,
            calls,
            body_timeout,
            bytes,
            partner_bytes,
        }
    }

    /// `inner`, behind this shedding.
    pub(crate) fn serve<S>(self, inner: S) -> ShedBeforeDecode<S> {
        ShedBeforeDecode {
            inner,
            shedding: self,
        }
    }

    /// The slots of a call of `partner` (`None` when the call was not authenticated here).
    fn admit(&self, partner: Option<&Authenticated>) -> Result<Slot, Error> {
        let mut slot = Slot::take(
            &self.in_flight,
            &self.calls,
            partner.map(|partner| &partner.partner_id),
        )?;
        // The partner's share first: a partner that holds its share is told so, and does not
        // take what is left of the server's.
        let mut pools = Vec::with_capacity(2);
        if let Some(partner) = partner {
            let (share, all) = self.partner_bytes.of(&partner.partner_id);
            pools.push(BytePool::new(
                share,
                u32::try_from(all).unwrap_or(u32::MAX),
                "TOO_MANY_CALLS",
                "the partner's requests being decoded and published hold its share of the server's memory for them (ingest.max-in-flight-bytes-per-partner): wait for their answers",
            ));
        }
        pools.push(BytePool::new(
            Arc::clone(&self.bytes.0),
            self.bytes.1,
            "OVERLOADED",
            "the server is overloaded (the memory of requests being decoded and published, ingest.max-in-flight-bytes, is taken): retry shortly",
        ));
        slot.budget = Some(DecodeBudget::new(pools));
        Ok(slot)
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ShedBeforeDecode<S>
where
    S: Service<http::Request<TimedBody<ReqBody>>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let (mut budget, mut partner_id) = (None, None);
        let body = if parts.uri.path() == PUBLISH {
            let partner = parts.extensions.get::<Authenticated>();
            partner_id = partner.map(|partner| partner.partner_id.clone());
            match self.shedding.admit(partner) {
                Ok(slot) => {
                    budget.clone_from(&slot.budget);
                    parts.extensions.insert(slot);
                }
                Err(shed) => {
                    if let Some(partner) = partner {
                        INGEST.count_shed(&partner.partner_id, shed.reason());
                    }
                    let status = tonic::Status::from(shed);
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
            // From here the call holds its slots: its body must come in time.
            TimedBody::within(body, self.shedding.body_timeout, partner_id.clone())
        } else {
            TimedBody::untimed(body)
        };
        let call = self.inner.call(http::Request::from_parts(parts, body));
        // Decoded in the call's budget scope: its request is charged before it is decoded.
        match budget {
            Some(budget) => Box::pin(async move {
                let answered = budget.clone().scope(call).await;
                if let (Some(reason), Some(partner)) = (budget.refused(), partner_id) {
                    INGEST.count_shed(&partner, reason);
                }
                answered
            }),
            None => Box::pin(call),
        }
    }
}

impl<S: NamedService> NamedService for ShedBeforeDecode<S> {
    const NAME: &'static str = S::NAME;
}
