//! Stored positions belong to one broker and topic incarnation. The projector resumes from a
//! stored position only when the broker still holds, just before it, the very record the position
//! was taken after; otherwise (a wiped or new broker that reuses the cluster id) it reads the
//! partition from its beginning instead of skipping records it never saw.

use std::collections::BTreeMap;
use std::time::Duration;

use touchline_core::{
    Channel, ConsumedRecord, CustomerId, Envelope, EventId, EventStore as _, EventType,
    JourneyStage, PartnerId, RecordContent, StreamIdentity, Touchpoint, UnixNanos,
};
use touchline_projection::SledStore;
use touchline_tests::{
    COURIER, event_ids, produce_raw, produce_values, start_broker, start_node, timeline_client,
    wait_for_timeline,
};

fn envelope(event_id: &str, seconds: i64) -> Envelope {
    Envelope {
        partner_id: PartnerId::parse(COURIER.0).expect("valid partner"),
        touchpoint: Touchpoint {
            event_id: EventId::parse(event_id).expect("valid id"),
            customer_id: CustomerId::parse("erin").expect("valid id"),
            event_type: EventType::parse("delivery.completed").expect("valid type"),
            occurred_at: UnixNanos(seconds * 1_000_000_000),
            channel: Channel::Doorstep,
            stage: JourneyStage::Fulfil,
            outcome: None,
            attributes: BTreeMap::new(),
            payload: Vec::new(),
        },
        received_at: UnixNanos(seconds * 1_000_000_000),
    }
}

/// The broker's cluster id, as the projector reads it.
async fn cluster_id(broker: &touchline_tests::TestBroker) -> anyhow::Result<String> {
    let bootstrap = broker.bootstrap_servers().to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        Ok(touchline_kafka::fetch_cluster_id(
            rdkafka::consumer::Consumer::client(&consumer),
            Duration::from_secs(10),
        )?)
    })
    .await?
}

/// Ten records for one customer on a fresh broker; a store that says it already projected up to
/// offset 4 of that partition, with `stored_at_4` as the record it saw there. Returns the event ids
/// the node ends up with.
async fn resume_with(stored_at_4: Envelope, expect_entries: usize) -> anyhow::Result<Vec<String>> {
    let broker = start_broker().await;
    let records: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| {
            (
                "erin".to_owned(),
                touchline_proto::encode_envelope(&envelope(&format!("new-{i}"), 1_780_000_000 + i)),
            )
        })
        .collect();
    // One record per produce request, so that every offset starts a batch: Tansu 0.6 cannot fetch
    // from the middle of a batch.
    let mut positions = Vec::new();
    for record in records {
        positions.extend(produce_raw(&broker, vec![record]).await?);
    }
    let partition = positions[0].0;
    assert!(
        positions
            .iter()
            .enumerate()
            .all(|(i, position)| *position == (partition, i64::try_from(i).unwrap_or_default()))
    );

    let dir = tempfile::tempdir()?;
    let cluster_id = cluster_id(&broker).await?;
    {
        let store = SledStore::open(&dir.path().join("store"))?;
        let raw = touchline_proto::encode_envelope(&stored_at_4);
        let stream = StreamIdentity {
            cluster_id,
            topic: broker.topic().to_owned(),
        };
        store.apply(
            &stream,
            vec![ConsumedRecord {
                partition,
                offset: 4,
                content: RecordContent::Event {
                    envelope: Box::new(stored_at_4),
                    raw,
                },
            }],
        )?;
        store.flush()?;
    }
    let node = start_node(&broker, dir.path()).await?;
    let mut timeline = timeline_client(&node).await?;
    let entries = wait_for_timeline(&mut timeline, "erin", expect_entries).await?;
    node.shutdown().await?;
    Ok(event_ids(&entries))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_whose_record_is_still_there_is_resumed() -> anyhow::Result<()> {
    // The store saw exactly the broker's record at offset 4: resume at 5.
    let ids = resume_with(envelope("new-4", 1_780_000_004), 6).await?;
    assert_eq!(ids, ["new-4", "new-5", "new-6", "new-7", "new-8", "new-9"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_from_another_incarnation_reads_the_partition_from_the_start()
-> anyhow::Result<()> {
    // The store saw another record at offset 4: this broker is not the one the position came from.
    let ids = resume_with(envelope("old-4", 1_700_000_000), 11).await?;
    let mut expected = vec!["old-4".to_owned()];
    expected.extend((0..10).map(|i| format!("new-{i}")));
    assert_eq!(ids, expected);
    Ok(())
}

/// A position stored past records retention deleted (a start found them gone) has no record before
/// it: on a broker whose oldest record is before it again (another incarnation under the same
/// cluster id), the partition is read from its start, also when the record just before the
/// position has no value (a tombstone of another producer, whose fingerprint is 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_past_deleted_records_on_a_broker_that_holds_records_before_it_reads_from_the_start()
-> anyhow::Result<()> {
    let broker = start_broker().await;
    // Offsets 0..=3 events, 4 a record without a value, 5..=9 events: one request each (Tansu
    // fetches from a batch's start only).
    let mut positions = Vec::new();
    for i in 0..10_i64 {
        let value = (i != 4).then(|| {
            touchline_proto::encode_envelope(&envelope(&format!("new-{i}"), 1_780_000_000 + i))
        });
        positions.extend(produce_values(&broker, vec![("erin".to_owned(), value)]).await?);
    }
    let partition = positions[0].0;
    assert_eq!(positions[4], (partition, 4));
    let dir = tempfile::tempdir()?;
    {
        let store = SledStore::open(&dir.path().join("store"))?;
        let stream = StreamIdentity {
            cluster_id: cluster_id(&broker).await?,
            topic: broker.topic().to_owned(),
        };
        store.skip_to(&stream, partition, 5)?;
        store.flush()?;
    }
    let node = start_node(&broker, dir.path()).await?;
    let mut timeline = timeline_client(&node).await?;
    let entries = wait_for_timeline(&mut timeline, "erin", 9).await?;
    node.shutdown().await?;
    let expected: Vec<String> = (0..10)
        .filter(|i| *i != 4)
        .map(|i| format!("new-{i}"))
        .collect();
    assert_eq!(event_ids(&entries), expected);
    Ok(())
}
