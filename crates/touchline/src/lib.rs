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
pub use node::{BrokerChoice, Node};
