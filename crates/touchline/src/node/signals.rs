//! The process's signals: Ctrl-C and SIGTERM start a graceful shutdown; SIGHUP never ends the
//! process (the partners file, where there is one, is reloaded on it by its own listener).

use tracing::{error, info, warn};

/// Listens for SIGHUP for the rest of the process, so that it never ends the process (its default
/// action). The partners file, where there is one, is reloaded by its own listener.
pub fn ignore_hangups() {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangups) => {
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    tracing::debug!("SIGHUP received");
                }
            });
        }
        Err(error) => warn!(%error, "cannot listen for SIGHUP: it would end the process"),
    }
}

/// Ctrl-C and SIGTERM, listened for from the moment this is made (on unix; elsewhere Ctrl-C from
/// the first wait): from then on neither ends the process by itself (their default action), also
/// while the node is still starting.
#[derive(Debug)]
pub struct ShutdownSignals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    /// Starts listening (a signal that cannot be listened for is logged, and keeps its default
    /// action).
    #[must_use]
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(signal) => Some(signal),
                Err(error) => {
                    error!(%error, "cannot listen for {name}");
                    None
                }
            };
            Self {
                interrupt: listen(SignalKind::interrupt(), "Ctrl-C"),
                terminate: listen(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Resolves on the next Ctrl-C or SIGTERM, with the exit status a process ended by that
    /// signal conventionally has (130 for Ctrl-C, 143 for SIGTERM).
    pub async fn next(&mut self) -> i32 {
        #[cfg(unix)]
        {
            async fn received(signal: &mut Option<tokio::signal::unix::Signal>) {
                let received = match signal {
                    Some(signal) => signal.recv().await.is_some(),
                    None => false,
                };
                if !received {
                    // Not listened for, or the runtime's signal driver is gone: never.
                    std::future::pending::<()>().await;
                }
            }
            let Self {
                interrupt,
                terminate,
            } = self;
            tokio::select! {
                () = received(interrupt) => {
                    info!("received Ctrl-C");
                    130
                }
                () = received(terminate) => {
                    info!("received SIGTERM");
                    143
                }
            }
        }
        #[cfg(not(unix))]
        {
            if let Err(error) = tokio::signal::ctrl_c().await {
                error!(%error, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
            info!("received Ctrl-C");
            130
        }
    }
}
