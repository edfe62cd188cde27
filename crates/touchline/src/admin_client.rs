//! The ops commands: `status`, `rebuild`, `replay`, `dead-letters`, `verify` (over the
//! `AdminService`) and `watch` (a live timeline over `TimelineService.WatchTimeline`).

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use tonic::Code;
use tonic::transport::Channel;
use touchline_core::UnixNanos;
use touchline_proto::v1;
use touchline_proto::v1::admin_service_client::AdminServiceClient;

use crate::client::{format_entry, timeline_client, timestamp_text, with_token};
use crate::connect::Target;

/// The largest admin answer the commands take: a dead letter holds a whole Kafka record, which a
/// broker may allow larger than gRPC's default 4 MiB.
const MAX_ADMIN_ANSWER_BYTES: usize = 64 << 20;

async fn admin_client(endpoint: &Target) -> anyhow::Result<AdminServiceClient<Channel>> {
    Ok(AdminServiceClient::new(endpoint.connect().await?)
        .max_decoding_message_size(MAX_ADMIN_ANSWER_BYTES))
}

/// Where `touchline replay` starts: `earliest`, an offset, or an RFC 3339 instant.
///
/// # Errors
/// When the text is none of those.
pub fn replay_start(text: &str) -> anyhow::Result<v1::replay_request::From> {
    if text == "earliest" {
        return Ok(v1::replay_request::From::Earliest(true));
    }
    if let Ok(offset) = text.parse::<i64>() {
        anyhow::ensure!(offset >= 0, "--from offset must not be negative");
        return Ok(v1::replay_request::From::Offset(offset));
    }
    let instant = UnixNanos::parse_rfc3339(text).with_context(|| {
        format!("--from {text:?} is neither \"earliest\", an offset nor an RFC 3339 instant")
    })?;
    let (seconds, nanos) = instant.to_parts();
    Ok(v1::replay_request::From::Timestamp(
        prost_types::Timestamp { seconds, nanos },
    ))
}

fn version_state(state: i32) -> &'static str {
    match v1::VersionState::try_from(state) {
        Ok(v1::VersionState::Active) => "active",
        Ok(v1::VersionState::Building) => "building",
        Ok(v1::VersionState::Dropping) => "dropping",
        _ => "?",
    }
}

fn rebuild_state(state: i32) -> &'static str {
    match v1::RebuildState::try_from(state) {
        Ok(v1::RebuildState::Running) => "running",
        Ok(v1::RebuildState::Switched) => "switched",
        Ok(v1::RebuildState::Cancelled) => "cancelled",
        Ok(v1::RebuildState::Failed) => "failed",
        _ => "?",
    }
}

fn known(value: i64) -> String {
    if value < 0 {
        "?".to_owned()
    } else {
        value.to_string()
    }
}

/// Prints the status as a compact table.
///
/// # Errors
/// When the server cannot be reached or refuses the call.
pub async fn print_status(endpoint: &Target, token: &str) -> anyhow::Result<()> {
    let status = admin_client(endpoint)
        .await?
        .get_status(with_token(v1::GetStatusRequest {}, token)?)
        .await?
        .into_inner();
    crate::outln!(
        "stream      {}/{}   kafka {}   projector {} ({})",
        status.cluster_id,
        status.topic,
        if status.kafka_reachable {
            "reachable"
        } else {
            "UNREACHABLE"
        },
        status.projector_state,
        if status.caught_up {
            "caught up"
        } else {
            "catching up"
        }
    )?;
    crate::outln!(
        "log         {} events ({} durable), store {:.1} MiB, {} dead letters",
        status.log_events,
        status.log_durable_events,
        f64::from(u32::try_from(status.store_bytes / 1024).unwrap_or(u32::MAX)) / 1024.0,
        status.dead_letters
    )?;
    crate::outln!(
        "backup      {}",
        match (&status.last_backup, status.backup_running) {
            (_, true) => "running".to_owned(),
            (Some(last), false) => format!(
                "last at {}: {} events, {:.1} MiB",
                timestamp_text(last.taken_at.as_ref()),
                last.events,
                f64::from(u32::try_from(last.bytes / 1024).unwrap_or(u32::MAX)) / 1024.0
            ),
            (None, false) => "none since the node started".to_owned(),
        }
    )?;
    crate::outln!()?;
    crate::outln!(
        "{:>9} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "partition",
        "low",
        "high",
        "log end",
        "projected",
        "lag"
    )?;
    for partition in &status.partitions {
        crate::outln!(
            "{:>9} {:>12} {:>12} {:>12} {:>12} {:>8}",
            partition.partition,
            known(partition.low_watermark),
            known(partition.high_watermark),
            partition.log_end_offset,
            partition.projected_offset,
            known(partition.lag)
        )?;
    }
    crate::outln!()?;
    crate::outln!(
        "{:<10} {:>7}  {:<28} last rebuild",
        "projection",
        "active",
        "versions"
    )?;
    for projection in &status.projections {
        let versions: Vec<String> = projection
            .versions
            .iter()
            .map(|v| format!("v{} {}", v.version, version_state(v.state)))
            .collect();
        let rebuild = projection.last_rebuild.as_ref().map_or_else(
            || "-".to_owned(),
            |r| {
                format!(
                    "v{} {} {}/{} ({:.0}/s)",
                    r.version,
                    rebuild_state(r.state),
                    r.done,
                    r.total,
                    r.rate
                )
            },
        );
        crate::outln!(
            "{:<10} {:>7}  {:<28} {rebuild}",
            projection.name,
            format!("v{}", projection.active_version),
            versions.join(", ")
        )?;
    }
    if let Some(replay) = &status.replay {
        crate::outln!()?;
        crate::outln!(
            "replay      {}: read {}, appended {}, duplicates {}, dead letters {}, partitions done {}/{}",
            if status.replay_running {
                "running"
            } else if replay.finished {
                "finished"
            } else {
                "stopped before the end"
            },
            replay.read,
            replay.appended,
            replay.duplicates,
            replay.dead_lettered,
            replay.partitions_done,
            replay.ranges.len()
        )?;
    }
    Ok(())
}

/// Rebuilds a projection with a progress bar (rate, ETA); or cancels the running rebuild.
///
/// # Errors
/// When the server refuses, the stream breaks or the rebuild fails or is cancelled.
pub async fn rebuild(
    endpoint: &Target,
    token: &str,
    projection: &str,
    cancel: bool,
) -> anyhow::Result<()> {
    let mut client = admin_client(endpoint).await?;
    if cancel {
        let progress = client
            .cancel_rebuild(with_token(
                v1::CancelRebuildRequest {
                    projection: projection.to_owned(),
                },
                token,
            )?)
            .await?
            .into_inner();
        crate::outln!(
            "rebuild of {projection} v{}: {} after {} events",
            progress.version,
            rebuild_state(progress.state),
            progress.done
        )?;
        return cancelled(&progress);
    }
    let mut stream = client
        .rebuild_projection(with_token(
            v1::RebuildProjectionRequest {
                projection: projection.to_owned(),
            },
            token,
        )?)
        .await?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} events  {per_sec}  ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last = None;
    while let Some(progress) = stream.next().await {
        let progress = progress?;
        if last.is_none() {
            bar.set_message(format!(
                "rebuilding {} v{}",
                progress.projection, progress.version
            ));
        }
        bar.set_length(progress.total);
        bar.set_position(progress.done);
        last = Some(progress);
    }
    bar.finish();
    let last = last.context("the server sent no progress")?;
    match v1::RebuildState::try_from(last.state) {
        Ok(v1::RebuildState::Switched) => {
            crate::outln!(
                "{} v{} is active ({} events, {:.0} events/s); v{} is deleted in the background",
                last.projection,
                last.version,
                last.done,
                last.rate,
                last.previous_version
            )?;
            Ok(())
        }
        Ok(v1::RebuildState::Running) => anyhow::bail!(
            "the progress stream ended while the rebuild runs on; `touchline rebuild {projection}` attaches to it again"
        ),
        _ => anyhow::bail!("{}", rebuild_ended(&last)),
    }
}

/// Whether the rebuild a cancel answered with ended cancelled (the command's success): one that
/// switched first (the cancel came during its final catch-up) or failed was not cancelled.
fn cancelled(progress: &v1::RebuildProgress) -> anyhow::Result<()> {
    match v1::RebuildState::try_from(progress.state) {
        Ok(v1::RebuildState::Cancelled) => Ok(()),
        Ok(v1::RebuildState::Switched) => anyhow::bail!(
            "not cancelled: the rebuild switched first, {} v{} is active",
            progress.projection,
            progress.version
        ),
        _ => anyhow::bail!("not cancelled: {}", rebuild_ended(progress)),
    }
}

/// What a rebuild that did not switch ended in, with its error.
fn rebuild_ended(progress: &v1::RebuildProgress) -> String {
    format!(
        "rebuild of {} v{} {}{}; the active version is untouched",
        progress.projection,
        progress.version,
        rebuild_state(progress.state),
        if progress.error.is_empty() {
            String::new()
        } else {
            format!(": {}", progress.error)
        }
    )
}

/// Replays the topic into the log, printing progress.
///
/// # Errors
/// When the server refuses or the replay fails.
pub async fn replay(
    endpoint: &Target,
    token: &str,
    from: v1::replay_request::From,
    partitions: Vec<i32>,
) -> anyhow::Result<()> {
    let mut stream = admin_client(endpoint)
        .await?
        .replay(with_token(
            v1::ReplayRequest {
                from: Some(from),
                partitions,
            },
            token,
        )?)
        .await?
        .into_inner();
    let mut last: Option<v1::ReplayProgress> = None;
    // The replay is the command's work, its lines only a report: output piped into a reader that
    // stopped (`touchline replay --from earliest | head -1`) stops the printing, not the replay
    // (leaving the stream would stop it at its next batch, and the command would end as if done).
    let mut printing = true;
    while let Some(progress) = stream.next().await {
        let progress = progress?;
        if printing && last.as_ref().is_none_or(|last| last.ranges.is_empty()) {
            for range in &progress.ranges {
                printing = still_open(crate::outln!(
                    "partition {}: offsets {}..{}",
                    range.partition,
                    range.start_offset,
                    range.end_offset
                ))?;
                if !printing {
                    break;
                }
            }
        }
        crate::note!(
            "\rread {}  appended {}  duplicates {}  dead letters {}  partitions done {}/{}",
            progress.read,
            progress.appended,
            progress.duplicates,
            progress.dead_lettered,
            progress.partitions_done,
            progress.ranges.len()
        );
        last = Some(progress);
    }
    crate::noteln!();
    let last = last.context("the server sent no progress")?;
    anyhow::ensure!(
        last.finished,
        "the replay stopped before reading every partition to its end (the server is shutting down?)"
    );
    if printing {
        still_open(crate::outln!(
            "replay done: {} records read, {} events appended, {} already in the log",
            last.read,
            last.appended,
            last.duplicates
        ))?;
    }
    Ok(())
}

/// Whether standard output is still open after a write: `false` once its reader went away, the
/// write's error otherwise.
fn still_open(written: Result<(), crate::OutputError>) -> Result<bool, crate::OutputError> {
    match written {
        Ok(()) => Ok(true),
        Err(error) if error.is_closed() => Ok(false),
        Err(error) => Err(error),
    }
}

/// What `touchline dead-letters` does.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DeadLetterAction {
    /// List dead letters, oldest first.
    List {
        /// Only dead letters after this id.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// How many, 1 to 1000.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// Decode a dead letter again and, when it decodes now, append it to the log.
    Requeue { id: u64 },
    /// Delete a dead letter.
    Discard { id: u64 },
}

fn print_dead_letter(dead_letter: &v1::DeadLetter) -> Result<(), crate::OutputError> {
    crate::outln!(
        "{:>6}  {}  partition {} offset {}  {}  ({} value bytes)",
        dead_letter.id,
        timestamp_text(dead_letter.dead_lettered_at.as_ref()),
        dead_letter.partition,
        dead_letter.offset,
        dead_letter.reason,
        dead_letter.value.as_ref().map_or(0, Vec::len)
    )
}

/// Lists, requeues or discards dead letters.
///
/// # Errors
/// When the server refuses the call.
pub async fn dead_letters(
    endpoint: &Target,
    token: &str,
    action: DeadLetterAction,
) -> anyhow::Result<()> {
    let mut client = admin_client(endpoint).await?;
    match action {
        DeadLetterAction::List { after, limit } => {
            let listed = client
                .list_dead_letters(with_token(
                    v1::ListDeadLettersRequest {
                        after_id: after,
                        limit,
                    },
                    token,
                )?)
                .await?
                .into_inner();
            for dead_letter in &listed.dead_letters {
                print_dead_letter(dead_letter)?;
            }
            crate::outln!(
                "({} shown, {} in the store)",
                listed.dead_letters.len(),
                listed.total
            )?;
        }
        DeadLetterAction::Requeue { id } => {
            let requeued = client
                .requeue_dead_letter(with_token(v1::DeadLetterRequest { id }, token)?)
                .await?
                .into_inner();
            if requeued.appended {
                crate::outln!(
                    "dead letter {id} appended to the log as event {}",
                    requeued.sequence
                )?;
            } else {
                crate::outln!(
                    "dead letter {id} decodes, and its event was already in the log; removed"
                )?;
            }
        }
        DeadLetterAction::Discard { id } => {
            let discarded = client
                .discard_dead_letter(with_token(v1::DeadLetterRequest { id }, token)?)
                .await?
                .into_inner();
            // Where its record was, for the operator's record of what was deleted.
            crate::outln!("dead letter {id} discarded:")?;
            if let Some(dead_letter) = &discarded.discarded {
                print_dead_letter(dead_letter)?;
            }
        }
    }
    Ok(())
}

/// Prints the checksums of the log and of every projection version.
///
/// # Errors
/// When the server refuses the call.
pub async fn verify(endpoint: &Target, token: &str) -> anyhow::Result<()> {
    let verified = admin_client(endpoint)
        .await?
        .verify_projections(with_token(v1::VerifyProjectionsRequest {}, token)?)
        .await?
        .into_inner();
    crate::outln!("at log event {}", verified.log_events)?;
    crate::outln!(
        "{:<10} {:>7} {:<9} {:>10}  sha256",
        "table",
        "version",
        "state",
        "entries"
    )?;
    for checksum in &verified.checksums {
        crate::outln!(
            "{:<10} {:>7} {:<9} {:>10}  {}",
            checksum.name,
            if checksum.name == "log" {
                "-".to_owned()
            } else {
                format!("v{}", checksum.version)
            },
            version_state(checksum.state),
            checksum.entries,
            checksum.sha256
        )?;
    }
    Ok(())
}

/// Attempts in a row, each bringing no progress, after which `touchline watch` gives up resuming
/// (about four minutes with [`resume_delay`]).
const WATCH_RESUME_ATTEMPTS: u32 = 12;

/// The wait before resuming attempt `failures` (from 1): a second, doubling up to 30 s.
fn resume_delay(failures: u32) -> Duration {
    Duration::from_secs(1)
        .saturating_mul(2_u32.saturating_pow(failures.saturating_sub(1)))
        .min(Duration::from_secs(30))
}

/// Whether a watch that ended (or could not be opened again) with `code` is worth resuming: lag
/// and shutdown, a connection reset or lost (tonic reports an I/O error as `UNKNOWN`), a store
/// error, a node whose watches are all taken. Refusals of the request or the token are final.
fn resumable(code: Code) -> bool {
    matches!(
        code,
        Code::Aborted
            | Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::ResourceExhausted
            | Code::Cancelled
            | Code::DeadlineExceeded
    )
}

/// Whether a watch that ended (or could not be opened again) with `status` is resumed: a
/// [`resumable`] code, but not a TLS refusal (a node's certificate this client does not trust,
/// or a client certificate it refuses), which trying again does not change.
fn worth_resuming(status: &tonic::Status) -> bool {
    resumable(status.code()) && !crate::connect::is_tls_refusal(status)
}

/// Prints a customer's timeline, then new entries as they are projected; reconnects with the
/// last cursor when the stream breaks.
///
/// # Errors
/// When the server refuses the call (other than by lag or shutdown).
pub async fn watch(
    endpoint: &Target,
    token: Option<&str>,
    customer_id: String,
    mut cursor: String,
) -> anyhow::Result<()> {
    // Whether this attempt resumes a watch this command already ran (not the cursor given).
    let mut resuming = false;
    // Attempts in a row that brought nothing.
    let mut failures = 0_u32;
    loop {
        if failures > 0 {
            tokio::time::sleep(resume_delay(failures)).await;
        }
        let mut client = match timeline_client(endpoint, token).await {
            Ok(client) => client,
            Err(error)
                if resuming
                    && failures < WATCH_RESUME_ATTEMPTS
                    && !error.chain().any(crate::connect::is_tls_refusal) =>
            {
                crate::noteln!("cannot reconnect ({error:#}); trying again");
                failures += 1;
                continue;
            }
            Err(error) => return Err(error),
        };
        let opened = client
            .watch_timeline(v1::WatchTimelineRequest {
                customer_id: customer_id.clone(),
                cursor: cursor.clone(),
            })
            .await;
        let mut stream = match opened {
            Ok(stream) => stream.into_inner(),
            Err(status)
                if resuming
                    && !cursor.is_empty()
                    && status.code() == Code::InvalidArgument
                    && status.message().contains("cursor") =>
            {
                // Reconnected to another node (or to one whose store was reset): the cursor is
                // not a position in its log. Start over there, and say so.
                crate::outln!(
                    "-- the cursor is not a position in this node's log ({}); starting over --",
                    status.message()
                )?;
                cursor.clear();
                continue;
            }
            Err(status)
                if resuming && worth_resuming(&status) && failures < WATCH_RESUME_ATTEMPTS =>
            {
                crate::noteln!(
                    "cannot resume the watch yet ({}); trying again",
                    status.message()
                );
                failures += 1;
                continue;
            }
            Err(status) => return Err(status.into()),
        };
        resuming = true;
        let resumed_from = cursor.clone();
        let ended = loop {
            match stream.next().await {
                Some(Ok(message)) => {
                    // Progress (not a catch-up read again: its messages carry the cursor it
                    // resumed from) starts the count of fruitless attempts again.
                    if message.cursor != resumed_from
                        || matches!(
                            message.event,
                            Some(v1::watch_timeline_response::Event::CaughtUp(_))
                        )
                    {
                        failures = 0;
                    }
                    match &message.event {
                        Some(v1::watch_timeline_response::Event::Entry(entry)) => {
                            let marker = if message.late { "late " } else { "" };
                            crate::outln!(
                                "{marker}{}  cursor={}",
                                format_entry(entry),
                                message.cursor
                            )?;
                        }
                        Some(v1::watch_timeline_response::Event::CaughtUp(_)) => {
                            crate::outln!(
                                "-- caught up; live from here -- cursor={}",
                                message.cursor
                            )?;
                        }
                        None => {}
                    }
                    cursor = message.cursor;
                }
                Some(Err(status)) => break Some(status),
                None => break None,
            }
        };
        match ended {
            Some(status) if worth_resuming(&status) && failures < WATCH_RESUME_ATTEMPTS => {
                crate::noteln!(
                    "watch interrupted ({}); resuming from the last cursor",
                    status.message()
                );
                failures += 1;
            }
            Some(status) => return Err(status.into()),
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_resumes_after_transient_ends_only_and_backs_off_to_30_s() {
        for code in [
            Code::Aborted,
            Code::Unavailable,
            Code::Unknown,
            Code::Internal,
        ] {
            assert!(resumable(code), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::FailedPrecondition,
            Code::Unimplemented,
        ] {
            assert!(!resumable(code), "{code:?}");
        }
        // A TLS alert (as h2 hands it on: text in an I/O error) is not resumed.
        let mut refused = tonic::Status::unknown("transport error");
        refused.set_source(std::sync::Arc::new(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: CertificateRequired",
        )));
        assert!(!worth_resuming(&refused));
        assert!(worth_resuming(&tonic::Status::unknown("transport error")));
        let waits: Vec<u64> = (1..=WATCH_RESUME_ATTEMPTS)
            .map(|failures| resume_delay(failures).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30, 30, 30, 30, 30]);
    }

    /// `touchline rebuild X --cancel` succeeds only when the rebuild ended cancelled.
    #[test]
    fn a_cancel_succeeds_only_when_the_rebuild_ended_cancelled() {
        let ended = |state: v1::RebuildState, error: &str| v1::RebuildProgress {
            projection: "timeline".to_owned(),
            version: 2,
            state: state.into(),
            error: error.to_owned(),
            ..v1::RebuildProgress::default()
        };
        assert!(cancelled(&ended(v1::RebuildState::Cancelled, "")).is_ok());
        let switched = cancelled(&ended(v1::RebuildState::Switched, ""))
            .expect_err("switched first")
            .to_string();
        assert!(switched.contains("timeline v2 is active"), "{switched}");
        let failed = cancelled(&ended(v1::RebuildState::Failed, "disk full"))
            .expect_err("failed")
            .to_string();
        assert!(
            failed.contains("failed: disk full") && failed.contains("not cancelled"),
            "{failed}"
        );
    }
}
