//! What a live timeline may hold on the server: a node serves at most `query.max-watches` watches
//! at once (more are refused with `RESOURCE_EXHAUSTED` `TOO_MANY_WATCHES`, and a watch that ends
//! frees its slot), and a watcher whose client takes nothing ends as lagged once its queue has
//! stayed full for the stall time: its task, inbox and slot go, and the client still
//! gets what was queued, then the error (such a stream counts among the streams open, twice the
//! watchers, until the client reads it or goes). The real sled store on a temporary directory, the real
//! `TimelineService` on `127.0.0.1:0`, the generated client.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt as _;
use touchline_core::EventStore;
use touchline_projection::SledStore;
use touchline_proto::v1;
use touchline_query::watch::decode_cursor;

#[path = "support/serve.rs"]
mod serve;
mod support;

use serve::{serve, stop};
use support::{apply, customer, event};

fn watch_alice() -> v1::WatchTimelineRequest {
    v1::WatchTimelineRequest {
        customer_id: "alice".to_owned(),
        cursor: String::new(),
    }
}

#[tokio::test]
async fn a_node_serves_at_most_max_watches_and_a_watch_that_ends_frees_its_slot()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(dir.path())?);
    let mut offset = 0;
    apply(&*store, &mut offset, vec![event("e1", "alice", 10)], true);
    let (mut client, server) = serve(&store, |service| service.with_max_watches(1)).await?;

    let mut first = client.watch_timeline(watch_alice()).await?.into_inner();
    let caught_up = loop {
        let message = first.message().await?.expect("the watch goes on");
        if matches!(
            message.event,
            Some(v1::watch_timeline_response::Event::CaughtUp(_))
        ) {
            break message;
        }
    };
    assert!(!caught_up.cursor.is_empty());

    let refused = client
        .watch_timeline(watch_alice())
        .await
        .expect_err("the one slot is taken");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(
        refused
            .get_details_error_info()
            .map(|info| info.reason)
            .as_deref(),
        Some("TOO_MANY_WATCHES")
    );

    // The first client goes: its slot is free once the server has dropped its stream.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut attempt = tokio::time::interval(Duration::from_millis(20));
    loop {
        attempt.tick().await;
        match client.watch_timeline(watch_alice()).await {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the slot of the watch that ended was not freed"
                );
            }
            Err(status) => anyhow::bail!("unexpected refusal: {status:?}"),
        }
    }

    drop(client);
    stop(server, store).await;
    Ok(())
}

#[tokio::test]
async fn a_watch_whose_client_takes_nothing_ends_as_lagged_after_what_was_queued()
-> anyhow::Result<()> {
    // 8 MiB of entries: more than HTTP/2's windows (a few MiB) and the watcher's queue (256
    // messages) hold.
    const EVENTS: usize = 2000;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(dir.path())?);
    let mut offset = 0;
    for chunk in 0..EVENTS / 500 {
        let events = (0..500)
            .map(|index| {
                let number = chunk * 500 + index;
                let mut event = event(
                    &format!("e{number}"),
                    "alice",
                    i64::try_from(number).unwrap_or_default(),
                );
                event.touchpoint.payload = vec![b'x'; 4096];
                event
            })
            .collect();
        apply(&*store, &mut offset, events, true);
    }
    let (mut client, server) = serve(&store, |service| {
        service
            .with_watch_stall(Duration::from_millis(300))
            .with_max_watches(1)
    })
    .await?;

    let mut stream = client.watch_timeline(watch_alice()).await?.into_inner();
    // Nothing is read: the catch-up fills what HTTP/2 takes and the watcher's queue, then the
    // watcher gives up, and its inbox goes with its task, and with it the node's reading of the
    // feed (it was the only watcher).
    let feed = store.watch_sender();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut check = tokio::time::interval(Duration::from_millis(20));
    while feed.receiver_count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watcher still runs although its client takes nothing"
        );
        check.tick().await;
    }

    // The watcher's slot went with its task, although its client is still connected: another
    // client can watch.
    let mut other = client.clone();
    let mut attempt = tokio::time::interval(Duration::from_millis(20));
    let other_stream = loop {
        attempt.tick().await;
        match other.watch_timeline(watch_alice()).await {
            Ok(watching) => break watching.into_inner(),
            Err(status) if status.code() == Code::ResourceExhausted => assert!(
                tokio::time::Instant::now() < deadline,
                "the stalled watch still holds its slot"
            ),
            Err(status) => anyhow::bail!("unexpected refusal: {status:?}"),
        }
    };
    // But a stalled stream, with what was queued for it, still counts among the streams open
    // (twice the watchers): unread streams cannot pile up without bound. The other client
    // takes nothing either: once its watcher has ended too, no watcher runs, and the two
    // unread streams refuse a third.
    while feed.receiver_count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other watcher still runs although its client takes nothing"
        );
        check.tick().await;
    }
    let refused = other
        .watch_timeline(watch_alice())
        .await
        .expect_err("two unread streams are open");
    assert_eq!(
        (
            refused.code(),
            refused.get_details_error_info().map(|info| info.reason)
        ),
        (Code::ResourceExhausted, Some("TOO_MANY_WATCHES".to_owned())),
        "{refused:?}"
    );
    assert!(
        refused.message().contains("whose watcher ended"),
        "{refused:?}"
    );

    let mut entries = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(message)) => {
                assert!(
                    matches!(
                        message.event,
                        Some(v1::watch_timeline_response::Event::Entry(_))
                    ),
                    "the catch-up was cut before it ended: {message:?}"
                );
                entries += 1;
            }
            Ok(None) => anyhow::bail!("the watch ended without telling why"),
            Err(status) => break status,
        }
    };
    assert!(
        (256..EVENTS).contains(&entries),
        "the client got what was queued (at least the watcher's 256), not the whole catch-up: {entries} entries"
    );
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "WATCH_LAGGED");
    // During the catch-up every message carries the cursor the watch started from: resuming
    // from it reads the catch-up again.
    let cursor = info.metadata.get("cursor").expect("a cursor");
    assert_eq!(
        decode_cursor(&customer("alice"), store.log_id(), cursor),
        Ok(0)
    );

    // Read to its end (the client still holds it, as it holds the other unread one), the
    // stalled stream no longer counts.
    let mut attempt = tokio::time::interval(Duration::from_millis(20));
    let third = loop {
        attempt.tick().await;
        match other.watch_timeline(watch_alice()).await {
            Ok(watching) => break watching,
            Err(status) if status.code() == Code::ResourceExhausted => assert!(
                tokio::time::Instant::now() < deadline,
                "the stream read to its end still counts"
            ),
            Err(status) => anyhow::bail!("unexpected refusal: {status:?}"),
        }
    };

    drop((stream, other_stream, third, client, other));
    stop(server, store).await;
    Ok(())
}
