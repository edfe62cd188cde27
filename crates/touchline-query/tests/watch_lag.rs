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
use touchline_query::watch::{Watch, Watchers, decode_cursor};

fn entry(sequence: u64) -> TimelineEntry {
    entry_of("cust", sequence)
}

fn entry_of(customer: &str, sequence: u64) -> TimelineEntry {
    TimelineEntry {
        partner_id: PartnerId::parse("courier").expect("valid"),
        touchpoint: Touchpoint {
            event_id: EventId::parse(format!("e{sequence}")).expect("valid"),
            customer_id: CustomerId::parse(customer).expect("valid"),
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

/// A watcher of customer "cust" from the start, on a fresh store, fed by `feed`; its client's
/// receiver and the store's log identity.
fn watch(
    dir: &tempfile::TempDir,
    feed: &broadcast::Sender<Arc<[TimelineEntry]>>,
) -> anyhow::Result<(tokio::sync::mpsc::Receiver<Message>, u64)> {
    let store: Arc<dyn EventStore> = Arc::new(SledStore::open(dir.path())?);
    let log = store.log_id();
    let client = Watch {
        reads: StoreReads::new(store, 1),
        customer: customer(),
        after: 0,
        live: Watchers::new(feed).subscribe(customer()),
        shutdown: CancellationToken::new(),
        still_allowed: None,
        stalled_after: touchline_query::watch::STALLED_AFTER,
    }
    .spawn();
    Ok((client, log))
}

fn customer() -> CustomerId {
    CustomerId::parse("cust").expect("valid")
}

type Message = Result<v1::WatchTimelineResponse, tonic::Status>;

/// Reads the watch until it ends with an error (returned), or until `delivered` holds
/// `stop_after` entries (`None` returned): the sequences of the entries delivered are pushed to
/// `delivered`.
async fn read_to_the_end(
    client: &mut tokio::sync::mpsc::Receiver<Message>,
    delivered: &mut Vec<u64>,
    stop_after: Option<usize>,
) -> anyhow::Result<Option<tonic::Status>> {
    loop {
        if stop_after.is_some_and(|count| delivered.len() >= count) {
            return Ok(None);
        }
        match client.recv().await {
            Some(Ok(message)) => {
                if let Some(v1::watch_timeline_response::Event::Entry(entry)) = message.event {
                    delivered.push(entry.position.map_or(0, |p| p.sequence));
                }
            }
            Some(Err(status)) => return Ok(Some(status)),
            None => anyhow::bail!("the watch ended without telling why"),
        }
    }
}

/// Polls `condition` until it holds, for up to 30 s.
async fn wait_until(what: &str, condition: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(10));
    while !condition() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "not within 30 s: {what}"
        );
        poll.tick().await;
    }
    Ok(())
}

/// The resume cursor of a `WATCH_LAGGED` error.
fn lagged_cursor(status: Option<tonic::Status>, log: u64) -> anyhow::Result<u64> {
    let status = status.ok_or_else(|| anyhow::anyhow!("no error"))?;
    assert_eq!(status.code(), Code::Aborted);
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "WATCH_LAGGED");
    let cursor = info.metadata.get("cursor").expect("a cursor");
    Ok(decode_cursor(&customer(), log, cursor).expect("a cursor of this log for this customer"))
}

#[tokio::test]
async fn a_watcher_that_falls_behind_is_told_where_to_resume() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (feed, _) = broadcast::channel(4);
    let (mut client, log) = watch(&dir, &feed)?;
    // The feed never waits for the watcher: 1000 batches go out at once.
    for sequence in 1..=1000 {
        feed.send(Arc::from(vec![entry(sequence)]))?;
    }
    let mut delivered = Vec::new();
    let resume = lagged_cursor(
        read_to_the_end(&mut client, &mut delivered, None).await?,
        log,
    )?;
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
    wait_until("the ended watch is no longer counted as open", || {
        touchline_query::metrics::WATCHES.get() == 0
    })
    .await?;
    assert!(
        delivered.windows(2).all(|pair| pair[0] < pair[1]),
        "entries in log order, none twice"
    );
    a_lagged_watch_resumes_after_the_other_customers_entries_it_read().await?;
    a_watch_whose_customer_outruns_its_client_lags_without_holding_the_feed().await?;
    one_flush_larger_than_the_inbox_is_taken_whole().await
}

/// One flush of more of the customer's entries than an inbox holds (a replay, a backfill) does
/// not end a watch that keeps up: it is taken whole into the empty inbox.
async fn one_flush_larger_than_the_inbox_is_taken_whole() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (feed, _) = broadcast::channel(4);
    let (mut client, _) = watch(&dir, &feed)?;
    feed.send(Arc::from((1..=1500).map(entry).collect::<Vec<_>>()))?;
    let mut delivered = Vec::new();
    let ended = read_to_the_end(&mut client, &mut delivered, Some(1500)).await?;
    assert!(ended.is_none(), "{ended:?}");
    // And the watch goes on.
    feed.send(Arc::from(vec![entry(1501)]))?;
    let ended = read_to_the_end(&mut client, &mut delivered, Some(1501)).await?;
    assert!(ended.is_none(), "{ended:?}");
    assert!(delivered.iter().copied().eq(1..=1501));
    assert_eq!(feed.receiver_count(), 1, "the watcher still reads the feed");
    Ok(())
}

/// The resume cursor of a lagged watch is past the other customers' entries it read after its
/// customer's last one: a resume does not read them again (and stays within the log read).
/// Run by the test above, after its check of the lag counter.
async fn a_lagged_watch_resumes_after_the_other_customers_entries_it_read() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (feed, _) = broadcast::channel(4);
    let (mut client, log) = watch(&dir, &feed)?;
    // Each batch: an entry of the customer, then one of another customer. Three are read, then
    // the feed runs far ahead.
    let batch = |number: u64| -> Arc<[TimelineEntry]> {
        Arc::from(vec![
            entry_of("cust", 2 * number - 1),
            entry_of("other", 2 * number),
        ])
    };
    for number in 1..=3 {
        feed.send(batch(number))?;
    }
    let mut delivered = Vec::new();
    let early = read_to_the_end(&mut client, &mut delivered, Some(3)).await?;
    assert!(early.is_none(), "{early:?}");
    for number in 4..=500 {
        feed.send(batch(number))?;
    }
    let resume = lagged_cursor(
        read_to_the_end(&mut client, &mut delivered, None).await?,
        log,
    )?;
    assert_eq!(delivered, [1, 3, 5]);
    assert_eq!(resume, 6, "the cursor is the end of the last batch read");
    Ok(())
}

/// A watcher's inbox takes its customer's entries off the feed while its client is slow, up to a bound
/// of its own: past it the watch lags (the feed is not held meanwhile), after delivering every
/// entry it took. Run by the first test, after its check of the lag counter.
async fn a_watch_whose_customer_outruns_its_client_lags_without_holding_the_feed()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Room for every flush: only the watcher's own bound can make it lag.
    let (feed, _) = broadcast::channel(4096);
    let (mut client, log) = watch(&dir, &feed)?;
    for sequence in 1..=3000 {
        feed.send(Arc::from(vec![entry(sequence)]))?;
    }
    // The client reads nothing until the watcher let go of the feed (its inbox filled up).
    wait_until("the watcher lets go of the feed", || {
        feed.receiver_count() == 0
    })
    .await?;
    let mut delivered = Vec::new();
    let resume = lagged_cursor(
        read_to_the_end(&mut client, &mut delivered, None).await?,
        log,
    )?;
    assert!(
        delivered.len() < 3000 && delivered.len() >= 1000,
        "{} delivered",
        delivered.len()
    );
    assert!(
        delivered.iter().copied().eq(1..=resume),
        "every entry up to the cursor, once, in order; then the cursor {resume}"
    );
    Ok(())
}
