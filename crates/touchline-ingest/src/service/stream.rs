//! `PublishStream`: a partner's batches on one stream, answered in request order.
//!
//! Each batch is admitted in order, one at a time, before the next one is read: its shape, its
//! token (authenticated again against the partners file in force), its share of the partner's
//! rate and its share of the stream's window. A full window therefore stops the server reading
//! the stream, and HTTP/2 flow control holds the partner back. An admitted batch then runs as a
//! task of its own: it waits for the rate it owes and for a server-wide slot, and is published.
//!
//! The stream ends at its first failed batch, with that batch's error as the last answer. No
//! batch after it is published: each one checks, up to the moment it would publish, whether an
//! earlier batch failed, so that nothing reaches Kafka without an answer the partner can see.
//! (Batches already being published when an earlier one fails cannot be called back; their
//! events are in Kafka without an answer, and a resend is stored once.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use touchline_core::UnixNanos;
use touchline_proto::v1;
use tracing::{debug, info};

use super::{Inner, ResponseStream, count_failed};
use crate::auth::{Authenticated, request_token};
use crate::{Error, Result};

/// Batches of one stream waiting for their answer in request order: at most this many; the window
/// in events is the real limit.
const MAX_PENDING_BATCHES: usize = 64;

/// Opens a stream: checks the partner's stream count, then reads, admits and answers batches.
pub(super) fn open(
    inner: &Arc<Inner>,
    request: Request<Streaming<v1::PublishRequest>>,
) -> std::result::Result<Response<ResponseStream>, Status> {
    let partner = inner.authenticate(&request)?;
    let token: Arc<str> = request_token(request.metadata())
        .ok_or(Error::TokenMissing)?
        .into();
    let max_streams = partner
        .contract
        .max_streams
        .unwrap_or(inner.options.max_streams_per_partner);
    let stream_slot = inner
        .streams
        .try_open(&partner.partner_id, max_streams)
        .ok_or(Error::TooManyStreams { max: max_streams })?;
    let window_events = inner
        .options
        .stream_window_events
        .max(inner.options.max_batch_events)
        .max(1);
    let shared = Arc::new(Shared {
        inner: Arc::clone(inner),
        opened_as: partner,
        token,
        window: Arc::new(Semaphore::new(window_events)),
        gone: CancellationToken::new(),
        first_failure: AtomicU64::new(u64::MAX),
        failed: CancellationToken::new(),
    });
    let draining = inner.draining.clone();
    let batches = Arc::clone(&shared);
    let mut next_index = 0_u64;
    let mut answers = request
        .into_inner()
        .take_until(draining.clone().cancelled_owned())
        .then(move |batch| {
            let shared = Arc::clone(&batches);
            let index = next_index;
            next_index += 1;
            async move {
                let admitted = match batch {
                    Ok(batch) => shared.admit(index, batch).await,
                    Err(status) => {
                        // The request stream broke (or a message could not be decoded).
                        shared.fail(index);
                        return Err(status);
                    }
                };
                // Each batch runs as a task of its own: it finishes (and frees its server-wide
                // slot) even while the partner is not reading answers.
                admitted
                    .map(|admitted| {
                        tokio::spawn(async move {
                            shared.run(index, admitted).await.map_err(Status::from)
                        })
                    })
                    .map_err(Status::from)
            }
        })
        .map(|admitted| async move {
            match admitted {
                Ok(work) => work.await.unwrap_or_else(|error| {
                    Err(Status::internal(format!("batch task failed: {error}")))
                }),
                Err(status) => Err(status),
            }
        })
        // Answers in request order; at most this many batches wait for theirs.
        .buffered(MAX_PENDING_BATCHES)
        .boxed();
    // A small answer queue: a partner that stops reading answers stops the stream from being
    // read, instead of answers piling up in memory.
    let (sender, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        let _stream_slot = stream_slot;
        let _gone = shared.gone.clone().drop_guard();
        loop {
            // A partner that disconnects frees its stream slot and window at once, even while
            // its next answer waits (for the partner's rate, say).
            let answer = tokio::select! {
                answer = answers.next() => answer,
                () = sender.closed() => None,
            };
            let Some(answer) = answer else { break };
            let failed = answer.is_err();
            if sender.send(answer).await.is_err() {
                break;
            }
            if failed {
                return;
            }
        }
        if sender.is_closed() {
            info!("partner closed the stream before reading every answer");
        } else if draining.is_cancelled() {
            let _ = sender.send(Err(Error::ShuttingDown.into())).await;
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
}

/// What the batches of one stream share.
#[derive(Debug)]
struct Shared {
    inner: Arc<Inner>,
    /// The partner the stream was opened as.
    opened_as: Authenticated,
    /// The stream's bearer token, authenticated again for each batch.
    token: Arc<str>,
    /// The stream's window in events.
    window: Arc<Semaphore>,
    /// Cancelled when the answers stop (the partner went, or the stream ended).
    gone: CancellationToken,
    /// The lowest index of a batch that failed; `u64::MAX` while none has.
    first_failure: AtomicU64,
    /// Cancelled at the first failure: wakes batches that wait, to check whether it was earlier.
    failed: CancellationToken,
}

/// A batch admitted to the stream: authenticated, charged to the partner's rate, holding its
/// share of the window.
struct Admitted {
    batch: v1::PublishRequest,
    /// How long the batch waits for the rate it was charged.
    wait: Duration,
    share: OwnedSemaphorePermit,
}

impl Shared {
    /// The partner the stream's token authenticates now; the stream was opened as this partner.
    fn authenticate(&self) -> Result<Authenticated> {
        let partner = self
            .inner
            .partners
            .current()
            .authenticate(&self.token, UnixNanos::now())?;
        if partner.partner_id != self.opened_as.partner_id {
            // The file gave this token to another partner.
            return Err(Error::TokenInvalid);
        }
        Ok(partner)
    }

    fn fail(&self, index: u64) {
        self.first_failure.fetch_min(index, Ordering::SeqCst);
        self.failed.cancel();
    }

    /// Whether a batch before `index` failed: the stream ends before batch `index` is answered.
    fn failed_before(&self, index: u64) -> bool {
        self.first_failure.load(Ordering::SeqCst) < index
    }

    /// Whether batch `index` can no longer be answered.
    fn ended_for(&self, index: u64) -> bool {
        self.gone.is_cancelled() || self.failed_before(index)
    }

    /// Resolves once batch `index` can no longer be answered.
    async fn wait_ended_for(&self, index: u64) {
        tokio::select! {
            () = self.gone.cancelled() => {}
            () = async {
                self.failed.cancelled().await;
                if !self.failed_before(index) {
                    // A later batch failed: this one is still answered (the forwarder stops at
                    // the first failure in request order, after it).
                    std::future::pending::<()>().await;
                }
            } => {}
        }
    }

    /// Admits batch `index`, in request order: its shape, its token (a token revoked or expired
    /// since the stream opened ends the stream here, before it charges the rate), its share of
    /// the partner's rate (taken in request order, paid for by waiting), its share of the window.
    async fn admit(&self, index: u64, batch: v1::PublishRequest) -> Result<Admitted> {
        let events = batch.events.len();
        let admitted = async {
            if self.ended_for(index) {
                return Err(Error::ShuttingDown);
            }
            self.inner.check_shape(events)?;
            let partner = self.authenticate()?;
            let wait = match self.inner.rate_of(&partner) {
                Some((rate, burst)) => {
                    self.inner
                        .rates
                        .take_owing(&partner.partner_id, rate, burst, events)
                }
                None => Duration::ZERO,
            };
            let share = acquire(&self.window, events).await?;
            Ok(Admitted { batch, wait, share })
        }
        .await;
        if let Err(error) = &admitted {
            self.failed(index, events, error);
        }
        admitted
    }

    /// Publishes an admitted batch once it has waited for the rate it owes and for a server-wide
    /// slot, unless the stream ended before it meanwhile.
    async fn run(&self, index: u64, admitted: Admitted) -> Result<v1::PublishResponse> {
        let events = admitted.batch.events.len();
        let result = self.publish(index, admitted).await;
        if let Err(error) = &result {
            self.failed(index, events, error);
        }
        result
    }

    async fn publish(&self, index: u64, admitted: Admitted) -> Result<v1::PublishResponse> {
        let Admitted { batch, wait, share } = admitted;
        let draining = &self.inner.draining;
        if !wait.is_zero() {
            debug!(partner = %self.opened_as.partner_id, ?wait, "stream batch over the partner's rate: waiting");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = draining.cancelled() => return Err(Error::ShuttingDown),
                () = self.wait_ended_for(index) => return Err(Error::ShuttingDown),
            }
        }
        let slot = tokio::select! {
            slot = Arc::clone(&self.inner.in_flight).acquire_owned() => {
                slot.map_err(|_| Error::ShuttingDown)?
            }
            () = draining.cancelled() => return Err(Error::ShuttingDown),
            () = self.wait_ended_for(index) => return Err(Error::ShuttingDown),
        };
        // Checked once more just before publishing: the token (revoked while the batch waited)
        // and the stream (an earlier batch failed meanwhile).
        let partner = self.authenticate()?;
        if self.ended_for(index) {
            return Err(Error::ShuttingDown);
        }
        let response = self.inner.publish(&partner, batch, None).await;
        drop(slot);
        drop(share);
        response
    }

    /// Batch `index` failed: the stream ends at it. Its events are counted as rejected with the
    /// reason, unless the batch was only stopped because the stream had already ended (then it
    /// is never answered, and the earlier failure was counted).
    fn failed(&self, index: u64, events: usize, error: &Error) {
        let stopped = self.ended_for(index);
        self.fail(index);
        if !stopped {
            count_failed(&self.opened_as, events, Some(error));
        }
    }
}

/// Takes `events` permits of a stream window (at most the whole window).
async fn acquire(window: &Arc<Semaphore>, events: usize) -> Result<OwnedSemaphorePermit> {
    let permits = u32::try_from(events)
        .unwrap_or(u32::MAX)
        .clamp(1, u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX));
    Arc::clone(window)
        .acquire_many_owned(permits)
        .await
        .map_err(|_| Error::ShuttingDown)
}
