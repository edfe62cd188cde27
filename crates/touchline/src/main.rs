//! `touchline`: run a node (`dev`, `serve`) or talk to one (`publish`, `timeline`, `summary`,
//! `watch`, and the ops commands `status`, `rebuild`, `replay`, `dead-letters`, `verify`, `backup`,
//! `restore`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use touchline::admin_auth::DEV_ADMIN_TOKEN;
use touchline::admin_client::{self, DeadLetterAction};
use touchline::config::LogFormat;
use touchline::{BrokerChoice, Config, Node, Target, client, demo, node, stream_client};
use touchline_core::{JourneyStage, UnixNanos};
use touchline_ingest::{PartnerDirectory, PartnerRegistry};

/// mimalloc rather than the system allocator: with glibc's, memory that sled frees after a write
/// stayed resident and the process grew with every event (BENCHMARKS.md, Memory). Built without
/// transparent huge pages (the `no_thp` feature; `MIMALLOC_ALLOW_THP=1` turns them back on): with
/// them, each fresh 2 MiB page was zeroed on first touch (8-14% of the CPU in the projector's busy
/// phase) and the pipeline's peak RSS was about 400 MiB instead of about 260 on the quick preset.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use touchline_proto::v1;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "touchline",
    version,
    about = "Customer touchpoints from every partner, as one timeline per customer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// TOML configuration file; `TOUCHLINE_*` variables override it.
    #[arg(long, short, env = "TOUCHLINE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides server.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Folder of the event log and projections (overrides store.path).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address of the Prometheus `/metrics` endpoint (overrides metrics.listen).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Log lines as text or JSON (overrides log.format).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

/// Where a command that works on the store offline finds it.
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// TOML configuration file; `TOUCHLINE_*` variables override it.
    #[arg(long, short, env = "TOUCHLINE_CONFIG")]
    config: Option<PathBuf>,
    /// Folder of the event log and projections (overrides store.path).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct Admin {
    #[command(flatten)]
    endpoint: Target,
    /// An admin token (`touchline dev` accepts the development token, the default here).
    #[arg(long, global = true, env = "TOUCHLINE_ADMIN_TOKEN", hide_env_values = true, default_value = DEV_ADMIN_TOKEN)]
    admin_token: String,
}

#[derive(Debug, clap::Args)]
struct Query {
    #[command(flatten)]
    endpoint: Target,
    /// A query token, for a node with `query.token-sha256` set.
    #[arg(long, env = "TOUCHLINE_QUERY_TOKEN", hide_env_values = true)]
    query_token: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every role in one process on the embedded Kafka broker, data in a local folder.
    Dev {
        #[command(flatten)]
        node: NodeArgs,
        /// Publish a demo demand chain through the real ingest path once started.
        #[arg(long)]
        demo: bool,
        /// Customers in the demo (with --demo).
        #[arg(long, default_value_t = 300, requires = "demo")]
        demo_customers: usize,
    },
    /// The enabled roles against an external Kafka (kafka.bootstrap-servers).
    Serve {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Print the effective configuration (defaults, file, environment) as TOML.
    Config {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Stream touchpoints from a JSON Lines file as a partner.
    Publish {
        #[command(flatten)]
        endpoint: Target,
        /// The partner's bearer token.
        #[arg(long, env = "TOUCHLINE_TOKEN", hide_env_values = true)]
        token: String,
        /// JSON Lines file, one touchpoint per line (see the README).
        #[arg(long)]
        file: PathBuf,
        /// Events per request (1 to 100000; the server's `ingest.max-batch-events` is the limit). A
        /// request also ends before 4 MiB less 64 KiB of encoded events.
        #[arg(long, default_value_t = 500, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
        batch_size: usize,
        /// Requests sent and not yet answered (1 to 1024); after a disconnect they are sent again.
        #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
        window: usize,
    },
    /// Print a customer's timeline in event-time order.
    Timeline {
        customer_id: String,
        #[command(flatten)]
        query: Query,
        /// Print at most this many entries.
        #[arg(long)]
        limit: Option<usize>,
        /// Only these partners (repeatable).
        #[arg(long = "partner")]
        partners: Vec<String>,
        /// Only these event types (repeatable).
        #[arg(long = "type")]
        types: Vec<String>,
        /// Only these journey stages (repeatable): discover, purchase, fulfil, use, support, advocate.
        #[arg(long = "stage")]
        stages: Vec<String>,
        /// Only touches at or after this RFC 3339 instant.
        #[arg(long)]
        from: Option<String>,
        /// Only touches before this RFC 3339 instant.
        #[arg(long)]
        to: Option<String>,
    },
    /// Print a customer's summary.
    Summary {
        customer_id: String,
        #[command(flatten)]
        query: Query,
    },
    /// Print the SHA-256 of a token, as the partners file and admin.token-sha256 store it.
    HashToken { token: String },
    /// The pipeline at a glance: lag per partition, the log, projection versions, dead letters.
    Status {
        #[command(flatten)]
        admin: Admin,
    },
    /// Rebuild a projection ("timeline" or "summary") from the log without downtime, with a
    /// progress bar; or cancel the running rebuild.
    Rebuild {
        projection: String,
        /// Cancel the running rebuild instead (the active version stays).
        #[arg(long)]
        cancel: bool,
        #[command(flatten)]
        admin: Admin,
    },
    /// Re-read the Kafka topic into the log (events it lacks are appended, the rest skipped).
    Replay {
        /// Where to start: "earliest", an offset, or an RFC 3339 instant.
        #[arg(long)]
        from: String,
        /// Only this partition (repeatable); every partition when absent.
        #[arg(long = "partition")]
        partitions: Vec<i32>,
        #[command(flatten)]
        admin: Admin,
    },
    /// List, requeue or discard dead letters (records that could not be decoded, or events of
    /// customers the node does not serve).
    DeadLetters {
        #[command(subcommand)]
        action: Option<DeadLetterAction>,
        #[command(flatten)]
        admin: Admin,
    },
    /// Checksums of the log and of every projection version (taken at one point of the log), to
    /// compare a rebuilt version with the one it replaced.
    Verify {
        #[command(flatten)]
        admin: Admin,
    },
    /// Write a backup of a node's system of record (the log, the consumer positions stored with
    /// it, the dead letters) to a new file, while the node runs.
    Backup {
        /// The file to write; neither it nor FILE.partial may exist.
        #[arg(long, short)]
        out: PathBuf,
        #[command(flatten)]
        admin: Admin,
    },
    /// Check a backup file whole without restoring it: its checksum, its counts, and the log's
    /// checksum computed from its events.
    VerifyBackup {
        /// The backup file.
        file: PathBuf,
    },
    /// Restore a backup file into a new store (store.path, or --data-dir) while no node runs on
    /// it: the log as it was, the projections folded from it again.
    Restore {
        /// The backup file.
        file: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print a customer's timeline, then new entries live as they are projected.
    Watch {
        customer_id: String,
        /// Resume after this cursor (the last `cursor=` an earlier watch printed).
        #[arg(long, default_value = "")]
        cursor: String,
        #[command(flatten)]
        query: Query,
    },
}

/// The configuration of a node: its file (a regular file, read again while it runs), the
/// variables, the command line.
fn load_config(args: &NodeArgs) -> anyhow::Result<Config> {
    Ok(with_flags(Config::load(args.config.as_deref())?, args))
}

/// The configuration of a command that reads its file once (a pipe will do).
fn load_config_once(args: &NodeArgs) -> anyhow::Result<Config> {
    Ok(with_flags(Config::load_once(args.config.as_deref())?, args))
}

/// `config` with the command line's settings over it.
fn with_flags(mut config: Config, args: &NodeArgs) -> Config {
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(data_dir) = &args.data_dir {
        config.store.path.clone_from(data_dir);
    }
    if let Some(listen) = args.metrics_listen {
        config.metrics.listen = listen;
    }
    if let Some(format) = args.log_format {
        config.log.format = format;
    }
    config
}

/// Logs to stderr, filtered by `RUST_LOG` when it is set (and not empty), else by `log.filter`.
///
/// # Errors
/// When `RUST_LOG` is not a tracing filter (it would be ignored: the log would not be what was
/// asked for). `log.filter` is checked with the configuration.
fn init_tracing(config: &Config) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::builder()
            .parse(&directives)
            .with_context(|| format!("RUST_LOG {directives:?} is not a tracing filter"))?,
        Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!("RUST_LOG is not UTF-8"),
        _ => EnvFilter::builder().parse_lossy(&config.log.filter),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    Ok(())
}

fn timestamp(text: Option<String>, flag: &str) -> anyhow::Result<Option<prost_types::Timestamp>> {
    text.map(|text| {
        let instant = UnixNanos::parse_rfc3339(&text)
            .with_context(|| format!("--{flag} {text:?} is not RFC 3339"))?;
        let (seconds, nanos) = instant.to_parts();
        Ok(prost_types::Timestamp { seconds, nanos })
    })
    .transpose()
}

/// The configuration file's stamp before it is read, for its watch.
fn config_stamp(args: &NodeArgs) -> Option<touchline_ingest::files::Stamp> {
    args.config
        .as_deref()
        .and_then(touchline_ingest::files::stamp)
}

async fn run_node(
    args: NodeArgs,
    broker: BrokerChoice,
    demo_customers: Option<usize>,
) -> anyhow::Result<()> {
    let loaded = config_stamp(&args);
    let config = load_config(&args)?;
    init_tracing(&config)?;
    anyhow::ensure!(
        demo_customers.is_none()
            || config
                .server
                .tls
                .as_ref()
                .is_none_or(|tls| tls.client_ca_file.is_none()),
        "--demo cannot publish to a node that requires client certificates (server.tls.client-ca-file)"
    );
    let partners = match &config.ingest.partners_file {
        Some(path) => PartnerDirectory::load(path)?,
        None if broker == BrokerChoice::Embedded => demo::demo_registry().into(),
        None if config.ingest.enabled => {
            anyhow::bail!("ingest.partners-file is required to serve partners")
        }
        None => PartnerRegistry::default().into(),
    };
    // SIGHUP reloads the partners file where there is one; anywhere else (and during the start)
    // it must not end the process, which is the signal's default action.
    node::ignore_hangups();
    // The first Ctrl-C or SIGTERM starts the shutdown; a second one while it drains ends the
    // process at once (listened for as soon as the first arrives). What was acknowledged is safe
    // either way: in Kafka, or durable in the local log before the acknowledgement (dev).
    // (A node that failed is shutting down already: then the first signal ends the process.)
    // Listened for from here on, the start included.
    let mut signals = node::ShutdownSignals::listen();
    let shutting_down = tokio_util::sync::CancellationToken::new();
    let stop = shutting_down.clone();
    tokio::spawn(async move {
        let mut status = signals.next().await;
        if !stop.is_cancelled() {
            stop.cancel();
            status = signals.next().await;
        }
        tracing::warn!("signal during the shutdown: exiting without waiting for it to finish");
        std::process::exit(status);
    });
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting");
    node::raise_open_files_limit(config.server.max_connections);
    let running = config.clone();
    // The demo's batches fit the node's limit (BATCH_TOO_LARGE otherwise).
    let demo_batch = config.ingest.max_batch_events.min(demo::DEMO_BATCH);
    let Some(mut node) = Node::start_until(config, broker, partners, &shutting_down).await? else {
        // Stopped before it served, and before anything failed: a requested stop. Not waiting
        // for the start's blocking Kafka calls (up to 30 s each), which the runtime would.
        tracing::warn!("stopped during the start, before serving");
        std::process::exit(0);
    };
    // The admin and query tokens follow the configuration file (SIGHUP, or a change of it).
    let stop_watching = tokio_util::sync::CancellationToken::new();
    if let Some(path) = args.config.clone() {
        // Read as at the start: the file, the variables, the command line.
        tokio::spawn(touchline::access::watch_config(
            path,
            loaded,
            move || load_config(&args),
            node.access().clone(),
            running,
            stop_watching.clone(),
        ));
    }
    let endpoint = node.endpoint();
    let target = node.target().clone();
    if broker == BrokerChoice::Embedded {
        let _ = touchline::outln!("touchline dev is serving on {endpoint}");
        let _ = touchline::outln!("demo partner tokens (dev only):");
        for (partner, token) in demo::DEMO_PARTNERS {
            let _ = touchline::outln!("  {partner:<18} {token}");
        }
        let ca_cert = target
            .ca_cert
            .as_ref()
            .map(|path| format!(" --ca-cert {}", path.display()))
            .unwrap_or_default();
        let _ = touchline::outln!(
            "try: touchline timeline {} --endpoint {endpoint}{ca_cert}",
            demo::demo_customer(7)
        );
    }
    if let Some(customers) = demo_customers {
        tokio::spawn(async move {
            match demo::publish_demo(&target, customers, demo_batch, 2026).await {
                Ok(report) => {
                    let _ = touchline::outln!(
                        "demo published: {} accepted, {} rejected, across {customers} customers (e.g. {})",
                        report.accepted,
                        report.rejected,
                        demo::demo_customer(7)
                    );
                }
                Err(error) => touchline::noteln!("demo failed: {error:#}"),
            }
        });
    }
    let failure = tokio::select! {
        () = shutting_down.cancelled() => None,
        error = node.failed() => Some(error),
    };
    shutting_down.cancel();
    // The token lists follow the file until the node has stopped: calls are served during the
    // shutdown's delay and grace, and a token revoked then is refused.
    let stopped = node.shutdown().await;
    stop_watching.cancel();
    match failure {
        Some(error) => Err(error),
        None => stopped,
    }
}

/// How long the process waits at its end for blocking tasks still running, which the runtime
/// would otherwise wait for whole: a verification's scans or a replay's planning against an
/// unreachable broker, whose calls the shutdown cut. A node that stopped has made its store
/// durable; a write still running then (a replay's last batch that outlived its wait, an admin
/// call cut after the grace) was answered to no one, and ends as at a crash: sled's batches are
/// atomic, and the next start reads Kafka again from the stored positions.
const EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> anyhow::Result<()> {
    std::sync::LazyLock::force(&touchline::metrics::PROCESS_STARTED);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        match run(Cli::parse()).await {
            // Output piped into a reader that stopped (`touchline timeline c | head`): done.
            Err(error) if is_broken_pipe(&error) => Ok(()),
            result => result,
        }
    });
    runtime.shutdown_timeout(EXIT_WAIT);
    result
}

/// Whether the command failed because its standard output was closed (not a broken connection
/// to the server, which fails the command).
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<touchline::OutputError>()
            .is_some_and(touchline::OutputError::is_closed)
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev {
            node,
            demo,
            demo_customers,
        } => run_node(node, BrokerChoice::Embedded, demo.then_some(demo_customers)).await,
        Command::Serve { node } => run_node(node, BrokerChoice::External, None).await,
        Command::Config { node } => {
            let config = load_config_once(&node)?;
            config.validate()?;
            touchline::out!("{}", config.to_toml()?)?;
            Ok(())
        }
        Command::Publish {
            endpoint,
            token,
            file,
            batch_size,
            window,
        } => {
            // Every line is checked before anything is sent, a line at a time; the events are
            // read again as the window takes them.
            let count = client::check_json_lines(&file)?;
            let events = client::JsonLines::open(&file)?;
            let options = stream_client::PublishOptions {
                batch_size,
                window,
                ..Default::default()
            };
            let report = stream_client::publish(&endpoint, &token, events, &options).await?;
            let printed = touchline::outln!(
                "{count} events: {} accepted, {} rejected",
                report.accepted,
                report.rejected
            );
            // Rejections fail the command whether or not the summary could be printed, and so
            // does a file that changed between its check and its reading (events answered that
            // were not checked, or checked events never read).
            anyhow::ensure!(
                report.rejected == 0,
                "{} events were rejected",
                report.rejected
            );
            let answered = report.accepted + report.rejected;
            anyhow::ensure!(
                answered == u64::try_from(count).unwrap_or(u64::MAX),
                "the file changed while it was published: {count} events were checked, {answered} were read and answered"
            );
            printed?;
            Ok(())
        }
        Command::Timeline {
            customer_id,
            query,
            limit,
            partners,
            types,
            stages,
            from,
            to,
        } => {
            let stages = stages
                .iter()
                .map(|name| {
                    JourneyStage::from_name(name)
                        .map(JourneyStage::number)
                        .with_context(|| format!("unknown stage {name:?}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let request = v1::GetTimelineRequest {
                customer_id,
                page_size: 200,
                page_token: String::new(),
                from: timestamp(from, "from")?,
                to: timestamp(to, "to")?,
                partner_ids: partners,
                types,
                stages,
            };
            let printed = client::print_timeline(
                &query.endpoint,
                query.query_token.as_deref(),
                request,
                limit,
            )
            .await?;
            touchline::outln!("({printed} touchpoints)")?;
            Ok(())
        }
        Command::Summary { customer_id, query } => {
            client::print_summary(&query.endpoint, query.query_token.as_deref(), customer_id).await
        }
        Command::HashToken { token } => {
            touchline::outln!("{}", touchline_ingest::hash_token(&token))?;
            Ok(())
        }
        Command::Status { admin } => {
            admin_client::print_status(&admin.endpoint, &admin.admin_token).await
        }
        Command::Rebuild {
            projection,
            cancel,
            admin,
        } => admin_client::rebuild(&admin.endpoint, &admin.admin_token, &projection, cancel).await,
        Command::Replay {
            from,
            partitions,
            admin,
        } => {
            let from = admin_client::replay_start(&from)?;
            admin_client::replay(&admin.endpoint, &admin.admin_token, from, partitions).await
        }
        Command::DeadLetters { action, admin } => {
            let action = action.unwrap_or(DeadLetterAction::List {
                after: 0,
                limit: 100,
            });
            admin_client::dead_letters(&admin.endpoint, &admin.admin_token, action).await
        }
        Command::Verify { admin } => {
            admin_client::verify(&admin.endpoint, &admin.admin_token).await
        }
        Command::Backup { out, admin } => {
            let file = touchline::backup::backup(&admin.endpoint, &admin.admin_token, &out).await?;
            touchline::outln!(
                "backup of {} events written to {} ({} bytes, checked)",
                file.events,
                out.display(),
                file.bytes
            )?;
            touchline::outln!("log sha256 {}", file.log_sha256)?;
            Ok(())
        }
        Command::VerifyBackup { file } => {
            let checked = touchline::backup::check_file(&file)?;
            touchline::outln!(
                "{}: a whole backup of {} events, {} positions and {} dead letters ({} bytes), taken {} by Touchline {}",
                file.display(),
                checked.events,
                checked.positions,
                checked.dead_letters,
                checked.bytes,
                checked.taken_at.map_or_else(
                    || "at an unknown time".to_owned(),
                    |at| format!("at {}", at.to_rfc3339())
                ),
                checked.touchline_version
            )?;
            touchline::outln!("log sha256 {}", checked.log_sha256)?;
            Ok(())
        }
        Command::Restore { file, store } => {
            let config = load_config_once(&NodeArgs {
                config: store.config,
                listen: None,
                data_dir: store.data_dir,
                metrics_listen: None,
                log_format: None,
            })?;
            init_tracing(&config)?;
            config.store.check()?;
            let restored = touchline::backup::restore(
                &file,
                &config.store.path,
                config.store.cache_mib.saturating_mul(1024 * 1024),
            )?;
            touchline::outln!(
                "restored {} events, {} positions and {} dead letters into {} (backup taken {} by Touchline {})",
                restored.events,
                restored.positions,
                restored.dead_letters,
                config.store.path.display(),
                restored.taken_at.map_or_else(
                    || "at an unknown time".to_owned(),
                    |at| format!("at {}", at.to_rfc3339())
                ),
                restored.touchline_version
            )?;
            touchline::outln!("log sha256 {}", restored.log.sha256)?;
            Ok(())
        }
        Command::Watch {
            customer_id,
            cursor,
            query,
        } => {
            admin_client::watch(
                &query.endpoint,
                query.query_token.as_deref(),
                customer_id,
                cursor,
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::{Cli, Command};
    use crate::admin_client::DeadLetterAction;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_admin_flags_go_before_or_after_a_dead_letter_action() {
        for args in [
            [
                "touchline",
                "dead-letters",
                "requeue",
                "7",
                "--endpoint",
                "http://node:7451",
            ],
            [
                "touchline",
                "dead-letters",
                "--endpoint",
                "http://node:7451",
                "requeue",
                "7",
            ],
        ] {
            let cli = Cli::try_parse_from(args).expect("parses");
            let Command::DeadLetters { action, admin } = cli.command else {
                panic!("not dead-letters: {cli:?}");
            };
            assert!(matches!(action, Some(DeadLetterAction::Requeue { id: 7 })));
            assert_eq!(admin.endpoint.endpoint, "http://node:7451");
        }
    }

    #[test]
    fn a_client_certificate_and_its_key_may_sit_on_either_side_of_an_action() {
        let cli = Cli::try_parse_from([
            "touchline",
            "dead-letters",
            "--client-key",
            "k.pem",
            "list",
            "--client-cert",
            "c.pem",
        ])
        .expect("parses");
        let Command::DeadLetters { admin, .. } = cli.command else {
            panic!("not dead-letters: {cli:?}");
        };
        assert_eq!(
            (admin.endpoint.client_cert, admin.endpoint.client_key),
            (Some("c.pem".into()), Some("k.pem".into()))
        );
    }

    #[test]
    fn a_dead_letter_listing_takes_1_to_1000() {
        for limit in ["0", "1001"] {
            assert!(
                Cli::try_parse_from(["touchline", "dead-letters", "list", "--limit", limit])
                    .is_err(),
                "{limit}"
            );
        }
        assert!(
            Cli::try_parse_from(["touchline", "dead-letters", "list", "--limit", "1000"]).is_ok()
        );
    }
}
