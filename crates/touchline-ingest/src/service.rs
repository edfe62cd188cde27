//! The `IngestService` gRPC implementation.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use touchline_core::{Envelope, Limits, PartnerId, UnixNanos, validate_batch};
use touchline_proto::convert::raw_touchpoint;
use touchline_proto::v1::{self, event_result};
use tracing::{debug, info};

use crate::auth::bearer_token;
use crate::{Error, PartnerRegistry, Publisher, Result};

/// Ingest limits and tunables.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// The most events in one request.
    pub max_batch_events: usize,
    /// Per-event size limits.
    pub limits: Limits,
    /// Batches of one `PublishStream` being made durable at once; past that the server stops
    /// reading the stream until the oldest is answered.
    pub stream_window: usize,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            max_batch_events: 1000,
            limits: Limits::default(),
            stream_window: 8,
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
    partners: PartnerRegistry,
    publisher: Publisher,
    options: IngestOptions,
    /// Cancelled when the server starts shutting down: streams stop reading new batches, answer
    /// the ones in flight and end with `UNAVAILABLE` so the partner reconnects elsewhere.
    draining: CancellationToken,
}

impl IngestService {
    #[must_use]
    pub fn new(
        partners: PartnerRegistry,
        publisher: Publisher,
        options: IngestOptions,
        draining: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                partners,
                publisher,
                options,
                draining,
            }),
        }
    }

    /// The tonic server for this service.
    #[must_use]
    pub fn into_server(self) -> v1::ingest_service_server::IngestServiceServer<Self> {
        v1::ingest_service_server::IngestServiceServer::new(self)
            .max_decoding_message_size(16 * 1024 * 1024)
    }
}

impl Inner {
    /// The partner the call's bearer token authenticates. The only source of partner identity.
    fn authenticate(&self, metadata: &MetadataMap) -> Result<PartnerId> {
        let header = metadata
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .ok_or(Error::TokenMissing)?;
        let token = bearer_token(header).ok_or(Error::TokenMissing)?;
        self.partners.authenticate(token).ok_or(Error::TokenInvalid)
    }

    /// Validates every event, produces the valid ones and answers each event in request order.
    async fn publish(
        &self,
        partner: &PartnerId,
        request: v1::PublishRequest,
    ) -> Result<v1::PublishResponse> {
        let count = request.events.len();
        if count == 0 {
            return Err(Error::BatchEmpty);
        }
        if count > self.options.max_batch_events {
            return Err(Error::BatchTooLarge {
                len: count,
                max: self.options.max_batch_events,
            });
        }
        let event_ids: Vec<String> = request
            .events
            .iter()
            .map(|event| truncate(&event.event_id, 128))
            .collect();
        let now = UnixNanos::now();
        let raws = request.events.into_iter().map(raw_touchpoint).collect();
        let validated = validate_batch(raws, now, &self.options.limits);

        let mut envelopes = Vec::new();
        let mut slots = Vec::with_capacity(count);
        for result in validated {
            match result {
                Ok(touchpoint) => {
                    let envelope = Envelope {
                        partner_id: partner.clone(),
                        touchpoint,
                        received_at: now,
                    };
                    let value = touchline_proto::encode_envelope(&envelope);
                    slots.push(Ok(envelopes.len()));
                    envelopes.push((envelope, value));
                }
                Err(rejection) => slots.push(Err(rejection)),
            }
        }
        let produced = if envelopes.is_empty() {
            Vec::new()
        } else {
            self.publisher.publish(&envelopes).await?
        };

        let mut response = v1::PublishResponse {
            batch_id: request.batch_id,
            ..v1::PublishResponse::default()
        };
        for (index, (slot, event_id)) in slots.into_iter().zip(event_ids).enumerate() {
            let result = match slot {
                Ok(position) => {
                    response.accepted += 1;
                    let produced =
                        produced
                            .get(position)
                            .copied()
                            .ok_or_else(|| Error::Unavailable {
                                reason: "the producer reported fewer deliveries than events"
                                    .to_owned(),
                                retry_after: std::time::Duration::from_secs(1),
                            })?;
                    event_result::Result::Accepted(v1::Accepted {
                        partition: produced.partition,
                        offset: produced.offset,
                    })
                }
                Err(rejection) => {
                    response.rejected += 1;
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
        debug!(partner = %partner, accepted = response.accepted, rejected = response.rejected, "published batch");
        Ok(response)
    }
}

/// Cuts a partner-provided string to at most `max` bytes on a character boundary.
fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<v1::PublishResponse, Status>> + Send>>;

#[tonic::async_trait]
impl v1::ingest_service_server::IngestService for IngestService {
    async fn publish(
        &self,
        request: Request<v1::PublishRequest>,
    ) -> Result<Response<v1::PublishResponse>, Status> {
        let partner = self.inner.authenticate(request.metadata())?;
        let response = self.inner.publish(&partner, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    type PublishStreamStream = ResponseStream;

    async fn publish_stream(
        &self,
        request: Request<Streaming<v1::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let partner = self.inner.authenticate(request.metadata())?;
        let window = self.inner.options.stream_window.max(1);
        let inner = Arc::clone(&self.inner);
        let draining = self.inner.draining.clone();
        // `buffered` keeps up to `window` batches in flight and yields their answers in request
        // order; when the window is full it stops pulling from the stream, so HTTP/2 flow control
        // pushes back on the partner instead of the server buffering.
        let mut answers = request
            .into_inner()
            .take_until(draining.clone().cancelled_owned())
            .map(move |batch| {
                let inner = Arc::clone(&inner);
                let partner = partner.clone();
                async move {
                    let batch = batch?;
                    inner.publish(&partner, batch).await.map_err(Status::from)
                }
            })
            .buffered(window)
            .boxed();
        let (sender, receiver) = mpsc::channel(window);
        tokio::spawn(async move {
            while let Some(answer) = answers.next().await {
                let failed = answer.is_err();
                if sender.send(answer).await.is_err() {
                    info!("partner closed the stream before reading every answer");
                    return;
                }
                if failed {
                    return;
                }
            }
            if draining.is_cancelled() {
                let status = Status::unavailable(
                    "the server is shutting down: reconnect and resend every batch without an answer",
                );
                let _ = sender.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn truncation_respects_character_boundaries() {
        assert_eq!(truncate("abc", 2), "ab");
        assert_eq!(truncate("\u{e9}\u{e9}", 3), "\u{e9}");
        assert_eq!(truncate("short", 128), "short");
    }
}
