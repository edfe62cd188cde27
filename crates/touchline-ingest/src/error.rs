//! Ingest errors and their one mapping to gRPC statuses with rich error details.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The `ErrorInfo.domain` of every Touchline error.
pub const ERROR_DOMAIN: &str = "touchline.dev";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("missing or malformed authorization header, expected `authorization: Bearer <token>`")]
    TokenMissing,
    #[error("the bearer token is not valid")]
    TokenInvalid,
    #[error("the bearer token has expired: use the partner's current token")]
    TokenExpired,
    #[error("the request has no events")]
    BatchEmpty,
    #[error("the request has {len} events, the limit is {max}")]
    BatchTooLarge { len: usize, max: usize },
    #[error("the request's batch_id has {len} bytes, the limit is {max}")]
    BatchIdTooLong { len: usize, max: usize },
    #[error("over the partner's rate of {rate_per_second} events per second")]
    RateLimited {
        rate_per_second: f64,
        retry_after: Duration,
    },
    #[error("the partner already has {max} streams open")]
    TooManyStreams { max: usize },
    #[error("the partner already has {max} unary calls in flight: wait for their answers")]
    TooManyCalls { max: usize, retry_after: Duration },
    #[error(
        "the request body did not arrive within {} ms (ingest.request-body-timeout-ms)",
        limit.as_millis()
    )]
    BodyTimeout { limit: Duration },
    #[error("the server is overloaded, retry shortly")]
    Overloaded { retry_after: Duration },
    #[error("the server is shutting down: reconnect and resend every batch without an answer")]
    ShuttingDown,
    #[error("the event log is unavailable: {reason}")]
    Unavailable {
        reason: String,
        retry_after: Duration,
    },
    #[error("the event log did not confirm within {}ms", .timeout.as_millis())]
    AckTimeout { timeout: Duration },
    #[error("invalid partners file: {0}")]
    PartnersFile(String),
    /// A batch's task panicked (a bug): nothing of the batch was published. Sent as `INTERNAL`
    /// without details, as a stream's batch task that panicked is.
    #[error("batch task failed: {0}")]
    BatchTaskFailed(String),
    #[error("kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

impl Error {
    /// The stable reason code sent in `ErrorInfo.reason`.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TokenMissing => "TOKEN_MISSING",
            Self::TokenInvalid => "TOKEN_INVALID",
            Self::TokenExpired => "TOKEN_EXPIRED",
            Self::BatchEmpty => "BATCH_EMPTY",
            Self::BatchTooLarge { .. } => "BATCH_TOO_LARGE",
            Self::BatchIdTooLong { .. } => "BATCH_ID_TOO_LONG",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::TooManyStreams { .. } => "TOO_MANY_STREAMS",
            Self::TooManyCalls { .. } => "TOO_MANY_CALLS",
            Self::BodyTimeout { .. } => "BODY_TIMEOUT",
            Self::Overloaded { .. } => "OVERLOADED",
            Self::ShuttingDown => "SHUTTING_DOWN",
            Self::Unavailable { .. } | Self::Kafka(_) => "LOG_UNAVAILABLE",
            Self::AckTimeout { .. } => "ACK_TIMEOUT",
            Self::PartnersFile(_) | Self::BatchTaskFailed(_) => "INTERNAL",
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        if let Error::BatchTaskFailed(_) = &error {
            return Status::internal(error.to_string());
        }
        let mut details = ErrorDetails::with_error_info(error.reason(), ERROR_DOMAIN, []);
        let code = match &error {
            Error::TokenMissing | Error::TokenInvalid | Error::TokenExpired => {
                Code::Unauthenticated
            }
            Error::BatchEmpty => Code::InvalidArgument,
            Error::BatchTooLarge { len, max } => {
                details.add_bad_request_violation(
                    "events",
                    format!("{len} events, the limit is {max}"),
                );
                Code::InvalidArgument
            }
            Error::BatchIdTooLong { len, max } => {
                details.add_bad_request_violation(
                    "batch_id",
                    format!("{len} bytes, the limit is {max}"),
                );
                Code::InvalidArgument
            }
            Error::RateLimited { retry_after, .. }
            | Error::Overloaded { retry_after }
            | Error::TooManyCalls { retry_after, .. } => {
                details.set_retry_info(Some(*retry_after));
                Code::ResourceExhausted
            }
            Error::TooManyStreams { .. } => Code::ResourceExhausted,
            Error::BodyTimeout { .. } => Code::DeadlineExceeded,
            Error::Unavailable { retry_after, .. } => {
                details.set_retry_info(Some(*retry_after));
                Code::Unavailable
            }
            Error::ShuttingDown | Error::AckTimeout { .. } | Error::Kafka(_) => {
                details.set_retry_info(Some(Duration::from_secs(1)));
                Code::Unavailable
            }
            // A failed batch task is answered above, without details.
            Error::PartnersFile(_) | Error::BatchTaskFailed(_) => Code::Internal,
        };
        Status::with_error_details(code, error.to_string(), details)
    }
}
