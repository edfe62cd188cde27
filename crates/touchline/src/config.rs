//! Configuration: one serde struct per role with defaults, kebab-case keys and no unknown keys.
//! Layers, later winning: built-in defaults, an optional TOML file, `TOUCHLINE_` environment
//! variables (`__` separates levels: `TOUCHLINE_KAFKA__BOOTSTRAP_SERVERS`), then CLI flags.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use serde::{Deserialize, Serialize};
use touchline_core::Limits;
use touchline_ingest::IngestOptions;
use touchline_kafka::KafkaOptions;

/// The port `touchline dev` and `touchline serve` listen on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7451;
/// The port of `/metrics` unless told otherwise.
pub const DEFAULT_METRICS_PORT: u16 = 7452;

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
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

/// The shortest `kafka.retention-ms` of a created topic (one hour), but for -1 (forever).
const MIN_RETENTION_MS: i64 = 3_600_000;

/// Consumer properties the projector depends on, refused with another value than the one
/// [`touchline_kafka::KafkaOptions::consumer_config`] sets: (name, why).
const CONSUMER_FIXED: [(&str, &str); 4] = [
    (
        "isolation.level",
        "the records of another producer's aborted transactions are not events to project",
    ),
    (
        "enable.auto.commit",
        "the projector commits to Kafka (for lag monitoring) only what its store made durable",
    ),
    (
        "enable.auto.offset.store",
        "the projector commits to Kafka (for lag monitoring) only what its store made durable",
    ),
    (
        "enable.partition.eof",
        "the end of a partition is not a consumer error (the projector counts and logs those)",
    ),
];

/// Whether a property's `value` is `required` as librdkafka reads it: names without case, and
/// booleans in any of its spellings (`true`, `t`, `1`; `false`, `f`, `0`).
fn same_setting(value: &str, required: &str) -> bool {
    match required {
        "true" => {
            value == "1" || value.eq_ignore_ascii_case("true") || value.eq_ignore_ascii_case("t")
        }
        "false" => {
            value == "0" || value.eq_ignore_ascii_case("false") || value.eq_ignore_ascii_case("f")
        }
        _ => value.eq_ignore_ascii_case(required),
    }
}

/// An integer property's value as librdkafka reads it: `(int)strtol(value, &end, 0)`, so white
/// space first, a sign, `0x` for hexadecimal, a leading `0` for octal, whatever follows the
/// digits ignored, a value past 64 bits clamped and then cut to 32 (`"010000000"` is 2,097,152,
/// `"4000000kb"` is 4,000,000). `None` where it reads no number (it refuses the value).
fn librdkafka_integer(value: &str) -> Option<i32> {
    let text = value.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (negative, text) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, digits) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if hex.starts_with(|c: char| c.is_ascii_hexdigit()) => (16, hex),
        _ if text.starts_with('0') => (8, text),
        _ => (10, text),
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    if end == 0 {
        return None;
    }
    // Only digits of the radix: an error is an overflow, which strtol clamps.
    let long = match i64::from_str_radix(&digits[..end], radix) {
        Ok(magnitude) if negative => -magnitude,
        Ok(magnitude) => magnitude,
        Err(_) if negative => i64::MIN,
        Err(_) => i64::MAX,
    };
    // C's conversion of a long to an int keeps the low 32 bits.
    #[allow(clippy::cast_possible_truncation)]
    Some(long as i32)
}

/// Pass-through properties under the names librdkafka resolves them to
/// ([`touchline_kafka::canonical_property`]), so that a guard sees `topic.acks` as `acks`.
///
/// # Errors
/// When two spellings set one property (librdkafka would apply them in no fixed order), a name
/// holds a `-` (no librdkafka property does: a `TOUCHLINE_` variable that spelled a property as
/// a key), or a table sets other brokers than `kafka.bootstrap-servers` (which every client uses)
/// or another consumer group than `kafka.group-id` (a table's `group.id` would outlive a
/// `TOUCHLINE_KAFKA__GROUP_ID` given to each replica). Either may be repeated: the key is used
/// ([`touchline_kafka::SET_FROM_KEYS`]).
fn canonical_properties<'a>(
    table: &str,
    properties: &'a BTreeMap<String, String>,
    kafka: &KafkaOptions,
) -> anyhow::Result<BTreeMap<&'a str, &'a str>> {
    let mut canonical = BTreeMap::new();
    let mut spelled: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, value) in properties {
        anyhow::ensure!(
            !name.contains('-'),
            "{table}: {name:?} is no librdkafka property (their names have dots, no dashes): from a variable, give the table whole, TOUCHLINE_{}='{{\"security.protocol\" = \"SSL\"}}' say",
            table.replace('.', "__").replace('-', "_").to_uppercase()
        );
        let property = touchline_kafka::canonical_property(name);
        anyhow::ensure!(
            property != "bootstrap.servers" || *value == kafka.bootstrap_servers,
            "{table}: {name} is refused: the brokers are kafka.bootstrap-servers, which every client (producer, consumer, topic set-up) uses"
        );
        anyhow::ensure!(
            property != "group.id" || *value == kafka.group_id,
            "{table}: {name} is refused: the consumer group is kafka.group-id (TOUCHLINE_KAFKA__GROUP_ID), which it would override"
        );
        if let Some(other) = spelled.insert(property, name) {
            anyhow::bail!(
                "{table}: {other} and {name} set the same property ({property}): give it once"
            );
        }
        canonical.insert(property, value.as_str());
    }
    Ok(canonical)
}

fn count(value: usize) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

/// `TOUCHLINE_` environment variables that are not configuration keys (lower case, without the
/// prefix, as figment compares them).
const NOT_CONFIGURATION: [&str; 10] = [
    "config",
    "endpoint",
    "ca_cert",
    "client_cert",
    "client_key",
    "tls_server_name",
    "token",
    "admin_token",
    "query_token",
    "test_kafka",
];

/// Who may call the `AdminService`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdminConfig {
    /// SHA-256 (hex) of each admin token (`touchline hash-token` prints one). Empty: every admin
    /// call is refused, except in `touchline dev`, which accepts its development admin token.
    pub token_sha256: Vec<String>,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MetricsConfig {
    /// Serve `GET /metrics`.
    pub enabled: bool,
    /// Where `/metrics` is served (plain HTTP). Port 0 picks a free port.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_METRICS_PORT)),
        }
    }
}

/// The local sled database: event log and projections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreConfig {
    /// Folder of the sled database; created when missing.
    pub path: PathBuf,
    /// sled's page cache, in MiB. sled's resident memory runs well above it.
    pub cache_mib: u64,
}

impl StoreConfig {
    /// The store's own settings (checked by [`Config::validate`], and by the commands that open a
    /// store without starting a node).
    ///
    /// # Errors
    /// When `cache-mib` is 0 (sled cannot run without a page cache) or past 1 TiB.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=MAX_CACHE_MIB).contains(&self.cache_mib),
            "store.cache-mib = {} is out of range: it must be between 1 and {MAX_CACHE_MIB}",
            self.cache_mib
        );
        Ok(())
    }
}

/// The largest `store.cache-mib`: 1 TiB.
const MAX_CACHE_MIB: u64 = 1 << 20;

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("touchline-data"),
            cache_mib: touchline_projection::sled_store::DEFAULT_CACHE_BYTES / (1024 * 1024),
        }
    }
}

/// The partner-facing `IngestService`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct IngestConfig {
    pub enabled: bool,
    /// The partners file (ids, token hashes, contracts). Required when ingest is enabled, except
    /// in `touchline dev`, which falls back to its demo partners. Reloaded on SIGHUP and when it
    /// changes.
    pub partners_file: Option<PathBuf>,
    /// The most events in one request.
    pub max_batch_events: usize,
    /// The largest gRPC message the server decodes, in bytes.
    pub max_message_bytes: usize,
    /// How long a batch may wait for Kafka's confirmation before the call fails with UNAVAILABLE
    /// (the call's own deadline, when shorter, wins).
    pub ack_timeout_ms: u64,
    /// Events of one `PublishStream` being made durable at once (answers not yet read by the
    /// partner are bounded separately, to 64 batches).
    pub stream_window_events: usize,
    /// Bytes of one `PublishStream`'s batches admitted and not yet answered (1 KiB to 1 GiB; one
    /// message of `max-message-bytes` always fits): with the window of events, bounds what a
    /// stream holds.
    pub stream_window_bytes: usize,
    /// Events per second per partner (token bucket); a partner's `rate-per-second` overrides it.
    /// 0 means no limit.
    pub rate_per_second: Option<f64>,
    /// Bucket size: how many events a partner may send at once after being idle.
    pub burst: f64,
    /// `PublishStream` calls one partner may keep open.
    pub max_streams_per_partner: usize,
    /// Batches being decoded or made durable at once, server-wide; unary calls past it are shed
    /// before they are decoded.
    pub max_in_flight_batches: usize,
    /// Bytes the decoded requests of unary calls in flight may hold at once, server-wide (each
    /// charged what it holds once decoded); unary calls past it are answered `OVERLOADED`.
    pub max_in_flight_bytes: usize,
    /// Of `max-in-flight-bytes`, what one partner's unary calls may hold at once; past it its
    /// calls are answered `TOO_MANY_CALLS`.
    pub max_in_flight_bytes_per_partner: usize,
    /// In-flight slots one partner may hold (unary calls and stream batches); unary calls past
    /// it are shed, stream batches wait.
    pub max_calls_per_partner: usize,
    /// How long a unary call's body may take to arrive once the call holds its slots.
    pub request_body_timeout_ms: u64,
    /// Per-event limits.
    pub limits: LimitsConfig,
}

impl Default for IngestConfig {
    fn default() -> Self {
        let defaults = IngestOptions::default();
        Self {
            enabled: true,
            partners_file: None,
            max_batch_events: defaults.max_batch_events,
            max_message_bytes: defaults.max_message_bytes,
            ack_timeout_ms: 30_000,
            stream_window_events: defaults.stream_window_events,
            stream_window_bytes: defaults.stream_window_bytes,
            rate_per_second: defaults.rate_per_second,
            burst: defaults.burst,
            max_streams_per_partner: defaults.max_streams_per_partner,
            max_in_flight_batches: defaults.max_in_flight_batches,
            max_in_flight_bytes: defaults.max_in_flight_bytes,
            max_in_flight_bytes_per_partner: defaults.max_in_flight_bytes_per_partner,
            max_calls_per_partner: defaults.max_calls_per_partner,
            request_body_timeout_ms: 30_000,
            limits: LimitsConfig::default(),
        }
    }
}

impl IngestConfig {
    /// The ingest service's options.
    #[must_use]
    pub fn options(&self) -> IngestOptions {
        IngestOptions {
            max_batch_events: self.max_batch_events,
            limits: self.limits.limits(),
            max_message_bytes: self.max_message_bytes,
            stream_window_events: self.stream_window_events,
            stream_window_bytes: self.stream_window_bytes,
            rate_per_second: self.rate_per_second.filter(|rate| *rate > 0.0),
            burst: self.burst,
            max_streams_per_partner: self.max_streams_per_partner,
            max_in_flight_batches: self.max_in_flight_batches,
            max_in_flight_bytes: self.max_in_flight_bytes,
            max_in_flight_bytes_per_partner: self.max_in_flight_bytes_per_partner,
            max_calls_per_partner: self.max_calls_per_partner,
            request_body_timeout: std::time::Duration::from_millis(self.request_body_timeout_ms),
        }
    }
}

/// Limits of one event. Rejections name the field and the limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitsConfig {
    pub max_attributes: usize,
    pub max_attribute_key_bytes: usize,
    pub max_attribute_value_bytes: usize,
    pub max_payload_bytes: usize,
    /// The whole encoded event.
    pub max_event_bytes: usize,
    /// How far ahead of the server clock `occurred_at` may be.
    pub max_future_skew_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            max_attributes: limits.max_attributes,
            max_attribute_key_bytes: limits.max_attribute_key_len,
            max_attribute_value_bytes: limits.max_attribute_value_len,
            max_payload_bytes: limits.max_payload_len,
            max_event_bytes: limits.max_event_len,
            max_future_skew_ms: u64::try_from(limits.max_future_skew_nanos / 1_000_000)
                .unwrap_or(u64::MAX),
        }
    }
}

impl LimitsConfig {
    #[must_use]
    pub fn limits(&self) -> Limits {
        Limits {
            max_attributes: self.max_attributes,
            max_attribute_key_len: self.max_attribute_key_bytes,
            max_attribute_value_len: self.max_attribute_value_bytes,
            max_payload_len: self.max_payload_bytes,
            max_event_len: self.max_event_bytes,
            max_future_skew_nanos: i64::try_from(self.max_future_skew_ms.saturating_mul(1_000_000))
                .unwrap_or(i64::MAX),
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
    /// The most records the projector takes from the consumer at once (the store writes them in
    /// atomic pieces of `RECORDS_PER_WRITE`, each with the positions it covers).
    pub max_batch: usize,
    /// Log events a rebuild folds per atomic batch. Smaller batches hold the store's writer for
    /// less time when a rebuild catches up; larger ones rebuild faster.
    pub rebuild_batch: usize,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            partitions: Vec::new(),
            max_batch: 1000,
            rebuild_batch: touchline_projection::ops::REBUILD_CHUNK,
        }
    }
}

/// The internal `TimelineService`. Serves the state of the projector in the same process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct QueryConfig {
    pub enabled: bool,
    /// SHA-256 (hex) of each token internal services call `TimelineService` with
    /// (`touchline hash-token` prints one). Empty: the service is open to anyone who can reach it
    /// (internal networks only; a node on a real Kafka warns at start).
    pub token_sha256: Vec<String>,
    /// Store reads at once (timeline pages, summaries, watch catch-ups); more wait their turn.
    /// 0: as many as the cores, so that reads do not crowd out the projector's writer.
    pub read_concurrency: usize,
    /// `WatchTimeline` watchers running at once, and twice that many watch streams open (a
    /// stream whose watcher ended while its client took nothing counts until the client reads
    /// it or goes); more calls are refused (`TOO_MANY_WATCHES`).
    pub max_watches: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            token_sha256: Vec::new(),
            read_concurrency: 0,
            max_watches: touchline_query::DEFAULT_MAX_WATCHES,
        }
    }
}

/// Logs (tracing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogConfig {
    /// `tracing` filter directives, e.g. `info,touchline_projection=debug`. `RUST_LOG` wins.
    pub filter: String,
    /// "text" (human-readable) or "json" (one JSON object per line, for log shippers).
    pub format: LogFormat,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info,rdkafka=warn".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// Bytes a Kafka record holds besides the event: the envelope's partner id and arrival time, the
/// key (the customer id), field tags and lengths (ids are at most 128 bytes each).
const ENVELOPE_ROOM: u64 = 1024;

/// The largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A configuration error that quotes no value (a token pasted where its hash belongs is not
/// logged): each error of the chain with its key and source, and the type of a wrong value, not
/// the value.
fn without_values(error: figment::Error) -> anyhow::Error {
    use figment::error::{Actual, Kind};
    let hidden = |actual: Actual| match actual {
        Actual::Str(_) | Actual::Char(_) | Actual::Bytes(_) => Actual::Other("a string".to_owned()),
        Actual::Other(_) => Actual::Other("a value".to_owned()),
        other => other,
    };
    let messages: Vec<String> = error
        .into_iter()
        .map(|mut error| {
            error.kind = match error.kind {
                Kind::Message(message) => {
                    Kind::Message(touchline_ingest::files::without_values(&message))
                }
                Kind::InvalidType(actual, expected) => Kind::InvalidType(hidden(actual), expected),
                Kind::InvalidValue(actual, expected) => {
                    Kind::InvalidValue(hidden(actual), expected)
                }
                Kind::UnknownVariant(_, expected) => Kind::UnknownVariant("…".to_owned(), expected),
                other => other,
            };
            error.to_string()
        })
        .collect();
    anyhow::anyhow!(messages.join("\n"))
}

impl Config {
    /// Loads defaults, then `file` when given, then `TOUCHLINE_*` variables.
    ///
    /// # Errors
    /// When the file cannot be read, a key is unknown or a value has the wrong type.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        // A node reads its file again while it runs: a regular file (a FIFO or a device would
        // block or never end).
        Self::load_with(file, touchline_ingest::files::read_regular)
    }

    /// As [`Self::load`], for a command that reads the file once: a pipe will do
    /// (`-c <(envsubst < touchline.toml)`).
    ///
    /// # Errors
    /// As [`Self::load`].
    pub fn load_once(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_with(file, touchline_ingest::files::read_bounded)
    }

    fn load_with(
        file: Option<&Path>,
        read: touchline_ingest::files::Reader,
    ) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(file) = file {
            anyhow::ensure!(
                file.exists(),
                "config file {} does not exist",
                file.display()
            );
            // The bytes read (at most 1 MiB) are the bytes parsed.
            let bytes = read(file, MAX_CONFIG_BYTES)
                .with_context(|| format!("cannot read config file {}", file.display()))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| anyhow::anyhow!("config file {} is not UTF-8", file.display()))?;
            figment = figment.merge(Toml::string(&text));
        }
        // TOUCHLINE_CONFIG, _ENDPOINT, _CA_CERT, _CLIENT_CERT, _CLIENT_KEY, _TLS_SERVER_NAME, _TOKEN,
        // _ADMIN_TOKEN and _QUERY_TOKEN belong to the command line, TOUCHLINE_TEST_KAFKA to the test suites: none is a configuration key.
        let env = Env::prefixed("TOUCHLINE_")
            .ignore(&NOT_CONFIGURATION)
            .filter(|key| !is_service_link(key.as_str(), env_value(key.as_str()).as_deref()));
        // TOUCHLINE_KAFKA__BOOTSTRAP_SERVERS -> kafka.bootstrap-servers
        let config_key = |variable: &str| variable.replace("__", ".").replace('_', "-");
        // figment drops a variable whose key has an empty level (three underscores, say) without
        // a word: refused, as an unknown key is.
        for (variable, _) in env.iter() {
            let key = config_key(variable.as_str());
            anyhow::ensure!(
                !key.split('.').any(str::is_empty),
                "environment variable TOUCHLINE_{} names no configuration key (it has an empty level: {key:?}): `__` separates the levels, `_` stands for `-`",
                variable.as_str().to_ascii_uppercase()
            );
        }
        figment = figment.merge(env.map(move |key| config_key(key.as_str()).into()));
        figment
            .extract()
            .map_err(without_values)
            .with_context(|| match file {
                Some(file) => format!("invalid configuration (file {})", file.display()),
                None => "invalid configuration".to_owned(),
            })
    }

    /// Checks what the types cannot.
    ///
    /// # Errors
    /// When the enabled roles cannot work together.
    pub fn validate(&self) -> anyhow::Result<()> {
        // Checked here, not when the log starts: a directive that does not parse would be
        // dropped, and an empty filter logs errors only.
        anyhow::ensure!(
            !self.log.filter.trim().is_empty(),
            "log.filter is empty: it would log errors only (the default is \"info,rdkafka=warn\")"
        );
        tracing_subscriber::EnvFilter::builder()
            .parse(&self.log.filter)
            .with_context(|| format!("log.filter {:?} is not a tracing filter", self.log.filter))?;
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
        anyhow::ensure!(
            self.kafka.replication_factor > 0,
            "kafka.replication-factor must be positive"
        );
        if let Some(min_insync) = self.kafka.min_insync_replicas {
            // A topic whose in-sync minimum exceeds its replicas refuses every acks=all write.
            anyhow::ensure!(
                (1..=self.kafka.replication_factor).contains(&min_insync),
                "kafka.min-insync-replicas ({min_insync}) must be 1 to kafka.replication-factor ({}): a created topic with fewer replicas than its in-sync minimum refuses every acknowledged write",
                self.kafka.replication_factor
            );
        }
        if let Some(retention) = self.kafka.retention_ms {
            // Kafka deletes what is older, read or not: a value in other units (30 for days,
            // 604800 for a week in seconds) would delete acknowledged events before a projector
            // that lags, or starts anew, reads them.
            anyhow::ensure!(
                retention == -1 || retention >= MIN_RETENTION_MS,
                "kafka.retention-ms ({retention}) must be -1 (kept forever) or at least {MIN_RETENTION_MS} (an hour): Kafka deletes acknowledged events older than it whether or not a projector read them; it is in milliseconds"
            );
        }
        let (common, producer, consumer) = (
            canonical_properties("kafka.properties", &self.kafka.properties, &self.kafka)?,
            canonical_properties(
                "kafka.producer-properties",
                &self.kafka.producer_properties,
                &self.kafka,
            )?,
            canonical_properties(
                "kafka.consumer-properties",
                &self.kafka.consumer_properties,
                &self.kafka,
            )?,
        );
        // Pass-through properties may tune the clients, not weaken what an acknowledgement means
        // (under any of librdkafka's spellings: `topic.acks`, `request.required.acks`).
        for properties in [&common, &producer] {
            if let Some(&acks) = properties.get("acks") {
                anyhow::ensure!(
                    same_setting(acks, "all") || acks == "-1",
                    "kafka property acks={acks} is refused: an acknowledged event must be on every in-sync replica (acks=all)"
                );
            }
            if let Some(&idempotence) = properties.get("enable.idempotence") {
                anyhow::ensure!(
                    same_setting(idempotence, "true"),
                    "kafka property enable.idempotence={idempotence} is refused: retries must not duplicate or reorder events"
                );
            }
            // Ingest acknowledges an event once its delivery is reported.
            if let Some(&only_errors) = properties.get("delivery.report.only.error") {
                anyhow::ensure!(
                    same_setting(only_errors, "false"),
                    "kafka property delivery.report.only.error={only_errors} is refused: ingest acknowledges an event when its delivery is reported, so no event would ever be acknowledged"
                );
            }
            anyhow::ensure!(
                !properties.contains_key("transactional.id"),
                "kafka property transactional.id is refused: ingest's producer is idempotent, not transactional (a transactional producer refuses every record sent outside a transaction)"
            );
        }
        for properties in [&common, &producer, &consumer] {
            if let Some(&create) = properties.get("allow.auto.create.topics") {
                anyhow::ensure!(
                    same_setting(create, "false"),
                    "kafka property allow.auto.create.topics={create} is refused: the topic is created by Touchline with its settings (kafka.create-topic), not by the broker's defaults when a client asks for it"
                );
            }
        }
        // What the projector's consumer is given before the pass-through (none here).
        let touchline_set = touchline_kafka::KafkaOptions::default().consumer_config();
        // The projector's resume reads from the earliest record when a position is gone (dedupe
        // makes that safe); a consumer that jumped to the end would skip acknowledged events and
        // store positions past them.
        for properties in [&common, &consumer] {
            if let Some(&reset) = properties.get("auto.offset.reset") {
                anyhow::ensure!(
                    ["earliest", "smallest", "beginning"]
                        .iter()
                        .any(|earliest| same_setting(reset, earliest)),
                    "kafka property auto.offset.reset={reset} is refused: a projector that lost its place must read from the earliest record, not skip acknowledged events"
                );
            }
            // What the projector reads, and what its commits to Kafka (lag monitoring) say.
            for (name, why) in CONSUMER_FIXED {
                if let (Some(&value), Some(required)) =
                    (properties.get(name), touchline_set.get(name))
                {
                    anyhow::ensure!(
                        same_setting(value, required),
                        "kafka property {name}={value} is refused: {why}"
                    );
                }
            }
        }
        for (name, hashes) in [
            ("admin.token-sha256", &self.admin.token_sha256),
            ("query.token-sha256", &self.query.token_sha256),
        ] {
            for hash in hashes {
                anyhow::ensure!(
                    hash.len() == 64 && hash.bytes().all(|byte| byte.is_ascii_hexdigit()),
                    "{name} entries must be 64 hex characters (touchline hash-token prints one)"
                );
            }
        }
        self.check_sizes()?;
        self.store.check()?;
        self.server.check()?;
        self.check_event_fits_kafka()?;
        if let Some(rate) = self.ingest.rate_per_second {
            anyhow::ensure!(
                rate.is_finite() && rate >= 0.0,
                "ingest.rate-per-second must be positive (or 0 for no limit)"
            );
        }
        anyhow::ensure!(
            self.ingest.burst.is_finite() && self.ingest.burst >= 1.0,
            "ingest.burst must be at least 1"
        );
        Ok(())
    }

    /// An event ingest accepts must fit in one Kafka record the producer may send (librdkafka's
    /// `message.max.bytes`, 1,000,000 unless set): else every batch holding one would fail as a
    /// whole, resent in vain (`LOG_UNAVAILABLE`). The envelope (partner, arrival time) and the key
    /// get [`ENVELOPE_ROOM`] bytes.
    fn check_event_fits_kafka(&self) -> anyhow::Result<()> {
        if !self.ingest.enabled {
            // Only ingest applies the limit.
            return Ok(());
        }
        let set = self
            .kafka
            .producer_properties
            .get("message.max.bytes")
            .or_else(|| self.kafka.properties.get("message.max.bytes"));
        // Read as librdkafka reads it; an unreadable value (or one out of its range) is
        // librdkafka's to refuse, when the producer is made.
        let Some(Ok(message_max)) = set
            .map_or(Some(1_000_000), |value| librdkafka_integer(value))
            .map(u64::try_from)
        else {
            return Ok(());
        };
        let event_max = count(self.ingest.limits.max_event_bytes);
        anyhow::ensure!(
            event_max.saturating_add(ENVELOPE_ROOM) <= message_max,
            "ingest.limits.max-event-bytes ({event_max}) does not fit in a Kafka record the producer may send: message.max.bytes is {message_max}, and an event needs {ENVELOPE_ROOM} bytes more for its envelope and key; raise message.max.bytes in kafka.producer-properties (and the topic's max.message.bytes on the brokers) or lower the limit"
        );
        Ok(())
    }

    /// Sizes and counts: zero would refuse every request (or silently mean one), and values past
    /// these bounds are mistakes that would only fail later (a semaphore that cannot hold them).
    fn check_sizes(&self) -> anyhow::Result<()> {
        let ingest = &self.ingest;
        let checks: [(&str, u64, u64, u64); 18] = [
            (
                "ingest.request-body-timeout-ms",
                ingest.request_body_timeout_ms,
                1,
                3_600_000,
            ),
            (
                "ingest.max-calls-per-partner",
                count(ingest.max_calls_per_partner),
                1,
                1_000_000,
            ),
            (
                "server.max-concurrent-streams",
                u64::from(self.server.max_concurrent_streams),
                1,
                1_000_000,
            ),
            (
                "server.http2-keepalive-timeout-ms",
                self.server.http2_keepalive_timeout_ms,
                1,
                3_600_000,
            ),
            (
                "ingest.max-batch-events",
                count(ingest.max_batch_events),
                1,
                100_000,
            ),
            (
                "ingest.stream-window-events",
                count(ingest.stream_window_events),
                count(ingest.max_batch_events),
                10_000_000,
            ),
            (
                "ingest.stream-window-bytes",
                count(ingest.stream_window_bytes),
                1024,
                1 << 30,
            ),
            (
                "ingest.max-in-flight-batches",
                count(ingest.max_in_flight_batches),
                1,
                1_000_000,
            ),
            (
                "ingest.max-in-flight-bytes",
                count(ingest.max_in_flight_bytes),
                1 << 20,
                1 << 40,
            ),
            (
                "ingest.max-in-flight-bytes-per-partner",
                count(ingest.max_in_flight_bytes_per_partner),
                1 << 20,
                1 << 40,
            ),
            (
                "ingest.max-streams-per-partner",
                count(ingest.max_streams_per_partner),
                1,
                100_000,
            ),
            (
                "ingest.max-message-bytes",
                count(ingest.max_message_bytes),
                1024,
                1 << 30,
            ),
            ("ingest.ack-timeout-ms", ingest.ack_timeout_ms, 1, 3_600_000),
            (
                "ingest.limits.max-event-bytes",
                count(ingest.limits.max_event_bytes),
                1,
                1 << 30,
            ),
            (
                "projector.max-batch",
                count(self.projector.max_batch),
                1,
                1_000_000,
            ),
            (
                "projector.rebuild-batch",
                count(self.projector.rebuild_batch),
                1,
                1_000_000,
            ),
            (
                "query.read-concurrency",
                count(self.query.read_concurrency),
                0,
                4096,
            ),
            (
                "query.max-watches",
                count(self.query.max_watches),
                1,
                1_000_000,
            ),
        ];
        for (name, value, min, max) in checks {
            anyhow::ensure!(
                (min..=max).contains(&value),
                "{name} = {value} is out of range: it must be between {min} and {max}"
            );
        }
        Ok(())
    }

    /// The effective configuration as TOML, with secret librdkafka properties (passwords,
    /// secrets, JAAS configurations, inline PEM keys) shown as `<redacted>`: what
    /// `touchline config` prints, often into a terminal or a ticket.
    ///
    /// # Errors
    /// When serialization fails.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        let mut shown = self.clone();
        for properties in [
            &mut shown.kafka.properties,
            &mut shown.kafka.producer_properties,
            &mut shown.kafka.consumer_properties,
        ] {
            for (key, value) in properties.iter_mut() {
                if is_secret_property(key) {
                    *value = "<redacted>".to_owned();
                }
            }
        }
        toml::to_string_pretty(&shown).context("cannot print the configuration")
    }
}

/// Whether an environment variable (without the `TOUCHLINE_` prefix) is one of those Kubernetes
/// sets for a Service whose name starts with `touchline` (`TOUCHLINE_SERVICE_HOST`,
/// `TOUCHLINE_INGEST_SERVICE_PORT_GRPC`, `TOUCHLINE_PORT_7451_TCP_ADDR`...): not configuration.
/// Configuration keys have `__` between levels; these never do. A name that only ends in `_PORT`
/// is one when its value is the address Kubernetes writes there (`tcp://10.0.0.1:7451`): else it
/// is a typo (`TOUCHLINE_METRICS_PORT=9100`), refused as an unknown key.
fn is_service_link(key: &str, value: Option<&str>) -> bool {
    let key = key.to_ascii_lowercase();
    if key.contains("__") {
        return false;
    }
    let words: Vec<&str> = key.split('_').collect();
    let service = words
        .windows(2)
        .any(|pair| pair[0] == "service" && matches!(pair[1], "host" | "port"));
    let address = value.is_some_and(|value| {
        ["tcp://", "udp://", "sctp://"]
            .iter()
            .any(|scheme| value.starts_with(scheme))
    });
    let port = (words.last() == Some(&"port") && address)
        || words.windows(3).any(|triple| {
            triple[0] == "port"
                && triple[1].bytes().all(|byte| byte.is_ascii_digit())
                && matches!(triple[2], "tcp" | "udp" | "sctp")
        });
    service || port
}

/// The value of the `TOUCHLINE_` variable `key` names (without the prefix, in any case).
fn env_value(key: &str) -> Option<String> {
    std::env::vars_os().find_map(|(name, value)| {
        let (prefix, rest) = name.to_str()?.split_at_checked("TOUCHLINE_".len())?;
        (prefix.eq_ignore_ascii_case("TOUCHLINE_") && rest.eq_ignore_ascii_case(key))
            .then(|| value.into_string().ok())?
    })
}

/// Whether a librdkafka property holds a secret (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, `sasl.oauthbearer.assertion.private.key.passphrase`,
/// `sasl.oauthbearer.config`, `sasl.jaas.config`, `ssl.key.pem`...).
fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "passphrase",
        "secret",
        "jaas",
        "key.pem",
        "credentials",
        "oauthbearer.config",
    ]
    .iter()
    .any(|word| key.contains(word))
}

mod server;
#[cfg(test)]
mod tests;

pub use server::{ServerConfig, TlsConfig};
