//! The benchmark runs end to end on its tiny preset and writes its figures, so it cannot rot. It
//! asserts what it reports, not how fast anything is.

#[test]
fn the_benchmark_runs_on_the_tiny_preset() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("figures.json");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_touchline-bench"))
        .args([
            "--preset",
            "tiny",
            "--clients",
            "2",
            "--readers",
            "1",
            "--batch-size",
            "100",
            "--offered-rate",
            "1500",
            "--json",
        ])
        .arg(&json)
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let figures: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    assert_eq!(figures["shape"]["events"], 2000);
    assert_eq!(
        figures
            .pointer("/half_rate/offered_per_second")
            .and_then(serde_json::Value::as_f64),
        Some(1500.0),
        "the paced phase offers the rate asked for"
    );
    for figure in [
        "/broker_ceiling/per_second",
        "/sled_ceiling_per_second",
        "/store_per_second",
        "/full_speed/end_to_end_per_second",
        "/half_rate/ack_latency/count",
    ] {
        assert!(
            figures
                .pointer(figure)
                .and_then(serde_json::Value::as_f64)
                .is_some_and(|value| value > 0.0),
            "{figure} is reported"
        );
    }
    assert!(
        figures
            .pointer("/full_speed/projected_when_acknowledged")
            .and_then(serde_json::Value::as_u64)
            .is_some(),
        "the events projected by the last acknowledgement are reported"
    );
    assert!(
        figures
            .pointer("/full_speed/projected_after_ingest_per_second")
            .is_some_and(|rate| rate.is_null() || rate.as_f64().is_some_and(|rate| rate > 0.0)),
        "the projector's rate after ingest is reported (null when it had caught up by then)"
    );
    // Every figure with a target was measured: none passes for want of samples.
    let count = |pointer: &str| {
        figures
            .pointer(pointer)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or_default()
    };
    // 2,000 events from 2 clients in batches of 100: 20 batches a phase, each answered.
    assert_eq!(count("/full_speed/ack_latency/count"), 20);
    assert_eq!(count("/half_rate/ack_latency/count"), 20);
    // The last event of every second batch is watched until it is queryable.
    assert_eq!(count("/half_rate/ingest_to_queryable/count"), 10);
    // The paced phase followed its schedule: each client's last batch goes out 9 intervals of
    // 100 x 2 / 1,500 s after the start (a closed loop would take a fraction of that).
    let seconds = |pointer: &str| {
        figures
            .pointer(pointer)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    assert!(
        seconds("/half_rate/seconds") >= 9.0 * 100.0 * 2.0 / 1500.0,
        "the paced phase took {} s",
        seconds("/half_rate/seconds")
    );
    // The end-to-end ratio is against the lower of the two ceilings.
    let lower = seconds("/lower_ceiling_per_second");
    assert_eq!(
        lower,
        seconds("/broker_ceiling/per_second").min(seconds("/sled_ceiling_per_second"))
    );
    assert_eq!(
        figures["lower_ceiling"],
        if lower == seconds("/sled_ceiling_per_second") {
            "sled"
        } else {
            "broker"
        }
    );
    let ratio = seconds("/full_speed/end_to_end_per_second") / lower;
    assert!(
        (seconds("/full_speed_ratio") - ratio).abs() <= 1e-9 * ratio,
        "{} against {ratio}",
        seconds("/full_speed_ratio")
    );
    // Full pages of 50 during ingest: the `GetTimeline` target's figure (short reads, before
    // the read customers have 50 entries, are counted apart and do not make it).
    assert!(
        count("/half_rate/reads_during/count") > 0,
        "full pages of 50 during ingest (short reads: {})",
        count("/half_rate/reads_during_short")
    );
    assert!(
        count("/reads_after/count") > 0,
        "full pages of 50 after ingest"
    );
    assert!(
        count("/rebuild_events") >= 2000,
        "the rebuild folded the log"
    );
    for percentiles in [
        "/full_speed/ack_latency",
        "/half_rate/ack_latency",
        "/half_rate/ingest_to_queryable",
        "/half_rate/reads_during",
        "/reads_after",
    ] {
        let at = |name: &str| {
            figures
                .pointer(&format!("{percentiles}/{name}"))
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(f64::NAN)
        };
        assert!(
            at("p50_ms") <= at("p99_ms")
                && at("p99_ms") <= at("p999_ms")
                && at("p999_ms") <= at("max_ms"),
            "{percentiles} percentiles are ordered"
        );
    }
    // Memory as the full-speed run's events were projected: one sample a quarter, the last once
    // every event was (where the platform tells a process its resident memory).
    if cfg!(target_os = "linux") {
        let projected: Vec<u64> = figures
            .pointer("/full_speed/rss_projected")
            .and_then(serde_json::Value::as_array)
            .map(|samples| {
                samples
                    .iter()
                    .filter_map(|sample| sample["projected"].as_u64())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(projected.len(), 4, "{projected:?}");
        assert!(
            projected.is_sorted() && projected[0] >= 500 && projected[3] == 2000,
            "{projected:?}"
        );
        // Unless one flush made the half and the last projected at once.
        assert!(
            figures
                .pointer("/full_speed/rss_growth_bytes_per_event")
                .is_some_and(|bytes| bytes.as_f64().is_some() || projected[1] == projected[3]),
            "the memory growth per event is reported"
        );
    }
    assert!(String::from_utf8_lossy(&output.stdout).contains("end-to-end throughput"));
    Ok(())
}
