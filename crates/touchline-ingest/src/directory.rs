//! The live partners file: reloaded on SIGHUP and when the file changes, without a restart. A file
//! that fails to load (or would leave no partner where there were some) keeps the previous
//! registry in force, with a logged error.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use crate::files::{Stamp, digest, stamp};

use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use touchline_core::UnixNanos;

use crate::auth::{Authenticated, request_token};
use crate::{PartnerRegistry, Result};

/// How often the file is checked for a change.
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Checks in a row that find a file changed again before a warning says so (a file rewritten
/// more often than it is checked is never read half-way).
const UNSETTLED_CHECKS: u32 = 5;

/// A cheap, cloneable handle on the registry in force.
#[derive(Debug, Clone)]
pub struct PartnerDirectory {
    current: Arc<RwLock<Arc<PartnerRegistry>>>,
    path: Option<PathBuf>,
    /// The file's stamp before it was read: a change made meanwhile (the node starting) is
    /// reloaded by [`Self::watch`].
    loaded: Option<Stamp>,
}

/// Counts a reload of the file by its result.
fn reloads(result: &'static str) {
    crate::metrics::INGEST
        .partner_reloads
        .get_or_create(&crate::metrics::ReloadLabels { result })
        .inc();
}

/// Records the registry now in force: when it was loaded, and its partners.
fn loaded(registry: &PartnerRegistry) {
    let metrics = &crate::metrics::INGEST;
    metrics
        .partners_loaded_at
        .set(UnixNanos::now().to_parts().0);
    metrics
        .partners
        .set(i64::try_from(registry.partner_ids().len()).unwrap_or(i64::MAX));
}

impl From<PartnerRegistry> for PartnerDirectory {
    fn from(registry: PartnerRegistry) -> Self {
        Self::fixed(registry)
    }
}

impl PartnerDirectory {
    /// A registry that never changes (dev mode, tests).
    #[must_use]
    pub fn fixed(registry: PartnerRegistry) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(registry))),
            path: None,
            loaded: None,
        }
    }

    /// Loads the partners file at `path`.
    ///
    /// # Errors
    /// When the file cannot be read or is invalid.
    pub fn load(path: &Path) -> Result<Self> {
        let stamped = stamp(path);
        let registry = PartnerRegistry::load(path)?;
        loaded(&registry);
        Ok(Self {
            current: Arc::new(RwLock::new(Arc::new(registry))),
            path: Some(path.to_owned()),
            loaded: stamped,
        })
    }

    /// The registry in force.
    #[must_use]
    pub fn current(&self) -> Arc<PartnerRegistry> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The partner `token` authenticates under the registry in force now.
    ///
    /// # Errors
    /// [`crate::Error::TokenInvalid`] or [`crate::Error::TokenExpired`].
    pub fn authenticate(&self, token: &str) -> Result<Authenticated> {
        self.current().authenticate(token, UnixNanos::now())
    }

    /// The partner a call's bearer token authenticates.
    ///
    /// # Errors
    /// [`crate::Error::TokenMissing`] without a bearer token, else as [`Self::authenticate`].
    pub fn authenticate_call(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Authenticated> {
        let token = request_token(metadata).ok_or(crate::Error::TokenMissing)?;
        self.authenticate(token)
    }

    /// Reloads the file. On failure the registry in force stays.
    ///
    /// # Errors
    /// When the file cannot be read or is invalid, or lists no partner while the registry in
    /// force has some (a file caught empty or cut short while it was written in place; a node
    /// whose partners all go is restarted with the file that says so).
    pub fn reload(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let registry = PartnerRegistry::load(path).and_then(|registry| {
            if registry.partner_ids().is_empty() && !self.current().partner_ids().is_empty() {
                return Err(crate::Error::PartnersFile(format!(
                    "{} lists no partner: the partners in force stay (a file being written in place is read again once it changes; to remove every partner, restart the node)",
                    path.display()
                )));
            }
            Ok(registry)
        });
        let registry = match registry {
            Ok(registry) => registry,
            Err(error) => {
                reloads("failed");
                return Err(error);
            }
        };
        reloads("ok");
        loaded(&registry);
        let partners = registry.partner_ids().len();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(registry);
        info!(path = %path.display(), partners, "partners file reloaded");
        Ok(())
    }

    fn reload_logged(&self) -> bool {
        match self.reload() {
            Ok(()) => true,
            Err(error) => {
                error!(%error, "partners file not reloaded, the previous one stays in force");
                false
            }
        }
    }

    /// Reloads on SIGHUP and when the file changes, until `shutdown`.
    pub async fn watch(self, shutdown: CancellationToken) {
        let Some(path) = self.path.clone() else {
            return;
        };
        watch_file(&path, self.loaded, "the partners file", shutdown, || {
            self.reload_logged()
        })
        .await;
    }
}

/// Calls `reload` on SIGHUP and whenever the file at `path` (`what`, for the logs) changes, until
/// `shutdown`: how a file the node runs with is reloaded without a restart. The file is checked
/// every 2 s and read once it has stayed the same for one check, so that a file written in place
/// is not read half-written (a SIGHUP reads it at once); where its stamp moves at every check,
/// once its bytes stayed the same for a check (a file system whose stamps move by themselves). A
/// change whose bytes are those in force (a stamp that moved alone) is not reloaded. `loaded` is its stamp before it was last
/// read (a change since is reloaded). A reload that fails (`reload` returns false) is tried once
/// more at the next check, even without a new change.
pub async fn watch_file(
    path: &Path,
    loaded: Option<Stamp>,
    what: &str,
    shutdown: CancellationToken,
    reload: impl FnMut() -> bool,
) {
    watch_file_with(path, loaded, what, hangups(what), shutdown, reload).await;
}

/// The process's SIGHUPs from now on, each a reload of `what` (for the log, when they cannot be
/// listened for: never, elsewhere than on unix).
#[must_use]
pub fn hangups(what: &str) -> futures::stream::BoxStream<'static, ()> {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut signal) => {
            futures::stream::poll_fn(move |context| signal.poll_recv(context)).boxed()
        }
        Err(error) => {
            error!(%error, "cannot listen for SIGHUP: {what} reloaded only on a change");
            futures::stream::pending().boxed()
        }
    }
    #[cfg(not(unix))]
    {
        let _ = what;
        futures::stream::pending().boxed()
    }
}

/// [`watch_file`], reloading whenever `hangups` yields.
async fn watch_file_with(
    path: &Path,
    loaded: Option<Stamp>,
    what: &str,
    mut hangups: futures::stream::BoxStream<'static, ()>,
    shutdown: CancellationToken,
    mut reload: impl FnMut() -> bool,
) {
    let mut retry = false;
    let mut read = loaded;
    // The bytes in force, by digest, when known for sure (unknown at first: the first change is
    // read).
    let mut last_digest = None;
    // Reloads a file whose digest was `before`, and keeps that digest only when the reload
    // succeeded and the file held the same bytes after it (else the next change is read whatever
    // its bytes).
    let mut reload_noting = |last_digest: &mut Option<[u8; 32]>, before: Option<[u8; 32]>| {
        let reloaded = reload();
        *last_digest = if reloaded && before.is_some() && digest(path) == before {
            before
        } else {
            None
        };
        reloaded
    };
    // A change seen at the last check (its stamp and its bytes), read if the next one sees the
    // same stamp or the same bytes.
    let mut seen = None;
    let mut seen_digest = None;
    // Checks in a row that saw the file change again.
    let mut unsettled = 0;
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    // After a stall (a paused process), not two checks at once: the file must stay the same for
    // a whole interval.
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            Some(()) = hangups.next() => {
                info!("SIGHUP: reloading {what}");
                read = stamp(path);
                (seen, seen_digest, unsettled) = (None, None, 0);
                retry = !reload_noting(&mut last_digest, digest(path));
            }
            _ = poll.tick() => {
                let now = stamp(path);
                if now == read {
                    (seen, seen_digest, unsettled) = (None, None, 0);
                    if retry {
                        info!("reloading {what} again after a failed reload");
                        retry = false;
                        reload_noting(&mut last_digest, digest(path));
                    }
                    continue;
                }
                // Settled: the same stamp as at the last check or, where the stamp moved again,
                // the same bytes (a stamp that moves by itself). The bytes are read once a check.
                let bytes = digest(path);
                let settled = seen == Some(now) || (bytes.is_some() && bytes == seen_digest);
                if !settled {
                    seen_digest = bytes;
                    seen = Some(now);
                    unsettled += 1;
                    if unsettled == UNSETTLED_CHECKS {
                        warn!(checks = unsettled, "{what} keeps changing: read once it stays the same for a check");
                    }
                    continue;
                }
                read = now;
                (seen, seen_digest, unsettled) = (None, None, 0);
                if bytes.is_some() && bytes == last_digest {
                    debug!("{what}: its stamp moved, its bytes did not: not reloaded");
                } else {
                    retry = !reload_noting(&mut last_digest, bytes);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(partner: &str, token: &str) -> String {
        format!(
            "[[partner]]\nid = \"{partner}\"\ntoken-sha256 = [\"{}\"]\n",
            crate::hash_token(token)
        )
    }

    /// Watches `path` (as it is now), counting reloads, until the token is cancelled.
    fn watch_counting(
        path: &Path,
        hangups: futures::stream::BoxStream<'static, ()>,
    ) -> (
        Arc<std::sync::atomic::AtomicUsize>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let reloads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let watching = tokio::spawn({
            let (path, reloads, stop) = (path.to_owned(), Arc::clone(&reloads), stop.clone());
            async move {
                watch_file_with(&path, stamp(&path), "the test file", hangups, stop, || {
                    reloads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    true
                })
                .await;
            }
        });
        (reloads, stop, watching)
    }

    #[tokio::test(start_paused = true)]
    async fn a_hangup_reloads_at_once_and_a_change_once_it_settles() -> anyhow::Result<()> {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("partners.toml");
        std::fs::write(&path, file("courier", "old-token"))?;
        let (hangup, hangups) = tokio::sync::mpsc::unbounded_channel();
        let (reloads, stop, watching) = watch_counting(
            &path,
            tokio_stream::wrappers::UnboundedReceiverStream::new(hangups).boxed(),
        );
        let until = async |count: usize, what: &str| -> anyhow::Result<()> {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let mut poll = tokio::time::interval(Duration::from_millis(20));
            while reloads.load(Ordering::SeqCst) < count {
                anyhow::ensure!(tokio::time::Instant::now() < deadline, "{what}");
                poll.tick().await;
            }
            Ok(())
        };
        // An unchanged file is read again on a hangup (the checks never would).
        hangup.send(())?;
        until(1, "a hangup did not reload").await?;
        // A change is read by the checks, at the second that sees it (it stayed the same for a
        // check), not at the first. On a paused clock: each sleep moves time past one check.
        std::fs::write(&path, file("store", "new-token"))?;
        tokio::time::sleep(POLL_INTERVAL + Duration::from_millis(50)).await;
        assert_eq!(
            reloads.load(Ordering::SeqCst),
            1,
            "read at the first check that saw it"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
        assert_eq!(
            reloads.load(Ordering::SeqCst),
            2,
            "not read once it settled"
        );
        stop.cancel();
        watching.await?;
        assert_eq!(reloads.load(Ordering::SeqCst), 2, "one reload per change");
        Ok(())
    }

    /// Moves the file's stamp without changing its bytes (a `chmod` changes its status-change
    /// time), at a timestamp tick of its own (a kernel's timestamps may be coarse).
    #[cfg(unix)]
    fn move_stamp(path: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let before = stamp(path);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while stamp(path) == before {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the stamp never moved"
            );
            let mode = std::fs::metadata(path)?.permissions().mode();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode ^ 0o040))?;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    #[cfg(unix)]
    #[tokio::test(start_paused = true)]
    async fn a_stamp_that_moves_by_itself_is_no_change_and_bytes_that_change_are_not_read_half_way()
    -> anyhow::Result<()> {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("partners.toml");
        std::fs::write(&path, file("courier", "old-token"))?;
        let (reloads, stop, watching) = watch_counting(&path, futures::stream::pending().boxed());
        let reloaded = || reloads.load(Ordering::SeqCst);
        // On a paused clock each sleep moves time past one check (the first sleep past the
        // check at the start, too).
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A change, read once it settled.
        std::fs::write(&path, file("store", "new-token"))?;
        tokio::time::sleep(POLL_INTERVAL * 2).await;
        assert_eq!(reloaded(), 1, "a change is read");
        // Its stamp moves, its bytes do not.
        move_stamp(&path)?;
        tokio::time::sleep(POLL_INTERVAL * 2).await;
        assert_eq!(reloaded(), 1, "a stamp that moved alone is no change");
        // New bytes, and a stamp that moves by itself at every check: read once the bytes
        // stayed the same for a check.
        std::fs::write(&path, file("host", "host-token"))?;
        for _ in 0..2 {
            tokio::time::sleep(POLL_INTERVAL).await;
            move_stamp(&path)?;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
        assert_eq!(reloaded(), 2, "a change under a moving stamp is read");
        // Bytes that change before every check (each of another length): not read half-way,
        // however long it lasts; read once they stop changing.
        for round in 0..=UNSETTLED_CHECKS {
            let partner = "p".repeat(usize::try_from(round)? + 2);
            std::fs::write(&path, file(&partner, "token"))?;
            tokio::time::sleep(POLL_INTERVAL).await;
            assert_eq!(reloaded(), 2, "read while it changed, at check {round}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
        assert_eq!(reloaded(), 3, "read once it stopped changing");
        stop.cancel();
        watching.await?;
        Ok(())
    }

    #[test]
    fn a_file_caught_empty_keeps_the_partners_in_force() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("partners.toml");
        std::fs::write(&path, file("courier", "old-token"))?;
        let directory = PartnerDirectory::load(&path)?;
        // Truncated by a writer that writes in place, and read before it wrote.
        std::fs::write(&path, "")?;
        let error = directory.reload().expect_err("no partner left");
        assert!(error.to_string().contains("lists no partner"), "{error}");
        assert_eq!(
            directory.authenticate("old-token")?.partner_id.as_str(),
            "courier"
        );
        // A file with partners again is taken.
        std::fs::write(&path, file("store", "new-token"))?;
        directory.reload()?;
        assert!(directory.authenticate("old-token").is_err());
        assert_eq!(
            directory.authenticate("new-token")?.partner_id.as_str(),
            "store"
        );
        Ok(())
    }
}
