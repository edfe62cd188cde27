//! Credentials: no token, a wrong token, a revoked token (removed from the partners file, reloaded
//! without a restart), an expired rotation token, both tokens valid during a rotation, a bad
//! partners file that keeps the previous one in force, and tokens that never appear in logs or
//! error messages; query tokens for the `TimelineService`; admin and query tokens that follow the
//! configuration file without a restart.

use std::io::Write as _;
use std::sync::{Arc, Mutex};

use tonic::Code;
use touchline_ingest::{PartnerDirectory, hash_token};
use touchline_proto::v1::{self, JourneyStage};
use touchline_tests::{
    error_reason, ingest_client, publish, start_broker, start_node_with, touchpoint, wait_until,
};

const OLD: &str = "old-token-of-the-courier-7f3a";
const NEW: &str = "new-token-of-the-courier-91bc";
const EXPIRED: &str = "expired-token-of-the-courier-55d0";

fn partners_file(tokens: &[&str]) -> String {
    partners_file_of("swift-courier", tokens)
}

/// The partners file of one partner, `id`, with `tokens` and an expired rotation token.
fn partners_file_of(id: &str, tokens: &[&str]) -> String {
    format!(
        "[[partner]]\nid = \"{id}\"\ntoken-sha256 = [{}]\ntokens = [{{ sha256 = \"{}\", expires-at = \"2020-01-01T00:00:00Z\" }}]\n",
        tokens
            .iter()
            .map(|token| format!("\"{}\"", hash_token(token)))
            .collect::<Vec<_>>()
            .join(", "),
        hash_token(EXPIRED),
    )
}

/// `touchline_auth_failures_total{service="ingest",reason}`.
fn auth_failures(reason: &'static str) -> u64 {
    touchline_ingest::metrics::INGEST
        .auth_failures
        .get_or_create(&touchline_ingest::metrics::AuthLabels {
            service: "ingest",
            reason,
        })
        .get()
}

/// A `PublishStream` opened with `token`: where its batches go, and its answers.
async fn open_stream(
    ingest: &mut touchline_proto::v1::ingest_service_client::IngestServiceClient<
        tonic::transport::Channel,
    >,
    token: &str,
) -> anyhow::Result<(
    tokio::sync::mpsc::Sender<v1::PublishRequest>,
    tonic::Streaming<v1::PublishResponse>,
)> {
    let (sender, requests) = tokio::sync::mpsc::channel::<v1::PublishRequest>(4);
    let answers = ingest
        .publish_stream(touchline_tests::authorized(
            tokio_stream::wrappers::ReceiverStream::new(requests),
            token,
        ))
        .await?
        .into_inner();
    Ok((sender, answers))
}

/// Everything the code under test logs on this thread.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// A current-thread runtime, so that the node's tasks log through this test's subscriber.
#[tokio::test(flavor = "current_thread")]
async fn tokens_rotate_expire_and_are_revoked_without_a_restart_and_never_leak()
-> anyhow::Result<()> {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_env_filter("trace,h2=info,hyper=info,tower=info")
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("partners.toml");
    std::fs::write(&path, partners_file(&[OLD, NEW]))?;
    let node = start_node_with(&broker, dir.path(), PartnerDirectory::load(&path)?, |_| {}).await?;
    let mut ingest = ingest_client(&node).await?;
    let event = |id: &str| {
        vec![touchpoint(
            id,
            "ivan",
            "parcel.scanned",
            1,
            JourneyStage::Fulfil,
        )]
    };

    // During a rotation both tokens work.
    assert_eq!(publish(&mut ingest, OLD, event("a")).await?.accepted, 1);
    assert_eq!(publish(&mut ingest, NEW, event("b")).await?.accepted, 1);
    // No token, a wrong token, an expired rotation token.
    let none = ingest
        .publish(tonic::Request::new(v1::PublishRequest {
            events: event("c"),
            batch_id: String::new(),
        }))
        .await
        .expect_err("refused");
    assert_eq!(
        (none.code(), error_reason(&none).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_MISSING"))
    );
    let wrong = publish(&mut ingest, "not-a-token-at-all", event("c"))
        .await
        .expect_err("refused");
    assert_eq!(
        (wrong.code(), error_reason(&wrong).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_INVALID"))
    );
    let expired = publish(&mut ingest, EXPIRED, event("c"))
        .await
        .expect_err("refused");
    assert_eq!(
        (expired.code(), error_reason(&expired).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_EXPIRED"))
    );
    // Each refusal is counted for the on-call (process-wide: at least these).
    for reason in ["TOKEN_MISSING", "TOKEN_INVALID", "TOKEN_EXPIRED"] {
        assert!(
            touchline_tests::auth_failures("ingest", reason) >= 1,
            "{reason}"
        );
    }

    // Revoke the old token: the file is reloaded when it changes, without a restart.
    std::fs::write(&path, partners_file(&[NEW]))?;
    let mut revoked = None;
    let mut client = ingest.clone();
    let deadline = tokio::time::Instant::now() + touchline_tests::DEADLINE;
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(100));
    while revoked.is_none() && tokio::time::Instant::now() < deadline {
        poll.tick().await;
        if let Err(status) = publish(&mut client, OLD, event("d")).await {
            revoked = Some(status);
        }
    }
    let revoked = revoked.expect("the revoked token is refused after the reload");
    assert_eq!(
        (revoked.code(), error_reason(&revoked).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_INVALID"))
    );
    assert_eq!(publish(&mut ingest, NEW, event("e")).await?.accepted, 1);

    // A broken file keeps the previous one in force, with a logged error.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)?
        .write_all(b"\n[[partner]\nthis is not toml")?;
    let log_text = || {
        String::from_utf8_lossy(&logs.0.lock().map(|bytes| bytes.clone()).unwrap_or_default())
            .into_owned()
    };
    wait_until("the reload error to be logged", || {
        log_text().contains("partners file not reloaded")
    })
    .await?;
    assert_eq!(
        publish(&mut ingest, NEW, event("f")).await?.accepted,
        1,
        "the previous file stays in force"
    );
    // And the metrics say so (process-wide: no other test of this binary breaks a file).
    let reloads = |result| {
        touchline_ingest::metrics::INGEST
            .partner_reloads
            .get_or_create(&touchline_ingest::metrics::ReloadLabels { result })
            .get()
    };
    assert!(reloads("failed") >= 1 && reloads("ok") >= 1);
    assert_eq!(touchline_ingest::metrics::INGEST.partners.get(), 1);

    // Tokens appear in no log line and no error message.
    let text = log_text();
    assert!(text.contains("partners file reloaded"), "the capture works");
    for token in [OLD, NEW, EXPIRED, "not-a-token-at-all"] {
        assert!(!text.contains(token), "a token leaked into the logs");
    }
    for status in [&none, &wrong, &expired, &revoked] {
        assert!(
            ![OLD, NEW, EXPIRED, "not-a-token-at-all"]
                .iter()
                .any(|token| status.message().contains(token))
        );
    }
    // SIGHUP reloads too: bring the old token back and signal (the shell's own `kill`). The
    // file keeps its old modification time, as `cp -p` would; the checks every 2 s see the
    // change anyway (its status-change time moved), so this shows that the process's signal
    // reaches the watcher (its log line), and that the token comes back; that a hangup reloads
    // even an unchanged file is the unit test of `watch_file`.
    let modified = std::fs::metadata(&path)?.modified()?;
    std::fs::write(&path, partners_file(&[OLD, NEW]))?;
    std::fs::File::options()
        .write(true)
        .open(&path)?
        .set_modified(modified)?;
    let status = std::process::Command::new("sh")
        .args([
            "-c",
            "kill -HUP \"$1\"",
            "sh",
            &std::process::id().to_string(),
        ])
        .status()?;
    assert!(status.success());
    wait_until("the SIGHUP reload", || {
        log_text().contains("SIGHUP: reloading the partners file")
    })
    .await?;
    let mut restored = false;
    let deadline = tokio::time::Instant::now() + touchline_tests::DEADLINE;
    while !restored && tokio::time::Instant::now() < deadline {
        poll.tick().await;
        restored = publish(&mut client, OLD, event("g")).await.is_ok();
    }
    assert!(restored, "the token is valid again after the SIGHUP reload");
    node.shutdown().await
}

/// A stream is authenticated again at each batch: revoking its token ends it at its next batch,
/// without a restart and without waiting for the partner to reconnect; a stream that sends
/// nothing more ends too, within about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_ends_its_open_stream_at_the_next_batch() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("partners.toml");
    std::fs::write(&path, partners_file(&[OLD, NEW]))?;
    let directory = PartnerDirectory::load(&path)?;
    let node = start_node_with(&broker, dir.path(), directory.clone(), |_| {}).await?;
    let mut ingest = ingest_client(&node).await?;
    let batch = |id: &str| v1::PublishRequest {
        events: vec![touchpoint(
            id,
            "ivan",
            "parcel.scanned",
            1,
            JourneyStage::Fulfil,
        )],
        batch_id: id.to_owned(),
    };
    let (sender, mut answers) = open_stream(&mut ingest, OLD).await?;
    sender.send(batch("s-1")).await?;
    assert_eq!(
        answers.message().await?.map(|answer| answer.accepted),
        Some(1)
    );
    // A second stream of the token, idle after its first batch.
    let (idle_sender, mut idle_answers) = open_stream(&mut ingest, OLD).await?;
    idle_sender.send(batch("s-idle")).await?;
    assert_eq!(
        idle_answers.message().await?.map(|answer| answer.accepted),
        Some(1)
    );
    // A third, whose next batch is malformed (no events).
    let (empty_sender, mut empty_answers) = open_stream(&mut ingest, OLD).await?;

    std::fs::write(&path, partners_file(&[NEW]))?;
    directory.reload()?;
    // The stream may already have ended on its own check: the batch is then not sent at all.
    let _ = sender.send(batch("s-2")).await;
    let _ = empty_sender
        .send(v1::PublishRequest {
            events: Vec::new(),
            batch_id: "s-empty".to_owned(),
        })
        .await;
    for (answers, what) in [
        (&mut answers, "a batch"),
        (&mut empty_answers, "an empty batch"),
    ] {
        let ended = tokio::time::timeout(touchline_tests::DEADLINE, answers.message())
            .await?
            .expect_err("the stream ends");
        // The token is checked first, as a unary call's is: not BATCH_EMPTY.
        assert_eq!(
            (ended.code(), error_reason(&ended).as_deref()),
            (Code::Unauthenticated, Some("TOKEN_INVALID")),
            "{what}"
        );
    }
    // The idle stream ends without a batch of its own, counted as an authentication failure.
    let failures_before = auth_failures("TOKEN_INVALID");
    let ended = tokio::time::timeout(touchline_tests::DEADLINE, idle_answers.message())
        .await?
        .expect_err("the idle stream ends");
    assert_eq!(
        (ended.code(), error_reason(&ended).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_INVALID"))
    );
    assert!(auth_failures("TOKEN_INVALID") > failures_before);
    drop(idle_sender);
    assert_eq!(
        publish(&mut ingest, NEW, batch("s-3").events)
            .await?
            .accepted,
        1
    );
    let mut timeline = touchline_tests::timeline_client(&node).await?;
    let entries = touchline_tests::wait_for_timeline(&mut timeline, "ivan", 3).await?;
    assert_eq!(
        touchline_tests::event_ids(&entries),
        ["s-1", "s-idle", "s-3"],
        "the batch sent after the revocation was not written"
    );
    node.shutdown().await
}

/// Partners `OLD` and `NEW` of one partner paced at `rate` events a second with a burst of one.
fn paced(tokens: &[&str], rate: f64) -> String {
    partners_file(tokens) + &format!("rate-per-second = {rate}\nburst = 1\n")
}

/// A node whose partner is paced at one event per 100 s (nothing refills the bucket while a test
/// runs), and a stream of `OLD` whose second batch (10 events: 1,000 s of the rate, far past the
/// deadline) waits for the rate; then the partners file becomes `then`. The stream's next answer
/// (within the deadline), and the records in the topic after it.
async fn a_batch_waiting_for_the_rate_when(
    then: String,
) -> anyhow::Result<(Result<Option<v1::PublishResponse>, tonic::Status>, i64)> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("partners.toml");
    std::fs::write(&path, paced(&[OLD, NEW], 0.01))?;
    let directory = PartnerDirectory::load(&path)?;
    let node = start_node_with(&broker, dir.path(), directory.clone(), |_| {}).await?;
    let mut ingest = ingest_client(&node).await?;
    let batch = |first: usize, count: usize| v1::PublishRequest {
        events: (first..first + count)
            .map(|n| {
                touchpoint(
                    &format!("w-{n}"),
                    "ivan",
                    "parcel.scanned",
                    1,
                    JourneyStage::Fulfil,
                )
            })
            .collect(),
        batch_id: format!("w-{first}"),
    };
    let (sender, mut answers) = open_stream(&mut ingest, OLD).await?;
    // The burst of one: published at once, leaving the bucket empty.
    sender.send(batch(0, 1)).await?;
    assert_eq!(
        answers.message().await?.map(|answer| answer.accepted),
        Some(1)
    );
    // Charged (and waiting) once a unary call of the partner is refused with a retry delay that
    // only this debt gives.
    sender.send(batch(1, 10)).await?;
    touchline_tests::wait_until_rate_owes(
        &mut ingest,
        NEW,
        || batch(100, 2).events,
        std::time::Duration::from_secs(500),
    )
    .await?;
    std::fs::write(&path, then)?;
    directory.reload()?;
    let answer = tokio::time::timeout(touchline_tests::DEADLINE, answers.message())
        .await
        .map_err(|_| anyhow::anyhow!("the waiting batch held the stream past the reload"))?;
    let records = touchline_tests::records_in_topic(&broker).await?;
    node.shutdown().await?;
    Ok((answer, records))
}

/// A stream batch waiting for its partner's rate (it can wait long: a partner far over its rate
/// pays for every event) ends the stream when its token is revoked meanwhile, within a second or
/// so of the reload, not once the wait is over; it publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_ends_a_stream_whose_batch_waits_for_the_rate() -> anyhow::Result<()> {
    let failures_before = auth_failures("TOKEN_INVALID");
    let (answer, records) = a_batch_waiting_for_the_rate_when(paced(&[NEW], 0.01)).await?;
    let ended = answer.expect_err("the stream ends");
    assert_eq!(
        (ended.code(), error_reason(&ended).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_INVALID"))
    );
    // Counted as a stream its revoked token ended.
    assert!(auth_failures("TOKEN_INVALID") > failures_before);
    assert_eq!(records, 1, "the waiting batch was not published");
    Ok(())
}

/// A rate raised while a stream batch waits for the old one applies to what it still owes: it is
/// published within a second or so of the reload, not once the old rate is paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_rate_applies_to_a_stream_batch_that_waits_for_the_old_one() -> anyhow::Result<()>
{
    let (answer, records) = a_batch_waiting_for_the_rate_when(paced(&[OLD, NEW], 1000.0)).await?;
    assert_eq!(answer?.map(|answer| answer.accepted), Some(10));
    assert_eq!(records, 11);
    Ok(())
}

/// A unary `Publish` of `token` whose message (its body) goes only once released (or never, when
/// the sender is dropped): sent as a client stream of one message on the unary method's path,
/// the same on the wire. It holds its partner's call slot meanwhile.
/// Waits until a probe of the partner is shed with `TOO_MANY_CALLS` while `held` (from
/// [`hold_unary_call`]) holds the partner's one slot; `held` back. When the wait fails, its error
/// says how `held` ended, if it did (a flaky failure on Tansu once could not tell).
async fn held_the_slot(
    channel: &tonic::transport::Channel,
    held: tokio::task::JoinHandle<Result<tonic::Response<Vec<u8>>, tonic::Status>>,
) -> anyhow::Result<tokio::task::JoinHandle<Result<tonic::Response<Vec<u8>>, tonic::Status>>> {
    match touchline_tests::wait_until_shed(channel, NEW, "TOO_MANY_CALLS", || !held.is_finished())
        .await
    {
        Ok(_) => Ok(held),
        Err(error) if held.is_finished() => {
            let ended = held.await;
            Err(error.context(format!("the held call ended: {ended:?}")))
        }
        Err(error) => Err(error),
    }
}

async fn hold_unary_call(
    channel: &tonic::transport::Channel,
    token: &str,
) -> anyhow::Result<(
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<tonic::Response<Vec<u8>>, tonic::Status>>,
)> {
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let request = v1::PublishRequest {
        events: vec![touchpoint(
            "u-1",
            "ivan",
            "parcel.scanned",
            1,
            JourneyStage::Fulfil,
        )],
        batch_id: String::new(),
    };
    let body = futures::stream::once(async move {
        let _ = released.await;
        prost::Message::encode_to_vec(&request)
    });
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let token = token.to_owned();
    let held = tokio::spawn(async move {
        grpc.client_streaming(
            touchline_tests::authorized(body, &token),
            http::uri::PathAndQuery::from_static("/touchline.v1.IngestService/Publish"),
            touchline_tests::RawCodec,
        )
        .await
    });
    Ok((release, held))
}

/// A stream batch waiting for its partner's share of the calls (the one slot a unary call holds
/// while its body does not come) ends the stream when its token is revoked meanwhile, within a
/// second or so, not once the slot comes; it publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_ends_a_stream_whose_batch_waits_for_a_call_slot() -> anyhow::Result<()> {
    // A partner of this test alone: the gauge of its waiting batches counts this stream's.
    const PARTNER: &str = "slot-courier";
    let file = |tokens: &[&str]| partners_file_of(PARTNER, tokens);
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("partners.toml");
    std::fs::write(&path, file(&[OLD, NEW]))?;
    let directory = PartnerDirectory::load(&path)?;
    let node = start_node_with(&broker, dir.path(), directory.clone(), |config| {
        config.ingest.max_calls_per_partner = 1;
        // The held call keeps the partner's one slot far past the deadline below.
        config.ingest.request_body_timeout_ms = 300_000;
    })
    .await?;
    let channel = node.target().connect().await?;
    let (_release, held) = hold_unary_call(&channel, NEW).await?;
    let held = held_the_slot(&channel, held).await?;
    let mut ingest = ingest_client(&node).await?;
    let (sender, mut answers) = open_stream(&mut ingest, OLD).await?;
    sender
        .send(v1::PublishRequest {
            events: vec![touchpoint(
                "slot-1",
                "ivan",
                "parcel.scanned",
                1,
                JourneyStage::Fulfil,
            )],
            batch_id: "slot-1".to_owned(),
        })
        .await?;
    // Admitted (its token checked), and waiting for the slot.
    let waiting = || {
        touchline_ingest::metrics::INGEST
            .stream_batches_waiting
            .get_or_create(&touchline_ingest::metrics::PartnerLabels {
                partner: PARTNER.to_owned(),
            })
            .get()
    };
    wait_until("the stream's batch waits for the slot", || waiting() == 1).await?;
    std::fs::write(&path, file(&[NEW]))?;
    directory.reload()?;
    let ended = tokio::time::timeout(touchline_tests::DEADLINE, answers.message())
        .await
        .map_err(|_| anyhow::anyhow!("the waiting batch held the stream past the revocation"))?
        .expect_err("the stream ends");
    assert_eq!(
        (ended.code(), error_reason(&ended).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_INVALID"))
    );
    assert!(!held.is_finished(), "the slot was still held");
    assert_eq!(waiting(), 0, "the batch no longer waits");
    assert_eq!(
        touchline_tests::records_in_topic(&broker).await?,
        0,
        "nothing was published"
    );
    // The held call goes (its body would publish it): the shutdown need not wait for it.
    held.abort();
    node.shutdown().await
}

/// A unary `Publish` is authenticated at its headers, and again once its body has come (which
/// may take up to `ingest.request-body-timeout-ms`): a token revoked meanwhile publishes nothing
/// (`TOKEN_INVALID`), as a stream's next batch publishes nothing. Before, the call was published
/// as authenticated at its headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_whose_token_is_revoked_before_its_body_came_publishes_nothing()
-> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("partners.toml");
    std::fs::write(&path, partners_file(&[OLD, NEW]))?;
    let directory = PartnerDirectory::load(&path)?;
    let node = start_node_with(&broker, dir.path(), directory.clone(), |config| {
        // The held call takes the partner's only slot: a probe shed with TOO_MANY_CALLS says
        // that the call's headers were taken.
        config.ingest.max_calls_per_partner = 1;
    })
    .await?;
    let channel = node.target().connect().await?;
    let (release, held) = hold_unary_call(&channel, OLD).await?;
    let held = held_the_slot(&channel, held).await?;

    std::fs::write(&path, partners_file(&[NEW]))?;
    directory.reload()?;
    let _ = release.send(());
    let refused = tokio::time::timeout(touchline_tests::DEADLINE, held)
        .await??
        .expect_err("the call is refused");
    assert_eq!(
        (refused.code(), error_reason(&refused).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_INVALID")),
        "{refused:?}"
    );
    assert_eq!(
        touchline_tests::records_in_topic(&broker).await?,
        0,
        "nothing was published"
    );
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_query_tokens_configured_the_timeline_service_needs_one() -> anyhow::Result<()> {
    const QUERY: &str = "query-token-of-the-crm-3e1d";
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), touchline_tests::partners(), |config| {
        config.query.token_sha256 = vec![hash_token(QUERY)];
    })
    .await?;
    let mut ingest = ingest_client(&node).await?;
    publish(
        &mut ingest,
        touchline_tests::COURIER.1,
        vec![touchpoint(
            "q-1",
            "ida",
            "parcel.scanned",
            0,
            JourneyStage::Fulfil,
        )],
    )
    .await?;
    let mut timeline = touchline_tests::timeline_client(&node).await?;
    let request = || v1::GetTimelineRequest {
        customer_id: "ida".to_owned(),
        page_size: 10,
        ..Default::default()
    };

    for (token, expected, what) in [
        (None, (Code::Unauthenticated, "TOKEN_MISSING"), "no token"),
        (
            Some(touchline_tests::COURIER.1),
            (Code::PermissionDenied, "INTERNAL_ONLY"),
            "a partner's token",
        ),
        (
            Some("not-a-token"),
            (Code::Unauthenticated, "TOKEN_INVALID"),
            "an unknown token",
        ),
    ] {
        let call = match token {
            Some(token) => touchline_tests::authorized(request(), token),
            None => tonic::Request::new(request()),
        };
        let refused = timeline.get_timeline(call).await.expect_err(what);
        assert_eq!(
            (refused.code(), error_reason(&refused).as_deref()),
            (expected.0, Some(expected.1)),
            "{what}"
        );
    }
    let watch = timeline
        .watch_timeline(v1::WatchTimelineRequest {
            customer_id: "ida".to_owned(),
            cursor: String::new(),
        })
        .await
        .expect_err("watching needs the token too");
    assert_eq!(watch.code(), Code::Unauthenticated);

    // With the token: the timeline (once the event is projected) and the summary.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(5));
    loop {
        poll.tick().await;
        let page = timeline
            .get_timeline(touchline_tests::authorized(request(), QUERY))
            .await?
            .into_inner();
        if page.entries.len() == 1 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the event was never projected"
        );
    }
    let summary = timeline
        .get_customer_summary(touchline_tests::authorized(
            v1::GetCustomerSummaryRequest {
                customer_id: "ida".to_owned(),
            },
            QUERY,
        ))
        .await?
        .into_inner();
    assert_eq!(summary.total_touchpoints, 1);
    node.shutdown().await
}

/// The admin and query tokens follow the node's configuration file while it runs: once the file
/// names new ones, they are accepted and the ones it no longer names are refused (a live timeline
/// opened with one ends); a file that does not load changes nothing, nor does one that would
/// empty a list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_query_tokens_follow_the_configuration_file_without_a_restart()
-> anyhow::Result<()> {
    const QUERY_OLD: &str = "query-token-before-the-rotation-1b7c";
    const QUERY_NEW: &str = "query-token-after-the-rotation-8d2e";
    const ADMIN_NEW: &str = "admin-token-after-the-rotation-4f90";
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let mut running = touchline_tests::config(&broker, dir.path());
    running.query.token_sha256 = vec![hash_token(QUERY_OLD)];
    let node = touchline::Node::start(
        running.clone(),
        touchline::BrokerChoice::External,
        touchline_tests::partners(),
    )
    .await?;
    let file = dir.path().join("touchline.toml");
    let write = |config: &touchline::Config| -> anyhow::Result<()> {
        // Written aside and renamed, as a ConfigMap or Secret volume updates its files.
        let aside = dir.path().join("touchline.toml.new");
        std::fs::write(&aside, toml::to_string(config)?)?;
        std::fs::rename(&aside, &file)?;
        Ok(())
    };
    write(&running)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let loaded = file.clone();
    let watching = tokio::spawn(touchline::access::watch_config(
        file.clone(),
        touchline_ingest::files::stamp(&file),
        move || touchline::Config::load(Some(&loaded)),
        node.access().clone(),
        running.clone(),
        stop.clone(),
    ));

    let mut admin = touchline_tests::admin_client(&node).await?;
    let mut timeline = touchline_tests::timeline_client(&node).await?;
    let status = |token: &str| touchline_tests::authorized(v1::GetStatusRequest {}, token);
    let summary = |token: Option<&str>| {
        let request = v1::GetCustomerSummaryRequest {
            customer_id: "nobody".to_owned(),
        };
        match token {
            Some(token) => touchline_tests::authorized(request, token),
            None => tonic::Request::new(request),
        }
    };
    // Authorized calls for a customer without touchpoints answer NOT_FOUND; refused ones
    // UNAUTHENTICATED.
    let query_code = async |timeline: &mut v1::timeline_service_client::TimelineServiceClient<
        tonic::transport::Channel,
    >,
                            token: Option<&str>| {
        match timeline.get_customer_summary(summary(token)).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        }
    };
    assert!(
        admin
            .get_status(status(touchline_tests::ADMIN_TOKEN))
            .await
            .is_ok()
    );
    assert_eq!(
        query_code(&mut timeline, Some(QUERY_OLD)).await,
        Code::NotFound
    );

    // Opens a live timeline with `token` and reads it up to `caught_up`.
    let caught_up_watch =
        async |timeline: &mut v1::timeline_service_client::TimelineServiceClient<
            tonic::transport::Channel,
        >,
               token: &str|
               -> anyhow::Result<tonic::Streaming<v1::WatchTimelineResponse>> {
            let mut watch = timeline
                .watch_timeline(touchline_tests::authorized(
                    v1::WatchTimelineRequest {
                        customer_id: "nobody".to_owned(),
                        cursor: String::new(),
                    },
                    token,
                ))
                .await?
                .into_inner();
            let caught_up = tokio::time::timeout(touchline_tests::DEADLINE, watch.message())
                .await??
                .and_then(|message| message.event);
            assert!(
                matches!(
                    caught_up,
                    Some(v1::watch_timeline_response::Event::CaughtUp(_))
                ),
                "{caught_up:?}"
            );
            Ok(watch)
        };
    // A live timeline opened with the old query token, running across the rotation.
    let mut watch = caught_up_watch(&mut timeline, QUERY_OLD).await?;

    // The rotation: new admin and query tokens, the old ones gone.
    let mut rotated = running.clone();
    rotated.admin.token_sha256 = vec![hash_token(ADMIN_NEW)];
    rotated.query.token_sha256 = vec![hash_token(QUERY_NEW)];
    write(&rotated)?;
    // Until the new admin token is accepted (not a count of reloads: another test of this
    // process sends it SIGHUP, which reloads the file in force too).
    let deadline = tokio::time::Instant::now() + touchline_tests::DEADLINE;
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(50));
    while admin.get_status(status(ADMIN_NEW)).await.is_err() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the rotated file was never loaded"
        );
        poll.tick().await;
    }
    let refused = admin
        .get_status(status(touchline_tests::ADMIN_TOKEN))
        .await
        .expect_err("the old admin token is gone");
    assert_eq!(error_reason(&refused).as_deref(), Some("TOKEN_INVALID"));
    assert_eq!(
        query_code(&mut timeline, Some(QUERY_NEW)).await,
        Code::NotFound
    );
    assert_eq!(
        query_code(&mut timeline, Some(QUERY_OLD)).await,
        Code::Unauthenticated
    );
    // The watch opened with the old token ends, as a new call with it is refused.
    let ended = tokio::time::timeout(touchline_tests::DEADLINE, watch.message())
        .await?
        .expect_err("the watch of a revoked token ends");
    assert_eq!(
        (ended.code(), error_reason(&ended).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_INVALID"))
    );

    // A live timeline opened with the new token goes on through the checks (a second apart).
    let mut kept = caught_up_watch(&mut timeline, QUERY_NEW).await?;

    // A file that does not load (an unknown key) keeps the tokens in force.
    let failed_before = reloads("failed");
    std::fs::write(&file, "[query]\nno-such-key = 1\n")?;
    wait_until("the broken file is read", || {
        reloads("failed") > failed_before
    })
    .await?;
    assert!(admin.get_status(status(ADMIN_NEW)).await.is_ok());
    assert_eq!(
        query_code(&mut timeline, Some(QUERY_NEW)).await,
        Code::NotFound
    );

    // A file without query tokens (one cut short while written, say) is refused: emptying the
    // list would open the service to anyone; that takes a restart.
    let failed_before = reloads("failed");
    let mut open = rotated.clone();
    open.query.token_sha256.clear();
    write(&open)?;
    wait_until("the file without query tokens is refused", || {
        reloads("failed") > failed_before
    })
    .await?;
    assert_eq!(
        query_code(&mut timeline, None).await,
        Code::Unauthenticated,
        "still closed"
    );
    assert_eq!(
        query_code(&mut timeline, Some(QUERY_NEW)).await,
        Code::NotFound
    );
    // Several checks later (the steps above took seconds), the watch of a valid token is open.
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(1500), kept.message())
            .await
            .is_err(),
        "the watch of a valid token neither ended nor got anything"
    );
    stop.cancel();
    watching.await?;
    node.shutdown().await
}

/// Reloads of the configuration's tokens with `result`, process-wide.
fn reloads(result: &'static str) -> u64 {
    touchline::access::reloads(result)
}

/// A node's shutdown serves calls during its delay (load balancers are told first): the partners
/// file is still followed then, so a token revoked during the delay is refused. (Its reload
/// stopped with health and metrics at the shutdown's start before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_during_the_shutdown_delay_is_refused() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("partners.toml");
    std::fs::write(&path, partners_file(&[OLD, NEW]))?;
    let directory = PartnerDirectory::load(&path)?;
    // Ten seconds: the file is polled every two.
    let node = start_node_with(&broker, dir.path(), directory, |config| {
        config.server.shutdown_delay_ms = 10_000;
    })
    .await?;
    touchline_tests::wait_for_health(&node, "", true).await?;
    let target = node.target().clone();
    let mut ingest = ingest_client(&node).await?;
    let event = |n: usize| {
        vec![touchpoint(
            &format!("d-{n}"),
            "ivan",
            "parcel.scanned",
            1,
            JourneyStage::Fulfil,
        )]
    };
    let stopping = tokio::spawn(node.shutdown());
    touchline_tests::wait_for_health_at(&target, "", false).await?;
    // Revoked by the file alone (no reload called): the node's own watch of it.
    std::fs::write(&path, partners_file(&[NEW]))?;
    let mut n = 0;
    let refused = loop {
        n += 1;
        match publish(&mut ingest, OLD, event(n)).await {
            Ok(_) => {}
            Err(error) => break error,
        }
        anyhow::ensure!(
            !stopping.is_finished(),
            "the delay ended with the revoked token still accepted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        (refused.code(), error_reason(&refused).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_INVALID"))
    );
    assert!(!stopping.is_finished(), "refused during the delay");
    assert_eq!(publish(&mut ingest, NEW, event(0)).await?.accepted, 1);
    stopping.await?
}
