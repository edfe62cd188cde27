//! The admin API's wire forms: progress, dead letters and version states as messages, a replay's
//! starting point from its request, and progress streamed from a watch channel.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use touchline_core::UnixNanos;
use touchline_projection::ops::{RebuildProgress, RebuildState, ReplayFrom, ReplayProgress};
use touchline_projection::{DeadLetter, VersionRole};
use touchline_proto::convert::{instant, timestamp};
use touchline_proto::v1;

use super::rejected;
use crate::StillAllowed;
use crate::still_allowed::{PERIOD, send_while_allowed, until_revoked};

pub(super) fn count(value: usize) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

/// The wire form of a rebuild's progress.
#[must_use]
pub(super) fn wire_rebuild(progress: &RebuildProgress) -> v1::RebuildProgress {
    let (state, previous_version, error) = match &progress.state {
        RebuildState::Running => (v1::RebuildState::Running, 0, String::new()),
        RebuildState::Switched { previous } => {
            (v1::RebuildState::Switched, *previous, String::new())
        }
        RebuildState::Cancelled => (v1::RebuildState::Cancelled, 0, String::new()),
        RebuildState::Failed(error) => (v1::RebuildState::Failed, 0, error.clone()),
    };
    v1::RebuildProgress {
        projection: progress.projection.name().to_owned(),
        version: progress.version,
        done: progress.done,
        total: progress.total,
        rate: progress.rate,
        state: state.into(),
        previous_version,
        error,
        started_at: Some(timestamp(progress.started_at)),
    }
}

pub(super) fn wire_replay(progress: &ReplayProgress) -> v1::ReplayProgress {
    v1::ReplayProgress {
        read: progress.read,
        appended: progress.appended,
        duplicates: progress.duplicates,
        dead_lettered: progress.dead_lettered,
        ranges: progress
            .ranges
            .iter()
            .map(|(partition, (start, end))| v1::PartitionRange {
                partition: *partition,
                start_offset: *start,
                end_offset: *end,
            })
            .collect(),
        partitions_done: u32::try_from(progress.partitions_done).unwrap_or(u32::MAX),
        finished: progress.finished,
    }
}

pub(crate) fn wire_dead_letter(dead_letter: DeadLetter) -> v1::DeadLetter {
    v1::DeadLetter {
        id: dead_letter.id,
        stream: dead_letter.stream,
        partition: dead_letter.partition,
        offset: dead_letter.offset,
        reason: dead_letter.reason,
        key: dead_letter.key,
        value: dead_letter.value,
        // A damaged dead letter's time is unknown (`DeadLetter::corrupt`).
        dead_lettered_at: (dead_letter.dead_lettered_at != UnixNanos(0))
            .then(|| timestamp(dead_letter.dead_lettered_at)),
    }
}

/// A dead letter from its wire form (a backup's); `None` when its time is not a valid instant.
pub(crate) fn domain_dead_letter(dead_letter: v1::DeadLetter) -> Option<DeadLetter> {
    Some(DeadLetter {
        dead_lettered_at: instant(dead_letter.dead_lettered_at.as_ref()?)?,
        id: dead_letter.id,
        stream: dead_letter.stream,
        partition: dead_letter.partition,
        offset: dead_letter.offset,
        reason: dead_letter.reason,
        key: dead_letter.key,
        value: dead_letter.value,
    })
}

pub(super) fn wire_role(role: VersionRole) -> v1::VersionState {
    match role {
        VersionRole::Active | VersionRole::Log => v1::VersionState::Active,
        VersionRole::Building => v1::VersionState::Building,
    }
}

/// A stream of progress messages (or of an error that ends it).
pub(super) type ProgressStream<W> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<W, Status>> + Send>>;

/// Streams a watch channel's values until `done` says the last one was sent, or the server shuts
/// down (then the stream ends with UNAVAILABLE, so that a graceful shutdown does not wait for it),
/// or the caller is no longer allowed (its token revoked: the stream ends with the error a new
/// call would get, within about a second, also while nothing changes or the caller does not
/// read).
pub(super) fn stream_progress<T, W>(
    mut progress: watch::Receiver<T>,
    wire: impl Fn(&T) -> W + Send + 'static,
    done: impl Fn(&T) -> bool + Send + 'static,
    shutdown: CancellationToken,
    still_allowed: Arc<StillAllowed>,
) -> ProgressStream<W>
where
    T: Clone + Send + Sync + 'static,
    W: Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    let asking = Arc::clone(&still_allowed);
    tokio::spawn(async move {
        let mut checks = tokio::time::interval(PERIOD);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changed = true;
        loop {
            if asking.revoked().is_some() {
                return;
            }
            if changed {
                let current = progress.borrow_and_update().clone();
                if !send_while_allowed(&sender, Ok(wire(&current)), Some(&asking)).await
                    || done(&current)
                {
                    return;
                }
            }
            // Updates are coalesced: at most one message per change, never a backlog. Ends when
            // the producer of the progress is gone (its last value was seen).
            tokio::select! {
                result = progress.changed() => {
                    if result.is_err() {
                        return;
                    }
                    changed = true;
                }
                _ = checks.tick() => changed = false,
                () = sender.closed() => return,
                () = shutdown.cancelled() => {
                    let _ = sender
                        .send(Err(rejected(
                            Code::Unavailable,
                            "SHUTTING_DOWN",
                            "the server is shutting down; what was done so far stays",
                        )))
                        .await;
                    return;
                }
            }
        }
    });
    Box::pin(until_revoked(ReceiverStream::new(receiver), still_allowed))
}

pub(super) fn replay_from(from: Option<v1::replay_request::From>) -> Result<ReplayFrom, Status> {
    let invalid = |message: &str| {
        rejected(
            Code::InvalidArgument,
            "INVALID_REPLAY_START",
            message.to_owned(),
        )
    };
    match from {
        Some(v1::replay_request::From::Earliest(true)) => Ok(ReplayFrom::Earliest),
        Some(v1::replay_request::From::Offset(offset)) if offset >= 0 => {
            Ok(ReplayFrom::Offset(offset))
        }
        Some(v1::replay_request::From::Offset(_)) => Err(invalid("offset must not be negative")),
        Some(v1::replay_request::From::Timestamp(at)) => instant(&at)
            .filter(|at| at.0 >= 0)
            .map(ReplayFrom::Timestamp)
            .ok_or_else(|| invalid("timestamp is not a valid instant at or after 1970")),
        Some(v1::replay_request::From::Earliest(false)) | None => Err(invalid(
            "say where to start: earliest, an offset or a timestamp",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use futures::StreamExt as _;

    use super::*;

    /// A progress stream of a caller whose token is revoked ends with the caller's error, also
    /// while the progress does not change; until then it stays open across the checks.
    #[tokio::test]
    async fn a_progress_stream_ends_once_its_caller_is_revoked_even_while_nothing_changes() {
        let (progress, receiver) = watch::channel(0_u32);
        let allowed = Arc::new(AtomicBool::new(true));
        let still = Arc::clone(&allowed);
        let mut stream = stream_progress(
            receiver,
            |value: &u32| *value,
            |_: &u32| false,
            CancellationToken::new(),
            Arc::new(StillAllowed::new(move || {
                if still.load(Ordering::Acquire) {
                    Ok(())
                } else {
                    Err(Status::unauthenticated("revoked"))
                }
            })),
        );
        let next = async |stream: &mut ProgressStream<u32>| {
            tokio::time::timeout(Duration::from_secs(30), stream.next())
                .await
                .expect("a message or the end within the deadline")
        };
        assert_eq!(next(&mut stream).await.map(Result::ok), Some(Some(0)));
        progress.send(1).expect("the stream listens");
        assert_eq!(next(&mut stream).await.map(Result::ok), Some(Some(1)));
        // Allowed: nothing is sent across more than one check, and the stream stays open.
        assert!(
            tokio::time::timeout(PERIOD * 2, stream.next())
                .await
                .is_err()
        );
        allowed.store(false, Ordering::Release);
        match next(&mut stream).await {
            Some(Err(status)) => assert_eq!(status.code(), Code::Unauthenticated),
            other => panic!("expected the caller's error, got {other:?}"),
        }
        assert!(next(&mut stream).await.is_none(), "and then the end");
        // The stream no longer listens to the progress (its producer sees the stream gone).
        tokio::time::timeout(Duration::from_secs(30), progress.closed())
            .await
            .expect("the producer lets the progress go");
        assert!(progress.send(2).is_err());
    }
}
