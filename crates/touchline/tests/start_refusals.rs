//! A start whose logging or command line would not do what it says fails at once, naming why:
//! a `RUST_LOG` that is not a tracing filter (it was ignored: the node logged by `log.filter`),
//! and `--demo-customers` without `--demo` (it was ignored: nothing was published).

use std::process::Command;

#[test]
fn a_rust_log_that_is_not_a_filter_stops_the_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let output = Command::new(env!("CARGO_BIN_EXE_touchline"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info,touchline=loud")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not a tracing filter"), "{stderr}");
    assert!(
        std::fs::read_dir(dir.path())?.next().is_none(),
        "nothing was started"
    );
    Ok(())
}

#[test]
fn demo_customers_without_the_demo_is_refused() -> anyhow::Result<()> {
    let output = Command::new(env!("CARGO_BIN_EXE_touchline"))
        .args(["dev", "--demo-customers", "5"])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--demo"), "{stderr}");
    Ok(())
}
