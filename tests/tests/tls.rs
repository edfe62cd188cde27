//! TLS on the gRPC listener (`server.tls`): partners publish and internal services read over it,
//! plaintext and untrusted clients get nothing, a node that names a client CA requires client
//! certificates (and tokens still), a renewed certificate or client CA applies without a restart,
//! a connection that does not finish its handshake by the preface deadline is closed (its slot
//! coming back), and a certificate the node cannot use stops the start.
//! The certificates are fixtures (`tests/data/tls/generate.sh`).

use std::path::PathBuf;

use tonic::Code;
use touchline::Target;
use touchline::config::TlsConfig;
use touchline_proto::v1::ingest_service_client::IngestServiceClient;
use touchline_proto::v1::timeline_service_client::TimelineServiceClient;
use touchline_proto::v1::{self, JourneyStage};
use touchline_tests::{
    COURIER, error_reason, event_ids, ingest_client, partners, publish, start_broker,
    start_node_with, timeline_client, touchpoint, wait_for_health, wait_for_timeline,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/tls")
        .join(name)
}

fn tls(cert: &str, key: &str, client_ca: Option<&str>) -> TlsConfig {
    TlsConfig {
        cert_file: fixture(cert),
        key_file: fixture(key),
        client_ca_file: client_ca.map(fixture),
    }
}

/// The node by the name its certificate carries.
fn https(node: &touchline::Node) -> Target {
    Target::new(format!("https://localhost:{}", node.local_addr().port()))
}

fn event(id: &str) -> v1::Touchpoint {
    touchpoint(id, "cust-tls", "parcel.delivered", 10, JourneyStage::Fulfil)
}

async fn publish_over(target: &Target, token: &str, id: &str) -> anyhow::Result<u32> {
    let mut ingest = IngestServiceClient::new(target.connect().await?);
    Ok(publish(&mut ingest, token, vec![event(id)]).await?.accepted)
}

/// Publishes event `id` through `target` as soon as the node's reloaded TLS files let it connect
/// (polled, the node checks its files every 2 s), or fails with `never` at the deadline.
async fn publish_once_reloaded(target: &Target, id: &str, never: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + touchline_tests::DEADLINE;
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        poll.tick().await;
        if let Ok(accepted) = publish_over(target, COURIER.1, id).await {
            assert_eq!(accepted, 1);
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{never}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_publish_and_services_read_over_tls_and_nothing_else_gets_in() -> anyhow::Result<()>
{
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.server.tls = Some(tls("server.pem", "server.key", None));
    })
    .await?;
    assert!(
        node.endpoint().starts_with("https://"),
        "{}",
        node.endpoint()
    );
    let trusted = https(&node).with_ca_cert(fixture("ca.pem"));

    assert_eq!(publish_over(&trusted, COURIER.1, "tls-1").await?, 1);
    let mut timeline = TimelineServiceClient::new(trusted.connect().await?);
    let entries = wait_for_timeline(&mut timeline, "cust-tls", 1).await?;
    assert_eq!(event_ids(&entries), ["tls-1"]);

    // The command-line clients connect through the same `Target`.
    let mut cli = touchline::client::timeline_client(&trusted, None).await?;
    let page = cli
        .get_timeline(v1::GetTimelineRequest {
            customer_id: "cust-tls".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(event_ids(&page.entries), ["tls-1"]);

    // Plaintext to the TLS port, a client that trusts another CA, and one that trusts only the
    // system's roots: none gets a call through.
    let plaintext = Target::new(format!("http://127.0.0.1:{}", node.local_addr().port()));
    let other_ca = https(&node).with_ca_cert(fixture("other-ca.pem"));
    let system_roots = https(&node);
    // (The test CA is not among the system's roots; a machine without any fails to set up TLS.)
    for (what, target, expected) in [
        ("plaintext", &plaintext, &["transport error"][..]),
        ("another CA", &other_ca, &["invalid peer certificate"]),
        (
            "system roots",
            &system_roots,
            &["invalid peer certificate", "no native certs found"],
        ),
    ] {
        let refused = publish_over(target, COURIER.1, "never").await;
        let error = format!("{:#}", refused.expect_err(what));
        assert!(
            expected.iter().any(|expected| error.contains(expected)),
            "{what}: {error}"
        );
    }

    // The publish client gives up at once on a certificate it does not trust, saying why,
    // instead of reconnecting (it would end with "gave up after ... attempts").
    let options = touchline::stream_client::PublishOptions {
        print_rejections: false,
        ..Default::default()
    };
    let refused = touchline::stream_client::publish(
        &other_ca,
        COURIER.1,
        [Ok((1, event("never")))],
        &options,
    )
    .await
    .expect_err("an untrusted certificate");
    let error = format!("{refused:#}");
    assert!(
        error.contains("the stream cannot go on") && error.contains("invalid peer certificate"),
        "{error}"
    );

    // The node serves on: the refused connections changed nothing.
    assert_eq!(publish_over(&trusted, COURIER.1, "tls-2").await?, 1);
    let entries = wait_for_timeline(&mut timeline, "cust-tls", 2).await?;
    assert_eq!(event_ids(&entries), ["tls-1", "tls-2"]);
    node.shutdown().await
}

/// `server.preface-timeout-ms` counts the TLS handshake in: a connection that sends nothing is
/// closed at it (not at the 10 s handshake timeout that applies without it), and the slot it held
/// under `server.max-connections-per-peer` comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_silent_before_its_handshake_is_closed_at_the_preface_deadline()
-> anyhow::Result<()> {
    use tokio::io::AsyncReadExt as _;
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.server.tls = Some(tls("server.pem", "server.key", None));
        config.server.preface_timeout_ms = 300;
        config.server.max_connections_per_peer = 1;
    })
    .await?;
    let mut silent = tokio::net::TcpStream::connect(node.local_addr()).await?;
    let mut byte = [0_u8; 1];
    // Well before the handshake timeout of 10 s; the node sends nothing first (TLS waits for the
    // client's hello).
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(5), silent.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the silent connection was not closed at the preface deadline: {read:?}"
    );
    // Its slot came back: a partner from the same address is served.
    let trusted = https(&node).with_ca_cert(fixture("ca.pem"));
    publish_once_reloaded(
        &trusted,
        "after-silent",
        "never served after the silent connection",
    )
    .await?;
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_client_ca_requires_a_client_certificate_and_still_a_token()
-> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.server.tls = Some(tls("server.pem", "server.key", Some("ca.pem")));
    })
    .await?;
    let without_certificate = https(&node).with_ca_cert(fixture("ca.pem"));
    let refused = publish_over(&without_certificate, COURIER.1, "no-cert").await;
    // The server ends the handshake: a transport error, not an answer of the service.
    let error = format!("{:#}", refused.expect_err("refused without a certificate"));
    assert!(error.contains("transport error"), "{error}");
    // The publish client stops at once (TLS 1.3 shows the refusal only at the first call),
    // instead of reconnecting until it gives up.
    let options = touchline::stream_client::PublishOptions {
        print_rejections: false,
        max_attempts: 3,
        ..Default::default()
    };
    let refused = touchline::stream_client::publish(
        &without_certificate,
        COURIER.1,
        [Ok((1, event("no-cert-stream")))],
        &options,
    )
    .await
    .expect_err("refused without a certificate");
    let error = format!("{refused:#}");
    assert!(error.contains("the stream cannot go on"), "{error}");

    // A certificate of another CA is refused too.
    let other_certificate = without_certificate
        .clone()
        .with_client_cert(fixture("other-client.pem"), fixture("other-client.key"));
    let refused = publish_over(&other_certificate, COURIER.1, "other-cert").await;
    let error = format!(
        "{:#}",
        refused.expect_err("another CA's client certificate")
    );
    assert!(error.contains("transport error"), "{error}");

    let with_certificate = without_certificate
        .clone()
        .with_client_cert(fixture("client.pem"), fixture("client.key"));
    assert_eq!(
        publish_over(&with_certificate, COURIER.1, "mtls-1").await?,
        1
    );

    // The certificate lets a client connect; the partner is still the token's.
    let mut ingest = IngestServiceClient::new(with_certificate.connect().await?);
    let unauthenticated = ingest
        .publish(v1::PublishRequest {
            events: vec![event("no-token")],
            batch_id: String::new(),
        })
        .await
        .expect_err("a call without a token is refused");
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    assert_eq!(
        error_reason(&unauthenticated).as_deref(),
        Some("TOKEN_MISSING")
    );

    let mut timeline = TimelineServiceClient::new(with_certificate.connect().await?);
    let entries = wait_for_timeline(&mut timeline, "cust-tls", 1).await?;
    assert_eq!(event_ids(&entries), ["mtls-1"]);
    node.shutdown().await
}

/// A self-signed certificate, as a development node would have: the node's own clients (the
/// test helpers and `touchline dev --demo` use `Node::target`) trust its certificate file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_self_signed_certificate_is_reached_by_its_own_clients() -> anyhow::Result<()>
{
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let node = start_node_with(&broker, dir.path(), partners(), |config| {
        config.server.tls = Some(tls("self-signed.pem", "self-signed.key", None));
    })
    .await?;
    wait_for_health(&node, "", true).await?;
    let mut ingest = ingest_client(&node).await?;
    let accepted = publish(&mut ingest, COURIER.1, vec![event("self-1")]).await?;
    assert_eq!(accepted.accepted, 1);
    let mut timeline = timeline_client(&node).await?;
    let entries = wait_for_timeline(&mut timeline, "cust-tls", 1).await?;
    assert_eq!(event_ids(&entries), ["self-1"]);
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_the_node_cannot_use_stops_the_start() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let not_pem = dir.path().join("not-a-certificate.pem");
    std::fs::write(&not_pem, "not a certificate\n")?;
    let cases = [
        (
            "a missing certificate file",
            tls("missing.pem", "server.key", None),
            "server.tls.cert-file",
        ),
        (
            "a missing key file",
            tls("server.pem", "missing.key", None),
            "server.tls.key-file",
        ),
        (
            "a key of another certificate",
            tls("server.pem", "client.key", None),
            "server.tls: cannot serve",
        ),
        (
            "a file without a certificate",
            TlsConfig {
                cert_file: not_pem.clone(),
                ..tls("server.pem", "server.key", None)
            },
            "server.tls.cert-file",
        ),
        (
            "a key file without a key",
            tls("server.pem", "server.pem", None),
            "server.tls.key-file",
        ),
        (
            "a client CA file without a certificate",
            TlsConfig {
                client_ca_file: Some(not_pem.clone()),
                ..tls("server.pem", "server.key", None)
            },
            "server.tls.client-ca-file",
        ),
        (
            "a missing client CA file",
            tls("server.pem", "server.key", Some("missing.pem")),
            "server.tls.client-ca-file",
        ),
    ];
    for (what, settings, expected) in cases {
        let started = start_node_with(&broker, dir.path(), partners(), |config| {
            config.server.tls = Some(settings);
        })
        .await;
        let error = format!("{:#}", started.expect_err("the start fails"));
        assert!(error.contains(expected), "{what}: {error}");
        // Refused before the store was opened.
        assert!(
            !dir.path().join("store").exists(),
            "{what}: the store was created"
        );
    }
    Ok(())
}

/// A renewed certificate is served without a restart: the node checks its files every few
/// seconds and serves the new pair to new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("tls.pem"), dir.path().join("tls.key"));
    std::fs::copy(fixture("server.pem"), &cert)?;
    std::fs::copy(fixture("server.key"), &key)?;
    let (served_cert, served_key) = (cert.clone(), key.clone());
    let node = start_node_with(&broker, dir.path(), partners(), move |config| {
        config.server.tls = Some(TlsConfig {
            cert_file: served_cert,
            key_file: served_key,
            client_ca_file: None,
        });
    })
    .await?;
    let by_ca = https(&node).with_ca_cert(fixture("ca.pem"));
    let by_renewed = Target::new(format!("https://127.0.0.1:{}", node.local_addr().port()))
        .with_ca_cert(fixture("self-signed.pem"));
    assert_eq!(publish_over(&by_ca, COURIER.1, "before").await?, 1);
    assert!(
        publish_over(&by_renewed, COURIER.1, "not-yet")
            .await
            .is_err()
    );

    // The renewal: key, then certificate, as a tool that writes them one by one.
    std::fs::copy(fixture("self-signed.key"), &key)?;
    std::fs::copy(fixture("self-signed.pem"), &cert)?;
    publish_once_reloaded(
        &by_renewed,
        "after",
        "the renewed certificate was never served",
    )
    .await?;
    // The old certificate is no longer served to new connections.
    let old = publish_over(&by_ca, COURIER.1, "old").await;
    assert!(format!("{:#}", old.expect_err("the old chain")).contains("invalid peer certificate"));
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_client_ca_is_required_without_a_restart() -> anyhow::Result<()> {
    let broker = start_broker().await;
    let dir = tempfile::tempdir()?;
    let client_ca = dir.path().join("client-ca.pem");
    std::fs::copy(fixture("ca.pem"), &client_ca)?;
    let trusted = client_ca.clone();
    let node = start_node_with(&broker, dir.path(), partners(), move |config| {
        let mut files = tls("server.pem", "server.key", None);
        files.client_ca_file = Some(trusted);
        config.server.tls = Some(files);
    })
    .await?;
    let server = https(&node).with_ca_cert(fixture("ca.pem"));
    let first = server
        .clone()
        .with_client_cert(fixture("client.pem"), fixture("client.key"));
    let second = server.with_client_cert(fixture("other-client.pem"), fixture("other-client.key"));
    assert_eq!(publish_over(&first, COURIER.1, "first-ca").await?, 1);
    assert!(publish_over(&second, COURIER.1, "not-yet").await.is_err());

    // The client CA is replaced (clients moved to the other CA): new connections need a
    // certificate of the new one.
    std::fs::copy(fixture("other-ca.pem"), &client_ca)?;
    publish_once_reloaded(&second, "second-ca", "the new client CA was never required").await?;
    let refused = publish_over(&first, COURIER.1, "old-ca").await;
    let error = format!("{:#}", refused.expect_err("the old CA's certificate"));
    assert!(error.contains("transport error"), "{error}");

    // A client CA file that does not load keeps the one in force.
    std::fs::write(&client_ca, b"not a certificate")?;
    // Over more than one check of the files (every 2 s), the CA in force stays.
    let still = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(100));
    while tokio::time::Instant::now() < still {
        assert_eq!(publish_over(&second, COURIER.1, "still").await?, 1);
        poll.tick().await;
    }
    // And the watch goes on: a CA that loads again applies.
    std::fs::copy(fixture("ca.pem"), &client_ca)?;
    publish_once_reloaded(
        &first,
        "first-again",
        "the CA after a broken one was never required",
    )
    .await?;
    node.shutdown().await
}
