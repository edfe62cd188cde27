//! Restarts: a projector stopped and restarted in the middle of a stream loses nothing and
//! doubles nothing; records consumed again after a restart (a new broker incarnation that holds the
//! same records) are dropped as duplicates.

use std::collections::{BTreeMap, BTreeSet};

use touchline::{BrokerChoice, Node};
use touchline_proto::v1::{self, JourneyStage};
use touchline_tests::{
    COURIER, config, event_ids, ingest_client, partners, produce_raw, publish, start_broker,
    start_node, timeline_client, touchpoint, wait_for_timeline, wait_until,
};

const CUSTOMERS: usize = 7;

/// Publishes each batch, checks every event was accepted, and records it as acknowledged.
async fn publish_all(
    ingest: &mut touchline_proto::v1::ingest_service_client::IngestServiceClient<
        tonic::transport::Channel,
    >,
    batches: Vec<Vec<v1::Touchpoint>>,
    acked: &mut BTreeMap<String, BTreeSet<String>>,
) -> anyhow::Result<()> {
    for batch in batches {
        let response = publish(ingest, COURIER.1, batch.clone()).await?;
        anyhow::ensure!(
            response.accepted as usize == batch.len(),
            "every event accepted"
        );
        for event in batch {
            acked
                .entry(event.customer_id)
                .or_default()
                .insert(event.event_id);
        }
    }
    Ok(())
}

fn customer(index: usize) -> String {
    format!("cust-{}", index % CUSTOMERS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_restarted_mid_stream_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    // Ingest and projector in separate nodes, so ingest keeps acknowledging while the projector is
    // down.
    let mut ingest_config = config(&broker, &dir.path().join("ingest"));
    ingest_config.projector.enabled = false;
    ingest_config.query.enabled = false;
    let ingest_node = Node::start(ingest_config, BrokerChoice::External, partners()).await?;
    let mut projector_config = config(&broker, dir.path());
    projector_config.ingest.enabled = false;
    projector_config.projector.max_batch = 7;
    let projector =
        Node::start(projector_config.clone(), BrokerChoice::External, partners()).await?;

    let mut ingest = ingest_client(&ingest_node).await?;
    let mut acked = BTreeMap::<String, BTreeSet<String>>::new();
    let mut batch_number = 0;
    let mut send_batches = |count: usize| {
        let batches: Vec<Vec<v1::Touchpoint>> = (0..count)
            .map(|_| {
                batch_number += 1;
                (0..10)
                    .map(|i| {
                        let index = batch_number * 10 + i;
                        touchpoint(
                            &format!("evt-{index}"),
                            &customer(index),
                            "delivery.completed",
                            i64::try_from(index).unwrap_or_default(),
                            JourneyStage::Fulfil,
                        )
                    })
                    .collect()
            })
            .collect();
        batches
    };

    publish_all(&mut ingest, send_batches(10), &mut acked).await?;
    // Stop the projector while it is consuming, keep publishing, then start it again.
    projector.shutdown().await?;
    publish_all(&mut ingest, send_batches(10), &mut acked).await?;
    let projector = Node::start(projector_config, BrokerChoice::External, partners()).await?;
    publish_all(&mut ingest, send_batches(5), &mut acked).await?;

    let mut timeline = timeline_client(&projector).await?;
    let total: usize = acked.values().map(BTreeSet::len).sum();
    assert_eq!(total, 250);
    for (customer, expected) in &acked {
        let entries = wait_for_timeline(&mut timeline, customer, expected.len()).await?;
        let ids = event_ids(&entries);
        assert_eq!(
            ids.len(),
            expected.len(),
            "customer {customer}: nothing doubled"
        );
        assert_eq!(
            ids.iter().cloned().collect::<BTreeSet<_>>(),
            *expected,
            "customer {customer}: nothing lost"
        );
    }
    assert_eq!(projector.store().map(|store| store.log_len()), Some(total));
    projector.shutdown().await?;
    ingest_node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_consumed_again_after_a_restart_appear_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let first_broker = start_broker().await;
    let node = start_node(&first_broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    let events: Vec<_> = (0..20)
        .map(|i| {
            touchpoint(
                &format!("e{i}"),
                &customer(i),
                "ticket.solved",
                i64::try_from(i).unwrap_or_default(),
                JourneyStage::Support,
            )
        })
        .collect();
    assert_eq!(publish(&mut ingest, COURIER.1, events).await?.accepted, 20);
    let store = node.store().cloned().expect("the node has a store");
    wait_until("all 20 events in the log", || store.log_len() == 20).await?;
    // What Kafka held: the log keeps every record's original bytes.
    let records: Vec<(String, Vec<u8>)> = (1..=20)
        .map(|sequence| {
            let (_, _, raw) = store.log_record(sequence).expect("reads").expect("exists");
            let envelope = touchline_proto::decode_envelope(Some(&raw)).expect("decodes");
            (envelope.touchpoint.customer_id.to_string(), raw)
        })
        .collect();
    drop(store);
    node.shutdown().await?;
    drop(first_broker);

    // A new broker incarnation holding the same records: the projector reads it from its start,
    // consumes every record again, and drops each as a duplicate.
    let second_broker = start_broker().await;
    produce_raw(&second_broker, records.clone()).await?;
    produce_raw(&second_broker, records).await?;
    let node = start_node(&second_broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    // A marker per customer, after the records in each of their partitions: once a customer's
    // marker is in its timeline, the projector has read every record of that partition before it.
    publish(
        &mut ingest,
        COURIER.1,
        (0..CUSTOMERS)
            .map(|index| {
                touchpoint(
                    &format!("marker-{index}"),
                    &customer(index),
                    "ticket.solved",
                    100,
                    JourneyStage::Support,
                )
            })
            .collect(),
    )
    .await?;
    let mut timeline = timeline_client(&node).await?;
    for index in 0..CUSTOMERS {
        let mut expected: Vec<String> = (index..20)
            .step_by(CUSTOMERS)
            .map(|i| format!("e{i}"))
            .collect();
        expected.push(format!("marker-{index}"));
        let entries = wait_for_timeline(&mut timeline, &customer(index), expected.len()).await?;
        assert_eq!(
            event_ids(&entries),
            expected,
            "customer {}",
            customer(index)
        );
    }
    assert_eq!(
        node.store().map(|store| store.log_len()),
        Some(20 + CUSTOMERS),
        "nothing of the new incarnation was appended twice"
    );
    node.shutdown().await
}
