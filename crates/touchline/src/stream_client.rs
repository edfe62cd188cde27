//! The partner side of `PublishStream`, as `touchline publish` and the demo use it: batches go out
//! with a bounded window of unanswered ones; when the stream breaks (server restart, network,
//! shutdown) the client reconnects with backoff and resends every unanswered batch, in order.
//! Resending is safe: events are deduplicated by (partner, event id).

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::bail;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Endpoint;
use tonic_types::StatusExt as _;
use touchline_proto::v1;
use touchline_proto::v1::ingest_service_client::IngestServiceClient;

use crate::client::with_token;
use crate::connect::Target;

/// How a publish run behaves.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Events per request.
    pub batch_size: usize,
    /// Batches sent and not yet answered.
    pub window: usize,
    /// Reconnection attempts in a row before giving up.
    pub max_attempts: u32,
    /// Print each rejection with its line number.
    pub print_rejections: bool,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self {
            batch_size: 500,
            window: 8,
            max_attempts: 30,
            print_rejections: true,
        }
    }
}

/// Totals of a publish run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PublishReport {
    pub accepted: u64,
    pub rejected: u64,
    /// Times the stream was opened again after it broke.
    pub reconnects: u32,
}

struct Batch {
    id: String,
    lines: Vec<usize>,
    events: Vec<v1::Touchpoint>,
}

/// The longest wait before a reconnection, also when the server's `RetryInfo` asks for more.
const LONGEST_RETRY_DELAY: Duration = Duration::from_secs(60);

/// The message of the server's `INTERNAL` for a stream batch whose task failed (a bug on the
/// server; the process goes on): resending the unanswered batches is safe.
const BATCH_TASK_FAILED: &str = "batch task failed";

/// Whether a failed stream is worth opening again, and after how long: an exponential backoff
/// from 100 ms to 6.4 s with jitter (so that the clients a node's restart cut off do not all come
/// back at once), or the server's `RetryInfo` delay when that is longer, up to a minute.
fn retry_delay(status: &tonic::Status, attempt: u32) -> Option<Duration> {
    match status.code() {
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Unknown
        | Code::Aborted => {}
        Code::Internal if status.message().starts_with(BATCH_TASK_FAILED) => {}
        _ => return None,
    }
    let backoff = Duration::from_millis(100).saturating_mul(2_u32.saturating_pow(attempt.min(6)));
    // Equal jitter: half the backoff, and up to the other half at random.
    let jittered = backoff / 2 + backoff.mul_f64(random_fraction() / 2.0);
    let suggested = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .unwrap_or_default();
    Some(jittered.max(suggested).min(LONGEST_RETRY_DELAY))
}

/// A number in [0, 1), different at each call (the standard library's randomly keyed hasher).
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    #[allow(clippy::cast_precision_loss, reason = "53 random bits are plenty")]
    let fraction = (hasher.finish() >> 11) as f64 / (1_u64 << 53) as f64;
    fraction
}

/// The batches of a publish run, made from its events as the window takes them, so that a run
/// holds the unanswered batches only, however many events it has.
struct Batches<I> {
    events: I,
    batch_size: usize,
    /// Encoded bytes of a batch's events at most (one event larger than that goes alone).
    batch_bytes: usize,
    number: usize,
    /// Why the events ended early (a line that could not be read).
    failed: Option<anyhow::Error>,
    /// An event read that did not fit in the batch before it: the next batch's first.
    carried: Option<(usize, v1::Touchpoint)>,
}

/// Encoded bytes of a batch's events at most: the node refuses a request above
/// `ingest.max-message-bytes` (4 MiB by default) whole, and batches of a few large events (up to
/// 64 KiB each by default) reach that well before `--batch-size` events. Less than 4 MiB by what
/// the rest of a request takes.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

/// What `event` takes in a batch's encoding, as a repeated field: its tag, its length and itself.
fn batched_len(event: &v1::Touchpoint) -> usize {
    let encoded = event.encoded_len();
    1 + prost::length_delimiter_len(encoded) + encoded
}

impl<I: Iterator<Item = anyhow::Result<(usize, v1::Touchpoint)>>> Batches<I> {
    /// Makes batches until `pending` holds `window` of them or the events end.
    fn fill(&mut self, pending: &mut VecDeque<Batch>, window: usize) {
        while pending.len() < window && self.failed.is_none() {
            let mut batch = Batch {
                id: self.number.to_string(),
                lines: Vec::new(),
                events: Vec::new(),
            };
            let mut bytes = 0_usize;
            let mut ended = false;
            while batch.events.len() < self.batch_size {
                match self.carried.take().map(Ok).or_else(|| self.events.next()) {
                    Some(Ok((line, event))) => {
                        let size = batched_len(&event);
                        if !batch.events.is_empty() && bytes.saturating_add(size) > self.batch_bytes
                        {
                            self.carried = Some((line, event));
                            break;
                        }
                        bytes = bytes.saturating_add(size);
                        batch.lines.push(line);
                        batch.events.push(event);
                    }
                    Some(Err(error)) => {
                        self.failed = Some(error);
                        ended = true;
                        break;
                    }
                    None => {
                        ended = true;
                        break;
                    }
                }
            }
            if batch.events.is_empty() {
                return;
            }
            self.number += 1;
            pending.push_back(batch);
            if ended {
                return;
            }
        }
    }
}

/// Publishes `events` (with their line numbers) as the partner of `token`, reading them as the
/// window takes them. An event that cannot be read ends the run once the batches before it are
/// answered, with its error.
///
/// # Errors
/// When the server refuses the credential or a batch for good, or stays unreachable for
/// `max_attempts` attempts, or an event cannot be read.
pub async fn publish<I>(
    target: &Target,
    token: &str,
    events: I,
    options: &PublishOptions,
) -> anyhow::Result<PublishReport>
where
    I: IntoIterator<Item = anyhow::Result<(usize, v1::Touchpoint)>>,
{
    // Read once: a TLS file that cannot be read fails now, not at every reconnection.
    let endpoint = target.endpoint()?;
    let window = options.window.max(1);
    let mut batches = Batches {
        events: events.into_iter(),
        batch_size: options.batch_size.max(1),
        batch_bytes: MAX_BATCH_BYTES,
        number: 0,
        failed: None,
        carried: None,
    };
    let mut pending: VecDeque<Batch> = VecDeque::new();
    batches.fill(&mut pending, window);

    let mut report = PublishReport::default();
    let mut attempt = 0_u32;
    while !pending.is_empty() {
        let answered = report.accepted + report.rejected;
        let result = stream_once(
            &endpoint,
            token,
            &mut pending,
            &mut batches,
            window,
            options,
            &mut report,
        )
        .await;
        if report.accepted + report.rejected > answered {
            // The stream got answers before it broke: the attempts count breaks in a row (the
            // window, refilled from the file as answers come, says nothing of that).
            attempt = 0;
        }
        match result {
            Ok(()) => {}
            Err(status) => {
                let Some(delay) = retry_delay(&status, attempt) else {
                    bail!(
                        "the stream cannot go on: {} ({:?}); {}",
                        status.message(),
                        status.code(),
                        so_far(&report, &pending)
                    );
                };
                attempt += 1;
                if attempt > options.max_attempts {
                    bail!(
                        "gave up after {attempt} attempts: {}; {}",
                        status.message(),
                        so_far(&report, &pending)
                    );
                }
                tracing::warn!(code = ?status.code(), message = status.message(), unanswered = pending.len(), ?delay, "stream broke, reconnecting");
                if options.print_rejections {
                    // The command line's own note (its tracing is not set up): a run that waits
                    // says why.
                    eprintln!(
                        "the stream broke ({:?}: {}); reconnecting in {} ms to resend {} unanswered batches",
                        status.code(),
                        status.message(),
                        delay.as_millis(),
                        pending.len()
                    );
                }
                tokio::time::sleep(delay).await;
                report.reconnects += 1;
            }
        }
    }
    if let Some(error) = batches.failed {
        return Err(error.context(format!("the events stopped; {}", so_far(&report, &pending))));
    }
    Ok(report)
}

/// What a publish that stops got done: the answered events, and where the unanswered ones start
/// (resending those is safe: an event is stored once). Every event after the first unanswered
/// one is unanswered too (the rest of a file is read only as the window takes it).
fn so_far(report: &PublishReport, pending: &VecDeque<Batch>) -> String {
    let unanswered = pending
        .front()
        .and_then(|batch| batch.lines.first())
        .map(|line| {
            format!(
                "; every event from line {line} on is without an answer (resending them is safe)"
            )
        })
        .unwrap_or_default();
    format!(
        "before it: {} accepted, {} rejected{unanswered}",
        report.accepted, report.rejected
    )
}

/// A failed call as the status to act on: one that failed on the node's certificate or this
/// client's TLS settings (under TLS 1.3 a refused client certificate shows only at the first
/// call) stays so, and is not retried.
fn tls_refusal_is_final(status: tonic::Status) -> tonic::Status {
    if crate::connect::is_tls_refusal(&status) {
        tonic::Status::failed_precondition(format!(
            "refused by TLS: {}",
            crate::connect::error_chain(&status)
        ))
    } else {
        status
    }
}

/// One stream: sends batches from the front of `pending` with at most `window` unanswered, and
/// removes each batch once answered, making the next from `batches`. Returns when everything is
/// answered or the stream breaks.
async fn stream_once<I: Iterator<Item = anyhow::Result<(usize, v1::Touchpoint)>>>(
    endpoint: &Endpoint,
    token: &str,
    pending: &mut VecDeque<Batch>,
    batches: &mut Batches<I>,
    window: usize,
    options: &PublishOptions,
    report: &mut PublishReport,
) -> Result<(), tonic::Status> {
    let channel = endpoint.connect().await.map_err(|error| {
        let message = format!(
            "cannot connect to {}: {}",
            endpoint.uri(),
            crate::connect::error_chain(&error)
        );
        // A certificate the client does not trust (or TLS settings the node refuses) stays so:
        // not retried.
        if crate::connect::is_tls_refusal(&error) {
            tonic::Status::failed_precondition(message)
        } else {
            tonic::Status::unavailable(message)
        }
    })?;
    let mut client = IngestServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let (requests, outgoing) = mpsc::channel(window);
    let request = with_token(ReceiverStream::new(outgoing), token)
        .map_err(|error| tonic::Status::invalid_argument(error.to_string()))?;
    let mut answers = client
        .publish_stream(request)
        .await
        .map_err(tls_refusal_is_final)?
        .into_inner();
    let mut sent = 0;
    loop {
        // Fill the window; the channel has room for all of it, so this never waits.
        while sent < pending.len() && sent < window {
            let batch = &pending[sent];
            let request = v1::PublishRequest {
                events: batch.events.clone(),
                batch_id: batch.id.clone(),
            };
            if requests.send(request).await.is_err() {
                return Err(tonic::Status::unavailable("the stream closed"));
            }
            sent += 1;
        }
        if sent == 0 {
            return Ok(());
        }
        let Some(answer) = answers.message().await.map_err(tls_refusal_is_final)? else {
            return Err(tonic::Status::unavailable(
                "the server ended the stream with batches unanswered",
            ));
        };
        let batch = pending
            .front()
            .ok_or_else(|| tonic::Status::internal("an answer without a batch"))?;
        if answer.batch_id != batch.id {
            return Err(tonic::Status::internal(format!(
                "answer for batch {} while waiting for {}",
                answer.batch_id, batch.id
            )));
        }
        let (accepted, rejected) = check_answer(&answer, batch)?;
        sent -= 1;
        report.accepted += accepted;
        report.rejected += rejected;
        if options.print_rejections {
            for result in &answer.results {
                if let Some(v1::event_result::Result::Rejected(rejected)) = &result.result {
                    // Checked: one result per event, in order.
                    let line = batch
                        .lines
                        .get(result.index as usize)
                        .copied()
                        .unwrap_or_default();
                    let reason = v1::RejectReason::try_from(rejected.reason).map_or_else(
                        |_| rejected.reason.to_string(),
                        |reason| reason.as_str_name().to_owned(),
                    );
                    // A closed output does not stop the publishing: the rejections are
                    // counted, and the command fails on them at the end.
                    let _ = crate::outln!(
                        "line {line}: rejected {reason} ({}): {}",
                        rejected.field,
                        rejected.message
                    );
                }
            }
        }
        // Answered: taken off only now, so that a mismatched answer leaves it unanswered.
        pending.pop_front();
        batches.fill(pending, window);
    }
}

/// The accepted and rejected events of `answer`, once it is checked to be an answer to each
/// event of `batch`: one result per event, in order, each for the event's id, every one accepted
/// or rejected, and the counts the answer gives. Anything else is a server's bug that would count
/// events as answered that were not: the run stops (`INTERNAL`) with the batch unanswered.
fn check_answer(answer: &v1::PublishResponse, batch: &Batch) -> Result<(u64, u64), tonic::Status> {
    let mismatch = |what: String| {
        tonic::Status::internal(format!(
            "the answer to batch {} does not match it: {what}",
            batch.id
        ))
    };
    if answer.results.len() != batch.events.len() {
        return Err(mismatch(format!(
            "{} results for {} events",
            answer.results.len(),
            batch.events.len()
        )));
    }
    let (mut accepted, mut rejected) = (0_u64, 0_u64);
    for (index, (result, event)) in answer.results.iter().zip(&batch.events).enumerate() {
        if result.index as usize != index {
            return Err(mismatch(format!(
                "result {index} is for event {}",
                result.index
            )));
        }
        if result.event_id != touchline_core::ids::echoed_id(&event.event_id) {
            return Err(mismatch(format!(
                "result {index} is for event id {:?}, not {:?}",
                result.event_id, event.event_id
            )));
        }
        match result.result {
            Some(v1::event_result::Result::Accepted(_)) => accepted += 1,
            Some(v1::event_result::Result::Rejected(_)) => rejected += 1,
            None => return Err(mismatch(format!("result {index} says neither"))),
        }
    }
    if (accepted, rejected) != (u64::from(answer.accepted), u64::from(answer.rejected)) {
        return Err(mismatch(format!(
            "it counts {} accepted and {} rejected, its results {accepted} and {rejected}",
            answer.accepted, answer.rejected
        )));
    }
    Ok((accepted, rejected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_are_retried_with_growing_backoff() {
        assert_eq!(retry_delay(&tonic::Status::unauthenticated("no"), 0), None);
        assert_eq!(retry_delay(&tonic::Status::invalid_argument("no"), 0), None);
        assert_eq!(retry_delay(&tonic::Status::internal("a bug"), 0), None);
        assert!(retry_delay(&tonic::Status::internal(BATCH_TASK_FAILED), 0).is_some());
        for attempt in 0..10 {
            let delay = retry_delay(&tonic::Status::unavailable("down"), attempt).expect("retried");
            let backoff = Duration::from_millis(100) * 2_u32.pow(attempt.min(6));
            assert!(
                delay >= backoff / 2 && delay <= backoff,
                "attempt {attempt}: {delay:?} against {backoff:?}"
            );
        }
    }

    #[test]
    fn the_server_s_retry_delay_is_honoured_up_to_a_minute() {
        use tonic_types::{ErrorDetails, StatusExt as _};
        let asking = |seconds| {
            tonic::Status::with_error_details(
                Code::ResourceExhausted,
                "slow down",
                ErrorDetails::with_retry_info(Some(Duration::from_secs(seconds))),
            )
        };
        assert_eq!(retry_delay(&asking(20), 0), Some(Duration::from_secs(20)));
        assert_eq!(retry_delay(&asking(600), 0), Some(LONGEST_RETRY_DELAY));
    }

    #[test]
    fn jitter_spreads_the_clients() {
        let delays: std::collections::BTreeSet<Duration> = (0..20)
            .filter_map(|_| retry_delay(&tonic::Status::unavailable("down"), 3))
            .collect();
        assert!(delays.len() > 1, "every client would come back at once");
    }

    fn batch_of(ids: &[&str]) -> Batch {
        Batch {
            id: "7".to_owned(),
            lines: (1..=ids.len()).collect(),
            events: ids
                .iter()
                .map(|id| v1::Touchpoint {
                    event_id: (*id).to_owned(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn answer_of(results: &[(u32, &str, bool)]) -> v1::PublishResponse {
        let accepted = results.iter().filter(|(_, _, ok)| *ok).count();
        v1::PublishResponse {
            results: results
                .iter()
                .map(|(index, id, ok)| v1::EventResult {
                    index: *index,
                    event_id: (*id).to_owned(),
                    result: Some(if *ok {
                        v1::event_result::Result::Accepted(v1::Accepted::default())
                    } else {
                        v1::event_result::Result::Rejected(v1::Rejected::default())
                    }),
                })
                .collect(),
            accepted: u32::try_from(accepted).expect("small"),
            rejected: u32::try_from(results.len() - accepted).expect("small"),
            batch_id: "7".to_owned(),
        }
    }

    #[test]
    fn batches_are_made_as_the_window_takes_them_and_stop_at_an_unreadable_event() {
        let pulled = std::cell::Cell::new(0);
        let events = (1..=20).map(|line| {
            pulled.set(line);
            if line == 15 {
                Err(anyhow::anyhow!("line 15: invalid"))
            } else {
                Ok((line, v1::Touchpoint::default()))
            }
        });
        let mut batches = Batches {
            events,
            batch_size: 3,
            batch_bytes: MAX_BATCH_BYTES,
            number: 0,
            failed: None,
            carried: None,
        };
        let mut pending = VecDeque::new();
        batches.fill(&mut pending, 2);
        assert_eq!(
            (pending.len(), pulled.get()),
            (2, 6),
            "two batches of three read"
        );
        batches.fill(&mut pending, 2);
        assert_eq!(pulled.get(), 6, "a full window reads nothing");
        pending.pop_front();
        batches.fill(&mut pending, 4);
        let lines: Vec<Vec<usize>> = pending.iter().map(|batch| batch.lines.clone()).collect();
        assert_eq!(
            lines,
            [vec![4, 5, 6], vec![7, 8, 9], vec![10, 11, 12], vec![13, 14]]
        );
        let ids: Vec<&str> = pending.iter().map(|batch| batch.id.as_str()).collect();
        assert_eq!(ids, ["1", "2", "3", "4"]);
        assert_eq!(pulled.get(), 15, "nothing read past the unreadable event");
        assert!(batches.failed.is_some());
        pending.clear();
        batches.fill(&mut pending, 4);
        assert!(pending.is_empty(), "nothing after it");
    }

    /// A batch also ends before the event that would take its encoded size over its bound (the
    /// node refuses a request over its message size whole); an event larger than the bound goes
    /// alone.
    #[test]
    fn batches_end_at_their_bytes_too() {
        let event = |payload: usize| v1::Touchpoint {
            payload: vec![b'x'; payload],
            ..Default::default()
        };
        // Each event of 40 bytes of payload takes 44 in a batch (tags and lengths).
        let size = |payload: usize| batched_len(&event(payload));
        assert_eq!(size(40), 44);
        let payloads = [40, 40, 40, 200, 40, 40];
        let mut batches = Batches {
            events: payloads
                .iter()
                .enumerate()
                .map(|(index, payload)| Ok((index + 1, event(*payload)))),
            batch_size: 10,
            batch_bytes: 100,
            number: 0,
            failed: None,
            carried: None,
        };
        let mut pending = VecDeque::new();
        batches.fill(&mut pending, 10);
        let lines: Vec<Vec<usize>> = pending.iter().map(|batch| batch.lines.clone()).collect();
        assert_eq!(lines, [vec![1, 2], vec![3], vec![4], vec![5, 6]]);
        for batch in &pending {
            let bytes: usize = batch
                .events
                .iter()
                .map(|event| event.payload.len())
                .map(size)
                .sum();
            assert!(
                bytes <= 100 || batch.events.len() == 1,
                "batch {} takes {bytes} bytes",
                batch.id
            );
        }
    }

    #[test]
    fn an_answer_is_taken_only_when_it_answers_each_event_of_its_batch() {
        let batch = batch_of(&["a", "b"]);
        assert_eq!(
            check_answer(&answer_of(&[(0, "a", true), (1, "b", false)]), &batch).ok(),
            Some((1, 1))
        );
        for (what, answer) in [
            ("short", answer_of(&[(0, "a", true)])),
            ("out of order", answer_of(&[(1, "b", true), (0, "a", true)])),
            (
                "another event",
                answer_of(&[(0, "a", true), (1, "c", true)]),
            ),
            (
                "a prefix of the id",
                answer_of(&[(0, "", true), (1, "b", true)]),
            ),
            (
                "counts that disagree",
                v1::PublishResponse {
                    accepted: 0,
                    ..answer_of(&[(0, "a", true), (1, "b", true)])
                },
            ),
        ] {
            let refused = check_answer(&answer, &batch).expect_err(what);
            assert_eq!(refused.code(), Code::Internal, "{what}");
        }
        // An id over 128 bytes comes back cut, on a character boundary.
        let long = format!("{}é{}", "x".repeat(127), "y".repeat(70));
        let batch = batch_of(&[&long]);
        assert!(check_answer(&answer_of(&[(0, &long[..127], false)]), &batch).is_ok());
    }
}
