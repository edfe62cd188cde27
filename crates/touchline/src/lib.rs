//! The `touchline` binary's library: configuration, wiring of the roles into a node, the demo
//! demand chain and the command-line clients. `main.rs` only parses the command line.

pub mod admin_auth;
pub mod admin_client;
pub mod client;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod node;
pub mod stream_client;

pub use config::Config;

/// `println!` for the command-line clients: returns the write's error instead of panicking when
/// standard output is closed (`touchline timeline cust-0007 | head`); `main` then ends quietly.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        ::std::writeln!(::std::io::stdout().lock(), $($arg)*)
    }};
}

/// `print!` for the command-line clients, as [`outln!`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        ::std::write!(::std::io::stdout().lock(), $($arg)*)
    }};
}
pub use node::{BrokerChoice, Node};
