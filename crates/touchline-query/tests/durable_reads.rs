//! `GetTimeline` serves durable entries only: an entry applied to the store but not yet flushed
//! is not shown (a crash could take it back, to be applied again from Kafka, perhaps under
//! another log sequence); once flushed it is. The real sled store on a temporary directory, the
//! real `TimelineService` on `127.0.0.1:0`, the generated client.

use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::TcpListenerStream;
use touchline_core::EventStore;
use touchline_projection::SledStore;
use touchline_proto::v1;
use touchline_proto::v1::timeline_service_client::TimelineServiceClient;
use touchline_query::TimelineService;

mod support;

use support::{apply, event};

async fn event_ids(
    client: &mut TimelineServiceClient<tonic::transport::Channel>,
) -> anyhow::Result<Vec<String>> {
    let page = client
        .get_timeline(v1::GetTimelineRequest {
            customer_id: "alice".to_owned(),
            ..v1::GetTimelineRequest::default()
        })
        .await?
        .into_inner();
    Ok(page
        .entries
        .into_iter()
        .filter_map(|entry| entry.touchpoint.map(|touchpoint| touchpoint.event_id))
        .collect())
}

#[tokio::test]
async fn get_timeline_shows_an_entry_once_it_is_flushed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(dir.path())?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                TimelineService::new(Arc::clone(&store) as Arc<dyn EventStore>).into_server(),
            )
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let mut client = TimelineServiceClient::connect(format!("http://{address}")).await?;
    let mut offset = 0;

    let flushed = true;
    apply(
        &*store,
        &mut offset,
        vec![event("e1", "alice", 10), event("e2", "alice", 30)],
        flushed,
    );
    assert_eq!(event_ids(&mut client).await?, ["e1", "e2"]);

    // Applied, not flushed: a late event between the two, and a later one.
    apply(
        &*store,
        &mut offset,
        vec![event("e3", "alice", 20), event("e4", "alice", 40)],
        !flushed,
    );
    assert_eq!(store.log_len(), 4);
    assert_eq!(store.durable_sequence(), 2);
    assert_eq!(event_ids(&mut client).await?, ["e1", "e2"]);

    store.flush()?;
    assert_eq!(event_ids(&mut client).await?, ["e1", "e3", "e2", "e4"]);

    server.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}
