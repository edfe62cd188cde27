//! The partner side of `PublishStream`, as `touchline publish` and the demo use it: batches go out
//! with a bounded window of unanswered ones; when the stream breaks (server restart, network,
//! shutdown) the client reconnects with backoff and resends every unanswered batch, in order.
//! Resending is safe: events are deduplicated by (partner, event id).

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::bail;
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

/// Whether a failed stream is worth opening again, and after how long.
fn retry_delay(status: &tonic::Status, attempt: u32) -> Option<Duration> {
    match status.code() {
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Unknown
        | Code::Aborted => {}
        _ => return None,
    }
    let backoff = Duration::from_millis(100).saturating_mul(2_u32.saturating_pow(attempt.min(6)));
    let suggested = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay);
    Some(
        suggested
            .unwrap_or(backoff)
            .max(backoff)
            .min(Duration::from_secs(5)),
    )
}

/// Publishes `events` (with their line numbers) as the partner of `token`.
///
/// # Errors
/// When the server refuses the credential or a batch for good, or stays unreachable for
/// `max_attempts` attempts.
pub async fn publish(
    target: &Target,
    token: &str,
    events: Vec<(usize, v1::Touchpoint)>,
    options: &PublishOptions,
) -> anyhow::Result<PublishReport> {
    // Read once: a TLS file that cannot be read fails now, not at every reconnection.
    let endpoint = target.endpoint()?;
    let batch_size = options.batch_size.max(1);
    let window = options.window.max(1);
    let mut pending: VecDeque<Batch> = VecDeque::new();
    let mut chunk = Batch {
        id: String::new(),
        lines: Vec::new(),
        events: Vec::new(),
    };
    let mut number = 0_usize;
    for (line, event) in events {
        chunk.lines.push(line);
        chunk.events.push(event);
        if chunk.events.len() == batch_size {
            chunk.id = number.to_string();
            number += 1;
            pending.push_back(std::mem::replace(
                &mut chunk,
                Batch {
                    id: String::new(),
                    lines: Vec::new(),
                    events: Vec::new(),
                },
            ));
        }
    }
    if !chunk.events.is_empty() {
        chunk.id = number.to_string();
        pending.push_back(chunk);
    }

    let mut report = PublishReport::default();
    let mut attempt = 0_u32;
    while !pending.is_empty() {
        let before = pending.len();
        let result =
            stream_once(&endpoint, token, &mut pending, window, options, &mut report).await;
        if pending.len() < before {
            // The stream got answers before it broke: the attempts count breaks in a row.
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
                tokio::time::sleep(delay).await;
                report.reconnects += 1;
            }
        }
    }
    Ok(report)
}

/// What a publish that stops got done: the answered events, and where the unanswered ones start
/// (resending those is safe: an event is stored once).
fn so_far(report: &PublishReport, pending: &VecDeque<Batch>) -> String {
    let unanswered: usize = pending.iter().map(|batch| batch.events.len()).sum();
    let from = pending
        .front()
        .and_then(|batch| batch.lines.first())
        .map(|line| format!(" from line {line} on"))
        .unwrap_or_default();
    format!(
        "before it: {} accepted, {} rejected; {unanswered} events without an answer{from} (resending them is safe)",
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
/// removes each batch once answered. Returns when everything is answered or the stream breaks.
async fn stream_once(
    endpoint: &Endpoint,
    token: &str,
    pending: &mut VecDeque<Batch>,
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
        sent -= 1;
        report.accepted += u64::from(answer.accepted);
        report.rejected += u64::from(answer.rejected);
        if options.print_rejections {
            for result in &answer.results {
                if let Some(v1::event_result::Result::Rejected(rejected)) = &result.result {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_are_retried_with_growing_backoff() {
        assert_eq!(retry_delay(&tonic::Status::unauthenticated("no"), 0), None);
        assert_eq!(retry_delay(&tonic::Status::invalid_argument("no"), 0), None);
        let first = retry_delay(&tonic::Status::unavailable("down"), 0).expect("retried");
        let later = retry_delay(&tonic::Status::unavailable("down"), 4).expect("retried");
        assert!(first < later && later <= Duration::from_secs(5));
    }
}
