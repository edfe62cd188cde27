//! Files a node runs with and reloads (the partners file, the configuration, TLS certificates and
//! keys): read with a bound, only when they are regular files, and told apart by more than their
//! modification time.

use std::io::Read as _;
use std::path::Path;
use std::time::SystemTime;

/// What tells one version of a file from another: its size and modification time, and on unix
/// also its device, inode and status-change time. A file replaced by one with the same
/// modification time (`cp -p`, `rsync -a`, `tar x`, a symlink swapped to a store of files all
/// dated 1970) still shows as changed: a rename or a write moves its status-change time, which
/// nothing but the kernel sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    device: u64,
    #[cfg(unix)]
    inode: u64,
    #[cfg(unix)]
    changed: (i64, i64),
}

/// The stamp of the file at `path` (following symlinks), when its metadata can be read.
#[must_use]
pub fn stamp(path: &Path) -> Option<Stamp> {
    #[cfg(unix)]
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: metadata.len(),
        modified: metadata.modified().ok(),
        #[cfg(unix)]
        device: metadata.dev(),
        #[cfg(unix)]
        inode: metadata.ino(),
        #[cfg(unix)]
        changed: (metadata.ctime(), metadata.ctime_nsec()),
    })
}

/// The SHA-256 of the regular file at `path`, when it can be read and holds at most
/// [`DIGEST_LIMIT`] bytes: what a watcher compares when a file's stamp moved, so that a stamp
/// that moves with the same bytes (a `chmod`, a file system whose inode numbers are not stable)
/// is not taken for a change.
#[must_use]
pub fn digest(path: &Path) -> Option<[u8; 32]> {
    use sha2::Digest as _;
    let bytes = read_regular(path, DIGEST_LIMIT).ok()?;
    Some(sha2::Sha256::digest(bytes).into())
}

/// The largest file [`digest`] reads: the largest a node reads while it runs (a partners file).
pub const DIGEST_LIMIT: u64 = crate::auth::MAX_PARTNERS_FILE_BYTES;

/// How a file is read: [`read_regular`] by a node (which reads its files again while it runs),
/// [`read_bounded`] by a command that reads it once (a pipe such as `<(vault read ...)` will do).
pub type Reader = fn(&Path, u64) -> std::io::Result<Vec<u8>>;

/// The bytes of the regular file at `path` (a symlink to one is followed), at most `limit` of
/// them: for the files a node reads while it runs.
///
/// # Errors
/// When the file cannot be read, is not a regular file (a FIFO would block the reader, a device
/// such as `/dev/zero` never end), or holds more than `limit` bytes.
pub fn read_regular(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let not_regular = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO or a device is never read)",
        )
    };
    let mut options = std::fs::File::options();
    options.read(true);
    // Opening a FIFO would wait for a writer; without blocking, it opens, and is refused below.
    // (Reads of a regular file do not block either way.)
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path)?;
    if !file.metadata()?.is_file() {
        return Err(not_regular());
    }
    read_within(file, limit)
}

/// The bytes of the file at `path`, whatever it is (a pipe such as `<(vault read ...)` too), at
/// most `limit` of them: for files a command reads once.
///
/// # Errors
/// When the file cannot be read or holds more than `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    read_within(std::fs::File::open(path)?, limit)
}

fn read_within(file: std::fs::File, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(bytes)
}

/// `message` with what it quotes from a file's values left out: the text of every double-quoted
/// string (a token pasted where its hash belongs would otherwise be logged), and the source lines
/// a TOML parse error shows (`12 | token-sha256 = "…"`).
#[must_use]
pub fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    // Carried from line to line: a quote left open hides the lines after it (too much rather
    // than too little).
    let mut quoted = false;
    let mut escaped = false;
    for (index, line) in message.lines().enumerate() {
        if !quoted && is_source_line(line) {
            continue;
        }
        if index > 0 && !quoted {
            out.push('\n');
        }
        // Within backticks, a message names syntax (``expected `"` ``), not a value.
        let mut ticked = false;
        for character in line.chars() {
            if quoted {
                if escaped {
                    escaped = false;
                } else if character == '\\' {
                    escaped = true;
                } else if character == '"' {
                    quoted = false;
                    out.push_str("…\"");
                }
            } else {
                out.push(character);
                if character == '`' {
                    ticked = !ticked;
                }
                quoted = character == '"' && !ticked;
            }
        }
    }
    if quoted {
        out.push_str("…\"");
    }
    out
}

/// A line of a TOML error's source excerpt: a line number, then `|` and the source.
fn is_source_line(line: &str) -> bool {
    let line = line.trim_start();
    let digits = line.chars().take_while(char::is_ascii_digit).count();
    digits > 0 && line[digits..].trim_start().starts_with('|')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_limit_are_read() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("file");
        std::fs::write(&path, b"12345")?;
        assert_eq!(read_regular(&path, 5)?, b"12345");
        let error = read_regular(&path, 4).expect_err("over the limit");
        assert!(error.to_string().contains("larger than 4 bytes"), "{error}");
        // A device that never ends, and a folder.
        let error = read_regular(Path::new("/dev/zero"), 1 << 20).expect_err("a device");
        assert!(error.to_string().contains("not a regular file"), "{error}");
        // Read once by a command, a device is bounded.
        let error = read_bounded(Path::new("/dev/zero"), 1 << 20).expect_err("too large");
        assert!(error.to_string().contains("larger than"), "{error}");
        assert!(read_regular(dir.path(), 1 << 20).is_err());
        #[cfg(unix)]
        {
            // A FIFO without a writer: opening it would wait for ever.
            let fifo = dir.path().join("fifo");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status()?;
            assert!(made.success());
            let error = read_regular(&fifo, 1 << 20).expect_err("a FIFO");
            assert!(error.to_string().contains("not a regular file"), "{error}");
            // A symlink to a regular file is followed.
            let link = dir.path().join("link");
            std::os::unix::fs::symlink(&path, &link)?;
            assert_eq!(read_regular(&link, 5)?, b"12345");
        }
        Ok(())
    }

    #[test]
    fn a_file_replaced_with_the_same_modification_time_has_another_stamp() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("file");
        std::fs::write(&path, b"first")?;
        let first = stamp(&path).expect("a stamp");
        let modified = std::fs::metadata(&path)?.modified()?;
        // The same size and modification time, renamed over it (as `cp -p` then `mv` does).
        let aside = dir.path().join("aside");
        std::fs::write(&aside, b"again")?;
        std::fs::File::options()
            .write(true)
            .open(&aside)?
            .set_modified(modified)?;
        std::fs::rename(&aside, &path)?;
        assert_eq!(std::fs::metadata(&path)?.modified()?, modified);
        assert_ne!(stamp(&path), Some(first));
        assert_eq!(stamp(&dir.path().join("absent")), None);

        // Rewritten in place with the same size and its old modification time put back: only
        // the status-change time moves (it is read at the kernel's tick, so a rewrite in the
        // same tick is tried again).
        let before = stamp(&path).expect("a stamp");
        let metadata = std::fs::metadata(&path)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            std::fs::write(&path, b"third")?;
            std::fs::File::options()
                .write(true)
                .open(&path)?
                .set_modified(metadata.modified()?)?;
            if stamp(&path) != Some(before) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the stamp never moved"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let after = std::fs::metadata(&path)?;
        assert_eq!(after.modified()?, metadata.modified()?);
        assert_eq!(after.len(), metadata.len());
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            assert_eq!(after.ino(), metadata.ino(), "the same file");
        }
        Ok(())
    }

    #[test]
    fn values_are_left_out_of_messages() {
        let toml_error = "TOML parse error at line 2, column 16\n  |\n2 | token-sha256 = \"s3cret\"\n  |                ^^^^^^^^\ninvalid type: string \"s3cret\", expected a sequence\n";
        let shown = without_values(toml_error);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("line 2, column 16"), "{shown}");
        assert!(shown.contains("expected a sequence"), "{shown}");
        assert_eq!(
            without_values(r#"found string "a\"b" for key x"#),
            "found string \"…\" for key x"
        );
        assert_eq!(without_values("open \"unterminated"), "open \"…\"");
        assert_eq!(
            without_values("found \"abc\ndef\" for key"),
            "found \"…\" for key"
        );
        assert_eq!(
            without_values("unknown field `token`"),
            "unknown field `token`"
        );
        assert_eq!(
            without_values("invalid string\nexpected `\"`, `'`"),
            "invalid string\nexpected `\"`, `'`"
        );
    }
}
