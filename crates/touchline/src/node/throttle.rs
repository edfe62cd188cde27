//! Warnings about something that can happen many times a second (accept errors, refused
//! connections): logged once a minute at most, with how many times it happened since.

use std::time::Duration;

use tokio::time::Instant;

/// How often a throttled warning is logged at most.
pub(super) const EVERY: Duration = Duration::from_secs(60);

/// When the warning was last logged, and the times it happened since.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    last: Option<Instant>,
    since: u64,
}

impl Throttle {
    /// Counts one more time; `Some(the times since the last warning, this one included)` when a
    /// warning is due now (log it at debug level otherwise).
    pub(crate) fn note(&mut self) -> Option<u64> {
        self.since += 1;
        if self.last.is_some_and(|at| at.elapsed() < EVERY) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since))
    }
}
