//! Whether the caller of a long-running call is still allowed to make it: its token may be
//! revoked while the call runs (a partners-file or configuration reload), and a live timeline, a
//! backup or an admin progress stream opened with it then ends with the error a new call would
//! get, instead of running on until the caller hangs up.

use std::sync::{Arc, Mutex, PoisonError};

use futures::{Stream, StreamExt as _};
use tonic::Status;

/// How often a running call asks [`StillAllowed`] again.
pub(crate) const PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether a call's caller is still allowed to make it (its token not revoked), asked at most
/// once every half second: before each message sent, while a send waits for the client, and
/// every second while the call has nothing to send. Once the check fails, the call is revoked
/// for good: the error ends it.
pub struct StillAllowed {
    check: Box<dyn Fn() -> Result<(), Status> + Send + Sync>,
    checked_at: Mutex<std::time::Instant>,
    revoked: Mutex<Option<Status>>,
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
            checked_at: Mutex::new(std::time::Instant::now()),
            revoked: Mutex::new(None),
        }
    }

    /// Asks `authorize` of the credentials of a call (its `metadata`), as when the call came.
    #[must_use]
    pub(crate) fn of_call(
        authorize: &crate::admin::Authorize,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Arc<Self> {
        let authorize = Arc::clone(authorize);
        let metadata = metadata.clone();
        Arc::new(Self::new(move || authorize(&metadata).map(|_| ())))
    }

    /// The caller's error: the one seen before, or the check's when it is due and fails.
    pub(crate) fn revoked(&self) -> Option<Status> {
        if let Some(status) = self.seen() {
            return Some(status);
        }
        {
            let mut checked_at = lock(&self.checked_at);
            // Half the period: ticks a period apart always ask.
            if checked_at.elapsed() < PERIOD / 2 {
                return None;
            }
            *checked_at = std::time::Instant::now();
        }
        let status = (self.check)().err()?;
        *lock(&self.revoked) = Some(status.clone());
        Some(status)
    }

    /// The caller's error if a revocation was seen, without asking.
    fn seen(&self) -> Option<Status> {
        lock(&self.revoked).clone()
    }
}

/// `stream` while its caller is allowed (asked before each item, and every [`PERIOD`] while
/// `stream` has nothing: once revoked, the items queued behind are dropped, not sent), then the
/// caller's error. The producer of `stream` only has to stop once it sees the revocation (its
/// receiver is dropped here): its caller is told here, even when the producer could not queue
/// anything more for a caller that does not read, or is itself waiting (a watch's catch-up for a
/// read permit, a backup for the writer).
pub(crate) fn until_revoked<W: Send + 'static>(
    stream: impl Stream<Item = Result<W, Status>> + Send + 'static,
    still_allowed: Arc<StillAllowed>,
) -> impl Stream<Item = Result<W, Status>> + Send + 'static {
    let asked = Arc::clone(&still_allowed);
    let watched = Arc::clone(&still_allowed);
    let revoked = async move {
        let mut check = tokio::time::interval_at(tokio::time::Instant::now() + PERIOD, PERIOD);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            check.tick().await;
            if watched.revoked().is_some() {
                return;
            }
        }
    };
    ending_with(
        stream
            .take_while(move |_| std::future::ready(asked.revoked().is_none()))
            .take_until(revoked),
        move || still_allowed.seen(),
    )
}

/// `stream`, then the error `last` gives once it has ended, if any.
pub(crate) fn ending_with<W: Send + 'static>(
    stream: impl Stream<Item = Result<W, Status>> + Send + 'static,
    last: impl FnOnce() -> Option<Status> + Send + 'static,
) -> impl Stream<Item = Result<W, Status>> + Send + 'static {
    stream
        .chain(futures::stream::once(async move { last().map(Err) }).filter_map(std::future::ready))
}

/// Sends `message` once the caller has room for it, asking meanwhile (every [`PERIOD`]) whether it
/// is still allowed; `false` when the caller went away or was revoked (the revocation then ends
/// the stream through [`until_revoked`]).
pub(crate) async fn send_while_allowed<M>(
    sender: &tokio::sync::mpsc::Sender<M>,
    message: M,
    still_allowed: Option<&StillAllowed>,
) -> bool {
    loop {
        if still_allowed.is_some_and(|still| still.revoked().is_some()) {
            return false;
        }
        tokio::select! {
            permit = sender.reserve() => {
                let Ok(permit) = permit else { return false };
                permit.send(message);
                return true;
            }
            () = tokio::time::sleep(PERIOD) => {}
        }
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose producer has nothing to send for a while (waiting for a read permit, say)
    /// still ends with the caller's error within about a period of the revocation.
    #[tokio::test]
    async fn a_stream_that_sends_nothing_ends_once_its_caller_is_revoked() {
        let allowed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let still = Arc::clone(&allowed);
        let still_allowed = Arc::new(StillAllowed::new(move || {
            if still.load(std::sync::atomic::Ordering::SeqCst) {
                Ok(())
            } else {
                Err(Status::permission_denied("revoked"))
            }
        }));
        let silent = futures::stream::pending::<Result<(), Status>>();
        let mut stream = Box::pin(until_revoked(silent, still_allowed));
        allowed.store(false, std::sync::atomic::Ordering::SeqCst);
        let ended = tokio::time::timeout(PERIOD * 5, stream.next())
            .await
            .expect("ended within a few periods");
        assert_eq!(
            ended.map(|item| item.map_err(|status| status.code())),
            Some(Err(tonic::Code::PermissionDenied))
        );
        assert!(stream.next().await.is_none());
    }
}
