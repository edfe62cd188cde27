//! The `AdminService` gRPC implementation: status, rebuilds, replays, dead letters, checksums.
//! Served by nodes that run the projector (they own the store). Every call is authorized first
//! by the node's admin check (admin tokens; partner tokens are refused).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};
use touchline_core::{EventStore as _, StreamIdentity};
use touchline_kafka::KafkaOptions;
use touchline_projection::ops::{
    CANCELLED_END_WAIT, KafkaProbe, RebuildProgress, Rebuilds, ReplayError, ReplayProgress, replay,
};
use touchline_projection::{AppliedOffsets, OpsError, Projection, Requeued, SledStore};
use touchline_proto::v1;

use crate::Error;
use crate::still_allowed::{send_while_allowed, until_revoked};

mod backup;
mod status;
mod wire;

pub(crate) use wire::{domain_dead_letter, wire_dead_letter};

use wire::{count, replay_from, stream_progress, wire_rebuild, wire_replay, wire_role};

/// Checks a call's metadata: for an admin, `Ok` with who called (as the audit log names the
/// caller: which token, never the token itself); otherwise the status to answer.
pub type Authorize = Arc<dyn Fn(&MetadataMap) -> Result<String, Status> + Send + Sync>;

/// How long status waits for the broker.
const STATUS_TIMEOUT: Duration = Duration::from_millis(1500);
/// Dead letters per page when the request does not say, and at most.
const DEFAULT_DEAD_LETTERS: usize = 100;
const MAX_DEAD_LETTERS: usize = 1000;
/// Stored bytes of dead letters per `ListDeadLetters` page, at most (past one): a dead letter
/// holds its whole Kafka record, up to the broker's record size, and a page stays well within the
/// 4 MiB that gRPC clients accept by default.
const MAX_DEAD_LETTER_PAGE_BYTES: usize = 2 << 20;

/// What the admin service works on: the projector's store and stream.
pub struct AdminContext {
    pub store: Arc<SledStore>,
    pub rebuilds: Arc<Rebuilds>,
    pub kafka: KafkaOptions,
    pub probe: Arc<KafkaProbe>,
    pub stream: StreamIdentity,
    /// The partitions this node owns.
    pub partitions: Vec<i32>,
    /// Durably projected offsets.
    pub applied: AppliedOffsets,
    /// Cancelled when the projector stops.
    pub projector_stopped: CancellationToken,
    /// Set once the projector has caught up with the log since the start (health's readiness).
    pub caught_up: Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled when the server shuts down: replays stop.
    pub shutdown: CancellationToken,
}

impl std::fmt::Debug for AdminContext {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AdminContext")
            .field("stream", &self.stream)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

/// The admin service. Cheap to clone.
#[derive(Clone)]
pub struct AdminService {
    context: Arc<AdminContext>,
    authorize: Authorize,
    /// Whether a replay runs, and the progress of the running or last one since the node started
    /// (`GetStatus`): one lock, so that both change together.
    replays: Arc<std::sync::Mutex<Replays>>,
    backups: backup::BackupSlot,
    /// One verification at a time: each pauses the projector while it reads the summaries.
    verifying: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct Replays {
    running: bool,
    last: Option<watch::Receiver<ReplayProgress>>,
    /// Told when a replay ends (its slot is dropped).
    ended: Arc<tokio::sync::Notify>,
}

impl AdminService {
    fn replays(&self) -> std::sync::MutexGuard<'_, Replays> {
        self.replays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for AdminService {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AdminService")
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

fn rejected(code: Code, reason: &'static str, message: impl Into<String>) -> Status {
    Error::Rejected {
        code,
        reason,
        message: message.into(),
    }
    .into()
}

fn projection(name: &str) -> Result<Projection, Status> {
    Projection::parse(name).ok_or_else(|| {
        rejected(
            Code::InvalidArgument,
            "UNKNOWN_PROJECTION",
            format!("unknown projection {name:?}: use \"timeline\" or \"summary\""),
        )
    })
}

fn ops_status(error: OpsError) -> Status {
    match error {
        OpsError::DeadLetterNotFound(_) => {
            rejected(Code::NotFound, "DEAD_LETTER_NOT_FOUND", error.to_string())
        }
        OpsError::StillUndecodable { .. } => rejected(
            Code::FailedPrecondition,
            "STILL_UNDECODABLE",
            error.to_string(),
        ),
        OpsError::RebuildRunning { .. } | OpsError::NotBuilding { .. } => rejected(
            Code::FailedPrecondition,
            "REBUILD_CONFLICT",
            error.to_string(),
        ),
        OpsError::RebuildEnding { .. } => rejected(
            Code::FailedPrecondition,
            "REBUILD_ENDING",
            error.to_string(),
        ),
        OpsError::BackupReading => rejected(
            Code::FailedPrecondition,
            "BACKUP_RUNNING",
            error.to_string(),
        ),
        OpsError::ShuttingDown => rejected(
            Code::Unavailable,
            "SHUTTING_DOWN",
            "the server is shutting down: start the rebuild once it is back",
        ),
        OpsError::Store(error) => Error::Store(error).into(),
    }
}

/// Starts a rebuild of `projection`, or attaches to the one running; a cancelled one still
/// ending is waited for first (up to [`CANCELLED_END_WAIT`]), so that a start right after a
/// cancel starts a rebuild. The rebuilds' lock and the start (which waits for the store's
/// writer) are taken on the blocking pool.
async fn start_rebuild(
    rebuilds: &Arc<Rebuilds>,
    projection: Projection,
) -> Result<(watch::Receiver<RebuildProgress>, bool), Status> {
    let deadline = tokio::time::Instant::now() + CANCELLED_END_WAIT;
    loop {
        let ending = Arc::clone(rebuilds);
        if let Some(mut ending) = tokio::task::spawn_blocking(move || ending.ending(projection))
            .await
            .map_err(blocking)?
        {
            // Past the deadline, the start below is refused (`REBUILD_ENDING`).
            let _ =
                tokio::time::timeout_at(deadline, ending.wait_for(RebuildProgress::is_finished))
                    .await;
        }
        let starting = Arc::clone(rebuilds);
        match tokio::task::spawn_blocking(move || starting.start(projection))
            .await
            .map_err(blocking)?
        {
            // Cancelled between the look and the start: wait for that one too.
            Err(OpsError::RebuildEnding { .. }) if tokio::time::Instant::now() < deadline => {}
            started => return started.map_err(ops_status),
        }
    }
}

fn blocking(error: tokio::task::JoinError) -> Status {
    Error::Blocking(error).into()
}

impl AdminService {
    #[must_use]
    pub fn new(context: AdminContext, authorize: Authorize) -> Self {
        Self {
            context: Arc::new(context),
            authorize,
            replays: Arc::default(),
            backups: backup::BackupSlot::default(),
            verifying: Arc::default(),
        }
    }

    /// The tonic server for this service.
    #[must_use]
    pub fn into_server(self) -> v1::admin_service_server::AdminServiceServer<Self> {
        v1::admin_service_server::AdminServiceServer::new(self)
    }

    /// The check every call passes (each method asks it again, for the caller it audits): a
    /// server also asks it of a call's headers, before the body is decoded.
    #[must_use]
    pub fn authorizer(&self) -> Authorize {
        Arc::clone(&self.authorize)
    }

    fn check<T>(&self, request: &Request<T>) -> Result<String, Status> {
        (self.authorize)(request.metadata())
    }

    /// Asks the authorizer again, while a streaming call runs, whether `request`'s caller may
    /// still make it (a revoked admin token ends its backup, replay or progress stream).
    fn still_allowed<T>(&self, request: &Request<T>) -> Arc<crate::StillAllowed> {
        crate::StillAllowed::of_call(&self.authorize, request.metadata())
    }

    /// Resolves once no replay runs. A stopping node waits for it after the server stopped (the
    /// shutdown stops a replay at its next batch), so that no replayed batch is written after the
    /// store's last flush.
    pub async fn replay_ended(&self) {
        let ended = Arc::clone(&self.replays().ended);
        loop {
            let notified = ended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.replays().running {
                return;
            }
            notified.await;
        }
    }
}

/// Logs an admin call that changes something, once it is done or refused, for the audit trail
/// (target `touchline::audit`): the action, what it applies to, who called (which token), from
/// where, and the outcome (`done`, or `refused` with the status). Returns `result`.
fn audit<T>(
    action: &'static str,
    subject: &dyn std::fmt::Display,
    caller: &str,
    peer: Option<std::net::SocketAddr>,
    result: Result<T, Status>,
) -> Result<T, Status> {
    match &result {
        Ok(_) => tracing::info!(
            target: "touchline::audit",
            action,
            %subject,
            caller,
            peer = ?peer,
            outcome = "done",
            "admin call"
        ),
        Err(status) => tracing::info!(
            target: "touchline::audit",
            action,
            %subject,
            caller,
            peer = ?peer,
            outcome = "refused",
            code = ?status.code(),
            error = status.message(),
            "admin call"
        ),
    }
    result
}

/// Clears the replay flag when the replay ends, however it ends.
struct ReplaySlot(Arc<std::sync::Mutex<Replays>>);

impl Drop for ReplaySlot {
    fn drop(&mut self) {
        let mut replays = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        replays.running = false;
        replays.ended.notify_waiters();
    }
}

#[tonic::async_trait]
impl v1::admin_service_server::AdminService for AdminService {
    type RebuildProjectionStream = wire::ProgressStream<v1::RebuildProgress>;
    type ReplayStream = wire::ProgressStream<v1::ReplayProgress>;
    type BackupStream = backup::BackupStream;

    async fn get_status(
        &self,
        request: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::GetStatusResponse>, Status> {
        self.check(&request)?;
        let service = self.clone();
        let status = tokio::task::spawn_blocking(move || service.status())
            .await
            .map_err(blocking)??;
        Ok(Response::new(status))
    }

    async fn rebuild_projection(
        &self,
        request: Request<v1::RebuildProjectionRequest>,
    ) -> Result<Response<Self::RebuildProjectionStream>, Status> {
        let caller = self.check(&request)?;
        let still_allowed = self.still_allowed(&request);
        let peer = request.remote_addr();
        let projection = projection(&request.into_inner().projection)?;
        let started = if self.context.shutdown.is_cancelled() {
            Err(ops_status(OpsError::ShuttingDown))
        } else {
            start_rebuild(&self.context.rebuilds, projection).await
        };
        // Audited refused too when the node drains, as a replay is.
        let (progress, _started) = audit("rebuild", &projection, &caller, peer, started)?;
        Ok(Response::new(stream_progress(
            progress,
            wire_rebuild,
            RebuildProgress::is_finished,
            self.context.shutdown.clone(),
            still_allowed,
        )))
    }

    async fn cancel_rebuild(
        &self,
        request: Request<v1::CancelRebuildRequest>,
    ) -> Result<Response<v1::RebuildProgress>, Status> {
        let caller = self.check(&request)?;
        let peer = request.remote_addr();
        let projection = projection(&request.into_inner().projection)?;
        // Off the async threads: a rebuild starting meanwhile holds the rebuilds' lock while it
        // waits for the store's writer.
        let rebuilds = Arc::clone(&self.context.rebuilds);
        let cancelled = tokio::task::spawn_blocking(move || rebuilds.cancel(projection))
            .await
            .map_err(blocking)?
            .ok_or_else(|| {
                rejected(
                    Code::NotFound,
                    "NO_REBUILD",
                    format!("no rebuild of {projection} is running"),
                )
            });
        let mut progress = audit("cancel-rebuild", &projection, &caller, peer, cancelled)?;
        // Report the end: the rebuild stops after its current chunk.
        let _ = progress
            .wait_for(RebuildProgress::is_finished)
            .await
            .map(|_| ());
        let last = progress.borrow().clone();
        Ok(Response::new(wire_rebuild(&last)))
    }

    async fn replay(
        &self,
        request: Request<v1::ReplayRequest>,
    ) -> Result<Response<Self::ReplayStream>, Status> {
        let caller = self.check(&request)?;
        let still_allowed = self.still_allowed(&request);
        let peer = request.remote_addr();
        let request = request.into_inner();
        let from = replay_from(request.from)?;
        let owned = &self.context.partitions;
        if let Some(partition) = request.partitions.iter().find(|p| !owned.contains(p)) {
            return Err(rejected(
                Code::InvalidArgument,
                "UNKNOWN_PARTITION",
                format!("this node does not own partition {partition} (it owns {owned:?})"),
            ));
        }
        let mut partitions = if request.partitions.is_empty() {
            owned.clone()
        } else {
            request.partitions
        };
        // A partition named twice is read once (Kafka refuses an assignment that lists it twice).
        partitions.sort_unstable();
        partitions.dedup();
        let (sender, progress) = watch::channel(ReplayProgress::default());
        let claimed = {
            let mut replays = self.replays();
            if self.context.shutdown.is_cancelled() {
                // None starts while the node drains: its planning (broker look-ups of up to 10 s
                // each) would hold the shutdown.
                Err(rejected(
                    Code::Unavailable,
                    "SHUTTING_DOWN",
                    "the server is shutting down: replay once it is back",
                ))
            } else if replays.running {
                Err(rejected(
                    Code::FailedPrecondition,
                    "REPLAY_RUNNING",
                    "another replay is running on this node; wait for it to end",
                ))
            } else {
                replays.running = true;
                replays.last = Some(progress.clone());
                Ok(())
            }
        };
        audit(
            "replay",
            &format!("partitions {partitions:?} from {from:?}"),
            &caller,
            peer,
            claimed,
        )?;
        let slot = ReplaySlot(Arc::clone(&self.replays));
        let (messages, receiver) = tokio::sync::mpsc::channel(16);
        let context = Arc::clone(&self.context);
        // A replay stops when the server shuts down, the caller goes away or its token is revoked.
        let cancel = context.shutdown.child_token();
        let told = Arc::clone(&still_allowed);
        tokio::spawn(async move {
            let forwarding = tokio::spawn({
                let messages = messages.clone();
                let cancel = cancel.clone();
                let still_allowed = Arc::clone(&still_allowed);
                let mut progress = progress;
                async move {
                    use futures::StreamExt as _;
                    // Nothing until the replay has planned its ranges (or failed to).
                    if progress.changed().await.is_err() {
                        return;
                    }
                    let mut forward = stream_progress(
                        progress,
                        wire_replay,
                        |p: &ReplayProgress| p.finished,
                        CancellationToken::new(),
                        Arc::clone(&still_allowed),
                    );
                    while let Some(message) = forward.next().await {
                        // An error here is the caller's revoked token, and so is a send given up
                        // while the caller does not read: the replay stops at once (the caller
                        // is told by the stream, `until_revoked`), as it does when the caller
                        // goes away.
                        let Ok(message) = message else {
                            cancel.cancel();
                            return;
                        };
                        if !send_while_allowed(&messages, Ok(message), Some(&still_allowed)).await {
                            cancel.cancel();
                            return;
                        }
                    }
                }
            });
            let result = replay(
                &context.kafka,
                Arc::clone(&context.store),
                from,
                &partitions,
                &touchline_projection::projector::Served::new(
                    context.kafka.partitions,
                    &context.partitions,
                ),
                &sender,
                &cancel,
                touchline_projection::ops::REPLAY_IDLE_TIMEOUT,
            )
            .await;
            // Nothing more is written: the next replay may start (and a stopping node go on)
            // while the caller reads the last progress.
            drop(slot);
            drop(sender);
            let _ = forwarding.await;
            if result.as_ref().is_ok_and(|state| !state.finished) && context.shutdown.is_cancelled()
            {
                let _ = messages
                    .send(Err(rejected(
                        Code::Unavailable,
                        "SHUTTING_DOWN",
                        "the server is shutting down; what was replayed so far stays",
                    )))
                    .await;
            }
            if let Err(error) = result {
                let status = match error {
                    ReplayError::UnknownPartition { .. } => rejected(
                        Code::InvalidArgument,
                        "UNKNOWN_PARTITION",
                        error.to_string(),
                    ),
                    ReplayError::RangeGone => rejected(
                        Code::FailedPrecondition,
                        "REPLAY_RANGE_GONE",
                        error.to_string(),
                    ),
                    ReplayError::Projection(touchline_projection::Error::Store(error)) => {
                        Error::Store(error).into()
                    }
                    // Whatever else went wrong (a write that panicked, say), a failed store is
                    // what the operator must know of, not Kafka.
                    ReplayError::Projection(error) if context.store.failure().is_some() => {
                        rejected(
                            Code::Internal,
                            "STORE_FAILED",
                            format!(
                                "the replay stopped ({error}): the store failed ({}), and the node stops",
                                context.store.failure().unwrap_or_default()
                            ),
                        )
                    }
                    // A replay task that panicked (a bug): not Kafka's doing.
                    ReplayError::Projection(touchline_projection::Error::Blocking(error)) => {
                        Error::Blocking(error).into()
                    }
                    ReplayError::Projection(error) => rejected(
                        Code::Unavailable,
                        "KAFKA_UNAVAILABLE",
                        format!("the replay could not read Kafka: {error}"),
                    ),
                };
                let _ = messages.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(until_revoked(
            ReceiverStream::new(receiver),
            told,
        ))))
    }

    async fn list_dead_letters(
        &self,
        request: Request<v1::ListDeadLettersRequest>,
    ) -> Result<Response<v1::ListDeadLettersResponse>, Status> {
        self.check(&request)?;
        let request = request.into_inner();
        let limit = match usize::try_from(request.limit).unwrap_or(usize::MAX) {
            0 => DEFAULT_DEAD_LETTERS,
            limit if limit > MAX_DEAD_LETTERS => {
                return Err(Error::InvalidArgument {
                    field: "limit",
                    reason: format!("limit is at most {MAX_DEAD_LETTERS}"),
                }
                .into());
            }
            limit => limit,
        };
        let store = Arc::clone(&self.context.store);
        let (dead_letters, total) = tokio::task::spawn_blocking(move || {
            store
                .dead_letter_page(request.after_id, limit, MAX_DEAD_LETTER_PAGE_BYTES)
                .map(|list| (list, store.dead_letter_count()))
        })
        .await
        .map_err(blocking)?
        .map_err(Error::from)?;
        Ok(Response::new(v1::ListDeadLettersResponse {
            dead_letters: dead_letters.into_iter().map(wire_dead_letter).collect(),
            total: count(total),
        }))
    }

    async fn requeue_dead_letter(
        &self,
        request: Request<v1::DeadLetterRequest>,
    ) -> Result<Response<v1::RequeueDeadLetterResponse>, Status> {
        let caller = self.check(&request)?;
        let peer = request.remote_addr();
        let id = request.into_inner().id;
        let store = Arc::clone(&self.context.store);
        let requeued = tokio::task::spawn_blocking(move || {
            let requeued = store.requeue_dead_letter(id)?;
            store.flush()?;
            Ok::<_, OpsError>(requeued)
        })
        .await
        .map_err(blocking)?
        .map_err(ops_status);
        let requeued = audit("requeue-dead-letter", &id, &caller, peer, requeued)?;
        Ok(Response::new(match requeued {
            Requeued::Appended { sequence } => v1::RequeueDeadLetterResponse {
                appended: true,
                sequence,
            },
            Requeued::Duplicate => v1::RequeueDeadLetterResponse {
                appended: false,
                sequence: 0,
            },
        }))
    }

    async fn discard_dead_letter(
        &self,
        request: Request<v1::DeadLetterRequest>,
    ) -> Result<Response<v1::DiscardDeadLetterResponse>, Status> {
        let caller = self.check(&request)?;
        let peer = request.remote_addr();
        let id = request.into_inner().id;
        let store = Arc::clone(&self.context.store);
        let discarded = tokio::task::spawn_blocking(move || {
            let discarded = store.discard_dead_letter(id)?;
            store.flush()?;
            Ok::<_, OpsError>(discarded)
        })
        .await
        .map_err(blocking)?
        .map_err(ops_status);
        let discarded = audit("discard-dead-letter", &id, &caller, peer, discarded)?;
        Ok(Response::new(v1::DiscardDeadLetterResponse {
            discarded: Some(wire_dead_letter(discarded)),
        }))
    }

    async fn verify_projections(
        &self,
        request: Request<v1::VerifyProjectionsRequest>,
    ) -> Result<Response<v1::VerifyProjectionsResponse>, Status> {
        self.check(&request)?;
        let store = Arc::clone(&self.context.store);
        // Calls wait their turn, so that their pauses of the projector do not stack; the turn
        // is held by the scan itself, which goes on when its caller goes.
        let turn = Arc::clone(&self.verifying).lock_owned().await;
        let (log_events, checksums) = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            store.verify()
        })
        .await
        .map_err(blocking)?
        .map_err(Error::from)?;
        Ok(Response::new(v1::VerifyProjectionsResponse {
            checksums: checksums
                .into_iter()
                .map(|checksum| v1::Checksum {
                    name: checksum.name.to_owned(),
                    version: checksum.version,
                    state: wire_role(checksum.role).into(),
                    entries: checksum.checksum.entries,
                    sha256: checksum.checksum.sha256,
                })
                .collect(),
            log_events,
        }))
    }

    async fn backup(
        &self,
        request: Request<v1::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let caller = self.check(&request)?;
        // Not a change, but every event leaves with it: audited when it starts (or is refused),
        // and when it ends.
        let claim = audit(
            "backup",
            &"the log, positions and dead letters",
            &caller,
            request.remote_addr(),
            self.backups.claim(),
        )?;
        Ok(Response::new(backup::stream(
            Arc::clone(&self.context.store),
            self.context.shutdown.clone(),
            self.still_allowed(&request),
            &self.backups,
            claim,
            caller,
        )))
    }
}
