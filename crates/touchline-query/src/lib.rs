//! Touchline query: `TimelineService`, serving customer timelines and summaries from the
//! projections in the store.

pub mod error;
pub mod page_token;
pub mod service;

pub use error::{Error, Result};
pub use service::TimelineService;
