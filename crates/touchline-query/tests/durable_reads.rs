//! `GetTimeline` serves durable entries only: an entry applied to the store but not yet flushed
//! is not shown (a crash could take it back, to be applied again from Kafka, perhaps under
//! another log sequence); once flushed it is. `GetCustomerSummary` serves what it read once it is
//! durable: after the projector's next flush, or (none within a second) after a flush of its own. A `WatchTimeline` cursor past the durable end of
//! the log is refused. The real sled store on a temporary directory, the real `TimelineService`
//! on `127.0.0.1:0`, the generated client.

use std::sync::Arc;

use touchline_core::EventStore;
use touchline_projection::SledStore;
use touchline_proto::v1;

#[path = "support/serve.rs"]
mod serve;
mod support;

use serve::serve;
use support::{apply, event};

async fn event_ids(client: &mut serve::Client) -> anyhow::Result<Vec<String>> {
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
    let (mut client, server) = serve(&store, |service| service).await?;
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

    drop(client);
    serve::stop(server, store).await;
    Ok(())
}

/// A summary is rewritten in place by each batch, so it cannot be read as of the durable end of
/// the log as timeline pages are: `GetCustomerSummary` makes what it read durable before it
/// serves it, so that no client sees a count (or a last touch) that a crash could take back.
#[tokio::test]
async fn get_customer_summary_serves_what_it_read_only_once_it_is_durable() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(dir.path())?);
    let (mut client, server) = serve(&store, |service| service).await?;
    let mut offset = 0;
    let flushed = true;
    apply(
        &*store,
        &mut offset,
        vec![event("e1", "alice", 10)],
        flushed,
    );
    apply(
        &*store,
        &mut offset,
        vec![event("e2", "alice", 30)],
        !flushed,
    );
    assert_eq!(store.durable_sequence(), 1, "e2 is applied, not durable");

    let summary = client
        .get_customer_summary(v1::GetCustomerSummaryRequest {
            customer_id: "alice".to_owned(),
        })
        .await?
        .into_inner();
    assert_eq!(summary.total_touchpoints, 2, "{summary:?}");
    let last = summary.last_touch.and_then(|entry| entry.touchpoint);
    assert_eq!(
        last.map(|touchpoint| touchpoint.event_id).as_deref(),
        Some("e2")
    );
    assert_eq!(
        store.durable_sequence(),
        2,
        "the summary served counts e2, which is durable by then"
    );

    // With a flusher at work, as the projector's: the answer waits for its flush.
    apply(
        &*store,
        &mut offset,
        vec![event("e3", "alice", 40)],
        !flushed,
    );
    let flusher_store = Arc::clone(&store);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_flusher = Arc::clone(&stop);
    let flusher = std::thread::spawn(move || {
        while !stop_flusher.load(std::sync::atomic::Ordering::Acquire) {
            let _ = flusher_store.flush();
            std::thread::yield_now();
        }
    });
    let summary = client
        .get_customer_summary(v1::GetCustomerSummaryRequest {
            customer_id: "alice".to_owned(),
        })
        .await?
        .into_inner();
    stop.store(true, std::sync::atomic::Ordering::Release);
    let _ = flusher.join();
    assert_eq!(summary.total_touchpoints, 3, "{summary:?}");
    assert!(store.durable_sequence() >= 3);

    drop(client);
    serve::stop(server, store).await;
    Ok(())
}

/// A watch cursor holds a sequence of the log that issued it, and that log's identity. One of
/// another log (another node's, or before the store was reset), or past this log's durable end,
/// would resume at a position that means nothing here: it is refused.
#[tokio::test]
async fn a_watch_cursor_of_another_log_or_past_the_end_of_this_one_is_refused() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(dir.path())?);
    let (mut client, server) = serve(&store, |service| service).await?;
    let mut offset = 0;
    apply(
        &*store,
        &mut offset,
        vec![event("e1", "alice", 10), event("e2", "alice", 30)],
        true,
    );
    let alice = touchline_core::CustomerId::parse("alice")?;
    let watch = |cursor: String| v1::WatchTimelineRequest {
        customer_id: "alice".to_owned(),
        cursor,
    };

    let log = store.log_id();
    let refused = client
        .watch_timeline(watch(touchline_query::watch::encode_cursor(
            &alice, log, 50,
        )))
        .await
        .expect_err("a cursor past this log's end");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    // Another store's log, at a sequence this log has: its sequences number other events.
    let other_dir = tempfile::tempdir()?;
    let other = SledStore::open(other_dir.path())?;
    assert_ne!(other.log_id(), log, "each store draws its own log identity");
    let refused = client
        .watch_timeline(watch(touchline_query::watch::encode_cursor(
            &alice,
            other.log_id(),
            1,
        )))
        .await
        .expect_err("a cursor of another log");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("another node's log"),
        "{refused:?}"
    );

    // At the end of this log: nothing missed, caught up at once.
    let mut watching = client
        .watch_timeline(watch(touchline_query::watch::encode_cursor(&alice, log, 2)))
        .await?
        .into_inner();
    let first = watching.message().await?.and_then(|message| message.event);
    assert!(
        matches!(first, Some(v1::watch_timeline_response::Event::CaughtUp(_))),
        "{first:?}"
    );

    drop((watching, client));
    serve::stop(server, store).await;
    Ok(())
}
