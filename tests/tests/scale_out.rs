//! Two projector nodes splitting the topic's partitions (`projector.partitions`): each customer's
//! touchpoints are projected by the node that owns the customer's partition, and the other node
//! answers for that customer with `FAILED_PRECONDITION` (`CUSTOMER_NOT_HERE`, naming the
//! partition) instead of as a customer without touchpoints.

use tonic::Code;
use tonic_types::StatusExt as _;
use touchline_proto::v1::{self, JourneyStage};
use touchline_tests::{
    COURIER, PARTITIONS, error_reason, event_ids, ingest_client, partners, produce_raw, publish,
    start_broker, start_node_with, timeline_client, touchpoint, wait_for_timeline, wait_until,
};

fn partition(customer: &str) -> i32 {
    touchline_kafka::partition_for(customer.as_bytes(), PARTITIONS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_customer_is_served_by_the_node_that_owns_its_partition() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let (first_dir, second_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    // Partition 0 on the first node, the others on the second.
    let first = start_node_with(&broker, first_dir.path(), partners(), |config| {
        config.projector.partitions = vec![0];
    })
    .await?;
    let second = start_node_with(&broker, second_dir.path(), partners(), |config| {
        config.projector.partitions = (1..PARTITIONS).collect();
    })
    .await?;

    // Customers until both nodes have one.
    let customers: Vec<String> = (0..64).map(|n| format!("split-{n}")).collect();
    let on_first = customers
        .iter()
        .find(|customer| partition(customer) == 0)
        .expect("a customer of partition 0");
    let on_second = customers
        .iter()
        .find(|customer| partition(customer) != 0)
        .expect("a customer of another partition");

    // Either node's ingest takes every customer's events.
    let mut ingest = ingest_client(&first).await?;
    for (id, customer) in [("a-1", on_first), ("b-1", on_second)] {
        let answer = publish(
            &mut ingest,
            COURIER.1,
            vec![touchpoint(
                id,
                customer,
                "parcel.delivered",
                10,
                JourneyStage::Fulfil,
            )],
        )
        .await?;
        assert_eq!(answer.accepted, 1);
    }

    for (owner, other, customer, id) in [
        (&first, &second, on_first, "a-1"),
        (&second, &first, on_second, "b-1"),
    ] {
        let mut served = timeline_client(owner).await?;
        let entries = wait_for_timeline(&mut served, customer, 1).await?;
        assert_eq!(event_ids(&entries), [id]);

        let mut elsewhere = timeline_client(other).await?;
        let timeline = elsewhere
            .get_timeline(v1::GetTimelineRequest {
                customer_id: customer.clone(),
                ..Default::default()
            })
            .await
            .expect_err("the other node does not serve this customer");
        // Said first, whatever else is wrong with the request (a page token of the owner, a
        // page size past the limit).
        let with_bad_fields = elsewhere
            .get_timeline(v1::GetTimelineRequest {
                customer_id: customer.clone(),
                page_size: 5000,
                page_token: "not-a-token".to_owned(),
                ..Default::default()
            })
            .await
            .expect_err("the other node does not serve this customer");
        let summary = elsewhere
            .get_customer_summary(v1::GetCustomerSummaryRequest {
                customer_id: customer.clone(),
            })
            .await
            .expect_err("nor its summary");
        let watch = elsewhere
            .watch_timeline(v1::WatchTimelineRequest {
                customer_id: customer.clone(),
                cursor: String::new(),
            })
            .await
            .expect_err("nor its live timeline");
        for status in [timeline, with_bad_fields, summary, watch] {
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert_eq!(error_reason(&status).as_deref(), Some("CUSTOMER_NOT_HERE"));
            let info = status.get_details_error_info().expect("error info");
            assert_eq!(
                info.metadata.get("partition"),
                Some(&partition(customer).to_string()),
                "{status:?}"
            );
        }
        // The owner has the summary.
        let summary = served
            .get_customer_summary(v1::GetCustomerSummaryRequest {
                customer_id: customer.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(summary.total_touchpoints, 1);
    }

    // Only its own partitions are in each node's log.
    assert_eq!(first.store().expect("a store").log_len(), 1);
    assert_eq!(second.store().expect("a store").log_len(), 1);

    // Another producer's record, keyed so that it lands in the first node's partition, of a
    // customer the second node serves: no query for it comes to the first node, which keeps it
    // as a dead letter, not in its log.
    let misplaced = touchline_core::Envelope {
        partner_id: touchline_core::PartnerId::parse(COURIER.0).expect("valid partner"),
        touchpoint: touchline_core::Touchpoint {
            event_id: touchline_core::EventId::parse("c-1").expect("valid id"),
            customer_id: touchline_core::CustomerId::parse(on_second.as_str()).expect("valid id"),
            event_type: touchline_core::EventType::parse("parcel.delivered").expect("valid"),
            occurred_at: touchline_core::UnixNanos(20_000_000_000),
            channel: touchline_core::Channel::Doorstep,
            stage: touchline_core::JourneyStage::Fulfil,
            outcome: None,
            attributes: std::collections::BTreeMap::new(),
            payload: Vec::new(),
        },
        received_at: touchline_core::UnixNanos(20_000_000_000),
    };
    let landed = produce_raw(
        &broker,
        vec![(
            on_first.clone(),
            touchline_proto::encode_envelope(&misplaced),
        )],
    )
    .await?;
    assert_eq!(landed[0].0, 0, "in the first node's partition");
    let first_store = first.store().expect("a store").clone();
    wait_until("the misplaced event is a dead letter", || {
        first_store.dead_letter_count() == 1
    })
    .await?;
    let dead = first_store.dead_letters(10)?;
    assert!(
        dead[0].reason.contains("which this node does not own"),
        "{:?}",
        dead[0].reason
    );
    assert_eq!(first_store.log_len(), 1, "not in the first node's log");
    assert_eq!(second.store().expect("a store").dead_letter_count(), 0);
    first.shutdown().await?;
    second.shutdown().await
}
