//! The projection crate's errors.

use touchline_core::StoreError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to open the store at {path}: {source}")]
    OpenStore {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("the store cannot be used: {0}")]
    Format(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kafka client failed: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {topic} has no partitions or does not exist")]
    TopicMissing { topic: String },
    #[error("cannot set up the consumer: {0}")]
    Setup(String),
    #[error(
        "the store's flush has not ended within {} s: the projector stops (a restart recovers the store to its last durable write and reads on from Kafka)",
        .0.as_secs()
    )]
    FlushStalled(std::time::Duration),
    #[error("a blocking store task failed: {0}")]
    Blocking(#[from] tokio::task::JoinError),
    #[error(transparent)]
    WorkerGone(#[from] crate::worker::WorkerGone),
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
}

pub(crate) fn backend(error: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(Box::new(error))
}
