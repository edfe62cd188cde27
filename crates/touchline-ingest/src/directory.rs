//! The live partners file: reloaded on SIGHUP and when the file changes, without a restart. A file
//! that fails to load keeps the previous registry in force, with a logged error.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use touchline_core::UnixNanos;

use crate::auth::{Authenticated, request_token};
use crate::{PartnerRegistry, Result};

/// How often the file's modification time is checked.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// A cheap, cloneable handle on the registry in force.
#[derive(Debug, Clone)]
pub struct PartnerDirectory {
    current: Arc<RwLock<Arc<PartnerRegistry>>>,
    path: Option<PathBuf>,
    /// The file's modification time before it was read: a change made meanwhile (the node
    /// starting) is reloaded by [`Self::watch`].
    loaded_modified: Option<SystemTime>,
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
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let metrics = &crate::metrics::INGEST;
    metrics
        .partners_loaded_at
        .set(i64::try_from(now).unwrap_or(i64::MAX));
    metrics
        .partners
        .set(i64::try_from(registry.partner_ids().len()).unwrap_or(i64::MAX));
}

/// A file's modification time, when it can be read.
#[must_use]
pub fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path)
        .and_then(|metadata| metadata.modified())
        .ok()
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
            loaded_modified: None,
        }
    }

    /// Loads the partners file at `path`.
    ///
    /// # Errors
    /// When the file cannot be read or is invalid.
    pub fn load(path: &Path) -> Result<Self> {
        let loaded_modified = modified(path);
        let registry = PartnerRegistry::load(path)?;
        loaded(&registry);
        Ok(Self {
            current: Arc::new(RwLock::new(Arc::new(registry))),
            path: Some(path.to_owned()),
            loaded_modified,
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
    /// When the file cannot be read or is invalid.
    pub fn reload(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let registry = match PartnerRegistry::load(path) {
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

    /// Reloads on SIGHUP and when the file's modification time changes, until `shutdown`.
    pub async fn watch(self, shutdown: CancellationToken) {
        let Some(path) = self.path.clone() else {
            return;
        };
        watch_file(
            &path,
            self.loaded_modified,
            "the partners file",
            shutdown,
            || self.reload_logged(),
        )
        .await;
    }
}

/// Calls `reload` on SIGHUP and whenever the modification time of `path` (`what`, for the logs)
/// changes (checked every 2 s), until `shutdown`: how a file the node runs with is reloaded
/// without a restart. `loaded_modified` is its modification time before it was last read (a
/// change since is reloaded at the first check). A reload that fails (`reload` returns false) is
/// tried once more at the next check, even without a new change: a file read half-written, then
/// finished within the same tick of its modification time, would not be read again.
pub async fn watch_file(
    path: &Path,
    loaded_modified: Option<SystemTime>,
    what: &str,
    shutdown: CancellationToken,
    mut reload: impl FnMut() -> bool,
) {
    let mut retry = false;
    let mut last_modified = loaded_modified;
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup_received = async {
            match hangup.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup_received = std::future::pending::<Option<()>>();
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = hangup_received => {
                info!("SIGHUP: reloading {what}");
                last_modified = modified(path);
                retry = !reload();
            }
            _ = poll.tick() => {
                let now_modified = modified(path);
                if now_modified != last_modified {
                    last_modified = now_modified;
                    retry = !reload();
                } else if retry {
                    info!("reloading {what} again after a failed reload");
                    retry = false;
                    reload();
                }
            }
        }
    }
}
