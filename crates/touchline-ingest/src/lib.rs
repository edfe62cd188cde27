//! Touchline ingest: the partner-facing `IngestService`. Authenticates each call's bearer token as
//! a partner, validates every event on its own, produces the accepted ones to Kafka (idempotent,
//! `acks=all`, many deliveries in flight) and acknowledges an event only once it is durable.

pub mod auth;
pub mod directory;
pub mod error;
pub mod files;
pub mod limits;
pub mod metrics;
pub mod publisher;
pub mod service;

pub use auth::{Authenticated, PartnerContract, PartnerRegistry, PartnersFile, hash_token};
pub use directory::PartnerDirectory;
pub use error::{Error, Result};
pub use publisher::{Durability, Publisher};
pub use service::{Authenticator, IngestOptions, IngestServer, IngestService};
