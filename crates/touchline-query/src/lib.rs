//! Touchline query: `TimelineService`, serving customer timelines and summaries from the
//! projections in the store.

pub mod admin;
pub mod backup;
pub mod error;
pub mod metrics;
pub mod page_token;
pub mod reads;
pub mod service;
pub mod still_allowed;
pub mod watch;

pub(crate) use error::ERROR_DOMAIN;

pub use error::{Error, Result};
pub use reads::StoreReads;
pub use service::{DEFAULT_MAX_WATCHES, TimelineService};
pub use still_allowed::StillAllowed;
