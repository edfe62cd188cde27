//! A command whose standard output is closed (`touchline config | head -1` once `head` has
//! exited) ends quietly with status 0, as Unix tools do, instead of panicking on its next write.

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
