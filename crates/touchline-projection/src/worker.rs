//! A dedicated thread for the store's writes.
//!
//! Tokio's blocking pool runs each `spawn_blocking` call on whichever of its threads is idle, so a
//! projector's consecutive writes hopped between threads, each hop a wake-up of another thread
//! and writes into another thread's share of the allocator. Measured in the projector's busy
//! phase after ingest (the bench's full-speed phase): 22% of the two cores idle with the blocking
//! pool, 5% with one writer thread (BENCHMARKS.md). It also makes the writer visible by name
//! (`tl-projector`) in `top -H` and profiles.

use std::sync::mpsc;

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// A named thread that runs the closures given to it, one at a time, in order. The thread ends
/// when the `Worker` is dropped, after the closures already given.
#[derive(Debug)]
pub struct Worker {
    name: &'static str,
    jobs: mpsc::Sender<Job>,
}

/// The worker's thread is gone (it could not start, or a closure panicked).
#[derive(Debug, thiserror::Error)]
#[error("the {0} thread is gone")]
pub struct WorkerGone(pub &'static str);

impl Worker {
    /// Starts the thread.
    ///
    /// # Errors
    /// When the OS cannot start a thread.
    pub fn start(name: &'static str) -> std::io::Result<Self> {
        let (jobs, receiver) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                for job in receiver {
                    job();
                }
            })?;
        Ok(Self { name, jobs })
    }

    /// Gives `work` to the thread at once (before the returned future is polled) and returns a
    /// future of its result, so that the caller can prepare the next work meanwhile.
    ///
    /// # Errors
    /// The future fails when the thread is gone: a closure before panicked.
    pub fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> impl Future<Output = Result<T, WorkerGone>> + Send + 'static {
        let name = self.name;
        let (done, result) = oneshot::channel();
        let sent = self
            .jobs
            .send(Box::new(move || {
                let _ = done.send(work());
            }))
            .is_ok();
        async move {
            if !sent {
                return Err(WorkerGone(name));
            }
            result.await.map_err(|_| WorkerGone(name))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closures_run_in_order_on_one_named_thread_and_a_panic_is_reported() {
        let worker = Worker::start("tl-test-worker").expect("thread starts");
        let mut seen = Vec::new();
        for index in 0..5 {
            seen.push(
                worker
                    .run(move || (index, std::thread::current().name().map(str::to_owned)))
                    .await
                    .expect("runs"),
            );
        }
        assert_eq!(
            seen,
            (0..5)
                .map(|index| (index, Some("tl-test-worker".to_owned())))
                .collect::<Vec<_>>()
        );
        // Given at once: the work runs although its future is not polled yet.
        let (ran, seen_run) = std::sync::mpsc::channel();
        let pending = worker.run(move || ran.send(()).is_ok());
        seen_run
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the work ran before its future was polled");
        assert!(matches!(pending.await, Ok(true)));
        let panicked = worker.run(|| panic!("a closure that panics")).await;
        assert!(matches!(panicked, Err(WorkerGone("tl-test-worker"))));
        assert!(
            worker.run(|| 1).await.is_err(),
            "the thread is gone for good"
        );
    }
}
