//! The projector's consumer loop on a thread and runtime of its own.
//!
//! On the node's runtime the loop's task waited behind the partners' requests whenever they kept
//! the runtime's threads busy: while ingest ran at full speed, the projector applied a quarter of
//! what it applies alone. On a thread of its own the kernel shares the cores between it and the
//! runtime's threads (BENCHMARKS.md, two sets of eight interleaved pairs: more events projected
//! while ingest runs, end-to-end and ingest-to-queryable a little better).

use anyhow::Context as _;
use tokio::task::JoinHandle;

/// How long the runtime of a task that failed is given to end its blocking calls.
const FAILED_RUNTIME_END: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `task` on a thread of its own, on a runtime of its own, so that requests flooding the
/// node's runtime do not delay it. The returned handle ends once the task has ended and its
/// runtime is gone (with whatever it still held, the store among it), so that what follows a
/// stop finds everything released; after a task that failed, at most [`FAILED_RUNTIME_END`]
/// later, whatever blocking call it left running (a hung one is abandoned). A task that panics,
/// or a runtime that cannot start, ends the handle with [`touchline_projection::Error::Thread`].
pub(super) fn spawn_on_own_thread(
    name: &str,
    task: impl Future<Output = touchline_projection::Result<()>> + Send + 'static,
) -> anyhow::Result<JoinHandle<touchline_projection::Result<()>>> {
    let (done, ended) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => {
                    // A panic is caught here, not unwound through the runtime's drop, which
                    // would wait for its blocking calls as below.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        runtime.block_on(task)
                    }))
                    .unwrap_or_else(|panic| {
                        let message = panic
                            .downcast_ref::<&str>()
                            .map(|message| (*message).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        Err(touchline_projection::Error::Thread(std::io::Error::other(
                            format!("the task panicked: {message}"),
                        )))
                    });
                    if result.is_ok() {
                        drop(runtime);
                    } else {
                        // A failed task may leave a blocking call that never returns (sled's
                        // flush, hung after it could not create a file: the projector fails
                        // with `FlushStalled`), which dropping the runtime would wait for without
                        // end: the handle would never end and the node would never fail.
                        runtime.shutdown_timeout(FAILED_RUNTIME_END);
                    }
                    result
                }
                Err(error) => Err(touchline_projection::Error::Thread(error)),
            };
            let _ = done.send(result);
        })
        .with_context(|| format!("cannot start the {name} thread"))?;
    let name = name.to_owned();
    Ok(tokio::spawn(async move {
        ended.await.unwrap_or_else(|_| {
            Err(touchline_projection::Error::Thread(std::io::Error::other(
                format!("the {name} thread ended without a result"),
            )))
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_task_runs_on_its_named_thread_and_a_panic_ends_the_handle_with_an_error() {
        let named = spawn_on_own_thread("tl-test-thread", async {
            let name = std::thread::current().name().map(str::to_owned);
            // A runtime of its own: timers work there.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            match name.as_deref() {
                Some("tl-test-thread") => Ok(()),
                other => Err(touchline_projection::Error::Thread(std::io::Error::other(
                    format!("ran on {other:?}"),
                ))),
            }
        })
        .expect("starts");
        assert!(matches!(named.await, Ok(Ok(()))));

        let panicking = spawn_on_own_thread("tl-test-panic", async {
            panic!("the task fails");
        })
        .expect("starts");
        assert!(matches!(
            panicking.await,
            Ok(Err(touchline_projection::Error::Thread(_)))
        ));
    }

    /// A task that fails (or panics) leaving a blocking call that never returns (a hung sled
    /// flush) still ends its handle, with its error: the node fails instead of running half-dead.
    #[tokio::test]
    async fn a_failed_task_ends_its_handle_although_a_blocking_call_hangs() {
        for panics in [false, true] {
            let (release, held) = std::sync::mpsc::channel::<()>();
            let failing = spawn_on_own_thread("tl-test-hung", async move {
                let (started, running) = tokio::sync::oneshot::channel();
                drop(tokio::task::spawn_blocking(move || {
                    let _ = started.send(());
                    held.recv()
                }));
                let _ = running.await;
                assert!(!panics, "the task fails");
                Err(touchline_projection::Error::Thread(std::io::Error::other(
                    "the flush stalled",
                )))
            })
            .expect("starts");
            let ended = tokio::time::timeout(std::time::Duration::from_secs(30), failing).await;
            // The hung call may go now (else its thread would outlive the test).
            drop(release);
            let Ok(Ok(Err(touchline_projection::Error::Thread(error)))) = ended else {
                panic!("panics: {panics}: {ended:?}");
            };
            // A panic's message goes into the error.
            let expected = if panics {
                "the task panicked: the task fails"
            } else {
                "the flush stalled"
            };
            assert_eq!(error.to_string(), expected);
        }
    }
}
