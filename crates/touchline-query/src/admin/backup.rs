//! `AdminService.Backup`: a backup file's bytes ([`crate::backup::write`]) streamed as they are
//! made, from a blocking task that waits for the caller to read each piece.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use touchline_projection::SledStore;
use touchline_proto::v1;

use super::rejected;
use crate::backup::Written;
use crate::metrics;
use crate::still_allowed::{ending_with, send_while_allowed, until_revoked};
use crate::{Error, StillAllowed};

fn count(outcome: &'static str) {
    metrics::BACKUPS
        .get_or_create(&metrics::BackupLabel { outcome })
        .inc();
}

/// Pieces of the file made ahead of the caller's reading.
const AHEAD: usize = 4;

/// How long a backup stopped by the shutdown waits to tell its caller.
const SHUTDOWN_NOTICE: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the caller may leave a piece unread before the backup stops (a connected caller that
/// stopped reading would otherwise hold the backup, and its blocking thread, for ever).
const STALLED: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a backup runs on this node: one at a time (each holds a blocking thread and the index
/// of dead-lettered records in memory); and the last whole one since the node started, for the
/// status.
#[derive(Debug, Clone, Default)]
pub(super) struct BackupSlot {
    running: Arc<AtomicBool>,
    last: Arc<std::sync::Mutex<Option<Written>>>,
}

/// The running backup's claim on the slot, released when it ends however it ends.
pub(super) struct Claim(Arc<AtomicBool>);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl BackupSlot {
    pub(super) fn running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// The last whole backup since the node started.
    pub(super) fn last(&self) -> Option<Written> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(super) fn claim(&self) -> Result<Claim, Status> {
        self.running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| Claim(Arc::clone(&self.running)))
            .map_err(|_| {
                rejected(
                    Code::FailedPrecondition,
                    "BACKUP_RUNNING",
                    "another backup is running on this node; wait for it to end",
                )
            })
    }
}

/// Streams a backup of `store`, holding `claim` until it ends. It stops when the caller goes away
/// or reads nothing for a minute, ends with UNAVAILABLE (SHUTTING_DOWN) when `shutdown` is
/// cancelled, and with the error a new call would get once `still_allowed` says the caller's
/// token was revoked (checked before each piece and every second while a piece waits for the
/// caller): then the pieces made ahead are dropped, not sent, and the slot is freed at once.
/// How it ended goes to the audit trail (target `touchline::audit`, with `caller`), as its start
/// did.
pub(super) fn stream(
    store: Arc<SledStore>,
    shutdown: CancellationToken,
    still_allowed: Arc<StillAllowed>,
    slot: &BackupSlot,
    claim: Claim,
    caller: String,
) -> BackupStream {
    let last = Arc::clone(&slot.last);
    let (sender, receiver) = tokio::sync::mpsc::channel(AHEAD);
    let completed = Arc::new(AtomicBool::new(false));
    let done = Arc::clone(&completed);
    let asking = Arc::clone(&still_allowed);
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _claim = claim;
        let send = |message: Result<v1::BackupChunk, Status>| {
            runtime.block_on(async {
                let sending = send_while_allowed(&sender, message, Some(&asking));
                tokio::select! {
                    sent = tokio::time::timeout(STALLED, sending) => sent.unwrap_or_else(|_| {
                        tracing::warn!("backup stopped: the caller read nothing for {STALLED:?}");
                        false
                    }),
                    () = shutdown.cancelled() => false,
                }
            })
        };
        let written = crate::backup::write(&store, |data| send(Ok(v1::BackupChunk { data })));
        match written {
            Ok(Some(written)) => {
                done.store(true, Ordering::Release);
                count("done");
                metrics::LAST_BACKUP.set(written.taken_at.0 / 1_000_000_000);
                metrics::LAST_BACKUP_EVENTS.set(i64::try_from(written.events).unwrap_or(i64::MAX));
                *last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(written.clone());
                tracing::info!(
                    target: "touchline::audit",
                    action = "backup",
                    caller,
                    outcome = "streamed",
                    events = written.events,
                    bytes = written.bytes,
                    log_sha256 = %written.log.sha256,
                    "backup streamed"
                );
            }
            Ok(None) if shutdown.is_cancelled() => {
                count("stopped");
                tracing::info!(
                    target: "touchline::audit",
                    action = "backup",
                    caller,
                    outcome = "stopped",
                    "backup stopped: the server is shutting down"
                );
                // Told if it reads on within a second; its file ends without a trailer anyway.
                let _ = runtime.block_on(tokio::time::timeout(
                    SHUTDOWN_NOTICE,
                    sender.send(Err(rejected(
                        Code::Unavailable,
                        "SHUTTING_DOWN",
                        "the server is shutting down; take the backup again",
                    ))),
                ));
            }
            Ok(None) if asking.revoked().is_some() => {
                count("stopped");
                tracing::info!(
                    target: "touchline::audit",
                    action = "backup",
                    caller,
                    outcome = "stopped",
                    "backup stopped: the caller's token no longer authorizes it"
                );
            }
            Ok(None) => {
                count("stopped");
                tracing::info!(
                    target: "touchline::audit",
                    action = "backup",
                    caller,
                    outcome = "stopped",
                    "backup stopped: the caller went away or read nothing"
                );
            }
            Err(error) => {
                count("failed");
                tracing::error!(
                    target: "touchline::audit",
                    action = "backup",
                    caller,
                    outcome = "failed",
                    %error,
                    "backup failed"
                );
                let _ = send(Err(Error::Store(error).into()));
            }
        }
    });
    // A backup that stopped before its end (a caller that read nothing for a minute, a shutdown
    // whose notice could not be queued) ends with an error, never with OK: only the trailer
    // tells a whole file, and not every client reads it. A revoked caller gets nothing more once
    // the revocation is seen (the pieces made ahead are dropped), then its error.
    let pieces = ending_with(ReceiverStream::new(receiver), move || {
        (!completed.load(Ordering::Acquire)).then(|| {
            rejected(
                Code::Aborted,
                "BACKUP_STOPPED",
                "the backup stopped before its end (the caller read nothing for a minute, or the server is stopping): take it again",
            )
        })
    });
    Box::pin(until_revoked(pieces, still_allowed))
}

/// The answer of `Backup`: the file's pieces, then an error if it stopped before its end.
pub(super) type BackupStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::BackupChunk, Status>> + Send>>;
