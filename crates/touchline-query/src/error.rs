//! Query errors and their one mapping to gRPC statuses.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};
use touchline_core::StoreError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) const ERROR_DOMAIN: &str = "touchline.dev";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("customer {customer_id} has no touchpoints")]
    CustomerNotFound { customer_id: String },
    #[error(
        "customer {customer_id} is in partition {partition}, which this node does not serve (it serves partitions {owned:?}): ask a node whose projector.partitions include {partition}"
    )]
    NotHere {
        customer_id: String,
        partition: i32,
        owned: Vec<i32>,
    },
    #[error("{message}")]
    Rejected {
        code: Code,
        reason: &'static str,
        message: String,
    },
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    #[error("a blocking query task failed: {0}")]
    Blocking(#[from] tokio::task::JoinError),
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let mut metadata = std::collections::HashMap::new();
        let (code, reason, mut details) = match &error {
            Error::InvalidArgument { field, reason } => {
                let mut details = ErrorDetails::new();
                details.add_bad_request_violation(*field, reason.clone());
                (Code::InvalidArgument, "INVALID_ARGUMENT", details)
            }
            Error::CustomerNotFound { .. } => {
                (Code::NotFound, "CUSTOMER_NOT_FOUND", ErrorDetails::new())
            }
            Error::NotHere { partition, .. } => {
                metadata.insert("partition".to_owned(), partition.to_string());
                (
                    Code::FailedPrecondition,
                    "CUSTOMER_NOT_HERE",
                    ErrorDetails::new(),
                )
            }
            Error::Rejected { code, reason, .. } => (*code, *reason, ErrorDetails::new()),
            Error::Store(StoreError::Conflict(_)) => {
                (Code::Aborted, "STORE_CONFLICT", ErrorDetails::new())
            }
            Error::Store(_) | Error::Blocking(_) => {
                tracing::error!(%error, "query failed");
                (Code::Internal, "STORE_FAILED", ErrorDetails::new())
            }
        };
        details.set_error_info(reason, ERROR_DOMAIN, metadata);
        Status::with_error_details(code, error.to_string(), details)
    }
}
