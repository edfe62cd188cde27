//! A command whose standard output is closed (`touchline config | head -1` once `head` has
//! exited) ends quietly with status 0, as Unix tools do, instead of panicking on its next write;
//! a command that fails for another reason still fails.

use std::process::{Command, Stdio};

#[test]
fn a_command_with_its_output_closed_ends_quietly() -> anyhow::Result<()> {
    // The reading end is closed before the command starts: its first write fails (EPIPE).
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_touchline"))
        .arg("config")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}

#[test]
fn a_command_that_fails_still_fails_with_its_output_closed() -> anyhow::Result<()> {
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    // Nothing listens on the discard port: the call fails before anything is printed.
    let output = Command::new(env!("CARGO_BIN_EXE_touchline"))
        .args(["timeline", "cust-0007", "--endpoint", "http://127.0.0.1:9"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{:?}: {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}
