//! `touchline backup` (a running node's system of record into a file, over `AdminService.Backup`)
//! and `touchline restore` (a backup file into a new store, offline).
//!
//! Neither leaves half a result under the name asked for: the backup is written to
//! `FILE.partial`, read back whole and checked, then renamed; the restore builds the store in
//! `STORE.restoring` and renames it into place once every check passed.

use std::fs::File;
use std::io::{BufReader, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use futures::StreamExt as _;
use touchline_projection::SledStore;
use touchline_proto::backup::{FrameReader, MAX_FRAME_BYTES};
use touchline_proto::v1;
use touchline_proto::v1::admin_service_client::AdminServiceClient;
use touchline_proto::v1::backup_frame::Frame;
use touchline_query::backup::Restored;

use crate::client::with_token;
use crate::connect::Target;

/// What a backup file holds, as read back from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupFile {
    pub events: u64,
    pub bytes: u64,
    pub log_sha256: String,
}

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
    File::open(parent)?.sync_all()
}

/// Reads a backup file through, checking it whole (order, sizes, checksum, trailer).
///
/// # Errors
/// When the file cannot be read or is not a whole, undamaged backup.
pub fn check_file(path: &Path) -> anyhow::Result<BackupFile> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut frames = FrameReader::new(BufReader::new(file));
    let mut trailer = None;
    while let Some(frame) = frames.next_frame()? {
        if let Frame::Trailer(read) = frame {
            trailer = Some(read);
        }
    }
    let trailer = trailer.context("the backup has no trailer")?;
    Ok(BackupFile {
        events: trailer.events,
        bytes: frames.offset(),
        log_sha256: trailer.log_sha256,
    })
}

/// Takes a backup of the node at `endpoint` into the new file `out`.
///
/// # Errors
/// When `out` exists, the node refuses or fails the backup, or the file cannot be written.
pub async fn backup(endpoint: &Target, token: &str, out: &Path) -> anyhow::Result<BackupFile> {
    anyhow::ensure!(
        !out.exists(),
        "{} exists: a backup is written to a new file",
        out.display()
    );
    let partial = with_suffix(out, ".partial");
    let written = write_partial(endpoint, token, &partial).await;
    let checked = written.and_then(|()| {
        let checked = check_file(&partial)
            .with_context(|| format!("the backup written to {} is not whole", partial.display()))?;
        std::fs::rename(&partial, out)
            .with_context(|| format!("cannot rename {} to {}", partial.display(), out.display()))?;
        sync_parent(out)?;
        Ok(checked)
    });
    if checked.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    checked
}

async fn write_partial(endpoint: &Target, token: &str, partial: &Path) -> anyhow::Result<()> {
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(partial)
        .with_context(|| {
            format!(
                "cannot create {} (a backup in progress, or left by one that failed: delete it)",
                partial.display()
            )
        })?;
    let mut client = AdminServiceClient::new(endpoint.connect().await?)
        // A piece is about 1 MiB of frames plus one frame.
        .max_decoding_message_size(2 * MAX_FRAME_BYTES);
    let mut chunks = client
        .backup(with_token(v1::BackupRequest {}, token)?)
        .await?
        .into_inner();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.context("the node ended the backup")?;
        file.write_all(&chunk.data)
            .with_context(|| format!("cannot write {}", partial.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("cannot write {}", partial.display()))?;
    Ok(())
}

/// Restores the backup file `from` into a new store at `store_path` (which must not exist, or be
/// an empty folder), with a page cache of `cache_bytes`.
///
/// # Errors
/// When the store exists, or the file is not a whole, undamaged backup (then nothing is left at
/// `store_path`).
pub fn restore(from: &Path, store_path: &Path, cache_bytes: u64) -> anyhow::Result<Restored> {
    let empty_folder = store_path.is_dir()
        && std::fs::read_dir(store_path)
            .with_context(|| format!("cannot read {}", store_path.display()))?
            .next()
            .is_none();
    anyhow::ensure!(
        !store_path.exists() || empty_folder,
        "{} exists: a backup is restored into a new store; move the store aside (or point store.path elsewhere) first",
        store_path.display()
    );
    let file = File::open(from).with_context(|| format!("cannot open {}", from.display()))?;
    let building = with_suffix(store_path, ".restoring");
    if building.exists() {
        tracing::warn!(path = %building.display(), "deleting what an earlier restore left");
        std::fs::remove_dir_all(&building)
            .with_context(|| format!("cannot delete {}", building.display()))?;
    }
    let restored = SledStore::open_with_cache(&building, cache_bytes)
        .map_err(anyhow::Error::from)
        .and_then(|store| {
            let restored = touchline_query::backup::restore(BufReader::new(file), &store)
                .with_context(|| format!("cannot restore {}", from.display()))?;
            drop(store);
            if empty_folder {
                std::fs::remove_dir(store_path)?;
            }
            std::fs::rename(&building, store_path).with_context(|| {
                format!(
                    "cannot rename {} to {}",
                    building.display(),
                    store_path.display()
                )
            })?;
            sync_parent(store_path)?;
            Ok(restored)
        });
    if restored.is_err() {
        let _ = std::fs::remove_dir_all(&building);
    }
    restored
}
