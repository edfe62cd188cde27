//! A resumed watch gets exactly the durable entries of its customer after its cursor, in timeline
//! order (flagged `late` when they sort before the end of what the client holds), whichever way it
//! reads them: from the log when fewer events were logged since the cursor
//! than the customer has entries (a short break in a long timeline), from the timeline otherwise.
//! The store is the real sled store; a wrapper counts which of the two reads the watcher made (and
//! makes the log read fail when told, to show the watcher falls back to the timeline).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use touchline_core::{Envelope, EventStore};
use touchline_proto::v1;
use touchline_query::StoreReads;
use touchline_query::watch::{Inbox, Watch, Watchers, decode_cursor};

mod support;
#[path = "support/wrapped.rs"]
mod wrapped;

use support::{apply, customer, event};
use wrapped::WrappedStore;

type Message = Result<v1::WatchTimelineResponse, tonic::Status>;

/// A watcher of `customer_id` after log sequence `after` over `store`, with the inbox `live`
/// (taken before it reads the durable end): its client's receiver.
fn spawn_watch(
    store: &Arc<WrappedStore>,
    customer_id: &str,
    after: u64,
    live: Inbox,
) -> tokio::sync::mpsc::Receiver<Message> {
    let store: Arc<dyn EventStore> = Arc::clone(store) as Arc<dyn EventStore>;
    Watch {
        reads: StoreReads::new(store, 1),
        customer: customer(customer_id),
        after,
        live,
        shutdown: CancellationToken::new(),
        still_allowed: None,
        stalled_after: touchline_query::watch::STALLED_AFTER,
    }
    .spawn()
}

/// The watch's next message, within 10 s.
async fn next_message(
    client: &mut tokio::sync::mpsc::Receiver<Message>,
) -> anyhow::Result<v1::WatchTimelineResponse> {
    Ok(
        tokio::time::timeout(std::time::Duration::from_secs(10), client.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the watch ended"))??,
    )
}

/// Resumes a watch of `customer_id` after log sequence `after`: the event ids of the catch-up
/// (those flagged `late` marked so), and the cursor of its `caught_up`.
async fn resume(
    store: &Arc<WrappedStore>,
    customer_id: &str,
    after: u64,
) -> anyhow::Result<(Vec<String>, u64)> {
    let (feed, _) = broadcast::channel(16);
    let log = store.log_id();
    let live = Watchers::new(&feed).subscribe(customer(customer_id));
    let mut client = spawn_watch(store, customer_id, after, live);
    let mut ids = Vec::new();
    loop {
        let message = next_message(&mut client).await?;
        match message.event {
            Some(v1::watch_timeline_response::Event::Entry(entry)) => {
                assert_eq!(
                    decode_cursor(&customer(customer_id), log, &message.cursor),
                    Ok(after),
                    "catch-up messages carry the cursor the watch started from"
                );
                let id = entry.touchpoint.map(|t| t.event_id).unwrap_or_default();
                ids.push(if message.late {
                    format!("{id} (late)")
                } else {
                    id
                });
            }
            Some(v1::watch_timeline_response::Event::CaughtUp(_)) => {
                let cursor = decode_cursor(&customer(customer_id), log, &message.cursor).map_err(
                    |error| {
                        anyhow::anyhow!("not a cursor of this log for this customer: {error:?}")
                    },
                )?;
                return Ok((ids, cursor));
            }
            None => anyhow::bail!("a message without an event"),
        }
    }
}

fn reads(store: &WrappedStore) -> (usize, usize) {
    (
        store.log_reads.swap(0, Ordering::SeqCst),
        store.timeline_reads.swap(0, Ordering::SeqCst),
    )
}

#[tokio::test]
async fn a_resumed_watch_gets_what_it_missed_in_timeline_order_from_the_log_or_the_timeline()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = WrappedStore::open(&dir)?;
    let mut offset = -1;
    // Sequences 1..=20: a long timeline of "alice" (event times 100, 110, ...).
    let history = (0..20)
        .map(|i| event(&format!("old-{i:02}"), "alice", 100 + 10 * i))
        .collect();
    apply(&*store, &mut offset, history, true);
    // Sequences 21..=25: the break. Two of alice's, the second late (it sorts before everything:
    // log order is not timeline order), and three of another customer's that her watch must not
    // get.
    apply(
        &*store,
        &mut offset,
        vec![
            event("new-last", "alice", 900),
            event("bob-1", "bob", 60),
            event("new-late", "alice", 50),
            event("bob-2", "bob", 70),
            event("bob-3", "bob", 80),
        ],
        true,
    );
    // Applied, not flushed: not durable, so not in any catch-up (it comes live, after it).
    apply(
        &*store,
        &mut offset,
        vec![event("not-durable", "alice", 5)],
        false,
    );
    let durable = store.durable_sequence();
    assert_eq!(durable, 25);

    // 5 events logged since sequence 20, alice has 23 entries: read from the log.
    let (ids, caught_up) = resume(&store, "alice", 20).await?;
    assert_eq!(
        ids,
        ["new-late (late)", "new-last"],
        "timeline order, alice's only; late when it sorts before what the client holds (old-19)"
    );
    assert_eq!(caught_up, durable);
    assert_eq!(reads(&store), (1, 0), "read from the log, not the timeline");

    // 23 events logged since sequence 2, alice has 23 entries: read from the timeline.
    let (ids, caught_up) = resume(&store, "alice", 2).await?;
    // The client holds old-00 and old-01: new-late sorts before them, the rest after.
    let mut expected = vec!["new-late (late)".to_owned()];
    expected.extend((2..20).map(|i| format!("old-{i:02}")));
    expected.push("new-last".to_owned());
    assert_eq!(
        ids, expected,
        "timeline order, from the entry after the cursor"
    );
    assert_eq!(caught_up, durable);
    let (log_reads, timeline_reads) = reads(&store);
    assert_eq!(log_reads, 0, "read from the timeline, not the log");
    assert!(timeline_reads > 0);

    // Bob has 3 entries, 5 events since sequence 20: the timeline too, with the same answer a
    // log read would give.
    let (ids, _) = resume(&store, "bob", 20).await?;
    assert_eq!(ids, ["bob-1", "bob-2", "bob-3"]);
    assert_eq!(reads(&store).0, 0);

    // A cursor at the durable end, or beyond it: nothing missed, nothing read.
    for after in [durable, 100] {
        let (ids, caught_up) = resume(&store, "alice", after).await?;
        assert!(ids.is_empty());
        assert_eq!(caught_up, after.max(durable));
        assert_eq!(reads(&store), (0, 0));
    }

    // The log read fails: the timeline answers instead, with the same entries.
    store.fail_log_reads.store(true, Ordering::SeqCst);
    let (ids, _) = resume(&store, "alice", 20).await?;
    assert_eq!(ids, ["new-late (late)", "new-last"]);
    let (log_reads, timeline_reads) = reads(&store);
    assert_eq!(log_reads, 1, "the log was tried first");
    assert!(timeline_reads > 0, "then the timeline");
    Ok(())
}

#[tokio::test]
async fn a_resume_that_missed_more_than_a_page_of_entries_reads_the_timeline() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let store = WrappedStore::open(&dir)?;
    let mut offset = -1;
    let history = (0..1500)
        .map(|i| event(&format!("old-{i:04}"), "alice", 10_000 + i))
        .collect();
    apply(&*store, &mut offset, history, true);
    // 1,100 missed, newest first in the log: more than a page of the catch-up.
    let missed: Vec<Envelope> = (0..1100)
        .map(|i| event(&format!("new-{i:04}"), "alice", 20_000 - i))
        .collect();
    apply(&*store, &mut offset, missed, true);
    let (ids, caught_up) = resume(&store, "alice", 1500).await?;
    let expected: Vec<String> = (0..1100).rev().map(|i| format!("new-{i:04}")).collect();
    assert_eq!(ids, expected, "every missed entry, in timeline order");
    assert_eq!(caught_up, 2600);
    let (log_reads, timeline_reads) = reads(&store);
    assert_eq!(
        log_reads, 2,
        "two pages of the log read, then given up: more entries than a page"
    );
    assert!(timeline_reads > 0, "read from the timeline instead");
    Ok(())
}

/// After a resumed catch-up, live entries are late against everything the client holds: the
/// entries up to its cursor too, not only those this connection sent.
#[tokio::test]
async fn a_resumed_watch_flags_live_entries_against_what_the_client_holds() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = WrappedStore::open(&dir)?;
    let mut offset = -1;
    // The client holds sequences 1 and 2 (event times 100 and 200); it missed sequence 3 (150).
    apply(
        &*store,
        &mut offset,
        vec![
            event("held-100", "carol", 100),
            event("held-200", "carol", 200),
        ],
        true,
    );
    apply(
        &*store,
        &mut offset,
        vec![event("missed-150", "carol", 150)],
        true,
    );
    let live = Watchers::new(&store.inner.watch_sender()).subscribe(customer("carol"));
    let mut client = spawn_watch(&store, "carol", 2, live);
    let mut next = async || next_message(&mut client).await;
    let entry_id = |message: &v1::WatchTimelineResponse| match &message.event {
        Some(v1::watch_timeline_response::Event::Entry(entry)) => entry
            .touchpoint
            .as_ref()
            .map(|touchpoint| touchpoint.event_id.clone()),
        _ => None,
    };
    let missed = next().await?;
    assert_eq!(
        (entry_id(&missed).as_deref(), missed.late),
        (Some("missed-150"), true)
    );
    assert!(matches!(
        next().await?.event,
        Some(v1::watch_timeline_response::Event::CaughtUp(_))
    ));
    // 180 sorts before held-200, which this connection never sent; 900 after everything.
    apply(
        &*store,
        &mut offset,
        vec![event("live-180", "carol", 180)],
        true,
    );
    apply(
        &*store,
        &mut offset,
        vec![event("live-900", "carol", 900)],
        true,
    );
    let first = next().await?;
    assert_eq!(
        (entry_id(&first).as_deref(), first.late),
        (Some("live-180"), true)
    );
    let second = next().await?;
    assert_eq!(
        (entry_id(&second).as_deref(), second.late),
        (Some("live-900"), false)
    );
    Ok(())
}

/// Entries flushed between the watch's subscription and its read of the durable end come both in
/// its catch-up and on the feed: the client gets each once, the catch-up's copy, then the live
/// entries after them.
#[tokio::test]
async fn entries_flushed_while_a_watch_starts_come_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = WrappedStore::open(&dir)?;
    let mut offset = -1;
    apply(
        &*store,
        &mut offset,
        vec![event("a", "dora", 100), event("b", "dora", 200)],
        true,
    );
    let live = Watchers::new(&store.inner.watch_sender()).subscribe(customer("dora"));
    // Flushed after the subscription, before the watcher reads the durable end: in both.
    apply(
        &*store,
        &mut offset,
        vec![event("c", "dora", 300), event("x", "other", 300)],
        true,
    );
    apply(&*store, &mut offset, vec![event("d", "dora", 50)], true);
    let mut client = spawn_watch(&store, "dora", 0, live);
    let mut next = async || next_message(&mut client).await;
    let mut seen = Vec::new();
    loop {
        let message = next().await?;
        match message.event {
            Some(v1::watch_timeline_response::Event::Entry(entry)) => {
                seen.push(entry.touchpoint.map(|t| t.event_id).unwrap_or_default());
            }
            Some(v1::watch_timeline_response::Event::CaughtUp(_)) => break,
            None => anyhow::bail!("a message without an event"),
        }
    }
    assert_eq!(
        seen,
        ["d", "a", "b", "c"],
        "the catch-up, in timeline order"
    );
    apply(&*store, &mut offset, vec![event("e", "dora", 400)], true);
    let live_entry = next().await?;
    match live_entry.event {
        Some(v1::watch_timeline_response::Event::Entry(entry)) => assert_eq!(
            entry.touchpoint.map(|t| t.event_id).as_deref(),
            Some("e"),
            "the next live entry, not c or d again"
        ),
        other => anyhow::bail!("expected the live entry e, got {other:?}"),
    }
    Ok(())
}

/// A watch resumed at the end of a long timeline passes over the customer's entries up to its
/// cursor without sending any: a client that went meanwhile ends the watcher before its next page,
/// rather than after a scan of the whole timeline for no one (holding its `query.max-watches`
/// slot and the reads it waits for all along).
#[tokio::test]
async fn a_resumed_watch_whose_client_went_stops_reading_the_timeline() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = WrappedStore::open(&dir)?;
    let mut offset = -1;
    // Three pages of erin's entries (sequences 1..=2500), then as many of another customer's:
    // more events logged since the cursor than erin has entries, so the watcher reads her
    // timeline, not the log.
    for (customer_id, first) in [("erin", 0), ("frank", 2500)] {
        for chunk in (first..first + 2500).collect::<Vec<i64>>().chunks(500) {
            let events = chunk
                .iter()
                .map(|n| event(&format!("e-{n}"), customer_id, *n))
                .collect();
            apply(&*store, &mut offset, events, true);
        }
    }
    store.flush()?;
    reads(&store);
    let (feed, _) = broadcast::channel(16);
    let live = Watchers::new(&feed).subscribe(customer("erin"));
    let slots = Arc::new(tokio::sync::Semaphore::new(1));
    let slot = Arc::clone(&slots).try_acquire_owned()?;
    let open = Arc::new(tokio::sync::Semaphore::new(1)).try_acquire_owned()?;
    let store_dyn: Arc<dyn EventStore> = Arc::clone(&store) as Arc<dyn EventStore>;
    let stream = Watch {
        reads: StoreReads::new(store_dyn, 1),
        customer: customer("erin"),
        after: 2500,
        live,
        shutdown: CancellationToken::new(),
        still_allowed: None,
        stalled_after: touchline_query::watch::STALLED_AFTER,
    }
    .stream(Some(slot), open);
    // The client goes before the watcher has read anything (this test's runtime has one thread:
    // the watcher's task has not run yet).
    drop(stream);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while slots.available_permits() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watcher did not end"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let (log_reads, timeline_reads) = reads(&store);
    assert_eq!(
        (log_reads, timeline_reads),
        (0, 0),
        "no page read for a client that went"
    );
    Ok(())
}
