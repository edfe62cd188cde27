//! A watcher whose client does not read falls behind the feed without slowing it: the feed never
//! waits, and the watcher ends with ABORTED (reason WATCH_LAGGED) and a cursor to resume from,
//! after every entry it did deliver.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic_types::StatusExt as _;
use touchline_core::{
    Channel, CustomerId, EventId, EventStore, EventType, JourneyStage, LogPosition, PartnerId,
    TimelineEntry, Touchpoint, UnixNanos,
};
use touchline_projection::SledStore;
use touchline_proto::v1;
use touchline_query::StoreReads;
use touchline_query::watch::{Watch, decode_cursor};

fn entry(sequence: u64) -> TimelineEntry {
    TimelineEntry {
        partner_id: PartnerId::parse("courier").expect("valid"),
        touchpoint: Touchpoint {
            event_id: EventId::parse(format!("e{sequence}")).expect("valid"),
            customer_id: CustomerId::parse("cust").expect("valid"),
            event_type: EventType::parse("delivery.completed").expect("valid"),
            occurred_at: UnixNanos(i64::try_from(sequence).unwrap_or_default()),
            channel: Channel::Web,
            stage: JourneyStage::Fulfil,
            outcome: None,
            attributes: BTreeMap::new(),
            payload: Vec::new(),
        },
        received_at: UnixNanos(0),
        position: LogPosition {
            partition: 0,
            offset: i64::try_from(sequence).unwrap_or_default(),
            sequence,
        },
    }
}

#[tokio::test]
async fn a_watcher_that_falls_behind_is_told_where_to_resume() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn EventStore> = Arc::new(SledStore::open(dir.path())?);
    let log = store.log_id();
    let (feed, live) = broadcast::channel(4);
    let customer = CustomerId::parse("cust").expect("valid");
    let mut client = Watch {
        reads: StoreReads::new(store, 1),
        customer: customer.clone(),
        after: 0,
        live,
        shutdown: CancellationToken::new(),
        still_allowed: None,
        stalled_after: touchline_query::watch::STALLED_AFTER,
    }
    .spawn();
    // The feed never waits for the watcher: 1000 batches go out at once.
    for sequence in 1..=1000 {
        feed.send(Arc::from(vec![entry(sequence)]))?;
    }
    let mut delivered = Vec::new();
    let status = loop {
        match client.recv().await {
            Some(Ok(message)) => {
                if let Some(v1::watch_timeline_response::Event::Entry(entry)) = message.event {
                    delivered.push(entry.position.map_or(0, |p| p.sequence));
                }
            }
            Some(Err(status)) => break status,
            None => anyhow::bail!("the watch ended without telling why"),
        }
    };
    assert_eq!(status.code(), Code::Aborted);
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "WATCH_LAGGED");
    let cursor = info.metadata.get("cursor").expect("a cursor");
    let resume =
        decode_cursor(&customer, log, cursor).expect("a cursor of this log for this customer");
    assert_eq!(
        Some(resume),
        delivered.last().copied().or(Some(0)),
        "the cursor is the last entry delivered"
    );
    assert!(delivered.len() < 1000, "the watcher fell behind");
    assert_eq!(
        touchline_query::metrics::WATCHES_LAGGED.get(),
        1,
        "counted once"
    );
    // And the watch is no longer counted as open once its task ended.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(10));
    while touchline_query::metrics::WATCHES.get() != 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the ended watch is still counted as open"
        );
        poll.tick().await;
    }
    assert!(
        delivered.windows(2).all(|pair| pair[0] < pair[1]),
        "entries in log order, none twice"
    );
    Ok(())
}
