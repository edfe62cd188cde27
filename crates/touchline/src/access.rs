//! The admin and query tokens in force: the SHA-256 lists of the configuration
//! (`admin.token-sha256`, `query.token-sha256`), read at every call, and replaced while the node
//! runs when its configuration file changes or on SIGHUP ([`watch_config`]): rotating an internal
//! service's or an operator's token needs no restart (a restart moves a partition's queries away
//! for as long as it takes).

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio_util::sync::CancellationToken;
use touchline_ingest::metrics::ReloadLabels;
use tracing::{error, info, warn};

use crate::admin_auth::DEV_ADMIN_TOKEN;
use crate::config::Config;

#[derive(Debug, Default)]
pub(crate) struct Lists {
    pub(crate) admin: Vec<String>,
    pub(crate) query: Vec<String>,
    /// Whether `admin` is the configuration's (not `touchline dev`'s development token).
    admin_configured: bool,
}

/// The token lists in force, shared by the services' checks and the reload.
#[derive(Debug, Clone)]
pub struct AccessTokens {
    lists: Arc<RwLock<Lists>>,
    /// `touchline dev` (the embedded broker): with no admin token configured, the development
    /// one is accepted.
    dev: bool,
}

impl AccessTokens {
    /// The lists of `config` (checked by [`Config::validate`]); `dev` for the embedded broker.
    #[must_use]
    pub fn new(config: &Config, dev: bool) -> Self {
        let tokens = Self {
            lists: Arc::default(),
            dev,
        };
        tokens.set(config);
        tokens
    }

    fn set(&self, config: &Config) {
        let lowered = |hashes: &[String]| -> Vec<String> {
            hashes.iter().map(|hash| hash.to_lowercase()).collect()
        };
        let mut admin = lowered(&config.admin.token_sha256);
        if admin.is_empty() && self.dev {
            admin.push(touchline_ingest::hash_token(DEV_ADMIN_TOKEN));
        }
        let query = lowered(&config.query.token_sha256);
        *self.lists.write().unwrap_or_else(PoisonError::into_inner) = Lists {
            admin,
            query,
            admin_configured: !config.admin.token_sha256.is_empty(),
        };
    }

    /// The admin tokens' hashes in force (lower-case hex).
    #[must_use]
    pub fn admin(&self) -> Vec<String> {
        self.read(|lists| lists.admin.clone())
    }

    /// The query tokens' hashes in force; empty: `TimelineService` is open.
    #[must_use]
    pub fn query(&self) -> Vec<String> {
        self.read(|lists| lists.query.clone())
    }

    /// Warns that `TimelineService` answers anyone, when no query token is configured (but in
    /// `touchline dev`).
    pub(crate) fn warn_if_query_open(&self) {
        if let Some(warning) = self.query_open() {
            warn!("{warning}");
        }
    }

    fn query_open(&self) -> Option<&'static str> {
        (!self.dev && self.read(|lists| lists.query.is_empty())).then_some(
            "query.token-sha256 is empty: TimelineService answers anyone who can reach it; keep it on an internal network",
        )
    }

    /// Warns that every admin call is refused, when no admin token is configured (but in
    /// `touchline dev`, which accepts its development token).
    pub(crate) fn warn_if_admin_closed(&self) {
        if let Some(warning) = self.admin_closed() {
            warn!("{warning}");
        }
    }

    fn admin_closed(&self) -> Option<&'static str> {
        self.read(|lists| lists.admin.is_empty())
            .then_some("admin.token-sha256 is empty: every AdminService call will be refused")
    }

    /// The warnings a reload of `config` gives on a node started with `running`: for the services
    /// this node serves, as at its start (AdminService beside the projector), and when more than
    /// the tokens changed.
    fn reload_warnings(&self, config: &Config, running: &Config) -> Vec<&'static str> {
        let mut warnings = Vec::new();
        if running.query.enabled {
            warnings.extend(self.query_open());
        }
        if running.projector.enabled {
            warnings.extend(self.admin_closed());
        }
        if !same_but_tokens(config, running) {
            warnings.push(
                "the configuration file changed more than the admin and query tokens: the rest applies at the next start",
            );
        }
        warnings
    }

    /// Runs `look` on the lists in force.
    pub(crate) fn read<R>(&self, look: impl FnOnce(&Lists) -> R) -> R {
        look(&self.lists.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Takes the token lists of `config`, once it is valid; the rest of it applies at the next
    /// start (a warning says when it differs from what runs).
    ///
    /// # Errors
    /// When `config` is invalid: the lists in force stay.
    pub fn reload(&self, config: &Config, running: &Config) -> anyhow::Result<()> {
        config.validate()?;
        // A file read while it was being written (cut at a line: still valid TOML) would empty a
        // list: TimelineService open to anyone, or every admin call refused. Emptying a list
        // waits for a restart.
        let (admin_configured, query_open) =
            self.read(|lists| (lists.admin_configured, lists.query.is_empty()));
        anyhow::ensure!(
            !admin_configured || !config.admin.token_sha256.is_empty(),
            "the file names no admin.token-sha256: a reload never empties the list (restart to refuse every admin call)"
        );
        anyhow::ensure!(
            query_open || !config.query.token_sha256.is_empty(),
            "the file names no query.token-sha256: a reload never empties the list, which would open TimelineService to anyone (restart to do that)"
        );
        self.set(config);
        let (admin, query) = self.read(|lists| (lists.admin.len(), lists.query.len()));
        info!(
            admin_tokens = admin,
            query_tokens = query,
            "configuration reloaded: admin and query tokens"
        );
        for warning in self.reload_warnings(config, running) {
            warn!("{warning}");
        }
        Ok(())
    }
}

/// Whether two configurations differ in nothing but their token lists.
fn same_but_tokens(one: &Config, other: &Config) -> bool {
    let without_tokens = |config: &Config| {
        let mut config = config.clone();
        config.admin.token_sha256.clear();
        config.query.token_sha256.clear();
        toml::to_string(&config).ok()
    };
    without_tokens(one) == without_tokens(other)
}

/// Reloads of the configuration's token lists, by result.
static RELOADS: std::sync::LazyLock<Family<ReloadLabels, Counter>> =
    std::sync::LazyLock::new(Family::default);

/// Reloads of the token lists with `result` (`ok` or `failed`) since the process started.
#[must_use]
pub fn reloads(result: &'static str) -> u64 {
    RELOADS.get_or_create(&ReloadLabels { result }).get()
}

/// Registers `touchline_config_reloads_total{result}`.
pub(crate) fn register_metrics(registry: &mut prometheus_client::registry::Registry) {
    registry.register(
        "touchline_config_reloads",
        "reloads of the configuration file's admin and query tokens, ok or failed (a failed one keeps the tokens in force)",
        RELOADS.clone(),
    );
}

/// Reloads the token lists with `load` (the configuration read as at the start: the file `path`,
/// the `TOUCHLINE_` variables over it, the command line) on SIGHUP and when the file changes,
/// until `shutdown`. `running` is the configuration the node started with, read from the file
/// when it had the stamp `loaded` (a change since is reloaded).
pub async fn watch_config(
    path: PathBuf,
    loaded: Option<touchline_ingest::files::Stamp>,
    load: impl Fn() -> anyhow::Result<Config>,
    tokens: AccessTokens,
    running: Config,
    shutdown: CancellationToken,
) {
    let reload = || {
        let result = load().and_then(|config| tokens.reload(&config, &running));
        RELOADS
            .get_or_create(&ReloadLabels {
                result: if result.is_ok() { "ok" } else { "failed" },
            })
            .inc();
        match result {
            Ok(()) => true,
            Err(error) => {
                error!(path = %path.display(), error = format!("{error:#}"), "configuration not reloaded, the tokens in force stay");
                false
            }
        }
    };
    touchline_ingest::directory::watch_file(
        &path,
        loaded,
        "the configuration's tokens",
        shutdown,
        reload,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use touchline_ingest::hash_token;

    use super::*;

    fn config(admin: &[&str], query: &[&str]) -> Config {
        let mut config = Config::default();
        config.admin.token_sha256 = admin.iter().map(|token| hash_token(token)).collect();
        config.query.token_sha256 = query.iter().map(|token| hash_token(token)).collect();
        config
    }

    #[test]
    fn a_reload_replaces_the_lists_but_never_empties_one() {
        let running = config(&["admin-1"], &["query-1"]);
        let tokens = AccessTokens::new(&running, false);
        tokens
            .reload(&config(&["admin-2"], &["query-2"]), &running)
            .expect("new lists");
        assert_eq!(tokens.admin(), [hash_token("admin-2")]);
        assert_eq!(tokens.query(), [hash_token("query-2")]);
        for emptied in [config(&[], &["query-2"]), config(&["admin-2"], &[])] {
            assert!(tokens.reload(&emptied, &running).is_err());
            assert_eq!(tokens.admin(), [hash_token("admin-2")], "unchanged");
            assert_eq!(tokens.query(), [hash_token("query-2")], "unchanged");
        }
    }

    /// The warnings a reload of `reloaded` gives on a node started with `running`. (Read from
    /// the function that decides them: a subscriber set for one thread in a test misses events
    /// now and then, when another test registers the same call sites at once.)
    fn reload_logs(running: &Config, reloaded: &Config) -> String {
        let tokens = AccessTokens::new(running, false);
        tokens.reload(reloaded, running).expect("a valid reload");
        tokens.reload_warnings(reloaded, running).join("\n")
    }

    /// A reload warns of an open `TimelineService` or a closed `AdminService` only on a node that
    /// serves them, as the start does: an ingest-only node serves neither.
    #[test]
    fn a_reload_warns_only_about_the_services_the_node_serves() {
        let mut ingest_only = config(&[], &[]);
        ingest_only.projector.enabled = false;
        ingest_only.query.enabled = false;
        let logs = reload_logs(&ingest_only, &ingest_only);
        assert!(!logs.contains("TimelineService"), "{logs}");
        assert!(!logs.contains("AdminService"), "{logs}");

        let every_role = config(&[], &[]);
        let logs = reload_logs(&every_role, &every_role);
        assert!(logs.contains("TimelineService answers anyone"), "{logs}");
        assert!(
            logs.contains("every AdminService call will be refused"),
            "{logs}"
        );
    }

    #[test]
    fn in_dev_a_configured_admin_list_is_not_swapped_for_the_development_token() {
        let running = config(&["admin-1"], &[]);
        let tokens = AccessTokens::new(&running, true);
        assert!(tokens.reload(&config(&[], &[]), &running).is_err());
        assert_eq!(tokens.admin(), [hash_token("admin-1")]);
        // Without a configured list, dev accepts its development token, and may be given one.
        let bare = config(&[], &[]);
        let tokens = AccessTokens::new(&bare, true);
        assert_eq!(tokens.admin(), [hash_token(DEV_ADMIN_TOKEN)]);
        tokens
            .reload(&config(&["admin-1"], &[]), &bare)
            .expect("a configured list");
        assert_eq!(tokens.admin(), [hash_token("admin-1")]);
    }
}
