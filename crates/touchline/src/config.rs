//! Configuration: one serde struct per role with defaults, kebab-case keys and no unknown keys.
//! Layers, later winning: built-in defaults, an optional TOML file, `TOUCHLINE_` environment
//! variables (`__` separates levels: `TOUCHLINE_KAFKA__BOOTSTRAP_SERVERS`), then CLI flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use serde::{Deserialize, Serialize};
use touchline_kafka::KafkaOptions;

/// The port `touchline dev` and `touchline serve` listen on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7451;

/// Everything a node needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub server: ServerConfig,
    pub kafka: KafkaOptions,
    pub store: StoreConfig,
    pub ingest: IngestConfig,
    pub projector: ProjectorConfig,
    pub query: QueryConfig,
    pub log: LogConfig,
}

/// The gRPC listener that every enabled service shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerConfig {
    /// Address to listen on. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// How long shutdown waits for in-flight calls to finish.
    pub shutdown_grace_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            shutdown_grace_ms: 10_000,
        }
    }
}

/// The local sled database: event log and projections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreConfig {
    /// Folder of the sled database; created when missing.
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("touchline-data"),
        }
    }
}

/// The partner-facing `IngestService`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct IngestConfig {
    pub enabled: bool,
    /// The partners file (ids and SHA-256 token hashes). Required when ingest is enabled, except
    /// in `touchline dev`, which falls back to its demo partners.
    pub partners_file: Option<PathBuf>,
    /// The most events in one request.
    pub max_batch_events: usize,
    /// How long a batch may wait for Kafka's confirmation before the call fails with UNAVAILABLE.
    pub ack_timeout_ms: u64,
    /// Batches of one `PublishStream` in flight at once.
    pub stream_window: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            partners_file: None,
            max_batch_events: 1000,
            ack_timeout_ms: 30_000,
            stream_window: 8,
        }
    }
}

/// The projector: Kafka consumer, event log and projections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProjectorConfig {
    pub enabled: bool,
    /// Partitions this node owns; empty for every partition of the topic.
    pub partitions: Vec<i32>,
    /// The most records applied in one atomic store write.
    pub max_batch: usize,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            partitions: Vec::new(),
            max_batch: 1000,
        }
    }
}

/// The internal `TimelineService`. Serves the state of the projector in the same process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct QueryConfig {
    pub enabled: bool,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Logs (tracing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogConfig {
    /// `tracing` filter directives, e.g. `info,touchline_projection=debug`. `RUST_LOG` wins.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info,rdkafka=warn".to_owned(),
        }
    }
}

impl Config {
    /// Loads defaults, then `file` when given, then `TOUCHLINE_*` variables.
    ///
    /// # Errors
    /// When the file cannot be read, a key is unknown or a value has the wrong type.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(file) = file {
            anyhow::ensure!(
                file.exists(),
                "config file {} does not exist",
                file.display()
            );
            figment = figment.merge(Toml::file(file));
        }
        // TOUCHLINE_CONFIG, _ENDPOINT and _TOKEN belong to the command line, not to the file.
        let env = Env::prefixed("TOUCHLINE_").ignore(&["config", "endpoint", "token"]);
        figment = figment.merge(env.map(|key| {
            // TOUCHLINE_KAFKA__BOOTSTRAP_SERVERS -> kafka.bootstrap-servers
            key.as_str().replace("__", ".").replace('_', "-").into()
        }));
        figment.extract().context("invalid configuration")
    }

    /// Checks what the types cannot.
    ///
    /// # Errors
    /// When the enabled roles cannot work together.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.query.enabled || self.projector.enabled,
            "query.enabled needs projector.enabled: the query service serves the local projector's state"
        );
        anyhow::ensure!(
            self.ingest.enabled || self.projector.enabled,
            "nothing to run: enable ingest, projector or both"
        );
        anyhow::ensure!(
            self.kafka.partitions > 0,
            "kafka.partitions must be positive"
        );
        // Pass-through properties may tune the clients, not weaken what an acknowledgement means.
        for properties in [&self.kafka.properties, &self.kafka.producer_properties] {
            if let Some(acks) = properties.get("acks") {
                anyhow::ensure!(
                    matches!(acks.as_str(), "all" | "-1"),
                    "kafka property acks={acks} is refused: an acknowledged event must be on every in-sync replica (acks=all)"
                );
            }
            if let Some(idempotence) = properties.get("enable.idempotence") {
                anyhow::ensure!(
                    idempotence == "true",
                    "kafka property enable.idempotence={idempotence} is refused: retries must not duplicate or reorder events"
                );
            }
        }
        anyhow::ensure!(
            self.ingest.max_batch_events > 0,
            "ingest.max-batch-events must be positive"
        );
        Ok(())
    }

    /// The effective configuration as TOML.
    ///
    /// # Errors
    /// When serialization fails.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        toml::to_string_pretty(self).context("cannot print the configuration")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let config = Config::default();
        let text = config.to_toml().expect("prints");
        let parsed: Config = toml::from_str(&text).expect("parses");
        assert_eq!(parsed, config);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("[kafka]\nbootstrap = \"x\"\n").is_err());
        assert!(toml::from_str::<Config>("[nonsense]\n").is_err());
    }

    #[test]
    fn files_are_layered_over_defaults() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(
            file.path(),
            "[kafka]\nbootstrap-servers = \"broker:9092\"\n[kafka.properties]\n\"security.protocol\" = \"ssl\"\n[projector]\nenabled = true\npartitions = [0, 1]\n",
        )
        .expect("writes");
        let config = Config::load(Some(file.path())).expect("loads");
        assert_eq!(config.kafka.bootstrap_servers, "broker:9092");
        assert_eq!(
            config
                .kafka
                .properties
                .get("security.protocol")
                .map(String::as_str),
            Some("ssl")
        );
        assert_eq!(config.projector.partitions, vec![0, 1]);
        assert_eq!(config.kafka.topic, KafkaOptions::default().topic);
    }

    #[test]
    #[allow(
        clippy::result_large_err,
        reason = "figment::Jail fixes the closure type"
    )]
    fn environment_variables_override_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "touchline.toml",
                "[kafka]\nbootstrap-servers = \"from-file:9092\"\n",
            )?;
            jail.set_env("TOUCHLINE_KAFKA__BOOTSTRAP_SERVERS", "from-env:9092");
            jail.set_env("TOUCHLINE_INGEST__MAX_BATCH_EVENTS", "10");
            jail.set_env("TOUCHLINE_CONFIG", "touchline.toml");
            jail.set_env("TOUCHLINE_TOKEN", "a-partner-token");
            let config = Config::load(Some(Path::new("touchline.toml")))
                .map_err(|error| error.to_string())?;
            assert_eq!(config.kafka.bootstrap_servers, "from-env:9092");
            assert_eq!(config.ingest.max_batch_events, 10);
            Ok(())
        });
    }

    #[test]
    fn weakening_acknowledgements_is_refused() {
        let mut config = Config::default();
        config
            .kafka
            .producer_properties
            .insert("acks".to_owned(), "1".to_owned());
        assert!(config.validate().is_err());
        let mut config = Config::default();
        config
            .kafka
            .properties
            .insert("enable.idempotence".to_owned(), "false".to_owned());
        assert!(config.validate().is_err());
    }

    #[test]
    fn a_query_role_without_its_projector_is_refused() {
        let mut config = Config::default();
        config.projector.enabled = false;
        assert!(config.validate().is_err());
    }
}
