//! `PublishStream` flow control: a partner that stops reading acknowledgements is pushed back
//! (its sends block) instead of the server buffering without bound; and the `touchline publish`
//! client keeps a window in flight and, after the server goes away mid-stream, reconnects and
//! resends what was not answered, with every event stored exactly once; a stream ends at its first
//! failed batch and publishes nothing after it.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use touchline::stream_client::{PublishOptions, publish};
use touchline_proto::v1::{self, JourneyStage};
use touchline_tests::{
    COURIER, authorized, error_reason, event_ids, ingest_client, partners, records_in_topic,
    start_broker, start_mock_broker, start_node_with, timeline_client, touchpoint,
    wait_for_timeline,
};

/// Opens a stream as the courier, never reads an answer, and sends up to `attempts` batches
/// (`events` of each index) until a send blocks for 3 s: how many went before the server
/// stopped reading.
async fn sent_until_pushed_back(
    ingest: &mut v1::ingest_service_client::IngestServiceClient<tonic::transport::Channel>,
    attempts: usize,
    events: impl Fn(usize) -> Vec<v1::Touchpoint>,
) -> anyhow::Result<usize> {
    let (requests, outgoing) = tokio::sync::mpsc::channel(1);
    // Kept to the end: a stream whose answers are dropped would end.
    let _answers = ingest
        .publish_stream(authorized(ReceiverStream::new(outgoing), COURIER.1))
        .await?;
    let mut sent = 0;
    for batch in 0..attempts {
        // Blocking for a while is the thing under test: once it blocks, the server is not reading.
        match tokio::time::timeout(
            Duration::from_secs(3),
            requests.send(v1::PublishRequest {
                events: events(batch),
                batch_id: batch.to_string(),
            }),
        )
        .await
        {
            Ok(result) => {
                result?;
                sent += 1;
            }
            Err(_) => break,
        }
    }
    Ok(sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_stops_reading_acknowledgements_is_pushed_back() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.stream_window_events = 100;
        config.ingest.max_batch_events = 100;
        config.ingest.rate_per_second = None;
    })
    .await?;
    let mut ingest = ingest_client(&node).await?;
    const ATTEMPTS: usize = 4000;
    let sent = sent_until_pushed_back(&mut ingest, ATTEMPTS, |batch| {
        (0..100)
            .map(|i| {
                touchpoint(
                    &format!("b{batch}-{i}"),
                    &format!("c{i}"),
                    "parcel.scanned",
                    i64::from(i),
                    JourneyStage::Fulfil,
                )
            })
            .collect()
    })
    .await?;
    assert!(
        sent < ATTEMPTS,
        "the partner's sends block once the server stops reading"
    );
    let processed = records_in_topic(&broker).await?;
    // For the log: the answers the server made wait in the partner's HTTP/2 receive window
    // (about 2 MiB with tonic's defaults) and in at most 64 pending answers, not in the server.
    println!("batches the partner could send: {sent}; events the server made durable: {processed}");
    assert!(
        sent * 2 < ATTEMPTS,
        "the partner was stopped well before sending everything: {sent}"
    );
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_client_resends_unanswered_batches_after_the_server_restarts()
-> anyhow::Result<()> {
    let broker = start_mock_broker();
    // The broker is slowed down so that the stream is still busy when the server restarts.
    let mock = broker.mock();
    mock.set_round_trip_time(Duration::from_millis(50))?;
    let dir = tempfile::tempdir()?;
    // A fixed port, so that the client finds the restarted server where it was.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = move |config: &mut touchline::Config| {
        config.server.listen = format!("127.0.0.1:{port}").parse().expect("valid address");
        config.ingest.rate_per_second = None;
    };
    let node = start_node_with(&broker, dir.path(), partners(), listen).await?;
    let endpoint = node.target().clone();
    let events: Vec<(usize, v1::Touchpoint)> = (0..3000)
        .map(|i| {
            (
                i + 1,
                touchpoint(
                    &format!("s-{i}"),
                    &format!("cust-{}", i % 4),
                    "parcel.scanned",
                    i64::try_from(i).unwrap_or_default(),
                    JourneyStage::Fulfil,
                ),
            )
        })
        .collect();
    let expected: BTreeSet<String> = events
        .iter()
        .map(|(_, event)| event.event_id.clone())
        .collect();
    let options = PublishOptions {
        batch_size: 20,
        window: 4,
        max_attempts: 100,
        print_rejections: true,
    };
    let client = tokio::spawn(async move {
        publish(&endpoint, COURIER.1, events.into_iter().map(Ok), &options).await
    });

    // Restart the server while the client is streaming.
    let store = node.store().cloned().expect("a store");
    touchline_tests::wait_until("the client to be streaming", || store.log_len() > 200).await?;
    assert!(!client.is_finished(), "the restart happens mid-stream");
    drop(store);
    node.shutdown().await?;
    let node = start_node_with(&broker, dir.path(), partners(), listen).await?;
    let report = client.await??;
    assert_eq!(
        (report.accepted, report.rejected),
        (3000, 0),
        "every event acknowledged once from the client's side"
    );
    assert!(report.reconnects >= 1, "the client reconnected");

    let mut timeline = timeline_client(&node).await?;
    let mut stored = BTreeSet::new();
    let mut total = 0;
    for customer in 0..4 {
        let entries = wait_for_timeline(&mut timeline, &format!("cust-{customer}"), 750).await?;
        total += entries.len();
        stored.extend(event_ids(&entries));
    }
    assert_eq!(total, 3000, "nothing twice");
    assert_eq!(stored, expected, "nothing lost");
    node.shutdown().await
}

/// `touchline publish` reads its file as the window takes the events: a line that cannot be read
/// (the file changed after its check) ends the run once the batches before it are answered, with
/// an error naming the line and what was accepted; nothing after it is read or published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_client_reads_its_file_as_it_goes_and_stops_at_a_bad_line() -> anyhow::Result<()>
{
    let broker = start_mock_broker();
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.rate_per_second = None;
    })
    .await?;
    let line = |i: usize| {
        format!(
            r#"{{"event_id":"f-{i}","customer_id":"fiona","type":"parcel.scanned","occurred_at":"2026-11-01T10:00:{:02}Z","stage":"fulfil"}}"#,
            i % 60
        )
    };
    let mut text: Vec<String> = (1..=45).map(line).collect();
    text.push("{\"event_id\": 46".to_owned());
    text.extend((47..=50).map(line));
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, text.join("\n"))?;
    let options = PublishOptions {
        batch_size: 10,
        window: 2,
        max_attempts: 3,
        print_rejections: false,
    };
    let events = touchline::client::JsonLines::open(&file)?;
    let stopped = publish(node.target(), COURIER.1, events, &options)
        .await
        .expect_err("line 46 cannot be read");
    let error = format!("{stopped:#}");
    assert!(
        error.contains("45 accepted, 0 rejected") && error.contains("line 46: invalid JSON"),
        "{error}"
    );
    let mut timeline = timeline_client(&node).await?;
    let entries = wait_for_timeline(&mut timeline, "fiona", 45).await?;
    let expected: BTreeSet<String> = (1..=45).map(|i| format!("f-{i}")).collect();
    assert_eq!(
        event_ids(&entries).into_iter().collect::<BTreeSet<_>>(),
        expected
    );
    assert_eq!(entries.len(), 45, "nothing after the bad line");
    node.shutdown().await
}

/// A stream ends at its first failed batch, and no batch after it is published: nothing reaches
/// Kafka without an answer the partner can see. The batch after the failed one is read (the
/// partner sent it) while the one before it is still being made durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_after_a_failed_batch_of_a_stream_is_published() -> anyhow::Result<()> {
    let broker = start_mock_broker();
    let mock = broker.mock();
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.rate_per_second = None;
    })
    .await?;
    let mut ingest = ingest_client(&node).await?;
    let event = |id: &str, second: i64| {
        touchpoint(id, "nadia", "parcel.scanned", second, JourneyStage::Fulfil)
    };
    let batch = |id: &str, events: Vec<v1::Touchpoint>| v1::PublishRequest {
        events,
        batch_id: id.to_owned(),
    };
    // Kafka answers slowly: the first batch is still in flight when the others arrive.
    mock.set_round_trip_time(Duration::from_millis(300))?;
    let requests = vec![
        batch("a", vec![event("a", 1)]),
        batch("b", Vec::new()),
        batch("c", vec![event("c", 3)]),
    ];
    let mut answers = ingest
        .publish_stream(authorized(futures::stream::iter(requests), COURIER.1))
        .await?
        .into_inner();
    assert_eq!(
        answers.message().await?.map(|answer| answer.accepted),
        Some(1)
    );
    let ended = answers
        .message()
        .await
        .expect_err("the stream ends at the empty batch");
    assert_eq!(error_reason(&ended).as_deref(), Some("BATCH_EMPTY"));
    mock.set_round_trip_time(Duration::ZERO)?;

    // A later event of the same customer, in the same partition: it is projected after "c" would
    // have been.
    assert_eq!(
        touchline_tests::publish(&mut ingest, COURIER.1, vec![event("d", 4)])
            .await?
            .accepted,
        1
    );
    let mut timeline = timeline_client(&node).await?;
    let entries = wait_for_timeline(&mut timeline, "nadia", 2).await?;
    assert_eq!(
        event_ids(&entries),
        ["a", "d"],
        "the batch after the failed one was published"
    );
    node.shutdown().await
}

/// A stream's window also counts bytes: batches that wait for the partner's rate hold their
/// decoded requests, so a partner sending large batches into a rate debt is pushed back once they
/// fill `ingest.stream-window-bytes`, long before the 64 batches its window of events would admit
/// (each of these holds 600 KB: 64 of them would be about 38 MB in the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_waiting_for_the_rate_fill_the_window_of_bytes() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.max_message_bytes = 1 << 20;
        config.ingest.stream_window_bytes = 1 << 20;
        // One event a second: every batch after the first waits for the rate, holding itself.
        config.ingest.rate_per_second = Some(1.0);
        config.ingest.burst = 1.0;
    })
    .await?;
    let mut ingest = ingest_client(&node).await?;
    let sent = sent_until_pushed_back(&mut ingest, 100, |batch| {
        (0..40)
            .map(|i| {
                let mut event = touchpoint(
                    &format!("big{batch}-{i}"),
                    "big-customer",
                    "parcel.scanned",
                    i64::from(i),
                    JourneyStage::Fulfil,
                );
                event.payload = vec![7; 15 * 1024];
                event
            })
            .collect()
    })
    .await?;
    // One batch admitted (a second does not fit 1 MiB), and what HTTP/2's windows hold.
    println!("600 KB batches the partner could send: {sent}");
    assert!(
        sent < 20,
        "the partner is pushed back by the window of bytes, not after 64 waiting batches: {sent}"
    );
    node.shutdown().await
}

/// A stream's window of bytes counts what its batches hold once decoded, not their encoded size:
/// an event of 60,000 attributes of three letters is about 420 KB on the wire and several MB once
/// decoded, so a 64 MiB window admits about ten of them (by their encoded size it admitted about
/// 150, a gigabyte of memory). A unary call of the same request, larger once decoded than all of
/// `ingest.max-in-flight-bytes`, is charged all of them and answered (its event rejected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_of_bytes_count_what_batches_hold_once_decoded() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.ingest.max_message_bytes = 1 << 20;
        config.ingest.stream_window_bytes = 64 << 20;
        config.ingest.max_in_flight_bytes = 1 << 20;
        // An event every 20 s: every batch waits for the rate, holding itself, longer than the
        // test sends.
        config.ingest.rate_per_second = Some(0.05);
        config.ingest.burst = 1.0;
    })
    .await?;
    let mut ingest = ingest_client(&node).await?;
    let amplified = |id: String| {
        let mut event = touchpoint(&id, "wide", "parcel.scanned", 1, JourneyStage::Fulfil);
        event.attributes = (0..60_000)
            .map(|i| (format!("{i:04x}"), String::new()))
            .collect();
        vec![event]
    };
    let answered =
        touchline_tests::publish(&mut ingest, COURIER.1, amplified("unary".to_owned())).await?;
    assert_eq!(
        (answered.accepted, answered.rejected),
        (0, 1),
        "a request larger than the budget is charged all of it and answered"
    );
    let sent =
        sent_until_pushed_back(&mut ingest, 100, |batch| amplified(format!("w{batch}"))).await?;
    println!("420 KB batches of several MB decoded the partner could send: {sent}");
    assert!(
        sent < 30,
        "the window counts decoded bytes: pushed back after about ten batches, not {sent}"
    );
    node.shutdown().await
}
