//! `touchline backup` (a running node's system of record into a file, over `AdminService.Backup`)
//! and `touchline restore` (a backup file into a new store, offline).
//!
//! Neither leaves half a result under the name asked for: the backup is written to
//! `FILE.partial`, read back whole and checked, then renamed; the restore marks the store's folder
//! until every check passed, and a node refuses a store with the mark.

use std::fs::File;
use std::io::{BufReader, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use futures::StreamExt as _;
use touchline_projection::SledStore;
use touchline_projection::sled_store::RESTORE_MARKER;
use touchline_proto::backup::MAX_FRAME_BYTES;
use touchline_proto::v1;
use touchline_proto::v1::admin_service_client::AdminServiceClient;
use touchline_query::backup::Restored;

use crate::client::with_token;
use crate::connect::Target;

/// What a backup file holds, as read back from it.
pub use touchline_query::backup::Checked as BackupFile;

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Makes a rename or a new file in `path`'s folder durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    sync_dir(parent)
}

/// Reads a backup file through and checks it whole, without a store
/// ([`touchline_query::backup::check`]).
///
/// # Errors
/// When the file cannot be read or is not a whole, undamaged backup.
pub fn check_file(path: &Path) -> anyhow::Result<BackupFile> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(touchline_query::backup::check(BufReader::new(file))?)
}

/// Takes a backup of the node at `endpoint` into the new file `out`.
///
/// # Errors
/// When `out` (or `out.partial`) exists, the node refuses or fails the backup, or the file cannot
/// be written.
pub async fn backup(endpoint: &Target, token: &str, out: &Path) -> anyhow::Result<BackupFile> {
    anyhow::ensure!(
        !out.exists(),
        "{} exists: a backup is written to a new file",
        out.display()
    );
    let partial = with_suffix(out, ".partial");
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(|error| {
            let why = if error.kind() == std::io::ErrorKind::AlreadyExists {
                " (a backup in progress, or left by one that was interrupted: delete it)"
            } else {
                ""
            };
            anyhow::Error::new(error).context(format!("cannot create {}{why}", partial.display()))
        })?;
    // From here on the partial file is this backup's: deleted when it fails.
    let checked = async {
        write_partial(endpoint, token, &mut file).await?;
        drop(file);
        let checked = check_file(&partial)
            .with_context(|| format!("the backup written to {} is not whole", partial.display()))?;
        // A link, not a rename: it fails rather than replace a file made meanwhile. On a file
        // system without hard links (some network and FUSE mounts) a rename, once `out` is
        // checked to be still absent.
        match std::fs::hard_link(&partial, out) {
            Ok(()) => {
                let _ = std::fs::remove_file(&partial);
            }
            Err(error) if error.kind() != std::io::ErrorKind::AlreadyExists && !out.exists() => {
                tracing::debug!(%error, "no hard link: renaming the backup into place");
                std::fs::rename(&partial, out).with_context(|| {
                    format!("cannot rename {} to {}", partial.display(), out.display())
                })?;
            }
            Err(error) => {
                return Err(error).with_context(|| {
                    format!("cannot link {} to {}", partial.display(), out.display())
                });
            }
        }
        sync_parent(out).with_context(|| {
            format!(
                "the backup is in {}, but its folder could not be synced",
                out.display()
            )
        })?;
        Ok(checked)
    }
    .await;
    if checked.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    checked
}

async fn write_partial(endpoint: &Target, token: &str, file: &mut File) -> anyhow::Result<()> {
    let mut client = AdminServiceClient::new(endpoint.connect().await?)
        // A piece is at most about 2 MiB of frames plus one frame.
        .max_decoding_message_size(2 * MAX_FRAME_BYTES);
    let mut chunks = client
        .backup(with_token(v1::BackupRequest {}, token)?)
        .await?
        .into_inner();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.context("the node ended the backup")?;
        file.write_all(&chunk.data)
            .context("cannot write the backup file")?;
    }
    file.sync_all().context("cannot write the backup file")?;
    Ok(())
}

/// What a store's folder may hold and still be empty: a file system's own folder (the root of
/// an ext4 volume mounted there).
const IGNORED: &[&str] = &["lost+found"];

/// Restores the backup file `from` into a new store at `store_path`, a folder that is absent,
/// empty, or left by a restore that did not finish (which is started over). The store is built in
/// the folder itself (it may be a volume's mount point), marked with [`RESTORE_MARKER`] until
/// every check passed: a node refuses to open a store with the mark. The restore holds a lock on
/// the mark while it runs: a second restore into the folder is refused meanwhile.
///
/// # Errors
/// When the folder holds a store, another restore runs into it, the store cannot be made, or the
/// file is not a whole, undamaged backup (then the folder is left empty, or absent as it was; or,
/// when that cannot be done or the folder's mark cannot be written, marked: a node refuses it and
/// restoring again starts over); or when the restored store's folder cannot be synced once its
/// mark is gone (the store stays).
pub fn restore(from: &Path, store_path: &Path, cache_bytes: u64) -> anyhow::Result<Restored> {
    restore_with(from, store_path, cache_bytes, &sync_dir)
}

/// Makes a folder's entries (files made, renamed or deleted in it) durable.
fn sync_dir(folder: &Path) -> std::io::Result<()> {
    File::open(folder)?.sync_all()
}

/// [`restore`], folders synced by `sync_dir` (tests make it fail).
fn restore_with(
    from: &Path,
    store_path: &Path,
    cache_bytes: u64,
    sync_dir: &dyn Fn(&Path) -> std::io::Result<()>,
) -> anyhow::Result<Restored> {
    let file = File::open(from).with_context(|| format!("cannot open {}", from.display()))?;
    let created = !store_path.exists();
    if created {
        std::fs::create_dir_all(store_path)
            .with_context(|| format!("cannot create {}", store_path.display()))?;
        sync_parent(store_path)?;
    }
    let marker = store_path.join(RESTORE_MARKER);
    let had_marker = marker.exists();
    let entries = contents(store_path)?;
    anyhow::ensure!(
        entries.is_empty() || had_marker,
        "{} holds a store: a backup is restored into a new one; move it aside (or point store.path elsewhere) first",
        store_path.display()
    );
    // A mark this restore makes must be new, and one it takes over must still be there: a folder
    // that changed meanwhile (another restore, a node) is refused.
    let lock = File::options()
        .write(true)
        .create_new(!had_marker)
        .open(&marker)
        .with_context(|| {
            format!(
                "cannot take {} (did another restore or a node start on the folder meanwhile?)",
                marker.display()
            )
        })?;
    // Before the folder is marked for good (a file system without locks, a mark that cannot be
    // made durable): a mark this restore made goes, and the folder if it made that too, so that
    // nothing is left of it.
    let give_up = |lock: File| {
        if !had_marker {
            drop(lock);
            leave_or_discard(store_path, created, store_in_use(store_path));
        }
    };
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another restore is running into {}: wait for it to end",
            store_path.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            give_up(lock);
            return Err(error).with_context(|| format!("cannot lock {}", marker.display()));
        }
    }
    // The mark locked is still the folder's: not one a restore that just finished removed (its
    // store is whole) before this one took the lock.
    anyhow::ensure!(
        std::fs::metadata(&marker).is_ok_and(|now| same_file(&now, &lock.metadata().ok())),
        "{} changed meanwhile (another restore finished into it?): look at it again",
        store_path.display()
    );
    if had_marker && entries.len() > 1 {
        // A restore that did not finish left its mark; a node that started on the folder
        // before that mark was made (it looks for the mark only as it opens) may run on it.
        anyhow::ensure!(
            !store_in_use(store_path),
            "{} is marked by a restore that did not finish, but a node has the store in it open: stop that node first (or restore elsewhere)",
            store_path.display()
        );
        tracing::warn!(path = %store_path.display(), "starting over a restore that did not finish");
        empty(store_path)?;
    }
    if let Err(error) = lock.sync_all().and_then(|()| sync_dir(store_path)) {
        give_up(lock);
        return Err(error).with_context(|| format!("cannot write {}", marker.display()));
    }
    let store = match SledStore::open_for_restore(store_path, cache_bytes) {
        Ok(store) => store,
        Err(error) => {
            leave_or_discard(
                store_path,
                created,
                !had_marker && locked_by_another(&error),
            );
            return Err(error.into());
        }
    };
    let restored = touchline_query::backup::restore(BufReader::new(file), &store)
        .with_context(|| format!("cannot restore {}", from.display()));
    drop(store);
    let restored = match restored {
        Ok(restored) => restored,
        Err(error) => {
            discard(store_path, created);
            return Err(error);
        }
    };
    // The store is whole and durable from here: whatever fails now, it stays. A mark that cannot
    // be removed stays too (a node refuses the folder; restoring again starts over).
    std::fs::remove_file(&marker).with_context(|| {
        format!(
            "restored into {}, but cannot remove {}: remove it by hand",
            store_path.display(),
            marker.display()
        )
    })?;
    sync_dir(store_path).with_context(|| {
        format!(
            "restored into {}, but cannot sync the folder: after a crash its mark may come back (a node then refuses it: restore again)",
            store_path.display()
        )
    })?;
    drop(lock);
    Ok(restored)
}

/// Whether sled could not open the store because another process holds its lock (a node started
/// on the folder): sled 0.34 says so in an I/O error. Any other failure is this restore's own,
/// made before or after sled took the lock (whose file sled's threads may still hold a moment).
fn locked_by_another(error: &touchline_projection::Error) -> bool {
    let mut cause: Option<&dyn std::error::Error> = Some(error);
    while let Some(error) = cause {
        if error.to_string().contains("could not acquire lock") {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Whether a process (a node) has the sled store in `folder` open: sled holds an exclusive lock
/// on its `db` file while it is open. Checked before deleting what a folder holds that this
/// restore did not make.
fn store_in_use(folder: &Path) -> bool {
    File::open(folder.join("db"))
        .is_ok_and(|db| matches!(db.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
}

/// Whether two files' metadata are of the same file (`now` against the one opened, if known).
fn same_file(now: &std::fs::Metadata, opened: &Option<std::fs::Metadata>) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        opened
            .as_ref()
            .is_some_and(|opened| (now.dev(), now.ino()) == (opened.dev(), opened.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = (now, opened);
        true
    }
}

/// Deletes what a failed restore made in `store_path`: the store's files first and the mark
/// last (a crash in between leaves a marked folder), then the folder when the restore created it.
/// After a restore that gave up: a folder whose store is `in_use` (a node started on it before
/// the mark was made) is left alone, without the mark this restore made; otherwise what the
/// restore made (sled's folders, a configuration, a log: no store a node should start on) is
/// deleted ([`discard`]).
fn leave_or_discard(store_path: &Path, created: bool, in_use: bool) {
    if in_use {
        let _ = std::fs::remove_file(store_path.join(RESTORE_MARKER));
    } else {
        discard(store_path, created);
    }
}

fn discard(store_path: &Path, created: bool) {
    let deleted = empty(store_path).and_then(|()| {
        std::fs::remove_file(store_path.join(RESTORE_MARKER))?;
        if created {
            std::fs::remove_dir(store_path)?;
        }
        Ok(())
    });
    if let Err(error) = deleted {
        tracing::warn!(path = %store_path.display(), error = format!("{error:#}"), "cannot clear what the failed restore made: restore into the folder again (a node refuses it while it is marked)");
    }
}

/// The entries of a folder but [`IGNORED`] ones.
fn contents(folder: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut entries = Vec::new();
    for entry in
        std::fs::read_dir(folder).with_context(|| format!("cannot read {}", folder.display()))?
    {
        let entry = entry?;
        if !IGNORED.iter().any(|ignored| entry.file_name() == *ignored) {
            entries.push(entry.path());
        }
    }
    Ok(entries)
}

/// Deletes a folder's contents but [`IGNORED`] ones and the restore's marker.
fn empty(folder: &Path) -> anyhow::Result<()> {
    let marker = folder.join(RESTORE_MARKER);
    for entry in contents(folder)? {
        if entry == marker {
            continue;
        }
        if entry.is_dir() {
            std::fs::remove_dir_all(&entry)
        } else {
            std::fs::remove_file(&entry)
        }
        .with_context(|| format!("cannot delete {}", entry.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use touchline_projection::sled_store::LogHasher;
    use touchline_proto::backup::{FORMAT, FrameWriter};
    use touchline_proto::v1::backup_frame::Frame;
    use touchline_proto::v1::{BackupEvents, BackupHeader, LoggedEvent};

    use super::*;

    /// A backup file of `events` events (any bytes: the check does not decode them) whose header
    /// says `stated` events, whose events start at `first` and whose trailer holds `log_sha256`
    /// (`None`: the right one).
    fn file(events: u64, stated: u64, first: u64, log_sha256: Option<&str>) -> Vec<u8> {
        let mut writer = FrameWriter::new();
        let mut bytes = writer.frame(Frame::Header(BackupHeader {
            format: FORMAT.to_owned(),
            events: stated,
            ..Default::default()
        }));
        let mut log = LogHasher::default();
        let logged: Vec<_> = (0..events)
            .map(|index| {
                let offset = i64::try_from(index).unwrap_or_default();
                let record = vec![u8::try_from(index % 200).unwrap_or_default(); 40];
                log.add_event(first + index, 0, offset, &record);
                LoggedEvent {
                    partition: 0,
                    offset,
                    record,
                }
            })
            .collect();
        bytes.extend(writer.frame(Frame::Events(BackupEvents {
            first_sequence: first,
            events: logged,
        })));
        let log = log.finish();
        bytes.extend(writer.trailer(events, log_sha256.map_or(log.sha256, ToOwned::to_owned)));
        bytes
    }

    fn check(bytes: &[u8]) -> anyhow::Result<BackupFile> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("backup");
        std::fs::write(&path, bytes)?;
        check_file(&path)
    }

    #[test]
    fn a_whole_backup_checks_and_every_inconsistency_is_found() {
        let checked = check(&file(30, 30, 1, None)).expect("a whole backup");
        assert_eq!(checked.events, 30);

        let error = check(&file(30, 30, 1, Some("00"))).expect_err("another log checksum");
        assert!(error.to_string().contains("log checksum"), "{error}");
        let error = check(&file(30, 30, 2, None)).expect_err("a gap");
        assert!(
            error.to_string().contains("starts at sequence 2"),
            "{error}"
        );
        let error = check(&file(30, 31, 1, None)).expect_err("a count that does not add up");
        assert!(error.to_string().contains("do not add up"), "{error}");
    }

    /// A store a restore cannot open because a node holds it is told apart from one it failed to
    /// make (then its files are its own to delete), by sled's own error.
    #[test]
    fn a_store_held_by_another_is_told_apart_from_a_failure_to_make_one() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let held = dir.path().join("held");
        let _node = SledStore::open(&held)?;
        let error = SledStore::open_for_restore(&held, 1 << 20).expect_err("held");
        assert!(locked_by_another(&error), "{error:#?}");
        // A failure of its own: the folder is a file.
        let file = dir.path().join("file");
        std::fs::write(&file, b"")?;
        let error = SledStore::open_for_restore(&file, 1 << 20).expect_err("not a folder");
        assert!(!locked_by_another(&error), "{error:#?}");
        Ok(())
    }

    /// A backup file in `dir` of a store of one dead letter.
    fn one_dead_letter_backup(dir: &Path) -> anyhow::Result<PathBuf> {
        use touchline_core::{ConsumedRecord, EventStore as _, RecordContent, StreamIdentity};
        let source = SledStore::open(&dir.join("source"))?;
        let stream = StreamIdentity {
            cluster_id: "test".to_owned(),
            topic: "touchpoints".to_owned(),
        };
        source.apply(
            &stream,
            vec![ConsumedRecord {
                partition: 0,
                offset: 0,
                content: RecordContent::Undecodable {
                    reason: "not an envelope".to_owned(),
                    key: None,
                    value: Some(vec![0xff]),
                },
            }],
        )?;
        source.flush()?;
        let mut bytes = Vec::new();
        touchline_query::backup::write(&source, |piece| {
            bytes.extend(piece);
            true
        })?;
        let backup = dir.join("backup");
        std::fs::write(&backup, bytes)?;
        Ok(backup)
    }

    /// A backup whose dead-lettered record points to a dead-letter id its header says was never
    /// given: refused (the restored store would give that id to another record's dead letter,
    /// which the first record, decoding one day, would take off the list), and nothing is left.
    #[test]
    fn a_restore_refuses_a_dead_letter_id_the_backup_had_not_given() -> anyhow::Result<()> {
        use touchline_proto::v1::DeadLetteredRecord;
        let dir = tempfile::tempdir()?;
        let file = |dead_letter_id| {
            let mut writer = FrameWriter::new();
            let mut bytes = writer.frame(Frame::Header(BackupHeader {
                format: FORMAT.to_owned(),
                dead_lettered_records: 1,
                next_dead_letter: 5,
                ..Default::default()
            }));
            bytes.extend(writer.frame(Frame::DeadLetteredRecord(DeadLetteredRecord {
                stream: "cluster/touchpoints".to_owned(),
                partition: 0,
                offset: 7,
                dead_letter_id,
                fingerprint: 1,
            })));
            bytes.extend(writer.trailer(0, LogHasher::default().finish().sha256));
            bytes
        };
        // An id the backup had given (its dead letter since requeued or discarded): restored.
        let given = dir.path().join("given.backup");
        std::fs::write(&given, file(4))?;
        restore_with(&given, &dir.path().join("given"), 1 << 20, &sync_dir)?;
        // The next id, or one above it: refused.
        for id in [5, 50] {
            let backup = dir.path().join(format!("{id}.backup"));
            std::fs::write(&backup, file(id))?;
            let target = dir.path().join(id.to_string());
            let error =
                restore_with(&backup, &target, 1 << 20, &sync_dir).expect_err("an id never given");
            assert!(
                format!("{error:#}").contains("not below the backup's next dead-letter id"),
                "{error:#}"
            );
            assert!(!target.exists());
        }
        Ok(())
    }

    /// A folder marked by a restore that did not finish, on which a node runs (it started before
    /// the mark was made): a new restore refuses it and deletes nothing (it emptied the folder,
    /// the running store's files included).
    #[test]
    fn a_restore_leaves_a_store_a_node_has_open_alone() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let backup = one_dead_letter_backup(dir.path())?;
        let target = dir.path().join("target");
        let running = SledStore::open(&target)?;
        std::fs::write(target.join(RESTORE_MARKER), b"")?;
        let before = contents(&target)?;
        let error = restore_with(&backup, &target, 1 << 20, &sync_dir)
            .expect_err("the folder's store is open");
        assert!(
            format!("{error:#}").contains("has the store in it open"),
            "{error:#}"
        );
        assert_eq!(contents(&target)?, before, "nothing deleted");
        assert!(target.join("db").exists());
        drop(running);
        Ok(())
    }

    #[test]
    fn a_restore_that_cannot_make_its_mark_durable_leaves_nothing() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let backup = one_dead_letter_backup(dir.path())?;
        let target = dir.path().join("target");
        let error = restore_with(&backup, &target, 1 << 20, &|folder| {
            if folder.join(RESTORE_MARKER).exists() {
                Err(std::io::Error::other("injected sync failure"))
            } else {
                sync_dir(folder)
            }
        })
        .expect_err("the mark's sync failed");
        assert!(format!("{error:#}").contains("cannot write"), "{error:#}");
        assert!(
            !target.exists(),
            "the folder the restore made, and its mark, are gone"
        );
        Ok(())
    }

    #[test]
    fn a_restore_whose_last_folder_sync_fails_keeps_the_store_it_restored() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let backup = one_dead_letter_backup(dir.path())?;

        // The folder's sync after the mark is removed fails (an I/O error).
        let target = dir.path().join("target");
        let error = restore_with(&backup, &target, 1 << 20, &|folder| {
            if folder.join(RESTORE_MARKER).exists() {
                sync_dir(folder)
            } else {
                Err(std::io::Error::other("injected sync failure"))
            }
        })
        .expect_err("the sync failed");
        assert!(format!("{error:#}").contains("restored into"), "{error:#}");
        // The restored store stays, unmarked, whole.
        assert!(!target.join(RESTORE_MARKER).exists());
        // sled lets go of its lock from a thread of its own: polled.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let restored = loop {
            match SledStore::open(&target) {
                Ok(store) => break store,
                Err(error) if std::time::Instant::now() < deadline => {
                    tracing::debug!(%error, "not yet released");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(error) => return Err(error.into()),
            }
        };
        assert_eq!(restored.dead_letter_count(), 1);
        Ok(())
    }
}
