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

/// Resolves on Ctrl-C or SIGTERM, with the exit status a process ended by that signal
/// conventionally has (130 for Ctrl-C, 143 for SIGTERM).
pub async fn shutdown_signal() -> i32 {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {
            info!("received Ctrl-C");
            130
        }
        () = terminate => {
            info!("received SIGTERM");
            143
        }
    }
}
