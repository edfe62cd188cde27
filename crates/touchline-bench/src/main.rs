//! `touchline-bench`: measures the pipeline against its ceilings in one run, on the same machine,
//! broker and records, and prints a table (and JSON with `--json`).
//!
//! Phases: (1) the pipeline at full speed with K partners on `PublishStream` (end-to-end
//! throughput until the last event is queryable, acknowledgement latency) and a rebuild, (2) the
//! pipeline paced open-loop at half that rate (acknowledgement and ingest-to-queryable latency,
//! `GetTimeline` latency with Q readers during ingest), (3) reads after ingest, then the ceilings:
//! (4) the broker (raw rdkafka produce then consume), (5) sled (batched log + timeline writes);
//! and the peak RSS of the pipeline phases and of the ceiling phases.

mod ceilings;
mod pipeline;
mod readers;
mod stats;
mod workload;

/// The allocator the `touchline` binary runs with (the node runs in this process).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Serialize;
use touchline_kafka::{EmbeddedBroker, KafkaOptions};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Preset {
    /// 2,000 events, 200 customers: a smoke test.
    Tiny,
    /// 100,000 events, 10,000 customers.
    Quick,
    /// 1,000,000 events, 100,000 customers.
    Full,
}

#[derive(Debug, Parser)]
#[command(
    name = "touchline-bench",
    about = "Measures Touchline against its ceilings in one run"
)]
struct Args {
    /// The workload. Default: full with `--kafka`, quick on the embedded mock cluster (which keeps
    /// only about 5 MiB per partition and cannot hold the full preset's backlog).
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// Events (overrides the preset).
    #[arg(long)]
    events: Option<usize>,
    /// Customers (overrides the preset).
    #[arg(long)]
    customers: Option<usize>,
    /// Concurrent partner clients (K).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Events per request.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Unanswered requests per client.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Concurrent timeline readers (Q).
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Records the projector takes from the consumer at once (`projector.max-batch`).
    #[arg(long, default_value_t = 1000)]
    projector_batch: usize,
    /// sled's page cache in MiB (`store.cache-mib`): the node's store, the sled ceiling and the
    /// store's own apply all use it. Default: the node's default.
    #[arg(long, default_value_t = touchline_projection::sled_store::DEFAULT_CACHE_BYTES / (1024 * 1024))]
    cache_mib: u64,
    /// Store reads the node serves at once (`query.read-concurrency`; 0: as many as the cores).
    #[arg(long, default_value_t = 0)]
    read_concurrency: usize,
    /// Bootstrap servers of an external broker (for example Tansu); the embedded mock cluster when
    /// not given.
    #[arg(long)]
    kafka: Option<String>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// The offered rate of the paced phase, in events per second. Default: half of the full-speed
    /// run's end-to-end rate. Set it to compare two binaries at the same load (the latency
    /// figures follow the offered rate, which otherwise follows each run's own full speed).
    #[arg(long, value_parser = positive_rate)]
    offered_rate: Option<f64>,
}

/// A rate above zero and finite.
fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a positive number of events per second"
        )),
    }
}

#[derive(Debug, Serialize)]
struct Report {
    broker: String,
    shape: pipeline::Shape,
    record_bytes: usize,
    broker_ceiling: ceilings::BrokerCeiling,
    /// The faster of the two below.
    sled_ceiling_per_second: f64,
    /// The lower of the two ceilings, "broker" (produce-and-consume) or "sled", which the
    /// end-to-end ratio is measured against, and its rate.
    lower_ceiling: &'static str,
    lower_ceiling_per_second: f64,
    /// The sled ceiling through sled's `apply_batch` alone.
    sled_alone_per_second: f64,
    /// The sled ceiling through the store's batch apply (its gate and epoch collection).
    sled_collected_per_second: f64,
    /// The store's own apply of the same records (`SledStore::apply`, decode included, batches
    /// of 1,000, a flush each): how much of the pipeline's time the store's work takes.
    store_per_second: f64,
    /// End-to-end throughput over the store's own apply rate.
    full_speed_vs_store: f64,
    full_speed: pipeline::Run,
    full_speed_ratio: f64,
    /// Events folded per second by a rebuild of the timeline projection (of the full-speed run's
    /// log), from the start to the switch (the old version is deleted after it).
    rebuild_per_second: f64,
    rebuild_events: u64,
    rebuild_ratio: f64,
    half_rate: pipeline::Run,
    /// `GetTimeline` reads of a full page of 50 after ingest.
    reads_after: stats::Percentiles,
    reads_after_per_second: f64,
    /// Reads after ingest that returned fewer than 50 entries (not in `reads_after`).
    reads_after_short: usize,
    peak_rss_mib: Option<f64>,
    /// Peak RSS of the ceiling phases (all records in memory, the broker's and sled's work; the
    /// peak is reset before them). `None` where the kernel cannot reset it.
    ceilings_peak_rss_mib: Option<f64>,
    /// Peak RSS of the pipeline phases (they run first, so this is the process's peak until then).
    pipeline_peak_rss_mib: Option<f64>,
    /// The first acknowledgement of each phase's just-started node (full speed, half rate), from
    /// just after the node started, the partner client's connection included.
    first_ack_after_start_ms: Vec<f64>,
}

const PARTITIONS: i32 = 6;

/// A broker for one phase: a topic of its own on the external broker, or a fresh mock cluster.
async fn broker_for(
    args: &Args,
    name: &str,
    keep: &mut Vec<EmbeddedBroker>,
) -> anyhow::Result<KafkaOptions> {
    // Unique on a broker that outlives runs (process ids repeat, in containers at once): an
    // existing topic would hold another run's records, counted by the ceiling's consumer and
    // taken as duplicates by the node.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let topic = format!("touchline-bench-{name}-{}-{started:x}", std::process::id());
    let bootstrap = match &args.kafka {
        Some(bootstrap) => bootstrap.clone(),
        None => {
            let broker = EmbeddedBroker::start(1, &topic, PARTITIONS)?;
            let bootstrap = broker.bootstrap_servers().to_owned();
            keep.push(broker);
            bootstrap
        }
    };
    let options = KafkaOptions {
        bootstrap_servers: bootstrap,
        topic,
        partitions: PARTITIONS,
        ..KafkaOptions::default()
    };
    touchline_kafka::ensure_topic(&options).await?;
    Ok(options)
}

/// A row without a ceiling.
fn figure(name: &str, value: String) {
    line(name, value, String::new(), String::new());
}

/// A latency row against its p99 target: the ratio is measured p99 / target, with the number of
/// samples (with few, the p99.9 is the largest); without samples, nothing was measured and the
/// row says so (never a ratio that would read as met).
fn target_line(name: &str, percentiles: &stats::Percentiles, target_ms: f64) {
    if percentiles.count == 0 {
        line(
            name,
            "n/a (no samples)".to_owned(),
            format!("{target_ms:.0} ms p99"),
            "n/a".to_owned(),
        );
        return;
    }
    line(
        name,
        format!(
            "{:.2} / {:.2} / {:.2} ms",
            percentiles.p50_ms, percentiles.p99_ms, percentiles.p999_ms
        ),
        format!("{target_ms:.0} ms p99"),
        format!("{:.2}", percentiles.p99_ms / target_ms),
    );
    line(
        "  samples",
        format!("{}", percentiles.count),
        String::new(),
        String::new(),
    );
}

/// A fresh broker (or topic) and a node with its own store for one pipeline phase.
async fn start_phase(
    args: &Args,
    name: &str,
    brokers: &mut Vec<EmbeddedBroker>,
    shape: &pipeline::Shape,
) -> anyhow::Result<(touchline::Node, tempfile::TempDir, Duration)> {
    let kafka = broker_for(args, name, brokers).await?;
    let dir = tempfile::tempdir()?;
    let node =
        pipeline::start_node(&kafka.bootstrap_servers, &kafka.topic, dir.path(), shape).await?;
    let first_ack = pipeline::warm_up(&node, shape).await?;
    Ok((node, dir, first_ack))
}

#[allow(
    clippy::needless_pass_by_value,
    reason = "the call sites build the strings inline"
)]
fn line(name: &str, value: String, ceiling: String, ratio: String) {
    println!("{name:<44} {value:>18} {ceiling:>18} {ratio:>8}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let preset = args.preset.unwrap_or(if args.kafka.is_some() {
        Preset::Full
    } else {
        Preset::Quick
    });
    let (events, customers) = match preset {
        Preset::Tiny => (2_000, 200),
        Preset::Quick => (100_000, 10_000),
        Preset::Full => (1_000_000, 100_000),
    };
    let shape = pipeline::Shape {
        events: args.events.unwrap_or(events),
        customers: args.customers.unwrap_or(customers),
        clients: args.clients.max(1),
        batch_size: args.batch_size.max(1),
        window: args.window.max(1),
        readers: args.readers,
        projector_batch: args.projector_batch,
        cache_mib: args.cache_mib.max(1),
        // Resolved here so that the JSON says what ran.
        read_concurrency: touchline_query::reads::resolve_concurrency(args.read_concurrency),
    };
    let broker_name = args.kafka.clone().map_or_else(
        || "embedded mock cluster".to_owned(),
        |bootstrap| format!("external {bootstrap}"),
    );
    eprintln!(
        "touchline-bench: {} events over {} customers, {} clients, broker: {broker_name}",
        shape.events, shape.customers, shape.clients
    );
    let mut brokers = Vec::new();
    eprintln!("1/5 pipeline at full speed");
    let (node, _dir, full_first_ack) = start_phase(&args, "full", &mut brokers, &shape).await?;
    let full_shape = pipeline::Shape {
        readers: 0,
        ..shape.clone()
    };
    let full_speed = pipeline::run(&node, &full_shape, None).await?;
    eprintln!("   rebuild of the timeline projection");
    let (rebuild_events, rebuild_per_second) = pipeline::rebuild(&node).await?;
    node.shutdown().await?;
    brokers.clear();

    eprintln!("2/5 pipeline at half rate, with readers");
    let (node, _dir, half_first_ack) = start_phase(&args, "half", &mut brokers, &shape).await?;
    let offered = args
        .offered_rate
        .unwrap_or(full_speed.end_to_end_per_second / 2.0);
    let half_rate = pipeline::run(&node, &shape, Some(offered)).await?;
    eprintln!("3/5 reads after ingest");
    let (reads_after, reads_after_per_second, reads_after_short) =
        readers::reads_after(&node, &shape, Duration::from_secs(3)).await?;
    node.shutdown().await?;
    brokers.clear();

    // The pipeline runs first: its peak is the process's from the start. The ceilings hold every
    // record in memory, and what they free is not all returned to the system, so measured after
    // them the pipeline's peak would grow with the number of events for the bench's own reasons.
    let pipeline_peak = stats::peak_rss_mib();
    let peak_reset = stats::reset_peak_rss();
    // One copy, shared by the phases (a copy for each would count in the ceiling phases' peak).
    let records: std::sync::Arc<[(String, Vec<u8>)]> = (0..shape.events)
        .map(|index| {
            let (key, value, _) = workload::record(index, shape.customers, 1_760_000_000);
            (key, value)
        })
        .collect();
    let record_bytes =
        records.iter().map(|(_, value)| value.len()).sum::<usize>() / records.len().max(1);

    eprintln!("4/5 broker ceiling");
    let kafka = broker_for(&args, "ceiling", &mut brokers).await?;
    let broker_ceiling = ceilings::broker(&kafka, &records).await?;
    brokers.clear();
    eprintln!("5/5 sled ceiling");
    let cache_bytes = shape.cache_mib.saturating_mul(1024 * 1024);
    // Through sled alone, then through the store's batch apply.
    let mut sled_rates = [0.0; 2];
    for (rate, collected) in sled_rates.iter_mut().zip([false, true]) {
        let sled_dir = tempfile::tempdir()?;
        let records = std::sync::Arc::clone(&records);
        let path = sled_dir.path().to_owned();
        *rate = tokio::task::spawn_blocking(move || {
            ceilings::sled_rate(&path, &records, 1000, cache_bytes, collected)
        })
        .await??;
    }
    let [sled_alone, sled_collected] = sled_rates;
    let sled_ceiling = sled_alone.max(sled_collected);
    eprintln!("   the store's own apply");
    let store_dir = tempfile::tempdir()?;
    let store_per_second = {
        let path = store_dir.path().to_owned();
        tokio::task::spawn_blocking(move || {
            ceilings::store_rate(&path, &records, 1000, cache_bytes)
        })
        .await??
    };
    let ceilings_peak = if peak_reset {
        stats::peak_rss_mib()
    } else {
        None
    };
    // The lower of the two ceilings, and which it is.
    let (ceiling, lower) = if sled_ceiling <= broker_ceiling.per_second {
        (sled_ceiling, "sled")
    } else {
        (broker_ceiling.per_second, "broker")
    };
    let report = Report {
        broker: broker_name,
        shape,
        record_bytes,
        broker_ceiling,
        sled_ceiling_per_second: sled_ceiling,
        lower_ceiling: lower,
        lower_ceiling_per_second: ceiling,
        sled_alone_per_second: sled_alone,
        sled_collected_per_second: sled_collected,
        store_per_second,
        full_speed_vs_store: full_speed.end_to_end_per_second / store_per_second.max(1e-9),
        full_speed_ratio: full_speed.end_to_end_per_second / ceiling.max(1e-9),
        full_speed,
        rebuild_per_second,
        rebuild_events,
        rebuild_ratio: rebuild_per_second / sled_ceiling.max(1e-9),
        half_rate,
        reads_after,
        reads_after_per_second,
        reads_after_short,
        peak_rss_mib: match (pipeline_peak, stats::peak_rss_mib()) {
            (Some(before), Some(after)) => Some(before.max(after)),
            (before, after) => before.or(after),
        },
        ceilings_peak_rss_mib: ceilings_peak,
        first_ack_after_start_ms: [full_first_ack, half_first_ack]
            .iter()
            .map(|first| first.as_secs_f64() * 1000.0)
            .collect(),
        pipeline_peak_rss_mib: pipeline_peak,
    };

    println!();
    line(
        "figure",
        "measured".into(),
        "ceiling".into(),
        "ratio".into(),
    );
    figure(
        "broker: raw produce (records/s)",
        format!("{:.0}", report.broker_ceiling.produce_per_second),
    );
    figure(
        "broker: raw consume, alongside (records/s)",
        format!("{:.0}", report.broker_ceiling.consume_per_second),
    );
    figure(
        "broker: produce-and-consume (records/s)",
        format!("{:.0}", report.broker_ceiling.per_second),
    );
    figure(
        "sled: batched log + timeline writes (rec/s)",
        format!("{:.0}", report.sled_ceiling_per_second),
    );
    figure(
        "  sled alone / with the store's collector",
        format!(
            "{:.0} / {:.0}",
            report.sled_alone_per_second, report.sled_collected_per_second
        ),
    );
    line(
        &format!("end-to-end throughput vs {lower}, target 0.5"),
        format!("{:.0}", report.full_speed.end_to_end_per_second),
        format!("{ceiling:.0}"),
        format!("{:.2}", report.full_speed_ratio),
    );
    line(
        "  the same, against the store's own apply",
        String::new(),
        format!("{:.0}", report.store_per_second),
        format!("{:.2}", report.full_speed_vs_store),
    );
    figure(
        "  acknowledged (all events acked), full speed",
        format!("{:.0}", report.full_speed.acknowledged_per_second),
    );
    figure(
        "  projected by then",
        format!("{}", report.full_speed.projected_when_acknowledged),
    );
    if let Some(after) = report.full_speed.projected_after_ingest_per_second {
        line(
            "  projected after ingest (ev/s), vs store's own",
            format!("{after:.0}"),
            format!("{:.0}", report.store_per_second),
            format!("{:.2}", after / report.store_per_second.max(1e-9)),
        );
    }
    line(
        "rebuild of the timeline (ev/s), target 0.7",
        format!("{:.0}", report.rebuild_per_second),
        format!("{:.0}", report.sled_ceiling_per_second),
        format!("{:.2}", report.rebuild_ratio),
    );
    let ms = |value: f64| format!("{value:.2} ms");
    figure(
        "ack latency p50/p99/p99.9, full speed (sent-answered)",
        format!(
            "{:.2} / {:.2} / {:.2} ms",
            report.full_speed.ack_latency.p50_ms,
            report.full_speed.ack_latency.p99_ms,
            report.full_speed.ack_latency.p999_ms
        ),
    );
    figure(
        "  samples",
        format!("{}", report.full_speed.ack_latency.count),
    );
    figure(
        "half rate: offered / acknowledged (ev/s)",
        format!(
            "{:.0} / {:.0}",
            report.half_rate.offered_per_second.unwrap_or_default(),
            report.half_rate.acknowledged_per_second
        ),
    );
    figure(
        "  end to end, the last event queryable (ev/s)",
        format!("{:.0}", report.half_rate.end_to_end_per_second),
    );
    target_line(
        "ack latency p50/p99/p99.9, half rate",
        &report.half_rate.ack_latency,
        20.0,
    );
    target_line(
        "ingest-to-queryable p50/p99/p99.9, half rate",
        &report.half_rate.ingest_to_queryable,
        100.0,
    );
    target_line(
        "GetTimeline(50) p50/p99/p99.9 during ingest",
        &report.half_rate.reads_during,
        5.0,
    );
    figure(
        "GetTimeline(50) reads/s during ingest",
        format!("{:.0}", report.half_rate.reads_during_per_second),
    );
    figure(
        "  reads of fewer than 50 entries (not counted)",
        format!("{}", report.half_rate.reads_during_short),
    );
    figure(
        "GetTimeline(50) p50 / p99 after ingest",
        if report.reads_after.count == 0 {
            "n/a (no samples)".to_owned()
        } else {
            format!(
                "{} / {}",
                ms(report.reads_after.p50_ms),
                ms(report.reads_after.p99_ms)
            )
        },
    );
    figure(
        "GetTimeline(50) reads/s after ingest",
        format!("{:.0}", report.reads_after_per_second),
    );
    figure(
        "  reads of fewer than 50 entries (not counted)",
        format!("{}", report.reads_after_short),
    );
    figure(
        "peak RSS, whole run (MiB)",
        report
            .peak_rss_mib
            .map_or_else(|| "n/a".to_owned(), |rss| format!("{rss:.0}")),
    );
    figure(
        "peak RSS, ceiling phases (MiB)",
        report
            .ceilings_peak_rss_mib
            .map_or_else(|| "n/a".to_owned(), |rss| format!("{rss:.0}")),
    );
    figure(
        "peak RSS, pipeline phases (MiB)",
        report
            .pipeline_peak_rss_mib
            .map_or_else(|| "n/a".to_owned(), |rss| format!("{rss:.0}")),
    );
    figure(
        "RSS, 1/4 2/4 3/4 4/4 projected (MiB)",
        if report.full_speed.rss_projected.is_empty() {
            "n/a".to_owned()
        } else {
            report
                .full_speed
                .rss_projected
                .iter()
                .map(|sample| format!("{:.0}", sample.rss_mib))
                .collect::<Vec<_>>()
                .join(" / ")
        },
    );
    figure(
        "RSS growth, 2/4 to 4/4 (bytes/event)",
        report
            .full_speed
            .rss_growth_bytes_per_event
            .map_or_else(|| "n/a".to_owned(), |bytes| format!("{bytes:.0}")),
    );
    figure(
        "first ack of a just-started node (ms)",
        report
            .first_ack_after_start_ms
            .iter()
            .map(|ms| format!("{ms:.0}"))
            .collect::<Vec<_>>()
            .join(" / "),
    );
    println!(
        "record size: {} bytes; rebuild folded {} events",
        report.record_bytes, report.rebuild_events
    );
    println!(
        "ratio: a rate over its ceiling (its target is the least it may be), a p99 over its target (at most 1); p99.9 of fewer than 1,000 samples is about their largest"
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("figures written to {}", path.display());
    }
    Ok(())
}
