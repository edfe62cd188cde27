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
#[path = "support/wrapped.rs"]
mod wrapped;

use serve::serve;
use support::{apply, event};
use tonic_types::StatusExt as _;

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

    // With a flusher at work, as the projector's (flushes of its own beside the call's): the call
    // answers, with what it read, durable by then.
    apply(
        &*store,
        &mut offset,
        vec![event("e3", "alice", 40)],
        !flushed,
    );
    let flusher_store = Arc::clone(&store);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_flusher = Arc::clone(&stop);
    let flusher = std::thread::spawn(move || -> Result<(), touchline_core::StoreError> {
        while !stop_flusher.load(std::sync::atomic::Ordering::Acquire) {
            flusher_store.flush()?;
            std::thread::yield_now();
        }
        Ok(())
    });
    let summary = client
        .get_customer_summary(v1::GetCustomerSummaryRequest {
            customer_id: "alice".to_owned(),
        })
        .await?
        .into_inner();
    stop.store(true, std::sync::atomic::Ordering::Release);
    flusher
        .join()
        .map_err(|_| anyhow::anyhow!("the flusher panicked"))??;
    assert_eq!(summary.total_touchpoints, 3, "{summary:?}");
    assert!(store.durable_sequence() >= 3);

    drop(client);
    serve::stop(server, store).await;
    Ok(())
}

/// A store whose flush does not return (sled 0.34 can wait for ever in a flush after it failed
/// to create a file) holds one blocking thread, not one per `GetCustomerSummary` that waits for
/// it: the calls share the one flush and give up after 10 s with `UNAVAILABLE`
/// (`STORE_FLUSH_STALLED`); once the flush returns, summaries are served again. Before, each call
/// started a flush of its own on the blocking pool and waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_waiting_for_a_stalled_flush_share_it_and_give_up() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = wrapped::WrappedStore::open(&dir)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    // Without a feed, as a node without a projector: a summary flushes the store itself.
    let service = touchline_query::TimelineService::new(Arc::clone(&store) as Arc<dyn EventStore>);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client = serve::Client::connect(format!("http://{address}")).await?;
    let mut offset = 0;
    apply(
        &store.inner,
        &mut offset,
        vec![event("e1", "alice", 10)],
        false,
    );
    store.stall_flushes(true);
    let summary = |mut client: serve::Client| async move {
        client
            .get_customer_summary(v1::GetCustomerSummaryRequest {
                customer_id: "alice".to_owned(),
            })
            .await
    };
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(summary(client.clone())))
        .collect();
    for call in calls {
        let stalled = call.await?.expect_err("the flush does not return");
        assert_eq!(stalled.code(), tonic::Code::Unavailable, "{stalled:?}");
        assert_eq!(
            stalled
                .get_details_error_info()
                .map(|info| info.reason)
                .as_deref(),
            Some("STORE_FLUSH_STALLED")
        );
    }
    assert_eq!(
        store.flushes.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one flush for the three calls"
    );
    store.stall_flushes(false);
    let served = summary(client.clone()).await?.into_inner();
    assert_eq!(served.total_touchpoints, 1);
    assert!(store.inner.durable_sequence() >= 1);

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
