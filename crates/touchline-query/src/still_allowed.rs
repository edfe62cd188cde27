//! Whether the caller of a long-running call is still allowed to make it: its token may be
//! revoked while the call runs (a partners-file or configuration reload), and a live timeline, a
//! backup or an admin progress stream opened with it then ends with the error a new call would
//! get, instead of running on until the caller hangs up.

use tonic::Status;

/// How often a running call asks [`StillAllowed`] again.
pub(crate) const PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether a call's caller is still allowed to make it (its token not revoked), asked at most
/// once every half second: before each message sent, while a send waits for the client, and
/// every second while the call has nothing to send. The error ends the call.
pub struct StillAllowed {
    check: Box<dyn Fn() -> Result<(), Status> + Send + Sync>,
    checked_at: std::sync::Mutex<std::time::Instant>,
}

impl std::fmt::Debug for StillAllowed {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StillAllowed")
            .finish_non_exhaustive()
    }
}

impl StillAllowed {
    /// Asks `check`, which answers with the error a new call of the same caller would get.
    #[must_use]
    pub fn new(check: impl Fn() -> Result<(), Status> + Send + Sync + 'static) -> Self {
        Self {
            check: Box::new(check),
            checked_at: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// The check's error, when it is due and fails.
    pub(crate) fn revoked(&self) -> Option<Status> {
        {
            let mut checked_at = self
                .checked_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Half the period: ticks a period apart always ask.
            if checked_at.elapsed() < PERIOD / 2 {
                return None;
            }
            *checked_at = std::time::Instant::now();
        }
        (self.check)().err()
    }
}
