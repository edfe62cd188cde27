//! Store reads for the query services: on the blocking pool, at most a configured number at once.
//!
//! Reads are CPU work in the same process as the projector's one writer thread. On tokio's
//! blocking pool (up to 512 threads) every request in flight is a thread the kernel shares the
//! cores with, so a few clients reading as fast as they can take the writer's share, it falls
//! behind and what they read goes stale (measured on 2 cores: BENCHMARKS.md, "Bounded store
//! reads"). So reads wait for a permit, first come first served; by default as many as the cores:
//! more would not read faster, only queue in the kernel's scheduler beside the writer.

use std::num::NonZeroUsize;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::Status;
use touchline_core::{EventStore, StoreError};

use crate::{Error, metrics};

/// A store and the permits its reads take. Cheap to clone: clones share the permits.
#[derive(Debug, Clone)]
pub struct StoreReads {
    store: Arc<dyn EventStore>,
    permits: Arc<Semaphore>,
}

/// The reads at once that `configured` (`query.read-concurrency`) means: 0 is as many as the
/// cores.
#[must_use]
pub fn resolve_concurrency(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        n => n.min(Semaphore::MAX_PERMITS),
    }
}

impl StoreReads {
    /// Reads of `store`, at most `concurrency` at once ([`resolve_concurrency`]: 0 is as many as
    /// the cores).
    #[must_use]
    pub fn new(store: Arc<dyn EventStore>, concurrency: usize) -> Self {
        Self {
            store,
            permits: Arc::new(Semaphore::new(resolve_concurrency(concurrency))),
        }
    }

    /// The store, for what does not read it (its durable sequence, say).
    #[must_use]
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Runs `work` on the blocking pool once a permit is free; a failure is the status to answer.
    /// The permit is held until `work` returns, also when the caller stops waiting for it (a
    /// cancelled request), so that abandoned reads still count.
    ///
    /// # Errors
    /// The store's error as a status, or INTERNAL when the read panicked.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn EventStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let waiting = Waiting::start();
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))?;
        drop(waiting);
        let store = Arc::clone(&self.store);
        let read = tokio::task::spawn_blocking(move || {
            let result = work(&*store);
            drop(permit);
            result
        });
        match read.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(Error::from(error).into()),
            Err(error) => Err(Error::from(error).into()),
        }
    }
}

/// Counts a read in [`metrics::READS_WAITING`] until dropped (also when the request is
/// cancelled while it waits).
struct Waiting;

impl Waiting {
    fn start() -> Self {
        metrics::READS_WAITING.inc();
        Self
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        metrics::READS_WAITING.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use touchline_projection::sled_store::SledStore;

    use super::*;

    #[test]
    fn zero_means_as_many_as_the_cores() {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        assert_eq!(resolve_concurrency(0), cores);
        assert!(resolve_concurrency(0) >= 1);
        assert_eq!(resolve_concurrency(3), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_more_reads_run_at_once_than_the_permits() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn EventStore> = Arc::new(SledStore::open(dir.path())?);
        let reads = StoreReads::new(store, 2);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let most_waiting = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let reads = reads.clone();
            let running = Arc::clone(&running);
            let most = Arc::clone(&most);
            let most_waiting = Arc::clone(&most_waiting);
            tasks.push(tokio::spawn(async move {
                reads
                    .run(move |store| {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        let waiting = usize::try_from(metrics::READS_WAITING.get()).unwrap_or(0);
                        most_waiting.fetch_max(waiting, Ordering::SeqCst);
                        // Long enough for the other reads to pile up behind the permits.
                        std::thread::sleep(Duration::from_millis(5));
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok(store.durable_sequence())
                    })
                    .await
            }));
        }
        for task in tasks {
            task.await??;
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
        // The others waited, and were counted while they did.
        assert!(most_waiting.load(Ordering::SeqCst) > 0);
        assert_eq!(metrics::READS_WAITING.get(), 0);
        Ok(())
    }
}
