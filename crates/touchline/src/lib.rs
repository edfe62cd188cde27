//! The `touchline` binary's library: configuration, wiring of the roles into a node, the demo
//! demand chain and the command-line clients. `main.rs` only parses the command line.

pub mod access;
pub mod admin_auth;
pub mod admin_client;
pub mod backup;
pub mod client;
pub mod config;
pub mod connect;
pub mod demo;
pub mod metrics;
pub mod node;
mod peers;
pub mod stream_client;

pub use config::Config;
pub use connect::Target;
pub use node::{BrokerChoice, Node};

/// A write to standard output failed: what [`outln!`] and [`out!`] return, so that `main` can
/// tell a closed output (`touchline timeline cust-0007 | head`) from any other failure.
#[derive(Debug)]
pub struct OutputError(pub std::io::Error);

impl OutputError {
    /// Whether the reader of standard output went away.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

impl std::fmt::Display for OutputError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "cannot write to standard output: {}", self.0)
    }
}

impl std::error::Error for OutputError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// `println!` for the command-line clients: returns an [`OutputError`] instead of panicking when
/// standard output cannot be written; `main` ends quietly when it was closed.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        ::std::writeln!(::std::io::stdout().lock(), $($arg)*).map_err($crate::OutputError)
    }};
}

/// `eprintln!` for the command-line clients' progress and notices: a closed standard error is
/// ignored (there is no one to tell), where `eprintln!` panics.
#[macro_export]
macro_rules! noteln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr().lock(), $($arg)*);
    }};
}

/// `eprint!` for the command-line clients, as [`noteln!`].
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::write!(::std::io::stderr().lock(), $($arg)*);
    }};
}

/// `print!` for the command-line clients, as [`outln!`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        ::std::write!(::std::io::stdout().lock(), $($arg)*).map_err($crate::OutputError)
    }};
}
