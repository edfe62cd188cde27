//! Latency samples and their percentiles, and the process's peak memory.

use std::time::Duration;

use serde::Serialize;

/// Percentiles of a set of latency samples, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    #[must_use]
    pub fn of(samples: &mut [Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |quantile: f64| {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "an index into a non-empty slice"
            )]
            let index = ((samples.len() as f64 - 1.0) * quantile).round() as usize;
            samples[index.min(samples.len() - 1)].as_secs_f64() * 1000.0
        };
        Self {
            count: samples.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: at(1.0),
        }
    }
}

/// `count` per second over `elapsed`.
#[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
#[must_use]
pub fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Resets the peak RSS (Linux: `clear_refs` 5), so that a later [`peak_rss_mib`] covers only
/// what ran since. Returns whether the kernel took it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident set size in MiB (`VmHWM`), where the platform tells.
#[must_use]
pub fn peak_rss_mib() -> Option<f64> {
    #[allow(
        clippy::cast_precision_loss,
        reason = "MiB of a process, far below 2^52"
    )]
    touchline::metrics::process_status_kib("VmHWM").map(|kib| kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_samples() {
        let mut samples: Vec<Duration> = (1..=1000).rev().map(Duration::from_millis).collect();
        let percentiles = Percentiles::of(&mut samples);
        assert_eq!(percentiles.count, 1000);
        assert!((percentiles.p50_ms - 501.0).abs() < 1.0);
        assert!((percentiles.p99_ms - 990.0).abs() < 1.5);
        assert!((percentiles.max_ms - 1000.0).abs() < 0.01);
        assert_eq!(Percentiles::of(&mut []).count, 0);
    }
}
