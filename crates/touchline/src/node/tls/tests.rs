use std::path::PathBuf;

use super::*;

pub(super) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/tls")
        .join(name)
}

/// Held by each test that loads TLS files: the expiry gauge is the process's, one test's load
/// would change what another asserts.
static LOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A server on copies of the `server` fixtures in `dir`.
fn server(dir: &Path) -> anyhow::Result<TlsServer> {
    let files = TlsConfig {
        cert_file: dir.join("tls.pem"),
        key_file: dir.join("tls.key"),
        client_ca_file: None,
    };
    std::fs::copy(fixture("server.pem"), &files.cert_file)?;
    std::fs::copy(fixture("server.key"), &files.key_file)?;
    TlsServer::load(&files)
}

/// The certificate served now.
fn served(server: &TlsServer) -> CertificateDer<'static> {
    server
        .current
        .0
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .cert[0]
        .clone()
}

async fn until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    while !done() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{what}");
        poll.tick().await;
    }
    Ok(())
}

/// Writes `from` to `to` by a rename, with the modification time `to` had (as `cp -p`,
/// `rsync -a` or `tar x` of files dated alike).
fn replace_keeping_the_time(from: &Path, to: &Path) -> anyhow::Result<()> {
    let modified = std::fs::metadata(to)?.modified()?;
    let aside = to.with_extension("new");
    std::fs::copy(from, &aside)?;
    std::fs::File::options()
        .write(true)
        .open(&aside)?
        .set_modified(modified)?;
    std::fs::rename(&aside, to)?;
    Ok(())
}

#[tokio::test]
async fn files_replaced_with_their_old_modification_times_are_served() -> anyhow::Result<()> {
    let _loading = LOADING.lock().await;
    let dir = tempfile::tempdir()?;
    let server = server(dir.path())?;
    let before = served(&server);
    let stop = CancellationToken::new();
    let watching = server.watch_with(futures::stream::pending().boxed(), stop.clone());
    replace_keeping_the_time(&fixture("self-signed.key"), &server.files.key_file)?;
    replace_keeping_the_time(&fixture("self-signed.pem"), &server.files.cert_file)?;
    until("the renewed certificate was never served", || {
        served(&server) != before
    })
    .await?;
    let renewed = std::fs::read(fixture("self-signed.pem"))?;
    let expected = CertificateDer::pem_slice_iter(&renewed)
        .next()
        .expect("a certificate")?;
    assert_eq!(served(&server), expected);
    stop.cancel();
    watching.await?;
    Ok(())
}

#[tokio::test]
async fn a_hangup_reloads_at_once_and_a_broken_file_is_counted() -> anyhow::Result<()> {
    let _loading = LOADING.lock().await;
    let dir = tempfile::tempdir()?;
    let server = server(dir.path())?;
    let before = served(&server);
    let (hangup, hangups) = tokio::sync::mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let watching = server.watch_with(
        tokio_stream::wrappers::UnboundedReceiverStream::new(hangups).boxed(),
        stop.clone(),
    );
    // Unchanged files are read again on a hangup.
    hangup.send(())?;
    until("a hangup did not reload", || {
        server.reloaded.load(Ordering::Relaxed) == 1
    })
    .await?;
    assert_eq!(served(&server), before);

    // A certificate that does not load is counted, and the one in force stays.
    let failed = || {
        RELOADS
            .get_or_create(&ReloadLabels { result: "failed" })
            .get()
    };
    let failed_before = failed();
    std::fs::write(&server.files.cert_file, b"not a certificate")?;
    until("the broken certificate was never counted", || {
        server.failures.load(Ordering::Relaxed) == 1
    })
    .await?;
    assert!(failed() > failed_before);
    assert_eq!(served(&server), before);
    assert_eq!(server.reloaded.load(Ordering::Relaxed), 1);
    stop.cancel();
    watching.await?;
    Ok(())
}

#[tokio::test]
async fn the_expiry_of_the_certificates_in_force_is_a_gauge() -> anyhow::Result<()> {
    let _loading = LOADING.lock().await;
    let dir = tempfile::tempdir()?;
    let server = server(dir.path())?;
    let expiry = |file| EXPIRES_AT.get_or_create(&FileLabel { file }).get();
    // `openssl x509 -noout -enddate`: Nov  2 03:26:55 2126 GMT.
    assert_eq!(expiry("cert"), 4_949_263_615);

    // An expired certificate, loaded at a hangup.
    let (hangup, hangups) = tokio::sync::mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let watching = server.watch_with(
        tokio_stream::wrappers::UnboundedReceiverStream::new(hangups).boxed(),
        stop.clone(),
    );
    std::fs::copy(fixture("expired.key"), &server.files.key_file)?;
    std::fs::copy(fixture("expired.pem"), &server.files.cert_file)?;
    hangup.send(())?;
    until("the expired certificate was never loaded", || {
        server.reloaded.load(Ordering::Relaxed) == 1
    })
    .await?;
    // An expired certificate is still served (clients refuse it; the node warns).
    assert_eq!(
        served(&server).as_ref(),
        fixture_der("expired.pem")?.as_ref()
    );
    // 2001-01-01T00:00:00Z.
    assert_eq!(expiry("cert"), 978_307_200);
    stop.cancel();
    watching.await?;
    Ok(())
}

/// The first certificate of a fixture.
fn fixture_der(name: &str) -> anyhow::Result<CertificateDer<'static>> {
    let pem = std::fs::read(fixture(name))?;
    CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| anyhow::anyhow!("no certificate in {name}"))?
        .map_err(Into::into)
}
