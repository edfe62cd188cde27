//! The endpoint a `touchline dev` child serves on, read from its banner.

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Child;

/// Reads `child`'s stdout (piped) until its banner names the endpoint it serves on, within
/// `deadline`; the rest of its stdout is drained, so that the child never blocks on a full pipe.
pub async fn serving_endpoint(
    child: &mut Child,
    deadline: std::time::Duration,
) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("stdout is piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let endpoint = tokio::time::timeout(deadline, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(endpoint) = line.strip_prefix("touchline dev is serving on ") {
                return Ok(endpoint.to_owned());
            }
        }
        anyhow::bail!("touchline dev exited before serving")
    })
    .await
    .context("touchline dev did not start in time")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(endpoint)
}
