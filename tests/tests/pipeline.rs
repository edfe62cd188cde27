//! Publish -> Kafka -> log -> timeline, end to end: event-time order with late events in place,
//! pagination, every filter, the summary, duplicates, and partner identity from the credential.

use std::collections::BTreeMap;

use touchline_proto::v1::{self, GetTimelineRequest, JourneyStage};
use touchline_tests::{
    COURIER, RETAILER, authorized, event_ids, full_timeline, ingest_client, publish, start_broker,
    start_node, timeline_client, touchpoint, wait_for_timeline,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_touchpoints_form_an_event_time_ordered_timeline() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    let mut timeline = timeline_client(&node).await?;

    let retailer = publish(
        &mut ingest,
        RETAILER.1,
        vec![
            touchpoint("r-1", "alice", "product.viewed", 0, JourneyStage::Discover),
            touchpoint("r-2", "alice", "order.placed", 100, JourneyStage::Purchase),
            touchpoint("r-3", "alice", "review.posted", 900, JourneyStage::Advocate),
        ],
    )
    .await?;
    assert_eq!((retailer.accepted, retailer.rejected), (3, 0));
    for result in &retailer.results {
        assert!(
            matches!(result.result, Some(v1::event_result::Result::Accepted(_))),
            "every event is accepted with its position"
        );
    }
    let first = wait_for_timeline(&mut timeline, "alice", 3).await?;
    assert_eq!(event_ids(&first), ["r-1", "r-2", "r-3"]);

    // The courier reports later, about things that happened in between: they land in their place.
    publish(
        &mut ingest,
        COURIER.1,
        vec![
            touchpoint(
                "c-2",
                "alice",
                "delivery.completed",
                500,
                JourneyStage::Fulfil,
            ),
            touchpoint(
                "c-1",
                "alice",
                "parcel.picked-up",
                200,
                JourneyStage::Fulfil,
            ),
        ],
    )
    .await?;
    let entries = wait_for_timeline(&mut timeline, "alice", 5).await?;
    assert_eq!(event_ids(&entries), ["r-1", "r-2", "c-1", "c-2", "r-3"]);
    let partners: Vec<_> = entries.iter().map(|e| e.partner_id.as_str()).collect();
    assert_eq!(
        partners,
        [RETAILER.0, RETAILER.0, COURIER.0, COURIER.0, RETAILER.0]
    );

    // Pages of two, following the opaque token, give the same timeline exactly once.
    let mut request = GetTimelineRequest {
        customer_id: "alice".into(),
        page_size: 2,
        ..Default::default()
    };
    let mut paged = Vec::new();
    let mut pages = 0;
    loop {
        let page = timeline.get_timeline(request.clone()).await?.into_inner();
        assert!(page.entries.len() <= 2);
        paged.extend(page.entries);
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    assert_eq!(event_ids(&paged), event_ids(&entries));
    assert_eq!(pages, 3);

    // Each filter.
    let filtered = |request: GetTimelineRequest| {
        let mut timeline = timeline.clone();
        async move {
            timeline
                .get_timeline(request)
                .await
                .map(|r| event_ids(&r.into_inner().entries))
        }
    };
    let base = || GetTimelineRequest {
        customer_id: "alice".into(),
        ..Default::default()
    };
    let at = |offset| {
        Some(prost_types::Timestamp {
            seconds: touchline_tests::BASE_SECONDS + offset,
            nanos: 0,
        })
    };
    assert_eq!(
        filtered(GetTimelineRequest {
            from: at(100),
            to: at(500),
            ..base()
        })
        .await?,
        ["r-2", "c-1"]
    );
    assert_eq!(
        filtered(GetTimelineRequest {
            partner_ids: vec![COURIER.0.into()],
            ..base()
        })
        .await?,
        ["c-1", "c-2"]
    );
    assert_eq!(
        filtered(GetTimelineRequest {
            types: vec!["order.placed".into(), "review.posted".into()],
            ..base()
        })
        .await?,
        ["r-2", "r-3"]
    );
    assert_eq!(
        filtered(GetTimelineRequest {
            stages: vec![JourneyStage::Fulfil as i32, JourneyStage::Discover as i32],
            ..base()
        })
        .await?,
        ["r-1", "c-1", "c-2"]
    );

    // The summary.
    let summary = timeline
        .get_customer_summary(v1::GetCustomerSummaryRequest {
            customer_id: "alice".into(),
        })
        .await?
        .into_inner();
    assert_eq!(summary.total_touchpoints, 5);
    assert_eq!(summary.current_stage, JourneyStage::Advocate as i32);
    assert_eq!(
        summary
            .first_touch
            .and_then(|e| e.touchpoint)
            .map(|t| t.event_id)
            .as_deref(),
        Some("r-1")
    );
    assert_eq!(
        summary
            .last_touch
            .and_then(|e| e.touchpoint)
            .map(|t| t.event_id)
            .as_deref(),
        Some("r-3")
    );
    assert_eq!(
        summary.by_stage,
        BTreeMap::from([
            ("discover".into(), 1),
            ("purchase".into(), 1),
            ("fulfil".into(), 2),
            ("advocate".into(), 1)
        ])
    );
    assert_eq!(
        summary.by_partner,
        BTreeMap::from([(COURIER.0.into(), 2), (RETAILER.0.into(), 3)])
    );
    assert_eq!(
        summary.by_sentiment,
        BTreeMap::from([("positive".into(), 5)])
    );
    let missing = timeline
        .get_customer_summary(v1::GetCustomerSummaryRequest {
            customer_id: "nobody".into(),
        })
        .await;
    assert_eq!(
        missing.map_err(|status| status.code()).err(),
        Some(tonic::Code::NotFound)
    );

    node.shutdown().await
}

/// `GetTimeline` writes its entries for the wire from the stored ones (its own encoder), the
/// summary's first and last touch through prost: a client decodes the same entry from both, and
/// the touchpoint as it was published, every field of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeline_entry_comes_back_as_published_with_every_field() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    let mut timeline = timeline_client(&node).await?;
    let mut full = touchpoint("f-1", "frank", "ticket.solved", 7, JourneyStage::Support);
    full.occurred_at = full.occurred_at.map(|at| prost_types::Timestamp {
        nanos: 123_456_789,
        ..at
    });
    full.channel = v1::Channel::Phone as i32;
    full.outcome = Some(v1::Outcome {
        sentiment: v1::Sentiment::Negative as i32,
        score: None,
    });
    full.attributes = BTreeMap::from([
        ("agent".to_owned(), "a-17".to_owned()),
        ("note".to_owned(), String::new()),
    ]);
    full.payload = vec![0, 1, 2, 255];
    let mut bare = touchpoint("f-2", "frank", "ticket.opened", 3, JourneyStage::Support);
    bare.outcome = None;
    let answer = publish(&mut ingest, COURIER.1, vec![full.clone(), bare.clone()]).await?;
    assert_eq!((answer.accepted, answer.rejected), (2, 0));

    let entries = wait_for_timeline(&mut timeline, "frank", 2).await?;
    assert_eq!(entries[0].touchpoint.as_ref(), Some(&bare));
    assert_eq!(entries[1].touchpoint.as_ref(), Some(&full));
    for entry in &entries {
        assert_eq!(entry.partner_id, COURIER.0);
        let position = entry.position.expect("a position");
        assert!(position.sequence > 0 && position.offset >= 0);
        assert!(entry.received_at.is_some());
    }
    let summary = timeline
        .get_customer_summary(v1::GetCustomerSummaryRequest {
            customer_id: "frank".into(),
        })
        .await?
        .into_inner();
    assert_eq!(summary.first_touch.as_ref(), Some(&entries[0]));
    assert_eq!(summary.last_touch.as_ref(), Some(&entries[1]));
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_published_twice_appears_once() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    let mut timeline = timeline_client(&node).await?;

    let event = touchpoint(
        "dup-1",
        "bob",
        "delivery.completed",
        10,
        JourneyStage::Fulfil,
    );
    let first = publish(&mut ingest, COURIER.1, vec![event.clone()]).await?;
    let again = publish(&mut ingest, COURIER.1, vec![event.clone()]).await?;
    assert_eq!(
        (first.accepted, again.accepted),
        (1, 1),
        "a resend is acknowledged (it is safe)"
    );
    // A marker published after both: once it is projected, both copies have been consumed.
    publish(
        &mut ingest,
        COURIER.1,
        vec![touchpoint(
            "marker",
            "bob",
            "delivery.completed",
            20,
            JourneyStage::Fulfil,
        )],
    )
    .await?;
    let entries = wait_for_timeline(&mut timeline, "bob", 2).await?;
    assert_eq!(event_ids(&entries), ["dup-1", "marker"]);
    let store = node.store().expect("the node has a store");
    assert_eq!(store.log_len(), 2);
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_cannot_act_as_another_partner() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node(&broker, dir.path()).await?;
    let mut ingest = ingest_client(&node).await?;
    let mut timeline = timeline_client(&node).await?;

    // The retailer's event.
    publish(
        &mut ingest,
        RETAILER.1,
        vec![touchpoint(
            "shared-id",
            "carol",
            "order.placed",
            0,
            JourneyStage::Purchase,
        )],
    )
    .await?;
    // The courier names the retailer everywhere it can: metadata and attributes. It also reuses the
    // retailer's event id, trying to overwrite or suppress the retailer's event.
    let mut spoof = touchpoint(
        "shared-id",
        "carol",
        "delivery.completed",
        10,
        JourneyStage::Fulfil,
    );
    spoof
        .attributes
        .insert("partner_id".into(), RETAILER.0.into());
    let mut request = authorized(
        v1::PublishRequest {
            events: vec![spoof],
            batch_id: String::new(),
        },
        COURIER.1,
    );
    request
        .metadata_mut()
        .insert("x-partner-id", RETAILER.0.parse()?);
    ingest.publish(request).await?;

    let entries = wait_for_timeline(&mut timeline, "carol", 2).await?;
    let by_partner: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e.partner_id.as_str(),
                e.touchpoint.as_ref().map(|t| t.r#type.as_str()),
            )
        })
        .collect();
    assert_eq!(
        by_partner,
        [
            (RETAILER.0, Some("order.placed")),
            (COURIER.0, Some("delivery.completed"))
        ]
    );
    let full = full_timeline(&mut timeline, "carol").await?;
    assert_eq!(
        full.len(),
        2,
        "the retailer's event is untouched and the courier's is its own"
    );
    node.shutdown().await
}
