//! The examples in `deploy/` stay valid: the configuration loads and validates, the partners file
//! parses and its hashes match the documented example tokens, the JSON Lines events convert, and
//! the Kubernetes manifests' variables and command lines are the binary's.

use std::path::PathBuf;

use touchline::Config;
use touchline_ingest::PartnerRegistry;

fn deploy(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(file)
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail fixes the closure type"
)]
fn the_example_configuration_loads_and_validates() {
    // In a jail: `TOUCHLINE_*` variables of whoever runs the tests stay out.
    figment::Jail::expect_with(|jail| {
        jail.clear_env();
        let config = Config::load(Some(&deploy("touchline.example.toml")))
            .map_err(|error| format!("{error:#}"))?;
        config.validate().map_err(|error| format!("{error:#}"))?;
        assert_eq!(
            config.kafka.bootstrap_servers,
            "kafka-1:9092,kafka-2:9092,kafka-3:9092"
        );
        Ok(())
    });
}

#[test]
fn the_example_partners_file_authenticates_the_documented_tokens() -> anyhow::Result<()> {
    let registry = PartnerRegistry::load(&deploy("partners.example.toml"))?;
    assert_eq!(
        registry
            .authenticate("example-courier-token", touchline_core::UnixNanos::now())
            .map(|p| p.partner_id.to_string())
            .ok()
            .as_deref(),
        Some("swift-courier")
    );
    assert_eq!(
        registry
            .authenticate("example-retail-token", touchline_core::UnixNanos::now())
            .map(|p| p.partner_id.to_string())
            .ok()
            .as_deref(),
        Some("northwind-retail")
    );
    Ok(())
}

#[test]
fn the_example_events_convert() -> anyhow::Result<()> {
    let events = touchline::client::read_json_lines(&deploy("example-events.jsonl"))?;
    assert_eq!(events.len(), 3);
    Ok(())
}

#[test]
fn the_kubernetes_role_configurations_load_and_validate() -> anyhow::Result<()> {
    let ingest = Config::load(Some(&deploy("kubernetes/ingest.toml")))?;
    ingest.validate()?;
    assert!(ingest.ingest.enabled && !ingest.projector.enabled && !ingest.query.enabled);
    let projector = Config::load(Some(&deploy("kubernetes/projector.toml")))?;
    projector.validate()?;
    assert!(!projector.ingest.enabled && projector.projector.enabled && projector.query.enabled);
    assert_eq!(ingest.kafka.partitions, projector.kafka.partitions);
    Ok(())
}

/// The `TOUCHLINE_` variables a manifest sets on its container (`- name: TOUCHLINE_...`).
fn manifest_variables(manifest: &str) -> anyhow::Result<Vec<String>> {
    Ok(std::fs::read_to_string(deploy(manifest))?
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- name: "))
        .filter(|name| name.starts_with("TOUCHLINE_"))
        .map(ToOwned::to_owned)
        .collect())
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail fixes the closure type"
)]
fn the_projector_manifest_s_variables_are_configuration_keys() {
    let hash = touchline_ingest::hash_token("example-admin-token");
    figment::Jail::expect_with(|jail| {
        jail.clear_env();
        let variables = manifest_variables("kubernetes/projector.yaml")
            .map_err(|error| format!("{error:#}"))?;
        assert_eq!(
            variables,
            ["TOUCHLINE_KAFKA__GROUP_ID", "TOUCHLINE_ADMIN__TOKEN_SHA256"]
        );
        // As Kubernetes fills them: the pod's name, and the Secret's TOML list of hashes.
        jail.set_env("TOUCHLINE_KAFKA__GROUP_ID", "touchline-projector-0");
        jail.set_env("TOUCHLINE_ADMIN__TOKEN_SHA256", format!("[\"{hash}\"]"));
        let config = Config::load(Some(&deploy("kubernetes/projector.toml")))
            .map_err(|error| format!("{error:#}"))?;
        config.validate().map_err(|error| format!("{error:#}"))?;
        assert_eq!(config.kafka.group_id, "touchline-projector-0");
        assert_eq!(config.admin.token_sha256, std::slice::from_ref(&hash));
        Ok(())
    });
}

#[test]
fn the_compose_role_configurations_load_and_validate() -> anyhow::Result<()> {
    let ingest = Config::load(Some(&deploy("compose/ingest.toml")))?;
    ingest.validate()?;
    assert!(ingest.ingest.enabled && !ingest.projector.enabled && !ingest.query.enabled);
    let projector = Config::load(Some(&deploy("compose/projector.toml")))?;
    projector.validate()?;
    assert!(!projector.ingest.enabled && projector.projector.enabled && projector.query.enabled);
    assert_eq!(
        ingest.kafka.partitions, projector.kafka.partitions,
        "both roles agree on the topic"
    );
    Ok(())
}

/// The `args` of a manifest's container (`args: ["serve", ...]`), as the binary gets them.
fn manifest_args(manifest: &str) -> anyhow::Result<Vec<String>> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(deploy(manifest))?;
    let line = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("args: "))
        .with_context(|| format!("{manifest} has no one-line args"))?;
    Ok(serde_json::from_str(line)?)
}

/// The nodes' command lines in the Kubernetes manifests are the binary's: the same arguments,
/// with `config` for `serve` (which checks instead of serving) and the role's file where the
/// ConfigMap mounts it, are accepted and the configuration validates.
#[test]
fn the_kubernetes_nodes_command_lines_are_the_binary_s() -> anyhow::Result<()> {
    use anyhow::Context as _;
    for (manifest, config) in [
        ("kubernetes/ingest.yaml", "kubernetes/ingest.toml"),
        ("kubernetes/projector.yaml", "kubernetes/projector.toml"),
    ] {
        let mut args = manifest_args(manifest)?;
        assert_eq!(
            args.first().map(String::as_str),
            Some("serve"),
            "{manifest}"
        );
        args[0] = "config".to_owned();
        let file = args
            .iter()
            .position(|arg| arg == "--config")
            .with_context(|| format!("{manifest} names no --config"))?
            + 1;
        args[file] = deploy(config).display().to_string();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_touchline"))
            .args(&args)
            .env_clear()
            .output()?;
        assert!(
            output.status.success(),
            "{manifest}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The backup CronJob's command line is the binary's: with its variables (an endpoint where
/// nothing listens), it fails to connect, not to parse.
#[test]
fn the_backup_job_s_command_line_is_the_binary_s() -> anyhow::Result<()> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(deploy("kubernetes/backup.yaml"))?;
    let line = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("touchline backup "))
        .context("the job runs no `touchline backup`")?;
    // `--out "FILE"` (the shell makes FILE), then the other arguments.
    let quoted = line
        .strip_prefix("--out \"")
        .with_context(|| format!("the job's backup names no --out first: {line}"))?;
    let end = quoted.find('"').context("an unclosed quote")?;
    let args: Vec<&str> = quoted[end + 1..].split_whitespace().collect();
    assert_eq!(
        manifest_variables("kubernetes/backup.yaml")?,
        ["TOUCHLINE_ENDPOINT", "TOUCHLINE_ADMIN_TOKEN"]
    );
    let dir = tempfile::tempdir()?;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_touchline"))
        .args(["backup", "--out"])
        .arg(dir.path().join("touchline.backup"))
        .args(&args)
        .env_clear()
        .env("TOUCHLINE_ENDPOINT", "http://127.0.0.1:1")
        .env("TOUCHLINE_ADMIN_TOKEN", "a-token")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // clap's usage errors exit with 2; a refused connection is the command's own failure.
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("Usage:"), "{stderr}");
    Ok(())
}
