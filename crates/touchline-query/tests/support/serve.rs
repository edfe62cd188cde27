//! The real `TimelineService` on `127.0.0.1:0` and the generated client, for the query crate's
//! tests that call it over gRPC.

use std::sync::Arc;

use tokio_stream::wrappers::TcpListenerStream;
use touchline_core::EventStore;
use touchline_projection::SledStore;
use touchline_proto::v1::timeline_service_client::TimelineServiceClient;
use touchline_query::TimelineService;

pub type Client = TimelineServiceClient<tonic::transport::Channel>;

/// `service` (the service over `store`, with its live feed) on `127.0.0.1:0`, and a client.
pub async fn serve(
    store: &Arc<SledStore>,
    service: impl FnOnce(TimelineService) -> TimelineService,
) -> anyhow::Result<(
    Client,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let timelines = service(
        TimelineService::new(Arc::clone(store) as Arc<dyn EventStore>).with_feed(
            store.watch_sender(),
            tokio_util::sync::CancellationToken::new(),
        ),
    );
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(timelines.into_server())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = TimelineServiceClient::connect(format!("http://{address}")).await?;
    Ok((client, server))
}

/// Ends a test's server and drops `store` here, once nothing else holds it: the server is
/// aborted, and the tasks of its connections and watches let go of the store (drop the test's
/// clients and streams first: their connections keep those tasks). sled flushes when its last
/// handle goes; dropped instead by a blocking read that the runtime's shutdown waits for, after
/// the test's temporary folder was deleted, that flush once hung the test binary for good.
///
/// # Panics
/// When something still holds the store after 30 s.
pub async fn stop<S>(
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    store: Arc<S>,
) {
    server.abort();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(10));
    while Arc::strong_count(&store) > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store is still held by the server's tasks"
        );
        poll.tick().await;
    }
    drop(store);
}
