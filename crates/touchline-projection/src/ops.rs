//! What ops run against a projector's store: rebuilds of a projection from the log (in the
//! background, beside the projector, switching atomically when caught up) and replays of the
//! Kafka topic into the log.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use touchline_core::UnixNanos;
use tracing::{error, info, warn};

use crate::metrics::{PROJECTOR, ProjectionLabel};
use crate::{OpsError, Projection, SledStore};

mod probe;
mod replay;

pub use probe::KafkaProbe;
pub use replay::{REPLAY_IDLE_TIMEOUT, ReplayError, ReplayFrom, ReplayProgress, replay};

/// Log events folded per atomic batch of a rebuild, unless configured otherwise.
pub const REBUILD_CHUNK: usize = 250;

/// Rebuild rounds since the gap to the log's end last came to a new low before the rebuild
/// switches anyway (folding the gap while the projector waits), when the gap is at most
/// [`MAX_FORCED_GAP`].
const MAX_ROUNDS_NOT_GAINING: u32 = 50;

/// Whether a rebuild gains on the log's end, net of its rounds' noise: the rounds since the gap
/// last came to a new low. (Counting rounds in a row whose gap did not shrink, a gap that
/// wandered up and down, the rebuild and ingest about as fast, reset the count at every round
/// that happened to shrink it, and the rebuild might never switch.)
#[derive(Debug)]
struct Gaining {
    lowest_gap: u64,
    rounds_since_low: u32,
}

impl Gaining {
    fn new() -> Self {
        Self {
            lowest_gap: u64::MAX,
            rounds_since_low: 0,
        }
    }

    /// Notes a round's `gap`; returns the rounds since the gap last came to a new low.
    fn observe(&mut self, gap: u64) -> u32 {
        if gap < self.lowest_gap {
            self.lowest_gap = gap;
            self.rounds_since_low = 0;
        } else {
            self.rounds_since_low = self.rounds_since_low.saturating_add(1);
        }
        self.rounds_since_low
    }
}

/// The largest gap to the log's end a rebuild that cannot gain on it folds under the store's
/// writer to switch (within one batch it always does): the projector waits while it is folded, a
/// fraction of a second at sled's rates here. A larger gap keeps folding in the background,
/// until ingest slows down.
const MAX_FORCED_GAP: u64 = 16_384;

/// How long a caller that starts a rebuild should wait for a cancelled rebuild of the same
/// projection to end (its current step, then the abandonment of its version; see
/// [`Rebuilds::ending`]) before it gives up.
pub const CANCELLED_END_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether a rebuild `gap` events from the log's end folds the rest under the writer and
/// switches now: within one batch (`chunk`) of the end, or, after `not_gaining` rounds without
/// the gap coming to a new low ([`Gaining`]), within [`MAX_FORCED_GAP`].
fn switch_now(gap: u64, chunk: u64, not_gaining: u32) -> bool {
    gap <= chunk || (not_gaining >= MAX_ROUNDS_NOT_GAINING && gap <= MAX_FORCED_GAP)
}

/// Where a rebuild stands.
#[derive(Debug, Clone, PartialEq)]
pub enum RebuildState {
    /// Folding the log into the new version.
    Running,
    /// The new version is active; the previous one is deleted after (in the background).
    Switched { previous: u32 },
    /// Cancelled: the active version is untouched; the new one is abandoned (listed as dropping)
    /// and deleted in the background after this is reported.
    Cancelled,
    /// Failed: the active version is untouched; the new one is abandoned (listed as dropping) and
    /// deleted in the background after this is reported (or after the next start).
    Failed(String),
}

/// Progress of one rebuild.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildProgress {
    pub projection: Projection,
    pub version: u32,
    /// Log events folded into the new version.
    pub done: u64,
    /// Events in the log now (it grows while events arrive).
    pub total: u64,
    /// Events folded per second since the rebuild started.
    pub rate: f64,
    pub started_at: UnixNanos,
    pub state: RebuildState,
}

impl RebuildProgress {
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.state != RebuildState::Running
    }
}

#[derive(Debug)]
struct Job {
    progress: watch::Receiver<RebuildProgress>,
    /// Stops the folding (`CancelRebuild`, or shutdown): the new version is dropped.
    cancel: CancellationToken,
    /// Stops the task altogether (shutdown), including the deletion of a replaced version after
    /// a switch, which a `CancelRebuild` arriving too late must not stop. `cancel` is its child.
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Job {
    /// Whether the rebuild has not ended: it has not reported its end, and its task has not
    /// ended without reporting it (it reports a panic as a failure).
    fn running(&self) -> bool {
        !self.progress.borrow().is_finished() && !self.task.is_finished()
    }
}

/// The rebuilds of one store: at most one per projection at a time.
#[derive(Debug)]
pub struct Rebuilds {
    store: Arc<SledStore>,
    chunk: usize,
    jobs: Mutex<HashMap<Projection, Job>>,
    /// Each job's progress, set (under `jobs`) as a job starts: read by [`Self::progress`]
    /// without `jobs`, which a start holds while it waits for the store's writer.
    progress: Mutex<BTreeMap<Projection, watch::Receiver<RebuildProgress>>>,
    /// Set (under `jobs`) by shutdown: no rebuild starts after it, so none runs unawaited.
    closed: AtomicBool,
    /// Deletions running in the background (of the version a switched rebuild replaced, when a
    /// new rebuild of the same projection starts; of leftovers found on open): shutdown stops and
    /// awaits them too.
    retiring: Mutex<Vec<Background>>,
}

/// A task of this store's ops running in the background: cancelled, then awaited, at shutdown.
#[derive(Debug)]
struct Background {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Rebuilds {
    /// Rebuilds of `store`, folding `chunk` log events per atomic batch.
    #[must_use]
    pub fn new(store: Arc<SledStore>, chunk: usize) -> Self {
        Self {
            store,
            chunk: chunk.max(1),
            jobs: Mutex::new(HashMap::new()),
            progress: Mutex::new(BTreeMap::new()),
            closed: AtomicBool::new(false),
            retiring: Mutex::new(Vec::new()),
        }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<Projection, Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a rebuild of `projection`, or attaches to the one running. Returns its progress
    /// and whether it was started by this call. The rebuild runs on until it switches, fails or
    /// is cancelled, whether anyone watches its progress or not. Blocking (it waits for the
    /// store's writer): call it off the async threads.
    ///
    /// # Errors
    /// [`OpsError::ShuttingDown`] once [`Self::shutdown`] began; [`OpsError::RebuildEnding`]
    /// while a cancelled rebuild of `projection` is still ending (wait for it, [`Self::ending`],
    /// and start again: attached to, its caller would be told it was cancelled, and nothing
    /// rebuilt); or when the store refuses to begin (it already builds a version this node does
    /// not run).
    pub fn start(
        &self,
        projection: Projection,
    ) -> std::result::Result<(watch::Receiver<RebuildProgress>, bool), OpsError> {
        self.start_with(projection, run_rebuild)
    }

    /// [`Self::start`], the rebuild itself done by `run`.
    fn start_with(
        &self,
        projection: Projection,
        run: RunRebuild,
    ) -> std::result::Result<(watch::Receiver<RebuildProgress>, bool), OpsError> {
        let mut jobs = self.jobs();
        if self.closed.load(Ordering::Acquire) {
            return Err(OpsError::ShuttingDown);
        }
        if let Some(job) = jobs.get(&projection)
            && job.running()
        {
            if job.cancel.is_cancelled() {
                return Err(OpsError::RebuildEnding { projection });
            }
            return Ok((job.progress.clone(), false));
        }
        let (version, total) = self.store.begin_rebuild(projection)?;
        info!(%projection, version, total, "rebuild started");
        let (sender, progress) = watch::channel(RebuildProgress {
            projection,
            version,
            done: 0,
            total,
            rate: 0.0,
            started_at: UnixNanos::now(),
            state: RebuildState::Running,
        });
        let stop = CancellationToken::new();
        let cancel = stop.child_token();
        let store = Arc::clone(&self.store);
        let chunk = self.chunk;
        let task = tokio::task::spawn_blocking({
            let (cancel, stop) = (cancel.clone(), stop.clone());
            move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&store, projection, version, chunk, &sender, &cancel, &stop);
                }));
                if let Err(panic) = ran {
                    failed_by_panic(&store, projection, version, &sender, &stop, panic.as_ref());
                }
            }
        });
        self.progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(projection, progress.clone());
        let replaced = jobs.insert(
            projection,
            Job {
                progress: progress.clone(),
                cancel,
                stop,
                task,
            },
        );
        if let Some(job) = replaced.filter(|job| !job.task.is_finished()) {
            let mut retiring = self
                .retiring
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            retiring.retain(|background| !background.task.is_finished());
            retiring.push(Background {
                cancel: job.stop,
                task: job.task,
            });
        }
        Ok((progress, true))
    }

    /// Deletes, in the background, the projection versions the store listed as dropping when it
    /// opened (an interrupted rebuild's, or a deletion a shutdown stopped): opening does not wait
    /// for them. Shutdown stops and awaits the deletion like a retiring version's; what is left is
    /// deleted after the next open.
    pub fn drop_leftovers(&self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let cancel = CancellationToken::new();
        let store = Arc::clone(&self.store);
        let task = tokio::task::spawn_blocking({
            let cancel = cancel.clone();
            move || match store.drop_leftovers(&cancel) {
                Ok(true) => {}
                Ok(false) => info!(
                    "stopped dropping leftover projection versions; they are dropped after the next start"
                ),
                Err(error) => {
                    warn!(%error, "cannot drop leftover projection versions now; they are dropped after the next start");
                }
            }
        });
        self.retiring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Background { cancel, task });
    }

    /// The progress of a rebuild of `projection` that was cancelled and has not ended yet (its
    /// current step, then the abandonment of its version): a start waits for its end (see
    /// [`Self::start`]). Takes the jobs' lock, which a start holds while it waits for the
    /// store's writer: call it off the async threads.
    #[must_use]
    pub fn ending(&self, projection: Projection) -> Option<watch::Receiver<RebuildProgress>> {
        self.jobs()
            .get(&projection)
            .filter(|job| job.cancel.is_cancelled() && job.running())
            .map(|job| job.progress.clone())
    }

    /// Cancels the running rebuild of `projection`; returns its progress, `None` when none runs.
    #[must_use]
    pub fn cancel(&self, projection: Projection) -> Option<watch::Receiver<RebuildProgress>> {
        let jobs = self.jobs();
        let job = jobs.get(&projection)?;
        if job.progress.borrow().is_finished() {
            return None;
        }
        job.cancel.cancel();
        Some(job.progress.clone())
    }

    /// The latest progress of every rebuild this node ran, running or finished: without waiting
    /// for a start (which waits for the store's writer, held by a verification's scan, say).
    #[must_use]
    pub fn progress(&self) -> BTreeMap<Projection, RebuildProgress> {
        self.progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(projection, progress)| (*projection, progress.borrow().clone()))
            .collect()
    }

    /// Cancels every running rebuild (and the deletion of replaced versions) and waits for them
    /// to stop (shutdown).
    pub async fn shutdown(&self) {
        // Closed under `jobs`, before the deletions are taken: a start either ran before (its
        // task is awaited here) or is refused.
        let tasks: Vec<JoinHandle<()>> = {
            let mut jobs = self.jobs();
            self.closed.store(true, Ordering::Release);
            let retiring = std::mem::take(
                &mut *self
                    .retiring
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            jobs.drain()
                .map(|(_, job)| Background {
                    cancel: job.stop,
                    task: job.task,
                })
                .chain(retiring)
                .map(|background| {
                    background.cancel.cancel();
                    background.task
                })
                .collect()
        };
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// What runs a rebuild: [`run_rebuild`] (tests give another).
type RunRebuild = fn(
    &SledStore,
    Projection,
    u32,
    usize,
    &watch::Sender<RebuildProgress>,
    &CancellationToken,
    &CancellationToken,
);

/// A rebuild task that panicked: its version is abandoned, its progress says it failed (so that
/// the projection can be rebuilt again without a restart, and its callers learn of the end), and
/// the version is deleted after, as a failed rebuild's is. A panic after the switch (deleting the
/// replaced version) leaves it switched; what was not deleted is deleted after the next open.
fn failed_by_panic(
    store: &SledStore,
    projection: Projection,
    version: u32,
    progress: &watch::Sender<RebuildProgress>,
    stop: &CancellationToken,
    panic: &(dyn std::any::Any + Send),
) {
    let reason = crate::panic_message(panic);
    let was_abandoned = store
        .projection_versions()
        .get(&projection)
        .is_some_and(|versions| versions.dropping.contains(&version));
    let report = || {
        progress.send_if_modified(|progress| {
            if progress.is_finished() {
                return false;
            }
            progress.state = RebuildState::Failed(format!("the rebuild panicked: {reason}"));
            true
        });
    };
    if was_abandoned {
        // Its end was reported (a cancel or a failure, then a panic deleting the version), or a
        // panic came between the abandonment and its report: reported now, unless it was.
        error!(%projection, version, reason, "the rebuild panicked while deleting its abandoned version; it is dropped on the next start");
        report();
        return;
    }
    let abandoned = store.abandon_rebuild(projection, version);
    if let Err(OpsError::NotBuilding { .. }) = abandoned {
        error!(%projection, version, reason, "the rebuild panicked after its switch; the new version serves");
        report();
        return;
    }
    error!(%projection, version, reason, "the rebuild panicked; the active version is untouched");
    abandon_reported(
        store, projection, version, stop, "failed", abandoned, report,
    );
}

/// Folds the log into `version` chunk by chunk until it is close to the end, then catches up and
/// switches under the writer. Cancellation and errors drop the new version.
fn run_rebuild(
    store: &SledStore,
    projection: Projection,
    version: u32,
    chunk: usize,
    progress: &watch::Sender<RebuildProgress>,
    cancel: &CancellationToken,
    stop: &CancellationToken,
) {
    let started = Instant::now();
    let label = ProjectionLabel {
        projection: projection.name().to_owned(),
    };
    let report = |done: u64, state: RebuildState| {
        let total = u64::try_from(store.log_len()).unwrap_or(u64::MAX);
        let elapsed = started.elapsed().as_secs_f64();
        PROJECTOR
            .rebuild_done
            .get_or_create(&label)
            .set(gauge(done));
        PROJECTOR
            .rebuild_total
            .get_or_create(&label)
            .set(gauge(total));
        progress.send_modify(|progress| {
            progress.done = done;
            progress.total = total.max(done);
            #[allow(clippy::cast_precision_loss, reason = "a rate")]
            let rate = if elapsed > 0.0 {
                done as f64 / elapsed
            } else {
                0.0
            };
            progress.rate = rate;
            progress.state = state;
        });
    };
    let mut next = 1;
    // Whether the rebuild gains on the projector's appends.
    let mut gaining = Gaining::new();
    let result = loop {
        if cancel.is_cancelled() {
            break Err(None);
        }
        let end = u64::try_from(store.log_len()).unwrap_or(u64::MAX) + 1;
        let gap = end.saturating_sub(next);
        let not_gaining = gaining.observe(gap);
        // Close to the end: the rest is folded under the writer, with the switch. Under an
        // ingest rate the rebuild cannot outrun, it switches anyway after a while, once the gap
        // is small enough for the projector to wait while it is folded.
        if not_gaining == MAX_ROUNDS_NOT_GAINING && gap > MAX_FORCED_GAP.max(chunk as u64) {
            warn!(
                %projection,
                gap,
                "the rebuild is outrun by ingest: it goes on folding in the background, and switches once within {MAX_FORCED_GAP} events of the log's end"
            );
        }
        if switch_now(gap, chunk as u64, not_gaining) {
            break store
                .finish_rebuild(projection, version, next, chunk)
                .map_err(Some);
        }
        match store.rebuild_step(projection, version, next, chunk) {
            Ok(after) => next = after,
            Err(error) => break Err(Some(error)),
        }
        report(next - 1, RebuildState::Running);
    };
    match result {
        Ok(switched) => {
            let done = u64::try_from(store.log_len()).unwrap_or(u64::MAX);
            if let Some(error) = &switched.unflushed {
                let what = format!(
                    "switched to version {version}, but the switch could not be made durable ({error}): the store has failed and stops its writes; after the restart version {version} serves if the switch reached the disk, version {} otherwise",
                    switched.previous
                );
                warn!(%projection, version, "rebuild {what}");
                // Not abandoned (it serves now) and the previous version not deleted (it may
                // serve after the restart).
                report(done, RebuildState::Failed(what));
                return;
            }
            let previous = switched.previous;
            info!(%projection, version, previous, done, seconds = started.elapsed().as_secs_f64(), "rebuild switched");
            report(done, RebuildState::Switched { previous });
            // The new version serves from the switch; deleting the old one is cleanup.
            // Past the switch a cancel has nothing left to stop; only shutdown stops the
            // deletion (what is left is deleted after the next open).
            store.retire(switched, stop);
        }
        Err(None) => {
            info!(%projection, version, "rebuild cancelled; the active version is untouched");
            abandon(store, projection, version, stop, "cancelled", || {
                report(next - 1, RebuildState::Cancelled);
            });
        }
        Err(Some(error)) => {
            warn!(%projection, version, %error, "rebuild failed; the active version is untouched");
            abandon(store, projection, version, stop, "failed", || {
                report(next - 1, RebuildState::Failed(error.to_string()));
            });
        }
    }
}

/// Abandons a rebuild's version, then reports its end (`ended`), then deletes the version (a
/// shutdown stops the deletion: the rest is deleted after the next open). The end is reported
/// before the deletion, which can take minutes on a large version: a cancel is answered, and a
/// new rebuild may start, meanwhile (`touchline status` lists the version as dropping).
fn abandon(
    store: &SledStore,
    projection: Projection,
    version: u32,
    stop: &CancellationToken,
    why: &str,
    ended: impl FnOnce(),
) {
    let abandoned = store.abandon_rebuild(projection, version);
    abandon_reported(store, projection, version, stop, why, abandoned, ended);
}

/// [`abandon`] once `abandoned` says how the version's abandonment went: reports the end, then
/// deletes the version.
fn abandon_reported(
    store: &SledStore,
    projection: Projection,
    version: u32,
    stop: &CancellationToken,
    why: &str,
    abandoned: std::result::Result<(), OpsError>,
    ended: impl FnOnce(),
) {
    ended();
    let dropped = match abandoned {
        Ok(()) => store
            .drop_abandoned(projection, version, &|| stop.is_cancelled())
            .map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
    };
    match dropped {
        Ok(true) => {}
        Ok(false) => {
            info!(%projection, version, "stopped dropping the {why} version; it is dropped on the next start");
        }
        Err(error) => {
            warn!(%projection, version, %error, "cannot drop the {why} version; it is dropped on the next start");
        }
    }
}

fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rebuild_switches_near_the_end_and_never_folds_a_large_gap_under_the_writer() {
        // Within a batch of the end: at once.
        assert!(switch_now(250, 250, 0));
        assert!(!switch_now(251, 250, 0));
        // Not gaining for long enough: within the bounded gap only.
        assert!(switch_now(MAX_FORCED_GAP, 250, MAX_ROUNDS_NOT_GAINING));
        assert!(!switch_now(MAX_FORCED_GAP, 250, MAX_ROUNDS_NOT_GAINING - 1));
        // A rebuild outrun early on (nearly the whole log to go) keeps folding in the background.
        assert!(!switch_now(1_000_000, 250, MAX_ROUNDS_NOT_GAINING));
        // Within a batch larger than the bound: at once all the same.
        assert!(switch_now(20_000, 20_000, 0));
    }

    #[test]
    fn a_gap_that_wanders_without_a_new_low_is_not_gaining() {
        let mut gaining = Gaining::new();
        assert_eq!(gaining.observe(5_000), 0);
        assert_eq!(gaining.observe(4_000), 0, "a new low");
        // Up and down above the low: the rebuild and ingest about as fast.
        for (round, gap) in [4_500, 4_200, 4_800, 4_100, 4_600].into_iter().enumerate() {
            assert_eq!(
                gaining.observe(gap),
                u32::try_from(round + 1).unwrap_or(u32::MAX)
            );
        }
        assert_eq!(gaining.observe(3_000), 0, "gaining again");
        assert_eq!(gaining.observe(3_000), 1, "the same gap is no gain");
    }

    /// The status (versions and rebuilds' progress) does not wait for the store's writer, which a
    /// verification holds for its summaries' scan: nor for a rebuild's start, which waits for the
    /// writer while it holds the jobs' lock.
    #[test]
    fn the_versions_and_the_progress_are_read_while_the_writer_is_held() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(SledStore::open(dir.path())?);
        let rebuilds = Rebuilds::new(Arc::clone(&store), 100);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()?;
        let writer = store.hold_writer();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        std::thread::scope(|scope| -> anyhow::Result<()> {
            let starting = scope.spawn(|| {
                let _runtime = runtime.enter();
                rebuilds
                    .start(Projection::Timeline)
                    .map(|(_, started)| started)
            });
            // The start holds the jobs' lock while it waits for the writer.
            while rebuilds.jobs.try_lock().is_ok() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the start did not begin"
                );
                std::thread::yield_now();
            }
            let (sender, read) = std::sync::mpsc::channel();
            let (store, rebuilds) = (&store, &rebuilds);
            scope.spawn(move || {
                let _ = sender.send((store.projection_versions(), rebuilds.progress()));
            });
            let read = read.recv_timeout(deadline - std::time::Instant::now());
            drop(writer);
            let (versions, progress) = read.map_err(|_| {
                anyhow::anyhow!("the versions or the progress waited for the writer")
            })?;
            assert_eq!(versions[&Projection::Timeline].building, None);
            assert!(progress.is_empty());
            assert!(matches!(starting.join(), Ok(Ok(true))));
            Ok(())
        })?;
        runtime.block_on(rebuilds.shutdown());
        Ok(())
    }

    async fn finished(
        mut progress: watch::Receiver<RebuildProgress>,
    ) -> anyhow::Result<RebuildProgress> {
        let finished = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            progress.wait_for(RebuildProgress::is_finished),
        )
        .await??;
        Ok(finished.clone())
    }

    /// Waits for the rebuild of `progress` to end, and checks that it switched.
    async fn switched(progress: watch::Receiver<RebuildProgress>) -> anyhow::Result<()> {
        let ended = finished(progress).await?;
        assert!(
            matches!(ended.state, RebuildState::Switched { .. }),
            "{ended:?}"
        );
        Ok(())
    }

    /// Lets the rebuild of the test below end once it was cancelled.
    static RELEASED: tokio::sync::Notify = tokio::sync::Notify::const_new();

    /// A start while a cancelled rebuild is still ending (its current step, then its version's
    /// abandonment) is refused rather than attached to that rebuild (whose caller would be told
    /// it was cancelled, and nothing rebuilt); once it has ended, a start starts a rebuild.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_start_while_a_cancelled_rebuild_ends_waits_for_its_end() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(SledStore::open(dir.path())?);
        let rebuilds = Arc::new(Rebuilds::new(Arc::clone(&store), 10));
        let (cancelled, started) = rebuilds.start_with(
            Projection::Timeline,
            |store, projection, version, _, progress, cancel, stop| {
                let runtime = tokio::runtime::Handle::current();
                runtime.block_on(cancel.cancelled());
                // Its step goes on until the test lets it end.
                runtime.block_on(RELEASED.notified());
                abandon(store, projection, version, stop, "cancelled", || {
                    progress.send_modify(|progress| progress.state = RebuildState::Cancelled);
                });
            },
        )?;
        assert!(started);
        // The rebuild is let end whatever the test finds, so that a failure ends it too.
        struct Release;
        impl Drop for Release {
            fn drop(&mut self) {
                RELEASED.notify_one();
            }
        }
        let release = Release;
        assert!(rebuilds.cancel(Projection::Timeline).is_some());
        let ending = Arc::clone(&rebuilds);
        let refused =
            tokio::task::spawn_blocking(move || ending.start(Projection::Timeline)).await?;
        assert!(
            matches!(refused, Err(OpsError::RebuildEnding { .. })),
            "{refused:?}"
        );
        let mut ending = rebuilds
            .ending(Projection::Timeline)
            .expect("the cancelled rebuild is ending");
        drop(release);
        ending.wait_for(RebuildProgress::is_finished).await?;
        assert!(rebuilds.ending(Projection::Timeline).is_none());
        let ended = finished(cancelled).await?;
        assert!(matches!(ended.state, RebuildState::Cancelled), "{ended:?}");
        let again = Arc::clone(&rebuilds);
        let (progress, started) =
            tokio::task::spawn_blocking(move || again.start(Projection::Timeline)).await??;
        assert!(started, "a rebuild of its own");
        switched(progress).await?;
        rebuilds.shutdown().await;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_rebuild_that_panics_fails_and_the_projection_can_be_rebuilt() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(SledStore::open(dir.path())?);
        let rebuilds = Rebuilds::new(Arc::clone(&store), 10);
        let (progress, started) = rebuilds.start_with(
            Projection::Timeline,
            |store, projection, version, chunk, _, _, _| {
                store
                    .rebuild_step(projection, version, 1, chunk)
                    .expect("steps");
                panic!("injected rebuild panic");
            },
        )?;
        assert!(started);
        let failed = finished(progress).await?;
        assert!(
            matches!(&failed.state, RebuildState::Failed(reason) if reason.contains("injected rebuild panic")),
            "{failed:?}"
        );
        // Its version is gone: nothing runs, nothing to cancel, and a new rebuild starts.
        assert_eq!(
            store.projection_versions()[&Projection::Timeline].building,
            None
        );
        assert!(rebuilds.cancel(Projection::Timeline).is_none());
        let (progress, started) = rebuilds.start(Projection::Timeline)?;
        assert!(started);
        switched(progress).await?;
        rebuilds.shutdown().await;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn no_rebuild_starts_once_shutdown_began() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(SledStore::open(dir.path())?);
        let rebuilds = Rebuilds::new(store, 10);
        rebuilds.shutdown().await;
        assert!(matches!(
            rebuilds.start(Projection::Timeline),
            Err(OpsError::ShuttingDown)
        ));
        Ok(())
    }
}
