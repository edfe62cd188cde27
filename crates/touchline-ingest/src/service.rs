//! The `IngestService` gRPC implementation: authentication, admission (rate, streams, server-wide
//! concurrency), per-event validation against the limits and the partner's contract, and
//! acknowledgement once durable.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};
use touchline_core::{Limits, UnixNanos};
use touchline_proto::v1::{self, event_result};
use tracing::debug;

use crate::auth::Authenticated;
use crate::limits::{PartnerPermits, RateLimiter, StreamCounter, grpc_timeout};
use crate::metrics::INGEST;
use crate::{Error, PartnerDirectory, Publisher, Result};

/// The longest `batch_id` a request may carry: it is echoed in the answer.
pub const MAX_BATCH_ID_BYTES: usize = 128;

mod prepare;
mod shed;
mod stream;
mod timed_body;

pub use shed::ShedBeforeDecode;
pub use timed_body::TimedBody;

use prepare::{Prepared, prepare};

/// Ingest limits and tunables. Every one is configurable (`[ingest]` in the configuration).
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// The most events in one request.
    pub max_batch_events: usize,
    /// Per-event size limits.
    pub limits: Limits,
    /// The largest gRPC message the server decodes.
    pub max_message_bytes: usize,
    /// Events of one `PublishStream` being made durable at once; when the window is full (or 64
    /// answered batches wait for the partner to read them) the server stops
    /// reading the stream, so HTTP/2 flow control pushes back on the partner.
    pub stream_window_events: usize,
    /// Bytes one `PublishStream`'s batches admitted and not yet answered hold once decoded
    /// (waiting for the rate or for slots, or being made durable): past it the server stops
    /// reading the stream, as for its window of events. At least `max_message_bytes`; a batch
    /// holding more than the window is charged all of it.
    pub stream_window_bytes: usize,
    /// Default events per second per partner (a partner's contract can override it); `None` for
    /// no limit.
    pub rate_per_second: Option<f64>,
    /// Default burst of the per-partner token bucket.
    pub burst: f64,
    /// Default open `PublishStream` calls per partner.
    pub max_streams_per_partner: usize,
    /// Batches being decoded or made durable at once, server-wide. Unary calls past it are shed
    /// with `RESOURCE_EXHAUSTED` before they are decoded; streams wait (backpressure).
    pub max_in_flight_batches: usize,
    /// Bytes the decoded requests of unary calls may hold at once until their events are encoded
    /// for Kafka, server-wide (each charged what it holds once decoded, which can be many times
    /// its encoded size): a call that finds them taken is answered `OVERLOADED` (after its
    /// decoding, which the codec bounds). A request larger than all of them is charged all of
    /// them. The encoded records then wait for Kafka's confirmation uncharged, bounded by
    /// `max_in_flight_batches`.
    pub max_in_flight_bytes: usize,
    /// Of `max_in_flight_bytes`, what the requests of one partner's unary calls may hold at once
    /// (never all of it): past it a call is answered `TOO_MANY_CALLS` without being decoded.
    pub max_in_flight_bytes_per_partner: usize,
    /// In-flight slots one partner may hold: its unary `Publish` calls (from their headers to
    /// their answer) and its stream batches being published, so that one partner cannot take
    /// every in-flight slot.
    pub max_calls_per_partner: usize,
    /// How long a unary call's body may take to arrive once the call holds its slots.
    pub request_body_timeout: Duration,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            max_batch_events: 1000,
            limits: Limits::default(),
            max_message_bytes: 4 * 1024 * 1024,
            stream_window_events: 10_000,
            stream_window_bytes: 16 * 1024 * 1024,
            rate_per_second: Some(5_000.0),
            burst: 20_000.0,
            max_streams_per_partner: 8,
            max_in_flight_batches: 512,
            max_in_flight_bytes: 256 * 1024 * 1024,
            max_in_flight_bytes_per_partner: 64 * 1024 * 1024,
            max_calls_per_partner: 64,
            request_body_timeout: Duration::from_secs(30),
        }
    }
}

/// The partner-facing ingest service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct IngestService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    partners: PartnerDirectory,
    publisher: Publisher,
    options: IngestOptions,
    rates: RateLimiter,
    streams: StreamCounter,
    /// Each partner's share of `in_flight`: its unary calls and stream batches.
    calls: PartnerPermits,
    in_flight: Arc<Semaphore>,
    /// `max_in_flight_bytes`, in KiB (so that a large budget fits a semaphore's permits).
    in_flight_kib: Arc<Semaphore>,
    /// All of `in_flight_kib`.
    in_flight_kib_all: u32,
    /// Each partner's share of `in_flight_kib`.
    partner_kib: PartnerPermits,
    /// Cancelled when the server starts shutting down: streams stop reading new batches, answer
    /// the ones in flight and end with `UNAVAILABLE` so the partner reconnects elsewhere.
    draining: CancellationToken,
}

impl IngestService {
    #[must_use]
    pub fn new(
        partners: PartnerDirectory,
        publisher: Publisher,
        options: IngestOptions,
        draining: CancellationToken,
    ) -> Self {
        let in_flight = Arc::new(Semaphore::new(options.max_in_flight_batches.max(1)));
        let in_flight_kib_all = u32::try_from(options.max_in_flight_bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .max(1);
        let in_flight_kib = Arc::new(Semaphore::new(in_flight_kib_all as usize));
        let calls = PartnerPermits::new(
            options.max_calls_per_partner,
            options.max_in_flight_batches.max(1),
        );
        // In KiB, never all of the server's: another partner always finds some.
        let partner_kib = PartnerPermits::new(
            options.max_in_flight_bytes_per_partner.div_ceil(1024),
            in_flight_kib_all as usize,
        );
        Self {
            inner: Arc::new(Inner {
                partners,
                publisher,
                options,
                rates: RateLimiter::default(),
                streams: StreamCounter::default(),
                calls,
                in_flight,
                in_flight_kib,
                in_flight_kib_all,
                partner_kib,
                draining,
            }),
        }
    }

    /// The tonic server for this service. Calls are authenticated on their headers, before the
    /// request body is read and decoded: a caller without a valid token costs no decoding. Then
    /// a unary call takes its in-flight slot, or is shed, before it is decoded ([`ShedBeforeDecode`]).
    #[must_use]
    pub fn into_server(self) -> IngestServer {
        let max = self.inner.options.max_message_bytes;
        let authenticator = Authenticator {
            partners: self.inner.partners.clone(),
        };
        let options = &self.inner.options;
        let shed = shed::Shedding::new(
            Arc::clone(&self.inner.in_flight),
            self.inner.calls.clone(),
            options.request_body_timeout,
            (
                Arc::clone(&self.inner.in_flight_kib),
                self.inner.in_flight_kib_all,
            ),
            self.inner.partner_kib.clone(),
        );
        // Answers are not capped: one result per event of a batch the decoding limit bounded
        // (rejections of tiny events can be a few times their size; a cap failed such calls).
        let server = v1::ingest_service_server::IngestServiceServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX);
        InterceptedService::new(shed.serve(server), authenticator)
    }
}

/// The ingest service as served: behind its [`Authenticator`], then [`ShedBeforeDecode`] (whose
/// request bodies are [`TimedBody`]).
pub type IngestServer = InterceptedService<
    ShedBeforeDecode<v1::ingest_service_server::IngestServiceServer<IngestService>>,
    Authenticator,
>;

/// Authenticates each call from its bearer token, before its body is decoded, and hands the
/// partner to the handler in the request's extensions.
#[derive(Debug, Clone)]
pub struct Authenticator {
    partners: PartnerDirectory,
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        let partner = self
            .partners
            .authenticate_call(request.metadata())
            .inspect_err(|error| INGEST.count_auth_failure("ingest", error.reason()))?;
        request.extensions_mut().insert(partner);
        Ok(request)
    }
}

impl Inner {
    /// The partner the call's bearer token authenticates. The only source of partner identity.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<Authenticated> {
        if let Some(partner) = request.extensions().get::<Authenticated>() {
            // Authenticated by the server's interceptor, on the same headers.
            return Ok(partner.clone());
        }
        self.partners.authenticate_call(request.metadata())
    }

    /// The partner the call's token authenticates now, which must be the one it authenticated at
    /// the call's headers: a unary call's body may take up to `request-body-timeout-ms` to come,
    /// and a token revoked or expired meanwhile publishes nothing (as a stream's next batch), nor
    /// spends the partner's rate.
    fn still_authenticated(
        &self,
        partner: &Authenticated,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Authenticated> {
        self.partners
            .authenticate_call(metadata)
            .and_then(|now| {
                // The file gave the token to another partner meanwhile.
                if now.partner_id == partner.partner_id {
                    Ok(now)
                } else {
                    Err(Error::TokenInvalid)
                }
            })
            .inspect_err(|error| INGEST.count_auth_failure("ingest", error.reason()))
    }

    /// Checks the batch's shape and the partner's rate before any work is done for it.
    fn admit(&self, partner: &Authenticated, request: &v1::PublishRequest) -> Result<()> {
        self.check_shape(request)?;
        self.take_rate(partner, request.events.len())
    }

    fn check_shape(&self, request: &v1::PublishRequest) -> Result<()> {
        // Echoed in the answer: a stream's answers wait for the partner outside its window.
        if request.batch_id.len() > MAX_BATCH_ID_BYTES {
            return Err(Error::BatchIdTooLong {
                len: request.batch_id.len(),
                max: MAX_BATCH_ID_BYTES,
            });
        }
        let events = request.events.len();
        if events == 0 {
            return Err(Error::BatchEmpty);
        }
        if events > self.options.max_batch_events {
            return Err(Error::BatchTooLarge {
                len: events,
                max: self.options.max_batch_events,
            });
        }
        Ok(())
    }

    /// The partner's rate and burst, `None` without a limit.
    fn rate_of(&self, partner: &Authenticated) -> Option<(f64, f64)> {
        let rate = partner
            .contract
            .rate_per_second
            .or(self.options.rate_per_second)?;
        let burst = partner
            .contract
            .burst
            .unwrap_or(self.options.burst)
            .max(1.0);
        Some((rate, burst))
    }

    /// Charges a decoded unary request what it holds against `max_in_flight_bytes` (at most all of
    /// them), or answers `OVERLOADED`: for a call served without [`ShedBeforeDecode`], whose
    /// decoding was not charged.
    fn take_bytes(
        &self,
        request: &v1::PublishRequest,
    ) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let kib = touchline_proto::codec::decoded_request_bytes(request).div_ceil(1024);
        let kib = u32::try_from(kib.max(1))
            .unwrap_or(u32::MAX)
            .min(self.in_flight_kib_all);
        Arc::clone(&self.in_flight_kib)
            .try_acquire_many_owned(kib)
            .map_err(|_| Error::Overloaded {
                retry_after: shed::RETRY_AFTER,
            })
    }

    /// Takes `events` from the partner's rate, or says how long to wait for them.
    fn take_rate(&self, partner: &Authenticated, events: usize) -> Result<()> {
        if let Some((rate, burst)) = self.rate_of(partner) {
            self.rates
                .try_take(&partner.partner_id, rate, burst, events)
                .map_err(|retry_after| Error::RateLimited {
                    rate_per_second: rate,
                    retry_after,
                })?;
        }
        Ok(())
    }

    /// Validates every event, produces the valid ones and answers each event in request order.
    /// `hold` (a unary call's slots) is kept until the batch's preparation ends, even when the
    /// call goes away meanwhile: the memory it bounds is in use until then.
    async fn publish(
        &self,
        partner: &Authenticated,
        request: v1::PublishRequest,
        answer_by: Option<Instant>,
        hold: impl Send + 'static,
    ) -> Result<v1::PublishResponse> {
        let now = UnixNanos::now();
        // Validating and encoding a batch takes a millisecond or more: off the async runtime, so
        // that other calls (reads, acknowledgements) do not queue behind it.
        let (checking_partner, limits) = (partner.clone(), self.options.limits);
        let Prepared {
            event_ids,
            slots,
            envelopes,
        } = tokio::task::spawn_blocking(move || {
            let _hold = hold;
            prepare(request.events, &checking_partner, now, &limits)
        })
        .await
        .map_err(|error| {
            if error.is_panic() {
                // A bug, not the event log: a resend would fail the same way.
                Error::BatchTaskFailed(format!("its validation panicked: {error}"))
            } else {
                // The runtime is going away.
                Error::ShuttingDown
            }
        })?;
        let produced = if envelopes.is_empty() {
            Vec::new()
        } else {
            let started = std::time::Instant::now();
            let produced = self.publisher.publish(&envelopes, answer_by).await?;
            INGEST.observe_produce(started.elapsed());
            produced
        };

        let mut response = v1::PublishResponse {
            batch_id: request.batch_id,
            ..v1::PublishResponse::default()
        };
        for (index, (slot, event_id)) in slots.into_iter().zip(event_ids).enumerate() {
            let result = match slot {
                Ok(position) => {
                    let produced =
                        produced
                            .get(position)
                            .copied()
                            .ok_or_else(|| Error::Unavailable {
                                reason: "the producer reported fewer deliveries than events"
                                    .to_owned(),
                                retry_after: Duration::from_secs(1),
                            })?;
                    response.accepted += 1;
                    event_result::Result::Accepted(v1::Accepted {
                        partition: produced.partition,
                        offset: produced.offset,
                    })
                }
                Err(rejection) => {
                    response.rejected += 1;
                    INGEST.count(&partner.partner_id, "rejected", rejection.reason.code(), 1);
                    event_result::Result::Rejected(v1::Rejected {
                        reason: rejection.reason.number(),
                        field: rejection.field,
                        message: rejection.message,
                    })
                }
            };
            response.results.push(v1::EventResult {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                event_id,
                result: Some(result),
            });
        }
        INGEST.count(
            &partner.partner_id,
            "accepted",
            "",
            u64::from(response.accepted),
        );
        debug!(partner = %partner.partner_id, accepted = response.accepted, rejected = response.rejected, "published batch");
        Ok(response)
    }
}

/// Counts the events of a call that failed as a whole as rejected with the call's reason.
fn count_failed(partner: &Authenticated, events: usize, error: Option<&Error>) {
    if let Some(error) = error {
        INGEST.count(
            &partner.partner_id,
            "rejected",
            error.reason(),
            u64::try_from(events).unwrap_or(u64::MAX),
        );
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<v1::PublishResponse, Status>> + Send>>;

#[tonic::async_trait]
impl v1::ingest_service_server::IngestService for IngestService {
    async fn publish(
        &self,
        request: Request<v1::PublishRequest>,
    ) -> Result<Response<v1::PublishResponse>, Status> {
        let partner = self.inner.authenticate(&request)?;
        let call_timeout = grpc_timeout(request.metadata());
        // Taken before the call was decoded (or, served without [`ShedBeforeDecode`], now).
        let taken = request.extensions().get::<shed::Slot>().cloned();
        let (metadata, _, request) = request.into_parts();
        let events = request.events.len();
        let result = async {
            // Load shedding first: a unary call that finds the server full is refused at once,
            // before it spends the partner's rate.
            let slot = match taken {
                Some(slot) => Ok(slot),
                None => shed::Slot::take(
                    &self.inner.in_flight,
                    &self.inner.calls,
                    Some(&partner.partner_id),
                ),
            }?;
            // Charged as it was decoded (in the shedding's scope), or now.
            let bytes = match slot.decoded_charge() {
                Some(charged) => charged,
                None => vec![self.inner.take_bytes(&request)?],
            };
            let partner = self.inner.still_authenticated(&partner, &metadata)?;
            self.inner.admit(&partner, &request)?;
            // The answer comes before the partner's deadline, counted from the call's arrival
            // (its body took part of it): 90% of it, less 5 ms for the answer's way back.
            let answer_by = call_timeout.and_then(|timeout| {
                slot.arrived().checked_add(
                    timeout
                        .saturating_sub(timeout / 10)
                        .saturating_sub(Duration::from_millis(5)),
                )
            });
            let response = self
                .inner
                .publish(&partner, request, answer_by, (slot.clone(), bytes))
                .await;
            drop(slot);
            response
        }
        .await;
        count_failed(&partner, events, result.as_ref().err());
        Ok(Response::new(result?))
    }

    type PublishStreamStream = ResponseStream;

    async fn publish_stream(
        &self,
        request: Request<Streaming<v1::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        stream::open(&self.inner, request)
    }
}
