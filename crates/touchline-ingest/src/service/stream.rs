//! `PublishStream`: a partner's batches on one stream, answered in request order.
//!
//! Each batch is admitted in order, one at a time, before the next one is read: its shape, its
//! token (authenticated again against the partners file in force), its share of the partner's
//! rate and its share of the stream's window. A full window therefore stops the server reading
//! the stream, and HTTP/2 flow control holds the partner back. An admitted batch then runs as a
//! task of its own: it waits for the rate it owes, for a slot of its partner's share and for a
//! server-wide slot, and is published.
//!
//! The stream ends at its first failed batch, with that batch's error as the last answer. No
//! batch after it is published: each one checks, up to the moment it would publish, whether an
//! earlier batch failed, so that nothing reaches Kafka without an answer the partner can see.
//! (Batches already being published when an earlier one fails cannot be called back; their
//! events are in Kafka without an answer, and a resend is stored once.) A batch dropped before it
//! was published gives the partner's rate back. The metrics count the one failure the partner is
//! told of.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use touchline_core::{PartnerId, UnixNanos};
use touchline_proto::v1;
use tracing::{debug, info};

use super::{Inner, ResponseStream, count_failed};
use crate::PartnerRegistry;
use crate::auth::{Authenticated, request_token};
use crate::{Error, Result};

/// Batches of one stream waiting for their answer in request order: at most this many; the window
/// in events is the real limit.
const MAX_PENDING_BATCHES: usize = 64;
/// How often a stream with no batch under way checks its token: a token revoked (or expired)
/// while its stream is idle ends the stream, not only at its next batch.
const TOKEN_CHECK: Duration = Duration::from_secs(1);

/// Why a batch got no response.
enum Failed {
    /// The batch failed: its events are counted as rejected if the partner is told.
    Batch { events: usize, error: Error },
    /// The request stream itself broke (a message that could not be decoded, a reset).
    Stream(Status),
}

type Answer = std::result::Result<v1::PublishResponse, Failed>;

/// A batch's share of the stream's window of events, held until its answer is handed to the
/// partner's connection: an answer that waits for the partner to read it holds a result per event
/// (and the batch's id, at most 128 bytes), so it counts against the window like the batch did.
/// The batch's share of the window of bytes (its request) is given back once it is published.
struct Window {
    _events: OwnedSemaphorePermit,
}

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
    // In KiB, so that a window of up to 1 GiB fits a semaphore's permits; at least one largest
    // message, so that any message the server decodes can be admitted.
    let window_kib = inner
        .options
        .stream_window_bytes
        .max(inner.options.max_message_bytes)
        .div_ceil(1024)
        .max(1);
    let shared = Arc::new(Shared {
        inner: Arc::clone(inner),
        opened_as: partner,
        token,
        window: StreamWindow::new(window_events),
        window_kib: StreamWindow::new(window_kib),
        gone: CancellationToken::new(),
        first_failure: watch::Sender::new(u64::MAX),
        received: AtomicU64::new(0),
    });
    let batches = Arc::clone(&shared);
    let mut next_index = 0_u64;
    // Whether the shutdown stopped the reading of the stream (not a stream the partner had ended).
    let cut = Arc::new(AtomicBool::new(false));
    let mut answers = request
        .into_inner()
        .take_until({
            let (draining, cut) = (inner.draining.clone(), Arc::clone(&cut));
            async move {
                draining.cancelled().await;
                cut.store(true, Ordering::Release);
            }
        })
        .then(move |batch| {
            let shared = Arc::clone(&batches);
            let index = next_index;
            next_index += 1;
            shared.received.store(next_index, Ordering::Release);
            async move {
                let batch = match batch {
                    Ok(batch) => batch,
                    Err(status) => {
                        shared.fail(index);
                        return Err(Failed::Stream(status));
                    }
                };
                let events = batch.events.len();
                match shared.admit(index, batch).await {
                    // Each batch runs as a task of its own: it finishes (and frees its
                    // server-wide slot) even while the partner is not reading answers.
                    Ok(admitted) => Ok(tokio::spawn(async move {
                        let run = std::panic::AssertUnwindSafe(shared.run(index, admitted));
                        match futures::FutureExt::catch_unwind(run).await {
                            Ok((result, window)) => (
                                result.map_err(|error| Failed::Batch { events, error }),
                                Some(window),
                            ),
                            // A bug: the stream ends at this batch, and the batches after it
                            // are not published (as after any failed batch).
                            Err(_) => {
                                shared.fail(index);
                                let failed =
                                    Error::BatchTaskFailed("the batch's task panicked".to_owned());
                                (Err(Failed::Stream(failed.into())), None)
                            }
                        }
                    })),
                    Err(error) => Err(Failed::Batch { events, error }),
                }
            }
        })
        .map(|admitted| async move {
            match admitted {
                Ok(work) => work.await.unwrap_or_else(|error| {
                    // Cancelled: the runtime is going away.
                    let failed = Error::BatchTaskFailed(error.to_string());
                    (Err(Failed::Stream(failed.into())), None)
                }),
                Err(failed) => (Err(failed), None),
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
        let mut told_failure = false;
        // Whether the partner went while answers were still coming (not after the last one).
        let mut partner_gone = false;
        let mut answered = 0_u64;
        // The registry the token was last found valid in, and until when.
        let mut valid = None;
        let mut check =
            tokio::time::interval_at(tokio::time::Instant::now() + TOKEN_CHECK, TOKEN_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A partner that disconnects frees its stream slot and window at once, even while
            // its next answer waits (for the partner's rate, say).
            let answer: Option<(Answer, Option<Window>)> = tokio::select! {
                // An answer that is ready goes first: a partner that read every answer and then
                // closed did not leave early.
                biased;
                answer = answers.next() => answer,
                () = sender.closed() => {
                    partner_gone = true;
                    None
                }
                _ = check.tick() => {
                    // Only while no batch is under way: one that is was admitted with the
                    // token, and is answered; a batch that comes later is checked itself.
                    if shared.received.load(Ordering::Acquire) == answered
                        && let Err(error) = shared.still_authenticated(&mut valid)
                    {
                        debug!(%error, "a stream's token no longer authenticates: ending it");
                        // No batch to count it against: counted as a stream its revoked token
                        // ended.
                        crate::metrics::INGEST.count_auth_failure("ingest", error.reason());
                        told_failure = true;
                        let _ = sender.send(Err(error.into())).await;
                        break;
                    }
                    continue;
                }
            };
            let Some((answer, window)) = answer else {
                break;
            };
            answered += 1;
            let (message, failed) = match answer {
                Ok(response) => (Ok(response), false),
                Err(Failed::Batch { events, error }) => {
                    // The one failure the partner is told of.
                    count_failed(&shared.opened_as, events, Some(&error));
                    if matches!(error, Error::TokenInvalid | Error::TokenExpired) {
                        // A stream its revoked (or expired) token ended, as the idle check
                        // counts one.
                        crate::metrics::INGEST.count_auth_failure("ingest", error.reason());
                    }
                    (Err(Status::from(error)), true)
                }
                Err(Failed::Stream(status)) => (Err(status), true),
            };
            told_failure = failed;
            if sender.send(message).await.is_err() {
                partner_gone = true;
                break;
            }
            // Handed to the connection: the next batches may take the batch's window.
            drop(window);
            if failed {
                break;
            }
        }
        if partner_gone {
            info!("partner closed the stream before reading every answer");
        } else if cut.load(Ordering::Acquire) && !told_failure {
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
    window: StreamWindow,
    /// The stream's window in KiB of the admitted batches' messages: batches that wait (for the
    /// partner's rate, for slots) hold their decoded requests, so the events alone do not bound
    /// a stream's memory (64 one-event messages of 4 MiB fit a window of events).
    window_kib: StreamWindow,
    /// Cancelled when the answers stop (the partner went, or the stream ended).
    gone: CancellationToken,
    /// The lowest index of a batch that failed; `u64::MAX` while none has.
    first_failure: watch::Sender<u64>,
    /// Batches read from the stream so far.
    received: AtomicU64,
}

/// A batch admitted to the stream: authenticated, charged to the partner's rate, holding its
/// share of the window.
struct Admitted {
    batch: v1::PublishRequest,
    /// How long the batch waits for the rate it was charged.
    wait: Duration,
    /// What it was charged, given back if it is dropped unpublished.
    charge: Option<Charge>,
    share: OwnedSemaphorePermit,
    bytes: OwnedSemaphorePermit,
}

/// Tokens a batch took from its partner's bucket: given back when it is dropped before the batch
/// is published, however that happens (an error, the stream's end, the admission's future
/// dropped with the stream).
struct Charge {
    inner: Arc<Inner>,
    partner: PartnerId,
    rate: f64,
    burst: f64,
    events: usize,
    spent: bool,
}

impl Charge {
    /// The batch is being published: the tokens are spent.
    fn spend(mut self) {
        self.spent = true;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if !self.spent {
            self.inner
                .rates
                .refund(&self.partner, self.rate, self.burst, self.events);
        }
    }
}

impl Shared {
    /// The partner the stream's token authenticates now; the stream was opened as this partner.
    fn authenticate(&self) -> Result<Authenticated> {
        self.authenticate_in(&self.inner.partners.current(), UnixNanos::now())
            .map(|(partner, _)| partner)
    }

    /// The partner the stream's token authenticates in `registry` at `now`, and when the token
    /// expires; the stream was opened as this partner.
    fn authenticate_in(
        &self,
        registry: &PartnerRegistry,
        now: UnixNanos,
    ) -> Result<(Authenticated, Option<UnixNanos>)> {
        let (partner, until) = registry.authenticate_until(&self.token, now)?;
        if partner.partner_id != self.opened_as.partner_id {
            // The file gave this token to another partner.
            return Err(Error::TokenInvalid);
        }
        Ok((partner, until))
    }

    /// Whether the stream's token still authenticates as the partner it was opened as; `valid`
    /// is the registry it was last found valid in, and until when: while the registry in force
    /// is that one and the token has not expired, nothing is hashed again (`None`); else the
    /// partner as the registry in force has it (its contract may have changed).
    fn still_authenticated(
        &self,
        valid: &mut Option<(Arc<PartnerRegistry>, Option<UnixNanos>)>,
    ) -> Result<Option<Authenticated>> {
        let registry = self.inner.partners.current();
        let now = UnixNanos::now();
        if let Some((checked, until)) = valid.as_ref()
            && Arc::ptr_eq(checked, &registry)
            && until.is_none_or(|until| now < until)
        {
            return Ok(None);
        }
        let (partner, until) = self.authenticate_in(&registry, now)?;
        *valid = Some((registry, until));
        Ok(Some(partner))
    }

    /// Batch `index` failed: the stream ends at it (or at an earlier failure).
    fn fail(&self, index: u64) {
        self.first_failure.send_if_modified(|first| {
            let earlier = index < *first;
            if earlier {
                *first = index;
            }
            earlier
        });
    }

    /// Whether batch `index` can no longer be answered: the partner went, or an earlier batch
    /// failed.
    fn ended_for(&self, index: u64) -> bool {
        self.gone.is_cancelled() || *self.first_failure.borrow() < index
    }

    /// Resolves once batch `index` can no longer be answered.
    async fn wait_ended_for(&self, index: u64) {
        let mut failures = self.first_failure.subscribe();
        loop {
            if *failures.borrow_and_update() < index {
                return;
            }
            tokio::select! {
                () = self.gone.cancelled() => return,
                changed = failures.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Admits batch `index`, in request order: its token (a token revoked or expired since the
    /// stream opened ends the stream here, before anything else is checked, as a unary call's
    /// token is checked before its request), its shape, its share of the partner's rate (taken in
    /// request order, paid for by waiting), its share of the window.
    async fn admit(&self, index: u64, batch: v1::PublishRequest) -> Result<Admitted> {
        let events = batch.events.len();
        let admitted = async {
            if self.ended_for(index) {
                return Err(Error::ShuttingDown);
            }
            let partner = self.authenticate()?;
            self.inner.check_shape(&batch)?;
            let (wait, charge) = match self.inner.rate_of(&partner) {
                Some((rate, burst)) => {
                    let wait =
                        self.inner
                            .rates
                            .take_owing(&partner.partner_id, rate, burst, events);
                    let charge = Charge {
                        inner: Arc::clone(&self.inner),
                        partner: partner.partner_id,
                        rate,
                        burst,
                        events,
                        spent: false,
                    };
                    (wait, Some(charge))
                }
                None => (Duration::ZERO, None),
            };
            let share = self.window.acquire(events).await?;
            // What the decoded batch holds, not its encoded size (attributes of a few bytes
            // take many times their size once decoded).
            let kib = touchline_proto::codec::decoded_request_bytes(&batch).div_ceil(1024);
            let bytes = self.window_kib.acquire(kib).await?;
            Ok(Admitted {
                batch,
                wait,
                charge,
                share,
                bytes,
            })
        }
        .await;
        if admitted.is_err() {
            self.fail(index);
        }
        admitted
    }

    /// Publishes an admitted batch once it has waited for the rate it owes and for a server-wide
    /// slot, unless the stream ended before it meanwhile (then its charge is given back). Returns
    /// the batch's share of the windows, which its answer holds until it is sent.
    async fn run(&self, index: u64, admitted: Admitted) -> (Result<v1::PublishResponse>, Window) {
        let Admitted {
            batch,
            wait,
            charge,
            share,
            bytes,
        } = admitted;
        let charged_rate = charge.as_ref().map(|charge| charge.rate);
        let ready = self.wait_for_turn(index, wait, charged_rate).await;
        let result = match ready {
            Ok((partner, slot)) => {
                if let Some(charge) = charge {
                    charge.spend();
                }
                let response = self.inner.publish(&partner, batch, None, ()).await;
                drop(slot);
                response
            }
            // Dropped unpublished: the charge is given back.
            Err(error) => Err(error),
        };
        // The request is gone: its bytes no longer count.
        drop(bytes);
        if result.is_err() {
            self.fail(index);
        }
        (result, Window { _events: share })
    }

    /// Waits for the rate batch `index` owes, for a slot of its partner's share and for a
    /// server-wide slot, then checks its token
    /// (revoked while it waited?) and the stream (an earlier batch failed meanwhile?). While it
    /// waits, its token is checked every [`TOKEN_CHECK`]: a token revoked or expired meanwhile
    /// ends the stream at this batch then, not once the waits are over.
    async fn wait_for_turn(
        &self,
        index: u64,
        wait: Duration,
        charged_rate: Option<f64>,
    ) -> Result<(Authenticated, [OwnedSemaphorePermit; 2])> {
        let draining = &self.inner.draining;
        let _waiting = Waiting::start(&self.opened_as.partner_id);
        // Where the token was last found valid, for every check of the waits.
        let mut valid = None;
        // Each wait looks at the shutdown and the stream's end first (`biased`): a batch whose
        // slot comes free as the drain starts is not published while one before it is refused.
        if !wait.is_zero() {
            debug!(partner = %self.opened_as.partner_id, ?wait, "stream batch over the partner's rate: waiting");
            // The wait can be long (a partner far over its rate pays for every event): a token
            // revoked or expired meanwhile ends the stream at this batch within a check, and a
            // rate changed meanwhile (the partners file reloaded) applies to what the batch
            // still owes, not once the wait is over. None: a debt no instant holds.
            let mut paid = tokio::time::Instant::now().checked_add(wait);
            let mut rate = charged_rate;
            loop {
                let check = tokio::time::Instant::now() + TOKEN_CHECK;
                let until = paid.map_or(check, |paid| paid.min(check));
                tokio::select! {
                    biased;
                    () = draining.cancelled() => return Err(Error::ShuttingDown),
                    () = self.wait_ended_for(index) => return Err(Error::ShuttingDown),
                    () = tokio::time::sleep_until(until) => {}
                }
                if paid.is_some_and(|paid| paid <= until) {
                    break;
                }
                if let Some(partner) = self.still_authenticated(&mut valid)? {
                    let now_rate = self.inner.rate_of(&partner).map(|(rate, _)| rate);
                    if now_rate != rate {
                        paid = repaid(paid, rate, now_rate);
                        rate = now_rate;
                    }
                }
            }
        }
        // The partner's share first: its batches wait behind one another, not in front of
        // other partners' for the server's slots.
        let share = self
            .checking(
                index,
                self.inner.calls.take(&self.opened_as.partner_id),
                &mut valid,
            )
            .await?
            .ok_or(Error::ShuttingDown)?;
        let slot = self
            .checking(
                index,
                Arc::clone(&self.inner.in_flight).acquire_owned(),
                &mut valid,
            )
            .await?
            .map_err(|_| Error::ShuttingDown)?;
        let partner = self.authenticate()?;
        // A batch that waited is published only if nothing ended the stream or started the
        // drain meanwhile (the batch refused before it may not have said so yet).
        if draining.is_cancelled() || self.ended_for(index) {
            return Err(Error::ShuttingDown);
        }
        Ok((partner, [slot, share]))
    }

    /// `waiting`'s outcome, unless the drain starts, the stream ends before batch `index` or its
    /// token no longer authenticates first (checked every [`TOKEN_CHECK`]; `valid` as for
    /// [`Shared::still_authenticated`]). `waiting` is polled throughout, so that it keeps its
    /// place in the queue it waits in.
    async fn checking<T>(
        &self,
        index: u64,
        waiting: impl Future<Output = T>,
        valid: &mut Option<(Arc<PartnerRegistry>, Option<UnixNanos>)>,
    ) -> Result<T> {
        let mut waiting = std::pin::pin!(waiting);
        let mut check =
            tokio::time::interval_at(tokio::time::Instant::now() + TOKEN_CHECK, TOKEN_CHECK);
        loop {
            tokio::select! {
                biased;
                () = self.inner.draining.cancelled() => return Err(Error::ShuttingDown),
                () = self.wait_ended_for(index) => return Err(Error::ShuttingDown),
                ready = &mut waiting => return Ok(ready),
                _ = check.tick() => {
                    self.still_authenticated(valid)?;
                }
            }
        }
    }
}

/// Counts a batch in `touchline_ingest_stream_batches_waiting` until dropped.
struct Waiting(prometheus_client::metrics::gauge::Gauge);

impl Waiting {
    fn start(partner: &PartnerId) -> Self {
        let gauge = crate::metrics::INGEST
            .stream_batches_waiting
            .get_or_create(&crate::metrics::PartnerLabels {
                partner: partner.to_string(),
            })
            .clone();
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// When a debt due at `paid` at `rate` is paid at `now_rate` from now on: at once without a
/// limit now; `None` for a debt no instant holds.
fn repaid(
    paid: Option<tokio::time::Instant>,
    rate: Option<f64>,
    now_rate: Option<f64>,
) -> Option<tokio::time::Instant> {
    let now = tokio::time::Instant::now();
    match (rate, now_rate) {
        (_, None) => Some(now),
        (Some(rate), Some(now_rate)) => {
            let left = paid.map_or(f64::INFINITY, |paid| {
                paid.saturating_duration_since(now).as_secs_f64()
            });
            Duration::try_from_secs_f64(left * rate / now_rate)
                .ok()
                .and_then(|left| now.checked_add(left))
        }
        // A batch that waits was charged a rate.
        (None, Some(_)) => paid,
    }
}

/// One of a stream's windows, in events or KiB.
#[derive(Debug)]
struct StreamWindow {
    permits: Arc<Semaphore>,
    size: u32,
}

impl StreamWindow {
    fn new(size: usize) -> Self {
        let size = u32::try_from(size.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        Self {
            permits: Arc::new(Semaphore::new(size as usize)),
            size,
        }
    }

    /// Takes `count` permits, at most the whole window: a batch larger than the window waits
    /// for all of it (a message re-encodes longer than it came, negative numbers as ten-byte
    /// varints, so its KiB can exceed a window of one largest message), never for more than
    /// there is.
    async fn acquire(&self, count: usize) -> Result<OwnedSemaphorePermit> {
        let permits = u32::try_from(count).unwrap_or(u32::MAX).clamp(1, self.size);
        Arc::clone(&self.permits)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| Error::ShuttingDown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_rate_rescales_what_a_batch_still_owes() {
        let now = tokio::time::Instant::now();
        let in_ten = Some(now + Duration::from_secs(10));
        let left = |paid: Option<tokio::time::Instant>| {
            paid.map(|paid| paid.saturating_duration_since(now).as_secs_f64())
        };
        let near = |left: Option<f64>, expected: f64| {
            left.is_some_and(|left| (left - expected).abs() < 0.5)
        };
        // Twice the rate: half the time left; half the rate: twice.
        assert!(near(left(repaid(in_ten, Some(1.0), Some(2.0))), 5.0));
        assert!(near(left(repaid(in_ten, Some(2.0), Some(1.0))), 20.0));
        // No limit any more: at once.
        assert!(near(left(repaid(in_ten, Some(1.0), None)), 0.0));
        // A debt no instant holds stays so, but for no limit.
        assert_eq!(repaid(None, Some(1.0), Some(2.0)), None);
        assert!(repaid(None, Some(1.0), None).is_some());
        assert_eq!(repaid(in_ten, Some(1.0), Some(f64::MIN_POSITIVE)), None);
    }

    /// A batch that counts more than the whole window (a message that re-encodes longer than it
    /// came) takes the whole window, once it is free, rather than waiting for ever.
    #[tokio::test]
    async fn a_batch_larger_than_its_window_takes_the_whole_window() -> anyhow::Result<()> {
        let window = StreamWindow::new(4);
        let whole = tokio::time::timeout(Duration::from_secs(5), window.acquire(10)).await??;
        assert_eq!(whole.num_permits(), 4);
        assert_eq!(window.permits.available_permits(), 0);
        drop(whole);
        let one = window.acquire(0).await?;
        assert_eq!(one.num_permits(), 1, "at least one permit");
        assert_eq!(window.permits.available_permits(), 3);
        Ok(())
    }
}
