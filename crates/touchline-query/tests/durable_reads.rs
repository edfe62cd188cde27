//! `GetTimeline` serves durable entries only: an entry applied to the store but not yet flushed
//! is not shown (a crash could take it back, to be applied again from Kafka, perhaps under
//! another log sequence); once flushed it is. The real sled store on a temporary directory, the
//! real `TimelineService` on `127.0.0.1:0`, the generated client.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::TcpListenerStream;
use touchline_core::{
    Channel, ConsumedRecord, CustomerId, Envelope, EventId, EventStore, EventType, JourneyStage,
    PartnerId, RecordContent, StreamIdentity, Touchpoint, UnixNanos,
};
use touchline_projection::SledStore;
use touchline_proto::v1;
use touchline_proto::v1::timeline_service_client::TimelineServiceClient;
use touchline_query::TimelineService;

/// Event `id` of `alice` at event time `at` (seconds), as consumed record `offset` of partition 0.
fn record(id: &str, at: i64, offset: i64) -> ConsumedRecord {
    let envelope = Envelope {
        partner_id: PartnerId::parse("courier").expect("valid partner"),
        touchpoint: Touchpoint {
            event_id: EventId::parse(id).expect("valid event id"),
            customer_id: CustomerId::parse("alice").expect("valid customer"),
            event_type: EventType::parse("delivery.completed").expect("valid type"),
            occurred_at: UnixNanos(at * 1_000_000_000),
            channel: Channel::Doorstep,
            stage: JourneyStage::Fulfil,
            outcome: None,
            attributes: BTreeMap::new(),
            payload: Vec::new(),
        },
        received_at: UnixNanos(0),
    };
    ConsumedRecord {
        partition: 0,
        offset,
        content: RecordContent::Event {
            raw: touchline_proto::encode_envelope(&envelope),
            envelope: Box::new(envelope),
        },
    }
}

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
    let stream = StreamIdentity {
        cluster_id: "test".to_owned(),
        topic: "touchpoints".to_owned(),
    };

    store.apply(&stream, vec![record("e1", 10, 0), record("e2", 30, 1)])?;
    store.flush()?;
    assert_eq!(event_ids(&mut client).await?, ["e1", "e2"]);

    // Applied, not flushed: a late event between the two, and a later one.
    store.apply(&stream, vec![record("e3", 20, 2), record("e4", 40, 3)])?;
    assert_eq!(store.log_len(), 4);
    assert_eq!(store.durable_sequence(), 2);
    assert_eq!(event_ids(&mut client).await?, ["e1", "e2"]);

    store.flush()?;
    assert_eq!(event_ids(&mut client).await?, ["e1", "e3", "e2", "e4"]);

    server.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}
